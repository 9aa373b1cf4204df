"""experiments/ablations: the specs validate, GQA keeps params equal, committed results are
complete and say how to reproduce them."""
import importlib
import re
from pathlib import Path

import pytest

from experiments import sweep as sweeps
from llamax.config import get_preset

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = {  # script module -> its sweep spec
    "lr_warmup": "configs/sweeps/ablation_lr_warmup.py",
    "gqa": "configs/sweeps/ablation_gqa.py",
    "rope_long_context": "configs/sweeps/ablation_rope.py",
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_spec_validates_and_script_names_it(name):
    module = importlib.import_module(f"experiments.ablations.{name}")
    assert module.SPEC == ABLATIONS[name]
    assert f"python -m experiments.ablations.{name}" in module.__doc__
    sweep = sweeps.validate(sweeps.load_sweep(REPO / module.SPEC))
    assert 3 <= len(sweep.points) <= 8  # tiny scale: minutes on a CPU
    assert all(p.train_steps <= 300 for p in sweep.points)


def test_gqa_points_have_equal_parameter_counts():
    sweep = sweeps.load_sweep(REPO / ABLATIONS["gqa"])
    base = get_preset("tiny").replace(vocab_size=1024)
    counts = {}
    for point in sweep.points:
        config = base.replace(num_kv_heads=point.bindings["config.ModelConfig.num_kv_heads"],
                              intermediate_size=point.bindings["config.ModelConfig.intermediate_size"])
        counts[config.num_kv_heads] = config.num_params()
    assert sorted(counts) == [1, 2, 4]
    assert max(counts.values()) / min(counts.values()) - 1 < 1e-3


@pytest.mark.parametrize("name", sorted([*ABLATIONS, "remat"]))
def test_committed_results_are_complete(name):
    out = REPO / "experiments" / "results" / name
    readme = (out / "README.md").read_text()
    assert re.search(rf"^python -m experiments\.ablations\.{name}\b", readme, re.M)
    assert "Produced 20" in readme and "cores" in readme  # date and machine
    assert f"]({name}.png)" in readme and (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.csv").read_text().count("\n") >= 3
    assert "| failed |" not in readme
