"""Two real `jax.distributed` processes on 127.0.0.1, 4 CPU devices each, one 8-device mesh.

(a) tests/scripts/multihost_train_steps.py: each process feeds its half of a fixed global batch
    through `to_global_batch`; the losses and the collectively saved checkpoint must equal those
    of the same script run as one process with 8 devices.
(b) `python -m experiments.train ... --coordinator_address --num_processes --process_id`: two
    processes train, checkpoint and log once; restarted, they resume and finish.
(c) A pod that loses a host (llamax.distributed): process 1 killed with SIGKILL after its first
    checkpoint, process 1 failing its checks, process 1 never starting. Process 0 must exit
    non-zero within the bound, with one line naming process 1 (no traceback, no JAX abort), and
    leave a run that resumes to exactly the losses and params of an uninterrupted run.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from llamax.peer_watch import EXIT_PEER_LOST
from llamax.run_dir import RunDir
from llamax.train.checkpoint import Checkpointer
from llamax.train.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "scripts" / "multihost_train_steps.py"
KILL9_SCRIPT = REPO_ROOT / "tests" / "scripts" / "train_then_kill9.py"
TIMEOUT_S = 240  # per group of processes: a hang (e.g. a missing peer) fails instead of blocking

pytestmark = pytest.mark.slow


def environment(devices: int, cache_dir: Path) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def launch(commands: list[tuple[list[str], dict]], log_dir: Path, name: str) -> list[subprocess.Popen]:
    """Starts the commands concurrently, stdout/stderr to log_dir/<name><index>.out/.err."""
    processes = []
    for index, (command, env) in enumerate(commands):
        with open(log_dir / f"{name}{index}.out", "w") as out, open(log_dir / f"{name}{index}.err", "w") as err:
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err))
    return processes


def exits(processes: list[subprocess.Popen], timeout: float, name: str) -> list[tuple[int, float]]:
    """(exit status, monotonic time it was seen) of each process; fails after killing them all if
    any is still running after `timeout` seconds."""
    deadline, seen = time.monotonic() + timeout, {}
    try:
        while len(seen) < len(processes):
            for index, process in enumerate(processes):
                if index not in seen and process.poll() is not None:
                    seen[index] = (process.returncode, time.monotonic())
            if time.monotonic() > deadline:
                pytest.fail(f"{name}{sorted(set(range(len(processes))) - set(seen))} still running "
                            f"after {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    return [seen[index] for index in range(len(processes))]


def run_together(commands: list[tuple[list[str], dict]], log_dir: Path, name: str) -> list[str]:
    """Runs the commands concurrently; returns their stdouts. Fails (after killing all of them)
    on a timeout or a non-zero exit."""
    for index, (code, _) in enumerate(exits(launch(commands, log_dir, name), TIMEOUT_S, name)):
        stderr = (log_dir / f"{name}{index}.err").read_text()
        assert code == 0, f"{name}{index} exited {code}; stderr:\n{stderr[-3000:]}"
    return [(log_dir / f"{name}{index}.out").read_text() for index in range(len(commands))]


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
    # Adam divides by the root of the squared gradients, so a near-zero gradient turns rounding
    # into up to ~lr-sized differences (2.1e-5 seen once in 22528 embedding entries after 3
    # steps); a missing or misplaced shard would be off by ~1e-2 in whole rows.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
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


# ---- (c) a pod that loses a host ---------------------------------------------------------------

PEER_TIMEOUT_S = 10  # --peer_timeout_s of these runs
# How late after its peer's death process 0 may exit: the timeout, the watch's polling (about
# 2 s) and room for a loaded CI machine. JAX left alone takes 50-100 s, then aborts.
EXIT_BOUND_S = PEER_TIMEOUT_S + 15


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")  # trained by the first run, then reused


def train_command(run_dir: Path, tokenizers: Path, script: list[str] | None = None) -> list[str]:
    """The tiny two-process run: 6 steps, a checkpoint every 2."""
    return [sys.executable, *(script or ["-m", "experiments.train"]), "--gin_file=configs/runs/tiny.gin",
            f"--gin.MODEL_DIR='{run_dir}'", "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_EVERY=2",
            "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0", "--gin.SEQ_LEN=64", "--gin.WARMUP_STEPS=1",
            "--gin.VOCAB_SIZE=512", "--gin.EVAL_DATA=None", "--gin.fit.TrainConfig.progress_bar=False",
            "--gin.fit.TrainConfig.async_checkpointing=False",  # a killed process had committed
            f"--gin.train.shakespeare_tokenizer.directory='{tokenizers}'",
            f"--peer_timeout_s={PEER_TIMEOUT_S}"]


def assert_one_error_line(stderr: str, *expected: str) -> str:
    """The stderr holds exactly one error line, containing every `expected` text, and nothing of
    a traceback or of JAX's abort."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, f"expected one error line, got:\n{stderr[-4000:]}"
    for text in expected:
        assert text in errors[0], errors[0]
    for noise in ("Traceback", "Check failure", "Terminating process", "In call to configurable"):
        assert noise not in stderr, f"{noise!r} in stderr:\n{stderr[-4000:]}"
    return errors[0]


def final_state(run_dir: Path) -> tuple[list[float], list]:
    """(logged losses, leaves of the step-6 training state) of a run."""
    state, _ = Checkpointer(run_dir / "checkpoints", read_only=True).restore(6)
    return [record["loss"] for record in read_metrics(run_dir)], jax.tree.leaves(state)


def test_killed_process_stops_the_other_in_bounded_time_and_rerun_resumes_bitwise(tmp_path, tokenizers):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"

    def together(name: str, run: Path, script: list[str] | None = None) -> list[tuple[int, float]]:
        port = portpicker.pick_unused_port()
        # A compilation cache per launch: JAX writes entries from process 0 only and process 1
        # got no hits here (CPU), so with a warm cache process 0 reaches the first step while
        # process 1 still compiles, and on a loaded machine gloo gives up on it after 30 s.
        env = environment(4, tmp_path / f"cache-{name}")
        commands = [(train_command(run, tokenizers, script) + distributed_flags(port, i), env)
                    for i in range(2)]
        return exits(launch(commands, tmp_path, name), TIMEOUT_S, name)

    assert [code for code, _ in together("reference", reference)] == [0, 0]

    (code0, exited0), (code1, exited1) = together("killed", run_dir, [str(KILL9_SCRIPT)])
    stderr0, stderr1 = ((tmp_path / f"killed{i}.err").read_text() for i in range(2))
    assert code1 == -9, f"process 1 exited {code1}:\n{stderr1[-3000:]}\nprocess 0:\n{stderr0[-3000:]}"
    assert code0 == EXIT_PEER_LOST, f"process 0 exited {code0}:\n{stderr0[-4000:]}"
    assert exited0 - exited1 < EXIT_BOUND_S, f"process 0 took {exited0 - exited1:.0f}s to stop"
    print(f"process 0 stopped {exited0 - exited1:.1f}s after process 1 was killed")
    assert_one_error_line(stderr0, "lost process 1 of 2", "rerun")
    assert RunDir(run_dir).checkpoint_steps() == [2]
    assert RunDir(run_dir).outcome() is None  # nothing claims the run ended

    assert [code for code, _ in together("resumed", run_dir)] == [0, 0]
    assert "completed at step 6" in (tmp_path / "resumed0.out").read_text()
    losses, leaves = final_state(run_dir)
    reference_losses, reference_leaves = final_state(reference)
    assert len(losses) == 6 and losses == reference_losses  # bitwise: JSON floats round-trip
    assert len(leaves) == len(reference_leaves)
    for leaf, reference_leaf in zip(leaves, reference_leaves):
        np.testing.assert_array_equal(leaf, reference_leaf, strict=True)


@pytest.mark.parametrize("failure", ["tokenizer missing on host 1", "config error on process 1"])
def test_process_failing_its_checks_stops_the_other_and_commits_nothing(tmp_path, tokenizers, failure):
    run_dir, port = tmp_path / "run", portpicker.pick_unused_port()
    env = environment(4, tmp_path / "cache")
    missing = tmp_path / "only-on-host-0" / "tokenizer.model"  # a path process 1's host lacks
    # Only process 1 gets the bad argument: a DataError in fit's checks, or a gin error (exit
    # status 2) before fit starts, while process 0 goes on into fit.
    bad, expected, code = {
        "tokenizer missing on host 1": (f"--gin.TOKENIZER='{missing}'", ["DataError", str(missing)], 1),
        "config error on process 1": ("--gin.TRAIN_STEP=5", ["did you mean TRAIN_STEPS"], 2)}[failure]
    commands = [(train_command(run_dir, tokenizers) + distributed_flags(port, i) + ([bad] if i else []),
                 env) for i in range(2)]
    (code0, exited0), (code1, exited1) = exits(launch(commands, tmp_path, "check"), TIMEOUT_S, "check")
    stderr0, stderr1 = ((tmp_path / f"check{i}.err").read_text() for i in range(2))
    assert code1 == code, stderr1[-4000:]
    own = assert_one_error_line(stderr1, *expected)
    assert code0 == code, f"process 0 exited {code0}:\n{stderr0[-4000:]}"
    assert abs(exited0 - exited1) < EXIT_BOUND_S
    print(f"process 0 stopped {exited0 - exited1:.1f}s after process 1")
    line = assert_one_error_line(stderr0, "process 1 of 2", *expected)
    assert line.endswith(own.removeprefix("error: "))  # process 1's own words
    assert not run_dir.exists()  # process 0 passed its checks, but committed nothing


def test_process_that_never_connects_stops_the_other_after_init_timeout(tmp_path):
    port = portpicker.pick_unused_port()
    command = [sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/tiny.gin",
               f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--init_timeout_s=3",
               *distributed_flags(port, 0)]  # process 1 is never started
    started = time.monotonic()
    [(code, exited)] = exits(launch([(command, environment(4, tmp_path / "cache"))], tmp_path, "alone"),
                             60, "alone")
    stderr = (tmp_path / "alone0.err").read_text()
    assert code == EXIT_PEER_LOST, stderr[-4000:]
    assert exited - started < 45
    assert_one_error_line(stderr, "not all processes connected", "within 3 s", "--init_timeout_s")
    assert not (tmp_path / "run").exists()
