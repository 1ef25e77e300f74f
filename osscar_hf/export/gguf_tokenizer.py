"""A Hugging Face tokenizer as GGUF tokenizer metadata (``tokenizer.ggml.*``).

llama.cpp re-implements tokenization, with one of its tokenizer models (``tokenizer.ggml.model``):

* ``gpt2`` (byte-level BPE: GPT-2, SmolLM2, Llama 3, Qwen2) reads the token strings, the merges and the token types,
  and splits text before BPE with the regular expressions of a pre-tokenizer it knows by name
  (``tokenizer.ggml.pre``). The name is chosen here from the structure of the tokenizer's own ``pre_tokenizer``
  (``tokenizer.json``): the splits that llama.cpp's named pre-tokenizers perform, checked by the regular
  expressions the original tokenizers use.
* ``llama`` (SentencePiece BPE with byte fallback: Llama 2, Mistral, Gemma) reads token strings, scores and types
  (:mod:`.gguf_spm`).

A tokenizer that llama.cpp would tokenize differently (a WordPiece or Unigram model, a normalizer other than NFC or
SentencePiece's space handling, an unknown regular expression, merges llama.cpp cannot order) raises
``GGUFExportError`` rather than producing such a file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import GGUFExportError
from .gguf_spm import check_spm, is_sentencepiece_style, spm_scores, spm_token_types

logger = logging.getLogger(__name__)

__all__ = ["PRE_TOKENIZERS", "TokenizerMetadata", "check_tokenizer", "pre_tokenizer_name", "tokenizer_metadata"]

# The splitting regular expressions of well-known byte-level BPE tokenizers, as their tokenizer.json files hold them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

#: The pre-tokenizer pipelines recognised, as normalised step tuples -> llama.cpp's name for them.
PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
_ACCEPTED_NORMALIZERS = (None, "NFC")
# gguf.TokenType values (llama.cpp's LLAMA_TOKEN_TYPE_*).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class TokenizerMetadata:
    """What the GGUF file records about the tokenizer: ``model`` ``"gpt2"`` has merges, ``"llama"`` scores."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    model: str = "gpt2"
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def _step(node: dict[str, Any]) -> tuple[Any, ...]:
    kind = node.get("type")
    if kind == "ByteLevel":
        if node.get("add_prefix_space"):
            raise GGUFExportError("the tokenizer's ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's "
                                  "byte-level BPE does not do")
        return ("ByteLevel", bool(node.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(node.get("individual_digits")))
    if kind == "Split":
        pattern = node.get("pattern", {})
        if node.get("invert") or node.get("behavior") != "Isolated" or "Regex" not in pattern:
            raise GGUFExportError(f"unsupported Split pre-tokenizer {json.dumps(node)}")
        return ("Split", pattern["Regex"])
    return (kind,)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the ``pre_tokenizer`` of a ``tokenizer.json``; ``GGUFExportError`` if none matches."""
    node = spec.get("pre_tokenizer") or {}
    nodes = node.get("pretokenizers", []) if node.get("type") == "Sequence" else [node]
    steps = tuple(_step(n) for n in nodes)
    if steps in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[steps]
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer {json.dumps(node)[:300]} matches none that llama.cpp implements here "
        f"({', '.join(PRE_TOKENIZERS.values())}): the GGUF file would tokenize text differently"
    )


def _check_model(spec: dict[str, Any]) -> None:
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        options = {k: model.get(k) for k in ("continuing_subword_prefix", "end_of_word_suffix") if model.get(k)}
        raise GGUFExportError(f"the tokenizer's {model.get('type')!r} model{f' with {options}' if options else ''} "
                              "cannot be exported: accepted are byte-level BPE and SentencePiece-style BPE with byte "
                              "fallback")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in _ACCEPTED_NORMALIZERS:
        raise GGUFExportError(f"the tokenizer's normalizer {normalizer!r} has no llama.cpp equivalent (accepted: "
                              "none, NFC)")


def _added_special_ids(tokenizer: Any, plain: list[int], full: list[int]) -> tuple[bool, bool]:
    """Whether encoding adds exactly the BOS token in front and/or the EOS token at the end."""
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None:
        raise GGUFExportError("the tokenizer's special-token template changes the text's own tokens")
    prefix, suffix = full[:start], full[start + len(plain):]
    if prefix not in ([], [tokenizer.bos_token_id]) or suffix not in ([], [tokenizer.eos_token_id]):
        raise GGUFExportError(f"the tokenizer adds {prefix} before and {suffix} after the text: llama.cpp can only "
                              "add the BOS token before and the EOS token after")
    return bool(prefix), bool(suffix)


def _spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"{type(tokenizer).__name__} is not a fast tokenizer (no tokenizers backend): "
                              "only tokenizers with a tokenizer.json can be exported")
    return json.loads(backend.to_str())


def _tokens_by_id(tokenizer: Any, vocab_size: int) -> tuple[list[str], set[int]]:
    """The token strings by id up to ``vocab_size`` (ids the tokenizer lacks as ``[PAD<id>]``) and the used ids."""
    by_id = {i: token for token, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    return [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)], set(by_id)


def check_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's tokenizer model for ``tokenizer`` (``"gpt2"`` or ``"llama"``); ``GGUFExportError`` if it cannot
    be exported."""
    spec = _spec(tokenizer)
    if is_sentencepiece_style(spec):
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        check_spm(spec, vocab)
        spm_scores(spec, list(vocab))  # checks the merges
        return "llama"
    _check_model(spec)
    pre_tokenizer_name(spec)
    return "gpt2"


def _special_metadata(tokenizer: Any) -> dict[str, Any]:
    """Special ids, whether encoding adds BOS/EOS (found by encoding a probe text) and the chat template."""
    probe = "Hello world"
    add_bos, add_eos = _added_special_ids(tokenizer, tokenizer(probe, add_special_tokens=False)["input_ids"],
                                          tokenizer(probe)["input_ids"])
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return {"special_ids": {k: int(v) for k, v in ids.items() if v is not None}, "add_bos": add_bos,
            "add_eos": add_eos, "chat_template": template if isinstance(template, str) else None}


def tokenizer_metadata(tokenizer: Any, vocab_size: int, warn: bool = True) -> TokenizerMetadata:
    """The GGUF tokenizer metadata of a fast (``tokenizers``-backed) ``tokenizer`` for a model with ``vocab_size``
    embedding rows: ids the tokenizer does not use become ``[PAD<id>]`` tokens of type unused. ``warn=False``
    leaves out the warnings :func:`check_tokenizer` gives."""
    spec = _spec(tokenizer)
    tokens, used = _tokens_by_id(tokenizer, vocab_size)
    added = {i: bool(token.special) for i, token in tokenizer.added_tokens_decoder.items()}
    if is_sentencepiece_style(spec):
        space = check_spm(spec, tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True), warn)
        return TokenizerMetadata(pre="default", tokens=tokens, merges=[], model="llama",
                                 token_types=spm_token_types(tokens, used, added, tokenizer.unk_token_id),
                                 scores=spm_scores(spec, tokens, warn), add_space_prefix=space.add_space_prefix,
                                 **_special_metadata(tokenizer))
    _check_model(spec)
    pre = pre_tokenizer_name(spec)
    types = [NORMAL if i in used else UNUSED for i in range(vocab_size)]
    for i, special in added.items():
        types[i] = CONTROL if special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return TokenizerMetadata(pre=pre, tokens=tokens, token_types=types, merges=merges, **_special_metadata(tokenizer))
