"""A `CompileReport` as text: the per-chip memory table, the verdict and, when a run does not fit,
the settings that would shrink what overflowed (`memory_knobs`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from llamax.aot.compile import CompileReport, ProgramReport
from llamax.aot.topology import Topology
from llamax.config import ModelConfig
from llamax.train.optim import OptimConfig

@dataclasses.dataclass(frozen=True)
class Knob:
    """Settings to change together, and why that would help."""

    settings: dict[str, Any]  # 'ModelConfig.remat_policy' -> 'full', ..., or 'topology' -> 'v5p-256'
    reason: str


def memory_knobs(report: CompileReport, model_config: ModelConfig,
                 optim_config: OptimConfig) -> list[Knob]:
    """Settings that shrink the largest program's per-chip memory, most effective first.

    Which ones apply follows from what overflowed: sharded state (arguments) that alone fills a
    good part of HBM needs more shards; temporaries (activations) need remat, bf16, a smaller
    per-chip batch, another attention path, tensor parallelism or a shorter sequence.
    """
    # The train step's arguments are the sharded state (+ batch); init's are just a key.
    state_bytes = max(p.per_device_bytes()["arguments"] or 0 for p in report.programs)
    state = _gib(state_bytes)
    mesh = report.mesh
    per_chip_batch = report.global_batch // (mesh["data"] * mesh["fsdp"] * optim_config.grad_accum_steps)
    knobs = []
    if state_bytes > report.hbm_bytes_per_device // 3:
        if mesh["data"] > 1:
            knobs.append(Knob({"MeshConfig.data": 1, "MeshConfig.fsdp": mesh["fsdp"] * mesh["data"]},
                              f"params and optimizer state are {state} per chip; fold the data "
                              "axis into fsdp to shard them over every chip"))
        bigger = _bigger_slice(report.topology)
        if bigger:
            knobs.append(Knob({"topology": bigger, "MeshConfig.fsdp": -1},
                              f"the sharded state alone is {state} per chip; twice the chips "
                              "halve it (fsdp=-1 spreads it over all of them)"))
    if model_config.remat_policy != "full":
        knobs.append(Knob({"ModelConfig.remat_policy": "full"},
                          "recompute each layer in the backward pass instead of keeping its "
                          "activations (about 1/3 more compute); the offload_* policies keep "
                          "them in host memory instead"))
    if model_config.dtype == "float32":
        knobs.append(Knob({"ModelConfig.dtype": "bfloat16"},
                          "bf16 activations and matmuls halve activation memory (master weights "
                          "stay in param_dtype)"))
    if model_config.attention_impl == "xla" and report.seq_len >= 2048:
        knobs.append(Knob({"ModelConfig.attention_impl": "splash"},
                          "the Pallas kernel never holds [seq, seq] attention scores"))
    if per_chip_batch > 1:
        knobs.append(Knob({"OptimConfig.grad_accum_steps": optim_config.grad_accum_steps * per_chip_batch},
                          f"one sequence per chip per micro-batch instead of {per_chip_batch}: "
                          f"activations shrink {per_chip_batch}x at the same global batch"))
    tensor = next((t for t in (8, 4, 2) if mesh["tensor"] == 1 and mesh["fsdp"] % t == 0
                   and model_config.num_kv_heads % t == 0), None)
    if tensor:
        knobs.append(Knob({"MeshConfig.tensor": tensor, "MeshConfig.fsdp": mesh["fsdp"] // tensor},
                          "tensor parallelism also splits each layer's activations (heads, mlp)"))
    if per_chip_batch <= 1:
        knobs.append(Knob({"TrainConfig.seq_len": report.seq_len // 2},
                          "activations grow with the sequence (the XLA attention's scores with "
                          "its square)"))
    return knobs


def _bigger_slice(name: str) -> str | None:
    """The next listed slice of the same generation with at least twice the chips."""
    topology = Topology.parse(name)
    sizes = [chips for chips in sorted(topology.spec.shapes) if chips >= 2 * topology.num_chips]
    if not sizes:
        return None
    return f"{topology.generation}-{sizes[0] * topology.spec.cores_per_chip}"


def _largest(report: CompileReport) -> ProgramReport:
    """The program that overflowed (the train step if it did), else the largest one."""
    hbm = report.hbm_bytes_per_device
    failing = sorted((p for p in report.programs if not p.fits(hbm)), key=lambda p: p.name != "train_step")
    if failing:
        return failing[0]
    return max(report.programs, key=lambda p: p.memory.total if p.memory else 0)


def _gib(value: int | None) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point: '15.75 GiB'."""
    if value is None:
        return "?"
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value >= 1024 ** power:
            return f"{value / 1024 ** power:.2f} {unit}"
    return f"{value} B"


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:.2f}M"


def format_report(report: CompileReport) -> str:
    """The per-chip memory table with compile times, collectives, FLOPs and the verdict."""
    model = report.model
    mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    slices = f"{report.num_slices} x " if report.num_slices > 1 else ""
    lines = [
        f"model: {_count(model['num_params'])} params, {model['dtype']} compute, "
        f"{model['param_dtype']} params, remat {model['remat_policy']}, attention "
        f"{model['attention_impl']}",
        f"slice: {slices}{report.topology}: {report.num_devices} x {report.device_kind}, "
        f"{_gib(report.hbm_bytes_per_device)} HBM per chip (libtpu {report.libtpu_version})",
        f"run: mesh {mesh}; global batch {report.global_batch} x seq {report.seq_len}"
        + (f", {report.grad_accum_steps} micro-batches" if report.grad_accum_steps > 1 else ""),
        "",
        f"{'per chip':<12}{'arguments':>12}{'outputs':>12}{'aliased':>12}{'temp':>12}{'total':>12}"
        f"{'of HBM':>8}{'compile':>10}",
    ]
    for program in report.programs:
        row = program.per_device_bytes()
        share = "OOM" if row["total"] is None or program.memory is None and program.out_of_memory \
            else f"{row['total'] / report.hbm_bytes_per_device:.0%}"
        lines.append(f"{program.name:<12}" + "".join(f"{_gib(row[k]):>12}" for k in
                                                    ("arguments", "outputs", "aliased", "temp", "total"))
                     + f"{share:>8}{program.compile_s:>9.1f}s")
    train = report.train_step
    if train.collectives:
        lines.append("collectives in train_step (a scanned layer counts once): " +
                     ", ".join(f"{name} {count}" for name, count in train.collectives.items()))
    flops = f"model FLOPs per step {report.model_flops_per_step:.3g}"
    if report.ideal_step_s is not None:
        flops += (f"; ideal step {report.ideal_step_s:.3g} s at "
                  f"{report.peak_flops_per_device / 1e12:.0f} TFLOP/s per chip (bf16 peak)")
    lines += [flops, "", _verdict(report)]
    return "\n".join(lines)


def _verdict(report: CompileReport) -> str:
    hbm = report.hbm_bytes_per_device
    if report.fits:
        program = _largest(report)
        return (f"FITS: at most {_gib(program.memory.total)} of {_gib(hbm)} per chip "
                f"({program.name}, {program.memory.total / hbm:.0%})")
    program = _largest(report)
    if program.out_of_memory is not None:
        oom = program.out_of_memory
        return (f"DOES NOT FIT: {program.name}: the compiler says \"{oom.message}\" "
                f"(needs {_gib(oom.required_bytes)}, HBM {_gib(oom.available_bytes or hbm)})")
    return (f"DOES NOT FIT: {program.name} needs {_gib(program.memory.total)} per chip, HBM is "
            f"{_gib(hbm)}")
