"""Chat with a checkpoint in the terminal, on the same engine and text path as `experiments.serve`.

    python -m experiments.chat --checkpoint PATH [--tokenizer PATH] [--chat_template plain]
        [--system "You are ..."] [--temperature 0.7] [--top_p 0.95] [--max_tokens 256]

Replies stream as they are generated. Commands: /reset (forget the conversation), /system TEXT
(set the system prompt and start over; `/system` alone clears it), /set NAME VALUE (change a
sampling setting: temperature, top_p, top_k, max_tokens, seed), /help, /quit (or Ctrl-D).
Ctrl-C stops the reply being written (what was written stays in the conversation) and returns
to the prompt; at the prompt it clears the line. Input history is kept with readline in
~/.llamax_chat_history. When the conversation outgrows the context, the oldest turns are dropped.
Installed as the `llamax-chat` console script.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from experiments.cli import fail
from llamax.errors import LlamaxError

HELP = ("commands: /reset, /system TEXT, /set NAME VALUE (temperature, top_p, top_k, max_tokens, "
        "seed), /help, /quit; Ctrl-C stops a reply, Ctrl-D quits")
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int}
HISTORY_FILE = Path.home() / ".llamax_chat_history"


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # not on every platform; chat works without history
        return
    try:
        readline.read_history_file(HISTORY_FILE)
    except OSError:
        pass
    readline.set_history_length(1000)
    import atexit

    atexit.register(lambda: _save_history(readline))


def _save_history(readline: Any) -> None:
    try:
        readline.write_history_file(HISTORY_FILE)
    except OSError:
        pass


class ChatSession:
    """A conversation with the engine: turns, the system prompt, and streaming one reply."""

    def __init__(self, engine: Any, chat: Any, sampling: Any, system: str | None, out: TextIO):
        self.engine, self.chat, self.sampling, self.out = engine, chat, sampling, out
        self.system = system
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def _fitting_prompt(self) -> list[int] | None:
        """The prompt ids, dropping the oldest turns until there is room for a reply."""
        room = min(self.sampling.max_tokens, self.engine.max_seq_len // 2)
        while True:
            ids = self.chat.prompt_ids(self.messages())
            if len(ids) + room <= self.engine.max_seq_len or len(self.turns) <= 1:
                return ids if len(ids) < self.engine.max_seq_len else None
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]
            self.out.write("(context full: dropped the oldest turn)\n")

    def reply(self, text: str) -> str:
        """Streams the reply to `text`; Ctrl-C stops it early. Returns the reply text."""
        import dataclasses

        from llamax.infer.text_stream import TextStream

        self.turns.append({"role": "user", "content": text})
        ids = self._fitting_prompt()
        if ids is None:
            self.turns.pop()
            self.out.write(f"error: the message is longer than the context ({self.engine.max_seq_len} "
                           "tokens); shorten it\n")
            return ""
        sampling = dataclasses.replace(self.sampling, max_tokens=min(
            self.sampling.max_tokens, self.engine.max_seq_len - len(ids)))
        stream = TextStream(self.chat, ids, self.chat.stop_strings, self.chat.stop_ids, strip_leading=True)
        request = self.engine.submit(ids, sampling)
        stopped = False
        try:
            for event in request:
                if event.token is not None:
                    self.out.write(stream.push(event.token))
                    self.out.flush()
                    if stream.stopped:
                        request.cancel()
                if event.finish_reason == "error":
                    self.out.write(f"\nerror: {event.error}")
        except KeyboardInterrupt:
            request.cancel()
            stopped = True
        self.out.write(stream.finish() + (" [stopped]" if stopped else "") + "\n")
        self.out.flush()
        self.turns.append({"role": "assistant", "content": stream.text})
        return stream.text

    def command(self, line: str) -> bool:
        """Runs a /command; False means quit."""
        name, _, argument = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            self.out.write("(conversation cleared)\n")
        elif name == "/system":
            self.system, self.turns = argument.strip() or None, []
            self.out.write(f"(system prompt {'set' if self.system else 'cleared'}; conversation cleared)\n")
        elif name == "/set":
            self._set(*argument.split())
        else:
            self.out.write(HELP + "\n")
        return True

    def _set(self, *words: str) -> None:
        import dataclasses

        if len(words) != 2 or words[0] not in SETTABLE:
            self.out.write(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTABLE)}\n")
            return
        name, text = words
        try:
            changed = dataclasses.replace(self.sampling, **{name: SETTABLE[name](text)})
            if changed.max_tokens < 1:
                raise ValueError(f"max_tokens must be a positive integer, got {changed.max_tokens}")
            self.engine.check([0], dataclasses.replace(changed, max_tokens=1))
        except (ValueError, LlamaxError) as error:
            self.out.write(f"error: {str(error).splitlines()[0]}\n")
            return
        self.sampling = changed
        self.out.write(f"({name} = {getattr(changed, name)})\n")


def run(session: ChatSession, prompt: str = "you> ") -> None:
    """The read-reply loop until /quit or end of input."""
    while True:
        try:
            line = input(prompt).strip()
        except KeyboardInterrupt:
            session.out.write("\n")
            continue
        except EOFError:
            session.out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        session.out.write("bot> ")
        session.out.flush()
        session.reply(line)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.serve import add_model_arguments

    parser = argparse.ArgumentParser(prog="llamax-chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(max_batch=1)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max_tokens", type=int, default=256, help="reply length limit")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None, help="default: a new one per session")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 1 with a one-line error for a bad checkpoint or option."""
    args = parse_args(argv)
    import dataclasses
    import logging
    import random

    logging.getLogger("absl").setLevel(logging.ERROR)
    from experiments.serve import build_engine
    from llamax.infer.engine import SamplingParams

    engine = None
    try:
        engine, chat, name = build_engine(args)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k,
                                  seed=random.getrandbits(32) if args.seed is None else args.seed,
                                  stop_ids=chat.stop_ids)
        engine.check([0], dataclasses.replace(sampling, max_tokens=1))  # bad options fail now
    except (LlamaxError, OSError) as error:
        if engine is not None:
            engine.stop()
        return fail(f"{type(error).__name__}: {error}", 1, "llamax-chat")
    if sys.stdin.isatty():
        _setup_readline()
    print(f"llamax-chat: {name} (context {engine.max_seq_len} tokens). {HELP}", flush=True)
    try:
        run(ChatSession(engine, chat, sampling, args.system, sys.stdout))
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
