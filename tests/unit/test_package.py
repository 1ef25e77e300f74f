"""The package surface: lazy exports resolve, and fetching the demo model fails safely."""

import pytest

import osscar_hf
from osscar_hf.errors import ModelFetchError, OsscarError
from osscar_hf.demo.models import fetch_smollm2


def test_every_public_name_resolves():
    for name in osscar_hf.__all__:
        assert getattr(osscar_hf, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        osscar_hf.no_such_name  # noqa: B018


def test_fetch_with_a_corrupt_file_raises_and_leaves_nothing(tmp_path):
    pytest.importorskip("gguf")
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"not a gguf file")
    cache = tmp_path / "cache" / "smollm2"
    with pytest.raises(ModelFetchError, match="checksum mismatch") as err:
        fetch_smollm2(cache, source=fake)
    assert isinstance(err.value, OsscarError) and isinstance(err.value, RuntimeError)
    assert not cache.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written temporary folder


def test_fetch_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ModelFetchError, match="not a checkpoint made by fetch_smollm2"):
        fetch_smollm2(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"
