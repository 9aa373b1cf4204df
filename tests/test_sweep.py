"""experiments.sweep / sweep_spec: expansion, naming, validation, launch text, skip/resume logic,
results from real tiny runs; and every configs/meshes/*.gin builds its MeshConfig."""
import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gin
import pytest

from experiments import sweep as sweeps
from experiments.sweep_spec import Gin, SweepSpecError, chain, grid, name_points, zip_
from llamax.sharding import MeshConfig

REPO = Path(__file__).resolve().parent.parent
TINY = "configs/runs/tiny.gin"


def _sweep(points, bindings=None, names=None, gin_files=(TINY,)):
    return sweeps.make_sweep(list(gin_files), points, bindings, names)


# ---- expansion and naming ---------------------------------------------------------------------

def test_grid_zip_chain_expand_in_order():
    points = grid({"LEARNING_RATE": [1e-3, 3e-3]},
                  zip_({"WARMUP_STEPS": [0, 10], "SEED": [5, 6]}))
    assert points == [
        {"LEARNING_RATE": 1e-3, "WARMUP_STEPS": 0, "SEED": 5},
        {"LEARNING_RATE": 1e-3, "WARMUP_STEPS": 10, "SEED": 6},
        {"LEARNING_RATE": 3e-3, "WARMUP_STEPS": 0, "SEED": 5},
        {"LEARNING_RATE": 3e-3, "WARMUP_STEPS": 10, "SEED": 6},
    ]
    assert grid({"A": [1, 2], "B": [3]}) == [{"A": 1, "B": 3}, {"A": 2, "B": 3}]
    assert chain({"A": [1]}, [{"B": 2}]) == [{"A": 1}, {"B": 2}]


def test_point_names_are_readable_sanitized_and_unique():
    points = [{"LEARNING_RATE": 3e-4, "config.ModelConfig.num_kv_heads": 2},
              {"LEARNING_RATE": 1e-2, "config.ModelConfig.remat_policy": "save_projections"},
              {"TOKENIZER": "/data/tok v2.model", "gin_file": "configs/models/llama3_8b.gin"},
              {"config.ModelConfig.rope_scaling": Gin("@config.RopeScaling()", "llama3")},
              {"LEARNING_RATE": 1e-5, "fit.TrainConfig.progress_bar": False}]
    assert name_points(points, {"LEARNING_RATE": "lr"}) == [
        "lr=0.0003,num_kv_heads=2",
        "lr=0.01,remat_policy=save_projections",
        "tokenizer=-data-tok-v2.model,gin_file=llama3_8b",
        "rope_scaling=llama3",
        "lr=1e-05,progress_bar=False",
    ]
    sweep = _sweep(grid({"LEARNING_RATE": [1e-3, 3e-3]}, {"SEED": [0, 1]}))
    directories = [sweeps.run_dir("runs/x", p) for p in sweep.points]
    assert len(set(directories)) == 4
    assert directories[0] == "runs/x/learning_rate=0.001,seed=0"


@pytest.mark.parametrize("make, message", [
    (lambda: grid({"LEARNING_RATE": []}), "axis 'LEARNING_RATE' is empty"),
    (lambda: grid({"LEARNING_RATE": 0.1}), "must be a list of values"),
    (lambda: zip_({"A": [1, 2], "B": [1]}), "equal length"),
    (lambda: grid({"A": [1]}, {"A": [2]}), "set by two combined parts"),
    (lambda: name_points([{"A": 0.1}, {"A": 0.10000}]), "duplicate point names"),
    (lambda: name_points([{"A": "x/y"}, {"A": "x y"}]), "duplicate point names: 'a=x-y'"),
    (lambda: name_points([{"MODEL_DIR": "'x'"}]), "set by the sweep"),
    (lambda: name_points([]), "no points"),
    (lambda: name_points([{}]), "no bindings"),
])
def test_malformed_specs_are_errors(make, message):
    with pytest.raises(SweepSpecError, match=re.escape(message)):
        make()


# ---- spec files, dry run, validation -----------------------------------------------------------

def _write_spec(tmp_path, body: str) -> str:
    path = tmp_path / "spec.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


SPEC = """
    from experiments.sweep_spec import grid
    GIN_FILES = ["configs/runs/tiny.gin"]
    BINDINGS = {"TRAIN_STEPS": 20, "fit.TrainConfig.progress_bar": False}
    SWEEP = grid({"LEARNING_RATE": [0.001, 0.01]})
    NAMES = {"LEARNING_RATE": "lr"}
"""


def test_dry_run_prints_the_exact_commands(tmp_path, capsys):
    spec = _write_spec(tmp_path, SPEC)
    done = tmp_path / "root" / "lr=0.01"
    done.mkdir(parents=True)
    (done / "DONE").write_text("{}")
    assert sweeps.main([spec, "--root", str(tmp_path / "root"), "--dry_run", "--python=python"]) == 0
    root = tmp_path / "root"
    assert capsys.readouterr().out == (
        "# lr=0.001 (1/2, would run)\n"
        "python -m experiments.train --gin_file=configs/runs/tiny.gin --gin.TRAIN_STEPS=20 "
        "--gin.fit.TrainConfig.progress_bar=False --gin.LEARNING_RATE=0.001 "
        f"--gin.MODEL_DIR=\"'{root}/lr=0.001'\"\n"
        "# lr=0.01 (2/2, done, would skip)\n"
        "python -m experiments.train --gin_file=configs/runs/tiny.gin --gin.TRAIN_STEPS=20 "
        "--gin.fit.TrainConfig.progress_bar=False --gin.LEARNING_RATE=0.01 "
        f"--gin.MODEL_DIR=\"'{root}/lr=0.01'\"\n")


def test_printed_commands_are_the_launched_argv_under_bash():
    sweep = _sweep([{"TOKENIZER": "it's \"quoted\" $HOME", "config.ModelConfig.rope_theta": 5e5}])
    argv = sweeps.train_args(sweep, sweep.points[0], "gs://bucket/sweep one", "python")
    printed = sweeps.format_command(argv)
    parsed = subprocess.run(["bash", "-c", f"printf '%s\\n' {printed}"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert parsed == argv


@pytest.mark.parametrize("binding, message", [
    ({"LEARNIG_RATE": 0.1}, "macro LEARNIG_RATE is neither defined nor used by "
                            "['configs/runs/tiny.gin'], so binding it would change nothing; did "
                            "you mean LEARNING_RATE?"),
    ({"config.ModelConfig.num_kv_head": 1}, "unknown gin binding config.ModelConfig.num_kv_head; "
                                            "did you mean 'num_kv_heads'?"),
    ({"optim.NoSuchConfig.x": 1}, "unknown gin configurable optim.NoSuchConfig"),
    ({"LEARNING_RATE": Gin("3e-4 +")}, "binding `LEARNING_RATE = 3e-4 +` is invalid"),
])
def test_unknown_bindings_are_errors(binding, message):
    with pytest.raises(sweeps.SweepError, match=re.escape(message)):
        sweeps.validate(_sweep([binding]))


def test_a_bad_binding_stops_the_sweep_before_anything_launches(tmp_path, capsys):
    spec = _write_spec(tmp_path, SPEC.replace('"TRAIN_STEPS": 20', '"TRAIN_STEP": 20'))
    assert sweeps.main([spec, "--root", str(tmp_path / "root")]) == 2
    assert capsys.readouterr().err.endswith(
        "error: BINDINGS: macro TRAIN_STEP is neither defined nor used by ['configs/runs/tiny.gin'], "
        "so binding it would change nothing; did you mean TRAIN_STEPS?\n")
    assert not (tmp_path / "root").exists()


def test_macros_a_run_file_uses_but_leaves_to_the_command_line_must_be_bound():
    files = ["configs/models/llama3_2_1b.gin", "configs/runs/pretrain.gin", "configs/meshes/gpu8.gin"]
    required = {"TRAIN_STEPS": 10, "CHECKPOINT_EVERY": 5, "LOG_EVERY": 1, "TOKENIZER": "/t.model",
                "TRAIN_DATA": "c4/en:3.1.0", "fit.DataConfig.tfds_data_dir": "gs://b/tfds"}
    assert sweeps.validate(_sweep([{"SEED": 1}], required, gin_files=files)).points[0].train_steps == 10
    partial = {k: v for k, v in required.items() if k not in ("TOKENIZER", "LOG_EVERY")}
    with pytest.raises(sweeps.SweepError, match=re.escape(
            "macro(s) ['LOG_EVERY', 'TOKENIZER'] are needed but never set by")):
        sweeps.validate(_sweep([{"SEED": 1}], partial, gin_files=files))


def test_validate_reads_train_steps_and_checks_the_point_gin_file(tmp_path):
    sweep = sweeps.validate(_sweep([{"TRAIN_STEPS": 7}, {"gin_file": "configs/models/llama3_8b.gin"}]))
    assert [p.train_steps for p in sweep.points] == [7, 300]
    with pytest.raises(sweeps.SweepError, match="gin file 'nope.gin' not found"):
        sweeps.validate(_sweep([{"gin_file": "nope.gin"}]))
    with pytest.raises(SweepSpecError, match="does not define SWEEP"):
        sweeps.load_sweep(_write_spec(tmp_path, "GIN_FILES = ['x.gin']\n"))


# ---- TPU and Slurm launch text ------------------------------------------------------------------

def test_tpu_launcher_prints_gcloud_ssh_on_all_workers(tmp_path, capsys):
    spec = _write_spec(tmp_path, SPEC)
    assert sweeps.main([spec, "--root", "/mnt/gcs/sw", "--launcher", "tpu", "--tpu_name", "v4-32",
                        "--zone", "us-central2-b", "--project", "proj"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# lr=0.001"
    assert lines[1] == (
        "gcloud compute tpus tpu-vm ssh v4-32 --zone=us-central2-b --project=proj --worker=all "
        "--command=\"cd ~/llamax && python3 -m experiments.train --gin_file=configs/runs/tiny.gin "
        "--gin.TRAIN_STEPS=20 --gin.fit.TrainConfig.progress_bar=False --gin.LEARNING_RATE=0.001 "
        "--gin.MODEL_DIR=\\\"'/mnt/gcs/sw/lr=0.001'\\\" --distributed\"")
    # The local shell hands gcloud one --command; the remote shell turns it back into the argv.
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {lines[1]}"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    remote = words[-1][len("--command="):]
    assert remote.startswith("cd ~/llamax && ")
    sweep = sweeps.load_sweep(spec)
    assert subprocess.run(["bash", "-c", f"printf '%s\\n' {remote[len('cd ~/llamax && '):]}"],
                          capture_output=True, text=True, check=True).stdout.splitlines() == \
        sweeps.train_args(sweep, sweep.points[0], "/mnt/gcs/sw", "python3", ["--distributed"])


def test_tpu_launcher_refuses_url_roots(tmp_path, capsys):
    # Run directories are written with local file APIs: a bucket must be mounted (gcsfuse).
    assert sweeps.main([_write_spec(tmp_path, SPEC), "--root", "gs://bkt/sw", "--launcher", "tpu",
                        "--tpu_name", "v4-32", "--zone", "us-central2-b"]) == 2
    assert "mount the bucket" in capsys.readouterr().err


def test_slurm_launcher_writes_one_sbatch_script_per_unfinished_point(tmp_path):
    root = tmp_path / "root"
    sweep = _sweep(grid({"LEARNING_RATE": [0.001, 0.01]}), names={"LEARNING_RATE": "lr"})
    (root / "lr=0.01").mkdir(parents=True)
    (root / "lr=0.01" / "DONE").write_text("{}")
    scripts = sweeps.write_slurm_scripts(sweep, str(root), str(root / "slurm"), repo_dir="/src/llamax",
                                         nodes=2, gpus_per_node=8, partition="gpu")
    assert [s.name for s in scripts] == ["lr=0.001.sbatch"]
    text = scripts[0].read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", f"#SBATCH --output={root}/lr=0.001/slurm-%j.log",
                 "cd /src/llamax",
                 'export LLAMAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
                 '| head -n 1):12345"',
                 'export LLAMAX_NUM_PROCESSES="$SLURM_NTASKS"',
                 "srun --kill-on-bad-exit=1 bash -c 'LLAMAX_PROCESS_ID=$SLURM_PROCID exec \"$@\"' "
                 "bash \"${CMD[@]}\""]:
        assert line in text.splitlines()
    assert f"--gin.MODEL_DIR=\"'{root}/lr=0.001'\"" in text
    assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0
    assert (root / "lr=0.001").is_dir()  # sbatch --output needs the directory to exist
    assert (root / "slurm" / "submit_all.sh").read_text().endswith(f"sbatch {scripts[0]}\n")


# ---- local launcher: skip, resume, crash (a fake trainer, no JAX) --------------------------------

FAKE_TRAIN = """#!/bin/bash
# Stands in for `python -m experiments.train ...`: behaviour picked by the LEARNING_RATE value.
# Like the real run, it records its outcome in its run directory (llamax.run_dir).
echo "$@" >> {calls}
for arg in "$@"; do case "$arg" in --gin.MODEL_DIR=*) dir="${{arg#--gin.MODEL_DIR=}}"; dir="${{dir//\\'/}}";; esac; done
case "$*" in
  *LEARNING_RATE=0.1*) echo "error: ConfigError: boom" >&2; exit 1 ;;
  *LEARNING_RATE=0.2*) echo "preempted at step 3: loss 1.0, eval_loss None"
                       echo '{{"status": "preempted", "step": 3}}' > "$dir/outcome.json"; exit 0 ;;
  *) echo "completed at step 5: loss 1.0, eval_loss 2.0"
     echo '{{"status": "completed", "step": 5}}' > "$dir/outcome.json"; exit 0 ;;
esac
"""


def test_local_launcher_skips_done_reruns_unfinished_and_records_crashes(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAIN.format(calls=calls))
    fake.chmod(0o755)
    root = str(tmp_path / "root")
    sweep = _sweep(grid({"LEARNING_RATE": [0.001, 0.003, 0.1, 0.2]}), names={"LEARNING_RATE": "lr"})
    finished = Path(root) / "lr=0.001"
    finished.mkdir(parents=True)
    (finished / "DONE").write_text("{}")
    (Path(root) / "lr=0.003").mkdir()  # started earlier, never finished: must run again

    messages = []
    sweeps.run_local(sweep, root, parallel=2, python=str(fake), echo=messages.append)
    ran = calls.read_text().splitlines()
    assert len(ran) == 3 and not any("lr=0.001'" in call for call in ran)
    assert "[sweep] lr=0.001: done, skipping" in messages
    status = {row["point"]: row["status"] for row in sweeps.collect_results(sweep, root)}
    assert status == {"lr=0.001": "completed", "lr=0.003": "completed", "lr=0.1": "failed",
                      "lr=0.2": "preempted"}
    failed = json.loads((Path(root) / "lr=0.1" / "FAILED").read_text())
    assert failed["returncode"] == 1 and "error: ConfigError: boom" in failed["detail"]
    assert "completed at step 5" in (Path(root) / "lr=0.003" / "sweep.log").read_text()

    # Second invocation: completed points are skipped; the failed and preempted ones run again.
    calls.unlink()
    sweeps.run_local(sweep, root, python=str(fake), echo=messages.append)
    assert sorted(re.search(r"lr=0\.\d+", c).group() for c in calls.read_text().splitlines()) == \
        ["lr=0.1", "lr=0.2"]
    assert len((Path(root) / "lr=0.1" / "attempts.jsonl").read_text().splitlines()) == 2


# ---- real tiny runs ------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_sweep_aggregates_results_and_records_a_crash(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device: the fastest tiny run here
    spec = _write_spec(tmp_path, f"""
        from experiments.sweep_spec import chain
        GIN_FILES = ["configs/runs/tiny.gin"]
        BINDINGS = {{"TRAIN_STEPS": 12, "WARMUP_STEPS": 2, "LOG_EVERY": 4, "EVAL_EVERY": 6,
                    "CHECKPOINT_EVERY": 6, "SEQ_LEN": 32, "VOCAB_SIZE": 512,
                    "fit.TrainConfig.eval_batches": 2, "fit.TrainConfig.progress_bar": False,
                    "train.shakespeare_tokenizer.directory": {str(tmp_path / 'tok')!r}}}
        # -1.0 passes gin but OptimConfig rejects it: the run exits 1.
        SWEEP = chain({{"LEARNING_RATE": [0.003, -1.0, 0.01]}})
        NAMES = {{"LEARNING_RATE": "lr"}}
    """)
    root = tmp_path / "root"
    assert sweeps.main([spec, "--root", str(root), "--parallel", "2"]) == 1  # one point failed
    with open(root / "results.csv") as handle:
        rows = {row["point"]: row for row in csv.DictReader(handle)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "lr=0.003": "completed", "lr=-1": "failed", "lr=0.01": "completed"}
    for name in ("lr=0.003", "lr=0.01"):
        row = rows[name]
        assert row["step"] == "12"
        assert 3.0 < float(row["train_loss"]) < 7.0 and 3.0 < float(row["eval_loss"]) < 7.0
        assert float(row["eval_perplexity"]) == pytest.approx(2.718281828 ** float(row["eval_loss"]),
                                                              rel=1e-6)
        assert float(row["tokens_per_s"]) > 0 and float(row["wall_s"]) > 0
        assert (root / name / "DONE").exists()
    assert "learning_rate must be >= 0" in (root / "lr=-1" / "FAILED").read_text()
    markdown = (root / "results.md").read_text()
    assert "| lr=-1 | -1 | failed |" in markdown and "![loss curves](results.png)" in markdown
    assert (root / "results.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    sweeps.main([spec, "--root", str(root)])  # completed points are skipped, the crash retried
    out = capsys.readouterr().out
    assert "lr=0.003: done, skipping" in out and "lr=0.01: done, skipping" in out
    assert len((root / "lr=0.003" / "attempts.jsonl").read_text().splitlines()) == 1
    assert len((root / "lr=-1" / "attempts.jsonl").read_text().splitlines()) == 2


def test_example_spec_validates():
    sweep = sweeps.validate(sweeps.load_sweep(REPO / "configs/sweeps/tiny_lr.py"))
    assert [p.name for p in sweep.points] == ["lr=0.001", "lr=0.003", "lr=0.01"]
    assert {p.train_steps for p in sweep.points} == {100}


# ---- configs/meshes ---------------------------------------------------------------------------

MESH_FILES = sorted((REPO / "configs" / "meshes").glob("*.gin"))


@pytest.mark.parametrize("mesh_file", MESH_FILES, ids=lambda p: p.name)
def test_mesh_file_builds_a_mesh_config_for_its_device_count(mesh_file):
    text = mesh_file.read_text()
    devices = re.search(r"^# devices: (\d+)$", text, re.M)
    assert devices, f"{mesh_file.name} must start with '# devices: N' (the count it is laid out for)"
    assert len([line for line in text.splitlines() if line.startswith("#")]) >= 2, \
        "say when to use it in a comment"
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(mesh_file)], [])
        mesh_config = gin.get_configurable(MeshConfig)()
    finally:
        gin.clear_config()
    ici, dcn = mesh_config.resolve(int(devices.group(1)))
    assert all(i * d for i, d in zip(ici, dcn))
    assert mesh_config.num_slices == dcn[0] * dcn[1] * dcn[2]


def test_mesh_examples_cover_gpu_tpu_and_multislice():
    names = {p.stem for p in MESH_FILES}
    assert {"cpu8", "gpu1", "gpu8", "tpu_v4_32", "tpu_v5p_128"} <= names
    assert any("dcn_data" in p.read_text() for p in MESH_FILES)


def test_sweep_module_runs_as_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.sweep", "configs/sweeps/tiny_lr.py",
                          "--root", str(tmp_path), "--dry_run"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.count("-m experiments.train") == 3


def test_parallel_points_start_together_from_the_first(tmp_path):
    """--parallel 2 on two points runs both at once from the start (the first point used to run
    alone, so a 2-point sweep ran sequentially)."""
    starts = tmp_path / "starts.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/bin/bash
echo start >> {starts}
for arg in "$@"; do case "$arg" in --gin.MODEL_DIR=*) dir="${{arg#--gin.MODEL_DIR=}}"; dir="${{dir//\\'/}}";; esac; done
# Wait until both points have started: a sequential launcher would never get there.
for i in $(seq 100); do [ "$(wc -l < {starts})" -ge 2 ] && break; sleep 0.1; done
[ "$(wc -l < {starts})" -ge 2 ] || exit 3
echo '{{"status": "completed", "step": 1}}' > "$dir/outcome.json"
""")
    fake.chmod(0o755)
    sweep = _sweep(grid({"LEARNING_RATE": [0.001, 0.01]}), names={"LEARNING_RATE": "lr"})
    sweeps.run_local(sweep, str(tmp_path / "root"), parallel=2, python=str(fake), echo=lambda _: None)
    status = {row["point"]: row["status"] for row in sweeps.collect_results(sweep, str(tmp_path / "root"))}
    assert status == {"lr=0.001": "completed", "lr=0.01": "completed"}
