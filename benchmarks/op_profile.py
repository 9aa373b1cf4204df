"""Where a train step's time goes, op class by op class: llamax (XLA:CPU) next to PyTorch.

    python -m benchmarks.op_profile [--config bench] [--batch 4] [--seq_len 512] [--steps 3]
                                    [--json PATH]

Runs `benchmarks.run`'s two train steps (same weights, batch and AdamW recipe) a few times
each under a profiler: `jax.profiler` for llamax, whose events are XLA's thunks, named after
the HLO instructions of the compiled step, and `torch.profiler` for the PyTorch peer, whose
events are aten ops (self time). Both are summed per op class:

  matmul                 dots (XLA: dot, or a fusion around one, e.g. YNNPACK's; aten mm/bmm/...)
  attention softmax      (torch: softmax and its backward; XLA fuses them into `reductions`)
  scan buffers           XLA only: zero-filling the stacked per-layer residuals of `nn.scan`
                         (`wrapped_broadcast`) and writing/reading them (dynamic(-update)-slice)
  layout copies          copies and transposes (XLA: copy/transpose fusions; aten copy_/clone)
  reductions             fusions that reduce: softmax, RMSNorm, the loss, the gradient norm
  elementwise            every other fusion / pointwise aten op (SiLU, residual adds, AdamW...)
  optimizer              torch only: AdamW's foreach kernels (XLA fuses AdamW into elementwise)
  other                  loops, gathers, scatters, everything else

XLA runs independent thunks on two threads at once, so its op times can add up to more than
the wall time of a step; both columns are per step. The step's page-fault count and system time
(`getrusage`) are reported too: XLA:CPU's fresh temporaries were the largest non-matmul cost
before `llamax.backends.retain_freed_host_memory` (docs/performance.md).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import resource
import tempfile
import time
from typing import Any

import jax

from benchmarks.run import (_hf_model, _params_from_hf, machine_info, make_llamax_train,
                            make_torch_train, random_batch)
from llamax.backends import retain_freed_host_memory
from llamax.config import get_preset

CLASSES = ("matmul", "attention softmax", "scan buffers", "layout copies", "reductions",
           "elementwise", "optimizer", "other")


# ---- XLA: instruction name -> op class -------------------------------------------------------

def hlo_classes(hlo_text: str) -> dict[str, str]:
    """Op class of every instruction of a compiled module, from its opcode and, for a fusion,
    the opcodes inside the computation it calls."""
    computations: dict[str, set[str]] = collections.defaultdict(set)
    instructions: dict[str, tuple[str, str]] = {}  # name -> (opcode, called computation)
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(1)
            continue
        match = re.match(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\(", line)
        if not match or current is None:
            continue
        name, opcode = match.groups()
        computations[current].add(opcode)
        called = re.search(r"calls=%([\w.-]+)", line)
        target = re.search(r'custom_call_target="([\w.-]+)"', line)
        if target and target.group(1) in KERNEL_CLASSES:  # llamax's CPU kernels: by what they do
            opcode = target.group(1)
        instructions[name] = (opcode, called.group(1) if called else "")
    return {name: _classify(name, opcode, computations.get(called, set()))
            for name, (opcode, called) in instructions.items()}


# llamax's C++ CPU kernels (custom calls) -> op class; torch's scaled_dot_product_attention
# (matmuls included) is its "attention softmax" too
KERNEL_CLASSES = {"llamax_train_attention_fwd": "attention softmax", "llamax_train_attention_bwd": "attention softmax",
                  "llamax_adamw": "optimizer"}


def _classify(name: str, opcode: str, inside: set[str]) -> str:
    if opcode in KERNEL_CLASSES:
        return KERNEL_CLASSES[opcode]
    if opcode in ("dot", "convolution") or inside & {"dot", "convolution"}:
        return "matmul"  # YNNPACK/oneDNN fusions around a dot too (their other ones: by contents)
    if name.startswith("wrapped_broadcast") or inside & {"dynamic-update-slice", "dynamic-slice"} \
            or opcode in ("dynamic-update-slice", "dynamic-slice"):
        return "scan buffers"
    if opcode in ("copy", "transpose") or (opcode == "fusion" and re.match(r"(\w+_)?(copy|transpose)", name)
                                           and not inside & {"reduce"}):
        return "layout copies"
    if opcode == "reduce" or "reduce" in inside:
        return "reductions"
    if opcode == "fusion":
        return "elementwise"
    return "other"


def xla_op_times(trace_dir: str, classes: dict[str, str]) -> dict[str, float]:
    """Seconds per op class summed over a trace's events named after the module's instructions,
    on whichever thread ran them: XLA:CPU's worker threads mostly, the calling thread for a
    program too small to hand out."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    totals: dict[str, float] = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            if line.name == "python":  # Python-level frames, never an XLA instruction
                continue
            for event in line.events:
                if event.name in classes:
                    totals[classes[event.name]] += event.duration_ns / 1e9
    return dict(totals)


# ---- torch: aten op -> op class ---------------------------------------------------------------

TORCH_CLASSES = [
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$"),
    ("attention softmax", r"aten::(_softmax|_softmax_backward_data|_scaled_dot_product\w*)$"),
    ("layout copies", r"aten::(copy_|clone|contiguous|_to_copy|cat|t|transpose|reshape|view)$"),
    ("optimizer", r"aten::_foreach_\w+|Optimizer\.|aten::(addcdiv_|addcmul_|lerp_)$"),
    ("reductions", r"aten::(sum|mean|norm|linalg_vector_norm|_log_softmax\w*|nll_loss\w*|max|amax)$"),
    ("elementwise", r"aten::(mul|add|sub|div|pow|rsqrt|silu\w*|neg|sigmoid\w*|exp|cos|sin|where|"
                    r"mul_|add_|div_|sub_|fill_|zero_|zeros|ones|embedding\w*|index\w*|clamp\w*)$"),
]


def torch_class(name: str) -> str:
    for op_class, pattern in TORCH_CLASSES:
        if re.match(pattern, name):
            return op_class
    return "other"


def torch_op_times(step, steps: int) -> dict[str, float]:
    """Seconds per op class (aten self CPU time) over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("Optimizer."):
            totals[torch_class(event.key)] += event.self_cpu_time_total / 1e6
    return dict(totals)


# ---- the run -----------------------------------------------------------------------------------

def _timed(step, steps: int) -> dict[str, float]:
    """Wall seconds, minor page faults and system seconds per step (means over `steps`)."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return dict(step_s=(time.perf_counter() - start) / steps,
                page_faults=(after.ru_minflt - before.ru_minflt) / steps,
                system_s=(after.ru_stime - before.ru_stime) / steps)


def profile_train(config_name: str, batch_size: int, seq_len: int, steps: int) -> dict[str, Any]:
    config = get_preset(config_name)
    batch = random_batch(config.vocab_size, batch_size, seq_len)
    hf_model = _hf_model(config)
    _, llamax_step, compiled = make_llamax_train(config, batch, _params_from_hf(config, hf_model))
    torch_step = make_torch_train(hf_model, batch)
    for step in (llamax_step, torch_step):  # warm-up: first-step allocations are not steady state
        step(), step()
    result: dict[str, Any] = {"llamax": _timed(llamax_step, steps), "torch": _timed(torch_step, steps)}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            llamax_step()
        jax.profiler.stop_trace()
        llamax_ops = xla_op_times(trace_dir, hlo_classes(compiled.as_text()))
    torch_ops = torch_op_times(torch_step, steps)
    for name, ops in (("llamax", llamax_ops), ("torch", torch_ops)):
        # Microseconds: a tiny model's op classes take well under 0.1 ms per step.
        result[name]["op_s"] = {op_class: round(ops.get(op_class, 0.0) / steps, 6) for op_class in CLASSES}
        result[name]["op_total_s"] = round(sum(ops.values()) / steps, 6)
        result[name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in result[name].items()}
    return result


def format_table(results: dict) -> str:
    m, llamax, torch_ = results["machine"], results["llamax"], results["torch"]
    lines = [f"{m['date']}  {m['cpu']}  {m['cores']} cores  load {m['load_avg']}  "
             f"host memory retained: {m['host_memory_retained']}",
             f"{results['config']} preset, batch {results['batch']} x seq {results['seq_len']}, "
             f"fp32, {results['steps']} profiled steps; ms per step", "",
             f"{'op class':<20}{'llamax':>10}{'torch':>10}{'difference':>12}"]
    for op_class in CLASSES:
        a, b = llamax["op_s"][op_class] * 1e3, torch_["op_s"][op_class] * 1e3
        lines.append(f"{op_class:<20}{a:>10.0f}{b:>10.0f}{a - b:>+12.0f}")
    lines += [f"{'sum of op times':<20}{llamax['op_total_s'] * 1e3:>10.0f}{torch_['op_total_s'] * 1e3:>10.0f}",
              f"{'wall time of a step':<20}{llamax['step_s'] * 1e3:>10.0f}{torch_['step_s'] * 1e3:>10.0f}",
              f"{'page faults / step':<20}{llamax['page_faults']:>10.0f}{torch_['page_faults']:>10.0f}",
              f"{'system time (ms)':<20}{llamax['system_s'] * 1e3:>10.0f}{torch_['system_s'] * 1e3:>10.0f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--keep_freed_memory", choices=("yes", "no"), default="yes",
                        help="retain_freed_host_memory as the train CLI does (default yes)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    retained = retain_freed_host_memory() if args.keep_freed_memory == "yes" else False
    results = dict(machine=dict(machine_info(), host_memory_retained=retained), config=args.config,
                   batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                   **profile_train(args.config, args.batch, args.seq_len, args.steps))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
