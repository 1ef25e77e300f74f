"""lm-evaluation-harness on the real SmolLM2-135M-Instruct, dense and pruned, next to osscar_hf's own perplexity.

    pip install "lm-eval[hf]"                          # in the dev extra
    OMP_WAIT_POLICY=PASSIVE python benchmarks/lm_eval_smollm2.py [--articles 3] [--no-pruned]

Protocol:
  * text: the first ``--articles`` articles of WikiText-2 raw test (shared/data/wikitext-2-raw/wiki.test.raw, cut
    at its level-1 headings ``" = Title = "``), one lm-eval document per article, written to a JSON-lines file with
    a task YAML of our own (``loglikelihood_rolling``: every token of a document scored, the first given the
    tokenizer's BOS, windows of ``--max-length`` tokens, each later window predicting up to that many new tokens).
  * lm-eval: ``simple_evaluate(model="hf", ...)`` at float32, batch 1, on the CPU; its word_perplexity,
    byte_perplexity and bits_per_byte, and the token perplexity exp(-sum loglikelihood / tokens) computed here
    from its per-document log-likelihoods and the documents' token counts.
  * osscar_hf: ``evaluate_perplexity`` on the same text (the documents concatenated, which is the raw file's slice),
    non-overlapping windows of ``--max-length`` tokens, no BOS, the first token of every window unscored and a
    tail shorter than a window dropped; and, to show that the protocols alone make the difference, on lm-eval's
    token streams (each document on its own, BOS first, windows of ``--max-length`` + 1 tokens every
    ``--max-length``: the same tokens scored, only a document's last window has less context than lm-eval's).
  * pruned: ``OsscarConfig(attention_sparsity=1/3, mlp_sparsity=0.25)`` (one KV group of three and a quarter of the
    FFN neurons in every block) calibrated on 32 windows of 512 tokens of the State of the Union text, saved in the
    ``osscar`` format (so lm-eval loads it through ``import osscar_hf``).

Writes ``benchmarks/results/lm_eval.json`` and ``lm_eval.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from osscar_hf.process import quiet_idle_threads

quiet_idle_threads()  # before torch is imported

import torch  # noqa: E402

from osscar_hf.integrations.lm_eval_task import write_perplexity_task  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASK = "wikitext2_local_ppl"


def wikitext_articles(raw_path: Path) -> list[str]:
    """The articles of wiki.test.raw, each from its level-1 heading line to the next one, lines kept verbatim."""
    lines = raw_path.read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r" = [^=].* = \n", line)]
    return ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def run_lm_eval(folder: Path, tasks: Path, tokenizer: Any, documents: list[str], max_length: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,max_length={max_length}",
                                  tasks=[TASK], task_manager=manager, log_samples=True, batch_size=1, device="cpu")
    seconds = time.perf_counter() - start
    metrics = out["results"][TASK]
    lls = [s["resps"][0][0] for s in sorted(out["samples"][TASK], key=lambda s: s["doc_id"])]
    tokens = sum(len(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in documents)
    return {"word_perplexity": metrics["word_perplexity,none"], "byte_perplexity": metrics["byte_perplexity,none"],
            "bits_per_byte": metrics["bits_per_byte,none"], "token_perplexity": math.exp(-sum(lls) / tokens),
            "scored_tokens": tokens, "loglikelihoods": lls, "seconds": seconds}


def run_osscar_hf(folder: Path, tokenizer: Any, documents: list[str], max_length: int) -> dict[str, Any]:
    import osscar_hf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = time.perf_counter()
    result = osscar_hf.evaluate_perplexity(model, tokenizer, "".join(documents), seq_len=max_length)
    row = {"token_perplexity": result.perplexity, "scored_tokens": result.num_tokens,
           "windows": result.num_windows, "seconds": time.perf_counter() - start}
    row["per_document"] = per_document(model, tokenizer, documents, max_length)
    return row


def per_document(model: torch.nn.Module, tokenizer: Any, documents: list[str], max_length: int) -> dict[str, Any]:
    """osscar_hf's metric on lm-eval's token streams: every document on its own, BOS first, windows of
    max_length + 1 tokens every max_length tokens (so every document token is scored, as lm-eval does; only a
    document's last window has less context than lm-eval gives it)."""
    import osscar_hf

    total_nll, total_tokens = 0.0, 0
    for doc in documents:
        text = tokenizer.bos_token + doc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        seq_len = min(max_length + 1, len(ids))
        result = osscar_hf.evaluate_perplexity(model, tokenizer, text, seq_len=seq_len, stride=seq_len - 1)
        total_nll += result.nll * result.num_tokens
        total_tokens += result.num_tokens
    return {"token_perplexity": math.exp(total_nll / total_tokens), "scored_tokens": total_tokens}


def last_window_check(folder: Path, tokenizer: Any, documents: list[str], max_length: int) -> dict[str, Any]:
    """Where osscar_hf's strided windows and lm-eval's differ: a document's last window. On the shortest document
    that needs two windows or more, its log-likelihood with the last window given full context (lm-eval's rule)
    and with our strided last window, the earlier windows scored alike (BOS first, every token scored)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    index = min((i for i, ids in enumerate(encoded) if len(ids) > max_length), key=lambda i: len(encoded[i]))
    stream = [tokenizer.bos_token_id] + encoded[index]

    def score(window: list[int], predicted: int) -> float:
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([window])).logits[0, :-1].float(), dim=-1)
        return logp.gather(1, torch.tensor(window[1:])[:, None])[-predicted:].sum().item()

    full = len(encoded[index]) // max_length
    earlier = sum(score(stream[k * max_length : (k + 1) * max_length + 1], max_length) for k in range(full))
    rest = len(encoded[index]) - full * max_length
    return {"article": index, "tokens": len(encoded[index]),
            "full_context_last_window": earlier + (score(stream[-(max_length + 1):], rest) if rest else 0.0),
            "strided_last_window": earlier + (score(stream[full * max_length :], rest) if rest else 0.0)}


def prune(dense: Path, tokenizer: Any, calibration: Path, target: Path) -> dict[str, Any]:
    import osscar_hf
    from osscar_hf import OsscarConfig, OsscarPruner
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    config = OsscarConfig(attention_sparsity=1 / 3, mlp_sparsity=0.25, dataset=str(calibration), num_samples=32,
                          seq_len=512, device="cpu")
    start = time.perf_counter()
    pruner = OsscarPruner(config)
    pruner.prune(model, tokenizer, progress=False)
    seconds = time.perf_counter() - start
    osscar_hf.save_pruned(model, target, tokenizer=tokenizer, format="osscar")
    return {"prune_seconds": seconds, "parameters": pruner.report.parameters_after,
            "config": "OsscarConfig(attention_sparsity=1/3, mlp_sparsity=0.25, num_samples=32, seq_len=512)",
            "format": "osscar"}


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# lm-evaluation-harness on SmolLM2-135M-Instruct (`benchmarks/lm_eval_smollm2.py`)", "",
        f"WikiText-2 raw test, the first {s['articles']} articles ({s['articles_of']} in all; limited for CPU time: "
        f"{s['tokens']} SmolLM2 tokens), one lm-eval document per article, a local `loglikelihood_rolling` task; "
        f"windows of {s['max_length']} tokens, float32, CPU. lm-eval {s['lm_eval']}, transformers "
        f"{s['transformers']}, torch {s['torch']}.", "",
        "| model | lm-eval word ppl | lm-eval byte ppl | lm-eval bits/byte | lm-eval token ppl | osscar_hf token ppl "
        "| osscar_hf on lm-eval's streams | lm-eval s | osscar_hf s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["models"].items():
        le, oh = row["lm_eval"], row["osscar_hf"]
        lines.append(f"| {name} | {le['word_perplexity']:.2f} | {le['byte_perplexity']:.4f} "
                     f"| {le['bits_per_byte']:.4f} "
                     f"| {le['token_perplexity']:.2f} | {oh['token_perplexity']:.2f} "
                     f"| {oh['per_document']['token_perplexity']:.2f} | {le['seconds']:.0f} "
                     f"| {oh['seconds']:.0f} |")
    lines += [
        "",
        f"Pruning: {report['pruning']['config']}, State of the Union calibration, "
        f"{report['pruning']['prune_seconds']:.0f} s; {report['pruning']['parameters']:,} parameters; evaluated from "
        f"the `{report['pruning']['format']}` format after `import osscar_hf`." if "pruning" in report else "",
        "",
        "- lm-eval scores every token of every article, the first given SmolLM2's BOS "
        f"(`{s['bos_prefix']}`), in windows of {s['max_length']} tokens per article (its last window filled with "
        "earlier context); osscar_hf's metric cuts the concatenated text into non-overlapping windows of "
        f"{s['max_length']} tokens with no BOS, leaves each window's first token unscored and drops the tail: "
        + ", ".join(f"{row['osscar_hf']['scored_tokens']} of {row['lm_eval']['scored_tokens']} tokens scored"
                    for row in list(report["models"].values())[:1]) + ".",
        "- Word perplexity divides the same total log-likelihood by whitespace-separated words (WikiText's ` @-@ `, "
        "punctuation and digits split into words, fewer than tokens), byte perplexity by UTF-8 bytes: neither is on "
        "the token scale. The token perplexity (total log-likelihood / the articles' token counts) is.",
        "- \"osscar_hf on lm-eval's streams\" runs `evaluate_perplexity` on each article alone, BOS first, in strided "
        "windows that score every token as lm-eval does; the one difference left is an article's last window, "
        "which lm-eval fills with earlier context and ours starts where the previous one ended. That is the whole "
        "gap: an article in one window gets the same log-likelihood from both (the test proves it on tiny "
        "models), and on the shortest multi-window article here"
        + (f" (article {c['article'] + 1}, {c['tokens']} tokens) lm-eval's "
           f"{report['models']['dense']['lm_eval']['loglikelihoods'][c['article']]:.2f} is reproduced as "
           f"{c['full_context_last_window']:.2f} with the last window given full context, against "
           f"{c['strided_last_window']:.2f} with ours" if (c := report.get("last_window_check")) else " (not run)")
        + ". So the numbers differ by protocol (per-article context and BOS, window starts, the dropped tail), not "
        "by the model or the checkpoint format.",
        f"- Limited to {s['articles']} of {s['articles_of']} articles for CPU time (2 shared cores: a forward pass "
        "of 2048 tokens took 4-7 s here); `--articles 62` runs the whole split.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=5, help="first N WikiText-2 test articles (62 in all)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-pruned", action="store_true")
    parser.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite lm_eval.md from lm_eval.json (running the last-window check if it is missing)")
    args = parser.parse_args(argv)
    if args.markdown_only:
        report = json.loads((RESULTS_DIR / "lm_eval.json").read_text())
        if "last_window_check" not in report:
            from osscar_hf.demo.models import fetch_smollm2
            from transformers import AutoTokenizer

            dense = fetch_smollm2()
            documents = wikitext_articles(args.shared_data / "wikitext-2-raw" / "wiki.test.raw")
            report["last_window_check"] = last_window_check(dense, AutoTokenizer.from_pretrained(dense),
                                                            documents[: report["settings"]["articles"]],
                                                            report["settings"]["max_length"])
            (RESULTS_DIR / "lm_eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS_DIR / "lm_eval.md").write_text(markdown(report))
        return 0
    import lm_eval
    import transformers
    from osscar_hf.demo.models import fetch_smollm2
    from transformers import AutoTokenizer

    articles = wikitext_articles(args.shared_data / "wikitext-2-raw" / "wiki.test.raw")
    documents = articles[: args.articles]
    dense = fetch_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(dense)
    report: dict[str, Any] = {"settings": {
        "articles": len(documents), "articles_of": len(articles), "max_length": args.max_length,
        "tokens": sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents),
        "lm_eval": lm_eval.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "bos_prefix": tokenizer.bos_token}, "models": {}}
    with tempfile.TemporaryDirectory() as work:
        tasks = write_perplexity_task(Path(work), documents, TASK)
        models = [("dense", dense)]
        if not args.no_pruned:
            pruned = Path(work) / "pruned"
            report["pruning"] = prune(dense, tokenizer, args.shared_data / "calibration" / "state_union.txt", pruned)
            models.append(("pruned (attention 1/3, MLP 0.25; osscar format)", pruned))
        report["last_window_check"] = last_window_check(dense, tokenizer, documents, args.max_length)
        for name, folder in models:
            row = {"lm_eval": run_lm_eval(folder, tasks, tokenizer, documents, args.max_length),
                   "osscar_hf": run_osscar_hf(folder, tokenizer, documents, args.max_length)}
            report["models"][name] = row
            print(name, json.dumps({k: {m: v for m, v in r.items() if m != "loglikelihoods"} for k, r in row.items()}))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "lm_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / "lm_eval.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
