"""The pieces of CNN channel pruning on their own: conv Gram rows, channel surgery, the vision specs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from osscar_hf.arch.vision import (
    MOBILENET_V2, RESNET, ChannelProblem, VisionSpec, get_vision_spec, register_vision_architecture,
)
from osscar_hf.channel_surgery import consumer_ops, keep_input_channels, keep_output_channels
from osscar_hf.errors import SurgeryError, UnsupportedModelError
from osscar_hf.solver import accumulate_gram, conv_rows, new_gram


def _brute_force_gram(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Sum over images and output positions of the outer product of each patch (channel-major), over their count."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    padded = F.pad(x, (pw, pw, ph, ph)).double()
    out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    p = x.shape[1] * kh * kw
    total, count = torch.zeros(p, p, dtype=torch.float64), 0
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = padded[n, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
                v = patch.reshape(-1)
                total += torch.outer(v, v)
                count += 1
    return total / count


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 2, 2), ((3, 1), (2, 1), (1, 0), 1),
])
def test_conv_gram_is_the_sum_of_patch_outer_products(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    H, count = new_gram(conv.weight[0].numel()), 0
    batches = [torch.randn(2, 3, 7, 6), torch.randn(3, 3, 7, 6)]
    for x in batches:
        count = accumulate_gram(H, count, consumer_ops(conv).rows(conv, x))
    expected = _brute_force_gram(torch.cat(batches), conv)
    torch.testing.assert_close(H.double(), expected, rtol=1e-5, atol=1e-5)
    # and the rows are what the convolution multiplies: conv(x) = X @ W.T, position by position
    x = batches[0]
    y = conv(x)
    rows = consumer_ops(conv).rows(conv, x) @ consumer_ops(conv).matrix(conv).T
    torch.testing.assert_close(rows, y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), rtol=1e-5, atol=1e-5)


def test_conv_rows_refuse_a_non_image_tensor():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        conv_rows(torch.randn(4, 3), (1, 1))


def test_channel_surgery_equals_masking():
    """Keeping channels of a producer conv, its batch norm, a depthwise conv, and the consumer's inputs gives the
    outputs of the dense path with the other channels zeroed."""
    torch.manual_seed(0)
    expand, norm = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6).eval()
    depthwise, consumer = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 3, 3, padding=1, bias=True)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5)
    kept = torch.tensor([0, 2, 5])
    mask = torch.zeros(6)
    mask[kept] = 1
    with torch.no_grad():
        expected = consumer(depthwise(norm(expand(x))) * mask.view(1, -1, 1, 1))
        for module in (expand, norm, depthwise):
            keep_output_channels(module, kept)
        keep_input_channels(consumer, kept)
        got = consumer(depthwise(norm(expand(x))))
    torch.testing.assert_close(got, expected)
    assert (expand.out_channels, norm.num_features, depthwise.groups, consumer.in_channels) == (3, 3, 3, 3)


def test_refit_weight_is_reshaped_back():
    conv = nn.Conv2d(4, 2, 3, padding=1)
    matrix = torch.randn(2, 2 * 9)
    keep_input_channels(conv, torch.tensor([1, 3]), matrix)
    assert torch.equal(conv.weight, matrix.reshape(2, 2, 3, 3))
    with pytest.raises(SurgeryError, match="expected"):
        keep_input_channels(nn.Conv2d(4, 2, 3), torch.tensor([1, 3]), torch.randn(2, 5))


def test_linear_consumers_and_producers_are_registered_too():
    """A channel problem may also hold linears (tokens as rows, single columns): slicing equals masking."""
    torch.manual_seed(0)
    up, down = nn.Linear(4, 6), nn.Linear(6, 3)
    x = torch.randn(2, 5, 4)
    kept = torch.tensor([1, 2, 4])
    mask = torch.zeros(6)
    mask[kept] = 1
    with torch.no_grad():
        expected = down(torch.relu(up(x)) * mask)
        ops = consumer_ops(down)
        assert ops.rows(down, torch.ones(2, 5, 6)).shape == (10, 6) and ops.group_size(down) == 1
        keep_output_channels(up, kept)
        keep_input_channels(down, kept)
        got = down(torch.relu(up(x)))
    torch.testing.assert_close(got, expected)


def test_surgery_validates_indices_and_module_types():
    conv = nn.Conv2d(4, 4, 1)
    with pytest.raises(SurgeryError, match=r"outside \[0, 4\)"):
        keep_output_channels(conv, torch.tensor([1, 7]))
    assert conv.out_channels == 4
    with pytest.raises(SurgeryError, match="no producer operations are registered for a LayerNorm"):
        keep_output_channels(nn.LayerNorm(4), torch.tensor([0]))
    with pytest.raises(SurgeryError, match="only groups=1 or depthwise"):
        keep_output_channels(nn.Conv2d(4, 8, 1, groups=2), torch.tensor([0]))


def test_a_grouped_convolution_is_refused_as_a_consumer():
    block = nn.Module()
    block.a, block.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2)
    spec = VisionSpec(name="grouped", model_types=("grouped",), blocks=("block",),
                      layouts={"Module": (ChannelProblem("b", ("a",)),)})
    model = nn.Module()
    model.block = block
    with pytest.raises(UnsupportedModelError, match="block.b to be a consumer \\(an nn.Conv2d consumer needs "
                                                    "groups=1"):
        spec.check_model(model)


def test_specs_describe_the_tiny_models():
    from tests.vision_models import make_cnn

    for kind, spec, blocks in (("bottleneck", RESNET, 3), ("basic", RESNET, 3), ("mobilenet_v2", MOBILENET_V2, 16)):
        model = make_cnn(kind)
        assert get_vision_spec(model) is spec
        spec.check_model(model)
        assert len(spec.block_paths(model)) == blocks


def test_a_spec_that_does_not_fit_is_refused_before_any_work():
    from tests.vision_models import make_cnn

    wrong = VisionSpec(name="wrong", model_types=("resnet",), blocks=RESNET.blocks,
                       layouts={"ResNetBottleNeckLayer": (ChannelProblem("layer.1.convolution",
                                                                         ("layer.2.convolution",)),)})
    with pytest.raises(UnsupportedModelError, match=r"layer.2.convolution to have 4 output channels \(it has 16\)"):
        wrong.check_model(make_cnn("bottleneck"))
    with pytest.raises(UnsupportedModelError, match="a channel layout for .* ResNetBasicLayer"):
        wrong.check_model(make_cnn("basic"))


def test_a_conv_subclass_with_its_own_forward_is_refused_as_a_consumer():
    """timm's Conv2dSame pads in forward: its unfold would not be an nn.Conv2d's, so it is not a consumer (it may be a
    producer: slicing its channels is exact)."""

    class PadsInForward(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    block = nn.Module()
    block.a, block.b = PadsInForward(4, 8, 3), PadsInForward(8, 8, 3)
    spec = VisionSpec(name="padded", model_types=("padded",), blocks=("block",),
                      layouts={"Module": (ChannelProblem("b", ("a",)),)})
    model = nn.Module()
    model.block = block
    with pytest.raises(UnsupportedModelError, match="block.b to be a consumer \\(a PadsInForward has its own forward"):
        spec.check_model(model)


def test_specs_of_a_wrapper_type_are_chosen_by_the_wrapped_class():
    from types import SimpleNamespace

    from osscar_hf.arch import vision

    class Alpha(nn.Module):
        pass

    class Beta(nn.Module):
        pass

    def spec(name, wrapped_classes, identities=None):
        return VisionSpec(name=name, model_types=("test_wrapper",), blocks=("inner",), layouts={},
                          wrapped="inner", wrapped_classes=wrapped_classes, identities=identities or {})

    def wrapper(inner):
        model = nn.Module()
        model.inner, model.config = inner, SimpleNamespace(model_type="test_wrapper")
        return model

    saved = dict(vision._VISION)
    try:
        first, second = spec("first", ("Alpha",)), spec("second", ("Beta",))
        register_vision_architecture(first)
        register_vision_architecture(second)
        assert get_vision_spec(wrapper(Alpha())) is first and get_vision_spec(wrapper(Beta())) is second
        with pytest.raises(UnsupportedModelError, match="wraps a Module\\); it prunes test_wrapper models wrapping "
                                                        "Alpha, Beta"):
            get_vision_spec(wrapper(nn.Module()))
        with pytest.raises(ValueError, match="already registered \\(spec 'first'\\)"):
            register_vision_architecture(spec("again", ("Alpha", "Gamma")))
    finally:
        vision._VISION.clear()
        vision._VISION.update(saved)


def test_an_optional_module_on_the_inner_channels_must_be_an_identity():
    block = nn.Module()
    block.a, block.b, block.se = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
    spec = VisionSpec(name="gated", model_types=("gated",), blocks=("block",),
                      layouts={"Module": (ChannelProblem("b", ("a",)),)}, identities={"Module": ("se", "aa")})
    model = nn.Module()
    model.block = block
    with pytest.raises(UnsupportedModelError, match="block.se to be absent or nn.Identity \\(it is a Conv2d"):
        spec.check_model(model)
    block.se = nn.Identity()
    spec.check_model(model)
