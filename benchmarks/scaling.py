"""How llamax's train step cost grows with model size and sequence length (llamax only).

    python -m benchmarks.scaling [--steps 3] [--json PATH]

Rows: tiny -> bench -> bench x2 (twice the layers) at batch 4 x seq 512, then bench at seq
256 -> 2048 with batch x seq = 2048 tokens, with blocked (default) and dense causal attention.
Memory is XLA's compiled-memory analysis (arguments = params + Adam state + batch; temp = peak
scratch: activations kept for the backward pass and gradients).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.run import make_llamax_train, memory_analysis, random_batch
from llamax.config import get_preset
from llamax.train import flops_per_token


def measure(config, batch_size: int, seq_len: int, steps: int) -> dict:
    batch = random_batch(config.vocab_size, batch_size, seq_len)
    compile_s, step, compiled = make_llamax_train(config, batch)
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch_size * seq_len
    return dict(params_m=round(config.num_params() / 1e6, 1), batch=batch_size, seq_len=seq_len,
                attention_block_size=config.attention_block_size, compile_s=round(compile_s, 1),
                step_s=round(seconds, 3), tok_s=round(tokens / seconds, 1),
                gflops_s=round(tokens * flops_per_token(config, seq_len) / seconds / 1e9, 1),
                **memory_analysis(compiled))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    bench = get_preset("bench")
    cases = [("tiny", get_preset("tiny"), 4, 512), ("bench", bench, 4, 512),
             ("bench x2", bench.replace(num_layers=2 * bench.num_layers), 4, 512)]
    for seq_len in (256, 1024, 2048):
        cases.append(("bench", bench, 2048 // seq_len, seq_len))
    for seq_len in (512, 2048):
        cases.append(("bench dense", bench.replace(attention_block_size=0), 2048 // seq_len, seq_len))
    rows = []
    print(f"load {os.getloadavg()}")
    for name, config, batch_size, seq_len in cases:
        rows.append(dict(model=name, **measure(config, batch_size, seq_len, args.steps)))
        print(rows[-1], flush=True)
    print(f"load {os.getloadavg()}")
    print("| model | params | batch x seq | attention | step s | tokens/s | GFLOP/s | "
          "XLA args MiB | XLA temp MiB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        attention = f"blocks of {r['attention_block_size']}" if r["attention_block_size"] else "dense"
        print(f"| {r['model']} | {r['params_m']}M | {r['batch']} x {r['seq_len']} | {attention} | "
              f"{r['step_s']} | {r['tok_s']} | {r['gflops_s']} | {r.get('argument_mib')} | "
              f"{r.get('temp_mib')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
