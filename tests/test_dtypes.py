"""One dtype parser: dtype objects and the usual short names everywhere, one canonical name
stored, non-float compute dtypes refused up front (issue: dtypes spelled three ways)."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llamax.config import get_preset
from llamax.dtypes import dtype_name, numpy_dtype, parse_dtype
from llamax.errors import ConfigError
from llamax.model.lora import LoraConfig
from llamax.train.optim import OptimConfig


@pytest.mark.parametrize("spelling, canonical", [
    (jnp.bfloat16, "bfloat16"), (ml_dtypes.bfloat16, "bfloat16"), ("bf16", "bfloat16"),
    ("bfloat16", "bfloat16"), ("BF16", "bfloat16"), (np.float32, "float32"), ("fp32", "float32"),
    (jnp.float32, "float32"), ("f32", "float32"), ("fp16", "float16"), (np.dtype("float16"), "float16"),
    ("half", "float16"), ("int32", "int32"),
])
def test_every_spelling_gives_one_name(spelling, canonical):
    assert dtype_name(spelling) == canonical
    assert numpy_dtype(spelling) == numpy_dtype(canonical)


def test_configs_store_the_canonical_name():
    # The Flax convention (a dtype object) and the CLI short name both work and compare equal.
    assert get_preset("tiny", dtype=jnp.bfloat16) == get_preset("tiny", dtype="bf16") == \
        get_preset("tiny", dtype="bfloat16")
    assert get_preset("tiny", param_dtype=np.float16).param_dtype == "float16"
    assert LoraConfig(dtype=jnp.bfloat16).dtype == "bfloat16"
    assert OptimConfig(opt_state_dtype="bf16").opt_state_dtype == "bfloat16"
    assert parse_dtype(None) is None and parse_dtype("bf16") == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("make, field", [
    (lambda d: get_preset("tiny", dtype=d), "ModelConfig.dtype"),
    (lambda d: get_preset("tiny", param_dtype=d), "ModelConfig.param_dtype"),
    (lambda d: LoraConfig(dtype=d), "LoraConfig.dtype"),
    (lambda d: OptimConfig(opt_state_dtype=d), "OptimConfig.opt_state_dtype"),
])
def test_non_float_and_unknown_dtypes_are_refused_naming_the_field(make, field):
    with pytest.raises(ConfigError, match=rf"{field}='int32' is int32, not a floating dtype"):
        make("int32")
    with pytest.raises(ConfigError, match=rf"{field}='float33': 'float33' is not a dtype"):
        make("float33")
    with pytest.raises(ConfigError, match=field):
        make(True)
