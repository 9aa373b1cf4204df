"""Chat templates: llamax's rendering equals transformers' apply_chat_template; clear errors."""
import json
import shutil

import pytest

from data_fixtures import small_tokenizer  # noqa: F401  (session fixture)
from llama3_assets import BOS_ID, EOT_ID, llama3_tokenizer_dir  # noqa: F401  (session fixture)
from llamax.errors import DataError
from llamax.tokenizer import HFTokenizer, load_tokenizer
from llamax.tokenizer.chat import LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, render_chat

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "Answer in verse."}
USER = {"role": "user", "content": "  Who is the Prince of Denmark?\n"}
ASSISTANT = {"role": "assistant", "content": "Hamlet, the melancholy Dane."}
CONVERSATIONS = [
    [USER],
    [SYSTEM, USER],
    [USER, ASSISTANT],
    [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "And his mother? <|eot_id|>"},
     {"role": "assistant", "content": "Gertrude, the queen."}],
]

# Exercises what checkpoint templates use: namespace, loop controls, tojson, raise_exception,
# strftime_now, `is defined`, string methods, bos/eos variables, whitespace control.
FEATURE_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
  {%- if message['role'] not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('unexpected role ' + message['role']) }}
  {%- endif %}
  {%- if message['role'] == 'system' %}{% continue %}{% endif %}
  {%- set ns.turns = ns.turns + 1 %}
[{{ ns.turns }}|{{ message['role'] | upper }}] {{ message['content'] | trim | tojson }}
{%- if message.name is defined %} ({{ message.name }}){% endif %}
{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}[{{ strftime_now('%Y') | length }}|ASSISTANT]{% endif %}"""


@pytest.fixture(scope="module")
def hub_and_ours(llama3_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir), load_tokenizer(llama3_tokenizer_dir)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_checkpoint_template_renders_like_transformers(hub_and_ours, llama3_tokenizer_dir, conversation,
                                                       add_generation_prompt):
    hub, ours = hub_and_ours
    expected = hub.apply_chat_template(conversation, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    assert ours.chat_template is not None
    assert ours.apply_chat_template(conversation, add_generation_prompt) == expected
    # Meta's file has no template: its built-in Llama-3 template renders the same text.
    meta_file = load_tokenizer(llama3_tokenizer_dir / "original" / "tokenizer.model")
    assert meta_file.chat_template is None
    assert meta_file.apply_chat_template(conversation, add_generation_prompt) == expected
    ids = hub.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                  return_dict=False)
    assert ours.encode(expected, bos=False, allow_special=True) == ids
    assert meta_file.encode(expected, bos=False, allow_special=True) == ids
    # As in transformers, content that spells a marker becomes the marker in a rendered chat.
    spelled = sum(message["content"].count("<|eot_id|>") for message in conversation)
    assert ids[0] == BOS_ID and ids.count(EOT_ID) == len(conversation) + spelled


@pytest.mark.parametrize("template", [FEATURE_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE])
@pytest.mark.parametrize("conversation", [[USER], [SYSTEM, USER, ASSISTANT],
                                          [USER, dict(ASSISTANT, name="Horatio")]])
def test_jinja_features_render_like_transformers(hub_and_ours, template, conversation):
    hub, ours = hub_and_ours
    ours = HFTokenizer(ours.backend, bos_id=ours.bos_id, eos_id=ours.eos_id, chat_template=template)
    hub.eos_token = "<|eot_id|>"
    for add_generation_prompt in (False, True):
        assert ours.apply_chat_template(conversation, add_generation_prompt) == hub.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_template_files_and_named_templates_are_read_like_transformers(llama3_tokenizer_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(llama3_tokenizer_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": FEATURE_TEMPLATE}]
    config_path.write_text(json.dumps(config))
    for _ in range(2):  # the list form, then chat_template.jinja (transformers 5) winning over it
        hub = transformers.AutoTokenizer.from_pretrained(folder)
        expected = hub.apply_chat_template(CONVERSATIONS[-1], tokenize=False)
        assert load_tokenizer(folder).apply_chat_template(CONVERSATIONS[-1]) == expected
        (folder / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
    assert "[INST]" in expected
    config["chat_template"] = [{"name": "tool_use", "template": "x"}]
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(DataError, match="none named 'default'"):
        load_tokenizer(folder)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "bot", "content": "hi"}], r"message 0 has role 'bot'; expected one of"),
    ([USER, {"role": "assistant"}], r"message 1 \(assistant\) needs a string 'content'"),
    ([USER, {"role": "assistant", "content": ["a", "b"]}], "needs a string 'content'"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([USER, "hi"], "message 1 must be a dict"),
])
def test_bad_messages_get_one_clear_error(hub_and_ours, messages, match):
    _, ours = hub_and_ours
    with pytest.raises(DataError, match=match):
        ours.apply_chat_template(messages)


@pytest.mark.parametrize("template, match", [
    (LLAMA2_TEMPLATE, "failed on this conversation: Conversation roles must alternate"),
    ("{{ messages[5]['content'] }}", "failed on this conversation"),
    ("{{ raise_exception('no system messages, please') }}", "no system messages, please"),
    ("{{ ''.__class__.__mro__ }}", "failed on this conversation"),  # the sandbox refuses
    ("{% for m in messages %}", r"not valid Jinja \(line 1"),
])
def test_templates_that_raise_get_one_clear_error(template, match):
    with pytest.raises(DataError, match=match):
        render_chat(template, [USER, USER], variables={"bos_token": "<s>", "eos_token": "</s>"})


def test_broken_template_in_a_folder_is_refused_at_load(llama3_tokenizer_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(llama3_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text("{% if messages %}unclosed")
    with pytest.raises(DataError, match=r"hf: the chat template is not valid Jinja"):
        load_tokenizer(folder)


def test_sentencepiece_uses_llama2_template_and_encodes_control_pieces(small_tokenizer):
    tokenizer = small_tokenizer
    text = tokenizer.apply_chat_template([SYSTEM, USER, ASSISTANT])
    assert text.startswith("<s>[INST] <<SYS>>\nAnswer in verse.\n<</SYS>>\n\n  Who is the Prince")
    assert text.endswith("[/INST] Hamlet, the melancholy Dane. </s>")
    ids = tokenizer.encode(text, bos=False, allow_special=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    plain = tokenizer.encode(text, bos=False)
    assert tokenizer.bos_id not in plain and len(plain) > len(ids)
