"""CNN channel pruning of timm models through transformers' ``TimmWrapperForImageClassification`` (issue 15):
tiny random timm ResNets (bottleneck and basic blocks), MobileNetV2 and EfficientNet-Lite, random-pixel images.
Skipped where timm is not installed (it is not a CI dependency)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("timm")

from transformers import AutoModelForImageClassification  # noqa: E402

from osscar_hf import OsscarConfig, OsscarPruner  # noqa: E402
from osscar_hf.arch import get_submodule  # noqa: E402
from osscar_hf.arch.timm_vision import TIMM_EFFICIENTNET, TIMM_RESNET  # noqa: E402
from osscar_hf.arch.vision import get_vision_spec, is_vision_model  # noqa: E402
from osscar_hf.errors import UnsupportedModelError  # noqa: E402
from osscar_hf.io.save import save_pruned  # noqa: E402
from tests.timm_models import TIMM_KINDS, make_timm  # noqa: E402
from tests.vision_models import image_processor, masked_dense, pixels, random_images  # noqa: E402

IMAGES = random_images(12)
SPECS = {"timm_bottleneck": (TIMM_RESNET, 4), "timm_basic": (TIMM_RESNET, 4), "timm_mobilenetv2": (TIMM_EFFICIENTNET, 11),
         "timm_efficientnet_lite": (TIMM_EFFICIENTNET, 10)}


def _prune(model, **overrides) -> OsscarPruner:
    fields = dict(channel_sparsity=0.25, dataset=IMAGES, num_samples=12, device="cpu", batch_size=4)
    pruner = OsscarPruner(OsscarConfig(**{**fields, **overrides}))
    pruner.prune(model, image_processor(), progress=False)
    return pruner


@pytest.mark.parametrize("kind", TIMM_KINDS)
def test_timm_specs_describe_the_tiny_models(kind):
    model = make_timm(kind)
    spec, blocks = SPECS[kind]
    assert get_vision_spec(model) is spec and get_vision_spec(model.config) is spec
    spec.check_model(model)
    assert len(spec.block_paths(model)) == blocks


@pytest.mark.parametrize("kind", TIMM_KINDS)
@pytest.mark.parametrize("method", ["osscar", "magnitude"])
def test_timm_pruned_logits_equal_the_masked_dense_model(kind, method):
    dense = make_timm(kind)
    model = copy.deepcopy(dense)
    report = _prune(model, method=method).report
    problems = [p for b in report.blocks for p in b.problems]
    assert problems and all(p.solved and p.kept < p.structures for p in problems)
    assert report.parameters_after < report.parameters_before
    assert report.budget["multiply_adds_after"] < report.budget["multiply_adds_before"]
    x = pixels(random_images(3, seed=1))
    with torch.no_grad():
        pruned_logits, masked_logits = model(x).logits, masked_dense(dense, model, report)(x).logits
        dense_logits = dense(x).logits
    torch.testing.assert_close(pruned_logits, masked_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pruned_logits, dense_logits, atol=1e-3)


@pytest.mark.parametrize("kind", TIMM_KINDS)
@pytest.mark.parametrize("target", ["params", "flops"])
def test_timm_global_budget_meets_its_target_and_equals_the_masked_dense_model(kind, target):
    dense = make_timm(kind)
    model = copy.deepcopy(dense)
    report = _prune(model, channel_sparsity=0.0, sparsity=0.4, sparsity_target=target, num_samples=8,
                    allocation_samples=4).report
    budget = report.budget
    assert budget["allocation"] == "osscar" and budget["blocks_after"] <= budget["blocks_goal"]
    assert budget["blocks_after"] > 0.9 * budget["blocks_goal"]
    if target == "params":
        blocks = get_vision_spec(model).block_paths(model)
        assert budget["blocks_after"] == sum(p.numel() for path in blocks for p in get_submodule(model, path).parameters())
    x = pixels(random_images(3, seed=1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, masked_dense(dense, model, report)(x).logits, rtol=1e-4, atol=1e-4)


def test_timm_efficientnet_lite_keeps_its_same_padded_depthwise_convolutions():
    """tf_efficientnet_lite's stride-2 depthwise convolutions are timm's Conv2dSame (padding in forward): sliced as
    producers; the first block (DepthwiseSeparableConv) has no problem and keeps its widths."""
    dense = make_timm("timm_efficientnet_lite")
    model = copy.deepcopy(dense)
    report = _prune(model).report
    assert report.blocks[0].problems == [] and report.block_shapes[0] == {"channels": []}

    def same_padded(network):
        return [b.conv_dw for b in network.timm_model.blocks.modules()
                if type(b).__name__ == "InvertedResidual" and type(b.conv_dw).__name__ == "Conv2dSame"]

    pruned, original = same_padded(model), same_padded(dense)
    assert pruned and all(m.groups == m.in_channels == m.out_channels == m.weight.shape[0] for m in pruned)
    assert all(p.out_channels == o.out_channels - round(o.out_channels * 0.25) for p, o in zip(pruned, original))
    widths = [b["channels"] for b in report.block_shapes[1:]]
    expansions = [get_submodule(model, p).conv_pwl.in_channels for p in TIMM_EFFICIENTNET.block_paths(model)[1:]]
    assert [w[0] for w in widths] == expansions


@pytest.mark.parametrize("kind", TIMM_KINDS)
def test_timm_save_and_reload_give_identical_logits(kind, tmp_path):
    model = make_timm(kind)
    _prune(model)
    folder = save_pruned(model, tmp_path / "pruned")
    config = (folder / "config.json").read_text()
    assert '"quant_method": "osscar"' in config and '"timm_wrapper"' in config
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(reloaded).__name__ == "TimmWrapperForImageClassification"
    x = pixels(random_images(2, seed=3))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_timm_squeeze_excitation_is_refused_and_the_model_untouched():
    model = make_timm("timm_efficientnet_se")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.0\.se to be absent or nn.Identity \(it is a "
                                                    r"SqueezeExcite"):
        _prune(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)


def test_a_timm_model_without_a_spec_is_refused_by_name():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=5,
                               model_args={"depth": 1, "img_size": 32, "patch_size": 16})
    model = TimmWrapperForImageClassification(config)
    assert is_vision_model(model)  # its model type: the CNN path, which names what it wraps
    with pytest.raises(UnsupportedModelError, match="wraps a VisionTransformer.*wrapping EfficientNet, ResNet"):
        _prune(model)


def test_timm_magnitude_needs_no_images_nor_processor():
    """Without calibration pixels, multiply-adds are counted at the timm network's own input size (its
    ``pretrained_cfg``: a TimmWrapperConfig has neither ``image_size`` nor ``num_channels``)."""
    model = make_timm("timm_efficientnet_lite")
    pruner = OsscarPruner(OsscarConfig(channel_sparsity=0.5, method="magnitude", device="cpu"))
    pruner.prune(model, progress=False)
    assert pruner.report.calibration == {"num_samples": 0, "image_size": None}
    before, after = pruner.report.budget["multiply_adds_before"], pruner.report.budget["multiply_adds_after"]
    assert after < before and before > 20e6  # at 224x224 (at 32x32 it is about 1M)


def test_timm_folder_through_the_command_line(tmp_path, capsys):
    """``osscar-hf prune`` on a timm folder: its image processor (TimmWrapperImageProcessor) is the ``pretrained_cfg``
    in ``config.json``; the folder it writes holds the same pruning as in memory."""
    from transformers import AutoImageProcessor

    from osscar_hf import cli
    from osscar_hf.calibration_images import load_images
    from osscar_hf.io.load import load_image_model

    model = make_timm("timm_efficientnet_lite", seed=1)
    model.config.pretrained_cfg = {**model.timm_model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    model.save_pretrained(tmp_path / "lite")
    (tmp_path / "images").mkdir()
    for i, image in enumerate(random_images(6, seed=2)):
        image.save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "pruned"
    assert cli.main(["--log-level", "WARNING", "prune", str(tmp_path / "lite"), "--channel-sparsity", "0.25",
                     "--dataset", str(tmp_path / "images"), "--num-samples", "6", "--device", "cpu",
                     "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    processor = AutoImageProcessor.from_pretrained(tmp_path / "lite")
    expected = make_timm("timm_efficientnet_lite", seed=1)
    OsscarPruner(OsscarConfig(channel_sparsity=0.25, num_samples=6, device="cpu",
                              dataset=load_images(tmp_path / "images", num_samples=6, seed=0))).prune(
        expected, processor, progress=False)
    reloaded, _ = load_image_model(out, device="cpu")
    x = processor(images=random_images(2, seed=4), return_tensors="pt")["pixel_values"]
    assert x.shape[-1] == 32
    assert torch.equal(AutoImageProcessor.from_pretrained(out)(images=random_images(2, seed=4))["pixel_values"], x)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected(pixel_values=x).logits,
                                   rtol=1e-5, atol=1e-5)
