"""CNN channel pruning refuses bad input with a clear error, before anything expensive, leaving the model as it was;
and reads its calibration images from a list, a folder or a datasets.Dataset, seeded."""

from __future__ import annotations

import pytest
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.calibration_images import load_images
from osscar_hf.errors import CalibrationDataError, OsscarConfigError, UnsupportedModelError
from osscar_hf.io.save import save_pruned
from tests.conftest import make_model, make_tokenizer
from tests.vision_models import image_processor, make_cnn, random_images

IMAGES = random_images(4)


def _refused(model, config: OsscarConfig, processor, error: type[Exception], match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        OsscarPruner(config).prune(model, processor, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model.config, "quantization_config", None) is None


def _config(**fields) -> OsscarConfig:
    return OsscarConfig(**{"channel_sparsity": 0.25, "dataset": IMAGES, "num_samples": 4, "device": "cpu", **fields})


def test_a_text_tokenizer_for_an_image_model():
    _refused(make_cnn("bottleneck"), _config(), make_tokenizer(), CalibrationDataError,
             "got a text tokenizer \\(TokenizersBackend\\) for an image model: it needs the model's image "
             "processor")


def test_no_processor_or_something_else():
    _refused(make_cnn("basic"), _config(), None, CalibrationDataError, "needs the model's image processor.*got "
                                                                       "NoneType")


@pytest.mark.parametrize("dataset, match", [
    (None, "OsscarConfig.dataset is required to calibrate an image model"),
    (["some text", "more text"], "dataset holds texts, but an image model calibrates on a non-empty list of PIL"),
    ("/nonexistent/folder", "is not a folder of images"),
])
def test_no_images(dataset, match):
    _refused(make_cnn("mobilenet_v2"), _config(dataset=dataset), image_processor(), CalibrationDataError, match)


def test_an_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no image here")
    _refused(make_cnn("bottleneck"), _config(dataset=tmp_path), image_processor(), CalibrationDataError,
             "holds no image files")


def test_language_model_budgets_on_a_cnn():
    _refused(make_cnn("bottleneck"), OsscarConfig(mlp_sparsity=0.5, dataset=IMAGES, device="cpu"), image_processor(),
             OsscarConfigError, r"mlp_sparsity=0.5: language-model budgets, but model_type 'resnet' is a CNN, "
                                r"pruned by channel_sparsity")


def test_channel_sparsity_on_a_language_model(calibration_texts):
    model = make_model("llama-gqa")
    _refused(model, OsscarConfig(channel_sparsity=0.3, dataset=calibration_texts, device="cpu"), make_tokenizer(),
             OsscarConfigError, "channel_sparsity=0.3 prunes a CNN's channels, but model_type 'llama' is a language "
                                "model")


def test_channel_sparsity_excludes_the_language_fields():
    with pytest.raises(OsscarConfigError, match="channel_sparsity=0.3 .* excludes the language-model budgets, but "
                                                "mlp_sparsity=0.5 was given too"):
        OsscarConfig(channel_sparsity=0.3, mlp_sparsity=0.5)


def test_a_method_that_adds_a_bias():
    _refused(make_cnn("basic"), _config(method="flap"), image_processor(), OsscarConfigError,
             "method 'flap' compensates with a consumer bias.*use one of \\['osscar', 'obs_greedy', 'magnitude', "
             "'wanda_sp'\\]")


def test_a_sparsity_that_keeps_no_channel():
    _refused(make_cnn("bottleneck"), _config(channel_sparsity=0.9), image_processor(), OsscarConfigError,
             "channel_sparsity=0.9 keeps no channel of the 4 of resnet.encoder.stages.0.layers.0.layer.1.convolution")


def test_a_model_type_it_cannot_prune():
    model = ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    _refused(model, _config(), image_processor(), UnsupportedModelError,
             "osscar_hf does not support model_type 'convnext' \\(CNNs pruned by channel_sparsity: mobilenet_v2, "
             "resnet, timm_wrapper\\); supported model types: ")


def test_a_pruned_cnn_is_not_pruned_again():
    model = make_cnn("basic")
    OsscarPruner(_config()).prune(model, image_processor(), progress=False)
    with pytest.raises(UnsupportedModelError, match="already pruned by osscar_hf"):
        OsscarPruner(_config()).prune(model, image_processor(), progress=False)


def test_streaming_a_cnn_checkpoint_is_refused(tmp_path):
    model = make_cnn("basic")
    OsscarPruner(_config()).prune(model, image_processor(), progress=False)
    folder = save_pruned(model, tmp_path / "cnn")
    dense = make_cnn("basic")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="model_type 'resnet' is a CNN: osscar_hf prunes it in memory"):
        OsscarPruner(_config()).prune_checkpoint(tmp_path / "dense", tmp_path / "out")
    assert folder.exists() and not (tmp_path / "out").exists()


def test_calibration_images_from_a_folder_and_a_dataset_are_seeded(tmp_path):
    import datasets

    images = random_images(6, seed=5)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    from_folder = load_images(tmp_path, num_samples=3, seed=1)
    again = load_images(str(tmp_path), num_samples=3, seed=1)
    assert [im.tobytes() for im in from_folder] == [im.tobytes() for im in again]
    other = load_images(tmp_path, num_samples=3, seed=2)
    assert [im.tobytes() for im in other] != [im.tobytes() for im in from_folder]
    table = datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))
    from_table = load_images(table, num_samples=3, seed=1, image_column="img")
    assert [im.tobytes() for im in from_table] == [im.tobytes() for im in from_folder]
    with pytest.raises(CalibrationDataError, match="no image column image_column='image'; its columns are \\['img'\\]"):
        load_images(table, num_samples=3, seed=1)


def test_a_dataset_with_an_image_column_calibrates_a_cnn():
    import datasets

    table = datasets.Dataset.from_dict({"picture": random_images(4)},
                                       features=datasets.Features({"picture": datasets.Image()}))
    model = make_cnn("mobilenet_v2")
    pruner = OsscarPruner(_config(dataset=table, image_column="picture"))
    pruner.prune(model, image_processor(), progress=False)
    assert pruner.report.calibration == {"num_samples": 4, "image_size": [32, 32]}
