"""Calibration images for a CNN: a list of PIL images, a folder of images or a ``datasets.Dataset`` with an image
column, ``num_samples`` of them drawn with ``seed``, turned into pixel values by the model's image processor."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationDataError

__all__ = ["IMAGE_SUFFIXES", "check_image_processor", "check_image_source", "load_held_out_images", "load_images",
           "pixel_values"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_ACCEPTED = ("a non-empty list of PIL images, a folder of image files "
             f"({', '.join(IMAGE_SUFFIXES)}), or a datasets.Dataset with an image column (image_column)")
_PROCESSOR = ("the model's image processor (transformers.AutoImageProcessor.from_pretrained(...), or an image "
              "processor class built in code)")


def check_image_processor(processor: Any) -> None:
    """Refuse anything but an image processor (or a processor holding one), naming what was given."""
    from transformers import PreTrainedTokenizerBase
    from transformers.image_processing_base import ImageProcessingMixin

    if isinstance(processor, PreTrainedTokenizerBase):
        raise CalibrationDataError(f"got a text tokenizer ({type(processor).__name__}) for an image model: it needs "
                                   f"{_PROCESSOR}")
    if isinstance(getattr(processor, "image_processor", None), ImageProcessingMixin):
        return
    if not isinstance(processor, ImageProcessingMixin):
        raise CalibrationDataError(f"an image model needs {_PROCESSOR} to turn the calibration images into pixel "
                                   f"values, got {type(processor).__name__}")


def _is_pil_image(value: Any) -> bool:
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def _folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationDataError(f"dataset folder {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _open(item: Any) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationDataError("reading calibration images needs Pillow: pip install 'osscar-hf[vision]'") from None

    return Image.open(item) if isinstance(item, (str, os.PathLike)) else item


def _source(dataset: Any, image_column: str) -> tuple[int, Callable[[list[int]], list[Any]]]:
    """How many images ``dataset`` offers and how to take some of them by index, or a clear error."""
    if dataset is None:
        raise CalibrationDataError(f"OsscarConfig.dataset is required to calibrate an image model: give {_ACCEPTED}")
    if isinstance(dataset, (str, os.PathLike)):
        folder = Path(dataset)
        if not folder.is_dir():
            raise CalibrationDataError(f"dataset={os.fspath(dataset)!r} is not a folder of images; an image model "
                                       f"calibrates on {_ACCEPTED}")
        files = _folder_images(folder)
        return len(files), lambda chosen: [_open(files[i]) for i in chosen]
    if isinstance(dataset, (list, tuple)) and dataset and all(_is_pil_image(v) for v in dataset):
        return len(dataset), lambda chosen: [dataset[i] for i in chosen]
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):
        if image_column not in dataset.column_names:
            raise CalibrationDataError(f"dataset (a datasets.Dataset) has no image column image_column="
                                       f"{image_column!r}; its columns are {dataset.column_names}")
        return len(dataset), lambda chosen: [_open(r) for r in dataset.select(chosen)[image_column]]
    texts = isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], str)
    kind = "texts" if texts else f"a {type(dataset).__name__}"
    raise CalibrationDataError(f"dataset holds {kind}, but an image model calibrates on {_ACCEPTED}")


def check_image_source(dataset: Any, image_column: str = "image") -> None:
    """Refuse, without opening any image, calibration data that offers no images (see :func:`load_images`)."""
    count, _ = _source(dataset, image_column)
    if count == 0:
        raise CalibrationDataError("the calibration dataset holds no images")


def load_images(dataset: Any, *, num_samples: int, seed: int, image_column: str = "image") -> list[Any]:
    """``num_samples`` RGB images of ``dataset``, drawn without replacement with ``seed`` (all of them, in order,
    when there are no more; a warning says so)."""
    count, take = _source(dataset, image_column)
    if count == 0:
        raise CalibrationDataError("the calibration dataset holds no images")
    if count < num_samples:
        logger.warning("num_samples=%d but the calibration data holds %d images: using all of them", num_samples,
                       count)
        chosen = list(range(count))
    else:
        chosen = sorted(random.Random(seed).sample(range(count), num_samples))
    return _rgb(take(chosen))


def load_held_out_images(dataset: Any, *, num_samples: int, held_out: int, seed: int, image_column: str = "image"
                         ) -> tuple[list[Any], list[Any]]:
    """The calibration images of :func:`load_images` (the same ones, for the same seed) and ``held_out`` other
    images of ``dataset`` (drawn with ``seed + 1``), or a clear error when it holds fewer than both together."""
    count, take = _source(dataset, image_column)
    if count < num_samples + held_out:
        raise CalibrationDataError(
            f"the global allocation measures on allocation_samples={held_out} held-out images that are not calibration "
            f"images, but the dataset holds {count} images and num_samples={num_samples} of them calibrate: give at "
            f"least {num_samples + held_out} images, lower num_samples or allocation_samples, or use "
            "allocation='uniform'")
    chosen = sorted(random.Random(seed).sample(range(count), num_samples))
    taken = set(chosen)
    rest = [i for i in range(count) if i not in taken]
    others = sorted(random.Random(seed + 1).sample(rest, held_out))
    return _rgb(take(chosen)), _rgb(take(others))


def _rgb(images: list[Any]) -> list[Any]:
    bad = [i for i, image in enumerate(images) if not _is_pil_image(image)]
    if bad:
        raise CalibrationDataError(f"calibration rows {bad[:5]} are not images (got {type(images[bad[0]]).__name__})")
    return [image.convert("RGB") for image in images]


def pixel_values(images: list[Any], processor: Any, *, num_channels: int, chunk: int = 64) -> torch.Tensor:
    """The processor's ``pixel_values`` of ``images`` (N, C, H, W), float32, checked against the model's
    ``num_channels``."""
    batches = []
    for start in range(0, len(images), chunk):
        out = processor(images=images[start:start + chunk], return_tensors="pt")
        values = out["pixel_values"] if "pixel_values" in out else None
        if not isinstance(values, torch.Tensor) or values.dim() != 4:
            raise CalibrationDataError(f"the image processor {type(processor).__name__} gave no (N, C, H, W) "
                                       "pixel_values tensor")
        batches.append(values.float())
    values = torch.cat(batches)
    if values.shape[1] != num_channels:
        raise CalibrationDataError(f"the image processor gives {values.shape[1]} channels per pixel, but the model "
                                   f"takes num_channels={num_channels}: is it the model's own processor?")
    return values
