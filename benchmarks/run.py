"""Side-by-side performance suite: llamax vs PyTorch/transformers on the same machine, in one run.

    python -m benchmarks.run [--json PATH] [--quick] [--config bench] [--batch 4] [--seq_len 512]
                             [--dtype float32] [--steps 7] [--gpu]

Measures, interleaving llamax and its peer so that a background load slows both alike:
  peak    fp32 matmul GFLOP/s of this machine, in jax and in torch (the max is the MFU peak);
  memory  read bandwidth (GB/s) of a STREAM-like read of 256 MB by jax (a sum), torch (a sum) and
          llamax's CPU decode kernel (their threads), and of as many bytes as a batch-1 decode
          step reads (`step_sized`: what a cache holding part of the weights allows); decode rows
          report their tok/s as a fraction of bandwidth / bytes read per step, for both;
  train   tokens/s of one optimizer step: `llamax.train.step.make_train_step` on a 1-device mesh vs
          `transformers.LlamaForCausalLM` + `torch.optim.AdamW` on the same weights and batch;
  decode  greedy tokens/s of `llamax.infer.generate.generate` vs `transformers` `generate`, batch 1 and 8.
  maxtext (with `--maxtext_python PATH`) MaxText's train step on the same shapes, from its own
          virtualenv, right after the train section (`benchmarks.maxtext`: install and recipe).

Every number is the median over repeats; compile time is reported apart from step time. `--gpu`
skips the torch CPU peer and uses the device's tabulated bf16 peak (`llamax.train.step`) for MFU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import cpu_model
from llamax.backends import retain_freed_host_memory
from llamax.config import get_preset
from llamax.convert import hf_to_params
from llamax.train.optim import OptimConfig
from llamax.sharding import MeshConfig, make_mesh
from llamax.train import flops_per_token, init_train_state, make_train_step, peak_flops_per_device

# The recipe both sides run: AdamW (b2 0.95, wd 0.1) after global-norm clipping to 1.0.
OPTIM = OptimConfig(learning_rate=1e-4, warmup_steps=0, decay="constant", clip_norm=1.0)
TRAIN_WARMUP_STEPS = 3  # untimed steps of each side before the timed ones


# ---- machine ------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU model, core count, load averages, library versions and the date, for the record."""
    import torch
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=cpu_model(),
                cores=os.cpu_count(), load_avg=[round(x, 2) for x in os.getloadavg()],
                jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
                jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads())


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                 reduce: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median (or `reduce`) seconds of each fn, called round-robin so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: reduce(ts) for name, ts in times.items()}


def matmul_peak(size: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Measured fp32 matmul GFLOP/s of [size, size] @ [size, size] in jax and torch: the best
    of `repeats` (a peak is what the machine can do; the fastest run is the least disturbed)."""
    import torch
    a = np.random.RandomState(0).standard_normal((size, size)).astype(np.float32)
    a_jax = jax.device_put(a)
    mm = jax.jit(lambda x: x @ x)
    mm(a_jax).block_until_ready()
    a_torch = torch.from_numpy(a)
    torch.mm(a_torch, a_torch)
    medians = _interleaved({"jax": lambda: mm(a_jax).block_until_ready(),
                            "torch": lambda: torch.mm(a_torch, a_torch)}, repeats, min)
    flops = 2.0 * size ** 3
    result = {f"{name}_gflops": round(flops / s / 1e9, 1) for name, s in medians.items()}
    result["peak_gflops"] = max(result.values())
    return result


def memory_bandwidth(megabytes: int = 256, repeats: int = 7) -> dict[str, float]:
    """Measured read bandwidth in GB/s: one read of a `megabytes` fp32 array by jax (a jitted
    sum), torch (a sum) and, where built, llamax's CPU decode kernel (a one-row product with the
    array as its weight matrix), each with its own threads as their decode loops run; the best
    of `repeats`, and `bandwidth_gb_s` the best reader. A CPU's last-level cache can hold part
    of an array read again and again: on the Intel Xeon of 2026-12-06 the decode kernel read
    128 MB at 38-45 GB/s, 256 MB and 1 GB at 31 (jax's and torch's sums: 26-29 at all three)."""
    import torch
    from llamax.model import decode_kernels
    array = np.ones((megabytes << 20) // 4, np.float32)
    array_jax = jax.device_put(array)
    total = jax.jit(jnp.sum)
    total(array_jax).block_until_ready()
    array_torch = torch.from_numpy(array)
    readers = {"jax": lambda: total(array_jax).block_until_ready(), "torch": lambda: torch.sum(array_torch)}
    if decode_kernels.available():
        matrix = array_jax.reshape(512, -1)  # [inputs, outputs]: every element read once
        row = jnp.ones((1, 512), jnp.float32)
        product = jax.jit(decode_kernels.thin_matmul)
        product(row, matrix).block_until_ready()
        readers["llamax_kernel"] = lambda: product(row, matrix).block_until_ready()
    # One reader at a time, not round-robin: torch's threads spin for a while after a call, and
    # a reader run right after torch.sum got 15 GB/s where alone it gets 31-38.
    best = {name: _interleaved({name: read}, repeats, min)[name] for name, read in readers.items()}
    result = {f"{name}_gb_s": round(array.nbytes / s / 1e9, 1) for name, s in best.items()}
    result["bandwidth_gb_s"] = max(result.values())
    result["megabytes"] = megabytes
    return result


def decode_bytes_per_step(config, batch: int, cache_length: int) -> int:
    """Bytes one decode step must read from memory: every weight once (the embedding table only
    for its looked-up rows, unless it is also the output layer) and each row's whole KV cache
    (`generate` attends over its preallocated `cache_length` slots)."""
    weight_bytes = jnp.dtype(config.weight_dtype).itemsize
    table = config.vocab_size * config.hidden_size
    weights = config.num_params() - (0 if config.tie_word_embeddings else table)
    looked_up = batch * config.hidden_size
    cache = 2 * config.num_layers * cache_length * config.num_kv_heads * config.head_dim
    return (weights + looked_up) * weight_bytes + batch * cache * jnp.dtype(config.compute_dtype).itemsize


# ---- train --------------------------------------------------------------------------------

def _hf_model(config, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config.to_hf()))


def _params_from_hf(config, hf_model) -> Any:
    return hf_to_params(config, {k: v.detach().numpy() for k, v in hf_model.state_dict().items()})


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Next-token batch of random tokens: targets = tokens shifted by one, all scored."""
    stream = np.random.RandomState(seed).randint(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return dict(tokens=stream[:, :-1], targets=stream[:, 1:],
                loss_mask=np.ones((batch, seq_len), np.float32))


def make_llamax_train(config, batch: dict, params: Any | None = None):
    """(compile_s, step_fn, compiled): llamax's train step on a 1-device mesh, compiled ahead of
    time. step_fn runs one step and blocks on its loss; the donated state lives in the closure."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    state = init_train_state(config, OPTIM, mesh)
    if params is not None:
        state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                                                          state.params)))
    step = make_train_step(config, OPTIM, mesh)
    device_batch = jax.device_put(batch)
    start = time.perf_counter()
    compiled = step.jitted.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run() -> float:
        holder["state"], metrics = compiled(holder["state"], device_batch)
        return float(metrics["loss"])  # blocks

    return compile_s, run, compiled


def make_torch_train(hf_model, batch: dict):
    """step_fn of the PyTorch peer: forward, token cross-entropy, backward, clip, AdamW."""
    import torch
    hf_model.train()
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=OPTIM.learning_rate,
                                  betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                                  weight_decay=OPTIM.weight_decay)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)

    def run() -> float:
        logits = hf_model(tokens).logits  # [batch, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), OPTIM.clip_norm)
        optimizer.step()
        return float(loss.detach())

    return run


def memory_analysis(compiled) -> dict[str, float]:
    """MiB of arguments/outputs/temporaries of a compiled executable (XLA's own estimate)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if analysis is None:
        return {}
    mib = 1 << 20
    return dict(argument_mib=round(analysis.argument_size_in_bytes / mib, 1),
                output_mib=round(analysis.output_size_in_bytes / mib, 1),
                temp_mib=round(analysis.temp_size_in_bytes / mib, 1))


def bench_train(config, batch_size: int, seq_len: int, steps: int, peak_gflops: float | None,
                with_torch: bool = True) -> dict[str, Any]:
    """llamax vs torch train-step tokens/s on the same weights and batch (interleaved)."""
    batch = random_batch(config.vocab_size, batch_size, seq_len)
    hf_model = _hf_model(config) if with_torch else None
    params = _params_from_hf(config, hf_model) if with_torch else None
    compile_s, llamax_step, compiled = make_llamax_train(config, batch, params)
    fns = {"llamax": llamax_step}
    first_loss = {"llamax": llamax_step()}
    if with_torch:
        fns["torch"] = make_torch_train(hf_model, batch)
        first_loss["torch"] = fns["torch"]()
    # Warm-up: both sides' first steps grow the (kept, see _train_in_child) malloc heap to its
    # working size; until it stops growing, a step pays for fresh pages (measured on an Intel Xeon:
    # llamax steps 2-3 faulted 120,000-185,000 pages, +0.3-1.2 s each, torch's none).
    _interleaved(fns, TRAIN_WARMUP_STEPS - 1)
    medians = _interleaved(fns, steps)
    tokens = batch_size * seq_len
    flops = flops_per_token(config, seq_len)
    result = dict(batch=batch_size, seq_len=seq_len, steps=steps, compile_s=round(compile_s, 2),
                  flops_per_token=flops, llamax_step_s=round(medians["llamax"], 4),
                  llamax_tok_s=round(tokens / medians["llamax"], 1),
                  first_loss={k: round(v, 4) for k, v in first_loss.items()},
                  **memory_analysis(compiled))
    if peak_gflops:
        result["mfu"] = round(tokens / medians["llamax"] * flops / (peak_gflops * 1e9), 4)
    if with_torch:
        result.update(torch_step_s=round(medians["torch"], 4),
                      torch_tok_s=round(tokens / medians["torch"], 1),
                      ratio=round(medians["torch"] / medians["llamax"], 3))
        if peak_gflops:
            result["torch_mfu"] = round(tokens / medians["torch"] * flops / (peak_gflops * 1e9), 4)
    return result


# ---- decode -------------------------------------------------------------------------------

def bench_decode(config, batch_size: int, prompt_len: int, new_tokens: int, repeats: int,
                 with_hf: bool = True, bandwidth_gb_s: float | None = None,
                 step_sized_gb_s: float | None = None) -> dict[str, Any]:
    """Greedy decode tokens/s of llamax `generate` vs HF `generate` (interleaved), same weights.

    Mirrors `benchmarks/decode.py` (which times the two one after the other) and adds
    interleaving; `same_tokens` says whether both produced the same continuation. With the
    machine's `bandwidth_gb_s`, `roofline_tok_s` is what reading `decode_bytes_per_step` at that
    bandwidth allows, and `roofline_fraction` llamax's share of it; `step_sized_roofline_*` the
    same at the bandwidth of a step-sized read (`step_sized_gb_s`).
    """
    from llamax.infer.generate import bucket_length
    import torch
    from llamax.infer.generate import generate
    hf_model = _hf_model(config).eval()
    hf_model.generation_config.eos_token_id = None  # every row decodes the full length
    hf_model.generation_config.pad_token_id = 0
    params = jax.device_put(_params_from_hf(config, hf_model))
    prompts = np.random.RandomState(0).randint(3, config.vocab_size, (batch_size, prompt_len))
    outputs: dict[str, Any] = {}

    def run_llamax():
        outputs["llamax"] = generate(config, params, prompts.tolist(), new_tokens)

    inputs = torch.as_tensor(prompts)
    mask = torch.ones_like(inputs)

    def run_hf():
        with torch.no_grad():
            out = hf_model.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
        outputs["hf"] = out[:, prompt_len:].tolist()

    start = time.perf_counter()
    run_llamax()
    first_call = time.perf_counter() - start
    fns = {"llamax": run_llamax}
    if with_hf:
        run_hf()  # warm-up
        fns["hf"] = run_hf
    medians = _interleaved(fns, repeats)
    generated = batch_size * new_tokens
    result = dict(batch=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                  compile_s=round(first_call - medians["llamax"], 2),
                  llamax_tok_s=round(generated / medians["llamax"], 1))
    step_bytes = decode_bytes_per_step(config, batch_size, bucket_length(prompt_len) + new_tokens)
    for prefix, gb_s in (("", bandwidth_gb_s), ("step_sized_", step_sized_gb_s)):
        if gb_s:
            roofline = batch_size * gb_s * 1e9 / step_bytes
            result.update({"bytes_per_step": step_bytes, f"{prefix}roofline_tok_s": round(roofline, 1),
                           f"{prefix}roofline_fraction": round(result["llamax_tok_s"] / roofline, 3)})
    if with_hf:
        result.update(hf_tok_s=round(generated / medians["hf"], 1),
                      ratio=round(medians["hf"] / medians["llamax"], 2),
                      same_tokens=outputs["llamax"] == outputs["hf"])
    return result


# ---- report -------------------------------------------------------------------------------

def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def format_table(results: dict) -> str:
    m, peak, train = results["machine"], results["peak"], results["train"]
    lines = [f"{m['date']}  {m['cpu']}  {m['cores']} cores  load {m['load_avg']}  "
             f"jax {m['jax']} ({m['jax_backend']})  torch {m['torch']} ({m['torch_threads']} threads)",
             f"config {results['config']}  dtype {results['dtype']}",
             f"matmul peak fp32: jax {peak.get('jax_gflops')} GFLOP/s, torch "
             f"{peak.get('torch_gflops')} GFLOP/s -> peak {peak['peak_gflops']}", "",
             f"{'':<22}{'llamax':>12}{'peer':>12}{'ratio':>9}{'goal':>7}"]
    lines.append(f"{'train tok/s':<22}{train['llamax_tok_s']:>12.1f}"
                 f"{train.get('torch_tok_s', float('nan')):>12.1f}"
                 f"{train.get('ratio', float('nan')):>8.2f}x{'1.2x':>7}")
    maxtext = results.get("maxtext")
    if maxtext and "tok_s" in maxtext:
        lines.append(f"{'train vs MaxText':<22}{train['llamax_tok_s']:>12.1f}{maxtext['tok_s']:>12.1f}"
                     f"{train['llamax_tok_s'] / maxtext['tok_s']:>8.2f}x{'1.0x':>7}")
    elif maxtext:
        lines.append(f"{'train vs MaxText':<22}not measured: {maxtext['error'].splitlines()[0]}")
    for row in results["decode"]["per_batch"]:
        lines.append(f"{'decode tok/s  b=' + str(row['batch']):<22}{row['llamax_tok_s']:>12.1f}"
                     f"{row.get('hf_tok_s', float('nan')):>12.1f}"
                     f"{row.get('ratio', float('nan')):>8.2f}x{'1.5x':>7}")
    memory = results.get("memory")
    if memory:
        for name, read, prefix in (("memory", memory, ""), ("step-sized", memory.get("step_sized"), "step_sized_")):
            if not read:
                continue
            ours = max(read["jax_gb_s"], read.get("llamax_kernel_gb_s", 0.0))
            lines.append(f"{name + ' read GB/s':<22}{ours:>12.1f}{read['torch_gb_s']:>12.1f}"
                         f"  ({read.get('megabytes', '?')} MB)")
            for row in results["decode"]["per_batch"]:
                lines.append(f"{'  roofline b=' + str(row['batch']):<22}{row[prefix + 'roofline_tok_s']:>12.1f} "
                             f"tok/s: llamax at {row[prefix + 'roofline_fraction']:.0%} "
                             f"({row['bytes_per_step'] / 1e6:.1f} MB/step)")
    lines += ["", f"train (freed host memory kept: {train.get('host_memory_retained')}): "
                  f"batch {train['batch']} x seq {train['seq_len']}, median of "
                  f"{train['steps']} steps, compile {train['compile_s']} s, MFU "
                  f"{train.get('mfu', float('nan')):.1%} (torch {train.get('torch_mfu', float('nan')):.1%}), "
                  f"XLA temp {train.get('temp_mib', '?')} MiB"]
    return "\n".join(lines)


def _settings(args) -> tuple[Any, str, int, int, int, int, int]:
    """(config, preset, train batch, seq_len, steps, prompt_len, new_tokens) from the CLI."""
    preset = args.config or ("tiny" if args.quick else "bench")
    overrides: dict[str, Any] = {"dtype": args.dtype}
    for item in args.set:
        name, value = item.split("=", 1)
        overrides[name] = _parse_value(value)
    return (get_preset(preset, **overrides), preset, args.batch or (2 if args.quick else 4),
            args.seq_len or (64 if args.quick else 512), args.steps or (2 if args.quick else 7),
            args.prompt_len or (8 if args.quick else 32), args.new_tokens or (8 if args.quick else 128))


def _train_in_child(argv: list[str] | None, peak_gflops: float | None) -> dict[str, Any]:
    """The train section, run by a child process of this script with `--train_only`.

    The train CLI keeps freed host memory (`llamax.backends.retain_freed_host_memory`: one malloc
    arena, process-wide, set before JAX's first device query), which saves a CPU train step
    ~0.5 s of page faults but slows batched decoding, whose threads then share that arena
    (bench preset, batch 8: ~400 vs ~520 tok/s). So each section runs as its CLI does: training
    in a child that keeps freed memory (its torch peer too), decoding here with glibc's defaults.
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "train.json")
        command = [sys.executable, "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv),
                   "--train_only", "--json", out]
        if peak_gflops:
            command += ["--peak_gflops", str(peak_gflops)]
        subprocess.run(command, check=True)
        with open(out) as f:
            return json.load(f)


def _train_section(args, host_memory_retained: bool) -> dict[str, Any]:
    config, _, batch, seq_len, steps, _, _ = _settings(args)
    train = bench_train(config, batch, seq_len, steps, args.peak_gflops, with_torch=not args.gpu)
    train["host_memory_retained"] = host_memory_retained
    with open(args.json, "w") as f:
        json.dump(train, f)
    return train


def _parse_value(text: str) -> Any:
    """'True'/'False' -> bool, '128' -> int, anything else stays a string."""
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny config, short sequences, 2 repeats")
    parser.add_argument("--config", default=None, help="model preset (default bench; tiny with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="train batch size (default 4)")
    parser.add_argument("--seq_len", type=int, default=None, help="train sequence length (default 512)")
    parser.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 7)")
    parser.add_argument("--decode_batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=None, help="decode prompt (default 32)")
    parser.add_argument("--new_tokens", type=int, default=None, help="decode length (default 128)")
    parser.add_argument("--gpu", action="store_true",
                        help="accelerator run: no torch CPU peer; MFU from the device's bf16 peak")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig overrides, e.g. scan_layers=False remat_policy=full")
    parser.add_argument("--maxtext_python", default=None, metavar="PATH",
                        help="the interpreter of a MaxText virtualenv: adds MaxText's train step "
                             "on the same shapes (see benchmarks/maxtext.py)")
    parser.add_argument("--train_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak_gflops", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.maxtext_python and args.gpu:
        parser.error("--maxtext_python runs MaxText on the CPU (hardware=cpu): it is not a peer "
                     "of a --gpu run")
    if args.maxtext_python and not os.access(args.maxtext_python, os.X_OK):
        parser.error(f"--maxtext_python {args.maxtext_python}: no such executable (a MaxText "
                     "virtualenv's bin/python; see benchmarks/maxtext.py)")
    if args.train_only:  # the child of `_train_in_child`: freed memory kept, as the train CLI does
        return _train_section(args, retain_freed_host_memory())

    quick = args.quick
    config, preset, batch, seq_len, steps, prompt_len, new_tokens = _settings(args)
    peer = not args.gpu

    results: dict[str, Any] = dict(machine=machine_info(), config=preset, dtype=args.dtype,
                                   overrides=dict(item.split("=", 1) for item in args.set))
    if args.gpu:
        device_peak = peak_flops_per_device()
        results["peak"] = dict(peak_gflops=device_peak / 1e9 if device_peak else None,
                               source="llamax.train.step.PEAK_FLOPS_PER_DEVICE (dense bf16)")
    else:
        results["peak"] = matmul_peak(512 if quick else 2048, 2 if quick else 7)
        from llamax.infer.generate import bucket_length
        results["memory"] = memory_bandwidth(32 if quick else 256, 2 if quick else 7)
        # As much as a batch-1 decode step reads, read again and again as the step's weights are:
        # a cache that holds part of it raises what a step can get above the memory's rate.
        step_megabytes = -(-decode_bytes_per_step(config, 1, bucket_length(prompt_len) + new_tokens) // (1 << 20))
        results["memory"]["step_sized"] = memory_bandwidth(step_megabytes, 2 if quick else 7)
    print(f"peak: {results['peak']}", flush=True)
    bandwidth = results.get("memory", {}).get("bandwidth_gb_s")
    step_sized = results.get("memory", {}).get("step_sized", {}).get("bandwidth_gb_s")

    if jax.default_backend() == "cpu":
        results["train"] = _train_in_child(argv, results["peak"]["peak_gflops"])
    else:  # an accelerator: the malloc setting does not apply, and a child would share the device
        results["train"] = bench_train(config, batch, seq_len, steps, results["peak"]["peak_gflops"],
                                       with_torch=peer)
    print(f"train: {results['train']}", flush=True)
    if args.maxtext_python:
        from benchmarks.maxtext import bench_maxtext
        try:
            results["maxtext"] = bench_maxtext(args.maxtext_python, config, batch, seq_len)
        except RuntimeError as error:  # the llamax rows still count; the table says why
            results["maxtext"] = {"error": str(error)}
        print(f"maxtext: {results['maxtext']}", flush=True)

    rows = []
    for decode_batch in args.decode_batches:
        rows.append(bench_decode(config, decode_batch, prompt_len, new_tokens, 2 if quick else 3,
                                 with_hf=peer, bandwidth_gb_s=bandwidth, step_sized_gb_s=step_sized))
        print(f"decode: {rows[-1]}", flush=True)
    decode: dict[str, Any] = dict(per_batch=rows,
                                  llamax_tok_s=round(_geomean([r["llamax_tok_s"] for r in rows]), 1))
    if peer:
        decode.update(hf_tok_s=round(_geomean([r["hf_tok_s"] for r in rows]), 1),
                      ratio=round(_geomean([r["ratio"] for r in rows]), 2))
    decode["summary"] = "geometric mean over decode batch sizes " + str(args.decode_batches)
    results["decode"] = decode
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
