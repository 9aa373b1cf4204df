"""`python -m experiments.train` as a user runs it: kill -9 and SIGTERM resume, gin errors.

Every run is a real subprocess on 8 fake CPU devices with configs/runs/tiny.gin (seq 64, batch 8,
vocab 512). The run directory and tokenizer live in tmp; the working directory is the repo root
so gin finds the run file's includes. A persistent compilation cache shared by the module's runs
keeps each run to a few seconds after the first.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamax.train.checkpoint import Checkpointer
from llamax.train.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
RUN_TIMEOUT_S = 240  # a hang fails the test instead of blocking CI
# Metrics that depend only on the computation (not on timing): must match bit for bit.
DETERMINISTIC_KEYS = ("loss", "grad_norm", "z_loss", "learning_rate", "scored_tokens", "eval_loss")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """The module's tokenizer (trained once, before any run, so concurrent runs never race to
    train it) and the subprocess environment."""
    from llamax.data.corpus import shakespeare_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tokenizers = root / "tokenizers"
    shakespeare_tokenizer(VOCAB, str(tokenizers))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return {"tokenizers": tokenizers, "env": env}


def train_command(shared: dict, run_dir: Path, steps: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/tiny.gin",
            f"--gin.MODEL_DIR='{run_dir}'", f"--gin.TRAIN_STEPS={steps}",
            "--gin.CHECKPOINT_EVERY=10", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0",
            "--gin.SEQ_LEN=64", "--gin.BATCH_SIZE=8", "--gin.WARMUP_STEPS=5",
            f"--gin.VOCAB_SIZE={VOCAB}", "--gin.fit.TrainConfig.eval_batches=2",
            "--gin.fit.TrainConfig.progress_bar=False",
            f"--gin.train.shakespeare_tokenizer.directory='{shared['tokenizers']}'", *overrides]


class Run:
    """A training subprocess whose output goes to files (a full pipe would stall it)."""

    def __init__(self, command: list[str], env: dict, log_dir: Path, name: str):
        self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not finish in {timeout}s; stderr:\n{self.stderr[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def assert_ok(self, expected: str) -> None:
        code = self.wait()
        assert code == 0, f"exit {code}; stderr:\n{self.stderr[-3000:]}"
        assert expected in self.stdout, self.stdout


def wait_until(condition, run: Run, timeout: float = RUN_TIMEOUT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if run.process.poll() is not None:
            pytest.fail(f"run exited ({run.process.returncode}) before {what}; stderr:\n"
                        f"{run.stderr[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or a line mid-write
        return 0


def committed_steps(run_dir: Path) -> list[int]:
    """Checkpoint dirs orbax has renamed to their final `<step>` name (a save commits by rename;
    in-flight ones are `<step>.orbax-checkpoint-tmp*`)."""
    checkpoints = run_dir / "checkpoints"
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) \
        if checkpoints.is_dir() else []


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: {k: r[k] for k in DETERMINISTIC_KEYS if k in r} for r in records}


@pytest.mark.slow
def test_kill_9_and_restart_reproduces_the_uninterrupted_run_exactly(shared, tmp_path):
    steps = 40
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    runs = []
    try:
        uninterrupted = Run(train_command(shared, run_a, steps), shared["env"], tmp_path, "a")
        runs.append(uninterrupted)
        killed = Run(train_command(shared, run_b, steps), shared["env"], tmp_path, "b_killed")
        runs.append(killed)
        # SIGKILL once a checkpoint has committed and training has gone past it, so the restart
        # must drop the logged-but-not-checkpointed steps and replay them.
        def past_a_checkpoint() -> bool:
            committed = committed_steps(run_b)
            return bool(committed) and last_logged_step(run_b) > committed[0]

        wait_until(past_a_checkpoint, killed, what="a committed checkpoint and later steps")
        killed.process.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        killed_at = last_logged_step(run_b)
        assert killed_at < steps and steps not in committed_steps(run_b), \
            "run B finished before it could be killed; the test proved nothing"
        restarted = Run(train_command(shared, run_b, steps), shared["env"], tmp_path, "b_restarted")
        runs.append(restarted)
        restarted.assert_ok(f"completed at step {steps}")
        uninterrupted.assert_ok(f"completed at step {steps}")
    finally:
        for run in runs:
            run.kill()
    expected, resumed = metrics_by_step(run_a), metrics_by_step(run_b)
    assert sorted(expected) == list(range(1, steps + 1))
    assert resumed == expected  # every step once, every loss bit for bit
    assert "eval_loss" in expected[steps]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_completes(shared, tmp_path):
    steps, run_dir = 100, tmp_path / "run"
    command = train_command(shared, run_dir, steps, "--gin.CHECKPOINT_EVERY=1000")
    run = Run(command, shared["env"], tmp_path, "terminated")
    try:
        wait_until(lambda: last_logged_step(run_dir) >= 3, run, what="training to start")
        run.process.send_signal(signal.SIGTERM)
        code = run.wait()
    finally:
        run.kill()
    assert code == 0, run.stderr[-3000:]
    stopped_at = int(run.stdout.split("preempted at step ")[1].split(":")[0])
    assert 3 <= stopped_at < steps
    # The step it stopped at is the one checkpointed (checkpoint_every=1000 saves nothing else).
    assert committed_steps(run_dir) == [stopped_at]
    state, extras = Checkpointer(run_dir / "checkpoints", read_only=True).restore(stopped_at)
    assert int(state["step"]) == extras["step"] == stopped_at
    assert last_logged_step(run_dir) == stopped_at
    rerun = Run(command, shared["env"], tmp_path, "rerun")
    try:
        rerun.assert_ok(f"completed at step {steps}")
    finally:
        rerun.kill()
    assert sorted(metrics_by_step(run_dir)) == list(range(1, steps + 1))


def run_expecting_error(shared: dict, tmp_path: Path, name: str, args: list[str]) -> Run:
    return Run([sys.executable, "-m", "experiments.train", *args], shared["env"], tmp_path, name)


def test_gin_errors_exit_2_with_a_clear_message(shared, tmp_path):
    run_dir = tmp_path / "run"
    # A run file without the required MODEL_DIR macro.
    no_model_dir = tmp_path / "no_model_dir.gin"
    no_model_dir.write_text("".join(line for line in (REPO_ROOT / "configs/runs/tiny.gin")
                                    .read_text().splitlines(keepends=True)
                                    if not line.startswith("MODEL_DIR")))
    cases = {
        "missing_macro": ([f"--gin_file={no_model_dir}"],
                          "missing required gin macro MODEL_DIR"),
        "unknown_parameter": (["--gin_file=configs/runs/tiny.gin", f"--gin.MODEL_DIR='{run_dir}'",
                               "--gin.fit.TrainConfig.trian_steps=3"],
                              "did you mean 'train_steps'"),
        "unknown_configurable": (["--gin_file=configs/runs/tiny.gin",
                                  f"--gin.MODEL_DIR='{run_dir}'",
                                  "--gin.fit.TrainConfg.train_steps=3"],
                                 "did you mean 'fit.TrainConfig'"),
    }
    # All three at once: each is mostly interpreter and jax import time.
    runs = {name: run_expecting_error(shared, tmp_path, name, args)
            for name, (args, _) in cases.items()}
    try:
        for name, (_, message) in cases.items():
            code = runs[name].wait(timeout=120)
            stderr = runs[name].stderr
            assert code == 2, f"{name}: exit {code}; stderr:\n{stderr[-3000:]}"
            assert message in stderr, f"{name}: {stderr[-3000:]}"
            assert "Traceback" not in stderr, f"{name}: {stderr[-3000:]}"
    finally:
        for run in runs.values():
            run.kill()
    assert not run_dir.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("binding, code, messages", [
    # A typo'd macro would silently train with the default number of steps.
    ("TRAIN_STEP=5", 2, ["--gin.TRAIN_STEP: macro TRAIN_STEP is neither defined nor used",
                         "did you mean TRAIN_STEPS?"]),
    ("MODEL_DIR=/data/x", 2, ["--gin.MODEL_DIR=/data/x: not a gin value",
                              "a string needs quotes inside the shell's: --gin.MODEL_DIR=\"'/data/x'\""]),
    ("MODEL_DIR=runs_x", 2, ["--gin.MODEL_DIR=runs_x: not a gin value", "--gin.MODEL_DIR=\"'runs_x'\""]),
    ("LEARNING_RATE='abc'", 2, ["--gin.LEARNING_RATE='abc': optim.OptimConfig.learning_rate must be a "
                                "float, got 'abc' (str)"]),
    ("train.run.model_config={'a': 1}", 2, ["train.run.model_config must be a ModelConfig, got {'a': 1}"]),
    ("LEARNING_RATE=-1", 1, ["--gin.LEARNING_RATE=-1: OptimConfig.learning_rate must be >= 0"]),
    # Both used to escape as raw TypeError / RecursionError from inside gin.
    ("fit.TrainConfig.log_every=%LOG_EVRY", 2, ["--gin.fit.TrainConfig.log_every=%LOG_EVRY: macro LOG_EVRY "
                                                "is not defined"]),
    ("config.ModelConfig.rope_scaling=@config.ModelConfig()", 2,
     ["calls a configurable inside its own arguments", "--gin.config.ModelConfig.rope_scaling=@config.ModelConfig()"]),
])
def test_binding_mistakes_name_the_binding_in_one_line(binding, code, messages, tmp_path, capsys):
    from experiments import train as train_cli

    run_dir = tmp_path / "run"
    assert train_cli.main(["--gin_file=configs/runs/tiny.gin", f"--gin.MODEL_DIR='{run_dir}'",
                           f"--gin.{binding}"]) == code
    stderr = capsys.readouterr().err
    for message in messages:
        assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr  # no "In call to configurable" line
    assert not run_dir.exists()  # refused before anything was written


def test_no_false_alarms_when_started_outside_the_repository(shared, tmp_path):
    """gin resolves `include 'configs/...'` through the installed configs package: started from
    another directory, a run prints no 'Path not found' errors on the way."""
    result = subprocess.run([sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/tiny.gin",
                             "--gin.TRAIN_STEP=1"], cwd=tmp_path, env=shared["env"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "did you mean TRAIN_STEPS" in result.stderr
    assert "Path not found" not in result.stderr, result.stderr


def test_a_rerun_compiles_nothing_again(shared, tmp_path):
    """The persistent compilation cache is on by default (LLAMAX_COMPILATION_CACHE moves it):
    a second identical run finds every program in it and adds none."""
    cache = tmp_path / "compiled"
    env = {k: v for k, v in shared["env"].items() if not k.startswith("JAX_PERSISTENT")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env["LLAMAX_COMPILATION_CACHE"] = str(cache)

    def entries() -> set[str]:
        return {p.name for p in cache.iterdir()} if cache.exists() else set()

    for attempt in ("first", "second"):
        before = entries()
        run = Run(train_command(shared, tmp_path / attempt, 6), env, tmp_path, attempt)
        assert run.wait() == 0, run.stderr[-3000:]
        if attempt == "first":
            assert entries(), "the first run cached nothing"
        else:
            assert entries() == before, f"the rerun compiled again: {sorted(entries() - before)}"


def test_a_bug_inside_the_run_keeps_its_traceback(tmp_path, monkeypatch):
    """Only gin-made mistakes become one line: a TypeError raised by llamax's own code (a bug)
    must reach the user whole, though gin notes the configurable it passed through."""
    from experiments import train as train_cli

    def broken_fit(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(train_cli, "fit", broken_fit)
    with pytest.raises(TypeError, match="unsupported operand"):
        train_cli.main(["--gin_file=configs/runs/tiny.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'"])
