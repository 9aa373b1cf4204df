"""Two real `jax.distributed` processes on 127.0.0.1, 4 CPU devices each, one 8-device mesh.

(a) tests/scripts/multihost_train_steps.py: each process feeds its half of a fixed global batch
    through `to_global_batch`; the losses and the collectively saved checkpoint must equal those
    of the same script run as one process with 8 devices.
(b) `python -m experiments.train ... --coordinator_address --num_processes --process_id`: two
    processes train, checkpoint and log once; restarted, they resume and finish.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from llamax.train.checkpoint import Checkpointer
from llamax.train.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "scripts" / "multihost_train_steps.py"
TIMEOUT_S = 240  # per group of processes: a hang (e.g. a missing peer) fails instead of blocking

pytestmark = pytest.mark.slow


def environment(devices: int, cache_dir: Path) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_together(commands: list[tuple[list[str], dict]], log_dir: Path, name: str) -> list[str]:
    """Runs the commands concurrently; returns their stdouts. Fails (after killing all of them)
    on a timeout or a non-zero exit."""
    processes, outputs = [], []
    try:
        for index, (command, env) in enumerate(commands):
            out = open(log_dir / f"{name}{index}.out", "w")
            err = open(log_dir / f"{name}{index}.err", "w")
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                                              stderr=err))
            out.close(), err.close()
        for index, process in enumerate(processes):
            try:
                code = process.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}{index} did not finish in {TIMEOUT_S}s")
            stderr = (log_dir / f"{name}{index}.err").read_text()
            assert code == 0, f"{name}{index} exited {code}; stderr:\n{stderr[-3000:]}"
            outputs.append((log_dir / f"{name}{index}.out").read_text())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    return outputs


def json_lines(output: str) -> list[dict]:
    """The JSON lines of a stdout (gloo prints its connection notes there too)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def distributed_flags(port: int, process_id: int) -> list[str]:
    return [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={process_id}"]


def test_two_processes_match_one_process_with_8_devices(tmp_path):
    port = portpicker.pick_unused_port()
    single, multi = tmp_path / "single", tmp_path / "multi"
    commands = [([sys.executable, str(SCRIPT), str(single)], environment(8, tmp_path / "cache8"))]
    commands += [([sys.executable, str(SCRIPT), str(multi), *distributed_flags(port, i)],
                  environment(4, tmp_path / "cache4")) for i in range(2)]
    outputs = run_together(commands, tmp_path, "script")
    one, two, other = (json_lines(output) for output in outputs)
    assert len(one) == len(two) == 1 and not other  # only process 0 reports
    one, two = one[0], two[0]
    assert (one["process_count"], two["process_count"]) == (1, 2)
    assert one["device_count"] == two["device_count"] == 8
    # Same global computation; only the cross-process (gloo) reductions may round differently.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    print("losses bitwise equal:", two["losses"] == one["losses"], one["losses"], two["losses"])

    # Both processes wrote their own parameter shards into one checkpoint, which holds the same
    # state as the single-process one.
    assert (multi / "checkpoints" / "3" / "state" / "ocdbt.process_1").is_dir()
    single_state, single_extras = Checkpointer(single / "checkpoints", read_only=True).restore(3)
    multi_state, multi_extras = Checkpointer(multi / "checkpoints", read_only=True).restore(3)
    assert multi_extras == {"losses": two["losses"]}
    assert int(multi_state["step"]) == int(single_state["step"]) == 3
    # Adam divides by the root of the squared gradients, so near-zero gradients turn rounding
    # into ~1e-6 absolute differences; a missing or misplaced shard would be off by ~1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 multi_state["params"], single_state["params"])


def test_cli_two_process_run_checkpoints_logs_once_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = environment(4, tmp_path / "cache")

    def train(steps: int, name: str) -> list[str]:
        port = portpicker.pick_unused_port()
        # No pre-trained tokenizer: both processes train it into the same folder at once.
        command = [sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/tiny.gin",
                   f"--gin.MODEL_DIR='{run_dir}'", f"--gin.TRAIN_STEPS={steps}",
                   "--gin.CHECKPOINT_EVERY=2", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0",
                   "--gin.SEQ_LEN=64", "--gin.WARMUP_STEPS=1", "--gin.VOCAB_SIZE=512",
                   "--gin.EVAL_DATA=None", "--gin.fit.TrainConfig.progress_bar=False",
                   f"--gin.train.shakespeare_tokenizer.directory='{tmp_path / 'tokenizers'}'"]
        return run_together([(command + distributed_flags(port, i), env) for i in range(2)],
                            tmp_path, name)

    outputs = train(4, "first")
    assert "completed at step 4" in outputs[0] and "completed" not in outputs[1]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["2", "4"]  # one set of step dirs for both processes, all committed
    assert (run_dir / "checkpoints" / "4" / "state" / "ocdbt.process_1").is_dir()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]  # process 0 logs, once
    # Each process reads its own documents, so each one's data position is saved.
    _, extras = Checkpointer(run_dir / "checkpoints", read_only=True).restore(4)
    assert [s["config"]["process_index"] for s in extras["data"]] == [0, 1]

    outputs = train(6, "resumed")
    assert "completed at step 6" in outputs[0]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4", "6"]
