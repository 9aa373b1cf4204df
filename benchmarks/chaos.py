"""Chaos resume: SIGKILL a tiny training run at random moments, resume it each time, and check the
result is bit for bit the run that was never interrupted.

    python -m benchmarks.chaos [--trials 6] [--steps 40] [--checkpoint_every 3] [--seed 0]

Kill moments, drawn with `--seed`:
  * step:    once metrics.jsonl shows a randomly chosen step (mid-training, between saves);
  * save:    the moment a new `<step>.orbax-checkpoint-tmp*` directory appears, i.e. while an
             async checkpoint is being written;
  * startup: a random 0.5-3 s after launch (imports, compilation, restore).
After every kill: the checkpoint directory must list only finalized steps (`Checkpointer.all_steps`
equals the step directories orbax has committed), and the newest one must restore. The run is then
restarted and resumes from it. At the end the final checkpoint's params are compared bitwise with
those of an uninterrupted run, and every step's logged loss with the reference's.
tests/test_chaos.py runs this with a fixed seed; benchmarks/RESULTS.md records a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llamax.run_dir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
RUN_TIMEOUT_S = 300


@dataclasses.dataclass
class Trial:
    trial: int
    phase: str  # "step", "save" or "startup"
    moment: str  # when the kill landed, in words
    resumed_from: int | None  # the step the killed process had resumed from (None: fresh start)
    in_flight: list[str]  # tmp checkpoint dirs present right after the kill
    committed: list[int]  # Checkpointer.all_steps() after the kill
    last_committed: int | None


def train_command(run_dir: Path, tokenizers: Path, steps: int, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/tiny.gin",
            f"--gin.MODEL_DIR='{run_dir}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.CHECKPOINT_EVERY={checkpoint_every}", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0",
            "--gin.SEQ_LEN=64", "--gin.BATCH_SIZE=8", "--gin.WARMUP_STEPS=5",
            f"--gin.VOCAB_SIZE={VOCAB}", "--gin.fit.TrainConfig.eval_batches=1",
            "--gin.fit.TrainConfig.progress_bar=False",
            f"--gin.train.shakespeare_tokenizer.directory='{tokenizers}'"]


def environment(cache_dir: Path) -> dict:
    """8 fake CPU devices and a persistent compilation cache shared by every run."""
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):  # absent or mid-write
        return 0


def tmp_dirs(run_dir: Path) -> list[str]:
    checkpoints = RunDir(run_dir).checkpoints
    try:
        return sorted(name for name in os.listdir(checkpoints) if ".orbax-checkpoint-tmp" in name)
    except FileNotFoundError:
        return []


def finalized_steps(run_dir: Path) -> list[int]:
    """Step directories orbax committed (renamed from tmp, with their metadata written)."""
    import orbax.checkpoint as ocp

    checkpoints = RunDir(run_dir).checkpoints
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir()
                  if p.name.isdigit() and ocp.utils.is_checkpoint_finalized(p))


def check_after_kill(run_dir: Path) -> list[int]:
    """Only committed steps are listed, and the newest restores. Returns the listed steps."""
    from llamax.train.checkpoint import Checkpointer

    if not (RunDir(run_dir).checkpoints).is_dir():
        return []
    listed = Checkpointer(RunDir(run_dir).checkpoints, read_only=True).all_steps()
    finalized = finalized_steps(run_dir)
    assert listed == finalized, f"listed steps {listed} != finalized step dirs {finalized}"
    if listed:
        with Checkpointer(RunDir(run_dir).checkpoints, read_only=True) as checkpointer:
            _, extras = checkpointer.restore(listed[-1])
        assert extras["step"] == listed[-1], extras
    return listed


def run_to_completion(command: list[str], env: dict, log: Path) -> None:
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT_S).returncode
    if code != 0:
        raise RuntimeError(f"run failed with exit {code}:\n{log.read_text()[-3000:]}")


def kill_at(process: subprocess.Popen, run_dir: Path, phase: str, rng: random.Random,
            resumed_from: int, steps: int) -> str | None:
    """Waits for the chosen moment, SIGKILLs, returns the moment in words (None: it finished)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    if phase == "startup":
        delay = rng.uniform(0.5, 3.0)
        condition, moment = (lambda: time.monotonic() >= start + delay), f"{delay:.1f}s after launch"
    elif phase == "step":
        # Above the killed run's last logged step too: until the restart truncates metrics.jsonl
        # back to `resumed_from`, the file still ends with that run's steps.
        low = max(resumed_from, last_logged_step(run_dir)) + 1
        target = rng.randint(low, max(low, min(steps - 1, low + 4)))
        condition, moment = (lambda: last_logged_step(run_dir) >= target), f"after step {target}"
    else:
        before = set(tmp_dirs(run_dir))
        condition, moment = (lambda: bool(set(tmp_dirs(run_dir)) - before)), "save in flight"
    start = time.monotonic()
    while not condition():
        if process.poll() is not None:
            return None
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"no {phase} kill moment within {RUN_TIMEOUT_S}s")
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    if phase == "save":
        moment = f"saving step(s) {sorted(set(tmp_dirs(run_dir)) - before) or '?'} (log at step {last_logged_step(run_dir)})"
    return moment


def run_chaos(work: Path, *, trials: int = 6, steps: int = 40, checkpoint_every: int = 3,
              seed: int = 0, phases: list[str] | None = None) -> dict:
    """Runs the reference and the chaos run under `work`; returns trials, timings and verdicts."""
    from llamax.data.corpus import shakespeare_tokenizer
    from llamax.train.checkpoint import restore_params
    from llamax.train.metrics import read_metrics

    rng = random.Random(seed)
    tokenizers = work / "tokenizers"
    shakespeare_tokenizer(VOCAB, str(tokenizers))
    env = environment(work / "jax_cache")
    reference, chaos = work / "reference", work / "chaos"
    started = time.perf_counter()
    run_to_completion(train_command(reference, tokenizers, steps, checkpoint_every), env, work / "reference.log")
    reference_s = time.perf_counter() - started
    if phases is None:  # at least two kills during a save; the rest drawn at random
        phases = ["save", "step", "save"] + [rng.choice(["step", "save", "startup"]) for _ in range(trials - 3)]
        rng.shuffle(phases)
    results: list[Trial] = []
    command = train_command(chaos, tokenizers, steps, checkpoint_every)
    started = time.perf_counter()
    for index, phase in enumerate(phases, start=1):
        committed = finalized_steps(chaos)
        resumed_from = committed[-1] if committed else 0
        with open(work / f"chaos_{index}.log", "w") as out:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            moment = kill_at(process, chaos, phase, rng, resumed_from, steps)
        if moment is None:
            raise RuntimeError(f"trial {index}: the run finished (exit {process.returncode}) before its "
                               f"{phase} kill; use more --steps. Log:\n{(work / f'chaos_{index}.log').read_text()[-2000:]}")
        listed = check_after_kill(chaos)
        results.append(Trial(index, phase, moment, resumed_from if committed else None,
                             tmp_dirs(chaos), listed, listed[-1] if listed else None))
    run_to_completion(command, env, work / "chaos_final.log")
    chaos_s = time.perf_counter() - started
    final_reference = restore_params(RunDir(reference).checkpoints, steps)
    final_chaos = restore_params(RunDir(chaos).checkpoints, steps)
    import jax

    params_equal = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                       for a, b in zip(jax.tree.leaves(final_reference), jax.tree.leaves(final_chaos)))
    loss = {r["step"]: r["loss"] for r in read_metrics(reference)}
    resumed_loss = {r["step"]: r["loss"] for r in read_metrics(chaos)}
    return {"trials": results, "params_bitwise_equal": params_equal, "losses_equal": loss == resumed_loss,
            "steps_logged": sorted(resumed_loss), "reference_s": reference_s, "chaos_s": chaos_s}


def markdown(result: dict) -> str:
    rows = ["| trial | kill phase | kill moment | resumed from | tmp dirs left by the kill | "
            "steps listed after kill | last committed step |", "|---|---|---|---|---|---|---|"]
    for t in result["trials"]:
        rows.append(f"| {t.trial} | {'during save' if t.phase == 'save' else t.phase} | {t.moment} | "
                    f"{'fresh start' if t.resumed_from is None else t.resumed_from} | "
                    f"{', '.join(t.in_flight) or '-'} | {t.committed} | {t.last_committed} |")
    rows.append("")
    rows.append(f"Final params bitwise equal to the uninterrupted run: **{result['params_bitwise_equal']}**; "
                f"every step's loss equal: **{result['losses_equal']}**; reference run "
                f"{result['reference_s']:.0f}s, chaos run (all trials + final resume) {result['chaos_s']:.0f}s.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="keep run dirs and logs here (default: a temp dir)")
    args = parser.parse_args()
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices, once per check
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = run_chaos(work, trials=args.trials, steps=args.steps,
                           checkpoint_every=args.checkpoint_every, seed=args.seed)
    print(markdown(result))
    if not (result["params_bitwise_equal"] and result["losses_equal"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
