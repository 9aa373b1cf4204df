"""End-to-end tests of llamax.train.fit on 8 fake CPU devices: learning, non-finite losses, resume onto
another mesh, corrupt-checkpoint fallback, and the errors a bad run directory or bad data give.

One uninterrupted reference run (fsdp=8, 30 steps, a checkpoint every 10) is shared by the module;
the resume tests copy its run directory and cut it back to an earlier checkpoint, which is exactly
the state a run that stopped there leaves behind (plus later metrics.jsonl lines, which a resume
must drop).
"""
import logging
import math
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from llamax.config import get_preset
from llamax.data.corpus import read_play, shakespeare_files
from llamax.data.pipeline import DataConfig, eval_loader
from llamax.errors import ConfigError, DataError
from llamax.run_dir import RunDir, read_model_config
from llamax.sharding import MeshConfig, get_mesh_preset
from llamax.tokenizer import load_tokenizer, train_tokenizer
from llamax.train.checkpoint import Checkpointer
from llamax.train.fit import NonFiniteLossError, TrainConfig, fit
from llamax.train.metrics import read_metrics
from llamax.train.optim import OptimConfig

# Reading a corrupt step makes tensorstore abandon coroutines that orbax's event loop later
# reports as "Exception ignored ... Event loop is closed"; the error itself is handled and asserted.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

VOCAB = 512
MODEL = get_preset("tiny", vocab_size=VOCAB)  # 4 heads, 2 kv heads: divisible by tensor=2
OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=5, total_steps=30)
FSDP8 = get_mesh_preset("fsdp")  # fsdp=8 over the 8 CPU devices
DATA_FSDP_TENSOR = MeshConfig(data=2, fsdp=2, tensor=2)
STEPS, CHECKPOINT_EVERY = 30, 10


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """Every `fit` call jits a fresh train step; a persistent cache compiles each distinct program
    once per module instead of once per call (this is most of the module's run time)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    compilation_cache.reset_cache()
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A 512-piece BPE tokenizer trained on three plays (well under a second)."""
    out = tmp_path_factory.mktemp("tokenizer")
    text = out / "plays.txt"
    text.write_text("".join(read_play(p) for p in shakespeare_files("train")[:3]), encoding="utf-8")
    return str(train_tokenizer([text], out / "tokenizer.model", vocab_size=VOCAB).path)


def data_config(tokenizer_path: str, **overrides) -> DataConfig:
    return DataConfig(tokenizer=tokenizer_path, **overrides)


def train_config(run_dir: Path, **overrides) -> TrainConfig:
    fields = dict(model_dir=str(run_dir), train_steps=STEPS, batch_size=8, seq_len=64, log_every=1,
                  checkpoint_every=CHECKPOINT_EVERY, eval_batches=2, progress_bar=False)
    return TrainConfig(**{**fields, **overrides})


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """{step: loss} from metrics.jsonl, asserting every step was logged exactly once."""
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {record["step"]: float(record["loss"]) for record in read_metrics(run_dir)}


def copy_run_cut_back_to(source: Path, destination: Path, step: int) -> Path:
    """A copy of `source` whose checkpoints after `step` are gone: a run that stopped at `step`."""
    shutil.copytree(source, destination)
    for checkpoint in (destination / "checkpoints").iterdir():
        if int(checkpoint.name) > step:
            shutil.rmtree(checkpoint)
    return destination


def restore_host(run_dir: Path, step: int):
    """(state as nested dicts of numpy arrays, extras) of checkpoint `step`."""
    return Checkpointer(run_dir / "checkpoints", read_only=True).restore(step)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tokenizer_path):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = fit(MODEL, OPTIM, FSDP8, data_config(tokenizer_path), train_config(run_dir, profile_steps=(3, 4)))
    return run_dir, result


def test_loss_decreases_and_run_dir_is_complete(reference_run):
    run_dir, result = reference_run
    assert (result.status, result.step) == ("completed", STEPS)
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # An untrained model predicts ~uniformly: loss ~ log(vocab). 30 steps must beat that clearly.
    assert abs(losses[1] - math.log(VOCAB)) < 0.1
    final = np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
    assert final < losses[1] - 0.7, (losses[1], final)
    assert result.loss == losses[STEPS]
    assert result.eval_loss is not None and result.eval_loss < losses[1] - 0.5
    assert Checkpointer(run_dir / "checkpoints", read_only=True).all_steps() == [10, 20, 30]
    assert read_model_config(run_dir) == MODEL
    assert any((run_dir / "tensorboard").iterdir())


def test_steps_are_timed_and_profile_steps_are_traced(reference_run):
    run_dir, _ = reference_run
    records = {record["step"]: record for record in read_metrics(run_dir)}
    for step in range(2, STEPS + 1):  # step 1's window holds compilation: not timed
        assert 0 <= records[step]["data_s"] <= records[step]["step_s"], records[step]
    assert [s for s in records if "checkpoint_s" in records[s]] == [10, 20, 30]
    assert [s for s in records if "eval_s" in records[s]] == [30]
    # The trace TensorBoard's profile plugin reads, with the train step's device work in it.
    traces = list((run_dir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    profile = jax.profiler.ProfileData.from_file(str(traces[0]))
    names = {event.name for plane in profile.planes for line in plane.lines for event in line.events}
    assert any("train_step" in name for name in names), sorted(names)[:50]


def test_resume_onto_a_different_mesh_continues_from_the_checkpoint(reference_run, tokenizer_path,
                                                                    tmp_path):
    reference_dir, _ = reference_run
    run_dir = copy_run_cut_back_to(reference_dir, tmp_path / "run", CHECKPOINT_EVERY)
    result = fit(MODEL, OPTIM, DATA_FSDP_TENSOR, data_config(tokenizer_path), train_config(run_dir))
    assert (result.status, result.step) == ("completed", STEPS)
    expected, resumed = losses_by_step(reference_dir), losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # Steps up to the checkpoint are the original lines; later ones were dropped and re-run on
    # the data=2 x fsdp=2 x tensor=2 mesh from the restored state and data position. Only the
    # order of floating-point reductions differs from the fsdp=8 run.
    assert all(resumed[s] == expected[s] for s in range(1, CHECKPOINT_EVERY + 1))
    np.testing.assert_allclose(resumed[CHECKPOINT_EVERY + 1], expected[CHECKPOINT_EVERY + 1],
                               rtol=1e-5)
    np.testing.assert_allclose([resumed[s] for s in range(CHECKPOINT_EVERY + 1, STEPS + 1)],
                               [expected[s] for s in range(CHECKPOINT_EVERY + 1, STEPS + 1)],
                               rtol=1e-5)
    state, extras = restore_host(run_dir, STEPS)
    assert int(state["step"]) == extras["step"] == STEPS


def test_corrupt_latest_checkpoint_falls_back_and_replays_exactly(reference_run, tokenizer_path,
                                                                   tmp_path, caplog):
    reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    data_files = [p for p in (run_dir / "checkpoints" / str(STEPS) / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:  # a half-written copy, as after a disk-full or a torn sync
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="llamax.train.checkpoint"):
        result = fit(MODEL, OPTIM, FSDP8, data_config(tokenizer_path), train_config(run_dir))
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"step {STEPS}" in warnings and "falling back" in warnings
    assert (result.status, result.step) == ("completed", STEPS)
    assert (run_dir / "checkpoints" / f"{STEPS}.corrupt").is_dir()
    # Resumed from step 20 on the same mesh: steps 21..30 replay bit for bit.
    assert losses_by_step(run_dir) == losses_by_step(reference_dir)
    resaved, _ = restore_host(run_dir, STEPS)
    original, _ = restore_host(reference_dir, STEPS)
    for got, want in zip(jax.tree.leaves(resaved), jax.tree.leaves(original)):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def _nonfinite_steps(run_dir: Path, key: str = None) -> list[int]:
    """Steps whose loss (or, with key=None, loss or grad_norm) was logged as nan/inf."""
    keys = ("loss", "grad_norm") if key is None else (key,)
    return [r["step"] for r in read_metrics(run_dir)
            if any(not math.isfinite(float(r[k])) for k in keys)]


def _assert_checkpoints_finite(run_dir: Path) -> list[int]:
    steps = Checkpointer(run_dir / "checkpoints", read_only=True).all_steps()
    for step in steps:
        state, _ = restore_host(run_dir, step)
        for leaf in jax.tree.leaves(state):
            assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"non-finite at step {step}"
    return steps


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tokenizer_path, tmp_path):
    # lr=1e5 from the first update blows the weights up within a few steps until the loss is NaN.
    explosive = OptimConfig(learning_rate=1e5, warmup_steps=0, decay="constant")
    data = data_config(tokenizer_path, validation=None)
    steps = 6

    skipped_dir = tmp_path / "skip"
    result = fit(MODEL, explosive, FSDP8, data,
                 train_config(skipped_dir, train_steps=steps, checkpoint_every=2,
                              on_nonfinite="skip"))
    assert (result.status, result.step) == ("completed", steps)
    bad = _nonfinite_steps(skipped_dir)
    assert _nonfinite_steps(skipped_dir, "loss"), "expected a NaN/inf loss; raise the learning rate"
    first_bad = bad[0]
    # Skipped updates are never applied: the saved state counts only the finite steps.
    for step in _assert_checkpoints_finite(skipped_dir):
        state, _ = restore_host(skipped_dir, step)
        assert int(state["step"]) == step - sum(1 for s in bad if s <= step)

    stopped_dir = tmp_path / "stop"
    with pytest.raises(NonFiniteLossError, match=rf"at step {first_bad}\b"):
        fit(MODEL, explosive, FSDP8, data,
            train_config(stopped_dir, train_steps=steps, checkpoint_every=2))
    saved = _assert_checkpoints_finite(stopped_dir)
    assert all(step < first_bad for step in saved), (saved, first_bad)


def test_resume_with_a_different_architecture_is_a_config_error(reference_run, tokenizer_path,
                                                                 tmp_path):
    reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="num_layers"):
        fit(MODEL.replace(num_layers=3), OPTIM, FSDP8, data_config(tokenizer_path),
            train_config(run_dir, train_steps=STEPS + 10))
    assert read_model_config(run_dir) == MODEL
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("problem", ["missing_tokenizer", "empty_file", "empty_directory"])
def test_bad_data_is_a_clear_error_and_writes_no_checkpoint(problem, tokenizer_path, tmp_path):
    tokenizer, train, match = tokenizer_path, "shakespeare", None
    if problem == "missing_tokenizer":
        tokenizer = str(tmp_path / "no_such" / "tokenizer.model")
        match = "no_such/tokenizer.model' does not exist"
    elif problem == "empty_file":
        train = str(tmp_path / "empty.txt")
        Path(train).write_text("\n  \n")
        match = "empty.txt is empty"
    else:
        train = str(tmp_path / "empty_dir")
        Path(train).mkdir()
        match = "no input files"
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=match):
        fit(MODEL, OPTIM, FSDP8, data_config(tokenizer, train=train, validation=None),
            train_config(run_dir))
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_a_run_that_fails_its_checks_leaves_its_directory_untouched(tokenizer_path, tmp_path):
    """A run refused at validation (here: the tokenizer has more pieces than the model's vocab)
    must not commit anything, so the corrected rerun, with another model, is accepted."""
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="has 512 pieces but the model's vocab_size is 256"):
        fit(MODEL.replace(vocab_size=256), OPTIM, FSDP8, data_config(tokenizer_path, validation=None),
            train_config(run_dir, train_steps=2))
    assert not run_dir.exists() or list(run_dir.iterdir()) == []
    result = fit(MODEL, OPTIM, FSDP8, data_config(tokenizer_path, validation=None),
                 train_config(run_dir, train_steps=2, checkpoint_every=2))
    assert result.status == "completed" and read_model_config(run_dir) == MODEL
    assert RunDir(run_dir).outcome() == {"status": "completed", "step": 2, "loss": result.loss,
                                         "eval_loss": None}


def test_a_model_dir_that_is_a_file_is_one_config_error(tokenizer_path, tmp_path):
    not_a_dir = tmp_path / "taken"
    not_a_dir.write_text("notes")
    with pytest.raises(ConfigError, match=rf"MODEL_DIR {not_a_dir} exists and is not a directory"):
        fit(MODEL, OPTIM, FSDP8, data_config(tokenizer_path), train_config(not_a_dir))
    assert not_a_dir.read_text() == "notes"


def test_a_read_only_model_dir_is_one_config_error(tokenizer_path, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(ConfigError, match=rf"MODEL_DIR {mount / 'run'}: {mount} is not writable"):
            fit(MODEL, OPTIM, FSDP8, data_config(tokenizer_path), train_config(mount / "run"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_eval_batches_zero_scores_the_whole_validation_split(tokenizer_path, tmp_path):
    """eval_loss over the first `eval_batches` batches is a sample; 0 scores every validation token,
    the same tokens `experiments.eval` scores with the run's seq_len and batch size."""
    run_dir = tmp_path / "full_eval"
    fit(MODEL, OPTIM, FSDP8, data_config(tokenizer_path),
        train_config(run_dir, train_steps=1, checkpoint_every=1, eval_batches=0))
    (record,) = [r for r in read_metrics(run_dir) if "eval_tokens" in r]
    tokenizer = load_tokenizer(tokenizer_path)
    validation = eval_loader(data_config(tokenizer_path), tokenizer, 64, 8, 0)
    assert record["eval_tokens"] == sum(float(batch["loss_mask"].sum()) for batch in validation)
    assert record["eval_tokens"] > 2 * 8 * 64  # more than the default 2 batches of this test
