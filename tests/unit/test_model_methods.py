"""A pruned model's ``save_pretrained`` and ``push_to_hub`` replace transformers' own on the model object: they
must take every argument transformers' methods take, and pass each one on unchanged."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import PreTrainedModel

from osscar_hf import OsscarConfig
from osscar_hf.errors import SaveError
from osscar_hf.io import save as save_module
from osscar_hf.io.save import attach_run, mark_pruned
from tests.conftest import make_model


def _parameters(method: Any) -> list[inspect.Parameter]:
    """The parameters of one of transformers' methods after ``self`` and the first positional one."""
    return list(inspect.signature(method).parameters.values())[2:]


def _named(method: Any) -> list[str]:
    return [p.name for p in _parameters(method) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class _Recorder:
    """Stands in for transformers' method on the model's class: records what it was called with."""

    def __init__(self, result: Any = None) -> None:
        self.calls: list[tuple[Any, tuple, dict]] = []
        self.result = result

    def __call__(self, model: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((first, args, kwargs))
        return self.result


@pytest.fixture
def pruned():
    model = make_model("llama-gqa")
    mark_pruned(model, OsscarConfig(0.5, 0.5))
    return model


def test_transformers_methods_have_the_parameters_this_test_checks():
    """So that the tests below check something: the signatures are read from transformers itself."""
    assert {"max_shard_size", "state_dict", "variant"} <= set(_named(PreTrainedModel.save_pretrained))
    assert {"commit_message", "create_pr", "max_shard_size", "tags"} <= set(_named(PreTrainedModel.push_to_hub))


@pytest.mark.parametrize("name", _named(PreTrainedModel.save_pretrained) + ["some_future_keyword"])
def test_save_pretrained_passes_on_every_argument(pruned, tmp_path, monkeypatch, name):
    recorder = _Recorder()
    monkeypatch.setattr(type(pruned), "save_pretrained", recorder)
    value = object()
    pruned.save_pretrained(tmp_path / "out", **{name: value})
    assert recorder.calls == [(tmp_path / "out", (), {name: value})]


def test_save_pretrained_passes_on_all_arguments_at_once_and_positionally(pruned, tmp_path, monkeypatch):
    recorder = _Recorder(result="saved")
    monkeypatch.setattr(type(pruned), "save_pretrained", recorder)
    values = {name: object() for name in _named(PreTrainedModel.save_pretrained)}
    assert pruned.save_pretrained(tmp_path, **values) == "saved"
    assert recorder.calls == [(tmp_path, (), values)]
    positional = (object(), object())
    pruned.save_pretrained(tmp_path, *positional)
    assert recorder.calls[-1] == (tmp_path, positional, {})


def test_save_pretrained_still_refuses_the_dense_folder(tmp_path, monkeypatch):
    dense = tmp_path / "dense"
    make_model("opt").save_pretrained(dense)
    model = make_model("opt")
    model.config._name_or_path = str(dense)
    mark_pruned(model, OsscarConfig(0.5, 0.5))
    recorder = _Recorder()
    monkeypatch.setattr(type(model), "save_pretrained", recorder)
    with pytest.raises(SaveError, match="dense model"):
        model.save_pretrained(dense, max_shard_size="1MB")
    assert recorder.calls == []


class _Card:
    def __init__(self) -> None:
        self.data = SimpleNamespace(tags=["osscar", "pruned"])

    def __str__(self) -> str:
        return f"---\ntags: {self.data.tags}\n---\n# card\n"


class _Api:
    """Stands in for huggingface_hub.HfApi: records the uploads."""

    uploads: list[dict[str, Any]] = []

    def upload_file(self, **kwargs: Any) -> None:
        self.uploads.append(kwargs)


@pytest.fixture
def with_card(pruned, monkeypatch):
    """``pruned`` with a run attached (so its push_to_hub is ours), a stand-in card, and the card's uploads."""
    import huggingface_hub

    attach_run(pruned, report=object(), config=OsscarConfig(0.5, 0.5))
    monkeypatch.setattr(save_module, "model_card", lambda model, checkpoint_format=None: _Card())
    uploads: list[dict[str, Any]] = []
    monkeypatch.setattr(_Api, "uploads", uploads)
    monkeypatch.setattr(huggingface_hub, "HfApi", _Api)
    return pruned, uploads


def _commit(repo_id: str = "alice/model", pr_revision: str | None = None) -> Any:
    return SimpleNamespace(repo_url=SimpleNamespace(repo_id=repo_id), pr_revision=pr_revision)


@pytest.mark.parametrize("name", _named(PreTrainedModel.push_to_hub))
def test_push_to_hub_passes_on_every_argument(with_card, monkeypatch, name):
    model, uploads = with_card
    recorder = _Recorder(result=_commit())
    monkeypatch.setattr(type(model), "push_to_hub", recorder)
    value = ["extra-tag"] if name == "tags" else object()
    assert model.push_to_hub("alice/model", **{name: value}) is recorder.result
    assert recorder.calls == [("alice/model", (), {name: value})]
    assert [(u["repo_id"], u["path_in_repo"]) for u in uploads] == [("alice/model", "README.md")]  # the card follows


def test_push_to_hub_puts_the_card_where_the_model_went(with_card, monkeypatch):
    model, uploads = with_card
    monkeypatch.setattr(type(model), "push_to_hub", _Recorder(result=_commit("alice/full-name")))
    model.push_to_hub("full-name", token="hf_x", revision="dev", tags=["mine", "osscar"])
    assert uploads[-1] == {"path_or_fileobj": b"---\ntags: ['osscar', 'pruned', 'mine']\n---\n# card\n",
                           "path_in_repo": "README.md", "repo_id": "alice/full-name", "token": "hf_x",
                           "revision": "dev", "commit_message": "Add the osscar model card"}  # the push's tags, once
    monkeypatch.setattr(type(model), "push_to_hub", _Recorder(result=_commit(pr_revision="refs/pr/3")))
    model.push_to_hub("alice/model", create_pr=True, revision="main")
    assert uploads[-1]["revision"] == "refs/pr/3"  # into the same pull request


def test_push_to_hub_refuses_what_transformers_refuses(with_card):
    model, uploads = with_card
    with pytest.raises(TypeError, match="no_such_option"):
        model.push_to_hub("alice/model", no_such_option=1)
    assert uploads == []


def test_the_replacements_carry_transformers_docs(with_card):
    model, _ = with_card
    assert model.save_pretrained.__doc__ == PreTrainedModel.save_pretrained.__doc__
    assert model.push_to_hub.__doc__ == type(model).push_to_hub.__doc__
