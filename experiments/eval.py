"""Perplexity of a checkpoint on a held-out split or any text/JSONL files.

    python -m experiments.eval --checkpoint PATH [--tokenizer PATH] [--data shakespeare|FILES|TFDS]
        [--split validation] [--seq_len 256] [--batch_size 8] [--max_batches K] [--step STEP]
        [--sft_template checkpoint|plain|llama2|llama3] [--base PATH] [--mesh fsdp|dp|fsdp_tp]
        [--weights float32|bfloat16|int8]

--checkpoint: a training run (newest checkpoint unless --step; LoRA runs are merged with their
base, see `experiments.export_lora`), an orbax params checkpoint, an HF or Meta folder, or a PEFT
adapter folder (merged into --base, default the base it records).
--tokenizer: default the checkpoint's own (an HF/Meta folder's, the one a run recorded).
--data: as `DataConfig.train` ('shakespeare', 'shakespeare_sft', files, a directory, a glob, or a
prepared tfds dataset with --tfds_data_dir). Documents are packed into rows with no padding
(--sft_template: one conversation per row, response tokens scored; 'checkpoint' renders with the
tokenizer's own chat template) and only `loss_mask` tokens
count. --weights bfloat16|int8 evaluates with weight-only reduced precision (the perplexity it
costs; `llamax.model.quantize`). Prints one JSON line {"loss", "perplexity", "tokens", ...}; for a run directory it then
appends the result to the run's metrics through the training loop's logger, in the record shape
training uses ({"step", "eval_loss", "eval_perplexity", "eval_tokens", "eval_data", ...}).
Errors print one line and exit with status 1 (the result, once computed, is printed first).
Installed as the `llamax-eval` console script.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

from experiments.cli import fail
from llamax.errors import LlamaxError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run dir, orbax, HF or Meta folder")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer file or folder (default: the checkpoint's own)")
    parser.add_argument("--data", default="shakespeare", help="'shakespeare', files, or tfds name")
    parser.add_argument("--split", default="validation", help="split (shakespeare/tfds)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8, help="global rows per batch")
    parser.add_argument("--max_batches", type=int, default=None, help="stop after K batches")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run")
    parser.add_argument("--base", default=None, help="base weights of a LoRA run or PEFT adapter")
    parser.add_argument("--sft_template", default=None, choices=["checkpoint", "plain", "llama2", "llama3"])
    parser.add_argument("--mesh", default="fsdp", help="mesh preset: dp, fsdp or fsdp_tp")
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--text_split", default="paragraph", choices=["file", "paragraph", "line"])
    parser.add_argument("--text_key", default="text", help="JSONL field / tfds feature of the text")
    parser.add_argument("--weights", default="float32", choices=("float32", "bfloat16", "int8"),
                        help="weight-only precision of the projection kernels (default float32)")
    return parser.parse_args(argv)


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the checkpoint and data that `args` name and returns the perplexity record."""
    from llamax.convert.hub import load_any, read_config
    from llamax.convert.identity import checkpoint_tokenizer
    from llamax.data.pipeline import DataConfig, open_split
    from llamax.data.loader import LoaderConfig, make_loader
    from llamax.infer.evaluate import evaluate_perplexity
    from llamax.model.quantize import quantize_weights
    from llamax.run_dir import checkpoint_step
    from llamax.sharding import get_mesh_preset, make_mesh

    step = checkpoint_step(args.checkpoint, args.step)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer,
                                     vocab_size=read_config(args.checkpoint, base=args.base).vocab_size)
    config, params = load_any(args.checkpoint, step=step, base=args.base)
    params, quant = quantize_weights(config, params, args.weights)
    data = DataConfig(tokenizer=args.tokenizer, train=args.data, validation=args.data,
                      validation_split=args.split, tfds_data_dir=args.tfds_data_dir,
                      text_split=args.text_split, text_key=args.text_key,
                      sft_template=args.sft_template)
    loader = make_loader(open_split(data, args.data, args.split), tokenizer, LoaderConfig(
        seq_len=args.seq_len, global_batch_size=args.batch_size, shuffle=False, num_epochs=1,
        sft_template=args.sft_template, fill_rows=args.sft_template is None))
    batches = loader if args.max_batches is None else itertools.islice(loader, args.max_batches)
    result = evaluate_perplexity(config, params, batches, make_mesh(get_mesh_preset(args.mesh)), quant=quant)
    return {**result, "data": args.data, "split": args.split, "seq_len": args.seq_len, "weights": args.weights,
            "checkpoint": str(args.checkpoint), "step": step}


def log_to_run(record: dict[str, Any]) -> None:
    """Appends the result to the run's metrics through the training loop's logger, in its record
    shape: {"step", "eval_loss", "eval_perplexity", "eval_tokens", "eval_data", ...}."""
    from llamax.train.metrics import MetricsLogger

    logger = MetricsLogger(record["checkpoint"], total_steps=record["step"], start_step=record["step"],
                           progress_bar=False, tensorboard=False)
    try:
        logger.log(record["step"], {f"eval_{key}": value for key, value in record.items()
                                    if key not in ("checkpoint", "step")})
    finally:
        logger.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = evaluate_checkpoint(args)
    except (LlamaxError, OSError) as error:
        return fail(f"{type(error).__name__}: {error}", program="llamax-eval")
    print(json.dumps(record), flush=True)  # the result is out before any write that could fail
    if record["step"] is not None:  # a training run: the result joins its metrics
        try:
            log_to_run(record)
        except OSError as error:
            return fail(f"could not append the result to the run's metrics: {error}", program="llamax-eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
