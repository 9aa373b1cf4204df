"""Weight-only reduced precision (`llamax.model.quantize`): decode speed and the perplexity it costs.

    python -m benchmarks.weight_only [--checkpoint RUN_OR_HF_DIR ...] [--repeats 3] [--ppl_batches 8]
                                     [--ynn both|default|on] [--json PATH]

For weights float32, bfloat16 and int8 (per-output-channel scales):
  decode      greedy tokens/s of `llamax.infer.generate.generate` on the bench preset (random
              weights), prompt 32, 128 new tokens, batch 1 and 8; the three modes interleaved,
              median over repeats. generate compiles decode programs with XLA:CPU's YNNPACK
              fusions off (`decode_compiler_options`: Eigen dots); `--ynn both` repeats the
              decode rows in a child process with them on (the XLA default), to compare.
  perplexity  on the held-out Shakespeare plays: the bench model (random weights: its deltas only
              show the arithmetic works; tokenizer: the Shakespeare BPE of the bench vocab, 8192)
              and each `--checkpoint` (a trained run, e.g. `make demo`'s, or SmolLM2-135M), read
              through `experiments.eval` with `--weights`, its own tokenizer.
  formulation one lm_head-shaped matrix-vector product [1, 512] x [512, 8192] in a loop: float32
              dot; int8 widened once (what XLA does with `kernel.astype(f32)`: the convert is loop
              invariant and hoisted); int8 widened inside the loop (kept there by an
              optimization barrier); int8 multiply-and-reduce. Says what XLA:CPU can make of
              narrow weights.
  tpu         (when libtpu is installed) generate's decode program compiled by libtpu for one v5e
              chip, batch 8: argument and temp bytes per mode. A widened float32 copy of the
              kernels would show in temp; it does not (the loop's fusions read the int8 kernels).

Writes `benchmarks/results-weight-only-cpu-<date>.json` (or --json) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("float32", "bfloat16", "int8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="trained model(s) to evaluate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ppl_batches", type=int, default=8, help="validation batches (8 x 256 tokens)")
    parser.add_argument("--ynn", default="both", choices=("both", "default", "on"))
    parser.add_argument("--decode_only", action="store_true", help="(the child process of --ynn both)")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def bench_decode(batches: list[int], repeats: int, prompt_len: int = 32, new_tokens: int = 128) -> list[dict]:
    import jax
    import numpy as np

    from benchmarks.run import _interleaved
    from llamax.config import get_preset
    from llamax.infer.generate import generate
    from llamax.model.llama import init_params
    from llamax.model.quantize import quantize_weights, weight_bytes

    config = get_preset("bench")
    params = init_params(config, 0)
    weights = {mode: jax.device_put(quantize_weights(config, params, mode)) for mode in MODES}
    rows = []
    for batch in batches:
        prompts = np.random.RandomState(0).randint(3, config.vocab_size, (batch, prompt_len)).tolist()
        outputs, compile_s = {}, {}

        def runner(mode):
            def run():
                outputs[mode] = generate(config, weights[mode][0], prompts, new_tokens, quant=weights[mode][1])
            return run

        fns = {mode: runner(mode) for mode in MODES}
        for mode, fn in fns.items():
            start = time.perf_counter()
            fn()
            compile_s[mode] = time.perf_counter() - start
        medians = _interleaved(fns, repeats)
        for mode in MODES:
            rows.append(dict(weights=mode, batch=batch, tok_s=round(batch * new_tokens / medians[mode], 1),
                             first_call_s=round(compile_s[mode], 2), weight_mb=round(weight_bytes(*weights[mode]) / 1e6, 1),
                             same_tokens_as_float32=outputs[mode] == outputs["float32"]))
            print(f"decode b={batch} {mode}: {rows[-1]}", flush=True)
    return rows


def bench_perplexity(ppl_batches: int) -> list[dict]:
    """Perplexity of the bench preset (random weights) in each mode on the held-out plays."""
    import itertools

    from llamax.config import get_preset
    from llamax.data.corpus import shakespeare_passages, shakespeare_tokenizer
    from llamax.data.loader import LoaderConfig, make_loader
    from llamax.infer.evaluate import evaluate_perplexity
    from llamax.model.llama import init_params
    from llamax.model.quantize import quantize_weights
    from llamax.tokenizer import load_tokenizer

    config = get_preset("bench")
    params = init_params(config, 0)
    tokenizer = load_tokenizer(shakespeare_tokenizer(config.vocab_size))
    loader = make_loader(shakespeare_passages("validation", 2000), tokenizer, LoaderConfig(
        seq_len=256, global_batch_size=8, shuffle=False, num_epochs=1, fill_rows=True))
    batches = list(itertools.islice(loader, ppl_batches))
    rows = []
    for mode in MODES:
        quantized, quant = quantize_weights(config, params, mode)
        result = evaluate_perplexity(config, quantized, batches, quant=quant)
        rows.append(dict(model="bench (random init)", weights=mode, perplexity=result["perplexity"],
                         loss=result["loss"], tokens=result["tokens"]))
        print(f"perplexity bench {mode}: {rows[-1]}", flush=True)
    return rows


def checkpoint_perplexity(checkpoint: str, ppl_batches: int) -> list[dict]:
    """`experiments.eval --weights MODE` of a checkpoint, each mode."""
    from experiments import eval as eval_cli

    rows = []
    for mode in MODES:
        args = eval_cli.parse_args(["--checkpoint", checkpoint, "--weights", mode,
                                    "--max_batches", str(ppl_batches)])
        record = eval_cli.evaluate_checkpoint(args)
        rows.append(dict(model=checkpoint, weights=mode, perplexity=record["perplexity"],
                         loss=record["loss"], tokens=record["tokens"]))
        print(f"perplexity {checkpoint} {mode}: {rows[-1]}", flush=True)
    return rows


def bench_formulations(steps: int = 200, repeats: int = 5) -> dict[str, float]:
    """Microseconds per [1, 512] x [512, 8192] product inside a fori_loop, per formulation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.run import _interleaved
    from llamax.infer.generate import decode_compiler_options

    rng = np.random.RandomState(0)
    kernel32 = jnp.asarray(rng.randn(512, 8192).astype(np.float32))
    kernel8 = jnp.asarray(rng.randint(-127, 128, (512, 8192)).astype(np.int8))
    x0 = jnp.asarray(rng.randn(1, 512).astype(np.float32))

    def widened_in_loop(x, kernel):
        kernel, x = jax.lax.optimization_barrier((kernel, x))  # not loop invariant: not hoisted
        return x @ kernel.astype(jnp.float32)

    def multiply_reduce(x, kernel):
        kernel, x = jax.lax.optimization_barrier((kernel, x))
        return jnp.sum(x[:, :, None] * kernel.astype(jnp.float32)[None], axis=1)

    cases = {"float32 dot": (lambda x, k: x @ k, kernel32),
             "int8 widened once (hoisted)": (lambda x, k: x @ k.astype(jnp.float32), kernel8),
             "int8 widened every step": (widened_in_loop, kernel8),
             "int8 multiply-reduce": (multiply_reduce, kernel8)}

    def looped(product, kernel):
        run = jax.jit(lambda k, x: jax.lax.fori_loop(  # compiled as generate compiles decode loops
            0, steps, lambda i, x: x + 1e-6 * product(x, k)[:, :512], x), compiler_options=decode_compiler_options())
        run(kernel, x0).block_until_ready()
        return lambda: run(kernel, x0).block_until_ready()

    seconds = _interleaved({name: looped(*case) for name, case in cases.items()}, repeats)
    return {name: round(s / steps * 1e6, 1) for name, s in seconds.items()}


def tpu_decode_memory(batch: int = 8, prompt_len: int = 32, new_tokens: int = 128) -> dict[str, dict] | None:
    """{mode: {argument_mb, temp_mb}} of generate's decode program compiled for a v5e chip, or
    None without libtpu."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return None
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from llamax.aot.topology import Topology, compile_only_devices
    from llamax.config import get_preset
    from llamax.infer import generate as gen
    from llamax.model.llama import init_params
    from llamax.model.quantize import quantize_weights
    from llamax.sharding import LOGICAL_AXIS_RULES

    devices = compile_only_devices(Topology.parse("v5e-1"))
    mesh = Mesh(np.array(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    replicated = NamedSharding(mesh, PartitionSpec())
    rules = tuple(tuple(rule) for rule in LOGICAL_AXIS_RULES)
    config = get_preset("bench")
    params = init_params(config, 0)
    result = {}
    for mode in MODES:
        quantized, quant = quantize_weights(config, params, mode)
        # generate's own argument preparation, on the host; then abstract copies on the TPU mesh
        sampler, _, _, dynamic, _ = gen._prepare(config, quantized, [[1] * prompt_len] * batch, new_tokens,
                                                 0.0, None, None, 0, None, (), None, None, quant)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated),
                                dynamic)
        with gen.sharding_context(mesh, rules):
            compiled = gen._compiled_generate(config, sampler, new_tokens, mesh, rules).lower(*abstract).compile()
        memory = compiled.memory_analysis()
        result[mode] = dict(argument_mb=round(memory.argument_size_in_bytes / 1e6, 1),
                            temp_mb=round(memory.temp_size_in_bytes / 1e6, 1))
        print(f"tpu v5e decode program {mode}: {result[mode]}", flush=True)
    return result


def format_table(results: dict) -> str:
    lines = [f"CPU: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
             f"load {results['machine']['load_avg']}", "",
             f"{'weights':<10}{'MB':>8}" + "".join(f"{'b=' + str(b) + ' ' + ynn:>16}"
                                                   for ynn in results["decode"] for b in results["batches"])]
    for mode in MODES:
        cells = [row for ynn in results["decode"] for row in results["decode"][ynn] if row["weights"] == mode]
        lines.append(f"{mode:<10}{cells[0]['weight_mb']:>8}" + "".join(f"{row['tok_s']:>16}" for row in cells))
    lines += ["", f"{'model':<48}{'float32':>10}{'bfloat16':>10}{'int8':>10}"]
    for model in dict.fromkeys(row["model"] for row in results["perplexity"]):
        values = {row["weights"]: row["perplexity"] for row in results["perplexity"] if row["model"] == model}
        lines.append(f"{model[-48:]:<48}" + "".join(f"{values[m]:>10.3f}" for m in MODES))
    lines += ["", "formulation (us per [1,512]x[512,8192] product in a loop):"]
    lines += [f"  {name:<30}{us:>8}" for name, us in results["formulation"].items()]
    if results.get("tpu"):
        lines += ["", "TPU v5e decode program (libtpu AOT, batch 8): MB of arguments / temp"]
        lines += [f"  {mode:<10}{row['argument_mb']:>8} / {row['temp_mb']}" for mode, row in results["tpu"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from benchmarks.run import machine_info
    from llamax.infer import generate as gen

    if args.ynn == "on":  # XLA's default compiler options for the decode programs too
        gen.decode_compiler_options = lambda *args, **kwargs: None

    if args.decode_only:
        print(json.dumps(bench_decode(args.batches, args.repeats)), flush=True)
        return {}
    results: dict[str, Any] = dict(machine=machine_info(), batches=args.batches, decode={})
    results["decode"]["ynn on" if args.ynn == "on" else "ynn off"] = bench_decode(args.batches, args.repeats)
    if args.ynn == "both":
        child = subprocess.run([sys.executable, "-m", "benchmarks.weight_only", "--ynn", "on", "--decode_only",
                                "--repeats", str(args.repeats), "--batches", *map(str, args.batches)],
                               capture_output=True, text=True, check=True)
        results["decode"]["ynn on"] = json.loads(child.stdout.strip().splitlines()[-1])
    results["formulation"] = bench_formulations()
    results["tpu"] = tpu_decode_memory()
    results["perplexity"] = bench_perplexity(args.ppl_batches)
    for checkpoint in args.checkpoint:
        results["perplexity"] += checkpoint_perplexity(checkpoint, args.ppl_batches)
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(args.json or Path(__file__).parent / f"results-weight-only-cpu-{datetime.date.today()}.json")
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
