"""Generate text from a checkpoint: one prompt streams to stdout token by token, several batch.

    python -m experiments.sample --checkpoint PATH --prompt "To be, or not to be" [--prompt "..."] \\
        [--tokenizer PATH] [--chat [--system TEXT]] [--max_new_tokens 64] \\
        [--temperature 0.8 --top_k 50 --top_p 0.95 --seed 0] [--weights float32|bfloat16|int8]

`--checkpoint` may be an HF or Meta folder, a llamax params checkpoint or a training run
directory (its newest checkpoint; a LoRA run is merged with its base), read by
`llamax.convert.load_any` like every other CLI. The tokenizer is the checkpoint's own (an HF or
Meta folder's, the one a run recorded) unless `--tokenizer` names another. Generation stops at
any of the tokenizer's stop ids (e.g. `<|eot_id|>` and `<|end_of_text|>` for Llama-3).
`--weights bfloat16|int8` decodes with weight-only reduced precision (`llamax.model.quantize`:
projection kernels in bf16, or int8 with per-output-channel scales; activations stay float32).

`--chat` sends each prompt as a user message (after `--system`, if given) through the
checkpoint's chat template with the assistant prompt appended, and prints only the reply.
Without it the prompt is continued and printed with its continuation.

Every argument is checked (settings, tokenizer, prompt lengths against the model's context)
before the weights are read or anything is printed. Errors print one line and exit with status 2.
Console script: `llamax-sample = experiments.sample:main`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from experiments.cli import fail
from llamax.config import ModelConfig
from llamax.errors import CheckpointError, ConfigError, LlamaxError
from llamax.infer.checks import check_generate_args, check_sampling_args
from llamax.infer.generate import generate, generate_stream
from llamax.model.quantize import WEIGHT_FORMATS, quantize_weights


def load_model(path: str | Path) -> tuple[ModelConfig, Any]:
    """(config, params) of any checkpoint: HF, Meta, orbax params or a training run (LoRA merged)."""
    _check_exists(path)
    from llamax.convert.hub import load_any

    return load_any(path)


def _check_exists(path: str | Path) -> None:
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass an HF or Meta folder, a "
                              "llamax params checkpoint or a training run directory")


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool, system: str | None) -> list[list[int]]:
    """Token ids of each prompt: the text after BOS, or (chat) a user turn rendered with the
    tokenizer's chat template and the assistant's generation prompt."""
    if not chat:
        return [tokenizer.encode(text, bos=True) for text in prompts]
    encoded = []
    for text in prompts:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": text})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        encoded.append(tokenizer.encode(rendered, bos=False, allow_special=True))
    return encoded


def stream_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Iterable[int], out: TextIO,
                echo_prompt: bool = True) -> list[int]:
    """Writes the prompt's text (if `echo_prompt`), then the text of each new token as it arrives.

    SentencePiece spells spaces as part of the next piece, so each step decodes the whole sequence
    and writes the new suffix; an unfinished UTF-8 byte sequence waits for its remaining bytes.
    Special tokens (BOS, the stop token that ends the reply) and ids past the tokenizer's pieces
    (a model vocabulary padded to a multiple of 64/128) print nothing.
    """
    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size], skip_special=True)

    ids = list(prompt_ids) if echo_prompt else []
    printed = decode(ids)
    out.write(printed)
    out.flush()
    new = []
    for token in new_ids:
        new.append(token)
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd") or not text.startswith(printed):
            continue
        out.write(text[len(printed):])
        out.flush()
        printed = text
    out.write("\n")
    return new


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="HF or Meta folder, llamax params checkpoint or training run directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer file or folder (default: the checkpoint's own)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue (or, with --chat, the user's message); repeat for a batch")
    parser.add_argument("--chat", action="store_true",
                        help="render each prompt as a user turn with the checkpoint's chat template")
    parser.add_argument("--system", default=None, help="system message before the user's (--chat)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="float32", choices=WEIGHT_FORMATS,
                        help="weight-only precision of the projection kernels (default float32)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = parse_args(argv)
    out = out or sys.stdout
    try:
        if args.system is not None and not args.chat:
            raise ConfigError("--system applies to --chat prompts; add --chat or drop --system")
        check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        _check_exists(args.checkpoint)
        from llamax.convert.hub import read_config
        from llamax.convert.identity import checkpoint_tokenizer

        config = read_config(args.checkpoint)
        tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer, vocab_size=config.vocab_size)
        prompts = encode_prompts(tokenizer, args.prompt, args.chat, args.system)
        settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, stop_ids=tokenizer.stop_ids)
        check_generate_args(config, prompts, args.max_new_tokens, args.temperature, args.top_k,
                            args.top_p, None, tokenizer.stop_ids)
        config, params = load_model(args.checkpoint)  # only now: every argument is known to be good
        params, settings["quant"] = quantize_weights(config, params, args.weights)
        echo = not args.chat
        if len(prompts) == 1:
            stream_text(tokenizer, prompts[0], generate_stream(
                config, params, prompts[0], args.max_new_tokens, **settings), out, echo)
            return 0
        for index, (prompt, new_ids) in enumerate(zip(prompts, generate(
                config, params, prompts, args.max_new_tokens, **settings))):
            out.write(f"[{index}] ")
            stream_text(tokenizer, prompt, new_ids, out, echo)
        return 0
    except LlamaxError as exc:
        return fail(exc, 2)


if __name__ == "__main__":
    sys.exit(main())
