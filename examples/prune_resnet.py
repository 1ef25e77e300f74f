"""Prune a CNN's residual blocks with OSSCAR (channel pruning) and save it; compare its top-1 with the dense model's.

    python examples/prune_resnet.py MODEL CALIBRATION_IMAGES OUTPUT [--channel-sparsity 0.3] [--num-samples 256]
        [--check-images HELD_OUT_IMAGES]

MODEL is a folder or Hub id of a ``ResNetForImageClassification`` or ``MobileNetV2ForImageClassification`` (with its
image processor), CALIBRATION_IMAGES a folder of images. With ``--check-images`` (a folder of images that are not
calibration images), the script prints how often the pruned model's top-1 class agrees with the dense model's. The
pruned model is saved in the osscar format: load it after ``import osscar_hf`` (see docs/vision.md).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.calibration_images import IMAGE_SUFFIXES, load_images


def top1_agreement(dense: torch.nn.Module, pruned: torch.nn.Module, processor, folder: str) -> float:
    count = sum(1 for path in Path(folder).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    images = load_images(folder, num_samples=count, seed=0)  # every image of the folder
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        same = dense(pixels).logits.argmax(-1) == pruned(pixels).logits.argmax(-1)
    return float(same.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calibration_images")
    parser.add_argument("output")
    parser.add_argument("--channel-sparsity", type=float, default=0.3)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--method", default="osscar")
    parser.add_argument("--check-images", default=None)
    args = parser.parse_args()

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    dense = copy.deepcopy(model) if args.check_images else None
    config = OsscarConfig(channel_sparsity=args.channel_sparsity, dataset=args.calibration_images,
                          num_samples=args.num_samples, method=args.method, batch_size=32)
    pruner = OsscarPruner(config)
    pruner.prune(model, processor)
    report = pruner.report
    print(f"parameters {report.parameters_before:,} -> {report.parameters_after:,}, multiply-adds per image "
          f"{report.budget['multiply_adds_before']:,} -> {report.budget['multiply_adds_after']:,}")
    if dense is not None:
        print(f"top-1 agreement with the dense model: {top1_agreement(dense, model, processor, args.check_images):.1%}")
    save_pruned(model, args.output, tokenizer=processor)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
