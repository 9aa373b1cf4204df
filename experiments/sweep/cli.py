"""The sweep command line: validate, then run locally, print/run TPU commands or write Slurm
scripts, then aggregate the results."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from experiments.sweep import __doc__ as SWEEP_DOC
from experiments.sweep.launchers import format_tpu_command, slurm_script, tpu_command, write_slurm_scripts
from experiments.sweep.local import is_done, run_local
from experiments.sweep.points import Sweep, SweepError, format_command, load_sweep, shell_quote, train_args
from experiments.sweep.results import markdown_table, results_columns, write_results
from experiments.sweep.validate import validate
from experiments.sweep_spec import SweepSpecError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=SWEEP_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="sweep spec file, e.g. configs/sweeps/tiny_lr.py")
    parser.add_argument("--root", help="where the point run directories go "
                        "(default runs/sweeps/<spec name>)")
    parser.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--parallel", type=int, default=1, help="local: points run at once")
    parser.add_argument("--execute", action="store_true",
                        help="tpu: run the gcloud commands; slurm: submit the scripts with sbatch")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="only (re)write ROOT/results.{md,csv,png}")
    parser.add_argument("--python", help="interpreter in the commands "
                        "(default: this one for local, python3 for tpu/slurm)")
    tpu = parser.add_argument_group("tpu")
    tpu.add_argument("--tpu_name")
    tpu.add_argument("--zone")
    tpu.add_argument("--project")
    tpu.add_argument("--remote_dir", default="~/llamax", help="the llamax checkout on the TPU VMs")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus_per_node", type=int, default=8)
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--repo_dir", help="the llamax checkout on the cluster (default: cwd)")
    slurm.add_argument("--slurm_dir", help="where the sbatch scripts go (default ROOT/slurm)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    root = args.root or f"runs/sweeps/{Path(args.spec).stem}"
    try:
        sweep = validate(load_sweep(args.spec))
        print(f"[sweep] {args.spec}: {len(sweep.points)} points, bindings valid", file=sys.stderr)
        if args.aggregate_only:
            write_results(sweep, root)
            print(f"[sweep] wrote {root}/results.md, results.csv, results.png")
            return 0
        if args.launcher == "local":
            return _main_local(sweep, root, args, argv)
        if args.launcher == "tpu":
            return _main_tpu(sweep, root, args)
        return _main_slurm(sweep, root, args)
    except (SweepError, SweepSpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main_local(sweep: Sweep, root: str, args: argparse.Namespace, argv: list[str]) -> int:
    python = args.python or sys.executable
    if args.dry_run:
        for index, point in enumerate(sweep.points, 1):
            state = "done, would skip" if is_done(root, point) else "would run"
            print(f"# {point.name} ({index}/{len(sweep.points)}, {state})")
            print(format_command(train_args(sweep, point, root, python)))
        return 0
    try:
        run_local(sweep, root, args.parallel, python)
    except KeyboardInterrupt:
        return 130
    rows = write_results(sweep, root, command=format_command(
        ["python", "-m", "experiments.sweep", *argv]))
    print(markdown_table(rows, results_columns(sweep)))
    print(f"[sweep] wrote {root}/results.md, results.csv, results.png")
    failed = [row["point"] for row in rows if row["status"] != "completed"]
    if failed:
        print(f"[sweep] not completed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _main_tpu(sweep: Sweep, root: str, args: argparse.Namespace) -> int:
    if not args.tpu_name or not args.zone:
        raise SweepError("--launcher tpu needs --tpu_name and --zone")
    if "://" in root:
        raise SweepError(f"--root {root} is a URL; run directories are written with local file APIs, "
                         "so mount the bucket on every host (gcsfuse) and pass the mounted path")
    for point in sweep.points:
        command = tpu_command(sweep, point, root, args.tpu_name, args.zone, args.remote_dir,
                              args.project, args.python or "python3")
        print(f"# {point.name}")
        print(format_tpu_command(command))
        if args.execute and not args.dry_run:
            returncode = subprocess.run(command).returncode
            print(f"[sweep] {point.name}: exit {returncode}", file=sys.stderr)
    return 0


def _main_slurm(sweep: Sweep, root: str, args: argparse.Namespace) -> int:
    options = dict(repo_dir=args.repo_dir or os.getcwd(), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, partition=args.partition,
                   time_limit=args.time, python=args.python or "python3")
    if args.dry_run:
        for point in sweep.points:
            print(f"# ---- {point.name}.sbatch")
            print(slurm_script(sweep, point, root, **options))
        return 0
    scripts = write_slurm_scripts(sweep, root, args.slurm_dir or f"{root}/slurm", **options)
    for script in scripts:
        print(f"sbatch {shell_quote(str(script))}")
        if args.execute:
            subprocess.run(["sbatch", str(script)], check=True)
    return 0
