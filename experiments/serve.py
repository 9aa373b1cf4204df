"""Serve a checkpoint with an OpenAI-compatible API and a chat page (continuous batching).

    python -m experiments.serve --checkpoint PATH [--tokenizer PATH] [--chat_template plain]
        [--host 127.0.0.1] [--port 8000] [--max_batch 8] [--max_seq_len 1024] [--api_key KEY]
        [--mesh none|dp|fsdp|fsdp_tp] [--dtype bfloat16] [--warmup]

--checkpoint: an HF or Meta folder, a GGUF file, an orbax params checkpoint or a training run
directory (newest checkpoint, or --step; a LoRA run is merged into its base). --tokenizer: a
tokenizer file or folder; default the checkpoint's own (a run's recorded copy); replies stop at
its stop ids and every EOS id the checkpoint declares (`llamax.convert.identity`). Then open
http://HOST:PORT/ for the chat page, or point any OpenAI client at
http://HOST:PORT/v1 (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health).
Installed as the `llamax-serve` console script; `experiments.chat` is the terminal front end
on the same engine.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments.cli import fail
from llamax.errors import CheckpointError, LlamaxError

log = logging.getLogger("llamax.serve")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `serve` and `chat` share: which model, tokenizer, template and engine size."""
    parser.add_argument("--checkpoint", required=True,
                        help="HF or Meta folder, GGUF file, orbax params checkpoint or training run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer file or folder (default: the checkpoint's own; a run's copy)")
    parser.add_argument("--chat_template", default=None, choices=["plain", "llama2", "llama3"],
                        help="built-in chat template (default: the tokenizer's own, else plain)")
    parser.add_argument("--max_batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="prompt + reply tokens per request (default: the model's context, "
                             "at most 2048)")
    parser.add_argument("--dtype", default=None, help="weights and compute dtype, e.g. bfloat16 "
                                                      "(default: the checkpoint's config)")
    parser.add_argument("--mesh", default="none", choices=["none", "dp", "fsdp", "fsdp_tp"],
                        help="shard over all local devices with this mesh preset")
    parser.add_argument("--warmup", action="store_true",
                        help="compile every prompt-length bucket before accepting requests")


def build_engine(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(started Engine, ChatFormat, model name) from parsed `add_model_arguments` options."""
    from llamax.convert.hub import load_any, read_config
    from llamax.infer.chat_format import load_serving_tokenizer
    from llamax.infer.engine import Engine

    if not Path(args.checkpoint).exists():
        raise CheckpointError(f"checkpoint {args.checkpoint!r} does not exist; pass an HF or Meta folder, "
                              "a GGUF file, a llamax params checkpoint or a training run directory")
    # The tokenizer and stop ids first: a checkpoint without a usable one fails before its weights load.
    chat = load_serving_tokenizer(args.checkpoint, args.tokenizer, args.chat_template,
                                  read_config(args.checkpoint).vocab_size)
    overrides = {"dtype": args.dtype, "param_dtype": args.dtype} if args.dtype else {}
    config, params = load_any(args.checkpoint, step=args.step, **overrides)
    mesh = None
    if args.mesh != "none":
        from llamax.sharding import get_mesh_preset, make_mesh
        mesh = make_mesh(get_mesh_preset(args.mesh))
    max_seq_len = args.max_seq_len or min(config.max_position_embeddings, 2048)
    engine = Engine(config, params, max_batch=args.max_batch, max_seq_len=max_seq_len, mesh=mesh)
    del params  # the engine keeps its own device copy in the decoding layout
    if args.warmup:
        engine.warmup()
    checkpoint = Path(os.path.abspath(args.checkpoint))
    name = checkpoint.stem if checkpoint.is_file() else checkpoint.name  # a GGUF file: no suffix
    return engine.start(), chat, name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("LLAMAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLAMAX_API_KEY; none)")
    parser.add_argument("--model_name", default=None, help="model id in the API (default: the "
                                                            "checkpoint folder's name)")
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: serves until interrupted; 1 with a one-line error for bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        import uvicorn

        from llamax.infer.server import create_app

        engine, chat, name = build_engine(args)
    except (LlamaxError, OSError, ImportError) as error:
        return fail(f"{type(error).__name__}: {error}", 1, "llamax-serve")
    name = args.model_name or name
    app = create_app(engine, chat, name, api_key=args.api_key)
    print(f"llamax-serve: {name} on http://{args.host}:{args.port}/ (chat page), OpenAI API at "
          f"http://{args.host}:{args.port}/v1; max_batch={engine.max_batch}, "
          f"max_seq_len={engine.max_seq_len}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
