"""Chat templates: render a conversation to text with a checkpoint's Jinja template.

`render_chat` renders like transformers' `apply_chat_template(..., tokenize=False)`: the same
sandbox (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls), the same
helpers (`raise_exception`, `strftime_now`, a `tojson` filter that does not escape HTML), the
tokenizer's special tokens as variables (`bos_token`, `eos_token`, ...) and `{% generation %}`
blocks, whose character spans `render_chat(..., track_generation=True)` reports.

`assistant_spans` finds the characters of every assistant turn (for SFT loss masks): from
`{% generation %}` blocks when the template has them, otherwise turn by turn: the text that
rendering k+1 messages adds to rendering k messages with the generation prompt is turn k.

Built-in templates, for tokenizers that carry none (Meta folders, SentencePiece models):
`LLAMA3_TEMPLATE` (Meta-Llama-3-Instruct's, as on the hub) and `LLAMA2_TEMPLATE`
(Llama-2-chat's).
"""
from __future__ import annotations

import functools
import json
import re
import threading
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamax.errors import DataError

ROLES = ("system", "user", "assistant", "tool", "ipython")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

BUILTIN_TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "llama2": LLAMA2_TEMPLATE}

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of the block.

    Spans are measured as transformers does: the length of everything rendered before the block.
    State is per thread, so grain's tokenizer threads can render with one compiled template.
    """

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self.state = threading.local()

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body
                                      ).set_lineno(lineno)

    def _generation(self, caller) -> str:
        text = caller()
        blocks, spans = getattr(self.state, "blocks", None), getattr(self.state, "spans", None)
        if blocks is not None:
            start = sum(len(block) for block in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & for HTML; chat templates want the JSON text itself.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source); DataError on a Jinja syntax error."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(f"the chat template is not valid Jinja (line {error.lineno}: {error.message})"
                        ) from error


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}`."""
    return bool(_GENERATION_TAG.search(source))


def check_messages(messages: Any) -> list[dict]:
    """Validated copies of chat messages: dicts with a known role and string content.

    Keys whose value is None are dropped, as transformers does (OpenAI-style `content=None`).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError("a conversation must be a non-empty list of {'role', 'content'} messages, "
                        f"got {messages!r:.80}")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"message {index} must be a dict with 'role' and 'content', got "
                            f"{type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"message {index} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"message {index} ({role}) needs a string 'content', got "
                            f"{type(message.get('content')).__name__}")
        clean.append(message)
    return clean


def render_chat(template: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
                variables: Mapping[str, Any] | None = None, track_generation: bool = False):
    """Renders `messages` with the Jinja `template`.

    Args:
        template: Jinja source (a checkpoint's chat template or a `BUILTIN_TEMPLATES` value).
        messages: `[{"role": ..., "content": ...}, ...]`, checked by `check_messages`.
        add_generation_prompt: append the header that starts an assistant reply.
        variables: extra template variables, e.g. `{"bos_token": "<|begin_of_text|>"}`.
        track_generation: also return the `(start, end)` character spans of `{% generation %}`.

    Returns:
        The text, or `(text, spans)` with `track_generation`.

    Raises:
        DataError: bad messages, or the template raised (e.g. `raise_exception`).
    """
    return _render(template, check_messages(messages), add_generation_prompt, variables,
                   track_generation)


def _render(template, messages, add_generation_prompt, variables, track_generation=False):
    compiled = compile_template(template)
    context = {**(variables or {}), "messages": messages, "add_generation_prompt": add_generation_prompt}
    tracker = compiled.environment.extensions[_GenerationTracker.identifier]
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    if track_generation:
        tracker.state.blocks, tracker.state.spans = blocks, spans
    try:
        if track_generation:
            blocks.extend(compiled.generate(**context))
            text = "".join(blocks)
        else:
            text = compiled.render(**context)
    except jinja2.TemplateError as error:
        raise DataError(f"the chat template failed on this conversation: {error}") from error
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise DataError(f"the chat template failed on this conversation ({type(error).__name__}: "
                        f"{error})") from error
    finally:
        tracker.state.blocks = tracker.state.spans = None
    return (text, spans) if track_generation else text


def assistant_spans(template: str, messages: Sequence[Mapping],
                    variables: Mapping[str, Any] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    With `{% generation %}` blocks the spans are the blocks. Otherwise assistant turn k is the text
    that rendering messages[:k+1] adds to rendering messages[:k] with the generation prompt, so
    the assistant header stays untrained and the turn's end-of-turn marker is included (with any
    separator after it: `llamax.data.sft` cuts each span after its first stop token).

    Raises:
        DataError: the template does not render conversation prefixes as prefixes of the whole
            (then it needs `{% generation %}` markers), or it raised.
    """
    messages = check_messages(messages)
    if has_generation_blocks(template):
        return render_chat(template, messages, variables=variables, track_generation=True)
    text = render_chat(template, messages, variables=variables)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(template, messages[:index], True, variables)
        through = _render(template, messages[:index + 1], False, variables)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise DataError(
                f"the chat template renders the first {index} messages (with the generation prompt) "
                f"or the first {index + 1} as text that is not a prefix of the whole conversation, "
                "so assistant turns cannot be found turn by turn; mark them with "
                "{% generation %}...{% endgeneration %} in the template")
        spans.append((len(prompt), len(through)))
    return text, spans
