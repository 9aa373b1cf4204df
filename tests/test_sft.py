"""Supervised fine-tuning: batches score exactly the response tokens; runs of configs/runs/sft_tiny.gin
and lora_tiny.gin through the real gin entry point start from HF weights, train, resume exactly and
export merged weights that transformers loads; bad data and a mismatched INIT_FROM are clear
errors."""
import json
import shutil
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from data_fixtures import small_tokenizer  # noqa: F401 (fixture)
from experiments import export_lora
from experiments import train as train_cli
from finetune_fixtures import (TINY, VOCAB, compilation_cache_dir, save_hf_model,  # noqa: F401
                               tiny_hf_dir)
from hf_models import hf_logits
from llamax.train.checkpoint import Checkpointer
from llamax.convert.hub import load_any
from llamax.data import sft
from llamax.data.loader import LoaderConfig, make_loader
from llamax.data.shakespeare_sft import shakespeare_sft_records
from llamax.errors import ConfigError, DataError
from llamax.data.pipeline import DataConfig
from llamax.run_dir import RunDir, checkpoint_step
from llamax.train.fit import TrainConfig, fit, load_init_params
from llamax.model.lora import LoraConfig
from llamax.train.metrics import read_metrics
from llamax.model import Llama
from llamax.train.optim import OptimConfig
from llamax.sharding import get_mesh_preset, make_mesh
from llamax.train import make_eval_step

STEPS, CHECKPOINT_EVERY = 12, 6


def test_sft_batch_scores_exactly_the_response_tokens(small_tokenizer):  # noqa: F811
    records = shakespeare_sft_records("validation")[:6]
    documents = [{"messages": sft.parse_record(record)} for record in records]
    batch = next(make_loader(documents, small_tokenizer, LoaderConfig(
        seq_len=128, global_batch_size=8, shuffle=False, num_epochs=1, sft_template="plain")))
    segments = [(row, segment) for row in range(8)
                for segment in sorted(set(batch["segment_ids"][row]) - {0})]
    assert len(segments) == len(records)  # one whole record per segment, in order
    for (row, segment), record in zip(segments, records):
        where = batch["segment_ids"][row] == segment
        targets, scored = batch["targets"][row][where], batch["loss_mask"][row][where] > 0
        first = int(np.argmax(scored))
        # Scored: one contiguous run of targets = the response's tokens and the closing EOS.
        assert scored[first:-1].all() and not scored[:first].any() and not scored[-1]
        assert small_tokenizer.decode(targets[first:-2].tolist()) == record["response"]
        assert targets[-2] == small_tokenizer.eos_id
        prompt = small_tokenizer.decode(targets[:first].tolist())
        assert prompt.strip() == record["prompt"]

    # Targets the mask does not score (prompt tokens, padding) do not change the loss.
    params = jax.jit(lambda: Llama(TINY).init(jax.random.key(0), batch["tokens"][:1]))()["params"]
    eval_step = make_eval_step(TINY, make_mesh(get_mesh_preset("fsdp")))
    original = eval_step(params, batch)
    changed = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], 5))
    assert float(eval_step(params, changed)["loss_sum"]) == float(original["loss_sum"])
    assert float(original["scored_tokens"]) == batch["loss_mask"].sum()


def run_cli(gin_file: str, run_dir: Path, init_from: Path, tokenizer: str, steps: int) -> None:
    """One `python -m experiments.train` run, in process (gin state cleared around it)."""
    gin.clear_config()
    try:
        code = train_cli.main([
            f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{run_dir}'", f"--gin.INIT_FROM='{init_from}'",
            f"--gin.TOKENIZER='{tokenizer}'", f"--gin.VOCAB_SIZE={VOCAB}", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.CHECKPOINT_EVERY={CHECKPOINT_EVERY}", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0",
            "--gin.SEQ_LEN=64", "--gin.BATCH_SIZE=8", "--gin.WARMUP_STEPS=2",
            "--gin.LEARNING_RATE=3e-3", "--gin.fit.TrainConfig.eval_batches=1",
            "--gin.fit.TrainConfig.progress_bar=False"])
    finally:
        gin.clear_config()
    assert code == 0


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def sft_reference(tiny_hf_dir, small_tokenizer, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted full fine-tuning run of sft_tiny.gin from the tiny HF weights."""
    reference = tmp_path_factory.mktemp("sft") / "reference"
    run_cli("configs/runs/sft_tiny.gin", reference, tiny_hf_dir, str(small_tokenizer.path), STEPS)
    return reference


def test_sft_from_hf_weights_trains_and_resumes_exactly(sft_reference, tiny_hf_dir,  # noqa: F811
                                                        small_tokenizer, tmp_path):  # noqa: F811
    reference = sft_reference
    curve = losses(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert np.mean([curve[s] for s in range(STEPS - 2, STEPS + 1)]) < curve[1] - 0.5, curve
    assert json.loads((reference / "init_from.json").read_text())["path"] == str(tiny_hf_dir.resolve())
    assert RunDir(reference).lora_config() is None
    # A run stopped after step 6 resumes from that checkpoint and replays steps 7..12 exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    # Resuming continues from the run's own checkpoint and never reads INIT_FROM again.
    run_cli("configs/runs/sft_tiny.gin", resumed, tmp_path / "no_such_init", str(small_tokenizer.path), STEPS)
    assert losses(resumed) == curve
    assert Checkpointer(resumed / "checkpoints", read_only=True).all_steps() == [CHECKPOINT_EVERY, STEPS]
    assert json.loads((resumed / "init_from.json").read_text())["path"] == str(tiny_hf_dir.resolve())


def test_lora_run_trains_adapters_only_and_exports_to_transformers(sft_reference, tiny_hf_dir,  # noqa: F811
                                                                  small_tokenizer, tmp_path):  # noqa: F811
    run_dir = tmp_path / "lora"
    run_cli("configs/runs/lora_tiny.gin", run_dir, tiny_hf_dir, str(small_tokenizer.path), CHECKPOINT_EVERY)
    curve = losses(run_dir)
    # B starts at zero: the first step sees exactly the INIT_FROM model, as full fine-tuning does.
    assert curve[1] == pytest.approx(losses(sft_reference)[1], rel=1e-6)
    assert all(np.isfinite(list(curve.values())))
    lora = RunDir(run_dir).lora_config()
    assert lora == LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    state, _ = Checkpointer(run_dir / "checkpoints", read_only=True).restore()
    assert set(state["params"]["layers"]["self_attn"]) == set(lora.targets)  # adapters, no base

    out = tmp_path / "merged_hf"
    assert export_lora.main(["--run", str(run_dir), "--out", str(out), "--format", "hf"]) == 0
    assert checkpoint_step(run_dir) == CHECKPOINT_EVERY
    config, merged = load_any(run_dir)  # a LoRA run comes back merged into its recorded base
    _, base = load_any(tiny_hf_dir)
    attention, mlp = merged["layers"]["self_attn"], merged["layers"]["mlp"]
    assert not np.allclose(attention["q_proj"]["kernel"], base["layers"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(mlp["up_proj"]["kernel"], base["layers"]["mlp"]["up_proj"]["kernel"])
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
    hf_model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = np.asarray(Llama(config).apply({"params": merged}, tokens))
    np.testing.assert_allclose(hf_logits(hf_model, tokens), expected, atol=1e-4, rtol=0)


def test_sft_data_without_response_tokens_is_a_data_error(small_tokenizer, tmp_path):  # noqa: F811
    data = tmp_path / "empty_responses.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "response": " "}) + "\n"
                            for i in range(3)))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="all 3 records have empty responses"):
        fit(TINY, OptimConfig(), get_mesh_preset("fsdp"),
            DataConfig(tokenizer=str(small_tokenizer.path), train=str(data), validation=None,
                       sft_template="plain"),
            TrainConfig(model_dir=str(run_dir), train_steps=2, batch_size=8, seq_len=32,
                        progress_bar=False))
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_init_from_another_architecture_is_a_config_error(tmp_path):
    other = save_hf_model(tmp_path / "wider", hidden_size=128, intermediate_size=352)
    with pytest.raises(ConfigError, match=r"different model.*'hidden_size': \(128, 64\)"):
        load_init_params(str(other), TINY)
