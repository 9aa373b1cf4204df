"""A real checkpoint's tokenizer (SmolLM2-135M-Instruct, from its GGUF) against transformers'."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamax.data import corpus, sft
from llamax.tokenizer import HFTokenizer, load_tokenizer
from real_model import smollm2_dir  # noqa: F401  (session fixture)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # builds the model folder once (~30 s), then reuses it

IM_START, IM_END = 1, 2
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare."},
     {"role": "user", "content": "When? <|im_end|>"},
     {"role": "assistant", "content": "Around 1600."}],
]


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def missing_bytes(pair):
    return _bytes_missing_from(pair[0])


def _bytes_missing_from(hub) -> set[int]:
    """Bytes without a token: SmolLM2's byte-level vocabulary lacks 21 (e.g. 0xF1, which starts
    4-byte UTF-8), so transformers and llamax alike drop them: such text cannot round-trip."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = hub.get_vocab()
    return {byte for byte, char in bytes_to_unicode().items() if char not in vocab}


def test_folder_metadata(pair, smollm2_dir):
    hub, ours = pair
    assert isinstance(ours, HFTokenizer) and (smollm2_dir / "chat_template.jinja").is_file()
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (IM_START, IM_END, IM_END, 49152)
    assert ours.stop_ids == (IM_END,) and not ours.add_bos  # ChatML: no BOS on plain text
    assert ours.chat_template == hub.chat_template


def test_corpus_encodes_and_decodes_like_transformers(pair):
    hub, ours = pair
    plays = [corpus.read_play(p) for p in corpus.shakespeare_files("validation")]
    expected = hub(plays)["input_ids"]
    assert ours.encode_batch(plays, bos=True) == expected
    assert [ours.decode(ids) for ids in expected] == [hub.decode(ids) for ids in expected] == plays
    assert sum(map(len, expected)) > 150_000  # 171k: SmolLM2 has 49k tokens
    print(f"\nSmolLM2: {sum(map(len, expected))} corpus tokens equal to transformers'")


TEXT = st.lists(st.one_of(
    st.sampled_from(["<|im_end|>", "<|im_start|>user", "<|endoftext|>", "😀", "東京", "e\u0301", "  \n\t",
                     "1234567", "'s", " Hamlet", "\u00a0"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)), max_size=12).map("".join)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT)
def test_any_text_encodes_like_transformers(pair, missing_bytes, text):
    hub, ours = pair
    plain = hub(text, split_special_tokens=True)["input_ids"]
    assert ours.encode(text) == plain
    assert ours.encode(text, allow_special=True) == hub(text)["input_ids"]
    assert ours.decode(plain) == hub.decode(plain)
    if not set(text.encode()) & missing_bytes:
        assert ours.decode(plain) == text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_renders_like_transformers(pair, conversation, add_generation_prompt):
    hub, ours = pair
    text = hub.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt) == text
    assert ours.encode(text, bos=False, allow_special=True) == hub.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, return_dict=False)


def test_sft_scores_each_answer_and_its_im_end(pair):
    _, ours = pair
    conversation = CONVERSATIONS[1]
    tokens, weights = sft.encode_conversation(conversation, ours, "checkpoint")
    trained = [t for t, w in zip(tokens.tolist(), weights) if w]
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert trained == [i for a in answers for i in ours.encode(a) + [IM_END]]
