"""The shipped offline tasks (configs/lm_eval) and the results helpers of llamax.infer.lm_eval_tasks."""
import json

import pytest

from experiments.lm_eval_tasks import DATA_DIR, build
from llamax.errors import ConfigError
from llamax.infer.lm_eval_tasks import (DEFAULT_INCLUDE_PATH, DownstreamConfig, flat_metrics, results_table,
                                        task_manager)


def test_task_data_is_what_the_builder_writes(tmp_path):
    written = build(tmp_path)
    assert sorted(written) == sorted(path.name for path in DATA_DIR.glob("*.jsonl"))
    for name, path in written.items():
        assert path.read_bytes() == (DATA_DIR / name).read_bytes(), "run `python -m experiments.lm_eval_tasks`"


def test_shipped_tasks_load_offline_with_their_documents():
    manager = task_manager(["shakespeare"], DEFAULT_INCLUDE_PATH)  # the tag: all three tasks
    assert manager.include_path == [str(DEFAULT_INCLUDE_PATH)]  # lm-eval's own ~15k tasks not indexed
    tasks = manager.load(["shakespeare"])["tasks"]
    assert sorted(tasks) == ["shakespeare_mc", "shakespeare_ppl", "shakespeare_qa"]
    mc = list(tasks["shakespeare_mc"].eval_docs)
    assert len(mc) == 250 and all(len(doc["choices"]) == 4 and 0 <= doc["label"] < 4 for doc in mc)
    assert all(doc["context"].split("\n")[0].endswith(".") for doc in mc)  # "SPEAKER." then two lines
    qa = tasks["shakespeare_qa"]
    assert len(qa.eval_docs) == 200 and len(qa.fewshot_docs()) == 24
    prompt = qa.doc_to_text(qa.eval_docs[0])
    assert prompt.startswith("Question: In ") and prompt.endswith("?\nAnswer:")
    scenes = list(tasks["shakespeare_ppl"].eval_docs)
    assert len(scenes) == 90 and all(doc["text"].startswith("SCENE") for doc in scenes)
    assert {doc["play"] for doc in scenes} == {doc["play"] for doc in mc}  # the 5 held-out plays


def test_unknown_include_path_and_tasks_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder of lm-eval task YAMLs"):
        task_manager(["shakespeare_mc"], tmp_path / "missing")
    with pytest.raises(ConfigError, match="no lm-eval tasks given"):
        task_manager([])
    with pytest.raises(ConfigError, match="EVAL_TASKS_EVERY must be an integer >= 0"):
        DownstreamConfig(tasks=["shakespeare_mc"], every=-1)


RESULTS = {
    "results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.2},
        "shakespeare_mc": {"acc,none": 0.5, "acc_stderr,none": 0.05, "acc_norm,none": 0.75,
                           "acc_norm_stderr,none": "N/A", "sample_len": 4},
    },
    "groups": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.01}},
    "higher_is_better": {"shakespeare_mc": {"acc": True, "acc_norm": True}, "gsm8k": {"exact_match": True}},
}


def test_flat_metrics_name_each_score_once():
    assert flat_metrics(RESULTS) == {
        "lm_eval/gsm8k/exact_match/strict-match": 0.25, "lm_eval/gsm8k/exact_match/flexible-extract": 0.5,
        "lm_eval/shakespeare_mc/acc": 0.5, "lm_eval/shakespeare_mc/acc_norm": 0.75, "lm_eval/mmlu/acc": 0.3}
    json.dumps(flat_metrics(RESULTS))  # plain floats: metrics.jsonl can hold them


def test_results_table_has_a_row_per_score_with_stderr():
    table = results_table(RESULTS, "ckpt")
    assert table.startswith("## ckpt\n")
    assert "| shakespeare_mc | acc ↑ | none | 0.5000 | 0.0500 |" in table
    assert "| shakespeare_mc | acc_norm ↑ | none | 0.7500 |  |" in table  # no stderr: blank
    assert "| gsm8k | exact_match ↑ | flexible-extract | 0.5000 | 0.2000 |" in table
    assert "| mmlu | acc | none | 0.3000 | 0.0100 |" in table
