"""Peak memory and time of streaming conversion on a synthetic ~1B-parameter checkpoint.

Writes random bf16 weights with Llama-3.2-1B shapes as a sharded HF safetensors folder in a
temporary directory, then runs each step in a fresh subprocess and reports its peak RSS
(`ru_maxrss` of the child, which counts memory-mapped file pages it touched), its peak anonymous
memory (RssAnon sampled every 20 ms: the memory that cannot simply be dropped by the kernel)
and wall time, with the ratio of each peak to the model's size on disk.

    python -m benchmarks.convert_memory [--preset llama3.2_1b] [--json PATH] [--keep DIR]

Steps: `baseline: import` (python + jax + torch + llamax), `baseline: load whole`
(safetensors.torch.load_file of every shard, cloned: the full state dict in memory), then the streaming
conversions HF -> orbax -> Meta (2 shards) -> HF.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_synthetic_hf(folder: Path, preset: str, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 HF checkpoint (sharded safetensors + index + config.json); returns its bytes."""
    import ml_dtypes

    from llamax.config import get_preset
    from llamax.convert import expected_hf_shapes
    from llamax.convert.weight_files import save_safetensors

    config = get_preset(preset, param_dtype="bfloat16")
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    shapes = expected_hf_shapes(config)
    weight_map, pending, pending_bytes, files, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal pending, pending_bytes, files
        name = f"model-{files + 1:05d}.safetensors"
        save_safetensors(folder / name, pending)
        weight_map.update({tensor: name for tensor in pending})
        pending, pending_bytes, files = {}, 0, files + 1

    for name, shape in shapes.items():
        # Random small normal bf16 values (random bits, no inf/nan), incompressible like real weights.
        bits = rng.integers(0x3800, 0x3E00, size=shape, dtype=np.uint16)
        bits |= (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)
        pending[name] = bits.view(ml_dtypes.bfloat16)
        pending_bytes += bits.nbytes
        total += bits.nbytes
        if pending_bytes >= shard_bytes:
            flush()
    if pending:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = hf_config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(hf_config))
    return total


def child(task: str, src: str, dst: str) -> None:
    """Runs one step in this (fresh) process and prints its peak RSS as JSON."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch  # noqa: F401  (imported by every step, so the import baseline is comparable)

    from llamax.convert.hub import convert

    if task == "load_whole":
        import safetensors.torch

        state = {}
        for path in sorted(Path(src).glob("*.safetensors")):
            # load_file maps the file; clone so the state dict really is in memory, as a
            # load-then-convert script (or model.load_state_dict) would hold it.
            state.update({k: v.clone() for k, v in safetensors.torch.load_file(path).items()})
        assert sum(t.numel() for t in state.values()) > 0
    elif task != "import":
        src_format, dst_format = task.split("_to_")
        convert(src, src_format, dst, dst_format, num_shards=2 if dst_format == "meta" else 1, progress=False)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(task: str, src: Path, dst: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.convert_memory", "--child", task,
                                "--src", str(src), "--dst", str(dst)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    while process.poll() is None:
        peak_anon = max(peak_anon, _rss_anon(process.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{task} failed:\n{err[-3000:]}")
    return {"step": task, "seconds": round(seconds, 1), "peak_anon": peak_anon,
            **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3.2_1b")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--src", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.src, args.dst)
        return
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model_bytes = write_synthetic_hf(tmp / "hf", args.preset)
        print(f"synthetic {args.preset} checkpoint: {model_bytes / 1e9:.2f} GB bf16 "
              f"({model_bytes // 2 / 1e9:.2f} B params), written in {time.perf_counter() - start:.0f} s")
        plan = [("import", tmp / "hf", tmp / "unused"), ("load_whole", tmp / "hf", tmp / "unused"),
                ("hf_to_orbax", tmp / "hf", tmp / "orbax"), ("orbax_to_meta", tmp / "orbax", tmp / "meta"),
                ("meta_to_hf", tmp / "meta", tmp / "hf2")]
        rows = [measure(*step) for step in plan]
    gb = 1e9
    print(f"\n{'step':<16}{'seconds':>9}{'peak RSS GB':>13}{'/ model':>9}{'peak anon GB':>14}{'/ model':>9}")
    for row in rows:
        print(f"{row['step']:<16}{row['seconds']:>9.1f}{row['peak_rss'] / gb:>13.2f}"
              f"{row['peak_rss'] / model_bytes:>9.2f}{row['peak_anon'] / gb:>14.2f}"
              f"{row['peak_anon'] / model_bytes:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "model_bytes": model_bytes,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
