"""CNN channel pruning through transformers' vision classes (issue 15): tiny random ResNets (bottleneck and basic
blocks) and MobileNetV2, random-pixel images."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForImageClassification

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.arch import get_submodule
from osscar_hf.arch.vision import get_vision_spec
from osscar_hf.errors import SaveError
from osscar_hf.io.save import save_pruned
from osscar_hf import methods
from osscar_hf.methods import GRAM
from osscar_hf.methods.scores import Magnitude
from tests.vision_models import KINDS, image_processor, make_cnn, masked_dense, pixels, random_images

IMAGES = random_images(12)


def _config(**overrides) -> OsscarConfig:
    fields = dict(channel_sparsity=0.25, dataset=IMAGES, num_samples=12, device="cpu", batch_size=4)
    return OsscarConfig(**{**fields, **overrides})


def _prune(model: nn.Module, **overrides) -> OsscarPruner:
    pruner = OsscarPruner(_config(**overrides))
    pruner.prune(model, image_processor(), progress=False)
    return pruner


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["osscar", "magnitude", "wanda_sp"])
def test_pruned_logits_equal_the_masked_dense_model(kind, method):
    dense = make_cnn(kind)
    model = copy.deepcopy(dense)
    pruner = _prune(model, method=method)
    report = pruner.report
    assert all(p.solved and p.kept < p.structures for b in report.blocks for p in b.problems)
    masked = masked_dense(dense, model, report)
    x = pixels(random_images(3, seed=1))
    with torch.no_grad():
        pruned_logits, masked_logits = model(x).logits, masked(x).logits
        dense_logits = dense(x).logits
    torch.testing.assert_close(pruned_logits, masked_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pruned_logits, dense_logits, atol=1e-3)  # something was removed


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_parameters_and_uniform_widths(kind):
    model = make_cnn(kind)
    dense_widths = [[get_submodule(get_submodule(model, path), p.consumer).in_channels
                     for p in get_vision_spec(model).layout(get_submodule(model, path))]
                    for path in get_vision_spec(model).block_paths(model)]
    pruner = _prune(model)
    report = pruner.report
    assert report.parameters_after < report.parameters_before
    assert report.parameters_after == sum(p.numel() for p in model.parameters())
    assert report.budget["multiply_adds_after"] < report.budget["multiply_adds_before"]
    expected = [[w - round(w * 0.25) for w in widths] for widths in dense_widths]
    assert [b["channels"] for b in report.block_shapes] == expected


def test_refit_lowers_the_reconstruction_error():
    model = make_cnn("bottleneck")
    report = _prune(model).report
    for block in report.blocks:
        for problem in block.problems:
            assert problem.relative_error <= problem.relative_error_masked + 1e-9


def _duplicate_channel(model: nn.Module, source: int, copy_to: int) -> None:
    """In every bottleneck, make conv2's output channel ``copy_to`` an exact copy of ``source`` (weights and batch
    norm), and give both the largest conv3 columns, so that a magnitude rule would keep both; every channel alive."""
    spec = get_vision_spec(model)
    with torch.no_grad():
        for path in spec.block_paths(model):
            layer = get_submodule(model, path).layer
            conv2, norm2, conv3 = layer[1].convolution, layer[1].normalization, layer[2].convolution
            norm2.bias.fill_(1.0)  # no channel nearly dead (removing one would be almost free)
            conv2.weight[copy_to] = conv2.weight[source]
            for tensor in (norm2.weight, norm2.bias, norm2.running_mean, norm2.running_var):
                tensor[copy_to] = tensor[source]
            conv3.weight[:, [source, copy_to]] *= 3


@pytest.mark.parametrize("method", ["osscar", "magnitude"])
def test_a_duplicated_channel_is_the_one_removed(method):
    """conv3's inputs hold two identical channels: removing one of them costs nothing once conv3 is refit, so the
    objective picks one of the pair; magnitude (the pair has the largest columns) keeps both, and so would any rule
    that ignores the data (the pair is not at either end)."""
    model = make_cnn("bottleneck")
    _duplicate_channel(model, source=1, copy_to=2)
    # 4 inner channels per first-stage bottleneck, one removed: only the second problem (conv3) is checked.
    # A light ridge: the damping pulls the refit toward the dense weights, which makes even a duplicate cost something.
    report = _prune(model, channel_sparsity=0.25, method=method, damping=1e-4).report
    removed = [sorted(set(range(p.structures)) - set(p.kept_indices)) for b in report.blocks for p in b.problems[1:]]
    first_stage = removed[:2]
    if method == "osscar":
        assert all(len(r) == 1 and r[0] in (1, 2) for r in first_stage), removed
    else:
        assert all(r[0] not in (1, 2) for r in first_stage), removed


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_give_identical_logits(kind, tmp_path):
    model = make_cnn(kind)
    _prune(model)
    folder = save_pruned(model, tmp_path / "pruned")
    config = (folder / "config.json").read_text()
    assert '"quant_method": "osscar"' in config and '"channels"' in config  # the osscar format, widths per block
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    x = pixels(random_images(2, seed=3))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_formats_that_cannot_hold_a_pruned_cnn_are_refused(tmp_path):
    model = make_cnn("basic")
    _prune(model)
    with pytest.raises(SaveError, match="no field of the stock ResNetConfig sets a residual block's inner widths"):
        save_pruned(model, tmp_path / "stock", format="stock")
    with pytest.raises(SaveError, match="the remote-code format holds language models only so far"):
        save_pruned(model, tmp_path / "remote", format="remote_code")
    assert not any(tmp_path.iterdir())


def test_model_card_and_report_of_a_pruned_cnn(tmp_path):
    model = make_cnn("bottleneck")
    pruner = _prune(model)
    folder = save_pruned(model, tmp_path / "pruned")
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "structured-pruning" in card
    assert "AutoModelForImageClassification.from_pretrained" in card
    assert "| 0 | 3 / 4, 3 / 4 |" in card  # block 0: both inner widths of a bottleneck
    assert "12 images were used, drawn with seed 0" in card and "32x32 pixel arrays" in card
    assert "| multiply-adds per image (convolutions and linears, at 32x32) |" in card
    data = json.loads(pruner.report.to_json(tmp_path / "report.json").read_text())
    assert data["blocks"][0]["problems"][0]["kept"] == 3
    assert data["calibration"] == {"num_samples": 12, "image_size": [32, 32]}
    assert data["budget"]["params_after"] == pruner.report.parameters_after


def test_magnitude_needs_no_images_nor_processor(tmp_path):
    model = make_cnn("mobilenet_v2")
    pruner = OsscarPruner(OsscarConfig(channel_sparsity=0.5, method="magnitude", device="cpu"))
    pruner.prune(model, progress=False)
    assert pruner.report.calibration == {"num_samples": 0, "image_size": None}
    assert pruner.report.budget["multiply_adds_after"] < pruner.report.budget["multiply_adds_before"]
    card = (save_pruned(model, tmp_path / "pruned") / "README.md").read_text()
    assert "None: method `magnitude` reads no calibration data." in card


class _RecordGram(Magnitude):
    """Magnitude's selection, keeping every problem's statistics (to check what the pipeline accumulated)."""

    name = "record_gram_for_tests"
    statistics = frozenset({GRAM})
    seen: list = []

    def select(self, problem):
        type(self).seen.append((problem.group_size, problem.statistics.gram.clone()))
        return super().select(problem)


def test_the_pipeline_gram_is_that_of_the_unfolded_consumer_input(monkeypatch):
    """Block 0's first problem: the Gram the block loop hands the method is the mean outer product of conv2's
    unfolded input patches over every calibration image and output position (brute force over positions)."""
    monkeypatch.setitem(methods._METHODS, _RecordGram.name, _RecordGram)  # registered for this test only
    monkeypatch.setattr(_RecordGram, "seen", [])
    dense = make_cnn("bottleneck")
    conv2 = dense.resnet.encoder.stages[0].layers[0].layer[1].convolution
    inputs = []
    handle = conv2.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        dense(pixels(IMAGES))
    handle.remove()
    x = torch.nn.functional.pad(inputs[0].double(), (1, 1, 1, 1))
    patches = [x[n, :, i:i + 3, j:j + 3].reshape(-1) for n in range(x.shape[0])
               for i in range(x.shape[2] - 2) for j in range(x.shape[3] - 2)]
    expected = sum(torch.outer(v, v) for v in patches) / len(patches)
    _prune(dense, method=_RecordGram.name)
    group_size, gram = _RecordGram.seen[0]
    assert group_size == 9
    torch.testing.assert_close(gram.double(), expected, rtol=1e-4, atol=1e-5)
