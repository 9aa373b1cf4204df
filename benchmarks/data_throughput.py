"""Input-pipeline throughput on the Shakespeare corpus: tokenize, pack, and the full grain loader.

    python -m benchmarks.data_throughput [--tokenizer tokenizer.model] [--seq_len 2048]
        [--batch 8] [--seconds 3] [--json out.json]

Without --tokenizer a 2048-piece tokenizer is trained on the train split first (~1 s). Numbers are
tokens per second on this machine; "useful" counts non-padding tokens. Compare the loader row with
the training step's tokens/s: the loader must be faster to keep the step fed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from llamax.data import corpus
from llamax.data.loader import make_loader
from llamax.data.packing import as_document, pack_documents
from llamax.tokenizer import Tokenizer, train_tokenizer


def timed(fn, min_seconds: float):
    """Runs fn() until min_seconds have passed; returns (total of its results, seconds)."""
    total, start = 0, time.perf_counter()
    while True:
        total += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return total, elapsed


def bench_tokenize(tokenizer: Tokenizer, docs: list[str], seconds: float) -> dict:
    def single():
        return sum(len(tokenizer.encode(d, bos=True, eos=True)) for d in docs)

    def batched():
        return sum(map(len, tokenizer.encode_batch(docs, bos=True, eos=True)))
    rows = {}
    for name, fn in (("tokenize (1 thread)", single), ("tokenize (encode_batch, all cores)", batched)):
        tokens, elapsed = timed(fn, seconds)
        rows[name] = {"tokens_per_s": tokens / elapsed}
    return rows


def bench_pack(tokenizer: Tokenizer, docs: list[str], seq_len: int, seconds: float) -> dict:
    encoded = [as_document(ids) for ids in tokenizer.encode_batch(docs, bos=True, eos=True)]
    rows = {}
    for fill_rows in (False, True):
        useful = [0]

        def run():
            rows_ = list(pack_documents(encoded, seq_len, fill_rows=fill_rows))
            useful[0] += sum(int(np.count_nonzero(r["segment_ids"])) for r in rows_)
            return len(rows_) * seq_len
        tokens, elapsed = timed(run, seconds)
        rows[f"pack numpy (fill_rows={fill_rows})"] = {
            "tokens_per_s": tokens / elapsed, "useful_tokens_per_s": useful[0] / elapsed,
            "padding_fraction": 1 - useful[0] / tokens}
    return rows


def bench_loader(tokenizer: Tokenizer, docs: list[str], seq_len: int, batch: int, seconds: float,
                 threads: list[int]) -> dict:
    rows = {}
    for num_threads in threads:
        for fill_rows in (False, True):
            loader = make_loader(docs, tokenizer, seq_len=seq_len, global_batch_size=batch,
                                 num_threads=num_threads, fill_rows=fill_rows)
            next(loader)  # start-up (threads, first reads) is not throughput
            useful = [0]

            def step():
                b = next(loader)
                useful[0] += int(np.count_nonzero(b["segment_ids"]))
                return b["tokens"].size
            tokens, elapsed = timed(step, seconds)
            rows[f"grain loader (threads={num_threads}, fill_rows={fill_rows})"] = {
                "tokens_per_s": tokens / elapsed, "useful_tokens_per_s": useful[0] / elapsed,
                "batches_per_s": tokens / elapsed / (batch * seq_len),
                "padding_fraction": 1 - useful[0] / tokens}
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer.model (default: train a 2048-piece one)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    docs = corpus.shakespeare_passages("train")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer:
            tokenizer = Tokenizer(args.tokenizer)
        else:
            text = corpus.write_corpus(tmp, fmt="txt")["train"]
            tokenizer = train_tokenizer([text], os.path.join(tmp, "tokenizer.model"), 2048)
        results = {}
        results.update(bench_tokenize(tokenizer, docs, args.seconds))
        results.update(bench_pack(tokenizer, docs, args.seq_len, args.seconds))
        results.update(bench_loader(tokenizer, docs, args.seq_len, args.batch, args.seconds,
                                    args.threads))
    print(f"{'stage':<48} {'tokens/s':>12} {'useful tok/s':>13} {'padding':>8}")
    for name, row in results.items():
        useful = row.get("useful_tokens_per_s")
        padding = row.get("padding_fraction")
        print(f"{name:<48} {row['tokens_per_s']:>12,.0f} "
              f"{'' if useful is None else f'{useful:,.0f}':>13} "
              f"{'' if padding is None else f'{padding:.1%}':>8}")
    report = {"results": results, "seq_len": args.seq_len, "batch": args.batch,
              "documents": len(docs), "vocab_size": tokenizer.vocab_size,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
