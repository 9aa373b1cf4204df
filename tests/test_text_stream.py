"""Incremental detokenization against sentencepiece decoding the whole sequence at once, stop
strings, and chat prompts against the SFT encoding of the same conversation."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data_fixtures import small_tokenizer  # noqa: F401
from llamax.data.sft import encode_conversation
from llamax.errors import DataError
from llamax.infer.chat_format import ChatFormat
from llamax.infer.text_stream import TextStream

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


def _streamed(stream, ids):
    pieces = [stream.push(t) for t in ids]
    return "".join(pieces) + stream.finish(), pieces


@settings(max_examples=150)
@given(context=TEXT, continuation=TEXT)
def test_streamed_text_equals_decoding_everything_at_once(small_tokenizer, context, continuation):  # noqa: F811
    """Unicode outside the vocabulary (emoji, CJK, combining marks) arrives as byte pieces that
    only make a character together: the stream waits for them and still ends up exact."""
    chat = ChatFormat(small_tokenizer, "plain")
    context_ids = small_tokenizer.encode(context, bos=True)
    ids = small_tokenizer.encode(context + continuation, bos=True)[len(context_ids):]
    text, pieces = _streamed(TextStream(chat, context_ids), ids)
    full = small_tokenizer.decode(context_ids + ids)
    assert text == full[len(small_tokenizer.decode(context_ids)):]
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in continuation  # never half a character


@settings(max_examples=100)
@given(ids=st.lists(st.integers(3, 511), min_size=1, max_size=30))
def test_arbitrary_ids_including_broken_byte_sequences_decode_like_the_whole(small_tokenizer, ids):  # noqa: F811
    chat = ChatFormat(small_tokenizer, "plain")
    context = small_tokenizer.encode("Hark!", bos=True)
    text, _ = _streamed(TextStream(chat, context), ids)
    assert text == small_tokenizer.decode(context + ids)[len(small_tokenizer.decode(context)):]


@settings(max_examples=100)
@given(text=st.text("ab c", min_size=1, max_size=30), stop=st.text("ab c", min_size=1, max_size=3))
def test_stop_strings_cut_before_the_first_match_and_never_leak(small_tokenizer, text, stop):  # noqa: F811
    chat = ChatFormat(small_tokenizer, "plain")
    context = [small_tokenizer.bos_id]
    ids = small_tokenizer.encode(text, bos=False)
    stream = TextStream(chat, context, stop=[stop, "zzz"])
    full = small_tokenizer.decode(context + ids)
    expected = full[:full.find(stop)] if stop in full else full
    emitted = ""
    for token in ids:
        emitted += stream.push(token)
        assert expected.startswith(emitted)  # nothing past the stop string is ever shown
    emitted += stream.finish()
    assert emitted == expected and stream.stopped == (stop in full)


def test_eos_is_never_text_and_a_chat_reply_loses_its_leading_space(small_tokenizer):  # noqa: F811
    chat = ChatFormat(small_tokenizer, "plain")
    ids = small_tokenizer.encode(" Good night, good night!", bos=False)
    stream = TextStream(chat, [small_tokenizer.bos_id], skip_ids=chat.stop_ids, strip_leading=True)
    text, _ = _streamed(stream, ids + [small_tokenizer.eos_id])
    assert text == "Good night, good night!"
    assert stream.token_offsets[0] == 0 and len(stream.token_offsets) == len(ids) + 1


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"},
                {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "Long live!"},
                {"role": "assistant", "content": "Bernardo?"}]


@pytest.mark.parametrize("template", ["plain", "llama2", "llama3"])
def test_chat_prompt_is_what_sft_trained_the_reply_to_follow(small_tokenizer, template):  # noqa: F811
    tokens, weights = encode_conversation(CONVERSATION, small_tokenizer, template)
    last_reply = int(np.flatnonzero(np.diff(np.concatenate([[0], weights])) > 0)[-1])
    prompt = ChatFormat(small_tokenizer, template).prompt_ids(CONVERSATION[:-1])
    assert prompt == tokens[:last_reply].tolist()


def test_chat_format_stop_markers_and_errors(small_tokenizer):  # noqa: F811
    assert ChatFormat(small_tokenizer, "llama3").stop_strings == ("<|eot_id|>",)
    assert ChatFormat(small_tokenizer, "llama3").stop_ids == (small_tokenizer.eos_id,)  # not one piece here
    with pytest.raises(DataError, match="unknown chat template 'chatml'"):
        ChatFormat(small_tokenizer, "chatml")
    with pytest.raises(DataError, match="must alternate"):
        ChatFormat(small_tokenizer, "llama2").prompt_ids([{"role": "assistant", "content": "Hi"}])
    with pytest.raises(DataError, match="messages is empty"):
        ChatFormat(small_tokenizer, "plain").prompt_ids([])


def test_a_training_run_is_served_with_the_tokenizer_it_recorded(small_tokenizer, tmp_path):  # noqa: F811
    import shutil

    from llamax import run_dir
    from llamax.config import get_preset
    from llamax.infer.chat_format import load_serving_tokenizer

    run = tmp_path / "run"
    (run / run_dir.CHECKPOINTS_DIR).mkdir(parents=True)
    run_dir.write_model_config(run, get_preset("tiny", vocab_size=512))
    with pytest.raises(DataError, match="has no tokenizer of its own.*--tokenizer"):
        load_serving_tokenizer(run)
    (run / run_dir.TOKENIZER_DIR).mkdir()
    shutil.copy(small_tokenizer.path, run / run_dir.TOKENIZER_DIR / "tokenizer.model")
    chat = load_serving_tokenizer(run, template="plain", model_vocab_size=512)
    assert chat.encode("Hark!") == small_tokenizer.encode("Hark!", bos=False)
    with pytest.raises(DataError, match="has 512 pieces but the model's vocab_size is 256"):
        load_serving_tokenizer(run, model_vocab_size=256)


def test_a_run_is_served_stopping_at_every_eos_id_it_recorded(small_tokenizer, tmp_path):  # noqa: F811
    """special_ids.json (a run's record of its checkpoint's ids) adds stop ids the tokenizer lacks."""
    from llamax import run_dir
    from llamax.config import get_preset
    from llamax.infer.chat_format import load_serving_tokenizer
    from llamax.tokenizer import SpecialIds

    run = tmp_path / "run"
    (run / run_dir.CHECKPOINTS_DIR).mkdir(parents=True)
    run_dir.write_model_config(run, get_preset("tiny", vocab_size=512))
    run_dir.write_tokenizer(run, small_tokenizer.path, SpecialIds(small_tokenizer.bos_id,
                                                                  (small_tokenizer.eos_id, 77), None))
    chat = load_serving_tokenizer(run, template="plain", model_vocab_size=512)
    assert chat.stop_ids == tuple(sorted({small_tokenizer.eos_id, 77}))
