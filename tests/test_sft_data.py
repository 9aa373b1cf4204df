"""SFT: record parsing, chat templates, and loss masks that cover exactly the response tokens."""
import json

import numpy as np
import pytest

from data_fixtures import chat_tokenizer, small_tokenizer  # noqa: F401  (session fixtures)
from llama3_assets import EOT_ID, llama3_tokenizer_dir  # noqa: F401  (session fixture)
from llamax.data import chat_templates, sft
from llamax.data.documents import read_documents
from llamax.data.loader import make_loader
from llamax.data.packing import as_document, pack_documents
from llamax.errors import ConfigError, DataError
from llamax.tokenizer import HFTokenizer, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer in verse."},
    {"role": "user", "content": "Who is the Prince of Denmark?"},
    {"role": "assistant", "content": "Hamlet, the melancholy Dane."},
    {"role": "user", "content": "And his mother?"},
    {"role": "assistant", "content": "Gertrude, the queen."},
]


def scored_targets(tokens, weights, seq_len=512):
    rows = list(pack_documents([as_document(tokens, weights)], seq_len))
    return np.concatenate([r["targets"][r["loss_mask"] == 1] for r in rows]).tolist()


def test_parse_prompt_response_and_messages():
    assert sft.parse_record({"prompt": "p", "response": "r", "system": "s"}) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"}]
    assert sft.parse_record({"messages": CONVERSATION}) == CONVERSATION


@pytest.mark.parametrize("record, match", [
    ([1, 2], "JSON object"),
    ({"prompt": "only"}, "needs 'prompt' and 'response'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "only come first"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
])
def test_parse_rejects_bad_records(record, match):
    with pytest.raises(ValueError, match=match):
        sft.parse_record(record)


def test_llama2_rendering_text():
    text = chat_templates.to_text(chat_templates.render(CONVERSATION, "llama2"))
    assert text == ("<s>[INST] <<SYS>>\nAnswer in verse.\n<</SYS>>\n\nWho is the Prince of Denmark? "
                    "[/INST]Hamlet, the melancholy Dane.</s><s>[INST] And his mother? [/INST]"
                    "Gertrude, the queen.</s>")


def test_llama3_rendering_text():
    text = chat_templates.to_text(chat_templates.render(CONVERSATION[:3], "llama3"))
    assert text == ("<s><|start_header_id|>system<|end_header_id|>\n\nAnswer in verse.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWho is the Prince of Denmark?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                    "Hamlet, the melancholy Dane.<|eot_id|></s>")


def expected_response_ids(tok, template):
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    if template == "llama2":
        return [i for a in answers for i in tok.encode(a, bos=False) + [tok.eos_id]]
    if template == "llama3":
        return [i for a in answers for i in tok.encode(a + "<|eot_id|>", bos=False)] + [tok.eos_id]
    return [i for a in answers for i in tok.encode(a, bos=False)] + [tok.eos_id]


@pytest.mark.parametrize("template", ["llama2", "llama3", "plain"])
@pytest.mark.parametrize("fixture", ["small_tokenizer", "chat_tokenizer"])
def test_loss_mask_covers_exactly_the_response_tokens(template, fixture, request):
    tok = request.getfixturevalue(fixture)
    tokens, weights = sft.encode_conversation(CONVERSATION, tok, template)
    assert tokens[0] == tok.bos_id and tokens.dtype == np.int32
    assert scored_targets(tokens, weights) == expected_response_ids(tok, template)


def test_llama3_markers_are_single_pieces_only_if_trained(small_tokenizer, chat_tokenizer):
    def count(tok):
        tokens, _ = sft.encode_conversation(CONVERSATION[1:3], tok, "llama3")
        return len(tokens)
    assert count(chat_tokenizer) < count(small_tokenizer)  # encoded as text without the symbols
    tokens, _ = sft.encode_conversation(CONVERSATION[1:3], small_tokenizer, "llama3")
    assert "<|eot_id|>" in small_tokenizer.decode(tokens)


def test_llama2_requires_alternating_turns(small_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match="alternate"):
        sft.encode_conversation(bad, small_tokenizer, "llama2")
    with pytest.raises(DataError, match="unknown chat template"):
        sft.encode_conversation(CONVERSATION, small_tokenizer, "chatml")


def test_sft_jsonl_through_the_loader(tmp_path, small_tokenizer):
    path = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    docs = read_documents([path], sft_format=True)
    loader = make_loader(docs, small_tokenizer, seq_len=64, global_batch_size=4, num_epochs=1,
                         shuffle=False, sft_template="llama2")
    scored = [t for batch in loader for t in batch["targets"][batch["loss_mask"] == 1].tolist()]
    tok = small_tokenizer
    assert scored == [i for r in records for i in tok.encode(r["response"], bos=False) + [tok.eos_id]]


def test_malformed_sft_line_names_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"sft\.jsonl:2: an SFT record needs"):
        read_documents([path], sft_format=True)
    with pytest.raises(DataError, match="must be JSONL"):
        read_documents([_write(tmp_path / "x.txt", "text")], sft_format=True)


def _write(path, text):
    path.write_text(text)
    return path


# ---- sft_template='checkpoint': the tokenizer's own chat template -----------------------------

GENERATION_TEMPLATE = (  # Llama-3's template with the assistant text marked for training
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _answers_with(tok, marker_id):
    return [i for m in CONVERSATION if m["role"] == "assistant"
            for i in tok.encode(m["content"], bos=False) + [marker_id]]


@pytest.mark.parametrize("kind", ["hf_folder", "meta_tiktoken"])
def test_checkpoint_template_scores_exactly_the_assistant_turns(llama3_tokenizer_dir, kind):
    path = llama3_tokenizer_dir if kind == "hf_folder" else llama3_tokenizer_dir / "original/tokenizer.model"
    tok = load_tokenizer(path)  # the HF folder's template, or Meta's built-in Llama-3 one
    tokens, weights = sft.encode_conversation(CONVERSATION, tok, "checkpoint")
    assert tokens.tolist() == tok.encode(tok.apply_chat_template(CONVERSATION), bos=False,
                                         allow_special=True)
    assert scored_targets(tokens, weights) == _answers_with(tok, EOT_ID)


def test_generation_blocks_give_transformers_assistant_mask(llama3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hub = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    expected = hub.apply_chat_template(CONVERSATION, chat_template=GENERATION_TEMPLATE, return_dict=True,
                                       return_assistant_tokens_mask=True)
    folder = load_tokenizer(llama3_tokenizer_dir)
    tok = HFTokenizer(folder.backend, bos_id=folder.bos_id, eos_id=folder.eos_id,
                      chat_template=GENERATION_TEMPLATE)
    tokens, weights = sft.encode_conversation(CONVERSATION, tok, "checkpoint")
    assert tokens.tolist() == expected["input_ids"]
    assert weights.astype(int).tolist() == expected["assistant_masks"]
    assert sum(expected["assistant_masks"]) == len(_answers_with(tok, EOT_ID))


def test_turn_by_turn_needs_a_prefix_stable_template(llama3_tokenizer_dir):
    folder = load_tokenizer(llama3_tokenizer_dir)
    unstable = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }};{% endfor %}"
    tok = HFTokenizer(folder.backend, bos_id=folder.bos_id, eos_id=folder.eos_id, chat_template=unstable)
    with pytest.raises(DataError, match=r"not a prefix.*\{% generation %\}"):
        sft.encode_conversation(CONVERSATION, tok, "checkpoint")


def test_checkpoint_template_through_the_loader(tmp_path, llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir / "original" / "tokenizer.model")
    path = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Question {i}? <|eot_id|>", "response": f"Answer number {i}."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    loader = make_loader(read_documents([path], sft_format=True), tok, seq_len=64, global_batch_size=4,
                         num_epochs=1, shuffle=False, sft_template="checkpoint")
    scored = [t for batch in loader for t in batch["targets"][batch["loss_mask"] == 1].tolist()]
    assert scored == [i for r in records for i in tok.encode(r["response"], bos=False) + [EOT_ID]]
    with pytest.raises(ConfigError, match=r"unknown sft_template 'chatml'.*'checkpoint'"):
        make_loader(["x"], tok, seq_len=8, global_batch_size=1, sft_template="chatml")


def test_builtin_llama3_spans_make_special_tokens_for_llama3_tokenizers(llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir / "original" / "tokenizer.model")
    tokens, weights = sft.encode_conversation(CONVERSATION[1:3], tok, "llama3")
    assert tokens.tolist().count(EOT_ID) == 2 and tokens[0] == tok.bos_id
    answer = tok.encode(CONVERSATION[2]["content"], bos=False)
    assert scored_targets(tokens, weights) == answer + [EOT_ID, tok.eos_id]
