"""Score a checkpoint on lm-eval tasks: a table, a plot, and (for a run) its metrics.

    python -m experiments.lm_eval --checkpoint runs/tiny --tasks shakespeare [--limit 100]
        [--include_path configs/lm_eval] [--tokenizer PATH] [--num_fewshot K] [--batch_size 8]
        [--max_length N] [--max_gen_toks 256] [--dtype bfloat16] [--mesh fsdp|2x2x2|MESH.gin]
        [--step N] [--base PATH] [--output_dir DIR] [--log_samples]
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

--checkpoint: an HF or Meta folder, an orbax params checkpoint or a training run (its newest
checkpoint unless --step; a LoRA run is merged with its base). The tokenizer is the checkpoint's
own unless --tokenizer. --tasks: lm-eval task, group or tag names (e.g. shakespeare =
shakespeare_mc + shakespeare_qa + shakespeare_ppl from configs/lm_eval, the default include path).

Writes results.json (lm-eval's results), results.md (a markdown table) and scores.png (a bar
plot) into --output_dir (default: <run>/lm_eval/step_<N>/ for a run, else
lm_eval_results/<checkpoint name>/) and prints the table. For a run directory it then appends
the scores to the run's metrics.jsonl (and TensorBoard) through the training loop's logger:
{"step": N, "lm_eval/<task>/<metric>": value, ...}. Any error prints one line, exits 1 and
appends nothing. Installed as the `llamax-lm-eval` console script.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from experiments.cli import fail
from llamax.errors import LlamaxError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-lm-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run dir, orbax, HF or Meta folder")
    parser.add_argument("--tasks", required=True, nargs="+", help="lm-eval task/group/tag names (or a,b,c)")
    parser.add_argument("--include_path", nargs="*", default=None,
                        help="folders of extra task YAMLs (default: configs/lm_eval)")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (< 1: a fraction)")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None, help="default: the model's context")
    parser.add_argument("--max_gen_toks", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--mesh", default=None, help="dp | fsdp | fsdp_tp | DATAxFSDPxTENSOR | a mesh gin file")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run")
    parser.add_argument("--base", default=None, help="base weights of a LoRA run")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--log_samples", action="store_true", help="also write samples.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of generation tasks")
    for name in ("coordinator_address", "num_processes", "process_id"):
        parser.add_argument(f"--{name}", default=None)
    args = parser.parse_args(argv)
    args.tasks = [task for spec in args.tasks for task in spec.split(",") if task]
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def mesh_from_arg(mesh: str | None) -> Any:
    """A preset / DATAxFSDPxTENSOR string as is (the backend parses it), or the MeshConfig a mesh
    gin file (configs/meshes/*.gin) binds."""
    if mesh is None or not mesh.endswith(".gin"):
        return mesh
    import gin

    from experiments import gin_config
    from llamax.sharding import MeshConfig

    gin_config.parse([mesh], [], required=())
    return gin.get_configurable(MeshConfig)()


def evaluate(args: argparse.Namespace) -> tuple[dict | None, int | None]:
    """(lm-eval results on process 0 else None, the run step or None)."""
    from llamax.infer.lm_eval_backend import LlamaxLM
    from llamax.infer.lm_eval_tasks import run_tasks, task_manager

    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    manager = task_manager(args.tasks, args.include_path)  # unknown task names fail before loading
    lm = LlamaxLM(checkpoint=args.checkpoint, tokenizer=args.tokenizer, batch_size=args.batch_size,
                  max_length=args.max_length, dtype=args.dtype, mesh=mesh_from_arg(args.mesh),
                  step=args.step, base=args.base, max_gen_toks=args.max_gen_toks, seed=args.seed)
    results = run_tasks(lm, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                        log_samples=args.log_samples, manager=manager)
    return results, lm.step


def output_dir(args: argparse.Namespace, step: int | None) -> Path:
    from llamax.run_dir import RunDir

    if args.output_dir:
        return Path(args.output_dir)
    if step is not None:
        return RunDir(args.checkpoint).lm_eval_dir(step)
    return Path("lm_eval_results") / Path(args.checkpoint).resolve().name


def write_results(results: dict, folder: Path, title: str) -> dict[str, Path]:
    """results.json, results.md, scores.png (and samples.jsonl when logged), each written whole."""
    from lm_eval.utils import handle_non_serializable

    from llamax.files import atomic_write_text
    from llamax.infer.lm_eval_tasks import plot_scores, results_table

    folder.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    written = {"json": atomic_write_text(folder / "results.json", json.dumps(
        results, indent=2, default=handle_non_serializable, ensure_ascii=False)),
        "table": atomic_write_text(folder / "results.md", results_table(results, title))}
    if samples is not None:
        lines = [json.dumps({"task": task, **sample}, default=handle_non_serializable, ensure_ascii=False)
                 for task, task_samples in samples.items() for sample in task_samples]
        written["samples"] = atomic_write_text(folder / "samples.jsonl", "\n".join(lines) + "\n")
    staging = plot_scores(results, folder / f".scores.tmp-{os.getpid()}.png", title)
    written["plot"] = folder / "scores.png"
    os.replace(staging, written["plot"])
    return written


def log_to_run(run: str, step: int, results: dict) -> None:
    """Appends {"step", "lm_eval/<task>/<metric>": ...} to the run's metrics and TensorBoard."""
    from llamax.infer.lm_eval_tasks import flat_metrics
    from llamax.train.metrics import MetricsLogger

    logger = MetricsLogger(run, total_steps=step, start_step=step, progress_bar=False)
    try:
        logger.log(step, flat_metrics(results))
    finally:
        logger.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        from llamax.distributed import initialize_from_options

        initialize_from_options({k: getattr(args, k) for k in ("coordinator_address", "num_processes",
                                                               "process_id") if getattr(args, k)})
        results, step = evaluate(args)
    except (LlamaxError, OSError, KeyError, ValueError) as error:
        from llamax.distributed import report_failure  # several processes: the others stop too

        message = str(error).strip("'\"").splitlines()[0] if str(error) else ""
        return report_failure(f"llamax-lm-eval: error: {type(error).__name__}: {message}", 1)
    if results is None:  # processes other than 0: process 0 writes
        return 0
    from llamax.infer.lm_eval_tasks import results_table

    title = f"{args.checkpoint}" + (f" (step {step})" if step is not None else "")
    try:
        written = write_results(results, output_dir(args, step), title)
        if step is not None:  # a training run: the scores join its metrics
            log_to_run(args.checkpoint, step, results)
    except OSError as error:
        return fail(f"could not write the results: {error}", program="llamax-lm-eval")
    print(results_table(results, title), flush=True)
    print(json.dumps({name: str(path) for name, path in written.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
