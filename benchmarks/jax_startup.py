"""What installing libtpu (the `tpu` extra) costs a CPU-only process: JAX import and first device query.

    python -m benchmarks.jax_startup [--repeats 5] [--json PATH]

Each measurement is a fresh interpreter (this one's: run it once from a venv without libtpu and
once from one with it) timing `import jax`, the first `jax.devices()`, and counting the lines the
process wrote to stderr, for three setups: JAX_PLATFORMS unset, JAX_PLATFORMS=cpu (what
tests/conftest.py sets), and unset but calling `llamax.backends.use_cpu_without_accelerators()`
first, and unset but importing the `experiments` package first (what every CLI does). The
device-query column includes the setup line. Minimum over repeats.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.machine import cpu_model

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import time
start = time.perf_counter()
import jax
imported = time.perf_counter()
{setup}
devices = jax.devices()
done = time.perf_counter()
print(imported - start, done - imported, devices[0].platform)
"""
SETUPS = {
    "JAX_PLATFORMS unset": ({}, ""),
    "JAX_PLATFORMS=cpu": ({"JAX_PLATFORMS": "cpu"}, ""),
    "unset + use_cpu_without_accelerators()": (
        {}, "from llamax.backends import use_cpu_without_accelerators; use_cpu_without_accelerators()"),
    "unset + import experiments (any CLI)": ({}, "import experiments"),
}


def measure(setup: str, repeats: int) -> dict:
    extra_env, code = SETUPS[setup]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
    env.update(extra_env, PYTHONPATH=str(REPO))
    runs = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", PROBE.format(setup=code)], env=env,
                                capture_output=True, text=True, check=True, cwd=REPO)
        import_s, devices_s, platform = result.stdout.split()
        runs.append((float(import_s), float(devices_s), platform, len(result.stderr.strip().splitlines())))
    return dict(setup=setup, libtpu_installed=importlib.util.find_spec("libtpu") is not None,
                import_s=round(min(r[0] for r in runs), 3), first_devices_s=round(min(r[1] for r in runs), 3),
                platform=runs[0][2], stderr_lines=max(r[3] for r in runs), repeats=repeats)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    rows = [measure(setup, args.repeats) for setup in SETUPS]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        record = dict(rows=rows, cpu=cpu_model(), cores=os.cpu_count(), jax=_version("jax"),
                      libtpu=_version("libtpu"), load_average_start=load_start, load_average_end=os.getloadavg())
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
