"""Smoke test of `python -m benchmarks.run --quick`: every section runs on a tiny config and the
JSON carries the keys `make bench` consumers read."""
import json
import sys

import pytest

from benchmarks import machine, maxtext, op_profile, run


def test_quick_run_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # This interpreter has no MaxText: the MaxText row reports why, and the rest still runs.
    results = run.main(["--quick", "--json", str(out), "--seq_len", "16", "--steps", "1",
                        "--decode_batches", "1", "--new_tokens", "4", "--maxtext_python", sys.executable])
    written = json.loads(out.read_text())
    assert written["train"].keys() >= {"llamax_tok_s", "torch_tok_s", "ratio", "mfu", "compile_s"}
    assert written["decode"].keys() >= {"llamax_tok_s", "hf_tok_s", "ratio", "per_batch"}
    assert written["peak"]["peak_gflops"] == max(written["peak"]["jax_gflops"],
                                                 written["peak"]["torch_gflops"])
    # Same weights and batch on both sides: the first losses agree before any update.
    first = results["train"]["first_loss"]
    assert abs(first["llamax"] - first["torch"]) < 1e-3
    assert results["decode"]["per_batch"][0]["same_tokens"]
    row = written["decode"]["per_batch"][0]
    assert written["memory"]["bandwidth_gb_s"] > 0 and row["bytes_per_step"] > 0
    # Rounded to 3 decimals in the JSON (a tiny model's fraction is ~0.005).
    assert row["roofline_fraction"] == pytest.approx(row["llamax_tok_s"] / row["roofline_tok_s"], abs=1e-3)
    # The second roofline: a read as large as a batch-1 step's, at its own measured bandwidth.
    step_sized = written["memory"]["step_sized"]
    assert step_sized["megabytes"] == -(-row["bytes_per_step"] // (1 << 20)) and step_sized["bandwidth_gb_s"] > 0
    assert row["step_sized_roofline_tok_s"] == pytest.approx(
        step_sized["bandwidth_gb_s"] * 1e9 / row["bytes_per_step"], rel=1e-3)
    printed = capsys.readouterr().out
    assert "train tok/s" in printed
    assert "cannot import maxtext" in written["maxtext"]["error"]
    assert "train vs MaxText      not measured" in printed
    # Training ran in a child that kept freed host memory, as the train CLI does (glibc hosts).
    assert written["train"]["host_memory_retained"] is sys.platform.startswith("linux")


# Lines of a real MaxText 0.2.5 run (benchmarks.maxtext, AMD EPYC, 2026-12-05).
MAXTEXT_LOG = """\
I1205 17:47:56.047366 139730083474304 metric_logger.py:265] completed step: 0, seconds: 0.060, TFLOP/s/device: 6.166, Tokens/s/device: 34389.535, total_weights: 2048, loss: 9.473
I1205 17:48:01.525195 139730083474304 metric_logger.py:265] completed step: 1, seconds: 0.264, TFLOP/s/device: 1.390, Tokens/s/device: 7754.462, total_weights: 2048, loss: 8.745
I1205 17:48:08.571214 139730083474304 metric_logger.py:265] completed step: 2, seconds: 5.391, TFLOP/s/device: 0.068, Tokens/s/device: 379.908, total_weights: 2048, loss: 8.080
"""


def test_maxtext_step_lines_and_overrides():
    assert maxtext.parse_steps(MAXTEXT_LOG) == {0: 0.06, 1: 0.264, 2: 5.391}
    overrides = dict(item.split("=", 1) for item in maxtext.maxtext_overrides(
        run.get_preset("bench"), 4, 512, 12, "full", "/tmp/out"))
    assert (overrides["base_emb_dim"], overrides["base_mlp_dim"], overrides["base_num_kv_heads"],
            overrides["max_target_length"], overrides["per_device_batch_size"]) == ("512", "1408", "4", "512", "4")
    assert overrides["weight_dtype"] == overrides["dtype"] == "float32"


def test_maxtext_python_that_is_not_there_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--quick", "--maxtext_python", "/nonexistent/bin/python"])
    assert "--maxtext_python /nonexistent/bin/python: no such executable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--quick", "--gpu", "--maxtext_python", sys.executable])
    assert "runs MaxText on the CPU (hardware=cpu): it is not a peer of a --gpu run" in capsys.readouterr().err


def test_value_parsing_and_geomean():
    assert run._parse_value("False") is False and run._parse_value("128") == 128
    assert run._parse_value("bfloat16") == "bfloat16"
    assert run._geomean([2.0, 8.0]) == pytest.approx(4.0)
    batch = run.random_batch(100, 2, 8)
    assert (batch["targets"][:, :-1] == batch["tokens"][:, 1:]).all()


def test_decode_bytes_count_every_weight_once_and_the_cache_per_row():
    from llamax.config import get_preset
    config = get_preset("tiny")
    table = config.vocab_size * config.hidden_size
    one = run.decode_bytes_per_step(config, 1, 100)
    two = run.decode_bytes_per_step(config, 2, 100)
    cache_row = 2 * config.num_layers * 100 * config.num_kv_heads * config.head_dim * 4
    assert one == (config.num_params() - table + config.hidden_size) * 4 + cache_row
    assert two - one == config.hidden_size * 4 + cache_row


def test_op_classes_of_a_real_xla_module_and_of_aten_ops():
    import jax
    import jax.numpy as jnp
    x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
    compiled = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w.T.T))).lower(x, w).compile()
    classes = op_profile.hlo_classes(compiled.as_text())
    assert "matmul" in classes.values()
    assert op_profile.torch_class("aten::mm") == "matmul"
    assert op_profile.torch_class("aten::_softmax") == "attention softmax"
    assert op_profile.torch_class("aten::_foreach_mul_") == "optimizer"
    assert op_profile.torch_class("aten::something_new") == "other"


def test_op_classes_of_llamax_cpu_kernels():
    """The train step's custom calls count as what they do, not as "other"."""
    text = """ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %ffi_call.1 = (f32[4]{0}) custom-call(%p), custom_call_target="llamax_train_attention_bwd"
  %ffi_call.2 = (f32[4]{0}) custom-call(%p), custom_call_target="llamax_adamw"
  ROOT %other = f32[4]{0} custom-call(%p), custom_call_target="something_else"
}"""
    classes = op_profile.hlo_classes(text)
    assert classes == {"p": "other", "ffi_call.1": "attention softmax", "ffi_call.2": "optimizer", "other": "other"}


@pytest.mark.slow
def test_profile_of_a_tiny_train_step_has_both_sides():
    result = op_profile.profile_train("tiny", 2, 16, 1)
    for side in ("llamax", "torch"):
        assert result[side]["op_s"]["matmul"] > 0 and result[side]["step_s"] > 0
        assert set(result[side]["op_s"]) == set(op_profile.CLASSES)


@pytest.mark.parametrize("flags, expected", [
    ("fpu avx2 fma", "AMD EPYC (family 25 model 1, AVX2)"),
    ("fpu avx2 avx512f avx512bw", "AMD EPYC (family 25 model 17, AVX-512)"),
    ("avx2 avx512f amx_bf16 amx_tile", "AMD EPYC (family 25 model 17, AVX-512 + AMX)"),
])
def test_the_recorded_cpu_tells_the_machine_kinds_apart(tmp_path, flags, expected):
    """VMs report only 'AMD EPYC' as the model name; family, model and the widest vector
    extension are what separate the machine kinds the benchmark ratios depend on."""
    model = "1" if "avx512f" not in flags else "17"
    first = f"processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: {model}\nflags\t\t: {flags}\n"
    second = "processor\t: 1\nmodel name\t: something else\n"
    (tmp_path / "cpuinfo").write_text(first + "\n" + second)
    assert machine.cpu_model(str(tmp_path / "cpuinfo")) == expected
    assert machine.cpu_model(str(tmp_path / "missing"))  # no cpuinfo: the platform's name
