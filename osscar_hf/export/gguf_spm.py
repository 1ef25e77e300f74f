"""SentencePiece-style tokenizers as llama.cpp's ``llama`` (SPM) tokenizer: tokens, scores and token types.

Llama 2, Mistral and Gemma ship a SentencePiece BPE model, which ``tokenizer.json`` holds as a ``BPE`` model with
``byte_fallback`` (characters outside the vocabulary become ``<0xNN>`` byte tokens), spaces written as ``"▁"`` by a
normalizer or a ``Metaspace`` pre-tokenizer, and merges generated from the SentencePiece piece scores.

llama.cpp's SPM tokenizer (``llm_tokenizer_spm_session`` in ``src/llama-vocab.cpp``) does not read merges: it
prefixes a space (``tokenizer.ggml.add_space_prefix``), writes spaces as ``"▁"``, starts from the text's characters
and repeatedly joins the adjacent pair whose concatenation is a token of the highest *score* (the leftmost on
ties); characters left without a token become byte tokens. The Hugging Face BPE joins the adjacent pair of the
lowest merge rank instead. The two agree when

* every split of a token into two strings that can be symbols (tokens or single characters) is a merge: llama.cpp
  joins any pair whose concatenation is a token, the BPE only listed merges (checked, else ``GGUFExportError``);
* the merges that make one token are consecutive in the merge list, so that one score per token (minus the rank of
  its first merge) orders pairs as the ranks do (checked; a warning names the tokens where they are not).

Merges generated from SentencePiece scores, as transformers' converters write them, have both properties. A
Unigram model (SentencePiece unigram) segments by a best-path search that llama.cpp's ``llama`` tokenizer does not
perform, and is refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..errors import GGUFExportError

logger = logging.getLogger(__name__)

__all__ = ["SpmSpace", "check_spm", "is_sentencepiece_style", "spm_scores", "spm_space", "spm_token_types"]

SPACE = "\u2581"  # "▁", SentencePiece's space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
# gguf.TokenType values (llama.cpp's LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_ACCEPTED = ("a normalizer that replaces ' ' by '▁' (optionally prepending '▁') with no pre-tokenizer, or a "
             "Metaspace pre-tokenizer with replacement '▁' and no normalizer")


@dataclass(frozen=True)
class SpmSpace:
    """How the tokenizer turns spaces into ``"▁"``, as llama.cpp's SPM tokenizer can repeat it."""

    add_space_prefix: bool
    split: bool = False  # a Metaspace pre-tokenizer that splits words at "▁"
    skips_prefix_before_space: bool = False  # Metaspace adds no prefix to a text that begins with a space
    first_only: bool = False  # Metaspace prepend_scheme "first": no prefix after an added token either


def is_sentencepiece_style(spec: dict[str, Any]) -> bool:
    """Whether a ``tokenizer.json`` holds a SentencePiece-style model (BPE with byte fallback, or Unigram)."""
    model = spec.get("model", {})
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def _check_model(model: dict[str, Any]) -> None:
    if model.get("type") == "Unigram":
        raise GGUFExportError(
            "the tokenizer is a Unigram model (SentencePiece unigram): llama.cpp's 'llama' tokenizer joins pieces "
            "pair by pair by score and does not reproduce unigram's best segmentation; accepted: byte-level BPE, "
            "or BPE with byte fallback (SentencePiece BPE: Llama 2, Mistral, Gemma)")
    bad = {key: model.get(key) for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                           "ignore_merges") if model.get(key)}
    if bad:
        raise GGUFExportError(f"the tokenizer's BPE model sets {bad}, which llama.cpp's 'llama' tokenizer does not "
                              "apply (accepted: none of dropout, continuing_subword_prefix, end_of_word_suffix, "
                              "ignore_merges)")


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key, []) for step in _steps(child, key)]
    return [node]


def _is_space_replace(step: dict[str, Any]) -> bool:
    return (step.get("type") == "Replace" and step.get("pattern") == {"String": " "}
            and step.get("content") == SPACE)


def _is_noop_space_split(step: dict[str, Any]) -> bool:
    """A Split on ' ' after spaces became '▁' (Gemma's tokenizer.json): it finds nothing to split."""
    return step.get("type") == "Split" and step.get("pattern") == {"String": " "} and not step.get("invert")


def _describe(spec: dict[str, Any]) -> str:
    return (f"normalizer {json.dumps(spec.get('normalizer'))[:200]}, "
            f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]}")


def spm_space(spec: dict[str, Any]) -> SpmSpace:
    """How a SentencePiece-style ``tokenizer.json`` writes spaces; ``GGUFExportError`` for other text handling."""
    normalizers = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    kinds = sorted("replace" if _is_space_replace(s) else "prepend" if s.get("type") == "Prepend"
                   and s.get("prepend") == SPACE else json.dumps(s)[:80] for s in normalizers)
    if kinds in (["replace"], ["prepend", "replace"]):
        if all(_is_noop_space_split(s) for s in pre):
            return SpmSpace(add_space_prefix=kinds == ["prepend", "replace"])
    elif not normalizers and len(pre) == 1 and pre[0].get("type") == "Metaspace" \
            and pre[0].get("replacement") == SPACE:
        scheme = pre[0].get("prepend_scheme", "always" if pre[0].get("add_prefix_space", True) else "never")
        if scheme in ("always", "first", "never"):
            return SpmSpace(add_space_prefix=scheme != "never", split=bool(pre[0].get("split", True)),
                            skips_prefix_before_space=scheme != "never", first_only=scheme == "first")
    raise GGUFExportError(f"the tokenizer's text handling ({_describe(spec)}) has no llama.cpp equivalent: "
                          f"accepted for a SentencePiece-style tokenizer: {_ACCEPTED}")


def _check_byte_tokens(vocab: dict[str, int]) -> None:
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise GGUFExportError(f"the tokenizer uses byte fallback but lacks {len(missing)} of the 256 byte tokens "
                              f"(first: {missing[:4]}): llama.cpp needs them all")


def _check_added_tokens(spec: dict[str, Any]) -> None:
    """Non-special added tokens are matched in the raw text by both; options llama.cpp does not apply are refused."""
    for added in spec.get("added_tokens", []):
        if added.get("special"):
            continue
        options = [k for k in ("lstrip", "rstrip", "single_word") if added.get(k)]
        if added.get("normalized") and (" " in added["content"] or SPACE in added["content"]):
            options.append("normalized (with a space)")
        if options:
            raise GGUFExportError(f"the tokenizer's added token {added['content']!r} sets {', '.join(options)}, "
                                  "which llama.cpp does not apply to user-defined tokens")


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _unlisted_joins(texts: set[str], merges: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(token, left, right) for every split of a token into two possible symbols that is not a merge."""
    found = []
    for token in texts:
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if (left in texts or len(left) == 1) and (right in texts or len(right) == 1) \
                    and (left, right) not in merges:
                found.append((token, left, right))
    return found


def _scattered_tokens(pairs: list[tuple[str, str]]) -> list[str]:
    """Tokens whose merges are not consecutive in the merge list (one score per token cannot order them)."""
    last: dict[str, int] = {}
    scattered = []
    for rank, (left, right) in enumerate(pairs):
        token = left + right
        if token in last and last[token] != rank - 1 and token not in scattered:
            scattered.append(token)
        last[token] = rank
    return scattered


def spm_scores(spec: dict[str, Any], texts: list[str], warn: bool = True) -> list[float]:
    """llama.cpp scores for the tokens ``texts`` (by id): minus the rank of the first merge that makes each token;
    tokens no merge makes score below every merge. ``GGUFExportError`` if llama.cpp would join other pairs; a
    warning (unless ``warn`` is False) if it may join in another order."""
    model = spec.get("model", {})
    pairs = _merge_pairs(model)
    unlisted = _unlisted_joins(set(texts), set(pairs))
    if unlisted:
        shown = ", ".join(f"{t!r} = {a!r} + {b!r}" for t, a, b in sorted(unlisted)[:4])
        raise GGUFExportError(
            f"the tokenizer's merges are not SentencePiece-complete: {len(unlisted)} splits of tokens into two "
            f"tokens are no merge (e.g. {shown}); llama.cpp's 'llama' tokenizer would join them. Accepted: BPE with "
            "byte fallback whose merges list every such split (as generated from SentencePiece scores)")
    scattered = _scattered_tokens(pairs)
    if scattered and warn:
        logger.warning("%d tokens are made by merges that are not consecutive in the merge list (e.g. %s): where "
                       "their merges compete, llama.cpp may join in another order than transformers",
                       len(scattered), [t for t in scattered[:3]])
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(pairs):
        first.setdefault(left + right, rank)
    floor = -float(len(pairs) + 1)
    return [-float(first[t]) if t in first else floor for t in texts]


def spm_token_types(texts: list[str], used: set[int], added: dict[int, bool], unk_id: int | None) -> list[int]:
    """llama.cpp token types by id: byte tokens BYTE, the unknown token UNKNOWN, special added tokens CONTROL,
    other added tokens USER_DEFINED, ids the tokenizer does not use UNUSED, the rest NORMAL."""
    types = []
    for i, text in enumerate(texts):
        if i not in used:
            types.append(UNUSED)
        elif i == unk_id:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i] else USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def check_spm(spec: dict[str, Any], vocab: dict[str, int], warn: bool = True) -> SpmSpace:
    """Everything about a SentencePiece-style ``tokenizer.json`` but its merges; ``GGUFExportError`` if llama.cpp's
    ``llama`` tokenizer cannot repeat it, a warning (unless ``warn`` is False) for the texts where it differs."""
    _check_model(spec.get("model", {}))
    space = spm_space(spec)
    _check_byte_tokens(vocab)
    _check_added_tokens(spec)
    if space.split:
        inner = sorted(t for t in vocab if SPACE in t[1:] and not _BYTE_TOKEN.fullmatch(t))
        if inner:
            raise GGUFExportError(f"the tokenizer's Metaspace pre-tokenizer splits words at '▁' but {len(inner)} "
                                  f"tokens hold '▁' inside (e.g. {inner[:3]}): llama.cpp would join across words")
    if space.skips_prefix_before_space and warn:
        logger.warning("the tokenizer's Metaspace pre-tokenizer adds no '▁' to a text that already begins with a "
                       "space; llama.cpp (like SentencePiece) always adds it: such a text tokenizes in llama.cpp as in "
                       "transformers with one more space in front%s", "; with prepend_scheme 'first', text that "
                       "follows an added token also gets a '▁' in llama.cpp only" if space.first_only else "")
    return space
