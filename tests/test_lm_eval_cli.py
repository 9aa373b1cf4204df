"""`python -m experiments.lm_eval` and EVAL_TASKS during training: results beside the run and in
its metrics, nothing appended on failure, in-training scores equal to the offline ones, and two
processes equal one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import portpicker
import pytest

from finetune_fixtures import compilation_cache_dir  # noqa: F401 (autouse: shared jit cache)
from lm_eval_fixtures import lm_eval_hf_dir, make_run_dir  # noqa: F401 (fixtures)
from experiments import lm_eval as cli
from experiments import train
from llamax.run_dir import RunDir
from llamax.train.metrics import read_metrics

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


def tensorboard_tags(run: RunDir) -> bytes:
    """The bytes of the run's event files (tags are stored as plain strings in them)."""
    return b"".join(path.read_bytes() for path in run.tensorboard.glob("*tfevents*"))


def test_cli_scores_a_run_writes_table_and_plot_and_appends_metrics(lm_eval_hf_dir, tmp_path, capsys):
    run = make_run_dir(lm_eval_hf_dir, tmp_path / "run", step=3)
    assert cli.main(["--checkpoint", str(run.path), "--tasks", "shakespeare_mc,shakespeare_ppl",
                     "--limit", "3", "--batch_size", "4", "--max_length", "512"]) == 0
    folder = run.lm_eval_dir(3)
    results = json.loads((folder / "results.json").read_text())
    table = (folder / "results.md").read_text()
    assert "| shakespeare_mc | acc ↑ | none |" in table and "bits_per_byte ↓" in table
    assert (folder / "scores.png").stat().st_size > 10_000
    assert table in capsys.readouterr().out
    (record,) = read_metrics(run.path)
    assert record["step"] == 3
    assert record["lm_eval/shakespeare_mc/acc"] == results["results"]["shakespeare_mc"]["acc,none"]
    assert record["lm_eval/shakespeare_ppl/bits_per_byte"] == \
        results["results"]["shakespeare_ppl"]["bits_per_byte,none"]
    assert b"lm_eval/shakespeare_ppl/word_perplexity" in tensorboard_tags(run)


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "shakespeare_mcq"], "ConfigError: unknown lm-eval task(s) ['shakespeare_mcq']"),
    (["--tasks", "shakespeare_qa", "--max_length", "64", "--max_gen_toks", "16"],
     "DataError: a request's generation context has"),
    (["--tasks", "shakespeare_mc", "--mesh", "3x3x3"], "ConfigError: mesh axes"),
])
def test_cli_errors_print_one_line_and_append_nothing(lm_eval_hf_dir, tmp_path, capsys, arguments, message):
    run = make_run_dir(lm_eval_hf_dir, tmp_path / "run", step=3)
    run.metrics_file.write_text('{"step": 3, "loss": 1.0}\n')
    assert cli.main(["--checkpoint", str(run.path), "--limit", "2", *arguments]) == 1
    # stderr: lm-eval's progress bars (if it got that far), then the error as one last line.
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"llamax-lm-eval: error: {message}")
    assert not any("Traceback" in line or line.startswith("llamax-lm-eval") for line in lines[:-1])
    assert run.metrics_file.read_text() == '{"step": 3, "loss": 1.0}\n'
    assert not (run.path / "lm_eval").exists()


def test_cli_on_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path / "nothing"), "--tasks", "shakespeare_mc"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_eval_tasks_during_training_equal_the_offline_scores(tmp_path):
    run_dir = tmp_path / "run"
    bindings = [f"--gin.MODEL_DIR='{run_dir}'", "--gin.TRAIN_STEPS=2", "--gin.WARMUP_STEPS=1",
                "--gin.CHECKPOINT_EVERY=2", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0", "--gin.SEQ_LEN=64",
                "--gin.VOCAB_SIZE=512", "--gin.fit.TrainConfig.progress_bar=False",
                f"--gin.train.shakespeare_tokenizer.directory='{tmp_path / 'tokenizers'}'",
                "--gin.EVAL_TASKS=['shakespeare_mc', 'shakespeare_ppl']", "--gin.EVAL_TASKS_EVERY=1",
                "--gin.EVAL_TASKS_LIMIT=2"]
    try:
        assert train.main(["--gin_file=configs/runs/tiny.gin", *bindings]) == 0
    finally:
        gin.clear_config()
    scored = {r["step"]: r for r in read_metrics(run_dir) if "lm_eval/shakespeare_mc/acc" in r}
    assert sorted(scored) == [1, 2] and "loss" in scored[2]
    assert b"lm_eval/shakespeare_mc/acc_norm" in tensorboard_tags(RunDir(run_dir))
    assert cli.main(["--checkpoint", str(run_dir), "--tasks", "shakespeare_mc", "shakespeare_ppl",
                     "--limit", "2"]) == 0
    offline = read_metrics(run_dir)[-1]
    assert offline["step"] == 2
    for key, value in offline.items():
        if key.startswith("lm_eval/"):
            assert value == pytest.approx(scored[2][key], rel=1e-6), key


def test_two_processes_equal_one(lm_eval_hf_dir, tmp_path):
    """Each of 2 processes (4 CPU devices each) scores its share of every task on one 8-device
    mesh; the results equal one process with 8 devices. Zero-shot: lm-eval draws few-shot
    examples doc after doc from one seeded stream, so a rank that sees fewer docs prompts them
    with other examples (the hf backend alike)."""
    def command(out: Path, *flags: str) -> list[str]:
        return [sys.executable, "-m", "experiments.lm_eval", "--checkpoint", str(lm_eval_hf_dir),
                "--tasks", "shakespeare_mc,shakespeare_qa,shakespeare_ppl", "--limit", "3", "--max_length",
                "512", "--batch_size", "4", "--num_fewshot", "0", "--output_dir", str(out), "--log_samples",
                *flags]

    def environment(devices: int) -> dict:
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}

    port = portpicker.pick_unused_port()
    processes = [subprocess.Popen(command(tmp_path / "two", f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={i}"),
                                  cwd=REPO_ROOT, env=environment(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in range(2)]
    single = subprocess.run(command(tmp_path / "one"), cwd=REPO_ROOT, env=environment(8), capture_output=True,
                            timeout=600)
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err.decode()[-3000:]

    def samples(folder: Path) -> dict:
        rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        return {(row["task"], row["doc_id"]): (row["arguments"], row["resps"]) for row in rows}

    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 9
    for key, (arguments, responses) in one.items():
        assert arguments == two[key][0], key  # the same prompts
        # One response per request; lm-eval pads a rank's share by repeating its last request, whose
        # Instance then also holds the padding's responses: compare the first.
        for (a, *_), (b, *_) in zip(responses, two[key][1], strict=True):
            if isinstance(a, str):
                assert a == b, key
            elif isinstance(a, list):  # (loglikelihood, is_greedy)
                assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-4) and a[1] == b[1], key
            else:  # a rolling loglikelihood
                assert a == pytest.approx(b, rel=1e-6, abs=1e-4), key
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert results[0]["results"].keys() == results[1]["results"].keys()
