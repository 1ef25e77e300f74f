"""Speed of pruned SmolLM2-135M against dense, next to the ideal speed-up, in transformers and in llama.cpp (CPU).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py                 # prune (once, cached), measure, write results
    python benchmarks/speed.py --runtimes transformers --cells 1x128,8x128   # some cells; done rows are kept
    python benchmarks/speed.py --render-only                            # rewrite .md and .png from speed.json

Protocol:
  * models: SmolLM2-135M-Instruct, float32 (``fetch_smollm2``), dense and pruned with ``OsscarConfig(sparsity=
    --sparsity)`` (0.458: 54.2% of the decoder blocks' parameters kept), ``allocation="uniform"``, ``"global"``, and
    global with ``round_to=64`` and ``128``; calibration: 32 random windows of 512 tokens of shared/data's State of the
    Union text, seed 0 (the quick protocol of ``benchmarks/quality.py``). Each is pruned once and saved with
    ``save_pruned`` under ``--models-dir``; later runs load it from there. llama.cpp gets each folder exported with
    ``export_gguf(..., dtype="f32")``, the same weights and dtype as transformers.
  * cells: batch 1, 8 and 32 at prompt lengths 128 and 1024 (random token ids, seeded). Prefill: one forward pass of
    the whole prompt filling the KV cache, logits of the last position only (as ``generate`` does). Decode: then
    ``--new-tokens`` greedy steps of one token per sequence on that cache, timed together. tokens/s = tokens / s.
  * interleaving: every repetition times every model once in each cell, the models' order rotating from one
    repetition to the next, so load from other work on this shared machine falls on all of them alike; the figures
    are medians over repetitions, the ratios are pruned/dense of those medians, the spread is (max-min)/median, and
    the range of the per-repetition ratios is kept. Repetitions: ``--repetitions`` (5), fewer for big cells (as many
    as fit ``--max-tokens-per-rep`` tokens, at least ``--min-repetitions``). Each timing also records the process's
    CPU time (tokens per CPU second, and CPU seconds per wall-clock second: the cores it got), which other work on
    the machine moves much less than wall-clock time.
  * ideal: prefill, multiply-adds per prompt token of the decoder blocks at that prompt length (the linears plus the
    attention scores and weighted values over the mean causal context, ``BlockGeometry.flops``) plus the LM head
    once per sequence; decode, bytes of weights read per step (every parameter, the tied LM head/embedding matrix
    once), and the same with the KV cache read at the mean context. Both from the loaded models' shapes. The ideal
    speed-up is dense/pruned of those; "of ideal" is measured speed-up / ideal speed-up (the issue's target: >= 0.8
    for prefill at batch 8 and decode at batch 1).
  * llama.cpp (llama-cpp-python in ``--llama-python``, ``benchmarks/speed_llamacpp_worker.py``): batch 1 through its
    ``Llama`` class, larger batches through llama.cpp's C API (a context of one sequence per row, every sequence's
    tokens in one ``llama_decode``), the cells of at most ``--llama-cpp-max-tokens`` prompt tokens (8192: not
    32x1024, which takes about 35 minutes; 32768 runs it); default f16 KV cache, prefill in one batch of the whole prompt(s).
  * ``--breakdown``: CPU time per kind of module (attention linears, attention core, MLP linears, ..., LM head) from
    forward hooks, in ``BREAKDOWN_CASES``, and one FFN's matmuls at the widths the pruned models have.
    ``--perplexity``: WikiText-2 perplexity of every model (quick protocol), what the speed costs.

Writes ``benchmarks/results/speed.json`` (every timing), ``speed.md`` and ``speed.png``; rows already in
``speed.json`` with the same settings are not measured again (``--rerun`` forces).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osscar_hf.process import quiet_idle_threads

quiet_idle_threads()  # before torch is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "osscar_hf" / "speed-models"
# name -> OsscarConfig overrides (on top of the sparsity and the calibration).
PRUNED: dict[str, dict[str, Any]] = {
    "uniform": {"allocation": "uniform"},
    "global": {"allocation": "global"},
    "global r64": {"allocation": "global", "round_to": 64},
    "global r128": {"allocation": "global", "round_to": 128},
}
# (phase, batch, prompt) where --breakdown times every part of the models: the cells of the targets.
BREAKDOWN_CASES = (("decode", 1, 128), ("decode", 1, 1024), ("prefill", 8, 128))
CELLS = ((1, 128), (1, 1024), (8, 128), (8, 1024), (32, 128), (32, 1024))


@dataclass(frozen=True)
class Cell:
    batch: int
    prompt: int
    repetitions: int
    new_tokens: int

    @property
    def key(self) -> str:
        return f"{self.batch}x{self.prompt}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.458)
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help="where the pruned checkpoints and GGUF files are cached")
    parser.add_argument("--models", default="dense," + ",".join(PRUNED), help="which models (dense always runs)")
    parser.add_argument("--cells", default=",".join(f"{b}x{p}" for b, p in CELLS), help="BATCHxPROMPT cells")
    parser.add_argument("--runtimes", default="transformers,llama.cpp")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--max-tokens-per-rep", type=int, default=4096,
                        help="fewer repetitions where repetitions x batch x prompt would exceed this")
    parser.add_argument("--min-repetitions", type=int, default=3, help="the fewest repetitions of any cell")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy decode steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", default="/work/venv-llama/bin/python")
    parser.add_argument("--llama-cpp-max-tokens", type=int, default=8192,
                        help="llama.cpp measures the cells of at most this many prompt tokens (batch x prompt)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time every part of the models (hooks) in BREAKDOWN_CASES (transformers)")
    parser.add_argument("--perplexity", action="store_true",
                        help="also WikiText-2 perplexity of every model (the quick protocol: first 12 windows of 1024)")
    parser.add_argument("--prepare-only", action="store_true", help="prune and export, measure nothing")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.models = ["dense"] + [m for m in args.models.split(",") if m and m != "dense"]
    args.cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",") if c]
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    return args


# --------------------------------------------------------------------------- models
def model_folder(args: argparse.Namespace, name: str, dense_dir: Path) -> Path:
    if name == "dense":
        return dense_dir
    return args.models_dir / f"smollm2-135m-s{args.sparsity:g}-{name.replace(' ', '-')}"


def prune_once(args: argparse.Namespace, name: str, dense_dir: Path, tokenizer: Any, calibration: Path) -> Path:
    """The pruned checkpoint ``name``, pruned and saved on first use, loaded from ``--models-dir`` afterwards."""
    from transformers import AutoModelForCausalLM

    from osscar_hf import OsscarConfig, OsscarPruner, save_pruned

    folder = model_folder(args, name, dense_dir)
    if (folder / "config.json").exists():
        return folder
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    config = OsscarConfig(sparsity=args.sparsity, **PRUNED[name], dataset=str(calibration), num_samples=32,
                          seq_len=512, seed=0, device="cpu")
    pruner = OsscarPruner(config)
    started = time.perf_counter()
    pruner.prune(model, tokenizer, progress=False)
    seconds = time.perf_counter() - started
    save_pruned(model, folder, tokenizer=tokenizer)
    info = {"seconds": round(seconds, 1), "sizes": [[b.attention.kept, b.mlp.kept] for b in pruner.report.blocks],
            "config": PRUNED[name], "sparsity": args.sparsity}
    (folder / "speed_prune.json").write_text(json.dumps(info) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] pruned {name} in {seconds:.0f} s -> {folder}", flush=True)
    return folder


def gguf_once(folder: Path, name: str, args: argparse.Namespace) -> Path:
    """The f32 GGUF file of a checkpoint folder, exported on first use."""
    from osscar_hf import export_gguf

    path = (args.models_dir / "smollm2-135m-dense-f32.gguf") if name == "dense" else folder / "model-f32.gguf"
    if not path.exists():
        export_gguf(folder, path, dtype="f32")
    return path


def prepare(args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """Every model's checkpoint folder (and GGUF file when llama.cpp runs), pruning and exporting what is missing."""
    from transformers import AutoTokenizer

    from osscar_hf.demo import paths
    from osscar_hf.demo.models import fetch_smollm2

    calibration = paths.calibration_text_path()
    if calibration is None:
        raise SystemExit("error: shared/data/calibration/state_union.txt was not found; set OSSCAR_HF_SHARED_DATA")
    dense_dir = fetch_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    out: dict[str, dict[str, Path]] = {}
    for name in args.models:
        folder = dense_dir if name == "dense" else prune_once(args, name, dense_dir, tokenizer, calibration)
        out[name] = {"folder": folder}
        if "llama.cpp" in args.runtimes:
            out[name]["gguf"] = gguf_once(folder, name, args)
    return out



# --------------------------------------------------------------------------- ideal
def block_sizes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(KV groups kept, FFN neurons kept) of every decoder block, read from the modules' shapes."""
    head_dim = model.config.head_dim
    return [(layer.self_attn.k_proj.out_features // head_dim, layer.mlp.down_proj.in_features)
            for layer in model.model.layers]


def ideal_costs(model: torch.nn.Module, dense: torch.nn.Module, prompt: int) -> dict[str, float]:
    """Multiply-adds per prompt token of a prefill of ``prompt`` tokens, and bytes of weights read per decode step,
    of ``model`` (pruned or dense), from its shapes and the dense model's block geometries."""
    from osscar_hf.arch import get_spec
    from osscar_hf.budgets import block_geometries

    geometries = block_geometries(dense, get_spec(dense), seq_len=prompt)
    sizes = block_sizes(model)
    head = model.lm_head.in_features * model.lm_head.out_features
    block_macs = sum(g.flops(a, m) for g, (a, m) in zip(geometries, sizes))
    params = sum(g.params(a, m) for g, (a, m) in zip(geometries, sizes)) + head + model.model.norm.weight.numel()
    counted = sum(p.numel() for p in model.parameters())
    if params != counted:  # the geometry must describe the model that runs
        raise RuntimeError(f"geometry counts {params} parameters, the model has {counted}")
    element = next(model.parameters()).element_size()
    kv_per_token = sum(2 * a * model.config.head_dim * element for a, _ in sizes)
    return {"prefill_macs_per_token": block_macs + head / prompt, "decode_weight_bytes": params * element,
            "kv_bytes_per_context_token": kv_per_token, "lm_head_bytes": head * element}


# --------------------------------------------------------------------------- transformers
def load_models(models: dict[str, dict[str, Path]]) -> dict[str, torch.nn.Module]:
    import osscar_hf  # noqa: F401  (registers the osscar format for per-block shapes)
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(m["folder"], dtype=torch.float32).eval()
            for name, m in models.items()}


class Clock:
    """Wall-clock and CPU (this process, all threads) seconds since it was made. CPU time barely moves when
    other work takes the cores (idle OpenMP threads sleep: OMP_WAIT_POLICY=PASSIVE), so its ratios are a check on
    the wall-clock ones on a shared machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.inference_mode()
def time_once(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Tokens per wall-clock second and per CPU second of a prefill (the prompt in one forward filling the KV cache,
    last logits only) and of ``new_tokens`` greedy decode steps of one token per sequence after it."""
    clock = Clock()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = clock.read()
    cache = out.cache
    clock = Clock()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    decode = clock.read()
    generated = ids.shape[0] * new_tokens
    return {"prefill": ids.numel() / prefill[0], "decode": generated / decode[0],
            "prefill_cpu": ids.numel() / prefill[1], "decode_cpu": generated / decode[1]}


def rotated(names: list[str], rep: int) -> list[str]:
    return names[rep % len(names):] + names[:rep % len(names)]


def transformers_cell(models: dict[str, torch.nn.Module], cell: Cell, seed: int) -> dict[str, dict[str, list]]:
    """Every model once per repetition (order rotating), after a warm-up on the cell (on 1 x 128 tokens of it
    where the cell has over 1024 tokens)."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (cell.batch, cell.prompt), generator=torch.Generator().manual_seed(seed))
    names = list(models)
    for name in names:
        warm = ids if ids.numel() <= 1024 else ids[:1, :128]
        time_once(models[name], warm, 2)
    out: dict[str, dict[str, list]] = {name: {} for name in names}
    for rep in range(cell.repetitions):
        for name in rotated(names, rep):
            for key, value in time_once(models[name], ids, cell.new_tokens).items():
                out[name].setdefault(key, []).append(value)
    return out


def llama_cpp_cells(args: argparse.Namespace, ggufs: dict[str, Path], cells: list[Cell]) -> list[dict[str, Any]]:
    """Run the llama.cpp worker on ``cells`` and return its cells."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"models": {k: str(v) for k, v in ggufs.items()}, "threads": args.threads,
                                   "cells": [[c.batch, c.prompt, c.repetitions, c.new_tokens] for c in cells]}))
        env = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"}
        subprocess.run([args.llama_python, str(HERE / "speed_llamacpp_worker.py"), str(job), str(result)],
                       check=True, env=env)
        return json.loads(result.read_text())["cells"]



# --------------------------------------------------------------------------- where the time goes
PARTS = ("attention linears", "attention core", "MLP linears", "MLP other", "norms and residuals", "LM head",
         "outside the layers")


class PartTimer:
    """CPU seconds (this process, all threads) spent in each kind of module of a Llama model, from forward pre/post
    hooks (CPU ops are synchronous). CPU time, not wall-clock, so that other work on a shared machine moves it
    little. The hooks cost a few microseconds each, counted in the enclosing parts."""

    KINDS = (("q_proj", "attn_linear"), ("k_proj", "attn_linear"), ("v_proj", "attn_linear"),
             ("o_proj", "attn_linear"), ("gate_proj", "mlp_linear"), ("up_proj", "mlp_linear"),
             ("down_proj", "mlp_linear"), ("self_attn", "attn"), ("mlp", "mlp"), ("lm_head", "head"))

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = {}
        self.started: dict[int, float] = {}
        self.handles = []
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            kind = dict(self.KINDS).get(leaf) or ("layer" if name.count(".") == 2 and ".layers." in name else None)
            if kind:
                self.handles.append(module.register_forward_pre_hook(self._pre))
                self.handles.append(module.register_forward_hook(self._post(kind)))

    def _pre(self, module: torch.nn.Module, _args: Any) -> None:
        self.started[id(module)] = time.process_time()

    def _post(self, kind: str):
        def hook(module: torch.nn.Module, _args: Any, _out: Any) -> None:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.process_time() - self.started[id(module)]
        return hook

    def parts(self, total: float) -> dict[str, float]:
        s = self.seconds
        return {"attention linears": s["attn_linear"], "attention core": s["attn"] - s["attn_linear"],
                "MLP linears": s["mlp_linear"], "MLP other": s["mlp"] - s["mlp_linear"],
                "norms and residuals": s["layer"] - s["attn"] - s["mlp"], "LM head": s["head"],
                "outside the layers": total - s["layer"] - s["head"]}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def time_parts(model: torch.nn.Module, ids: torch.Tensor, phase: str, new_tokens: int) -> dict[str, float]:
    """CPU seconds per part of one prefill of ``ids`` (``phase="prefill"``) or of ``new_tokens`` decode steps after
    it."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1) if phase == "decode" else None
    timer = PartTimer(model)
    try:
        started = time.process_time()
        if phase == "prefill":
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        else:
            token, cache = out.logits[:, -1].argmax(-1, keepdim=True), out.cache
            for _ in range(new_tokens):
                step = model(input_ids=token, cache=cache, use_cache=True)
                token = step.logits[:, -1].argmax(-1, keepdim=True)
        total = time.process_time() - started
    finally:
        timer.close()
    return {"total": total, **timer.parts(total)}


def breakdown(loaded: dict[str, torch.nn.Module], cases: list[tuple[str, int, int]], repetitions: int,
              new_tokens: int) -> list[dict[str, Any]]:
    """Median seconds per part for each (phase, batch, prompt) case and model, models interleaved."""
    out = []
    vocab = loaded["dense"].config.vocab_size
    for phase, batch, prompt in cases:
        ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))
        names = list(loaded)
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for rep in range(repetitions + 1):  # the first round warms up
            for name in rotated(names, rep):
                result = time_parts(loaded[name], ids, phase, new_tokens)
                if rep:
                    runs[name].append(result)
        for name in names:
            parts = {k: median([r[k] for r in runs[name]]) for k in ("total",) + PARTS}
            out.append({"phase": phase, "batch": batch, "prompt": prompt, "model": name, "seconds": parts})
            print(f"[{time.strftime('%H:%M:%S')}] breakdown {phase} {batch}x{prompt} {name}: "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()), flush=True)
    return out



WIDTHS = (509, 512, 545, 557, 576, 605, 640, 689, 704, 768, 1024, 1035, 1109, 1152, 1536)


@torch.inference_mode()
def width_scan(hidden: int, rows: tuple[int, ...] = (1024,), repetitions: int = 7) -> list[dict[str, Any]]:
    """CPU seconds of one FFN's three matmuls (gate and up: hidden -> width, down: width -> hidden) at FFN widths the
    pruned models have, for ``rows`` tokens at once (1024: a prefill of 8 x 128), medians of ``repetitions`` (the
    widths interleaved). Shows whether odd widths cost more per neuron. (Not at decode shapes: these weights would
    stay in the CPU's cache, the model's do not.)"""
    out = []
    for n in rows:
        x = torch.randn(n, hidden)
        weights = {w: (torch.randn(w, hidden), torch.randn(w, hidden), torch.randn(hidden, w)) for w in WIDTHS}
        times: dict[int, list[float]] = {w: [] for w in WIDTHS}
        for rep in range(repetitions + 1):
            for w in WIDTHS:
                gate, up, down = weights[w]
                started = time.process_time()
                for _ in range(2):
                    h = torch.nn.functional.linear(x, gate) * torch.nn.functional.linear(x, up)
                    torch.nn.functional.linear(h, down)
                if rep:
                    times[w].append((time.process_time() - started) / 2)
        for w in WIDTHS:
            seconds = median(times[w])
            out.append({"tokens": n, "width": w, "seconds": seconds, "us_per_neuron": seconds / w * 1e6})
    return out



def perplexities(loaded: dict[str, torch.nn.Module], tokenizer_dir: Path) -> dict[str, float]:
    """WikiText-2 test perplexity of every model on the quick protocol (``benchmarks/quality.py``'s: the first 12
    non-overlapping windows of 1024 tokens), what the speed is bought with."""
    from transformers import AutoTokenizer

    from osscar_hf.demo.texts import load_wikitext2_test
    from osscar_hf.evaluation import evaluate_perplexity

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = load_wikitext2_test()[0]
    out = {}
    for name, model in loaded.items():
        out[name] = evaluate_perplexity(model, tokenizer, texts, seq_len=1024, max_windows=12).perplexity
        print(f"[{time.strftime('%H:%M:%S')}] perplexity {name}: {out[name]:.2f}", flush=True)
    return out


# --------------------------------------------------------------------------- plan and resume
def plan_cells(args: argparse.Namespace) -> list[Cell]:
    """The cells to measure, with fewer repetitions (never under ``--min-repetitions``) for the biggest ones."""
    cells = []
    for batch, prompt in args.cells:
        reps = max(args.min_repetitions, min(args.repetitions, args.max_tokens_per_rep // (batch * prompt)))
        cells.append(Cell(batch, prompt, reps, args.new_tokens))
    return cells


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"sparsity": args.sparsity, "new_tokens": args.new_tokens, "threads": args.threads,
            "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"}


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "models": {}}


def is_done(saved: dict[str, Any], runtime: str, cell: Cell, names: list[str], settings: dict[str, Any]) -> bool:
    for row in saved["rows"]:
        if (row["runtime"], row["batch"], row["prompt"]) == (runtime, cell.batch, cell.prompt) \
                and row["settings"]["sparsity"] == settings["sparsity"] \
                and row["settings"]["new_tokens"] == settings["new_tokens"] and set(names) <= set(row["timings"]):
            return True
    return False


def record(saved: dict[str, Any], runtime: str, cell: Cell, timings: dict[str, Any], seconds: float,
           settings: dict[str, Any], args: argparse.Namespace) -> None:
    saved["rows"] = [r for r in saved["rows"] if (r["runtime"], r["batch"], r["prompt"]) !=
                     (runtime, cell.batch, cell.prompt)]
    saved["rows"].append({"runtime": runtime, "batch": cell.batch, "prompt": cell.prompt,
                          "repetitions": cell.repetitions, "new_tokens": cell.new_tokens, "seconds": round(seconds, 1),
                          "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "load_average_1min": round(os.getloadavg()[0], 2), "settings": settings, "timings": timings})
    write_results(saved, args.output_dir)
    print(f"[{time.strftime('%H:%M:%S')}] {runtime} {cell.key}: {seconds:.0f} s", flush=True)



# --------------------------------------------------------------------------- results
def describe(loaded: dict[str, torch.nn.Module], prompts: list[int]) -> dict[str, Any]:
    """Every model's shapes and ideal costs at each prompt length."""
    dense = loaded["dense"]
    out = {}
    for name, model in loaded.items():
        costs = {str(p): ideal_costs(model, dense, p) for p in prompts}
        first = next(iter(costs.values()))
        out[name] = {"parameters": sum(p.numel() for p in model.parameters()), "sizes": block_sizes(model),
                     "decode_weight_bytes": first["decode_weight_bytes"], "lm_head_bytes": first["lm_head_bytes"],
                     "kv_bytes_per_context_token": first["kv_bytes_per_context_token"],
                     "prefill_macs_per_token": {p: c["prefill_macs_per_token"] for p, c in costs.items()}}
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def derived(row: dict[str, Any], models: dict[str, Any], name: str) -> dict[str, float]:
    """Medians, spread, speed-ups against dense (ratio of medians, and the range of the per-repetition ratios),
    the ideal speed-ups and measured / ideal, for one model in one cell."""
    mine, dense = row["timings"][name], row["timings"]["dense"]
    me, ref = models[name], models["dense"]
    context = row["prompt"] + row["new_tokens"] / 2  # mean context of the decode steps
    ideal = {"prefill": ref["prefill_macs_per_token"][str(row["prompt"])] /
             me["prefill_macs_per_token"][str(row["prompt"])],
             "decode": ref["decode_weight_bytes"] / me["decode_weight_bytes"]}
    kv = ((ref["decode_weight_bytes"] + row["batch"] * context * ref["kv_bytes_per_context_token"]) /
          (me["decode_weight_bytes"] + row["batch"] * context * me["kv_bytes_per_context_token"]))
    out: dict[str, float] = {"ideal_decode_with_kv": kv}
    for phase in ("prefill", "decode"):
        m = median(mine[phase])
        per_rep = [a / b for a, b in zip(mine[phase], dense[phase])]
        out[f"{phase}_tokens_per_s"] = m
        out[f"{phase}_spread"] = (max(mine[phase]) - min(mine[phase])) / m
        out[f"{phase}_speedup"] = m / median(dense[phase])
        out[f"{phase}_speedup_min"], out[f"{phase}_speedup_max"] = min(per_rep), max(per_rep)
        out[f"{phase}_ideal"] = ideal[phase]
        out[f"{phase}_of_ideal"] = out[f"{phase}_speedup"] / ideal[phase]
        if f"{phase}_cpu" in mine:  # tokens per CPU second; cores = CPU seconds per wall-clock second
            out[f"{phase}_cpu_speedup"] = median(mine[f"{phase}_cpu"]) / median(dense[f"{phase}_cpu"])
            out[f"{phase}_cores"] = median([w / c for w, c in zip(mine[phase], mine[f"{phase}_cpu"])])
    return out


def table(saved: dict[str, Any]) -> list[str]:
    lines = ["| runtime | batch x prompt | model | prefill tok/s (spread, cores) | speed-up [per-rep range] | "
             "by CPU time | ideal (MACs) | of ideal | decode tok/s (spread, cores) | speed-up [per-rep range] | "
             "by CPU time | ideal (weight bytes) | of ideal | ideal incl. KV |", "|---|---|---|" + "---:|" * 11]
    order = {"transformers": 0, "llama.cpp": 1}
    for row in sorted(saved["rows"], key=lambda r: (order.get(r["runtime"], 2), r["batch"], r["prompt"])):
        for name in row["timings"]:
            d = derived(row, saved["models"], name)
            cells = [row["runtime"], f"{row['batch']} x {row['prompt']}", name]
            for phase in ("prefill", "decode"):
                cores = f", {d[phase + '_cores']:.2f} cores" if phase + "_cores" in d else ""
                cells += [f"{d[phase + '_tokens_per_s']:.1f} ({d[phase + '_spread']:.0%}{cores})",
                          "-" if name == "dense" else f"{d[phase + '_speedup']:.2f}x "
                          f"[{d[phase + '_speedup_min']:.2f}-{d[phase + '_speedup_max']:.2f}]",
                          "-" if name == "dense" or phase + "_cpu_speedup" not in d else
                          f"{d[phase + '_cpu_speedup']:.2f}x",
                          "-" if name == "dense" else f"{d[phase + '_ideal']:.2f}x",
                          "-" if name == "dense" else f"**{d[phase + '_of_ideal']:.2f}**"]
            cells.append("-" if name == "dense" else f"{d['ideal_decode_with_kv']:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


TARGETS = (("prefill", 8, 0.8), ("decode", 1, 0.8))  # (phase, batch, least measured / ideal speed-up)


def targets(saved: dict[str, Any]) -> list[str]:
    """The issue's targets, per runtime, cell and pruned model: measured / ideal speed-up, wall-clock and CPU time."""
    lines = ["## Targets: prefill at batch 8 and decode at batch 1 reach at least 0.8 of the ideal speed-up", "",
             "| runtime | phase | batch x prompt | model | speed-up | ideal | of ideal | met | by CPU time: of ideal |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for phase, batch, least in TARGETS:
        for row in sorted(saved["rows"], key=lambda r: (r["runtime"] != "transformers", r["prompt"])):
            if row["batch"] != batch:
                continue
            for name in [n for n in row["timings"] if n != "dense"]:
                d = derived(row, saved["models"], name)
                ideal, of_ideal = d[f"{phase}_ideal"], d[f"{phase}_of_ideal"]
                cpu = d.get(f"{phase}_cpu_speedup")
                by_cpu = "-" if cpu is None else f"{cpu / ideal:.2f}"
                lines.append(f"| {row['runtime']} | {phase} | {batch} x {row['prompt']} | {name} | "
                             f"{d[phase + '_speedup']:.2f}x | {ideal:.2f}x | {of_ideal:.2f} | "
                             f"{'yes' if of_ideal >= least else 'no'} | {by_cpu} |")
    return lines


def markdown(saved: dict[str, Any]) -> str:
    settings = saved.get("settings", {})
    lines = ["# Speed: pruned SmolLM2-135M against dense, next to the ideal speed-up", "",
             "Written by `benchmarks/speed.py` (its docstring has the protocol). "
             f"Settings: {json.dumps(settings)}.", "",
             "tokens/s: medians over repetitions (spread = (max - min) / median); speed-up: pruned / dense of the "
             "medians, in brackets the range of the per-repetition ratios (dense and pruned timed back to back); "
             "by CPU time: the same from tokens per CPU second of the process (less moved by other work on the "
             "machine); cores: CPU seconds per wall-clock second of the process (2 at most; less when other work "
             "takes the cores "
             "or its threads wait); "
             "ideal: dense / pruned multiply-adds per prompt token (prefill) or bytes of weights per decode step "
             "(decode); of ideal: measured speed-up / ideal; ideal incl. KV: weights plus the KV cache read per "
             "decode step at the mean context.", ""]
    lines += targets(saved)
    lines += ["", "## Every cell", ""] + table(saved)
    lines += ["", "Models (parameters, ideal costs; sizes = [KV groups kept of 3, FFN neurons kept of 1536] per "
              "block):", ""]
    for name, m in saved["models"].items():
        macs = ", ".join(f"{v / 1e6:.1f}M at {p}" for p, v in m["prefill_macs_per_token"].items())
        lines.append(f"- {name}: {m['parameters']:,} parameters, {m['decode_weight_bytes'] / 2**20:.1f} MiB of "
                     f"weights per decode step (LM head {m['lm_head_bytes'] / 2**20:.1f} MiB), prefill multiply-adds "
                     f"per token {macs}; sizes {m['sizes'] if name != 'dense' else 'dense'}")
    if saved.get("perplexity"):
        lines += ["", "WikiText-2 test perplexity (first 12 windows of 1024 tokens): " + ", ".join(
            f"{name} {value:.2f}" for name, value in saved["perplexity"].items())]
    lines += breakdown_markdown(saved)
    return "\n".join(lines) + "\n"


def breakdown_markdown(saved: dict[str, Any]) -> list[str]:
    """Per case, milliseconds in each part, and each pruned model's part against dense's."""
    rows = saved.get("breakdown") or []
    lines = []
    for case in dict.fromkeys((r["phase"], r["batch"], r["prompt"]) for r in rows):
        these = [r for r in rows if (r["phase"], r["batch"], r["prompt"]) == case]
        dense = next(r["seconds"] for r in these if r["model"] == "dense")
        what = f"{saved.get('settings', {}).get('new_tokens')} decode steps" if case[0] == "decode" else "one prefill"
        lines += ["", f"### Where the time goes: {case[0]}, batch {case[1]} x prompt {case[2]} (ms for {what}; "
                  "CPU time; in brackets pruned / dense)", "",
                  "| model | total | " + " | ".join(PARTS) + " |", "|---|" + "---:|" * (len(PARTS) + 1)]
        for r in these:
            sec = r["seconds"]
            cells = [f"{sec[k] * 1e3:.1f}" + ("" if r["model"] == "dense" or dense[k] <= 0 else
                                               f" ({sec[k] / dense[k]:.2f})") for k in ("total",) + PARTS]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    scan = saved.get("widths") or []
    if scan:
        lines += ["", "### One FFN's matmuls (gate, up, down) by width: CPU microseconds per neuron (median)", "",
                  "| tokens | " + " | ".join(str(w) for w in WIDTHS) + " |", "|---|" + "---:|" * len(WIDTHS)]
        for n in dict.fromkeys(r["tokens"] for r in scan):
            by_width = {r["width"]: r["us_per_neuron"] for r in scan if r["tokens"] == n}
            lines.append(f"| {n} | " + " | ".join(f"{by_width[w]:.3f}" for w in WIDTHS) + " |")
    return lines


def write_results(saved: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "speed.json").write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    if saved["rows"] and saved["models"]:
        (output_dir / "speed.md").write_text(markdown(saved), encoding="utf-8")
        plot(saved, output_dir / "speed.png")



def plot(saved: dict[str, Any], path: Path) -> Path | None:
    """Measured speed-up (bars: wall-clock medians, whiskers: the per-repetition range; circles: by CPU time) against
    the ideal (black ticks) per cell: prefill and decode, each runtime."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    runtimes = [r for r in ("transformers", "llama.cpp") if any(row["runtime"] == r for row in saved["rows"])]
    names = [n for n in saved["models"] if n != "dense"]
    cells = [sum(row["runtime"] == r for row in saved["rows"]) for r in runtimes]
    fig, axes = plt.subplots(2, len(runtimes), figsize=(1.3 * sum(cells) + 2, 7), squeeze=False,
                             gridspec_kw={"width_ratios": cells})
    width = 0.8 / max(len(names), 1)
    for col, runtime in enumerate(runtimes):
        rows = sorted((r for r in saved["rows"] if r["runtime"] == runtime), key=lambda r: (r["batch"], r["prompt"]))
        for line, phase in enumerate(("prefill", "decode")):
            ax = axes[line][col]
            for i, name in enumerate(names):
                xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
                ds = [derived(r, saved["models"], name) for r in rows]
                ax.bar(xs, [d[f"{phase}_speedup"] for d in ds], width, label=name, color=f"C{i}")
                ax.errorbar(xs, [d[f"{phase}_speedup"] for d in ds], fmt="none", ecolor="grey", elinewidth=0.8,
                            yerr=[[d[f"{phase}_speedup"] - d[f"{phase}_speedup_min"] for d in ds],
                                  [d[f"{phase}_speedup_max"] - d[f"{phase}_speedup"] for d in ds]])
                ax.scatter(xs, [d[f"{phase}_ideal"] for d in ds], marker="_", s=120, color="black", zorder=3,
                           label="ideal" if i == 0 else None)
                cpu = [(x, d[f"{phase}_cpu_speedup"]) for x, d in zip(xs, ds) if f"{phase}_cpu_speedup" in d]
                ax.scatter([x for x, _ in cpu], [y for _, y in cpu], marker="o", s=14, facecolors="white",
                           edgecolors="black", linewidths=0.7, zorder=4, label="by CPU time" if i == 0 else None)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xticks(range(len(rows)), [f"{r['batch']}x{r['prompt']}" for r in rows])
            ideal = "multiply-adds" if phase == "prefill" else "weight bytes"
            ax.set_title(f"{runtime}: {phase} (ideal: {ideal})", fontsize=9)
            ax.set_ylabel("speed-up over dense")
            ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=3)
    axes[1][0].set_xlabel("batch x prompt tokens")
    fig.suptitle(f"SmolLM2-135M pruned to {1 - saved['settings']['sparsity']:.1%} of block parameters, CPU "
                 f"({saved['settings']['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main
def run_transformers(args: argparse.Namespace, saved: dict[str, Any], loaded: dict[str, torch.nn.Module],
                     cells: list[Cell], settings: dict[str, Any]) -> None:
    for cell in cells:
        if is_done(saved, "transformers", cell, list(loaded), settings) and not args.rerun:
            continue
        started = time.perf_counter()
        timings = transformers_cell(loaded, cell, seed=0)
        record(saved, "transformers", cell, timings, time.perf_counter() - started, settings, args)


def run_llama_cpp(args: argparse.Namespace, saved: dict[str, Any], models: dict[str, dict[str, Path]],
                  cells: list[Cell], settings: dict[str, Any]) -> None:
    todo = [c for c in cells if c.batch * c.prompt <= args.llama_cpp_max_tokens
            and (args.rerun or not is_done(saved, "llama.cpp", c, list(models), settings))]
    if not todo:
        return
    started = time.perf_counter()
    results = llama_cpp_cells(args, {name: m["gguf"] for name, m in models.items()}, todo)
    for cell, result in zip(todo, results):
        record(saved, "llama.cpp", cell, result["timings"], result["seconds"], settings, args)
    logging.info("llama.cpp: %.0f s", time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    saved = load_results(args.output_dir / "speed.json")
    if args.render_only:
        write_results(saved, args.output_dir)
        return 0
    models = prepare(args)
    if args.prepare_only:
        print(json.dumps({k: {kk: str(vv) for kk, vv in v.items()} for k, v in models.items()}, indent=1))
        return 0
    if "llama.cpp" in args.runtimes and not Path(args.llama_python).exists():
        print(f"error: {args.llama_python} (a Python with llama-cpp-python) does not exist", file=sys.stderr)
        return 1
    settings = settings_of(args)
    saved["settings"] = settings
    cells = plan_cells(args)
    loaded = load_models(models)
    saved["models"] = describe(loaded, sorted({c.prompt for c in cells} | {128, 1024}))
    if "transformers" in args.runtimes:
        run_transformers(args, saved, loaded, cells, settings)
    if args.perplexity:
        saved["perplexity"] = perplexities(loaded, models["dense"]["folder"])
        write_results(saved, args.output_dir)
    if args.breakdown:
        saved["breakdown"] = breakdown(loaded, list(BREAKDOWN_CASES), 5, args.new_tokens)
        saved["widths"] = width_scan(loaded["dense"].config.hidden_size)
        write_results(saved, args.output_dir)
    del loaded
    if "llama.cpp" in args.runtimes:
        run_llama_cpp(args, saved, models, cells, settings)
    write_results(saved, args.output_dir)
    print(markdown(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
