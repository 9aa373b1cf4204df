"""Hyperparameter sweeps: one `experiments.train` run per point of a spec, then a results table.

    python -m experiments.sweep configs/sweeps/tiny_lr.py --root runs/sweeps/tiny_lr \
        [--dry_run] [--parallel K] [--launcher local|tpu|slurm] [--execute] [--aggregate_only]

A spec (see `experiments.sweep_spec`) names gin files and the axes of bindings; each point runs

    python -m experiments.train --gin_file=... --gin.X=V ... --gin.MODEL_DIR="'ROOT/<point name>'"

Before anything launches, every point's gin files and bindings are parsed with gin (nothing runs):
an unknown configurable/parameter, a macro no gin file defines, an empty axis or two points with
one name is an error naming it.

Launchers:
  local  (default) runs the points here, K at a time (`--parallel`), each point's output going to
         ROOT/<point>/sweep.log. A point whose run completed gets ROOT/<point>/DONE and is skipped
         next time; an unfinished or failed point is simply run again (train resumes from its
         newest checkpoint). A crash is recorded (ROOT/<point>/FAILED) and the sweep goes on.
         Points run K at a time from the start; what they share (the auto-trained tokenizer, the
         compilation cache) is written atomically.
         Afterwards ROOT/results.{md,csv,png} summarise every point.
  tpu    prints one `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."` per point
         (every host of the pod runs the same command with --distributed); `--execute` runs them
         one after another. ROOT must be a path every host can write, mounted locally (e.g. a
         gcsfuse mount of a bucket): run directories are written with local file APIs.
  slurm  writes ROOT/slurm/<point>.sbatch (one task per node, LLAMAX_* variables set for
         jax.distributed) and ROOT/slurm/submit_all.sh; `--execute` submits them with sbatch.
`--aggregate_only` (re)writes the results files from whatever the runs under ROOT hold, e.g. after
a Slurm sweep on a shared filesystem.

Modules:
  points.py     Sweep, Point, spec loading, the train command of a point
  validate.py   gin validation of every point (through experiments.gin_config)
  local.py      the local launcher: a process per point, K at a time, attempts recorded
  launchers.py  TPU (gcloud) and Slurm (sbatch) launchers
  results.py    status and numbers per point -> results.{md,csv,png}
  cli.py        the command line
A point's outcome is what its run recorded (`llamax.run_dir.RunDir.outcome`), never a line
matched in its output.
"""
from experiments.sweep.cli import main
from experiments.sweep.launchers import format_tpu_command, slurm_script, tpu_command, write_slurm_scripts
from experiments.sweep.local import is_done, run_local
from experiments.sweep.points import (Point, Sweep, SweepError, format_command, load_sweep, make_sweep,
                                      run_dir, shell_quote, train_args)
from experiments.sweep.results import collect_results, markdown_table, point_result, write_results
from experiments.sweep.validate import validate

__all__ = ["Point", "Sweep", "SweepError", "collect_results", "format_command", "format_tpu_command",
           "is_done", "load_sweep", "main", "make_sweep", "markdown_table", "point_result", "run_dir",
           "run_local", "shell_quote", "slurm_script", "tpu_command", "train_args", "validate",
           "write_results", "write_slurm_scripts"]
