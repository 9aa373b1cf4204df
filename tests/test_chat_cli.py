"""`python -m experiments.chat` driven through a real pseudo-terminal: replies equal the greedy
reply `llamax.sample.generate` gives the conversation so far, /system, /reset and /set work,
Ctrl-C (the byte a terminal sends) stops a reply but not the chat, history is saved."""
import os
import pty
import re
import select
import signal
import sys
import time
import warnings

import pytest

from llamax.sample import generate
from serve_fixtures import (REPLY_TOKENS, greedy_reply, served_checkpoint, served_model,  # noqa: F401
                            small_tokenizer, tiny_hf_dir)

PROMPT = "you> "
LONG_TOKENS = 400


class Terminal:
    """A child process on a pty: write keystrokes, read until the chat prompt returns."""

    def __init__(self, argv: list[str], env: dict):
        with warnings.catch_warnings():  # the child execs at once: JAX's threads do not matter
            warnings.simplefilter("ignore", RuntimeWarning)
            self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, as in a real shell
            # A shell starts a program with Ctrl-C's SIGINT at its default. A test run launched in
            # the background (`cmd &` in a script, some CI runners) ignores SIGINT, an exec keeps
            # that, and the chat could then not be interrupted (2 CI runs failed so).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.buffer = b""

    def read_until(self, marker: str, timeout: float = 300) -> str:
        """Everything up to and including the next `marker`; the rest stays buffered."""
        deadline = time.monotonic() + timeout
        needle = marker.encode()
        while needle not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} within {timeout} s; got {self.buffer[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the chat exited; output: {self.buffer[-2000:]!r}"
                self.buffer += chunk
        end = self.buffer.index(needle) + len(needle)
        out, self.buffer = self.buffer[:end], self.buffer[end:]
        return out.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def say(self, line: str) -> str:
        """Sends a line; returns the reply text printed after 'bot> ' (before the next prompt)."""
        self.send(line + "\n")
        self.read_until("bot> ")
        return self.read_until(PROMPT)[:-len(PROMPT) - 1]  # minus the newline ending the reply

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def _long_reply(model, system):
    """A message whose greedy reply runs long (no stop token early), so Ctrl-C lands mid-reply;
    returns (message, reply text)."""
    config, params, chat = model
    for text in ("Speak!", "Who is there?", "O Romeo, Romeo!", "Good night.", "Bernardo?"):
        ids = chat.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": text}])
        new = generate(config, params, [ids], LONG_TOKENS, eos_id=chat.stop_ids[0])[0]
        if len(new) == LONG_TOKENS:
            return text, chat.decode(ids + new)[len(chat.decode(ids)):].lstrip()
    pytest.fail("no candidate message has a long greedy reply")


@pytest.mark.slow
def test_chat_cli_in_a_pty(served_checkpoint, served_model, tmp_path):
    system = "You are a player."
    long_message, long_reply = _long_reply(served_model, system)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), HOME=str(tmp_path), TERM="dumb",
               PYTHONIOENCODING="utf-8")
    terminal = Terminal(["-m", "experiments.chat", "--checkpoint", str(served_checkpoint),
                         "--chat_template", "plain", "--temperature", "0",
                         "--max_tokens", str(REPLY_TOKENS), "--max_seq_len", "512"], env)
    try:
        banner = terminal.read_until(PROMPT)
        assert "llamax-chat: served_model (context 512 tokens)" in banner

        terminal.send(f"/system {system}\n")
        assert "(system prompt set; conversation cleared)" in terminal.read_until(PROMPT)
        conversation = [{"role": "system", "content": system}]
        chat = served_model[2]
        for text in ("Long live the king!", "Who is there?"):  # the second sees the first turn
            conversation.append({"role": "user", "content": text})
            expected = greedy_reply(served_model, chat.prompt_ids(conversation), chat=True)[1]
            assert terminal.say(text) == expected
            conversation.append({"role": "assistant", "content": expected})

        terminal.send("/reset\n")
        assert "(conversation cleared)" in terminal.read_until(PROMPT)
        fresh = [conversation[0], {"role": "user", "content": "Who is there?"}]  # system prompt stays
        assert terminal.say("Who is there?") == greedy_reply(served_model, chat.prompt_ids(fresh), chat=True)[1]

        terminal.send(f"/set max_tokens {LONG_TOKENS}\n")
        assert f"(max_tokens = {LONG_TOKENS})" in terminal.read_until(PROMPT)
        terminal.send("/set temperature -1\n")
        assert "error: temperature must be >= 0" in terminal.read_until(PROMPT)
        terminal.send("/reset\n")
        terminal.read_until(PROMPT)
        terminal.send(long_message + "\n")
        terminal.read_until("bot> ")
        while not re.search(rb"\S", terminal.buffer):  # the reply has started streaming
            terminal.buffer += os.read(terminal.fd, 65536)
        terminal.send("\x03")  # Ctrl-C, as the terminal sends it: SIGINT to the chat
        stopped = terminal.read_until(PROMPT)
        assert stopped.endswith(f" [stopped]\n{PROMPT}")
        # The terminal echoes ^C where the stream is when the key arrives: tokens already on their
        # way may follow it. The interrupt also makes the line discipline drop output still queued
        # for the reader, so only the text before the echo is sure to be whole.
        partial = stopped[:-len(f" [stopped]\n{PROMPT}")]
        before_interrupt = partial.split("^C")[0]
        # Cut short, and what was read before ^C is the start of the greedy reply (the last
        # character may be half of a multi-byte one, printed as U+FFFD).
        assert 0 < len(partial.replace("^C", "")) < len(long_reply)
        assert long_reply.startswith(before_interrupt[:-1])

        # At the prompt, Ctrl-C gives a fresh line and the chat goes on. readline discards keys
        # that arrive while it sets the terminal up for the next line (it drains input when it
        # changes the terminal's mode): a key sent right as the prompt appears may never arrive,
        # so the key is sent again until a prompt comes (this hung 2 runs in 5 before).
        for _ in range(10):
            terminal.send("\x03")
            try:
                terminal.read_until(PROMPT, timeout=5)
                break
            except AssertionError:
                continue
        else:
            pytest.fail("Ctrl-C at the prompt never gave a fresh prompt")
        assert terminal.say("Who is there?")  # still chatting after both interrupts
        terminal.send("\x04")  # Ctrl-D
        assert terminal.wait() == 0
    finally:
        try:
            os.kill(terminal.pid, 9)
        except ProcessLookupError:
            pass
        os.close(terminal.fd)
    history = (tmp_path / ".llamax_chat_history").read_text()
    assert "Long live the king!" in history and "/reset" in history
