"""lm-eval requests per second: the `llamax` backend vs lm-eval's `hf` backend, same weights.

    python -m benchmarks.lm_eval_speed [--hidden 512 --layers 8] [--mc_docs 64 --qa_docs 32]
        [--batch_size 16] [--rounds 2] [--json benchmarks/lm_eval-cpu.json]

One random Llama-3-architecture model (GQA, the Llama-3-format tokenizer trained on the corpus)
is saved as an HF folder; both backends load that folder. The requests are the shipped tasks'
own: shakespeare_mc (loglikelihood, 4 per document) and shakespeare_qa (generate_until, 3-shot,
max_gen_toks 16, stops at a newline). Each round calls each backend's `loglikelihood` and
`generate_until` on the same requests, alternating backends; round 1 includes llamax's XLA
compilation (one executable per length bucket), later rounds are steady state. The answers are
compared too: equal generated text, loglikelihoods within 1e-4 (relative 1e-6).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model


def machine() -> dict:
    import jax

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_1min": os.getloadavg()[0],
            "jax_devices": len(jax.devices()), "date": datetime.date.today().isoformat()}


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random HF folder of the given size with the corpus-trained Llama-3-format tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamax.data import corpus
    from llamax.tokenizer.train_llama3 import train_llama3_tokenizer

    tokenizer_dir = folder.parent / "tokenizer"
    text = folder.parent / "train.txt"
    text.write_text("".join(corpus.read_play(p) for p in corpus.shakespeare_files("train")), encoding="utf-8")
    train_llama3_tokenizer([text], tokenizer_dir, 1024)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1280, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=1024, rope_theta=500000.0, bos_token_id=1024, eos_token_id=1033,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    return folder


def task_requests(mc_docs: int, qa_docs: int) -> dict[str, list]:
    """The lm-eval Instances of the shipped tasks (built by lm-eval, as an evaluation would)."""
    from llamax.infer.lm_eval_tasks import DEFAULT_INCLUDE_PATH, task_manager

    tasks = task_manager(["shakespeare_mc", "shakespeare_qa"], DEFAULT_INCLUDE_PATH).load(
        ["shakespeare_mc", "shakespeare_qa"])["tasks"]
    built = {}
    for name, limit in (("shakespeare_mc", mc_docs), ("shakespeare_qa", qa_docs)):
        task = tasks[name]
        task.set_fewshot_seed(1234)
        task.build_all_requests(limit=limit)
        built[name] = list(task.instances)
    return {"loglikelihood": built["shakespeare_mc"], "generate_until": built["shakespeare_qa"]}


def run(args: argparse.Namespace) -> dict:
    from lm_eval.models.huggingface import HFLM

    from llamax.infer.lm_eval_backend import LlamaxLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "model", args.hidden, args.layers)
        requests = task_requests(args.mc_docs, args.qa_docs)
        backends = {"hf": HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=args.batch_size),
                    "llamax": LlamaxLM(checkpoint=str(folder), batch_size=args.batch_size)}
        import torch

        torch.set_num_threads(os.cpu_count())
        rounds, answers = [], {}
        for round_index in range(args.rounds):
            timings = {}
            for kind, instances in requests.items():
                for name, lm in backends.items():
                    start = time.perf_counter()
                    answers[name, kind] = getattr(lm, kind)(instances)
                    seconds = time.perf_counter() - start
                    timings[f"{name}_{kind}_requests_per_s"] = len(instances) / seconds
            rounds.append(timings)
            print(f"round {round_index + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), flush=True)
    loglikelihoods = np.array([[a[0] for a in answers[name, "loglikelihood"]] for name in ("hf", "llamax")])
    same_text = answers["hf", "generate_until"] == answers["llamax", "generate_until"]
    steady = rounds[-1]
    return {
        "machine": machine(), "model": {"hidden": args.hidden, "layers": args.layers, "vocab": 1280,
                                        "params_m": round(sum(p.numel() for p in backends["hf"].model.parameters()) / 1e6, 1)},
        "requests": {kind: len(instances) for kind, instances in requests.items()},
        "batch_size": args.batch_size, "rounds": rounds,
        "ratio": {kind: steady[f"llamax_{kind}_requests_per_s"] / steady[f"hf_{kind}_requests_per_s"]
                  for kind in requests},
        "ratio_first_round": {kind: rounds[0][f"llamax_{kind}_requests_per_s"] / rounds[0][f"hf_{kind}_requests_per_s"]
                              for kind in requests},
        "max_abs_loglikelihood_diff": float(np.max(np.abs(loglikelihoods[0] - loglikelihoods[1]))),
        "greedy_flags_equal": [a[1] for a in answers["hf", "loglikelihood"]] == [a[1] for a in answers["llamax", "loglikelihood"]],
        "generated_text_equal": same_text,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mc_docs", type=int, default=64)
    parser.add_argument("--qa_docs", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = run(args)
    print(json.dumps({k: results[k] for k in ("machine", "model", "requests", "ratio", "ratio_first_round",
                                              "max_abs_loglikelihood_diff", "greedy_flags_equal",
                                              "generated_text_equal")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
