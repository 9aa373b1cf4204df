"""Shared pieces of the lm-eval tests: a tiny random HF Llama-3 folder with its tokenizer.json,
lm-eval's own `hf` backend run on it (the reference), and helpers to compare per-request results.

    from lm_eval_fixtures import hf_reference, lm_eval_hf_dir  # noqa: F401 (session fixtures)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import llamax.lm_eval  # noqa: F401 - registers the `llamax` model
from hf_models import make_hf_model
from llama3_assets import BOS_ID, EOT_ID, VOCAB_SIZE, build_llama3_tokenizer
from llamax.infer.lm_eval_tasks import DEFAULT_INCLUDE_PATH, task_manager

TASKS = ("shakespeare_mc", "shakespeare_qa", "shakespeare_ppl")
# Documents per task: 24 multiple-choice requests, 4 three-shot generations, 2 scenes of ~2k
# tokens each (5 rolling windows of 512 tokens each).
LIMITS = {"shakespeare_mc": 6, "shakespeare_qa": 4, "shakespeare_ppl": 2}
MAX_LENGTH = 512
TOLERANCE = dict(abs=1e-4, rel=1e-6)  # rel: a scene's total is a float32 sum of ~2k log-probs


def make_llama3_folder(out: Path, seed: int = 0) -> Path:
    """A random tiny Llama-3-architecture HF folder (GQA, theta 5e5) with the Llama-3-format
    tokenizer trained on the corpus (tokenizer.json, generation_config eos ids [128001-like, eot])."""
    tokenizer = build_llama3_tokenizer(out.parent / f"{out.name}_tokenizer")
    model = make_hf_model("llama3_gqa", seed=seed, vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID,
                          eos_token_id=EOT_ID, pad_token_id=None, max_position_embeddings=MAX_LENGTH)
    model.save_pretrained(out)
    for file in tokenizer.iterdir():
        if file.is_file():
            shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="session")
def lm_eval_hf_dir(tmp_path_factory) -> Path:
    return make_llama3_folder(tmp_path_factory.getbasetemp() / "lm_eval_hf")


def make_run_dir(hf_dir: Path, run_path: Path, step: int = 3):
    """A training run whose `step` checkpoint holds the HF folder's weights, written by the
    run-directory and checkpoint owners (a copy of the tokenizer included)."""
    import jax

    from llamax.convert.hub import load_any
    from llamax.run_dir import RunDir
    from llamax.sharding import MeshConfig, make_mesh
    from llamax.train.checkpoint import Checkpointer
    from llamax.train.optim import OptimConfig
    from llamax.train.setup import make_train_setup

    config, params = load_any(hf_dir)
    setup = make_train_setup(config, OptimConfig(), make_mesh(MeshConfig()))
    state = setup.init(jax.random.key(0))
    state = state.replace(params=jax.device_put(params, setup.state_shardings.params))
    run = RunDir(run_path)
    run.commit(config, tokenizer=hf_dir / "tokenizer.json")
    with Checkpointer(run.checkpoints, async_save=False) as checkpointer:
        checkpointer.save(step, state, {"step": step}, force=True)
    return run


def evaluate(model, model_args, tasks=TASKS, **kwargs) -> dict:
    """lm_eval.simple_evaluate on the shipped tasks with LIMITS, samples logged, no bootstrap."""
    import lm_eval

    results = {}
    manager = task_manager(list(tasks), DEFAULT_INCLUDE_PATH)
    for task in tasks:  # one call per task: each gets its own limit
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=LIMITS[task],
                                      bootstrap_iters=0, log_samples=True, task_manager=manager, **kwargs)
        results.setdefault("results", {}).update(out["results"])
        results.setdefault("samples", {}).update(out["samples"])
    return results


@pytest.fixture(scope="session")
def hf_reference(lm_eval_hf_dir) -> dict:
    """lm-eval's `hf` backend (transformers, CPU, float32) on the tiny folder."""
    return evaluate("hf", f"pretrained={lm_eval_hf_dir},dtype=float32,max_length={MAX_LENGTH}",
                    device="cpu", batch_size=4)


def responses(results: dict, task: str) -> list:
    """Per-request responses of `task` in document order: (loglikelihood, is_greedy) pairs,
    rolling loglikelihoods or generated strings."""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [response[0] for sample in samples for response in sample["resps"]]


def assert_same_results(ours: dict, reference: dict) -> None:
    """Per-request loglikelihoods within TOLERANCE, greedy flags and generated text equal, and
    the task metrics equal (the accuracies exactly, the perplexities within TOLERANCE)."""
    for task in TASKS:
        mine, theirs = responses(ours, task), responses(reference, task)
        assert len(mine) == len(theirs) > 0, task
        for index, (a, b) in enumerate(zip(mine, theirs)):
            if isinstance(b, str):
                assert a == b, f"{task} request {index}: {a!r} != {b!r}"
            elif isinstance(b, (tuple, list)):
                assert a[0] == pytest.approx(b[0], **TOLERANCE), f"{task} request {index}"
                assert a[1] == b[1], f"{task} request {index}: is_greedy differs"
            else:
                assert a == pytest.approx(b, **TOLERANCE), f"{task} request {index}"
        for key, value in reference["results"][task].items():
            if isinstance(value, float) and ("perplexity" in key or key.startswith("bits_per_byte")):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6), (task, key)
            else:
                assert ours["results"][task][key] == value, (task, key)
