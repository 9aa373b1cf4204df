"""`llamax.aot` and `experiments.compile`: runs compiled by libtpu's own TPU compiler for real slice
topologies on this CPU host. The compiler is the reference: per-chip argument bytes must equal
the sharded train state we planned, an oversized run must be refused by it (reported, exit 1),
and the compile-only devices' kinds key the MFU peak table."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llamax.aot import OutOfMemory, Topology, compile_run, memory_knobs
from llamax.aot.topology import GENERATIONS, compile_only_devices
from llamax.config import ModelConfig, get_preset
from llamax.errors import ConfigError
from llamax.sharding import MeshConfig
from llamax.train import abstract_train_state, peak_flops_per_device
from llamax.train.optim import OptimConfig

REPO = Path(__file__).resolve().parent.parent
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install 'llamax[tpu]'")

# Every per-chip shard of this model is a whole number of TPU (8, 128) tiles on a 4-chip slice
# with fsdp 4 or fsdp 2 x tensor 2, so the compiler's argument bytes carry no layout padding.
TILED = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
                    num_heads=16, num_kv_heads=16, head_dim=128, dtype="bfloat16",
                    remat_policy="full")


def test_topology_names():
    v5p = Topology.parse("v5p-128")
    assert (v5p.num_chips, v5p.topology_name, v5p.spec.device_kind) == (64, "v5:4x4x4", "TPU v5")
    assert Topology.parse("v5litepod-16").topology_name == "v5e:4x4"
    assert Topology.parse("v4-32").topology_name == "v4:2x2x4"
    assert Topology.parse("V6E-256").topology_name == "v6e:16x16"
    with pytest.raises(ConfigError, match="known sizes: v5p-8, v5p-16"):
        Topology.parse("v5p-100")
    with pytest.raises(ConfigError, match="expected <generation>-<size>"):
        Topology.parse("tpu-v9")


def test_missing_libtpu_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'llamax\[tpu\]'"):
        compile_only_devices(Topology.parse("v5e-8"))


def test_out_of_memory_messages_parse():
    """Both forms libtpu uses (the first captured from this tool, the second from MaxText logs)."""
    temporaries = OutOfMemory.parse(RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (130.60G) exceeds available HBM (15.75G)."))
    assert temporaries.required_bytes == round(130.60 * 2 ** 30)
    assert temporaries.available_bytes == round(15.75 * 2 ** 30)
    used = OutOfMemory.parse(RuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 20.05G of 15.75G hbm. Exceeded hbm capacity by 4.30G."))
    assert (used.required_bytes, used.available_bytes) == (round(20.05 * 2 ** 30), round(15.75 * 2 ** 30))
    assert OutOfMemory.parse(RuntimeError("INVALID_ARGUMENT: shapes differ")) is None


@needs_libtpu
@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_compile_only_devices_key_the_peak_flops_table(generation):
    spec = GENERATIONS[generation]
    smallest = min(spec.shapes) * spec.cores_per_chip
    devices = compile_only_devices(Topology.parse(f"{generation}-{smallest}"))
    assert devices[0].device_kind == spec.device_kind
    expected = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}[generation]
    assert peak_flops_per_device(devices[0]) == expected


def _state_bytes(config: ModelConfig) -> int:
    state = abstract_train_state(config, OptimConfig())
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


@needs_libtpu
@pytest.mark.slow
def test_fsdp_report_is_complete_and_arguments_are_the_sharded_state():
    report = compile_run(TILED, OptimConfig(), MeshConfig(fsdp=4), batch_size=8, seq_len=128,
                         topology=Topology.parse("v4-8"))
    record = report.to_json()
    for key in ("topology", "device_kind", "num_devices", "mesh", "global_batch", "seq_len",
                "per_device_bytes", "hbm_bytes_per_device", "fits", "compile_s",
                "model_flops_per_step", "ideal_step_s", "collectives", "programs"):
        assert record[key] is not None, key
    assert (record["topology"], record["device_kind"], record["num_devices"]) == ("v4-8", "TPU v4", 4)
    assert record["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert set(record["per_device_bytes"]) >= {"arguments", "outputs", "aliased", "temp", "total"}
    assert set(record["programs"]) == {"init", "train_step", "eval_step"} and record["fits"]
    assert record["collectives"]["all-gather"] > 0  # FSDP gathers params
    assert record["ideal_step_s"] == pytest.approx(
        record["model_flops_per_step"] / (275e12 * 4))
    train = report.train_step.memory
    assert train.arguments == pytest.approx(_state_bytes(TILED) / 4, rel=0.02)
    assert train.aliased > 0.95 * train.outputs  # the donated state is updated in place
    assert report.program("init").memory.outputs == pytest.approx(_state_bytes(TILED) / 4, rel=0.02)


@needs_libtpu
@pytest.mark.slow
def test_fsdp_times_tensor_arguments_are_the_sharded_state():
    report = compile_run(TILED, OptimConfig(), MeshConfig(fsdp=2, tensor=2), batch_size=8,
                         seq_len=128, topology=Topology.parse("v4-8"), programs=("train_step",))
    assert report.mesh == {"data": 1, "fsdp": 2, "tensor": 2}
    assert report.train_step.memory.arguments == pytest.approx(_state_bytes(TILED) / 4, rel=0.02)
    assert report.train_step.collectives.get("all-reduce", 0) > 0  # tensor-parallel partial sums


@needs_libtpu
@pytest.mark.slow
def test_multislice_and_splash_compile_for_tpu(tmp_path):
    """Two v5e-8 slices joined over DCN, with the splash kernel compiled by Mosaic."""
    config = get_preset("tiny", dtype="bfloat16", attention_impl="splash")
    report = compile_run(config, OptimConfig(), MeshConfig(fsdp=4, tensor=2, dcn_data=2),
                         batch_size=16, seq_len=256, topology=Topology.parse("v5e-8"),
                         num_slices=2, programs=("train_step",), dump_hlo=tmp_path)
    assert (report.num_devices, report.mesh) == (16, {"data": 2, "fsdp": 4, "tensor": 2})
    assert report.fits
    assert "tpu_custom_call" in (tmp_path / "train_step.hlo.txt").read_text()  # not interpreted


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "experiments.compile", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


@needs_libtpu
@pytest.mark.slow
def test_cli_fits_exits_0(tmp_path):
    result = _cli("--gin_file=configs/runs/tiny.gin", "--topology=v5e-8", "--json", "r.json",
                  tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FITS" in result.stdout and "train_step" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["fits"] is True


@needs_libtpu
@pytest.mark.slow
def test_oversized_run_reports_does_not_fit_and_exits_1(tmp_path):
    """A 134M-token vocabulary: the state alone is 1.7x a v4 chip's HBM at fsdp 4."""
    out = tmp_path / "report.json"
    result = _cli("--gin_file=configs/runs/tiny.gin", "--gin.VOCAB_SIZE=134217728",
                  "--gin.BATCH_SIZE=4", "--topology", "v4-8", f"--json={out}", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "DOES NOT FIT" in result.stdout and "the compiler says" in result.stdout
    assert "--topology v4-16 --gin.sharding.MeshConfig.fsdp=-1" in result.stdout  # more chips
    record = json.loads(out.read_text())
    assert record["fits"] is False and record["knobs"]
    oom = record["programs"]["init"]["out_of_memory"]
    assert oom["available_bytes"] == GENERATIONS["v4"].hbm_bytes
    assert oom["required_bytes"] > oom["available_bytes"]
    assert record["per_device_bytes"]["arguments"] > record["hbm_bytes_per_device"]


@needs_libtpu
def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    for args in (["--gin_file=configs/runs/tiny.gin", "--topology", "v5p-100"],
                 ["--gin_file=configs/runs/tiny.gin", "--topology", "v5e-8", "--num_slices", "2"],
                 ["--gin_file=configs/runs/tiny.gin", "--topology", "v5e-8",
                  "--gin.config.ModelConfig.remat_polcy='full'"],
                 # A DPO run's step is not the one compiled: refused, not misreported.
                 ["--gin_file=configs/runs/dpo_tiny.gin", "--topology", "v5e-8"]):
        result = _cli(*args, tmp_path=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error:")


def test_cpu_hosts_skip_the_libtpu_probe():
    """With libtpu installed and no TPU chip, a process that calls use_cpu_without_accelerators
    (every CLI does) never loads libtpu: CPU devices, nothing on stderr."""
    code = ("from llamax.backends import use_cpu_without_accelerators as use_cpu\n"
            "chose = use_cpu()\nimport jax\nprint(chose, jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    result = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    assert result.stdout.split() == [str(has_libtpu), "cpu"], result.stderr
    assert result.stderr == ""
    chosen = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO),
                                                                    JAX_PLATFORMS="cpu"),
                            capture_output=True, text=True, timeout=120)
    assert chosen.stdout.split()[0] == "False"  # the user's choice is left alone


def test_clis_stay_on_the_cpu_quietly():
    """Every CLI (any experiments.* module) on a host without accelerators: CPU devices and an
    empty stderr, libtpu installed or not (importing the experiments package does it)."""
    code = "import experiments.sample\nimport jax\nprint(jax.devices()[0].platform)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    result = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (result.stdout.strip(), result.stderr) == ("cpu", "")


def test_knobs_follow_what_overflowed():
    """Without compiling: a report whose train step overflowed in temporaries."""
    from llamax.aot.compile import CompileReport, ProgramReport

    oom = OutOfMemory("Ran out of memory on HBM", 64 * 2 ** 30, 16 * 2 ** 30)
    program = ProgramReport("train_step", 1.0, 2 ** 30, None, oom, {})
    report = CompileReport("v5e-16", 1, "TPU v5 lite", 16, {"data": 1, "fsdp": 16, "tensor": 1},
                           64, 8192, 16 * 2 ** 30, (program,), 1e15, 197e12, {})
    config = get_preset("llama3.2_1b")
    settings = [knob.settings for knob in memory_knobs(report, config, OptimConfig())]
    assert settings[0] == {"ModelConfig.remat_policy": "full"}  # temp overflowed, not the state
    assert {"ModelConfig.attention_impl": "splash"} in settings
    assert {"OptimConfig.grad_accum_steps": 4} in settings  # 4 sequences per chip -> 1
    assert {"MeshConfig.tensor": 8, "MeshConfig.fsdp": 2} in settings
    assert not any("topology" in s for s in settings)


@needs_libtpu
def test_inference_programs_for_a_tpu_mesh_take_the_tpu_form_on_a_cpu_host():
    """generate, the serving slots and the scorer trace under the mesh's platform: einsum
    projections and the grouped decode attention for a TPU mesh, though jax's default backend
    here is the CPU (they used to follow the default backend, so a TPU program built on a CPU
    host took the CPU form)."""
    import numpy as np
    from jax.sharding import Mesh

    from llamax.infer import generate as gen
    from llamax.infer.slots import SlotProgram
    from llamax.model.matmul import builds_for_cpu
    from llamax.sharding import LOGICAL_AXIS_RULES

    rules = tuple(tuple(rule) for rule in LOGICAL_AXIS_RULES)
    tpu = Mesh(np.array(compile_only_devices(Topology.parse("v5e-1"))[:1]).reshape(1, 1, 1),
               ("data", "fsdp", "tensor"))
    cpu = Mesh(np.array(jax.devices("cpu")[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    for mesh, cpu_form in ((tpu, False), (cpu, True)):
        with gen.sharding_context(mesh, rules):
            assert builds_for_cpu() is cpu_form
        with SlotProgram(get_preset("tiny"), 2, 32, mesh=mesh)._context(rules):
            assert builds_for_cpu() is cpu_form
