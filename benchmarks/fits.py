"""What fits on which TPU slice: runs `python -m experiments.compile` (libtpu's compiler, no TPU).

    python -m benchmarks.fits fits [--presets llama3.2_1b ...] [--generations v5p v5e]
    python -m benchmarks.fits attention [--preset llama3.2_1b --topology v5e-16 --seq 8192]
    python -m benchmarks.fits remat [--preset llama3_8b --topology v5p-128 --seq 8192]

Every compile is the command-line tool in its own process (a model's gin file, pretrain.gin and
--gin bindings), so what is measured is exactly what a user runs. Common settings: bf16 compute,
fp32 master weights and Adam moments, one sequence per data-parallel rank (global batch = chips),
FSDP over the chips left after tensor parallelism (fsdp=-1; tensor 1 unless stated).

  fits       per preset and TPU generation, the smallest listed slice whose train step fits at
             seq 8192 with remat 'full' (then 4096, 2048 if none does), trying each --tensors
             size on a slice before the next; slices whose sharded state alone would fill HBM
             are skipped without compiling. Every attempt is kept in the JSON
  attention  the XLA attention path (query blocks unrolled: seq/128 per layer) against the
             splash kernel at one size: compile time and per-chip temp memory
  remat      every remat policy at one size: per-chip temp (HBM) and host_temp (offloaded)

Results go to benchmarks/tpu-<mode>.json (with the date, libtpu version and host) and print as a
markdown table for docs/tpu.md. Compiles of 8B+ models at seq 8192 take minutes each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import cpu_model

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("llama3.2_1b", "llama3.2_3b", "llama3_8b", "llama3_70b", "llama3.1_405b")
GIB = 2 ** 30


def gin_file(preset: str) -> str:
    return f"configs/models/{preset.replace('.', '_')}.gin"


def run_tool(preset: str, topology: str, seq: int, batch: int, remat: str = "full",
             attention: str = "splash", mesh: dict | None = None,
             programs: str = "train_step", timeout: int = 3600) -> dict:
    """One `experiments.compile` run; its JSON report plus exit status and wall time."""
    flags = {"config.ModelConfig.dtype": "'bfloat16'", "config.ModelConfig.remat_policy": f"'{remat}'",
             "config.ModelConfig.attention_impl": f"'{attention}'", "SEQ_LEN": seq, "BATCH_SIZE": batch,
             **{f"sharding.MeshConfig.{axis}": size for axis, size in (mesh or {"fsdp": -1}).items()}}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "experiments.compile", f"--gin_file={gin_file(preset)}",
                   "--gin_file=configs/runs/pretrain.gin", f"--topology={topology}",
                   f"--programs={programs}", f"--json={out}", *(f"--gin.{k}={v}" for k, v in flags.items())]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        wall = time.perf_counter() - start
        if result.returncode not in (0, 1) or not out.exists():
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-2000:]}")
        report = json.loads(out.read_text())
    print(f"  {preset} {topology} seq {seq} remat {remat} {attention}: "
          f"{'fits' if report['fits'] else 'does not fit'}, {wall:.0f} s", flush=True)
    return dict(report, wall_s=round(wall, 1), command=" ".join(command[1:]))


def _state_bytes(preset: str) -> int:
    """fp32 params + two fp32 Adam moments: what FSDP spreads over the chips."""
    from llamax.config import get_preset

    return 12 * get_preset(preset).num_params()


def search_fits(preset: str, generation: str, seqs=(8192, 4096, 2048), tensors=(1,)) -> tuple[dict | None, list]:
    """(the report of the smallest slice of `generation`, then the longest seq, whose train step
    fits with one of the `tensors` sizes, tried in order on each slice; every attempt)."""
    from llamax.aot.topology import GENERATIONS
    from llamax.config import get_preset

    spec, kv_heads = GENERATIONS[generation], get_preset(preset).num_kv_heads
    attempts = []
    for seq in seqs:
        for chips in sorted(spec.shapes):
            if chips < 4 or _state_bytes(preset) / chips > 0.9 * spec.hbm_bytes:
                continue  # the state alone would not fit: no compile needed to know
            for tensor in tensors:
                if kv_heads % tensor or chips % tensor:
                    continue
                report = run_tool(preset, f"{generation}-{chips * spec.cores_per_chip}", seq,
                                  batch=chips // tensor, mesh={"fsdp": -1, "tensor": tensor})
                oom = report["programs"]["train_step"]["out_of_memory"]
                attempts.append(dict(topology=report["topology"], seq=seq, tensor=tensor, fits=report["fits"],
                                     total_gib=_gib(report["per_device_bytes"]["total"]),
                                     compiler=oom["message"] if oom else None, wall_s=report["wall_s"]))
                if report["fits"]:
                    return report, attempts
    return None, attempts


def _row(report: dict) -> dict:
    memory = report["per_device_bytes"]
    mesh = ", ".join(f"{axis} {size}" for axis, size in report["mesh"].items() if size > 1)
    return dict(model=report.get("preset"), topology=report["topology"], mesh=mesh,
                seq=report["seq_len"], global_batch=report["global_batch"],
                remat=report["model"]["remat_policy"], attention=report["model"]["attention_impl"],
                fits=report["fits"], total_gib=_gib(memory["total"]), temp_gib=_gib(memory["temp"]),
                arguments_gib=_gib(memory["arguments"]), host_temp_gib=_gib(memory.get("host_temp")),
                hbm_gib=_gib(report["hbm_bytes_per_device"]), compile_s=report["compile_s"],
                wall_s=report["wall_s"], ideal_step_s=report["ideal_step_s"])


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("fits", "attention", "remat"))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--generations", nargs="+", default=["v5p", "v5e"])
    parser.add_argument("--preset")
    parser.add_argument("--topology")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--tensors", type=int, nargs="+", default=[1],
                        help="fits: tensor-parallel sizes to try on each slice, in order")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from llamax.aot.topology import Topology, libtpu_version

    load_at_start, started = os.getloadavg(), datetime.datetime.now().isoformat(timespec="minutes")
    rows = []
    if args.mode == "fits":
        for preset in args.presets:
            for generation in args.generations:
                report, attempts = search_fits(preset, generation, tensors=tuple(args.tensors))
                rows.append(dict(_row(report), model=preset, attempts=attempts) if report else
                            dict(model=preset, topology=f"no {generation} slice listed", fits=False,
                                 attempts=attempts))
        columns = ["model", "topology", "mesh", "seq", "global_batch", "remat", "attention", "total_gib",
                   "hbm_gib", "compile_s"]
    else:
        preset = args.preset or ("llama3.2_1b" if args.mode == "attention" else "llama3_8b")
        topology = Topology.parse(args.topology or ("v5e-16" if args.mode == "attention" else "v5p-128"))
        variants = ([dict(attention="xla"), dict(attention="splash")] if args.mode == "attention" else
                    [dict(remat=policy) for policy in ("full", "save_qkv_projections", "save_projections",
                                                      "dots_with_no_batch_dims", "offload_projections",
                                                      "offload_dots_with_no_batch_dims", "none")])
        for variant in variants:
            report = run_tool(preset, topology.name, args.seq, batch=topology.num_chips,
                              programs="train_step", **variant)
            rows.append(dict(_row(report), model=preset))
        columns = ["model", "topology", "seq", "attention", "remat", "fits", "arguments_gib",
                   "temp_gib", "host_temp_gib", "total_gib", "compile_s"]
    record = dict(mode=args.mode, started=started, libtpu=libtpu_version(), cpu=cpu_model(),
                  cores=os.cpu_count(), load_average_start=load_at_start,
                  load_average_end=os.getloadavg(), rows=rows)
    path = Path(args.json or REPO / "benchmarks" / f"tpu-{args.mode}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(rows, columns))


if __name__ == "__main__":
    main()
