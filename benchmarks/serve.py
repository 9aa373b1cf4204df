"""Serving throughput and latency: `experiments.serve` under 1, 4 and 16 concurrent clients.

    python -m benchmarks.serve [--preset bench] [--concurrency 1 4 16] [--prompt_len 64]
        [--max_tokens 128] [--max_batch 16] [--max_seq_len 512] [--server_repeats 3] [--engine_repeats 3]
        [--skip_server | --skip_engine_only] [--json out.json]

A random-weight model of `--preset` is written as an HF folder (with a tokenizer of its vocabulary
size trained on the corpus) and served by `python -m experiments.serve --warmup` in its own
process, so the clients (asyncio tasks here, one HTTP connection each, closed loop: a client
sends its next request when the previous one ends) do not share the server's interpreter. Every
request is a streamed greedy completion of a random `--prompt_len`-token prompt (sent as token
ids) for `--max_tokens` tokens (random weights rarely produce the stop id).

Reported per concurrency: generated tokens/s (all completion tokens / wall time), latency p50/p95
(request sent -> last chunk) and time-to-first-token p50/p95, from the median (by tokens/s) of
`--server_repeats` alternations of the concurrency list. Concurrency 1 runs 16 requests one after another: the
baseline that the 16-client throughput of the same alternation is divided by ("batch-16
speedup": the median of those ratios).
Then the same model on an in-process `Engine` (no HTTP, no detokenizing): 1 and 16 requests at
once, alternated `--engine_repeats` times (medians), the decode-step cost without the server.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model


def write_checkpoint(folder: Path, preset: str) -> Path:
    """Random params of `preset` as an HF folder, with a tokenizer of the model's vocabulary size
    trained on the corpus (so every generated id is text, as with a real model)."""
    import shutil

    from llamax.config import get_preset
    from llamax.convert import save_hf
    from llamax.data.corpus import shakespeare_tokenizer
    from llamax.model import init_params

    config = get_preset(preset)
    save_hf(config, init_params(config, rng=0), folder)
    shutil.copy(shakespeare_tokenizer(config.vocab_size), folder / "tokenizer.model")
    return folder


def start_server(checkpoint: Path, port: int, max_batch: int, max_seq_len: int) -> subprocess.Popen:
    import httpx2

    command = [sys.executable, "-m", "experiments.serve", "--checkpoint", str(checkpoint),
               "--port", str(port), "--max_batch", str(max_batch), "--max_seq_len", str(max_seq_len),
               "--warmup", "--log_level", "warning", "--chat_template", "plain", "--model_name", "bench"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stdout.read()}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx2.TransportError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("the server did not come up in 15 minutes")


async def one_request(http, url: str, prompt: list[int], max_tokens: int, model: str = "bench") -> dict:
    """One streamed greedy completion: latency, time to the first text chunk, tokens generated
    (the usage chunk's count). Only the chunks that carry those are parsed as JSON: the clients
    share the server's cores (see `run_clients`)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:  # one server-sent-event line at a time
            if not line.startswith(b"data: {"):
                continue  # the blank separator lines and "data: [DONE]"
            if first is None:
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0].get("text"):
                    first = time.perf_counter()
            if b'"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def run_clients(url: str, clients: int, requests_each: int, prompt_len: int, max_tokens: int,
                vocab: int, seed: int, model: str = "bench") -> dict:
    """`clients` concurrent clients, each sending `requests_each` requests back to back over its
    own connection. The clients are tasks of one asyncio loop (aiohttp), as in vLLM's serving
    benchmark. On the 2 cores the server also runs on, 16 threads of a blocking client that
    parsed every chunk used 0.22 ms of CPU per streamed token; these clients use 0.05 ms
    (benchmarks/RESULTS.md, "Lighter benchmark clients")."""
    import asyncio

    import aiohttp

    rng = np.random.RandomState(seed)
    prompts = rng.randint(3, vocab, (clients, requests_each, prompt_len)).tolist()
    results: list[dict] = []

    async def client(index: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)  # one connection, reused (keep-alive)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                         connector=connector) as http:
            for prompt in prompts[index]:
                results.append(await one_request(http, url, prompt, max_tokens, model))

    async def all_clients() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return time.perf_counter() - start

    wall = asyncio.run(all_clients())
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    pick = lambda values, q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(pick(latencies, 0.95), 3),
            "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p95_s": round(pick(ttfts, 0.95), 3)}


def engine_only(checkpoint: Path, clients_list: list[int], prompt_len: int, max_tokens: int,
                max_batch: int, max_seq_len: int, repeats: int = 1) -> list[dict]:
    """The same load on an in-process Engine (no HTTP, no detokenizing): where the time goes.
    The concurrencies alternate `repeats` times (1, 16, 1, 16, ...), so load drift on a shared
    machine hits both alike; each row is the median repeat, with every repeat's tokens/s."""
    from llamax.convert.hub import load_any
    from llamax.infer.engine import Engine, SamplingParams

    config, params = load_any(checkpoint)
    engine = Engine(config, params, max_batch=max_batch, max_seq_len=max_seq_len)
    engine.warmup()
    engine.start()
    runs: dict[int, list[dict]] = {clients: [] for clients in clients_list}
    try:
        rng = np.random.RandomState(0)
        for _ in range(repeats):
            for clients in clients_list:
                prompts = rng.randint(3, config.vocab_size, (clients, prompt_len)).tolist()
                start = time.perf_counter()
                steps = engine.steps
                requests = [engine.submit(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
                tokens = sum(len(r.tokens()) for r in requests)
                wall = time.perf_counter() - start
                runs[clients].append({"clients": clients, "tokens": tokens,
                                      "tokens_per_s": round(tokens / wall, 1),
                                      "decode_steps": engine.steps - steps,
                                      "ms_per_step": round(1000 * wall / max(1, engine.steps - steps), 1)})
                print(json.dumps({"engine_only": runs[clients][-1]}), flush=True)
    finally:
        engine.stop()
    return median_rows(runs)


def server_rows(args: argparse.Namespace, checkpoint: Path, url: str, vocab: int, report: dict) -> list[dict]:
    """`experiments.serve` in its own process under each concurrency of `args.concurrency`, the
    whole list run `args.server_repeats` times (1, 4, 16, 1, 4, 16, ...), so load drift on a
    shared machine hits every concurrency alike. Each row is the median repeat (by tokens/s),
    with every repeat's tokens/s; report["batch16_speedup_repeats"] holds each repeat's 16-client
    / 1-client ratio."""
    started = time.perf_counter()
    server = start_server(checkpoint, args.port, args.max_batch, args.max_seq_len)
    report["startup_with_warmup_s"] = round(time.perf_counter() - started, 1)
    runs: dict[int, list[dict]] = {clients: [] for clients in args.concurrency}
    try:
        run_clients(url, 1, 1, args.prompt_len, args.max_tokens, vocab, seed=99)  # first-use costs
        for repeat in range(args.server_repeats):
            for clients in args.concurrency:
                each = args.sequential_requests if clients == 1 else args.requests_per_client
                runs[clients].append(run_clients(url, clients, each, args.prompt_len, args.max_tokens,
                                                 vocab, seed=clients + 1000 * repeat))
                print(json.dumps(runs[clients][-1]), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    if 1 in runs and 16 in runs:
        report["batch16_speedup_repeats"] = [round(many["tokens_per_s"] / one["tokens_per_s"], 2)
                                             for one, many in zip(runs[1], runs[16])]
    return median_rows(runs)


def median_rows(runs: dict[int, list[dict]]) -> list[dict]:
    """Per concurrency, its median repeat (by tokens/s) with every repeat's tokens/s."""
    rows = []
    for measured in runs.values():
        median = sorted(measured, key=lambda row: row["tokens_per_s"])[len(measured) // 2]
        rows.append({**median, "repeats_tokens_per_s": [row["tokens_per_s"] for row in measured]})
    return rows


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--sequential_requests", type=int, default=16,
                        help="requests of the 1-client run (the sequential baseline)")
    parser.add_argument("--requests_per_client", type=int, default=2, help="for concurrency > 1")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--skip_engine_only", action="store_true",
                        help="skip the in-process Engine measurement (1 and 16 requests at once)")
    parser.add_argument("--engine_repeats", type=int, default=3,
                        help="alternations of the in-process 1- and 16-request loads")
    parser.add_argument("--server_repeats", type=int, default=3,
                        help="alternations of the whole --concurrency list against the server")
    parser.add_argument("--skip_server", action="store_true", help="only the in-process Engine")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from llamax.config import get_preset

    vocab = get_preset(args.preset).vocab_size
    url = f"http://127.0.0.1:{args.port}"
    report = {"machine_before": machine(), "preset": args.preset, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "max_batch": args.max_batch, "max_seq_len": args.max_seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "model", args.preset)
        rows = [] if args.skip_server else server_rows(args, checkpoint, url, vocab, report)
        if not args.skip_engine_only:
            report["engine_only"] = engine_only(checkpoint, [1, 16], args.prompt_len, args.max_tokens,
                                                args.max_batch, args.max_seq_len, args.engine_repeats)
            engine = {row["clients"]: row["tokens_per_s"] for row in report["engine_only"]}
            if 1 in engine and 16 in engine:
                report["engine_batch16_speedup"] = round(engine[16] / engine[1], 2)
    report["rows"] = rows
    if "batch16_speedup_repeats" in report:  # the median of the side-by-side ratios
        ratios = sorted(report["batch16_speedup_repeats"])
        report["batch16_speedup"] = ratios[len(ratios) // 2]
    report["machine_after"] = machine()
    print("| clients | requests | tokens/s | latency p50 / p95 (s) | first token p50 / p95 (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['tokens_per_s']} | {row['latency_p50_s']} / "
              f"{row['latency_p95_s']} | {row['ttft_p50_s']} / {row['ttft_p95_s']} |")
    if "batch16_speedup" in report:
        print(f"batch-16 throughput = {report['batch16_speedup']}x the sequential one (median of "
              f"{report['batch16_speedup_repeats']}, one ratio per alternation)")
    if "engine_batch16_speedup" in report:
        print(f"in-process engine: 16 requests at once = {report['engine_batch16_speedup']}x one "
              f"request's tokens/s (medians of {args.engine_repeats} alternations)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
