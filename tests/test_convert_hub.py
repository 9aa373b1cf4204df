"""load_any: one in-memory loader for HF, Meta and orbax checkpoints (fine-tuning init)."""
import numpy as np
import pytest

import jax
from hf_models import make_hf_model
from llamax.convert import load_hf
from llamax.convert.hub import load_any
from llamax.convert.meta import save_meta
from llamax.errors import CheckpointError
from llamax.convert.orbax import save_params


def test_load_any_reads_all_three_formats_identically(tmp_path):
    make_hf_model("llama3_gqa").save_pretrained(tmp_path / "hf")
    config, params = load_hf(tmp_path / "hf")
    save_meta(config, params, tmp_path / "meta", num_shards=2)
    save_params(tmp_path / "orbax", config, params)
    for folder in ("hf", "meta", "orbax"):
        loaded_config, loaded = load_any(tmp_path / folder, scan_layers=False)
        # Meta's params.json has no context length: it is inferred from the LLaMA generation.
        assert loaded_config.replace(max_position_embeddings=256).architecture() == config.architecture(), folder
        assert "layers_1" in loaded
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(load_hf(tmp_path / "hf", scan_layers=False)[1])):
            np.testing.assert_array_equal(got, want, err_msg=folder)


def test_load_any_rejects_unknown_folders(tmp_path):
    with pytest.raises(CheckpointError, match="not an HF"):
        load_any(tmp_path)
