"""Greedy decode throughput: llamax `generate` vs transformers `generate` on the same weights.

    python -m benchmarks.decode [--presets tiny bench] [--batches 1 8] [--json out.json]

Both decode `--new_tokens` tokens after a `--prompt_len`-token random prompt, greedily, with no
eos (every row runs to the end). llamax's first call (tracing + XLA compile + one run) is
reported separately as compile time; throughput is the median of `--repeats` timed runs of each.
The last column says whether both produced the same tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamax.config import get_preset
from llamax.convert import hf_to_params
from llamax.infer.generate import generate


def _timed(fn, repeats: int) -> tuple[float, list]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_one(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """One table row: both implementations on one preset and batch size."""
    config = get_preset(preset)
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(**config.to_hf())).eval()
    hf_model.generation_config.eos_token_id = None  # decode the full length, like llamax below
    hf_model.generation_config.pad_token_id = 0
    params = hf_to_params(config, {k: v.numpy() for k, v in hf_model.state_dict().items()})
    params = jax.device_put(params)  # once, not per call
    prompts = np.random.RandomState(0).randint(3, config.vocab_size, (batch, prompt_len))

    run_llamax = lambda: generate(config, params, prompts.tolist(), new_tokens)  # noqa: E731
    start = time.perf_counter()
    run_llamax()
    first_call = time.perf_counter() - start
    llamax_s, ours = _timed(run_llamax, repeats)

    inputs = torch.as_tensor(prompts)
    mask = torch.ones_like(inputs)

    def run_hf():
        with torch.no_grad():
            out = hf_model.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
        return out[:, prompt_len:].tolist()

    run_hf()  # warm-up
    hf_s, theirs = _timed(run_hf, repeats)
    generated = batch * new_tokens
    return dict(preset=preset, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                llamax_compile_s=round(first_call - llamax_s, 3),
                llamax_tokens_per_s=round(generated / llamax_s, 1),
                hf_tokens_per_s=round(generated / hf_s, 1),
                speedup=round(hf_s / llamax_s, 2), same_tokens=ours == theirs)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows = [bench_one(preset, batch, args.prompt_len, args.new_tokens, args.repeats)
            for preset in args.presets for batch in args.batches]
    header = f"{'preset':<8}{'batch':>6}{'compile s':>11}{'llamax tok/s':>14}{'HF tok/s':>11}{'ratio':>8}  same"
    print(f"greedy decode, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, {jax.default_backend()} ({jax.device_count()} devices), "
          f"torch threads {torch.get_num_threads()}")
    print(header)
    for r in rows:
        print(f"{r['preset']:<8}{r['batch']:>6}{r['llamax_compile_s']:>11.2f}"
              f"{r['llamax_tokens_per_s']:>14.1f}{r['hf_tokens_per_s']:>11.1f}"
              f"{r['speedup']:>7.1f}x  {r['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
