"""Tests of osscar_hf.calibration: every input kind, windowing, determinism and every error (offline)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from osscar_hf import calibration
from osscar_hf.calibration import HUB_DATASETS, build_calibration_windows, load_calibration_tokens
from osscar_hf.errors import CalibrationDataError, OsscarError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
VOCAB = 1000


def make_word_tokenizer(vocab_size: int = VOCAB):
    """A tiny real fast tokenizer built in-process: word ``w{i}`` has id ``i``, anything else is [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["[UNK]"] = vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer()


# Texts whose token stream is 0, 1, ..., 299 (ids are distinct, so a window's position is its first id).
TEXTS = [words(0, 100), words(100, 220), words(220, 300)]
STREAM = torch.arange(300)


def assert_contiguous_windows(windows: torch.Tensor, stream: torch.Tensor, num_samples: int, seq_len: int):
    assert windows.shape == (num_samples, seq_len)
    assert windows.dtype == torch.long
    for row in windows:
        start = int((stream == row[0]).nonzero()[0])
        assert start + seq_len <= stream.numel()
        assert torch.equal(row, stream[start : start + seq_len])


# --------------------------------------------------------------------------- input kinds
def test_list_of_texts(tokenizer):
    w = build_calibration_windows(TEXTS, tokenizer, num_samples=16, seq_len=32, seed=0)
    assert_contiguous_windows(w, STREAM, 16, 32)


def test_load_tokens_joins_texts_and_adds_no_special_tokens(tokenizer):
    stream = load_calibration_tokens(TEXTS, tokenizer)
    assert torch.equal(stream, STREAM)
    assert stream.dtype == torch.long


def test_txt_file(tokenizer, tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(TEXTS), encoding="utf-8")
    w = build_calibration_windows(p, tokenizer, num_samples=8, seq_len=50, seed=1)
    assert_contiguous_windows(w, STREAM, 8, 50)
    w_str = build_calibration_windows(str(p), tokenizer, num_samples=8, seq_len=50, seed=1)
    assert torch.equal(w, w_str)


def test_jsonl_file(tokenizer, tmp_path):
    p = tmp_path / "calib.jsonl"
    lines = [json.dumps({"content": t, "id": i}) for i, t in enumerate(TEXTS)]
    p.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a trailing blank line is skipped
    w = build_calibration_windows(p, tokenizer, num_samples=8, seq_len=40, seed=2, text_column="content")
    assert_contiguous_windows(w, STREAM, 8, 40)


def test_parquet_file(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "calib.parquet"
    pq.write_table(pa.table({"text": TEXTS, "n": [1, 2, 3]}), p)
    w = build_calibration_windows(p, tokenizer, num_samples=8, seq_len=40, seed=3)
    assert_contiguous_windows(w, STREAM, 8, 40)


def test_hf_dataset(tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"body": TEXTS})
    w = build_calibration_windows(ds, tokenizer, num_samples=8, seq_len=40, seed=4, text_column="body")
    assert_contiguous_windows(w, STREAM, 8, 40)


def test_pretokenized_tensor_rows_are_windows():
    ids = torch.arange(40).reshape(4, 10)
    w = build_calibration_windows(ids, None, num_samples=4, seq_len=6, seed=0)
    assert w.dtype == torch.long
    assert torch.equal(w, ids[:, :6])


def test_pretokenized_int32_tensor_becomes_long():
    ids = torch.arange(12, dtype=torch.int32).reshape(2, 6)
    w = build_calibration_windows(ids, None, num_samples=2, seq_len=6, seed=0)
    assert w.dtype == torch.long and torch.equal(w, ids.long())


def test_pretokenized_list_ragged_rows_cut():
    rows = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    w = build_calibration_windows(rows, None, num_samples=3, seq_len=3, seed=0)
    assert torch.equal(w, torch.tensor([[1, 2, 3], [6, 7, 8], [9, 10, 11]]))


def test_pretokenized_load_tokens_returns_rows():
    rows = load_calibration_tokens([[1, 2, 3], [4, 5]], None)
    assert isinstance(rows, list) and len(rows) == 2
    assert torch.equal(rows[0], torch.tensor([1, 2, 3])) and torch.equal(rows[1], torch.tensor([4, 5]))


def test_pretokenized_more_rows_sampled_with_seed():
    ids = torch.arange(100).reshape(20, 5)
    a = build_calibration_windows(ids, None, num_samples=6, seq_len=5, seed=0)
    b = build_calibration_windows(ids, None, num_samples=6, seq_len=5, seed=0)
    c = build_calibration_windows(ids, None, num_samples=6, seq_len=5, seed=1)
    assert a.shape == (6, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    first = (a[:, 0] // 5).tolist()
    assert len(set(first)) == 6  # distinct rows, no replacement
    assert first == sorted(first)  # original order kept
    for row in a:
        assert torch.equal(row, ids[int(row[0]) // 5])


def test_pretokenized_fewer_rows_uses_all_with_warning(caplog):
    ids = torch.arange(15).reshape(3, 5)
    with caplog.at_level(logging.WARNING, logger="osscar_hf.calibration"):
        w = build_calibration_windows(ids, None, num_samples=8, seq_len=5, seed=0)
    assert torch.equal(w, ids)
    assert "only 3 pre-tokenized rows" in caplog.text and "num_samples=8" in caplog.text


# --------------------------------------------------------------------------- windows
def test_seed_determinism(tokenizer):
    a = build_calibration_windows(TEXTS, tokenizer, num_samples=10, seq_len=20, seed=7)
    b = build_calibration_windows(TEXTS, tokenizer, num_samples=10, seq_len=20, seed=7)
    c = build_calibration_windows(TEXTS, tokenizer, num_samples=10, seq_len=20, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_starts_cover_whole_range(tokenizer):
    # seq_len = n_tokens - 1 leaves exactly two starts: 0 and 1; both must be drawn.
    w = build_calibration_windows(TEXTS, tokenizer, num_samples=64, seq_len=299, seed=0)
    assert set(w[:, 0].tolist()) == {0, 1}


def test_window_equal_to_stream(tokenizer):
    w = build_calibration_windows(TEXTS, tokenizer, num_samples=3, seq_len=300, seed=0)
    assert all(torch.equal(row, STREAM) for row in w)


# --------------------------------------------------------------------------- errors
def test_error_hierarchy():
    assert issubclass(CalibrationDataError, OsscarError) and issubclass(CalibrationDataError, ValueError)


def test_missing_path(tokenizer, tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(CalibrationDataError, match="does not exist") as info:
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=4, seed=0)
    assert "nope.txt" in str(info.value)


def test_missing_path_given_as_str(tokenizer, tmp_path):
    p = str(tmp_path / "missing.jsonl")
    with pytest.raises(CalibrationDataError, match="does not exist") as info:
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=4, seed=0)
    assert "missing.jsonl" in str(info.value)


def test_unsupported_extension(tokenizer, tmp_path):
    p = tmp_path / "calib.csv"
    p.write_text("text\nw1 w2\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="unsupported extension") as info:
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=1, seed=0)
    msg = str(info.value)
    assert "'.csv'" in msg and ".txt" in msg and ".jsonl" in msg and ".parquet" in msg


def test_directory_path(tokenizer, tmp_path):
    with pytest.raises(CalibrationDataError, match="is a directory"):
        build_calibration_windows(tmp_path, tokenizer, num_samples=1, seq_len=1, seed=0)


def test_empty_strings(tokenizer):
    with pytest.raises(CalibrationDataError, match="no text") as info:
        build_calibration_windows(["", "  ", "\n"], tokenizer, num_samples=1, seq_len=1, seed=0)
    assert "3 empty" in str(info.value)


def test_empty_list(tokenizer):
    with pytest.raises(CalibrationDataError, match="empty list"):
        build_calibration_windows([], tokenizer, num_samples=1, seq_len=1, seed=0)


def test_empty_txt_file(tokenizer, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="no text") as info:
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=1, seed=0)
    assert "empty.txt" in str(info.value)


def test_too_few_tokens(tokenizer):
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_windows([words(0, 10)], tokenizer, num_samples=1, seq_len=11, seed=0)
    msg = str(info.value)
    assert "has 10 tokens" in msg and "seq_len=11" in msg and "smaller seq_len" in msg and "more text" in msg


def test_text_without_tokenizer():
    with pytest.raises(CalibrationDataError, match="tokenizer is None"):
        build_calibration_windows(TEXTS, None, num_samples=1, seq_len=4, seed=0)


def test_unknown_name(tokenizer):
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_windows("pile", tokenizer, num_samples=1, seq_len=4, seed=0)
    msg = str(info.value)
    assert "'pile'" in msg and "'c4'" in msg and "'wikitext2'" in msg and "'ptb'" in msg


def test_unsupported_type(tokenizer):
    with pytest.raises(CalibrationDataError, match="unsupported calibration dataset of type int"):
        build_calibration_windows(42, tokenizer, num_samples=1, seq_len=4, seed=0)


def test_mixed_list(tokenizer):
    with pytest.raises(CalibrationDataError, match="only str"):
        build_calibration_windows(["w1 w2", 3], tokenizer, num_samples=1, seq_len=1, seed=0)


def test_dataset_missing_column(tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"body": TEXTS, "id": [0, 1, 2]})
    with pytest.raises(CalibrationDataError, match="no column text_column='text'") as info:
        build_calibration_windows(ds, tokenizer, num_samples=1, seq_len=4, seed=0)
    assert "['body', 'id']" in str(info.value)


def test_dataset_dict_asks_for_split(tokenizer):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})})
    with pytest.raises(CalibrationDataError, match=r"pass one split.*\['train'\]"):
        build_calibration_windows(dd, tokenizer, num_samples=1, seq_len=4, seed=0)


def test_parquet_missing_column(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "calib.parquet"
    pq.write_table(pa.table({"body": TEXTS}), p)
    with pytest.raises(CalibrationDataError, match=r"no column text_column='text'.*\['body'\]"):
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=4, seed=0)


def test_jsonl_missing_field(tokenizer, tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text(json.dumps({"text": "w1"}) + "\n" + json.dumps({"body": "w2"}) + "\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"calib.jsonl:2 has no field text_column='text'"):
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=1, seed=0)


def test_jsonl_bad_json(tokenizer, tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text('{"text": "w1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"calib.jsonl:2 is not valid JSON"):
        build_calibration_windows(p, tokenizer, num_samples=1, seq_len=1, seed=0)


def test_pretokenized_short_row():
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_windows([[1, 2, 3], [4, 5]], None, num_samples=2, seq_len=3, seed=0)
    msg = str(info.value)
    assert "row 1 has 2 tokens" in msg and "seq_len=3" in msg


def test_pretokenized_float_tensor():
    with pytest.raises(CalibrationDataError, match="2-D integer tensor"):
        build_calibration_windows(torch.zeros(2, 4), None, num_samples=2, seq_len=4, seed=0)


def test_pretokenized_1d_tensor():
    with pytest.raises(CalibrationDataError, match=r"shape \(8,\)"):
        build_calibration_windows(torch.arange(8), None, num_samples=1, seq_len=4, seed=0)


def test_pretokenized_non_int_ids():
    with pytest.raises(CalibrationDataError, match="row 0 must hold only ints, found 1.5"):
        build_calibration_windows([[1, 1.5]], None, num_samples=1, seq_len=2, seed=0)


def test_pretokenized_negative_ids():
    with pytest.raises(CalibrationDataError, match="must be >= 0, row 0 has -1"):
        build_calibration_windows([[1, -1]], None, num_samples=1, seq_len=2, seed=0)


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("num_samples", 0, "num_samples must be an int >= 1, got 0"),
        ("num_samples", True, "num_samples must be an int >= 1, got True"),
        ("seq_len", 2.0, "seq_len must be an int >= 1, got 2.0"),
        ("seed", -1, "seed must be an int >= 0, got -1"),
    ],
)
def test_bad_window_arguments(tokenizer, name, value, needle):
    kwargs = {"num_samples": 1, "seq_len": 4, "seed": 0, name: value}
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_windows(TEXTS, tokenizer, **kwargs)
    assert needle in str(info.value)


# --------------------------------------------------------------------------- the Hub
@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_name_offline_fails_fast(tokenizer, monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    t0 = time.perf_counter()
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_windows("wikitext2", tokenizer, num_samples=1, seq_len=4, seed=0)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "Hub" in msg and "cannot be reached" in msg and f"{var} is set" in msg
    assert "list of strings" in msg and ".txt" in msg and ".jsonl" in msg and ".parquet" in msg


def test_hub_unreachable_endpoint_fails_fast(tokenizer, monkeypatch):
    # Port 1 on loopback refuses at once: the probe, not datasets' retries, must report it.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    t0 = time.perf_counter()
    with pytest.raises(CalibrationDataError, match=r"cannot be reached \(cannot connect to 127.0.0.1:1"):
        build_calibration_windows("c4", tokenizer, num_samples=1, seq_len=4, seed=0)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "column"),
    [
        ("c4", ("allenai/c4",), {"split": "train", "data_files": "en/c4-train.00000-of-01024.json.gz"}, "text"),
        ("wikitext2", ("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "train"}, "text"),
        ("ptb", ("ptb-text-only/ptb_text_only", "penn_treebank"),
         {"split": "train", "revision": "refs/convert/parquet"}, "sentence"),
    ],
)
def test_hub_names_resolve_through_load_dataset(tokenizer, monkeypatch, name, args, kwargs, column):
    import datasets

    calls = []

    def fake_load_dataset(*a, **kw):
        calls.append((a, kw))
        return datasets.Dataset.from_dict({column: TEXTS})

    monkeypatch.setattr(calibration, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    w = build_calibration_windows(name, tokenizer, num_samples=4, seq_len=30, seed=0)
    assert calls == [(args, kwargs)]
    assert_contiguous_windows(w, STREAM, 4, 30)
    assert HUB_DATASETS[name].column == column


def test_hub_load_failure_is_wrapped(tokenizer, monkeypatch):
    import datasets

    def failing(*a, **kw):
        raise ConnectionError("boom")

    monkeypatch.setattr(calibration, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(CalibrationDataError, match=r"could not load calibration dataset 'ptb'.*boom.*list of strings"):
        build_calibration_windows("ptb", tokenizer, num_samples=1, seq_len=4, seed=0)


# --------------------------------------------------------------------------- real data
@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_state_union_with_smollm2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(SHARED_DATA / "smollm2-135m" / "tokenizer.json"))
    path = SHARED_DATA / "calibration" / "state_union.txt"
    w = build_calibration_windows(path, tok, num_samples=4, seq_len=512, seed=0)
    assert w.shape == (4, 512) and w.dtype == torch.long
    assert int(w.min()) >= 0 and int(w.max()) < len(tok)
    text = tok.decode(w[0])
    assert len(text) > 1000  # real English text, about 4 characters per token
    assert not torch.equal(w[0], w[1])


def test_check_dataset_source_refuses_what_cannot_be_read_without_reading(tmp_path, monkeypatch):
    from osscar_hf.calibration import check_dataset_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unread = tmp_path / "broken.jsonl"
    unread.write_text("{not json\n")  # a supported file is accepted without being parsed
    check_dataset_source(unread)
    check_dataset_source(str(unread))
    check_dataset_source(["a list is checked when it is read"])
    (tmp_path / "notes.md").write_text("text")
    cases = {
        str(tmp_path / "missing.txt"): "does not exist",
        str(tmp_path): "is a directory",
        str(tmp_path / "notes.md"): "unsupported extension '.md'",
        "wikitext2": "needs the Hugging Face Hub, which cannot be reached .HF_HUB_OFFLINE is set",
        "wikitext": "neither an existing file nor a known dataset name; known names: 'c4', 'wikitext2', 'ptb'",
    }
    for dataset, message in cases.items():
        with pytest.raises(CalibrationDataError, match=message):
            check_dataset_source(dataset)
