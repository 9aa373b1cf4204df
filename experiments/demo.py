"""`make demo`: pretrain a small LLaMA on the bundled Shakespeare corpus, then show what it learned.

    python -m experiments.demo [--model_dir runs/demo] [--steps 300]

1. trains (or resumes) `configs/runs/demo.gin` into MODEL_DIR, ending with a checkpoint;
2. prints samples from the final checkpoint (greedy and nucleus sampling);
3. writes MODEL_DIR/loss.png (train and eval loss per step, and lm-eval scores when the run
   logged any: EVAL_TASKS during training or `experiments.lm_eval` afterwards).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = ("ROMEO:\n", "KING HENRY:\nWhat", "To be, or not")


def plot_loss(run_dir: Path) -> Path:
    """Train/eval loss curves (and lm-eval scores) of a run -> run_dir/loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llamax.train.metrics import read_metrics

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    # Downstream scores (EVAL_TASKS, experiments.lm_eval) in a second panel; the perplexities
    # repeat bits_per_byte on a scale that would flatten everything else.
    tasks = sorted({k for r in records for k in r if k.startswith("lm_eval/") and "perplexity" not in k})
    figure, panels = plt.subplots(1, 2 if tasks else 1, figsize=(13 if tasks else 7, 4), squeeze=False)
    axes = panels[0][0]
    axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss (held-out plays)")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(f"llamax demo: {run_dir.name}")
    axes.grid(alpha=0.3)
    axes.legend()
    for key in tasks:
        panels[0][1].plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), "o-",
                          label=key.removeprefix("lm_eval/"))
    if tasks:
        panels[0][1].set_xlabel("step")
        panels[0][1].set_title("lm-eval tasks")
        panels[0][1].grid(alpha=0.3)
        panels[0][1].legend(fontsize=8)
    figure.tight_layout()
    out = run_dir / "loss.png"
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def print_samples(run_dir: Path, tokenizer_path: str, max_new_tokens: int = 60) -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on opening read-only
    from llamax.convert.hub import load_any
    from llamax.infer.generate import generate
    from llamax.tokenizer import Tokenizer

    config, params = load_any(run_dir)  # the newest checkpoint
    tokenizer = Tokenizer(tokenizer_path)
    prompts = [tokenizer.encode(p, bos=True) for p in PROMPTS]
    for label, kwargs in (("greedy", {}), ("top_p=0.9, temperature=0.8",
                                           dict(temperature=0.8, top_p=0.9, seed=0))):
        outputs = generate(config, params, prompts, max_new_tokens, eos_id=tokenizer.eos_id, **kwargs)
        print(f"\n=== samples ({label}) ===")
        for prompt, prompt_ids, new_tokens in zip(PROMPTS, prompts, outputs):
            # Decode prompt and continuation together: sentencepiece drops a leading space when
            # a continuation is decoded on its own.
            print(f"--- {prompt!r}\n{tokenizer.decode(prompt_ids + new_tokens)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="override TRAIN_STEPS")
    args = parser.parse_args(argv)

    from experiments import train

    run_dir = Path(args.model_dir)
    overrides = [f"--gin.MODEL_DIR='{run_dir}'"]
    if args.steps:
        overrides.append(f"--gin.TRAIN_STEPS={args.steps}")
    status = train.main(["--gin_file=configs/runs/demo.gin", *overrides])
    if status:
        return status
    import gin

    tokenizer_path = gin.query_parameter("%TOKENIZER").scoped_configurable_fn()
    print_samples(run_dir, tokenizer_path)
    print(f"loss plot: {plot_loss(run_dir)}")
    from llamax.run_dir import RunDir

    run = RunDir(run_dir)
    print(f"checkpoints: {run.checkpoint_steps()} in {run.checkpoints}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
