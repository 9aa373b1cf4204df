"""A Llama-3 checkpoint end to end, offline, through the commands a user pastes (issue 13).

The checkpoint is a tiny random Llama-3.2-style HF folder (GQA, rope_theta 5e5, llama3 rope
scaling, tied embeddings) carrying the corpus-trained Llama-3-format tokenizer
(`llama3_tokenizer_dir`: Llama-3 chat template, generation_config.json eos ids
[<|end_of_text|>, <|eot_id|>], Meta's original/tokenizer.model):

  SFT from it on chat JSONL with configs/runs/sft.gin and no TOKENIZER (the folder's own tokenizer
  and chat template)  ->  `experiments.sample --chat` on the run replies and stops at <|eot_id|>
  ->  `experiments.export_lora --format hf`  ->  transformers' `generate(do_sample=False)` on the
  export gives the same tokens and stops at the same place, with its own generation_config.json.

The reference is transformers (its tokenizer, chat template rendering and generate).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from hf_models import make_hf_model
from llama3_assets import BOS_ID, END_OF_TEXT_ID, EOT_ID, VOCAB_SIZE, llama3_tokenizer_dir  # noqa: F401
from llamax.convert.hub import convert, load_any, read_config
from llamax.convert.identity import read_identity
from llamax.data.shakespeare_sft import shakespeare_sft_records
from llamax.infer.generate import generate
from llamax.run_dir import RunDir, read_special_ids
from llamax.tokenizer import SpecialIds, load_tokenizer

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
REPLY = "Aye, my lord."  # every training answer: a tiny model learns it (and its <|eot_id|>) in a minute
LLAMA3_IDS = SpecialIds(BOS_ID, (END_OF_TEXT_ID, EOT_ID), None)
MAX_NEW = 24


def _model_gin(path: Path, config) -> Path:
    """A model gin file for `config`, as a user writes one for their checkpoint."""
    lines = ["from __gin__ import dynamic_registration", "from llamax import config", "",
             "MODEL_CONFIG = @config.ModelConfig()"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings"):
        lines.append(f"config.ModelConfig.{field} = {getattr(config, field)!r}")
    lines.append("config.ModelConfig.rope_scaling = @config.RopeScaling()")
    for field, value in dataclasses.asdict(config.rope_scaling).items():
        lines.append(f"config.RopeScaling.{field} = {value!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_llama3_folder(out: Path, tokenizer_dir: Path, variant: str = "llama32_tied") -> Path:
    """A random Llama-3-style HF folder with the Llama-3-format tokenizer copied in, as the hub
    lays out Llama-3.x repositories (tokenizer.json, ..., original/tokenizer.model)."""
    model = make_hf_model(variant, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
                          bos_token_id=BOS_ID, eos_token_id=[END_OF_TEXT_ID, EOT_ID], pad_token_id=None)
    model.save_pretrained(out)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    return out


def _chat_jsonl(path: Path, count: int = 48) -> Path:
    records = shakespeare_sft_records("train")[:count]
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps({"messages": [{"role": "user", "content": record["prompt"]},
                                             {"role": "assistant", "content": REPLY}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, llama3_tokenizer_dir):  # noqa: F811
    return make_llama3_folder(tmp_path_factory.mktemp("llama3") / "hf", llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def sft_run(hf_folder, tmp_path_factory):
    """`experiments.train` with configs/runs/sft.gin from the HF folder, no TOKENIZER given."""
    root = tmp_path_factory.mktemp("sft")
    config = read_config(hf_folder)
    command = [sys.executable, "-m", "experiments.train", f"--gin_file={_model_gin(root / 'model.gin', config)}",
               "--gin_file=configs/runs/sft.gin", f"--gin.MODEL_DIR='{root / 'run'}'",
               f"--gin.INIT_FROM='{hf_folder}'", f"--gin.TRAIN_DATA='{_chat_jsonl(root / 'chat.jsonl')}'",
               "--gin.TRAIN_STEPS=60", "--gin.CHECKPOINT_EVERY=60", "--gin.LOG_EVERY=20",
               "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=128", "--gin.LEARNING_RATE=1e-2",
               "--gin.WARMUP_STEPS=5", "--gin.fit.TrainConfig.progress_bar=False"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


def _chat_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, bos=False, allow_special=True)


def test_run_records_the_init_checkpoints_tokenizer_and_ids(sft_run, hf_folder):
    run = RunDir(sft_run)
    copied = {str(p.relative_to(run.tokenizer())) for p in run.tokenizer().rglob("*") if p.is_file()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "original/tokenizer.model"} <= copied
    assert read_special_ids(sft_run) == LLAMA3_IDS
    ours, theirs = load_tokenizer(run.tokenizer()), load_tokenizer(hf_folder)
    text = "KING. My lord, <|eot_id|> what say you?"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.stop_ids == theirs.stop_ids and {END_OF_TEXT_ID, EOT_ID} <= set(ours.stop_ids)
    assert ours.chat_template == theirs.chat_template is not None


def test_chat_stops_at_eot_and_the_hf_export_generates_the_same_in_transformers(sft_run, tmp_path, capsys):
    from experiments import export_lora, sample

    config, params = load_any(sft_run)
    tokenizer = load_tokenizer(RunDir(sft_run).tokenizer())
    texts = ("HAMLET says:\nWho is there?\n\nHow does HORATIO reply?", "Tell me of the sea.",
             "O Romeo, Romeo! wherefore art thou Romeo?")
    prompts = [_chat_prompt(tokenizer, text) for text in texts]
    ours = generate(config, params, prompts, MAX_NEW, stop_ids=tokenizer.stop_ids)
    assert ours[0][-1] == EOT_ID and len(ours[0]) < MAX_NEW  # the SFT taught it to end its turn
    assert tokenizer.decode(ours[0], skip_special=True) == REPLY

    # The chat CLI: the run's own tokenizer and template, the reply only, stopped at <|eot_id|>.
    assert sample.main(["--checkpoint", str(sft_run), "--chat", "--max_new_tokens", str(MAX_NEW),
                        "--prompt", texts[0]]) == 0
    assert capsys.readouterr().out == REPLY + "\n"

    out = tmp_path / "hf"
    assert export_lora.main(["--run", str(sft_run), "--out", str(out), "--format", "hf"]) == 0
    hf_config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for fields in (hf_config, generation):
        assert (fields["bos_token_id"], fields["eos_token_id"], fields["pad_token_id"]) == (
            BOS_ID, [END_OF_TEXT_ID, EOT_ID], None)
    assert read_identity(out).special_ids == LLAMA3_IDS

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # Plain text too (no template): the model was never taught to stop there.
    texts, prompts = texts + (None,), prompts + [tokenizer.encode("To be, or not to be, that is the")]
    ours.append(generate(config, params, prompts[-1:], MAX_NEW, stop_ids=tokenizer.stop_ids)[0])
    for text, prompt, expected in zip(texts, prompts, ours):
        if text is not None:
            rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                        add_generation_prompt=True, tokenize=False)
            assert hf_tokenizer(rendered, add_special_tokens=False)["input_ids"] == prompt
        inputs = torch.tensor([prompt])
        with torch.no_grad():  # the export's own generation_config.json: eos ids, no overrides
            produced = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                      max_new_tokens=MAX_NEW)[0, len(prompt):].tolist()
        assert produced == expected
    with capsys.disabled():
        print(f"\nLlama-3 e2e: {sum(map(len, ours))} generated tokens of {len(ours)} prompts "
              f"(lengths {[len(o) for o in ours]}) equal to transformers' on the HF export")


def test_lora_run_from_an_hf_folder_records_its_tokenizer_and_exports_its_ids(hf_folder, tmp_path):
    from experiments import export_lora
    from llamax.data.pipeline import DataConfig
    from llamax.model.lora import LoraConfig
    from llamax.sharding import MeshConfig
    from llamax.train.fit import TrainConfig, fit
    from llamax.train.optim import OptimConfig

    config = read_config(hf_folder)
    data = DataConfig(train=str(_chat_jsonl(tmp_path / "chat.jsonl", 16)), validation=None,
                      sft_template="checkpoint", fill_rows=False)
    train = TrainConfig(model_dir=str(tmp_path / "lora"), train_steps=2, batch_size=8, seq_len=128,
                        checkpoint_every=2, progress_bar=False, async_checkpointing=False)
    fit(config, OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=2), MeshConfig(), data, train,
        init_from=str(hf_folder), lora_config=LoraConfig(rank=2, alpha=4.0))
    assert read_special_ids(tmp_path / "lora") == LLAMA3_IDS
    assert load_tokenizer(RunDir(tmp_path / "lora").tokenizer()).chat_template is not None
    assert export_lora.main(["--run", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"),
                             "--format", "orbax"]) == 0
    assert read_identity(tmp_path / "merged").special_ids == LLAMA3_IDS
    assert load_tokenizer(read_identity(tmp_path / "merged").tokenizer).encode("Aye") == \
        load_tokenizer(hf_folder).encode("Aye")


@pytest.mark.parametrize("source", ["llama3", "no_tokenizer"])
def test_special_ids_survive_hf_to_orbax_to_hf_and_hf_to_meta_to_hf(source, tmp_path, llama3_tokenizer_dir):  # noqa: F811
    if source == "llama3":  # Meta's params.json has no head_dim or custom rope scaling: plain GQA
        folder, expected = make_llama3_folder(tmp_path / "hf", llama3_tokenizer_dir, "llama3_gqa"), LLAMA3_IDS
    else:  # an HF model with unusual ids and no tokenizer; transformers used to read back 1 and 2
        folder, expected = tmp_path / "hf", SpecialIds(510, (511,), 0)
        make_hf_model("llama3_gqa", vocab_size=512, bos_token_id=510, eos_token_id=511,
                      pad_token_id=0).save_pretrained(folder)
    for middle in ("orbax", "meta"):
        convert(folder, "hf", tmp_path / middle, middle, progress=False)
        assert read_identity(tmp_path / middle).special_ids == expected
        back = convert(tmp_path / middle, middle, tmp_path / f"{middle}_hf", "hf", progress=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(back)
        eos = model.generation_config.eos_token_id
        assert (model.generation_config.bos_token_id, tuple(np.atleast_1d(eos).tolist()),
                model.generation_config.pad_token_id) == (expected.bos_id, expected.eos_ids, expected.pad_id)
        assert (model.config.bos_token_id, model.config.pad_token_id) == (expected.bos_id, expected.pad_id)
        if source == "llama3":  # the tokenizer went along: it loads and encodes as the source's
            text = "To be, or not to be"
            assert load_tokenizer(back).encode(text) == load_tokenizer(folder).encode(text)
