"""Every point's gin files and bindings parsed with gin (through `experiments.gin_config`, as
`experiments.train` parses them) before anything runs."""
from __future__ import annotations

import dataclasses

from experiments import gin_config
from experiments.sweep.points import Sweep, SweepError
from experiments.sweep_spec import gin_literal


def validate(sweep: Sweep) -> Sweep:
    """Parses every point's gin files + bindings with gin, running nothing.

    Returns the sweep with each point's `train_steps`; raises SweepError naming the point and the
    binding when a configurable, parameter or macro is unknown, or a value is not valid gin.
    """
    import gin

    checked = []
    try:
        for point in sweep.points:
            gin.clear_config()
            try:
                gin_config.parse(point.gin_files, [], required=())
            except gin_config.GinError as error:
                if "not found" in str(error):
                    raise SweepError(str(error)) from error
                raise SweepError(f"gin files {list(point.gin_files)} do not parse: {error}") from error
            for name, value in {**sweep.bindings, **point.bindings}.items():
                where = "BINDINGS" if name not in point.bindings else f"point {point.name!r}"
                binding = f"{name} = {gin_literal(value)}"
                try:
                    gin_config.check_macro_bindings([binding], point.gin_files)
                    gin.parse_config([binding])
                except gin_config.GinError as error:
                    raise SweepError(f"{where}: {str(error).split(': ', 1)[1]}") from error
                except gin_config.GIN_ERRORS as error:
                    raise SweepError(f"{where}: binding `{binding}` is invalid: "
                                     f"{gin_config.explain_gin_error(error)}") from error
            defined, referenced = gin_config.macros()
            missing = sorted((referenced | set(gin_config.REQUIRED_MACROS)) - defined - {"MODEL_DIR"})
            if missing:
                raise SweepError(f"point {point.name!r}: macro(s) {missing} are needed but never "
                                 f"set by {list(point.gin_files)}; add them to BINDINGS")
            train_steps = gin.query_parameter("%TRAIN_STEPS")
            checked.append(dataclasses.replace(
                point, train_steps=train_steps if isinstance(train_steps, int) else None))
    finally:
        gin.clear_config()
    return dataclasses.replace(sweep, points=tuple(checked))
