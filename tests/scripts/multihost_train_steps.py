"""Three sharded train steps on a fixed global batch, then one checkpoint saved collectively.

    python tests/scripts/multihost_train_steps.py OUT_DIR \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I]

The global batch of each step is built from a seeded numpy generator, identically in every
process; each process hands only its contiguous block of rows to `to_global_batch`. Run as one
process with 8 devices or as two with 4 each, the global computation is the same, so the losses
(printed by process 0 as one JSON line) and the checkpoint under OUT_DIR/checkpoints/3 must agree.
Used by tests/test_multihost.py.
"""
import argparse
import json
from pathlib import Path

import numpy as np

STEPS, BATCH, SEQ = 3, 8, 32


def global_batch(step: int, vocab_size: int) -> dict[str, np.ndarray]:
    """[BATCH, SEQ] next-token batch of step `step` (one document per row, all tokens scored)."""
    rng = np.random.default_rng(1000 + step)
    sequence = rng.integers(3, vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    return {"tokens": sequence[:, :-1], "targets": sequence[:, 1:],
            "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()

    from llamax.distributed import initialize

    initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    from llamax.train.checkpoint import Checkpointer
    from llamax.config import get_preset
    from llamax.sharding import to_global_batch
    from llamax.train.optim import OptimConfig
    from llamax.sharding import MeshConfig, batch_sharding, make_mesh
    from llamax.train import init_train_state, make_train_step

    model = get_preset("tiny")
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, decay="constant")
    # fsdp=4 x tensor=2: with two processes the batch rows *and* the params are split across them.
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    state = init_train_state(model, optim, mesh, rng=0)
    train_step = make_train_step(model, optim, mesh)
    sharding = batch_sharding(mesh)
    rows = BATCH // jax.process_count()
    first_row = jax.process_index() * rows
    losses = []
    for step in range(STEPS):
        local = {key: value[first_row:first_row + rows]
                 for key, value in global_batch(step, model.vocab_size).items()}
        state, metrics = train_step(state, to_global_batch(local, sharding))
        losses.append(float(metrics["loss"]))
    with Checkpointer(Path(args.out_dir) / "checkpoints") as checkpointer:
        checkpointer.save(STEPS, state, {"losses": losses}, force=True)
    if jax.process_index() == 0:
        print(json.dumps({"losses": losses, "process_count": jax.process_count(),
                          "device_count": jax.device_count()}), flush=True)


if __name__ == "__main__":
    main()
