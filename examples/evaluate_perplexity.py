"""WikiText-2 corpus perplexity of one or more models with the ``evaluate`` metric shipped in osscar_hf.

    python examples/evaluate_perplexity.py MODEL [MODEL ...] [--seq-len 2048] [--max-windows N] [--dtype float32]

Each MODEL is a folder (dense, or pruned by ``osscar-hf prune``) or a Hub id. The metric is loaded by path
(``osscar_hf.metrics.PERPLEXITY_METRIC_PATH``), so it works offline, and computes the number pruning papers
report: the test split joined with blank lines, tokenized once, non-overlapping windows of ``--seq-len``
tokens, exp(mean token NLL). The test split is read from the project's shared data when present, else from
the Hub. ``osscar-hf eval MODEL --dataset wikitext2`` prints the same number.
"""

from __future__ import annotations

import argparse

import evaluate

from osscar_hf.metrics import PERPLEXITY_METRIC_PATH, load_eval_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model folders or Hub ids")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: model context, <= 2048)")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()

    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    texts = load_eval_texts("wikitext2")
    for model_id in args.models:
        result = metric.compute(predictions=texts, model_id=model_id, seq_len=args.seq_len,
                                max_windows=args.max_windows, dtype=args.dtype, device=args.device)
        print(f"{model_id}: perplexity {result['perplexity']:.3f} over {result['num_tokens']:,} tokens")


if __name__ == "__main__":
    main()
