"""DPO metrics of a DPO run on the very pairs it trained on, before (policy = its reference) and
after training; for configs/runs/dpo_tiny.gin.

    python -m benchmarks.dpo_tiny --run runs/dpo_tiny [--json benchmarks/dpo_tiny.json]

The pairs are the run's own training batches: the train loader rebuilt with the run's data,
seed, batch size and sequence length, its first `--steps` batches (every pair the run took a step
on, in order). Each is scored with the DPO objective against the reference (the run's INIT_FROM):
"before" uses the reference itself as the policy (every reward is 0, so rewards/accuracies, which
counts chosen rewards strictly above rejected ones as TRL does, is 0); "after" the run's newest
checkpoint. `logps/*` show the policy's own preference, which DPO sharpens.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.machine import cpu_model


def evaluate(run: Path, steps: int, batch_size: int, seq_len: int, seed: int, beta: float,
             sft_template: str | None) -> dict:
    import jax

    from llamax.data.pipeline import DataConfig, train_loader
    from llamax.infer.evaluate import sum_eval
    from llamax.run_dir import RunDir
    from llamax.sharding import MeshConfig, make_mesh
    from llamax.tokenizer import load_tokenizer
    from llamax.train.checkpoint import restore_params
    from llamax.train.fit import load_init_params
    from llamax.train.objectives import DPO
    from llamax.train.optim import OptimConfig
    from llamax.train.setup import make_train_setup

    run_dir = RunDir(run)
    config = run_dir.model_config()
    tokenizer = load_tokenizer(run_dir.tokenizer())
    data = DataConfig(tokenizer=str(run_dir.tokenizer()), train="shakespeare_dpo", sft_template=sft_template)
    loader = train_loader(data, tokenizer, seq_len, batch_size, seed, preference=True)
    batches = [next(loader) for _ in range(steps)]
    objective = DPO(beta=beta)
    setup = make_train_setup(config, OptimConfig(), make_mesh(MeshConfig()), objective=objective)
    reference = jax.device_put(load_init_params(run_dir.init_from(), config), setup.frozen_shardings)
    trained = jax.device_put(restore_params(run_dir.checkpoints), setup.trainable.shardings)
    result = {}
    for name, policy in (("before", reference), ("after", trained)):
        result[name] = objective.summarize(sum_eval(setup.eval_step, policy, batches,
                                                    setup.batch_sharding, reference))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/dpo_tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft_template", default="plain")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = evaluate(Path(args.run), args.steps, args.batch_size, args.seq_len, args.seed, args.beta,
                      args.sft_template)
    result["machine"] = {"cpu": cpu_model(), "python": platform.python_version()}
    for name in ("before", "after"):
        print(name, {k: round(v, 4) for k, v in result[name].items()})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
