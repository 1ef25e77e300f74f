"""Tiny random CNNs of transformers' vision classes, random-pixel images and an offline image processor, and the
masked dense model a pruned CNN must equal (tests of CNN channel pruning)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTImageProcessorPil,
)

from osscar_hf.arch import get_submodule
from osscar_hf.arch.vision import get_vision_spec

KINDS = ("bottleneck", "basic", "mobilenet_v2")
IMAGE_SIZE = 32


def make_cnn(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random CNN in eval mode, with He-initialised convolutions and random batch-norm statistics (so that
    activations keep their scale through the blocks, as in a trained network)."""
    torch.manual_seed(seed)
    if kind == "mobilenet_v2":
        model = MobileNetV2ForImageClassification(MobileNetV2Config(
            depth_multiplier=0.25, min_depth=8, image_size=IMAGE_SIZE, num_labels=5))
    else:
        model = ResNetForImageClassification(ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], layer_type=kind, num_labels=5))
    return randomize(model, seed)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised convolutions and random batch-norm parameters and statistics; ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


def random_images(count: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def image_processor() -> ViTImageProcessorPil:
    return ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def pixels(images: list[Image.Image]) -> torch.Tensor:
    return image_processor()(images=images, return_tensors="pt")["pixel_values"]


def masked_dense(dense: nn.Module, pruned: nn.Module, report) -> nn.Module:
    """``dense`` with every pruned block's removed channels masked: the producers' batch norms give them zero
    (weight and bias 0, so the activation after them is 0), and each consumer holds the pruned model's (refit) weight
    on the kept input channels and zeros on the others. A producer that is also a consumer (a bottleneck's conv2)
    keeps the refit columns on every output channel, the removed ones masked by its batch norm."""
    masked = copy.deepcopy(dense)
    spec = get_vision_spec(masked)
    with torch.no_grad():
        for path, block_report in zip(spec.block_paths(masked), report.blocks):
            block, pruned_block = get_submodule(masked, path), get_submodule(pruned, path)
            problems = spec.layout(block)
            for k, (problem, consumer_report) in enumerate(zip(problems, block_report.problems)):
                kept = torch.tensor(consumer_report.kept_indices)
                removed = torch.ones(consumer_report.structures, dtype=torch.bool)
                removed[kept] = False
                for producer in problem.producers:
                    module = get_submodule(block, producer)
                    if isinstance(module, nn.BatchNorm2d):
                        module.weight[removed] = 0
                        module.bias[removed] = 0
                consumer = get_submodule(block, problem.consumer)
                refit = get_submodule(pruned_block, problem.consumer).weight
                weight = torch.zeros_like(consumer.weight)
                later = [p for p in problems[k + 1:] if problem.consumer in p.producers]
                rows = (torch.tensor(block_report.problems[problems.index(later[0])].kept_indices)
                        if later else torch.arange(consumer.out_channels))
                weight[rows.unsqueeze(1), kept.unsqueeze(0)] = refit
                consumer.weight.copy_(weight)
    return masked
