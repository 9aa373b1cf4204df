"""Dtype names: one parser for every place a user names a dtype (configs, CLIs, converters).

Users write dtypes three ways: a dtype object (`jnp.bfloat16`, `np.float32`, the Flax
convention), a canonical name (`'bfloat16'`) or a short name (`'bf16'`, `'fp32'`). All of them
become one canonical name here, which configs store and JSON files record.
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from llamax.errors import ConfigError

# Short and canonical spellings of the floating dtypes weights and activations use.
_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "f32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "f16": "float16", "float16": "float16", "half": "float16",
    "fp64": "float64", "f64": "float64", "float64": "float64",
}
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def dtype_name(dtype: Any) -> str:
    """The canonical name of `dtype` ('bfloat16', 'float32', 'int32', ...); accepts dtype
    objects (jnp/np/ml_dtypes scalar types and dtypes) and the names in `_ALIASES`.

    Raises ConfigError for anything that is not a dtype.
    """
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.strip().lower())
        if name is not None:
            return name
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or isinstance(dtype, bool) or (isinstance(dtype, str) and not dtype.strip()):
        raise ConfigError(f"{dtype!r} is not a dtype; use e.g. 'bfloat16' ('bf16'), 'float32' "
                          "('fp32'), 'float16' ('fp16') or a dtype object such as jnp.bfloat16")
    return "bfloat16" if resolved == np.dtype(ml_dtypes.bfloat16) else resolved.name


def float_dtype_name(dtype: Any, what: str = "dtype") -> str:
    """`dtype_name` for a floating dtype; ConfigError naming `what` for ints, bools, etc."""
    try:
        name = dtype_name(dtype)
    except ConfigError as error:
        raise ConfigError(f"{what}={dtype!r}: {error}") from None
    if name not in FLOAT_DTYPES:
        raise ConfigError(f"{what}={dtype!r} is {name}, not a floating dtype; weights and "
                          f"activations need one of {', '.join(FLOAT_DTYPES)} (e.g. 'bfloat16')")
    return name


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of any spelling `dtype_name` accepts (bfloat16 via ml_dtypes)."""
    name = dtype_name(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def parse_dtype(dtype: Any) -> np.dtype | None:
    """Like `numpy_dtype`, but None stays None ("keep the dtype as it is")."""
    return None if dtype is None else numpy_dtype(dtype)
