"""A served Llama-3 checkpoint stops where transformers' `generate` stops: at every EOS id its
generation_config.json declares (`<|eot_id|>` ends a chat turn, `<|end_of_text|>` a document),
read through `llamax.convert.identity`. The reference is transformers on the same HF folder,
driven by the official `openai` client against the server."""
import shutil

import openai
import pytest
import torch
import transformers

from hf_models import make_hf_model
from llama3_assets import BOS_ID, END_OF_TEXT_ID, EOT_ID, VOCAB_SIZE, llama3_tokenizer_dir  # noqa: F401
from serve_fixtures import running_server

MAX_TOKENS = 16
MESSAGES = [{"role": "system", "content": "You are a player."},
            {"role": "user", "content": "Who is there?"}]
COMPLETION = "To be, or not to be, that is the"


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy new tokens with no stop id at all (the model as trained, before the swap below)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _make_it_stop(model, prompt: list[int], stop_id: int) -> int:
    """Swaps the output rows of `stop_id` and of a token the model greedily writes a few tokens in,
    so the model writes `stop_id` there instead: earlier argmaxes are neither row, so they stay.
    Returns how many tokens come before the stop."""
    produced = _greedy(model, prompt, MAX_TOKENS - 4)
    index = next(i for i in range(3, len(produced)) if produced[i] not in produced[:i]
                 and produced[i] < BOS_ID and stop_id not in produced[:i])
    with torch.no_grad():
        weight = model.lm_head.weight  # [vocab, hidden]
        weight[[produced[index], stop_id]] = weight[[stop_id, produced[index]]].clone()
    return index


@pytest.mark.parametrize("endpoint,stop_id", [("chat", EOT_ID), ("completions", END_OF_TEXT_ID)])
def test_served_llama3_stops_at_its_declared_eos_ids_like_transformers(endpoint, stop_id, tmp_path,
                                                                        llama3_tokenizer_dir):  # noqa: F811
    from llamax.convert.hub import load_any
    from llamax.infer.chat_format import load_serving_tokenizer
    from llamax.infer.engine import Engine
    from llamax.infer.server import create_app

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    if endpoint == "chat":
        rendered = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        prompt = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        prompt = hf_tokenizer(COMPLETION)["input_ids"]  # <|begin_of_text|> + the text
    model = make_hf_model("llama3_gqa", vocab_size=VOCAB_SIZE, max_position_embeddings=512,
                          bos_token_id=BOS_ID, eos_token_id=[END_OF_TEXT_ID, EOT_ID], pad_token_id=None)
    stop_at = _make_it_stop(model, prompt, stop_id)
    folder = tmp_path / "llama3"
    model.save_pretrained(folder)
    shutil.copytree(llama3_tokenizer_dir, folder, dirs_exist_ok=True)

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = torch.tensor([prompt])
    with torch.no_grad():  # the folder's generation_config.json: eos ids [<|end_of_text|>, <|eot_id|>]
        expected = reference.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                      max_new_tokens=MAX_TOKENS)[0, len(prompt):].tolist()
    assert expected[-1] == stop_id and len(expected) == stop_at + 1  # transformers stops there too
    expected_text = hf_tokenizer.decode(expected[:-1])

    chat = load_serving_tokenizer(folder)
    assert {END_OF_TEXT_ID, EOT_ID} <= set(chat.stop_ids)
    config, params = load_any(folder)
    engine = Engine(config, params, max_batch=2, max_seq_len=128).start()
    try:
        with running_server(create_app(engine, chat, "llama3")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            if endpoint == "chat":
                assert chat.prompt_ids(MESSAGES) == prompt
                response = client.chat.completions.create(model="llama3", messages=MESSAGES,
                                                          max_tokens=MAX_TOKENS, temperature=0)
                text, expected_text = response.choices[0].message.content, expected_text.lstrip()
            else:
                assert chat.completion_ids(COMPLETION) == prompt
                response = client.completions.create(model="llama3", prompt=COMPLETION,
                                                     max_tokens=MAX_TOKENS, temperature=0)
                text = response.choices[0].text
    finally:
        engine.stop()
    assert text == expected_text
    assert response.choices[0].finish_reason == "stop"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt), len(expected))
