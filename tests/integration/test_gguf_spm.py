"""GGUF export of SentencePiece-style tokenizers (BPE with byte fallback, as Llama 2, Mistral and Gemma) as
llama.cpp's ``llama`` (SPM) tokenizer: the metadata read back with ``gguf.GGUFReader``, a Python copy of llama.cpp's
SPM algorithm run on the written tokens and scores, and what is refused.

llama.cpp itself is not in CI: ``benchmarks/gguf_tokenizer.py`` compares its tokenizer with transformers'.
"""

from __future__ import annotations

import heapq
import json
import logging

import gguf
import pytest

from osscar_hf import GGUFExportError, export_gguf
from tests.conftest import make_model, make_text
from tests.integration.test_gguf_export import fast_tokenizer

PAD = 3  # embedding rows beyond the tokenizer's ids, as models often have
SPACE = "\u2581"
SAMPLES = ["Hello world", "the 2 models, 13 tokens", "x\n\ny\tz", "a  b   c", "naïve café über 日本", "tab\there.",
           "Zebras!? 9876543210", "emoji \U0001f600 end"]


def _trained(text: str, size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The pieces (in the order they were learnt) and merges of a small BPE trained on ``text`` (spaces as '▁')."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=size, show_progress=False))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    return pieces, [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def sentencepiece_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges as transformers generates them from SentencePiece scores (here: minus the id): every split of a piece
    into two pieces, the pieces in score order."""
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        merges += sorted(((piece[:i], piece[i:]) for i in range(1, len(piece))
                          if piece[:i] in vocab and piece[i:] in vocab), key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return merges


def make_spm_tokenizer(style: str = "metaspace", complete: bool = True, size: int = 220):
    """A tiny Llama-2-style tokenizer: <unk> <s> </s>, the 256 byte tokens, then BPE pieces. ``style``: "metaspace"
    (transformers 5's Llama tokenizer), "prepend" (Llama 2's tokenizer.json: Prepend + Replace normalizer),
    "gemma" (Replace only: no prefix). ``complete=False`` keeps the trainer's own merges (not SentencePiece's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>"]
    pieces, merges = _trained(make_text(2000), size)
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    if complete:
        merges = sentencepiece_merges({t: i for t, i in vocab.items() if i >= len(specials) + 256})
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=False)
    elif style == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return fast_tokenizer(tok, "<unk>")


@pytest.fixture(scope="module")
def spm():
    return make_spm_tokenizer()


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def export(tokenizer, tmp_path, name: str = "m.gguf") -> dict:
    model = make_model("llama-gqa", vocab_size=len(tokenizer) + PAD)
    return fields(export_gguf(model, tmp_path / name, "f32", tokenizer=tokenizer))


def llama_cpp_spm(meta: dict, text: str) -> list[int]:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session) on one text without special tokens, in Python: join
    the adjacent pair whose concatenation is a token of the highest score (leftmost on ties), then bytes."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    text = ((" " if meta["tokenizer.ggml.add_space_prefix"] else "") + text).replace(" ", SPACE)
    symbols = list(text)
    alive = list(range(len(symbols)))
    queue: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        joined = symbols[left] + symbols[right]
        if joined in ids:
            heapq.heappush(queue, (-scores[ids[joined]], left, right, joined))

    for i in range(len(symbols) - 1):
        push(i, i + 1)
    while queue:
        _, left, right, joined = heapq.heappop(queue)
        if left not in alive or right not in alive or symbols[left] + symbols[right] != joined \
                or alive.index(right) != alive.index(left) + 1:
            continue
        symbols[left] = joined
        position = alive.index(left)
        alive.remove(right)
        if position > 0:
            push(alive[position - 1], left)
        if position + 1 < len(alive):
            push(left, alive[position + 1])
    out = []
    for i in alive:
        out += [ids[symbols[i]]] if symbols[i] in ids else [ids[f"<0x{b:02X}>"] for b in symbols[i].encode()]
    return out


# --------------------------------------------------------------------------- what is written
def test_sentencepiece_bpe_metadata(spm, tmp_path):
    meta = export(spm, tmp_path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "llama"
    vocab = spm.get_vocab()
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == len(spm) + PAD and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(spm):] == [f"[PAD{i}]" for i in range(len(spm), len(spm) + PAD)]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and tokens[3 + 0x0A] == "<0x0A>"
    assert types[vocab["<tool>"]] == gguf.TokenType.USER_DEFINED and types[-1] == gguf.TokenType.UNUSED
    assert types[vocab[SPACE + "the"]] == gguf.TokenType.NORMAL
    merges = json.loads(spm.backend_tokenizer.to_str())["model"]["merges"]
    first = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    assert scores[vocab[SPACE + "the"]] == -first[SPACE + "the"] and len(first) > 50
    assert max(scores[i] for t, i in vocab.items() if t not in first) < -len(merges)  # below every merge
    assert "tokenizer.ggml.merges" not in meta
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.chat_template"] == spm.chat_template


@pytest.mark.parametrize("style, prefix", [("metaspace", True), ("prepend", True), ("gemma", False)])
def test_llama_cpps_algorithm_on_the_file_gives_transformers_ids(style, prefix, tmp_path):
    tokenizer = make_spm_tokenizer(style)
    meta = export(tokenizer, tmp_path)
    assert meta["tokenizer.ggml.add_space_prefix"] is prefix
    texts = SAMPLES + [make_text(300)[i:i + 60] for i in range(0, 240, 60)]
    if style != "metaspace":  # see the next test
        texts += [" Hello", "  two spaces", " "]
    for text in texts:
        assert llama_cpp_spm(meta, text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert any(meta["tokenizer.ggml.token_type"][i] == gguf.TokenType.BYTE
               for text in SAMPLES for i in tokenizer(text)["input_ids"])  # byte fallback was exercised


@pytest.mark.parametrize("scores", ["reversed", "constant"])
def test_the_reference_sees_scores_that_do_not_follow_the_merges(scores, spm, tmp_path):
    """Control for the test above: llama.cpp's algorithm with the scores reversed, or all -1000 (what llama.cpp's
    converter writes for a tokenizer.json without a tokenizer.model), tokenizes differently."""
    meta = export(spm, tmp_path)
    meta["tokenizer.ggml.scores"] = [-s if scores == "reversed" else -1000.0 for s in meta["tokenizer.ggml.scores"]]
    assert any(llama_cpp_spm(meta, t) != spm(t, add_special_tokens=False)["input_ids"] for t in SAMPLES)


def test_metaspace_leading_space_is_the_one_difference_and_is_logged(spm, tmp_path, caplog):
    """transformers' Metaspace adds no '▁' to a text that begins with a space; llama.cpp always adds one."""
    with caplog.at_level(logging.WARNING, logger="osscar_hf.export.gguf_spm"):
        meta = export(spm, tmp_path)
    assert "begins with a space" in caplog.text
    assert SPACE + SPACE not in spm.get_vocab()
    for text in (" Hello", " the 2 models"):
        hf = spm(text, add_special_tokens=False)["input_ids"]
        assert llama_cpp_spm(meta, text) == [spm.get_vocab()[SPACE]] + hf


# --------------------------------------------------------------------------- what is refused, before any file
def _with(tokenizer, **changes):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for path, value in changes.items():
        node = spec
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _unigram():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram([("<unk>", 0.0), (SPACE + "a", -1.0), ("a", -2.0), (SPACE, -3.0)], 0,
                                   byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("case, match", [
    ("unigram", "Unigram model"),
    ("trainer merges", "not SentencePiece-complete"),
    ("missing byte token", "lacks 1 of the 256 byte tokens"),
    ("nfkc", "text handling .* has no llama.cpp equivalent"),
    ("dropout", "sets {'dropout': 0.1}"),
    ("stripping added token", "added token '<x>' sets lstrip, which llama.cpp does not apply"),
])
def test_what_llama_cpp_cannot_tokenize_alike_is_refused(case, match, spm, tmp_path):
    if case == "unigram":
        tokenizer = _unigram()
    elif case == "trainer merges":
        tokenizer = make_spm_tokenizer(complete=False)
    elif case == "missing byte token":
        spec = json.loads(spm.backend_tokenizer.to_str())
        vocab = spec["model"]["vocab"]
        vocab["<0xFF>x"] = vocab.pop("<0xFF>")
        tokenizer = _with(spm, model__vocab=vocab)
    elif case == "nfkc":
        tokenizer = _with(spm, normalizer={"type": "NFKC"})
    elif case == "dropout":
        tokenizer = _with(spm, model__dropout=0.1)
    else:
        from tokenizers import AddedToken

        tokenizer = make_spm_tokenizer()
        tokenizer.add_tokens([AddedToken("<x>", lstrip=True)])
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(make_model("llama-gqa", vocab_size=len(tokenizer) + PAD), tmp_path / "m.gguf", "f32",
                    tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_a_split_metaspace_is_accepted_only_without_inner_spaces():
    """Metaspace with split=True equals llama.cpp when no token holds '▁' after its start (nothing can join
    across words)."""
    from osscar_hf.export.gguf_spm import check_spm

    spec = {"model": {"type": "BPE", "byte_fallback": True}, "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": True}}
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {SPACE + "a": 256, "ab": 257}
    assert check_spm(spec, vocab).split is True
    with pytest.raises(GGUFExportError, match="splits words at '▁' but 1 tokens hold '▁' inside"):
        check_spm(spec, vocab | {"a" + SPACE + "b": 258})
