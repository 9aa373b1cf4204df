"""PEFT-format adapters (llamax.convert.peft) against the `peft` library itself: an llamax export
loaded with `PeftModel.from_pretrained` onto the HF base gives llamax's LoRA logits; a
`peft`-made adapter (random, non-zero B) loads into llamax with peft's logits; a LoRA run starts
from a PEFT folder and exports back (experiments.export_lora --format peft); unsupported PEFT
options and adapters of another base are one clear error each, and nothing is written."""
import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from data_fixtures import small_tokenizer  # noqa: F401 (fixture)
from experiments import eval as eval_cli
from experiments import export_lora
from finetune_fixtures import (TINY, compilation_cache_dir, save_hf_model,  # noqa: F401 (fixtures)
                               tiny_hf_dir)
from hf_models import hf_logits
from llamax.convert.hf import load_hf
from llamax.convert.hub import load_any, save_any
from llamax.convert.identity import identity_of
from llamax.convert.peft import load_peft, save_peft
from llamax.errors import ConfigError
from llamax.model import Llama
from llamax.model.lora import LoraConfig, init_adapters, model_variables

TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24)).astype(np.int32)
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def llamax_logits(config, params, adapters, lora) -> np.ndarray:
    return np.asarray(Llama(config).apply(model_variables(adapters, params, lora), TOKENS))


def random_adapters(config, lora, seed=1):
    """Adapters with A and B both random (a trained adapter: B is no longer zero)."""
    adapters = init_adapters(config, lora, seed)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), adapters)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_llamax_export_loads_in_peft_with_the_same_logits(tiny_hf_dir, tmp_path, scan_layers):  # noqa: F811
    config, params = load_hf(tiny_hf_dir, scan_layers=scan_layers)
    lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    adapters = random_adapters(config, lora)
    folder = save_peft(config, lora, adapters, tmp_path / "adapter", base_model=tiny_hf_dir)
    written = json.loads((folder / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["target_modules"]) == (4, 8.0, sorted(TARGETS))

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_hf_dir), folder)
    theirs = hf_logits(model, TOKENS)
    ours = llamax_logits(config, params, adapters, lora)
    assert np.abs(ours - theirs).max() < 1e-4
    # The adapter really changes the model: the base alone is far from it.
    assert np.abs(hf_logits(LlamaForCausalLM.from_pretrained(tiny_hf_dir), TOKENS) - theirs).max() > 1e-2
    # And load_peft reads back exactly what was written.
    lora_back, adapters_back = load_peft(folder, config)
    assert lora_back == lora
    jax.tree.map(np.testing.assert_array_equal, adapters_back, jax.tree.map(np.asarray, adapters))


def peft_made_adapter(base, out, **options):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), PeftLoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"],
        lora_dropout=0.0, init_lora_weights=False, **options))  # random A and B
    model.save_pretrained(out)
    return model


def test_peft_made_adapter_loads_into_llamax_with_the_same_logits(tiny_hf_dir, tmp_path):  # noqa: F811
    model = peft_made_adapter(tiny_hf_dir, tmp_path / "peft")
    config, params = load_hf(tiny_hf_dir)
    lora, adapters = load_peft(tmp_path / "peft", config)
    assert (lora.rank, lora.alpha, set(lora.targets)) == (4, 16.0, {"q_proj", "k_proj", "gate_proj", "up_proj"})
    theirs = hf_logits(model, TOKENS)
    assert np.abs(llamax_logits(config, params, adapters, lora) - theirs).max() < 1e-4
    # Evaluation path: load_any merges a PEFT folder into its (local) base.
    merged_config, merged = load_any(tmp_path / "peft")
    merged_logits = np.asarray(Llama(merged_config).apply({"params": merged}, TOKENS))
    assert np.abs(merged_logits - theirs).max() < 1e-4


@pytest.mark.parametrize("option,value", [("use_dora", True), ("use_rslora", True),
                                          ("rank_pattern", {"q_proj": 8}), ("modules_to_save", ["lm_head"])])
def test_unsupported_peft_options_are_refused_by_name(tiny_hf_dir, tmp_path, option, value):  # noqa: F811
    config, _ = load_hf(tiny_hf_dir)
    folder = save_peft(config, LoraConfig(rank=4), random_adapters(config, LoraConfig(rank=4)),
                       tmp_path / "adapter")
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, option: value}))
    with pytest.raises(ConfigError, match=option):
        load_peft(folder, config)


def test_an_adapter_of_another_base_architecture_is_one_clear_error(tiny_hf_dir, tmp_path):  # noqa: F811
    other = save_hf_model(tmp_path / "other_base", hidden_size=32, intermediate_size=96)
    peft_made_adapter(other, tmp_path / "peft")
    config, _ = load_hf(tiny_hf_dir)
    with pytest.raises(ConfigError, match="different model"):  # its config names a local base
        load_peft(tmp_path / "peft", config)
    raw = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": "x/y"}))
    with pytest.raises(ConfigError, match="another architecture"):  # only the shapes tell
        load_peft(tmp_path / "peft", config)


@pytest.mark.slow
def test_lora_run_starts_from_a_peft_adapter_and_exports_peft(tiny_hf_dir, tmp_path, small_tokenizer):  # noqa: F811
    from llamax.data.pipeline import DataConfig
    from llamax.run_dir import RunDir
    from llamax.sharding import get_mesh_preset
    from llamax.train.checkpoint import restore_params
    from llamax.train.fit import TrainConfig, fit
    from llamax.train.optim import OptimConfig

    peft_made_adapter(tiny_hf_dir, tmp_path / "peft")
    config, params = load_hf(tiny_hf_dir)
    data = DataConfig(tokenizer=str(small_tokenizer.path), train="shakespeare_sft", validation=None,
                      sft_template="plain", fill_rows=False)
    train = TrainConfig(model_dir=str(tmp_path / "run"), train_steps=2, batch_size=8, seq_len=64,
                        checkpoint_every=2, progress_bar=False)
    with pytest.raises(ConfigError, match="rank 4"):  # a LoraConfig that disagrees with the adapter
        fit(config, OptimConfig(), get_mesh_preset("fsdp"), data, train, init_from=str(tiny_hf_dir),
            lora_config=LoraConfig(rank=8), adapters_from=str(tmp_path / "peft"))
    assert not (tmp_path / "run").exists()  # nothing written
    seen = []  # what evaluators (e.g. lm-eval's, which merges the adapters) are told

    class RecordLora:
        def due(self, step, final_step):
            return step == final_step

        def __call__(self, step, setup, params, frozen):
            seen.append(setup.lora_config)
            return {}

    fit(config, OptimConfig(learning_rate=1e-3, warmup_steps=1), get_mesh_preset("fsdp"), data, train,
        init_from=str(tiny_hf_dir), adapters_from=str(tmp_path / "peft"), evaluators=[RecordLora()])
    lora = RunDir(tmp_path / "run").lora_config()
    assert (lora.rank, lora.alpha) == (4, 16.0)
    assert seen == [lora]  # the config the adapter gave, though no lora_config was passed
    trained = restore_params(tmp_path / "run" / "checkpoints")
    _, started = load_peft(tmp_path / "peft", config)
    # Trained from the PEFT adapter (moved a little), not from a fresh B = 0.
    a_start = started["layers"]["self_attn"]["q_proj"]["lora_b"]
    a_end = np.asarray(trained["layers"]["self_attn"]["q_proj"]["lora_b"])
    assert 0 < np.abs(a_end - a_start).max() < 0.1 * np.abs(a_start).max()

    assert export_lora.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                             "--format", "peft"]) == 0
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_hf_dir), tmp_path / "out")
    ours = llamax_logits(config, params, trained, lora)
    assert np.abs(hf_logits(model, TOKENS) - ours).max() < 1e-4


def test_eval_cli_evaluates_a_peft_adapter_as_its_merged_export(tiny_hf_dir, tmp_path, small_tokenizer,  # noqa: F811
                                                                  capsys):
    """experiments.eval --checkpoint ADAPTER [--base BASE]: the tokenizer and config come from the
    base the adapter names, and the perplexity is the merged HF export's."""
    config, params = load_hf(tiny_hf_dir)
    base = save_any(config, params, tmp_path / "base", "hf", identity=identity_of(small_tokenizer.path))
    peft_made_adapter(base, tmp_path / "peft")
    merged_config, merged = load_any(tmp_path / "peft")
    save_any(merged_config, merged, tmp_path / "merged", "hf", identity=identity_of(small_tokenizer.path))
    settings = ["--seq_len", "32", "--batch_size", "8", "--max_batches", "1"]
    perplexities = []
    for checkpoint in (["--checkpoint", str(tmp_path / "peft")],  # tokenizer and base: its base's
                       ["--checkpoint", str(tmp_path / "peft"), "--base", str(base),
                        "--tokenizer", str(small_tokenizer.path)],
                       ["--checkpoint", str(tmp_path / "merged")], ["--checkpoint", str(base)]):
        assert eval_cli.main([*checkpoint, *settings]) == 0
        perplexities.append(json.loads(capsys.readouterr().out)["perplexity"])
    adapter, adapter_with_base, merged_export, base_only = perplexities
    assert adapter == pytest.approx(merged_export, rel=1e-5)
    assert adapter_with_base == pytest.approx(merged_export, rel=1e-5)
    assert abs(base_only - merged_export) > 1e-3 * merged_export  # the adapter is really applied


def test_peft_export_refuses_q8_0_and_a_tokenizer_with_nothing_written(tiny_hf_dir, tmp_path, capsys):  # noqa: F811
    config, _ = load_hf(tiny_hf_dir)
    lora = LoraConfig(rank=4)
    with pytest.raises(ConfigError, match="q8_0 only applies to GGUF"):
        save_peft(config, lora, random_adapters(config, lora), tmp_path / "adapter", dtype="q8_0")
    assert export_lora.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"),
                             "--format", "peft", "--tokenizer", str(tiny_hf_dir)]) == 1
    assert "--tokenizer does not apply to --format peft" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()
