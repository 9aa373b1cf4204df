"""Running lm-eval tasks on a llamax model, and what comes out: flat metrics, a table, a plot.

    results = run_tasks(lm, ["shakespeare_mc"], include_path="configs/lm_eval", limit=100)
    flat_metrics(results)        # {'lm_eval/shakespeare_mc/acc': 0.31, ...}
    results_table(results)       # markdown, one row per task and metric (± stderr)
    plot_scores(results, "scores.png")

During training, `TaskEvaluator(DownstreamConfig(tasks=[...], every=500), tokenizer)` is one of
the loop's evaluators (`llamax.train.fit`): at its steps it scores the tasks with the params
being trained, on the training mesh, and returns the flat metrics for metrics.jsonl and
TensorBoard. lm-eval itself is imported only here and in `llamax.infer.lm_eval_backend`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax

from llamax.errors import ConfigError, DataError

PREFIX = "lm_eval"
DEFAULT_INCLUDE_PATH = Path(__file__).resolve().parents[2] / "configs" / "lm_eval"


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | Sequence | None = None):
    """lm-eval's TaskManager for `tasks`: over `include_path` alone (default: llamax's offline
    tasks in configs/lm_eval) when it holds them all, else over lm-eval's own tasks too (indexing
    those ~15k YAMLs takes ~20 s). ConfigError naming the task names neither knows."""
    from lm_eval.tasks import TaskManager

    if include_path is None and DEFAULT_INCLUDE_PATH.is_dir():
        include_path = DEFAULT_INCLUDE_PATH
    if isinstance(include_path, (str, os.PathLike)):
        include_path = [include_path]
    paths = [str(path) for path in include_path or []]
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(f"include_path {path} is not a folder of lm-eval task YAMLs")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ConfigError("no lm-eval tasks given; name some, e.g. shakespeare_mc")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}: not an lm-eval task, group or tag, nor "
                          f"defined in the include path ({', '.join(paths) or 'none given'}); list "
                          "them with `lm_eval ls tasks`")
    return manager


def run_tasks(lm, tasks: Sequence[str], *, include_path=None, limit: int | float | None = None,
              num_fewshot: int | None = None, log_samples: bool = False, bootstrap_iters: int = 100_000,
              manager=None) -> dict | None:
    """`lm_eval.simple_evaluate` of `tasks` with `lm` (a `LlamaxLM`): lm-eval's result dict on
    process 0, None on the others. `manager`: a `task_manager(...)` to reuse. DataError for a
    task without documents (lm-eval would fail on it with an IndexError after scoring the rest)."""
    import lm_eval

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    manager = manager or task_manager(tasks, include_path)
    loaded = manager.load(tasks)
    for name, task in loaded["tasks"].items():
        if len(task.eval_docs) == 0:
            raise DataError(f"lm-eval task {name} has no documents (empty task file?): its "
                            f"{task.config.test_split or task.config.validation_split} split is empty; "
                            f"check its data ({task.config.dataset_path or task.config.dataset_kwargs})")
    # The loaded tasks go in as they are (no second load), unless a group needs its aggregation.
    specs = tasks if loaded["groups"] else list(loaded["tasks"].values())
    return lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                   task_manager=manager)


def scores(results: dict) -> list[dict[str, Any]]:
    """One row per (task or group, metric, filter): {'task', 'metric', 'filter', 'value',
    'stderr', 'higher_is_better'}; stderr None when lm-eval has none."""
    rows = []
    for section in ("results", "groups"):
        for task, values in sorted(results.get(section, {}).items()):
            better = results.get("higher_is_better", {}).get(task, {})
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = values.get(f"{metric}_stderr,{filter_name}")
                rows.append({"task": task, "metric": metric, "filter": filter_name, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                             "higher_is_better": better.get(metric)})
    return rows


def flat_metrics(results: dict, prefix: str = PREFIX) -> dict[str, float]:
    """{'lm_eval/<task>/<metric>': value}; a metric reported under several filters (e.g.
    gsm8k's strict-match and flexible-extract) gets '/<filter>' appended."""
    rows = scores(results)
    filters: dict[tuple[str, str], int] = {}
    for row in rows:
        filters[row["task"], row["metric"]] = filters.get((row["task"], row["metric"]), 0) + 1
    flat = {}
    for row in rows:
        key = f"{prefix}/{row['task']}/{row['metric']}"
        if filters[row["task"], row["metric"]] > 1:
            key += f"/{row['filter']}"
        flat[key] = row["value"]
    return flat


def results_table(results: dict, title: str | None = None) -> str:
    """A markdown table of the scores (value ± stderr, ↑/↓ = higher/lower is better)."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| task | metric | filter | value | ± stderr |", "|---|---|---|---:|---:|"]
    for row in scores(results):
        arrow = {True: " ↑", False: " ↓"}.get(row["higher_is_better"], "")
        stderr = "" if row["stderr"] is None or math.isnan(row["stderr"]) else f"{row['stderr']:.4f}"
        lines.append(f"| {row['task']} | {row['metric']}{arrow} | {row['filter']} | {row['value']:.4f} | "
                     f"{stderr} |")
    return "\n".join(lines) + "\n"


def plot_scores(results: dict, path: str | os.PathLike, title: str = "lm-eval scores") -> Path:
    """A bar chart of every score (one panel per metric, error bars = stderr) -> `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_metric: dict[str, list[dict]] = {}
    for row in scores(results):
        by_metric.setdefault(row["metric"], []).append(row)
    columns = min(3, max(1, len(by_metric)))
    rows_of_panels = max(1, -(-len(by_metric) // columns))
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(3.6 * columns, 3.2 * rows_of_panels),
                                squeeze=False)
    for axis in axes.flat[len(by_metric):]:
        axis.set_visible(False)
    for axis, (metric, rows) in zip(axes.flat, by_metric.items()):
        values = [row["value"] for row in rows]
        bars = axis.bar(range(len(rows)), values, yerr=[row["stderr"] or 0.0 for row in rows], capsize=3,
                        color="tab:blue")
        axis.bar_label(bars, labels=[f"{value:.3g}" for value in values], fontsize=8)
        if all(0.0 <= value <= 1.0 for value in values):  # accuracies and other fractions
            axis.set_ylim(0.0, 1.05)
        axis.set_xticks(range(len(rows)), [row["task"] for row in rows], rotation=20, ha="right", fontsize=8)
        better = {True: " (higher is better)", False: " (lower is better)"}.get(rows[0]["higher_is_better"], "")
        axis.set_title(f"{metric}{better}", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---- during training ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """lm-eval tasks run during training (the EVAL_TASKS gin macros).

    tasks: lm-eval task, group or tag names ([] = none).
    every: run them every this many steps (0: only at the end of training).
    limit: documents per task (None: all; a float < 1: that fraction).
    include_path: folder(s) of extra task YAMLs (default: llamax's offline tasks).
    batch_size, max_length, max_gen_toks: as the `llamax` lm-eval model args.
    """

    tasks: Sequence[str] = ()
    every: int = 0
    limit: int | float | None = None
    include_path: str | Sequence[str] | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    max_length: int | None = None
    max_gen_toks: int = 256

    def __post_init__(self):
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", (self.tasks,))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"EVAL_TASKS_EVERY must be an integer >= 0, got {self.every!r}")


class TaskEvaluator:
    """A training-loop evaluator: `due(step, final_step)`, then `(step, setup, params, frozen)`
    -> {'lm_eval/<task>/<metric>': value}. Built before training so a bad task name or include
    path fails before the first step."""

    def __init__(self, config: DownstreamConfig, tokenizer: Any, lora_config: Any = None,
                 init_from: Any = None):
        """`tokenizer`: a loaded tokenizer, a path, or None for `init_from`'s (as training takes it)."""
        from llamax.convert.identity import training_identity
        from llamax.tokenizer import load_tokenizer

        self.config = config
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(training_identity(tokenizer, init_from).tokenizer)
        self.tokenizer = tokenizer
        self.lora_config = lora_config
        self.manager = task_manager(config.tasks, config.include_path) if config.tasks else None
        self._lm = None
        self._merge = None

    def due(self, step: int, final_step: int) -> bool:
        every = self.config.every
        return bool(self.config.tasks) and (step == final_step or (every > 0 and step % every == 0))

    def __call__(self, step: int, setup: Any, params: Any, frozen: Any = None) -> dict[str, float]:
        from llamax.infer.lm_eval_backend import LlamaxLM

        if frozen is not None:  # LoRA: score the merged model, as an export of the run would be
            params = self._merged(setup)(params, frozen)
        if self._lm is None:
            self._lm = LlamaxLM.from_params(setup.model_config, params, self.tokenizer, mesh=setup.mesh,
                                            rules=setup.rules, batch_size=self.config.batch_size,
                                            max_length=self.config.max_length,
                                            max_gen_toks=self.config.max_gen_toks)
        else:
            self._lm.params = self._lm.scorer.place(params)
        results = run_tasks(self._lm, self.config.tasks, limit=self.config.limit,
                            num_fewshot=self.config.num_fewshot, bootstrap_iters=0, manager=self.manager)
        return {} if results is None else flat_metrics(results)

    def _merged(self, setup: Any):
        if self._merge is None:
            from llamax.model.lora import merge_lora

            # The setup's: a run whose LoraConfig comes from ADAPTERS_FROM has no other.
            lora_config = setup.lora_config or self.lora_config
            if lora_config is None:
                raise ConfigError("a LoRA run's evaluator needs the run's lora_config")
            self._merge = jax.jit(lambda adapters, base: merge_lora(setup.model_config, base, adapters,
                                                                    lora_config),
                                  out_shardings=setup.frozen_shardings)
        return self._merge
