"""A local perplexity task for lm-evaluation-harness: documents in a JSON-lines file and the task's YAML beside them.

lm-eval scores a ``loglikelihood_rolling`` task document by document (every token given the ones before it, in
windows of the model's length) and reports word and byte perplexity and bits per byte. Such a task needs no
network: its data is a local file. :func:`write_perplexity_task` writes one; pass the folder it returns to
``lm_eval.tasks.TaskManager(include_path=...)`` (or ``--include_path`` on lm-eval's command line). Imports nothing
of lm-eval.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["write_perplexity_task"]

_TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
{cache}test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def write_perplexity_task(folder: str | os.PathLike, documents: Iterable[str], name: str = "local_ppl", *,
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Write ``documents`` (one lm-eval document each) to ``folder/name.jsonl`` and the task ``name`` that scores
    them to ``folder/tasks/name.yaml``; return the ``tasks`` folder (lm-eval's ``include_path``).

    ``cache_dir``: where the ``datasets`` library caches the parsed file (its default cache otherwise). Raises
    ``ValueError`` for a name lm-eval cannot take as a task name or for no documents (or an empty one)."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r} must be letters, digits and underscores, not starting with a digit")
    documents = list(documents)
    empty = [i for i, doc in enumerate(documents) if not isinstance(doc, str) or not doc.strip()]
    if not documents or empty:
        raise ValueError(f"documents must be a non-empty list of non-empty strings; got {len(documents)} documents"
                         + (f", empty or not a string at {empty[:10]}" if empty else ""))
    folder = Path(folder).resolve()
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents), encoding="utf-8")
    cache = f"  cache_dir: {json.dumps(str(Path(cache_dir).resolve()))}\n" if cache_dir is not None else ""
    yaml = _TASK_YAML.format(name=name, data=json.dumps(str(data)), cache=cache)
    (tasks / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return tasks
