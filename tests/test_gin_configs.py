"""configs/models/*.gin: each builds exactly its preset, and abstract init has the right size."""
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from experiments.model_gin_files import MODELS_DIR, gin_file_name, gin_text
from llamax.config import PRESETS, get_preset
from llamax.model import Llama


def _build(gin_file: Path):
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(gin_file)], [])
        return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_gin_file_is_current_and_builds_its_preset(name):
    gin_file = MODELS_DIR / gin_file_name(name)
    assert gin_file.read_text() == gin_text(name), "run `python -m experiments.model_gin_files`"
    assert _build(gin_file) == get_preset(name)


@pytest.mark.parametrize("name, billions", [("llama2_7b", 6.74), ("llama3_8b", 8.03),
                                            ("llama3.2_1b", 1.24), ("llama3.1_405b", 405.85)])
def test_abstract_init_has_published_parameter_count(name, billions):
    config = _build(MODELS_DIR / gin_file_name(name))
    shapes = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), np.zeros((1, 1), np.int32)))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == config.num_params()
    assert count / 1e9 == pytest.approx(billions, abs=0.01)
