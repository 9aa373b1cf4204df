"""Tests for llamax.train.checkpoint and llamax.train.preemption on 8 fake CPU devices."""
import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from llamax.train.checkpoint import Checkpointer, restore_params
from llamax.errors import CheckpointError
from llamax.train.preemption import PreemptionGuard

REPO_ROOT = Path(__file__).resolve().parents[1]

# Reading a corrupt step makes tensorstore abandon coroutines that orbax's event loop later
# reports as "Exception ignored ... Event loop is closed"; the error itself is handled and asserted.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@flax.struct.dataclass
class TinyTrainState:
    """Same fields as llamax.train.step.TrainState, kept local so this test owns no other module."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def fsdp_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))


def fsdp_tensor_mesh() -> jax.sharding.Mesh:
    """4 of the 8 devices as fsdp=2 x tensor=2: a different device count and mesh shape."""
    return jax.make_mesh(
        (2, 2), ("fsdp", "tensor"), devices=jax.devices()[:4], axis_types=(AxisType.Auto,) * 2
    )


def spec_for(leaf: jax.Array, mesh: jax.sharding.Mesh) -> P:
    """Shard 2-D leaves over every mesh axis (fsdp rows, tensor columns); replicate the rest."""
    if leaf.ndim == 2:
        return P("fsdp", "tensor") if "tensor" in mesh.axis_names else P("fsdp", None)
    return P()


def make_state(seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> TinyTrainState:
    key_w, key_e, key_b = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "embed_tokens": jax.random.normal(key_e, (16, 8), jnp.bfloat16),
        "layers": {"q_proj": jax.random.normal(key_w, (8, 8), jnp.float32)},
        "counts": jax.random.randint(key_b, (5,), 0, 1000, jnp.int32),
    }
    state = TinyTrainState(
        step=jnp.asarray(7, jnp.int32),
        params=params,
        opt_state=optax.adamw(1e-3).init(params),
        rng=jax.random.key_data(jax.random.PRNGKey(seed + 100)),
    )
    if mesh is not None:
        state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_for(x, mesh))), state)
    return state


def abstract_of(state: TinyTrainState, mesh: jax.sharding.Mesh) -> TinyTrainState:
    def to_struct(x: jax.Array) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_for(x, mesh)))

    return jax.tree.map(to_struct, state)


def assert_bitwise_equal(restored, expected) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def save_steps(directory: Path, steps, **kwargs) -> None:
    with Checkpointer(directory, **kwargs) as checkpointer:
        for step in steps:
            checkpointer.save(step, make_state(step), {"data": {"position": step}})


def test_round_trip_is_bitwise_and_keeps_extras(tmp_path):
    mesh = fsdp_mesh()
    state = make_state(0, mesh)
    extras = {"data": {"shard": 3, "position": 1234}, "config_hash": "abc123"}
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.save(10, state, extras)
        checkpointer.wait()
        assert checkpointer.latest_step() == 10
        restored, restored_extras = checkpointer.restore(abstract_state=abstract_of(state, mesh))
    assert isinstance(restored, TinyTrainState)
    assert_bitwise_equal(restored, state)
    assert restored.params["layers"]["q_proj"].sharding == state.params["layers"]["q_proj"].sharding
    assert restored_extras == extras
    assert {"extras", "state"} <= set(os.listdir(tmp_path / "checkpoints" / "10"))


def test_restore_without_abstract_state_gives_host_arrays(tmp_path):
    state = make_state(1)
    save_steps(tmp_path, [1])
    restored, extras = Checkpointer(tmp_path, read_only=True).restore()
    assert extras == {"data": {"position": 1}}
    assert isinstance(restored["params"]["embed_tokens"], np.ndarray)
    assert_bitwise_equal(restored["params"], jax.device_get(state.params))


def test_keep_n_deletes_oldest(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], keep=2, async_save=False)
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_save_interval_force_and_duplicate_step(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=5) as checkpointer:
        state = make_state()
        assert checkpointer.save(3, state)  # orbax always writes the first checkpoint
        assert not checkpointer.save(4, state)  # not a multiple of 5
        assert checkpointer.save(5, state)
        assert checkpointer.save(7, state, force=True)
        assert not checkpointer.save(7, state, force=True)  # already saved: no error, no rewrite
        checkpointer.wait()
        assert checkpointer.all_steps() == [3, 5, 7]


def test_async_save_never_exposes_unfinished_step(tmp_path):
    save_steps(tmp_path, [1])
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(2, make_state(2))
    # Whether or not the background write has finished, only committed dirs are reported.
    latest = checkpointer.latest_step()
    assert latest in (1, 2) and (tmp_path / str(latest)).is_dir()
    checkpointer.wait()
    assert checkpointer.latest_step() == 2
    checkpointer.close()
    # A crashed save leaves <step>.orbax-checkpoint-tmp behind: it must never be restored.
    os.rename(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1]
    _, extras = reader.restore()
    assert extras == {"data": {"position": 1}}


def test_restore_onto_different_mesh_shape(tmp_path):
    saved_mesh, new_mesh = fsdp_mesh(), fsdp_tensor_mesh()
    state = make_state(3, saved_mesh)
    save_steps_state = Checkpointer(tmp_path)
    save_steps_state.save(1, state, {})
    save_steps_state.close()
    reader = Checkpointer(tmp_path, read_only=True)
    restored, _ = reader.restore(abstract_state=abstract_of(state, new_mesh))
    weight = restored.params["layers"]["q_proj"]
    assert weight.sharding == NamedSharding(new_mesh, P("fsdp", "tensor"))
    assert len(weight.sharding.device_set) == 4
    assert weight.addressable_shards[0].data.shape == (4, 4)
    assert_bitwise_equal(restored, state)


def _corrupt_data_files(step_dir: Path, how: str) -> None:
    data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, f"expected OCDBT data files under {step_dir}/state/**/d/"
    for path in data_files:
        if how == "truncate":
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
        else:
            path.unlink()


@pytest.mark.parametrize(
    "damage", ["truncate_data", "delete_data", "bad_extras_json", "bad_state_metadata"]
)
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2])
    if damage == "bad_extras_json":
        (tmp_path / "2" / "extras" / "metadata").write_text('{"data": {"posit')
    elif damage == "bad_state_metadata":
        (tmp_path / "2" / "state" / "_METADATA").write_text("\x00garbage")
    else:
        _corrupt_data_files(tmp_path / "2", damage.split("_")[0])
    mesh = fsdp_mesh()
    with caplog.at_level(logging.WARNING, logger="llamax.train.checkpoint"):
        restored, extras = Checkpointer(tmp_path, read_only=True).restore(
            abstract_state=abstract_of(make_state(1), mesh)
        )
    assert extras == {"data": {"position": 1}}
    assert_bitwise_equal(restored, make_state(1))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step 2" in warning and "falling back" in warning
    # An explicitly requested corrupt step is an error, not a silent fallback.
    with pytest.raises(CheckpointError, match="step 2"):
        Checkpointer(tmp_path, read_only=True).restore(
            step=2, abstract_state=abstract_of(make_state(1), mesh)
        )


def test_no_readable_checkpoint_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="No committed checkpoint"):
        Checkpointer(tmp_path / "empty", read_only=True).restore()
    save_steps(tmp_path / "run", [1, 2])
    for step in (1, 2):
        _corrupt_data_files(tmp_path / "run" / str(step), "delete")
    with pytest.raises(CheckpointError, match=r"(?s)Tried:.*step 2.*step 1"):
        Checkpointer(tmp_path / "run", read_only=True).restore(
            abstract_state=abstract_of(make_state(), fsdp_mesh())
        )


def test_mismatched_abstract_state_names_the_leaf(tmp_path):
    save_steps(tmp_path, [1])
    mesh = fsdp_mesh()
    abstract = abstract_of(make_state(), mesh)
    wrong_shape = abstract.replace(
        params={**abstract.params, "embed_tokens": jax.ShapeDtypeStruct((32, 8), jnp.bfloat16)}
    )
    reader = Checkpointer(tmp_path, read_only=True)
    with pytest.raises(CheckpointError, match=r"params/embed_tokens.*\(32, 8\).*\(16, 8\)"):
        reader.restore(abstract_state=wrong_shape)
    wrong_dtype = abstract.replace(rng=jax.ShapeDtypeStruct((2,), jnp.int32))
    with pytest.raises(CheckpointError, match=r"'rng'.*int32.*uint32"):
        reader.restore(abstract_state=wrong_dtype)
    lm_head = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    extra_leaf = abstract.replace(params={**abstract.params, "lm_head": lm_head})
    with pytest.raises(CheckpointError, match="params/lm_head"):
        reader.restore(abstract_state=extra_leaf)


def test_extras_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError, match="JSON"):
            checkpointer.save(1, make_state(), {"bad": np.float32(1.0)})


def test_restore_params_only(tmp_path):
    state = make_state(5, fsdp_mesh())
    save_steps_state = Checkpointer(tmp_path)
    save_steps_state.save(1, state, {})
    save_steps_state.close()

    host_params = restore_params(tmp_path)
    assert set(host_params) == {"embed_tokens", "layers", "counts"}
    assert isinstance(host_params["layers"]["q_proj"], np.ndarray)
    assert_bitwise_equal(host_params, state.params)

    new_mesh = fsdp_tensor_mesh()
    sharded = restore_params(tmp_path, step=1, abstract_params=abstract_of(state, new_mesh).params)
    assert sharded["embed_tokens"].sharding == NamedSharding(new_mesh, P("fsdp", "tensor"))
    assert_bitwise_equal(sharded, state.params)

    with pytest.raises(CheckpointError, match="params/counts"):
        wrong_counts = jax.ShapeDtypeStruct((6,), jnp.int32)
        restore_params(tmp_path, abstract_params={**host_params, "counts": wrong_counts})


def test_preemption_guard_restores_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(1) and guard.received_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from llamax.train.checkpoint import Checkpointer
    from llamax.train.preemption import PreemptionGuard

    checkpointer = Checkpointer(sys.argv[1], save_interval_steps=1000)
    state = {"w": jnp.zeros((4,))}
    with PreemptionGuard() as guard:
        for step in range(1, 10_000):
            state = {"w": state["w"] + 1}
            time.sleep(0.01)
            checkpointer.save(step, state, {"step": step})
            if step == 3:
                print("ready", flush=True)
            if guard.should_stop(step):
                checkpointer.save(step, state, {"step": step}, force=True)
                checkpointer.wait()
                print("saved", step, flush=True)
                break
    checkpointer.close()
    """
)


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "checkpoints")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    saved_step = int(stdout.split()[-1])
    reader = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert reader.latest_step() == saved_step
    state, extras = reader.restore()
    assert extras == {"step": saved_step}
    assert np.all(state["w"] == saved_step)


def test_resume_after_fallback_can_save_the_corrupt_step_again(tmp_path):
    save_steps(tmp_path, [1, 2])
    _corrupt_data_files(tmp_path / "2", "delete")
    mesh = fsdp_mesh()
    checkpointer = Checkpointer(tmp_path, async_save=False)
    restored, _ = checkpointer.restore(abstract_state=abstract_of(make_state(1), mesh))
    assert checkpointer.all_steps() == [1]
    assert (tmp_path / "2.corrupt").is_dir()  # kept for inspection, no longer a step
    # The resumed run reaches step 2 again: that save must happen, not be skipped as a duplicate.
    assert checkpointer.save(2, make_state(2), {"data": {"position": 2}}, force=True)
    checkpointer.wait()
    restored, extras = checkpointer.restore(abstract_state=abstract_of(make_state(2), mesh))
    assert extras == {"data": {"position": 2}}
    assert_bitwise_equal(restored, make_state(2))
    checkpointer.close()


def test_opening_checkpoints_read_only_prints_no_warnings(tmp_path, caplog):
    """Every evaluation, export and resume check opens the checkpoints read only; orbax's notes
    about it ('Given directory is read only', 'setting max_to_keep=None') read like problems."""
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(1, {"w": jnp.ones(3)}, {"step": 1}, force=True)
    # An earlier test's failed read (a corrupt step, then the fallback) leaves an asyncio future
    # whose error is logged when it is collected: collect it before this test's window opens.
    gc.collect()
    with caplog.at_level(logging.WARNING):
        with Checkpointer(tmp_path / "checkpoints", read_only=True) as reader:
            assert reader.all_steps() == [1]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
