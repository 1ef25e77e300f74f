"""benchmarks/vision.py's scores and calibration augmentation, on made-up logits and images (no timm, no weights)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def vision():
    """benchmarks/vision.py (benchmarks/ is not a package), with sys.path and sys.modules restored afterwards."""
    saved = list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vision  # noqa: PLC0415

        yield vision
    finally:
        sys.path[:] = saved
        for name in ("vision", "vision_lite0", "vision_table"):
            sys.modules.pop(name, None)


def test_scores_count_top1_top5_agreement_and_overlap(vision):
    dense = torch.tensor([[9.0, 8, 7, 6, 5, 0, 0], [0, 0, 1, 2, 3, 4, 9]])
    pruned = torch.tensor([[8.0, 9, 7, 6, 0, 5, 0], [0, 0, 1, 2, 3, 4, 9]])
    scores = vision.scores(pruned, dense, labels=[0, 5])
    assert scores["top1"] == 0.0  # image 0: predicts 1, image 1: predicts 6
    assert scores["top5"] == 1.0  # 0 in {1, 0, 2, 3, 5}; 5 in {6, 5, 4, 3, 2}
    assert scores["top1_agreement"] == 0.5
    assert scores["top5_overlap"] == pytest.approx((4 / 5 + 1) / 2)
    assert scores["kl_to_dense"] > 0 and vision.scores(dense, dense, [0, 6])["kl_to_dense"] == pytest.approx(0)


def test_augment_is_seeded_and_keeps_each_image_and_its_mirror(vision):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(2)]
    out = vision.augment(images, copies=5, seed=3)
    again = vision.augment(images, copies=5, seed=3)
    assert len(out) == 10 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    assert out[0] is images[0] and np.array_equal(np.asarray(out[1]), np.asarray(images[0])[:, ::-1])
    assert all(0.4 * 2400 * 0.9 <= math.prod(image.size) <= 2400 for image in out[2:5])


def test_the_table_puts_budget_rows_in_their_own_table(vision):
    from vision_table import markdown  # noqa: PLC0415 (benchmarks/ is on sys.path while the fixture lives)

    scores = {"top1": 0.5, "top5": 1.0, "top1_agreement": 0.75, "top5_overlap": 0.8, "kl_to_dense": 0.25}
    rows = [{"channel_sparsity": 0.0, "method": "dense", "prune_seconds": 0.0, "parameters": 4e6,
             "multiply_adds": 4e8, "cpu_seconds": 0.3, **scores},
            {"channel_sparsity": 0.3, "method": "osscar global", "sparsity": 0.2995, "sparsity_target": "params",
             "prune_seconds": 15.0, "parameters": 3.765e6, "multiply_adds": 3.384e8, **scores}]
    meta = {"evaluated": 4, "folds": [{"evaluation_files": ["a", "b"], "calibration_images": 8}],
            "torch_threads": 2, "timing_images": 2, "timing_repeats": 3, "reload_identical_logits": True,
            "allocation_images": 16}
    text = markdown(rows, meta)
    first, budgets = text.split("## Global budgets")
    assert "| 0% | dense | 2/4 |" in first and "global" not in first.split("|---")[-1]
    assert "| params | 29.9% | 30% | global | 2/4 | 4/4 | 3/4 | 0.80 | 0.250 | 3.765M | 338.4M | 15 |" in budgets
