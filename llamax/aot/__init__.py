"""Ahead-of-time compilation for TPU pod slices on any host (a CPU-only laptop or CI included).

  topology.py  slice names (v4-N, v5e-N, v5p-N, v6e-N) -> libtpu compile-only devices; the
               environment a host without TPU chips needs; per-chip HBM
  compile.py   compile_run: a run's sharded init, train step and eval step compiled for a slice;
               per-chip memory, compile time, collectives, the compiler's out-of-memory figures
  report.py    the report as a table with a verdict, and the settings that would make it fit

Needs libtpu (`pip install 'llamax[tpu]'`); `python -m experiments.compile` is the command line.
"""
from llamax.aot.compile import CompileReport, MemoryUse, OutOfMemory, ProgramReport, compile_run
from llamax.aot.report import Knob, format_report, memory_knobs
from llamax.aot.topology import Topology, compile_only_devices, configure_compile_only_host

__all__ = ["CompileReport", "Knob", "MemoryUse", "OutOfMemory", "ProgramReport", "Topology",
           "compile_only_devices", "compile_run", "configure_compile_only_host", "format_report",
           "memory_knobs"]
