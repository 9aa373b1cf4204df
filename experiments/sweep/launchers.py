"""Remote launchers: gcloud commands for TPU VMs, sbatch scripts for Slurm clusters."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from experiments.sweep.local import is_done
from experiments.sweep.points import Point, Sweep, format_command, run_dir, shell_quote, train_args


def _double_quoted(text: str) -> str:
    return '"' + re.sub(r'(["\\$`])', r"\\\1", text) + '"'


def tpu_command(sweep: Sweep, point: Point, root: str, tpu_name: str, zone: str,
                remote_dir: str = "~/llamax", project: str | None = None,
                python: str = "python3") -> list[str]:
    """The gcloud argv that runs `point` on every host of the TPU VM `tpu_name`."""
    remote = f"cd {remote_dir} && " + format_command(
        train_args(sweep, point, root, python, extra=["--distributed"]))
    args = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
    if project:
        args.append(f"--project={project}")
    return args + ["--worker=all", f"--command={remote}"]


def format_tpu_command(args: Sequence[str]) -> str:
    *head, command = args
    return format_command(head) + " --command=" + _double_quoted(command[len("--command="):])


def slurm_script(sweep: Sweep, point: Point, root: str, repo_dir: str, nodes: int = 1,
                 gpus_per_node: int = 8, partition: str | None = None, time_limit: str = "24:00:00",
                 port: int = 12345, python: str = "python3") -> str:
    """An sbatch script running `point` with one task per node (each sees its node's GPUs)."""
    directory = run_dir(root, point)
    options = [f"--job-name={point.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={gpus_per_node}", f"--time={time_limit}",
               f"--output={directory}/slurm-%j.log"]
    if partition:
        options.append(f"--partition={partition}")
    command = format_command(train_args(sweep, point, root, python))
    return "\n".join([
        "#!/bin/bash",
        f"# Sweep point {point.name} of {sweep.spec}; written by experiments.sweep --launcher slurm.",
        "# The run records its own outcome in its run directory; `--aggregate_only` reads it.",
        *[f"#SBATCH {option}" for option in options],
        "set -euo pipefail",
        f"cd {shell_quote(repo_dir)}",
        "# jax.distributed: the first node hosts the coordinator; one process per node.",
        'export LLAMAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
        f'| head -n 1):{port}"',
        'export LLAMAX_NUM_PROCESSES="$SLURM_NTASKS"',
        f"CMD=({command})",
        "# LLAMAX_PROCESS_ID differs per task, so it is set inside srun.",
        "srun --kill-on-bad-exit=1 bash -c 'LLAMAX_PROCESS_ID=$SLURM_PROCID exec \"$@\"' bash \"${CMD[@]}\"",
        "",
    ])


def write_slurm_scripts(sweep: Sweep, root: str, slurm_dir: str, **options: Any) -> list[Path]:
    """Writes <slurm_dir>/<point>.sbatch for each unfinished point, and submit_all.sh."""
    out = Path(slurm_dir)
    out.mkdir(parents=True, exist_ok=True)
    scripts = []
    for point in sweep.points:
        if is_done(root, point):
            continue
        Path(run_dir(root, point)).mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
        script = out / f"{point.name}.sbatch"
        script.write_text(slurm_script(sweep, point, root, **options))
        scripts.append(script)
    submit = out / "submit_all.sh"
    submit.write_text("#!/bin/bash\nset -euo pipefail\n" +
                      "".join(f"sbatch {shell_quote(str(s))}\n" for s in scripts))
    submit.chmod(0o755)
    return scripts
