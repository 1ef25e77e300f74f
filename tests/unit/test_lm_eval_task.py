"""The local perplexity task writer (lm-eval itself runs it in tests/integration/test_lm_eval.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from osscar_hf.integrations.lm_eval_task import write_perplexity_task


def test_the_task_and_its_documents_are_written_beside_each_other(tmp_path):
    documents = ['first "quoted" line\nsecond', "ünïcode and 123"]
    tasks = write_perplexity_task(tmp_path / "work", documents, "my_ppl", cache_dir=tmp_path / "cache")
    assert tasks == (tmp_path / "work" / "tasks").resolve()
    task = yaml.safe_load((tasks / "my_ppl.yaml").read_text())
    assert task["task"] == "my_ppl" and task["output_type"] == "loglikelihood_rolling"
    assert task["doc_to_target"] == "{{text}}"
    assert task["dataset_kwargs"]["cache_dir"] == str((tmp_path / "cache").resolve())
    data = task["dataset_kwargs"]["data_files"]["test"]
    assert [json.loads(line)["text"] for line in open(data, encoding="utf-8")] == documents
    assert {m["metric"] for m in task["metric_list"]} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert "cache_dir" not in yaml.safe_load((write_perplexity_task(tmp_path, ["a"]) / "local_ppl.yaml").read_text())[
        "dataset_kwargs"]


@pytest.mark.parametrize("documents, name, match", [
    (["a"], "9lives", "task name '9lives'"),
    (["a"], "my-ppl", "task name 'my-ppl'"),
    ([], "ok", "got 0 documents"),
    (["a", "  "], "ok", r"empty or not a string at \[1\]"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, documents, name, match):
    with pytest.raises(ValueError, match=match):
        write_perplexity_task(tmp_path / "work", documents, name)
    assert not (tmp_path / "work").exists()
