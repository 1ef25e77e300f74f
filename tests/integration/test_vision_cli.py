"""``osscar-hf prune`` on a folder holding a CNN and its image processor."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoImageProcessor

from osscar_hf import OsscarConfig, OsscarPruner, cli
from osscar_hf.io.load import load_image_model
from tests.vision_models import image_processor, make_cnn, pixels, random_images


@pytest.fixture()
def cnn_folder(tmp_path):
    model = make_cnn("bottleneck", seed=1)
    model.save_pretrained(tmp_path / "resnet")
    image_processor().save_pretrained(tmp_path / "resnet")
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(random_images(6, seed=2)):
        image.save(images / f"{i}.png")
    return tmp_path


def _run(argv: list[str]) -> int:
    return cli.main(["--log-level", "WARNING", *argv])


def test_prune_a_cnn_folder(cnn_folder, capsys):
    out = cnn_folder / "pruned"
    assert _run(["prune", str(cnn_folder / "resnet"), "--channel-sparsity", "0.25", "--dataset",
                 str(cnn_folder / "images"), "--num-samples", "6", "--device", "cpu", "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "osscar_report.json", "preprocessor_config.json", "README.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "osscar_report.json").read_text())
    assert [p["kept"] for p in report["blocks"][0]["problems"]] == [3, 3]
    assert "image-classification" in (out / "README.md").read_text()
    # the folder holds the same pruning done in memory
    from osscar_hf.calibration_images import load_images

    expected = make_cnn("bottleneck", seed=1)
    config = OsscarConfig(channel_sparsity=0.25, dataset=load_images(cnn_folder / "images", num_samples=6, seed=0),
                          num_samples=6, device="cpu")
    # the processor the command line loads (with torchvision installed, AutoImageProcessor picks the torchvision
    # ViTImageProcessor, whose resize differs from ViTImageProcessorPil's in the last digits)
    processor = AutoImageProcessor.from_pretrained(cnn_folder / "resnet")
    OsscarPruner(config).prune(expected, processor, progress=False)
    reloaded, _ = load_image_model(out, device="cpu")
    x = pixels(random_images(2, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--stream"], "--stream does not apply to a CNN yet"),
    (["--dataset", "nowhere/at/all"], "is not a folder of images"),
])
def test_prune_a_cnn_refuses_before_loading(cnn_folder, capsys, extra, message):
    argv = ["prune", str(cnn_folder / "resnet"), "--channel-sparsity", "0.25", "--dataset", str(cnn_folder / "images"),
            "--device", "cpu", "--output", str(cnn_folder / "out"), *extra]
    assert _run(argv) != 0
    assert message in capsys.readouterr().err
    assert not (cnn_folder / "out").exists()


def test_eval_refuses_a_cnn_folder(cnn_folder, capsys):
    assert _run(["eval", str(cnn_folder / "resnet"), "--dataset", "wikitext2"]) != 0
    assert "is a CNN (model_type 'resnet'): eval measures the perplexity of language models" in capsys.readouterr().err
