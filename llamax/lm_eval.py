"""lm-evaluation-harness integration: importing this module registers the `llamax` model.

    import llamax.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="llamax", model_args="checkpoint=runs/tiny",
                            tasks=["shakespeare_mc"], task_manager=lm_eval.tasks.TaskManager(
                                include_path="configs/lm_eval"))

    python -m llamax.lm_eval --model llamax --model_args checkpoint=runs/tiny \\
        --tasks shakespeare --include_path configs/lm_eval        # lm-eval's own command line

lm-eval 0.4.13 discovers no plugins, so its `lm_eval` console script only knows models imported
before it runs; `python -m llamax.lm_eval ARGS` is that command line with `llamax` registered
(every lm-eval option works). The backend itself is `llamax.infer.lm_eval_backend.LlamaxLM`.
"""
from __future__ import annotations

import sys

MODEL_NAME = "llamax"


def register() -> None:
    """Adds `llamax` to lm-eval's model registry (lazily: the backend is imported on first use)."""
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models first
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="llamax.infer.lm_eval_backend:LlamaxLM")


register()


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (`lm_eval run ...` or the bare `lm_eval --model ...` form), with the
    llamax model registered and multi-process options read from LLAMAX_* variables."""
    from lm_eval.__main__ import cli_evaluate

    from llamax.distributed import initialize_from_options

    initialize_from_options({})
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
