"""DPO runs: the frozen reference (full fine-tuning) and the LoRA base never change and are never
donated; preference records in JSONL and chat form; bad preference records are one clear error
that writes nothing; configs/runs/dpo.gin through the real CLI, SIGKILLed mid-save and resumed,
ends bit for bit where an uninterrupted run ends."""
import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks.chaos import environment, finalized_steps, kill_at, last_logged_step, run_to_completion
from data_fixtures import chat_tokenizer, small_tokenizer  # noqa: F401 (fixtures)
from finetune_fixtures import TINY, compilation_cache_dir, tiny_hf_dir  # noqa: F401 (fixtures)
from llamax.convert.hf import load_hf
from llamax.data.loader import LoaderConfig, make_loader
from llamax.data.pipeline import DataConfig
from llamax.data.sources import open_documents
from llamax.errors import DataError
from llamax.model.lora import LoraConfig
from llamax.sharding import get_mesh_preset, make_mesh
from llamax.train.checkpoint import restore_params
from llamax.train.fit import TrainConfig, fit
from llamax.train.metrics import read_metrics
from llamax.train.objectives import DPO
from llamax.train.optim import OptimConfig
from llamax.train.setup import make_train_setup

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def preference_batch(tokenizer, count=16, seq_len=256):
    from llamax.data.shakespeare_sft import shakespeare_dpo_records

    loader = make_loader(shakespeare_dpo_records("validation")[:count], tokenizer, LoaderConfig(
        seq_len=seq_len, global_batch_size=8, shuffle=False, preference=True, sft_template="plain"))
    return next(loader)


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, targets=("q_proj", "v_proj"))])
def test_the_reference_never_changes_and_is_never_donated(tiny_hf_dir, small_tokenizer, lora):  # noqa: F811
    config, params = load_hf(tiny_hf_dir)
    setup = make_train_setup(config, OptimConfig(learning_rate=1e-2, warmup_steps=0), make_mesh(get_mesh_preset("fsdp")),
                             lora_config=lora, objective=DPO(beta=0.5))
    frozen = jax.device_put(params, setup.frozen_shardings, may_alias=False)
    state = setup.init(jax.random.key(0))
    if lora is None:
        state = state.replace(params=jax.device_put(params, setup.state_shardings.params, may_alias=False))
    batch = preference_batch(small_tokenizer)
    accuracies = []
    for _ in range(4):
        state, metrics = setup.train_step(state, batch, frozen)
        accuracies.append(float(metrics["rewards/accuracies"]))
    # The reference (LoRA: the base) is bitwise what it was, and still alive (never donated).
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, params)
    assert accuracies[0] == 0.0 and accuracies[-1] > 0.5  # policy = reference at first: ties
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                         state.params, params if lora is None else
                                         jax.device_get(setup.init(jax.random.key(0)).params)))
    assert max(moved) > 0


@pytest.mark.parametrize("line,match", [
    ({"prompt": "a", "chosen": "b"}, r"train.jsonl:2: .*no 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, r"train.jsonl:2: 'chosen' and 'rejected' are identical"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": "c"}, r"train.jsonl:2: 'chosen' must hold assistant messages"),
])
def test_a_bad_preference_record_is_one_clear_error_and_writes_nothing(small_tokenizer, tmp_path, line, match):  # noqa: F811
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=match):
        fit(TINY, OptimConfig(), get_mesh_preset("fsdp"),
            DataConfig(tokenizer=str(small_tokenizer.path), train=str(data), validation=None),
            TrainConfig(model_dir=str(tmp_path / "run"), train_steps=1, batch_size=8, seq_len=64),
            objective=DPO())
    assert not (tmp_path / "run").exists()


def test_chat_form_records_score_only_the_final_assistant_turn(chat_tokenizer, tmp_path):  # noqa: F811
    history = [{"role": "user", "content": "Who comes?"}, {"role": "assistant", "content": "A friend."},
               {"role": "user", "content": "Which friend?"}]
    records = [{"messages": history, "chosen": "Horatio, my lord.", "rejected": {"role": "assistant",
                                                                                 "content": "Nobody."}},
               {"chosen": history + [{"role": "assistant", "content": "Horatio."}],  # implicit prompt
                "rejected": history + [{"role": "assistant", "content": "I know not."}]}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    documents = open_documents(path, preference_format=True)
    batch = next(make_loader(documents, chat_tokenizer, LoaderConfig(
        seq_len=256, global_batch_size=2, shuffle=False, preference=True, sft_template="llama3")))
    completions = []
    for row in range(2):
        for segment in range(1, batch["segment_ids"][row].max() + 1):
            where = (batch["segment_ids"][row] == segment) & (batch["loss_mask"][row] > 0)
            completions.append(chat_tokenizer.decode(batch["targets"][row][where].tolist()))
    assert [c.split("<|eot_id|>")[0].strip() for c in completions] == [
        "Horatio, my lord.", "Nobody.", "Horatio.", "I know not."]
    with pytest.raises(DataError, match="need a chat template"):
        next(make_loader(documents, chat_tokenizer, LoaderConfig(seq_len=256, global_batch_size=2,
                                                                 preference=True)))


@pytest.mark.slow
def test_dpo_cli_run_killed_mid_save_resumes_bitwise(tiny_hf_dir, tmp_path):  # noqa: F811
    import random

    from llamax.data.corpus import shakespeare_tokenizer

    tokenizers = tmp_path / "tokenizers"
    shakespeare_tokenizer(TINY.vocab_size, str(tokenizers))
    steps = 9

    def command(run):
        return [sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/dpo_tiny.gin",
                f"--gin.MODEL_DIR='{run}'", f"--gin.INIT_FROM='{tiny_hf_dir}'", f"--gin.TRAIN_STEPS={steps}",
                "--gin.CHECKPOINT_EVERY=3", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0", "--gin.EVAL_DATA=None",
                "--gin.SEQ_LEN=128", f"--gin.VOCAB_SIZE={TINY.vocab_size}", "--gin.LEARNING_RATE=1e-3",
                "--gin.WARMUP_STEPS=2",
                "--gin.fit.TrainConfig.progress_bar=False",
                f"--gin.train.shakespeare_tokenizer.directory='{tokenizers}'"]

    env = environment(tmp_path / "jax_cache")
    run_to_completion(command(tmp_path / "reference"), env, tmp_path / "reference.log")
    chaos = tmp_path / "chaos"
    with open(tmp_path / "killed.log", "w") as out:
        process = subprocess.Popen(command(chaos), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        # Past the first checkpoint, so the resume restores a data position mid-stream; then
        # kill while the second checkpoint (step 6) is being written.
        while last_logged_step(chaos) < 4 and process.poll() is None:
            time.sleep(0.01)
        moment = kill_at(process, chaos, "save", random.Random(0), 3, steps)
    assert moment is not None, (tmp_path / "killed.log").read_text()[-2000:]
    assert finalized_steps(chaos) == [3], moment
    run_to_completion(command(chaos), env, tmp_path / "resumed.log")
    reference, resumed = (restore_params(run / "checkpoints", steps) for run in (tmp_path / "reference", chaos))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    def untimed(run):  # wall-clock figures (throughput, mfu, step/data/eval/checkpoint seconds) differ
        timed = ("per_s", "mfu", "step_s", "data_s", "eval_s", "checkpoint_s")
        return [{k: v for k, v in r.items() if not any(t in k for t in timed)} for r in read_metrics(run)]

    logged, expected = untimed(chaos), untimed(tmp_path / "reference")
    assert logged == expected and [r["step"] for r in logged] == list(range(1, steps + 1))
    assert "rewards/accuracies" in logged[-1]


def test_precomputed_reference_logps_give_the_reference_models_loss(tiny_hf_dir, small_tokenizer, tmp_path):  # noqa: F811
    from llamax.data.shakespeare_sft import preference_records
    from llamax.data.corpus import read_play, shakespeare_files
    from llamax.train.dpo_reference import precompute_reference_logps

    pairs = preference_records(read_play(shakespeare_files("validation")[0]))[:20]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config, params = load_hf(tiny_hf_dir)
    mesh = make_mesh(get_mesh_preset("fsdp"))
    out = precompute_reference_logps(config, params, tmp_path / "prefs.jsonl", tmp_path / "prefs_ref.jsonl",
                                     small_tokenizer, seq_len=256, sft_template="plain", mesh=mesh)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(pairs) and all("ref_chosen_logps" in r for r in written)
    batch = next(make_loader(open_documents(out, preference_format=True), small_tokenizer, LoaderConfig(
        seq_len=256, global_batch_size=8, shuffle=False, preference=True, sft_template="plain")))
    assert "ref_logps" in batch
    policy = jax.tree.map(lambda x: x * 1.01, params)  # a policy that is not the reference
    results = []
    for reference, frozen in (("model", params), ("precomputed", None)):
        setup = make_train_setup(config, OptimConfig(), mesh, objective=DPO(beta=0.2, reference=reference))
        assert (setup.frozen_shardings is None) == (reference == "precomputed")  # no reference held
        metrics, _ = setup.loss_and_grads(policy, batch, frozen)
        results.append({k: float(v) for k, v in metrics.items()})
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-5, atol=1e-5, err_msg=name)
