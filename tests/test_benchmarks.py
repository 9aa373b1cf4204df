"""Smoke test of `python -m benchmarks.run --quick`: every section runs on a tiny config and the
JSON carries the keys `make bench` consumers read."""
import json

import pytest

from benchmarks import run


def test_quick_run_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = run.main(["--quick", "--json", str(out), "--seq_len", "16", "--steps", "1",
                        "--decode_batches", "1", "--new_tokens", "4"])
    written = json.loads(out.read_text())
    assert written["train"].keys() >= {"llamax_tok_s", "torch_tok_s", "ratio", "mfu", "compile_s"}
    assert written["decode"].keys() >= {"llamax_tok_s", "hf_tok_s", "ratio", "per_batch"}
    assert written["peak"]["peak_gflops"] == max(written["peak"]["jax_gflops"],
                                                 written["peak"]["torch_gflops"])
    # Same weights and batch on both sides: the first losses agree before any update.
    first = results["train"]["first_loss"]
    assert abs(first["llamax"] - first["torch"]) < 1e-3
    assert results["decode"]["per_batch"][0]["same_tokens"]
    assert "train tok/s" in capsys.readouterr().out


def test_value_parsing_and_geomean():
    assert run._parse_value("False") is False and run._parse_value("128") == 128
    assert run._parse_value("bfloat16") == "bfloat16"
    assert run._geomean([2.0, 8.0]) == pytest.approx(4.0)
    batch = run.random_batch(100, 2, 8)
    assert (batch["targets"][:, :-1] == batch["tokens"][:, 1:]).all()
