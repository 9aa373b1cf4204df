"""Memory of sharded init: params and optimizer state are born sharded, never whole on a host.

    python -m benchmarks.init_memory [--json PATH] [--config bench] [--big llama3.2_1b]

Part 1 compiles `llamax.train.step.make_init` (jit with out_shardings) for FSDP over 1, 2, 4, 8
devices and prints XLA's per-device memory plan: output (this device's shard of the state) and
temp (scratch). Part 2 runs the init for real with fsdp=8 and compares the process's RSS growth
with the state's total bytes: a host-side copy of the full params would show up as growth above
1x the state. (On CPU all 8 devices live in this process, so 1x is the floor.)
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import psutil  # noqa: E402

from llamax.config import get_preset  # noqa: E402
from llamax.train.optim import OptimConfig  # noqa: E402
from llamax.sharding import MeshConfig, make_mesh  # noqa: E402
from llamax.train import init_train_state, make_init  # noqa: E402

MIB = 2**20


def compiled_plan(config_name: str, fsdp: int) -> dict:
    config = get_preset(config_name)
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1), jax.devices()[:fsdp])
    compiled = make_init(config, OptimConfig(), mesh).lower(jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    return {"config": config_name, "params_m": round(config.num_params() / 1e6, 1), "fsdp": fsdp,
            "state_mib_total": round(3 * config.num_params() * 4 / MIB, 1),  # params + 2 Adam moments, fp32
            "output_mib_per_device": round(memory.output_size_in_bytes / MIB, 1),
            "temp_mib_per_device": round(memory.temp_size_in_bytes / MIB, 1)}


def measured_rss(config_name: str) -> dict:
    config = get_preset(config_name)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    make_init(config, OptimConfig(), mesh).lower(jax.random.key(0)).compile()  # compile first
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    state = init_train_state(config, OptimConfig(), mesh, rng=0)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    grown = process.memory_info().rss - before
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    return {"config": config_name, "fsdp": 8, "state_mib": round(state_bytes / MIB, 1),
            "rss_growth_mib": round(grown / MIB, 1), "ratio": round(grown / state_bytes, 2),
            "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", help="preset initialized for real (part 2)")
    parser.add_argument("--big", default="llama3.2_1b", help="preset compiled only (part 1)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    plans = [compiled_plan(name, fsdp) for name in (args.config, args.big) for fsdp in (1, 2, 4, 8)]
    print("| config | params | fsdp | state (total) MiB | output MiB / device | temp MiB / device |")
    print("|---|---|---|---|---|---|")
    for p in plans:
        print(f"| {p['config']} | {p['params_m']}M | {p['fsdp']} | {p['state_mib_total']} | "
              f"{p['output_mib_per_device']} | {p['temp_mib_per_device']} |")
    rss = measured_rss(args.config)
    print(f"\nreal init of {rss['config']} on fsdp=8: state {rss['state_mib']} MiB, process RSS grew "
          f"{rss['rss_growth_mib']} MiB ({rss['ratio']}x the state) in {rss['seconds']} s")
    result = {"compiled": plans, "measured": rss}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
