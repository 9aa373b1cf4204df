"""Ahead-of-time compilation of a training run for a TPU slice, and what each chip would hold.

    report = compile_run(model_config, optim_config, mesh_config, batch_size=256, seq_len=8192,
                         topology=Topology.parse("v5p-128"))
    report.fits, report.train_step.memory.total

The run's own mesh (`llamax.sharding.make_mesh`) is built on the slice's compile-only devices and
its three programs, the sharded init, the train step and the eval step, are lowered on abstract
inputs (ShapeDtypeStructs: no array is ever made) and compiled by libtpu. Per program:
`memory_analysis()` per chip (total = arguments + outputs - aliased + temp), compile time and the
collectives in the optimized HLO. A program the compiler cannot fit in HBM becomes an
`OutOfMemory` holding the compiler's own figures instead of an exception.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax

from llamax.aot.topology import Topology, compile_only_devices, libtpu_version
from llamax.config import ModelConfig
from llamax.errors import ConfigError
from llamax.data.packing import BATCH_DTYPES
from llamax.model.lora import LoraConfig
from llamax.sharding import MeshConfig, check_batch_size, make_mesh, replicated
from llamax.train.flops import flops_per_token, peak_flops_per_device
from llamax.train.optim import OptimConfig

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode comes right before its operands: `... all-gather-start(%x), ...`
# (async pairs count once, at their -start; -done is not matched).
_COLLECTIVE_OPCODE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SIZE = r"([\d.]+)([KMGTP]?)i?B?"  # XLA's human-readable bytes: 130.60G, 512.00M, 100B


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Bytes per chip of one compiled program, from XLA's `memory_analysis()`."""

    arguments: int
    outputs: int
    aliased: int  # outputs that reuse a donated argument's buffer
    temp: int  # everything live in between: activations, gradients, collectives' buffers
    host_temp: int = 0  # remat residuals offloaded to host memory (offload_* policies)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temp

    @classmethod
    def of(cls, compiled: Any) -> "MemoryUse":
        stats = compiled.memory_analysis()
        return cls(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                   aliased=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes,
                   host_temp=stats.host_temp_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """A compile the TPU compiler refused for lack of HBM, in its own words and figures."""

    message: str  # the compiler's sentence
    required_bytes: int | None  # what it needed: HLO temporaries, or everything it counted
    available_bytes: int | None  # the chip's HBM as the compiler sees it

    @classmethod
    def parse(cls, error: Exception) -> "OutOfMemory | None":
        """The OutOfMemory in a compile error, or None when `error` is about something else."""
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = next((line for line in lines if "memory" in line.lower()), lines[0] if lines else text)
        required = re.search(r"required for HLO temporaries \(" + _SIZE + r"\)", text) or \
            re.search(r"Used " + _SIZE + r" of", text)
        available = re.search(r"available HBM \(" + _SIZE + r"\)", text) or \
            re.search(r"of " + _SIZE + r" hbm", text)
        return cls(message.removeprefix("RESOURCE_EXHAUSTED: "), _bytes(required), _bytes(available))


def _bytes(match: re.Match | None) -> int | None:
    if match is None:
        return None
    number, unit = match.groups()
    return round(float(number) * 1024 ** "_KMGTP".index(unit or "_"))


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program (init, train_step or eval_step) on one chip."""

    name: str
    compile_s: float  # lowering + compiling
    state_bytes: int  # its sharded inputs per chip as the shardings plan them (batch included)
    memory: MemoryUse | None  # None when the compiler ran out of memory
    out_of_memory: OutOfMemory | None
    collectives: dict[str, int]  # opcode -> count in the optimized HLO (a scanned layer counts once)

    def fits(self, hbm_bytes: int) -> bool:
        return self.memory is not None and self.memory.total <= hbm_bytes

    def per_device_bytes(self) -> dict[str, int | None]:
        """The memory table's row. After an out-of-memory only the planned arguments and the
        compiler's figure are known; the rest is None rather than a guess."""
        if self.memory is not None:
            m = self.memory
            return dict(arguments=m.arguments, outputs=m.outputs, aliased=m.aliased, temp=m.temp,
                        host_temp=m.host_temp, total=m.total)
        oom = self.out_of_memory
        temporaries = oom is not None and "temporaries" in oom.message
        required = None if oom is None else oom.required_bytes
        return dict(arguments=self.state_bytes, outputs=None, aliased=None, host_temp=None,
                    temp=required if temporaries else None,
                    total=self.state_bytes + required if temporaries and required else required)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Everything `compile_run` learned; `to_json()` is the `--json` file of experiments.compile."""

    topology: str
    num_slices: int
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    global_batch: int
    seq_len: int
    hbm_bytes_per_device: int
    programs: tuple[ProgramReport, ...]
    model_flops_per_step: float
    peak_flops_per_device: float | None
    model: dict[str, Any]  # size and the memory-relevant ModelConfig fields
    grad_accum_steps: int = 1
    libtpu_version: str | None = None

    def program(self, name: str) -> ProgramReport:
        return next(p for p in self.programs if p.name == name)

    @property
    def train_step(self) -> ProgramReport:
        return self.program("train_step")

    @property
    def fits(self) -> bool:
        return all(p.fits(self.hbm_bytes_per_device) for p in self.programs)

    @property
    def ideal_step_s(self) -> float | None:
        """The train step at 100% of the chips' bf16 peak (MFU = ideal_step_s / measured)."""
        if not self.peak_flops_per_device:
            return None
        return self.model_flops_per_step / (self.peak_flops_per_device * self.num_devices)

    def to_json(self) -> dict[str, Any]:
        train = self.train_step
        return dict(
            topology=self.topology, num_slices=self.num_slices, device_kind=self.device_kind,
            num_devices=self.num_devices, mesh=self.mesh, global_batch=self.global_batch,
            seq_len=self.seq_len, grad_accum_steps=self.grad_accum_steps,
            per_device_bytes=train.per_device_bytes(),
            hbm_bytes_per_device=self.hbm_bytes_per_device, fits=self.fits,
            compile_s=round(sum(p.compile_s for p in self.programs), 2),
            model_flops_per_step=self.model_flops_per_step,
            peak_flops_per_device=self.peak_flops_per_device, ideal_step_s=self.ideal_step_s,
            collectives=train.collectives, model=self.model, libtpu_version=self.libtpu_version,
            programs={p.name: dict(per_device_bytes=p.per_device_bytes(), fits=p.fits(self.hbm_bytes_per_device),
                                   compile_s=round(p.compile_s, 2), collectives=p.collectives,
                                   out_of_memory=None if p.out_of_memory is None
                                   else dataclasses.asdict(p.out_of_memory))
                      for p in self.programs},
        )


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective opcodes in an HLO module's text, e.g. {'all-gather': 38, 'all-reduce': 16}."""
    counts = collections.Counter(_COLLECTIVE_OPCODE.findall(hlo_text))
    return {name: counts[name] for name in COLLECTIVES if counts[name]}


def compile_run(model_config: ModelConfig, optim_config: OptimConfig, mesh_config: MeshConfig,
                batch_size: int, seq_len: int, topology: Topology, num_slices: int = 1,
                lora_config: LoraConfig | None = None, dump_hlo: str | Path | None = None,
                programs: tuple[str, ...] = ("init", "train_step", "eval_step")) -> CompileReport:
    """Compiles the run's `programs` for `num_slices` slices of `topology` and reports per chip.

    batch_size is global (all slices). Raises ConfigError for a mesh that does not fit the slice,
    heads that tensor parallelism cannot split or a batch the data-parallel size does not divide;
    running out of HBM is not an error but part of the report. `dump_hlo`: a folder that gets
    each program's optimized HLO (`<program>.hlo.txt`), or its StableHLO when it did not compile.
    """
    devices = compile_only_devices(topology, num_slices)
    mesh = make_mesh(mesh_config, devices=devices)
    check_batch_size(batch_size, mesh)
    reports = []
    for name, (jitted, args) in _programs(model_config, optim_config, mesh, batch_size, seq_len,
                                          lora_config, programs).items():
        reports.append(_compile(name, jitted, args, dump_hlo))
    return CompileReport(
        topology=topology.name, num_slices=num_slices, device_kind=devices[0].device_kind,
        num_devices=len(devices), mesh=dict(mesh.shape), global_batch=batch_size, seq_len=seq_len,
        hbm_bytes_per_device=topology.hbm_bytes, programs=tuple(reports),
        model_flops_per_step=flops_per_token(model_config, seq_len) * batch_size * seq_len,
        peak_flops_per_device=peak_flops_per_device(devices[0]),
        model=_model_summary(model_config), grad_accum_steps=optim_config.grad_accum_steps,
        libtpu_version=libtpu_version())


def _programs(model_config: ModelConfig, optim_config: OptimConfig, mesh: jax.sharding.Mesh,
              batch_size: int, seq_len: int, lora_config: LoraConfig | None,
              names: tuple[str, ...]) -> dict[str, tuple[Callable, tuple]]:
    """name -> (jitted function, abstract arguments), from the run's one `TrainSetup`."""
    from llamax.model.llama import abstract_params
    from llamax.train import make_train_setup

    unknown = set(names) - {"init", "train_step", "eval_step"}
    if unknown or "train_step" not in names:
        raise ConfigError(f"programs {list(names)}: choose among init, train_step, eval_step; "
                          "train_step is always needed (the report is about it)")
    setup = make_train_setup(model_config, optim_config, mesh, lora_config=lora_config)
    state = setup.abstract_state  # ShapeDtypeStructs with their shardings
    batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=setup.batch_sharding)
             for key, dtype in BATCH_DTYPES.items()}
    # LoRA steps read the frozen base params as one more argument, loaded in param_dtype.
    frozen = () if setup.frozen_shardings is None else (
        _with_shardings(abstract_params(model_config)[0], setup.frozen_shardings),)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=replicated(mesh))
    programs = {"init": (setup.init, (key,)),
                "train_step": (setup.train_step.jitted, (state, batch, *frozen)),
                "eval_step": (setup.eval_step.jitted, (state.params, batch, *frozen))}
    return {name: programs[name] for name in names}


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract, shardings)


def per_device_bytes(abstract: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shard)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract))


def _compile(name: str, jitted: Callable, args: tuple, dump_hlo: str | Path | None) -> ProgramReport:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - only an out-of-memory becomes a report
        out_of_memory = OutOfMemory.parse(error)
        if out_of_memory is None:
            raise
        _dump(dump_hlo, f"{name}.stablehlo.mlir", lowered.as_text)
        return ProgramReport(name, time.perf_counter() - start, per_device_bytes(args), None,
                             out_of_memory, {})
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    _dump(dump_hlo, f"{name}.hlo.txt", lambda: hlo)
    return ProgramReport(name, seconds, per_device_bytes(args), MemoryUse.of(compiled), None,
                         count_collectives(hlo))


def _dump(folder: str | Path | None, filename: str, text: Callable[[], str]) -> None:
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / filename).write_text(text())


def _model_summary(config: ModelConfig) -> dict[str, Any]:
    fields = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_layers",
              "num_layers", "hidden_size", "num_heads", "num_kv_heads")
    return dict(num_params=config.num_params(), **{f: getattr(config, f) for f in fields})
