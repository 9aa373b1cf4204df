"""DPO (llamax.train.objectives.DPO): the loss and its gradients against the published formulas
written in numpy, and end to end against TRL's DPOTrainer (the same tiny HF model, the same token
ids): loss, every TRL metric and the gradient of every weight; packing keeps pairs whole."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from finetune_fixtures import TINY, compilation_cache_dir, tiny_hf_dir  # noqa: F401 (fixtures)
from llamax.convert.hf import hf_to_params, load_hf, params_to_hf
from llamax.data import preference
from llamax.data.packing import stack_rows
from llamax.errors import ConfigError
from llamax.sharding import get_mesh_preset, make_mesh
from llamax.train.objectives import DPO, DPO_METRICS
from llamax.train.optim import OptimConfig
from llamax.train.setup import make_train_setup

SEQ_LEN, ROWS = 96, 16


# ---- the formula, in numpy from the papers ---------------------------------------------------

def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, smoothing, loss, n_chosen, n_rejected):
    """(per-pair loss, d loss / d chosen, d loss / d rejected), float64.

    DPO (Rafailov et al. 2023, eq. 7) with cDPO label smoothing e (Mitchell 2023):
      L = -(1-e) log s(b h) - e log s(-b h),  h = (pi_c - ref_c) - (pi_r - ref_r)
      dL/dpi_c = -b [(1-e) s(-b h) - e s(b h)] = -dL/dpi_r
    IPO (Azar et al. 2023, eq. 17), log-ratios averaged per completion token as TRL does:
      L = (h' - 1/(2b))^2,  h' = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r
    """
    if loss == "ipo":
        margin = (chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected
        value = (margin - 1 / (2 * beta)) ** 2
        d_margin = 2 * (margin - 1 / (2 * beta))
        return value, d_margin / n_chosen, -d_margin / n_rejected
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    value = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
    d_h = -beta * ((1 - smoothing) * sigmoid(-beta * h) - smoothing * sigmoid(beta * h))
    return value, d_h, -d_h


@pytest.mark.parametrize("loss,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                 ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)])
def test_loss_and_gradients_equal_the_published_formula(loss, beta, smoothing):
    rng = np.random.default_rng(0)
    chosen, rejected, ref_chosen, ref_rejected = (rng.uniform(-150, -5, 64) for _ in range(4))
    n_chosen, n_rejected = rng.integers(1, 60, 64).astype(float), rng.integers(1, 60, 64).astype(float)
    objective = DPO(beta=beta, loss=loss, label_smoothing=smoothing)

    def mean_loss(c, r):
        return jnp.mean(objective.pair_losses(c, r, jnp.asarray(ref_chosen, jnp.float32),
                                              jnp.asarray(ref_rejected, jnp.float32),
                                              jnp.asarray(n_chosen, jnp.float32),
                                              jnp.asarray(n_rejected, jnp.float32)))

    value, (d_chosen, d_rejected) = jax.value_and_grad(mean_loss, argnums=(0, 1))(
        jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32))
    want, want_chosen, want_rejected = numpy_dpo(chosen, rejected, ref_chosen, ref_rejected, beta,
                                                 smoothing, loss, n_chosen, n_rejected)
    np.testing.assert_allclose(float(value), want.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_chosen), want_chosen / 64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_rejected), want_rejected / 64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields", [dict(beta=0.0), dict(loss="hinge"), dict(label_smoothing=0.5),
                                    dict(loss="ipo", label_smoothing=0.1), dict(reference="none")])
def test_bad_dpo_config_is_a_config_error(fields):
    with pytest.raises(ConfigError, match="DPO"):
        DPO(**fields)


# ---- end to end against TRL --------------------------------------------------------------------

def token_pairs(vocab: int, count: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) of random lengths; BOS-like 1 first, EOS 2 last."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        prompt = [1] + rng.integers(3, vocab, rng.integers(3, 12)).tolist()
        chosen = rng.integers(3, vocab, rng.integers(2, 14)).tolist() + [2]
        rejected = rng.integers(3, vocab, rng.integers(2, 14)).tolist() + [2]
        pairs.append((prompt, chosen, rejected))
    return pairs


def llamax_batch(pairs) -> dict:
    """The pairs packed by llamax's preference packer into [ROWS, SEQ_LEN] rows."""
    packer = preference.PairPacker(SEQ_LEN)
    rows = []
    for prompt, chosen, rejected in pairs:
        chosen_doc, rejected_doc = prompt + chosen, prompt + rejected
        weights = [0.0] * len(prompt) + [1.0] * len(chosen) + [0.0] * len(prompt) + [1.0] * len(rejected)
        packer.set_document(np.asarray(chosen_doc + rejected_doc, np.int32), np.asarray(weights, np.float32),
                            len(chosen_doc))
        while not packer.place():
            rows.append(packer.finish_row())
    rows.append(packer.finish_row())
    assert len(rows) <= ROWS
    return stack_rows(rows, ROWS)


def trl_trainer(folder, tmp_path, loss: str, beta: float):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    # TRL tokenizes its dataset at construction; the batches below are built from token ids.
    vocab = {f"t{i}": i for i in range(TINY.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        bos_token="t1", eos_token="t2", pad_token="t0")
    dataset = Dataset.from_dict({"prompt": ["t5 t6"], "chosen": ["t7"], "rejected": ["t8"]})
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss], report_to="none",
                     use_cpu=True, per_device_train_batch_size=1, max_length=None, bf16=False,
                     dataset_num_proc=None, save_strategy="no", logging_strategy="no")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def trl_parity(hf_dir, work_dir, loss: str, accumulations, beta: float = 0.3) -> dict[int, dict]:
    """TRL's DPOTrainer.compute_loss vs llamax's DPO objective on the same nudged tiny HF model and
    12 pairs of token ids: per gradient-accumulation count, the loss, metrics and gradients of
    both (benchmarks/finetune_parity.py records these)."""
    pairs = token_pairs(TINY.vocab_size, 12)
    trainer = trl_trainer(hf_dir, work_dir, loss, beta)
    # A policy that differs from the reference, the same in both: every weight nudged.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {name: trainer._metrics["train"][name][-1] for name in DPO_METRICS}
    trl_grads = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()}

    config, reference = load_hf(hf_dir)
    params = hf_to_params(config, {name: value.detach().numpy()
                                   for name, value in trainer.model.state_dict().items()})
    mesh = make_mesh(get_mesh_preset("fsdp"))
    results = {}
    for accumulation in accumulations:  # micro-batches accumulate to the same gradient
        setup = make_train_setup(config, OptimConfig(grad_accum_steps=accumulation), mesh,
                                 objective=DPO(beta=beta, loss=loss))
        metrics, grads = setup.loss_and_grads(params, llamax_batch(pairs), reference)
        ours = dict(params_to_hf(config, jax.device_get(grads)))
        results[accumulation] = {
            "pairs": float(metrics["pairs"]), "loss": float(metrics["loss"]), "trl_loss": float(trl_loss.detach()),
            "metrics": {name: float(metrics[name]) for name in DPO_METRICS}, "trl_metrics": trl_metrics,
            "grad_max_abs_diff": {name: float(np.abs(ours[name] - theirs).max()) for name, theirs in trl_grads.items()},
            "grad_max_abs": max(float(np.abs(theirs).max()) for theirs in trl_grads.values())}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("loss,accumulation", [("sigmoid", 2), ("ipo", 1)])
def test_loss_metrics_and_gradients_equal_trl_dpo_trainer(tiny_hf_dir, tmp_path, loss, accumulation):  # noqa: F811
    for result in trl_parity(tiny_hf_dir, tmp_path, loss, sorted({1, accumulation})).values():
        assert result["pairs"] == 12
        np.testing.assert_allclose(result["loss"], result["trl_loss"], rtol=1e-5, atol=1e-6)
        for name in DPO_METRICS:
            np.testing.assert_allclose(result["metrics"][name], result["trl_metrics"][name], rtol=1e-5,
                                       atol=1e-6, err_msg=name)
        # Gradients up to ~1.3 in size; measured <= 5e-7 apart.
        assert max(result["grad_max_abs_diff"].values()) <= 1e-5, result["grad_max_abs_diff"]


def test_pairs_are_packed_whole_as_consecutive_segments():
    pairs = token_pairs(TINY.vocab_size, 12)
    batch = llamax_batch(pairs)
    found = []
    for row in range(ROWS):
        segments = batch["segment_ids"][row]
        for pair in range(1, segments.max() // 2 + 1):
            chosen = batch["tokens"][row][segments == 2 * pair - 1]
            rejected = batch["tokens"][row][segments == 2 * pair]
            found.append((chosen.tolist(), rejected.tolist()))
            assert (batch["positions"][row][segments == 2 * pair] == np.arange(len(rejected))).all()
    assert found == [(p + c, p + r) for p, c, r in pairs]
    assert float(DPO().count({k: jnp.asarray(v) for k, v in batch.items()})) == len(pairs)
    assert math.isclose(batch["loss_mask"].sum(), sum(len(c) + len(r) for _, c, r in pairs))
