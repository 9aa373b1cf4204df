"""The OpenAI-compatible server, driven by the official `openai` client (and raw HTTP for bad
input) against a tiny model on 127.0.0.1: outputs equal `llamax.sample.generate`, concurrency,
disconnects, errors, the API key and the CLI."""
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the pinned openai package is built on
import jax
import numpy as np
import openai
import pytest

from llamax.infer.chat_format import ChatFormat
from llamax.infer.engine import Engine
from llamax.infer.server import create_app
from llamax.model import Llama
from serve_fixtures import (REPLY_TOKENS, free_port, greedy_reply, running_server,  # noqa: F401
                            served_checkpoint, served_model, small_tokenizer, tiny_hf_dir)

MODEL = "tiny-test"
MAX_SEQ_LEN = 512
PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:", "KING HENRY:\nWhat",
           "O, speak again, bright angel! for thou art as glorious to this night, being o'er my head,"
           " as is a winged messenger of heaven unto the white-upturned wondering eyes of mortals"]


@pytest.fixture(scope="module")
def engine(served_model):
    config, params, _ = served_model
    engine = Engine(config, params, max_batch=8, max_seq_len=MAX_SEQ_LEN).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def base_url(engine, served_model):
    with running_server(create_app(engine, served_model[2], MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _finish_reason(served_model, new):
    return "stop" if new[-1] in served_model[2].stop_ids else "length"


def _completion_ids(served_model, prompt):
    return served_model[2].completion_ids(prompt)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_text_equals_generate(client, served_model, stream):
    for prompt in PROMPTS[:3]:
        ids = _completion_ids(served_model, prompt)
        new, expected = greedy_reply(served_model, ids)
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=REPLY_TOKENS, temperature=0)
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish, usage = chunks[-1].choices[0].finish_reason, chunks[-1].usage
        else:
            response = client.completions.create(**kwargs)
            text, finish, usage = response.choices[0].text, response.choices[0].finish_reason, response.usage
        assert text == expected
        assert finish == _finish_reason(served_model, new)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
            (len(ids), len(new), len(ids) + len(new))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_reply_equals_generate_on_the_templated_prompt(client, served_model, stream):
    messages = [{"role": "system", "content": "You are a player."},
                {"role": "user", "content": "Who is there?"},
                {"role": "assistant", "content": "Nay, answer me."},
                {"role": "user", "content": "Long live the king!"}]
    ids = served_model[2].prompt_ids(messages)
    assert ids[0] == served_model[2].tokenizer.bos_id
    new, expected = greedy_reply(served_model, ids, chat=True)
    kwargs = dict(model=MODEL, messages=messages, max_tokens=REPLY_TOKENS, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                     **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: own chunk
        usage = chunks[-1].usage
    else:
        response = client.chat.completions.create(**kwargs)
        message = response.choices[0].message
        assert message.role == "assistant"
        text, finish, usage = message.content, response.choices[0].finish_reason, response.usage
    assert text == expected and finish == _finish_reason(served_model, new)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(new))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(client, served_model, stream):
    prompt = PROMPTS[1]
    _, full = greedy_reply(served_model, _completion_ids(served_model, prompt))
    stop = full[4:7]  # something greedy decoding really writes
    assert len(stop) == 3
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=REPLY_TOKENS, temperature=0, stop=["\x00zz", stop])
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        response = client.completions.create(**kwargs)
        text, finish = response.choices[0].text, response.choices[0].finish_reason
    assert text == full[:full.index(stop)]
    assert finish == "stop"


def test_stop_tokens_end_a_chat_reply(engine, served_model):
    """A chat format whose stop ids include a token greedy decoding produces at step 3: the reply
    ends there, the token itself is not shown, finish_reason is 'stop'."""
    config, params, chat = served_model
    messages = [{"role": "user", "content": "Speak, speak!"}]
    ids = chat.prompt_ids(messages)
    new, _ = greedy_reply(served_model, ids)
    stop_token = new[3]
    cut = new.index(stop_token)
    stopping = ChatFormat(chat.tokenizer, "plain")
    stopping.stop_ids = (*chat.stop_ids, stop_token)
    expected = chat.decode(ids + new[:cut])[len(chat.decode(ids)):].lstrip()
    with running_server(create_app(engine, stopping, MODEL)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=REPLY_TOKENS,
                                                  temperature=0)
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == cut + 1  # the stop token was generated


def test_n_seeded_samples_are_reproducible_and_usage_counts_every_choice(client, served_model):
    ids = _completion_ids(served_model, PROMPTS[0])
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7,
                  logprobs=0, extra_body={"top_k": 50})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice draws its own stream
    assert first.usage.prompt_tokens == len(ids)  # the prompt counts once, not per choice
    lengths = [len(c.logprobs.tokens) for c in first.choices]
    assert first.usage.completion_tokens == sum(lengths)
    assert all(n == 8 or c.finish_reason == "stop" for n, c in zip(lengths, first.choices))


def test_completion_logprobs_are_the_models(client, served_model):
    config, params, chat = served_model
    ids = _completion_ids(served_model, PROMPTS[2])
    new, _ = greedy_reply(served_model, ids)
    response = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=REPLY_TOKENS,
                                         temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    logits = Llama(config).apply({"params": params}, np.asarray([ids + new]))[0]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(ids) - 1:-1]  # [new, vocab]
    np.testing.assert_allclose(logprobs.token_logprobs, expected[np.arange(len(new)), new], atol=1e-4)
    assert logprobs.tokens == [chat.token_text(t) for t in new]
    for step, alternatives in enumerate(logprobs.top_logprobs):
        best = np.argsort(-expected[step])[:3]
        assert list(alternatives) == [chat.token_text(t) for t in best]
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_sixteen_concurrent_clients_each_get_their_solo_greedy_output(base_url, served_model, engine):
    """16 requests (max_batch 8: some wait for a slot) of mixed prompt lengths, reply lengths,
    endpoints and streaming, all at once through the async client."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    jobs = []
    for i in range(16):
        prompt = PROMPTS[i % len(PROMPTS)] + " " * (i // 4)  # also vary the prompt lengths
        jobs.append(dict(prompt=prompt, max_tokens=4 + (i * 5) % 9, stream=i % 3 == 0, chat=i % 2 == 1))

    async def run(job):
        kwargs = dict(model=MODEL, max_tokens=job["max_tokens"], temperature=0, stream=job["stream"])
        if job["chat"]:
            response = await client.chat.completions.create(
                messages=[{"role": "user", "content": job["prompt"]}], **kwargs)
            if job["stream"]:
                return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])
            return response.choices[0].message.content
        response = await client.completions.create(prompt=job["prompt"], **kwargs)
        if job["stream"]:
            return "".join([c.choices[0].text async for c in response if c.choices])
        return response.choices[0].text

    async def run_all():
        return await asyncio.gather(*(run(job) for job in jobs))

    outputs = asyncio.run(run_all())
    for job, output in zip(jobs, outputs):
        chat = served_model[2]
        ids = (chat.prompt_ids([{"role": "user", "content": job["prompt"]}]) if job["chat"]
               else chat.completion_ids(job["prompt"]))
        assert output == greedy_reply(served_model, ids, job["max_tokens"], chat=job["chat"])[1], job
    assert engine.num_active == 0


def test_the_serving_benchmark_clients_count_every_streamed_token(base_url):
    """benchmarks.serve's clients read only the chunks they need: their token count must still
    be the server's (the same prompts answered without streaming)."""
    from benchmarks.serve import run_clients

    clients, each, prompt_len, max_tokens, vocab = 3, 2, 8, 7, 512
    row = run_clients(base_url, clients, each, prompt_len, max_tokens, vocab, seed=5, model=MODEL)
    prompts = np.random.RandomState(5).randint(3, vocab, (clients, each, prompt_len)).tolist()
    expected = sum(httpx.post(f"{base_url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
    }).json()["usage"]["completion_tokens"] for per_client in prompts for prompt in per_client)
    assert (row["clients"], row["requests"]) == (clients, clients * each)
    assert row["tokens"] == expected > 0
    assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"] <= row["latency_p95_s"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(base_url, engine, served_model):
    """The dropped request can end only by being cancelled: it has no stop ids, and its tokens
    reach the server at most every 20 ms (480 of them: >= 9.6 s), however loaded the machine."""
    started = []
    submit = engine.submit

    def slowed(prompt, sampling, sink):
        def slow_sink(event):
            time.sleep(0.02)
            sink(event)

        first = not started
        started.append(submit(prompt, dataclasses.replace(sampling, stop_ids=()) if first else sampling,
                              sink=slow_sink if first else sink))
        return started[-1]

    engine.submit = slowed
    try:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # generation is under way; hang up
        # Meanwhile another client is served normally.
        ids = _completion_ids(served_model, PROMPTS[1])
        with httpx.Client(timeout=60) as http:
            other = http.post(f"{base_url}/v1/completions", json=dict(
                model=MODEL, prompt=PROMPTS[1], max_tokens=REPLY_TOKENS, temperature=0)).json()
        assert other["choices"][0]["text"] == greedy_reply(served_model, ids)[1]
    finally:
        engine.submit = submit
    dropped = started[0]
    deadline = time.monotonic() + 30
    while dropped.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dropped.finish_reason == "cancelled"
    assert dropped.completion_tokens < 480
    assert engine.num_active == 0


BAD_REQUESTS = [  # (path, raw body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'["a list"]', 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "foo": [1]}, 400, "foo"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi " * 600, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", ""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 1.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x " * 600}]},
     400, "messages"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(base_url, client, path, body,
                                                                     status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base_url}{path}", content=raw, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    good = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert good.usage.completion_tokens == 2


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8
    assert httpx.get(f"{base_url}/v1/models").status_code == 200
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


@pytest.mark.slow
def test_cli_serves_with_an_api_key(served_checkpoint, served_model):
    """`python -m experiments.serve` on the checkpoint folder (its own tokenizer): 401 without
    or with a wrong key on every endpoint but /health; the right key gets the greedy reply."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    command = [sys.executable, "-m", "experiments.serve", "--checkpoint", str(served_checkpoint),
               "--port", str(port), "--max_batch", "2", "--max_seq_len", "128", "--api_key", "s3cret",
               "--chat_template", "plain", "--model_name", MODEL, "--log_level", "warning"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:  # no key needed
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                method = httpx.get if path == "/v1/models" else httpx.post
                response = method(f"{base}{path}", headers=headers, timeout=30)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Who is there?"}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=REPLY_TOKENS,
                                               temperature=0)
        expected = greedy_reply(served_model, served_model[2].prompt_ids(messages), chat=True)[1]
        assert reply.choices[0].message.content == expected
    finally:
        server.terminate()
        server.wait(30)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: `make install` "
                    "(or `apt-get install -y chromium`) puts it there")
def test_chat_page_streams_replies_in_headless_chromium(base_url, served_model, tmp_path):
    """The page at / in a real browser: two turns; each reply streams in, equals the greedy reply
    to the conversation so far (so the page keeps the conversation), and shows tokens/s."""
    from playwright.sync_api import sync_playwright

    chat = served_model[2]
    conversation, replies = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(base_url)
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny-test')")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", str(REPLY_TOKENS))
            for turn, text in enumerate(["Long live the king!", "Who is there?"]):  # both get replies
                page.fill("#input", text)
                page.press("#input", "Enter")
                reply = page.locator(".message.assistant").nth(turn)
                reply.locator(".meta").wait_for(timeout=120_000)  # written when the stream ends
                replies.append(reply.locator(".content").text_content())
                conversation.append({"role": "user", "content": text})
                new, expected = greedy_reply(served_model, chat.prompt_ids(conversation), chat=True)
                assert replies[-1] == expected
                assert reply.locator(".meta").text_content().startswith(f"{len(new)} tokens · ")
                assert "tokens/s" in page.locator("#stats").text_content()
                conversation.append({"role": "assistant", "content": expected})
            screenshot = tmp_path / "chat_page.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
    print(f"chat page screenshot: {screenshot}")
