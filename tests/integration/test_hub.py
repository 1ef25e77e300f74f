"""Pushing pruned models to a Hub and loading them back, against the loopback fake Hub of tests/fake_hub.py.

huggingface_hub reads ``HF_ENDPOINT`` when it is imported, so the end-to-end test runs the user's code (prune,
card, push, ``from_pretrained``) in a fresh interpreter whose environment points at the fake Hub, with the
Hugging Face home and cache in a temporary folder. The error tests call ``push_pruned(endpoint=...)`` in
process, which is faster and needs no environment.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from osscar_hf.hub import (
    HubAuthenticationError,
    HubConnectionError,
    HubPermissionError,
    HubPushError,
    push_pruned,
)
from tests.conftest import make_model, make_tokenizer
from tests.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_fake_alice_write"
GENERIC_CARD_MARKERS = ("This is the model card of a", "[More Information Needed]")

# Runs in a fresh interpreter: prune tiny models, build their cards, push them (an in-memory model and a
# saved folder), then load them back from the Hub with from_pretrained and save both logits.
CLIENT = r"""
import json, os, sys
import torch
import osscar_hf  # registers the osscar quantizer with transformers (when the package provides one)
from transformers import AutoModelForCausalLM
from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.card import build_model_card
from osscar_hf.hub import push_pruned
from osscar_hf.io import save_pruned
from tests.conftest import VOCAB, make_model, make_text, make_tokenizer

cases, out = json.loads(sys.argv[1]), sys.argv[2]
tokenizer = make_tokenizer()
words = make_text().split()
texts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
for case in cases:
    config = OsscarConfig(case["attention_sparsity"], case["mlp_sparsity"], dataset=texts, num_samples=8,
                          seq_len=32, batch_size=4, device="cpu")
    pruner = OsscarPruner(config)
    model = pruner.prune(make_model(case["kind"]), tokenizer, progress=False)
    card = build_model_card(pruner.report, base_model="tests/tiny-" + case["kind"], config=config,
                            repo_id=case["repo"], eval_results={"dense": 90.0, "pruned": 95.0},
                            checkpoint_format=case.get("format"))
    if case.get("format"):  # save_pruned in that format, then push the folder
        folder = os.path.join(out, case["repo"].replace("/", "--"))
        save_pruned(model, folder, tokenizer=tokenizer, format=case["format"])
        info = push_pruned(folder, case["repo"], card=card)
    elif case["folder"]:
        folder = os.path.join(out, case["repo"].replace("/", "--"))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        info = push_pruned(folder, case["repo"], card=card)
    else:
        info = push_pruned(model, case["repo"], card=card, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(case["repo"], attn_implementation="eager",
                                                    trust_remote_code=case.get("format") == "remote_code").eval()
    with torch.no_grad():
        logits = {"expected": model(ids).logits, "actual": reloaded(ids).logits}
    name = case["repo"].replace("/", "--")
    torch.save(logits, os.path.join(out, name + ".pt"))
    with open(os.path.join(out, name + ".md"), "w", encoding="utf-8") as handle:
        handle.write(str(card))
    print(json.dumps({"repo": case["repo"], "oid": info.oid,
                      "parameters": sum(p.numel() for p in reloaded.parameters()),
                      "expected_parameters": pruner.report.parameters_after}))
"""


@pytest.fixture(scope="module")
def hub():
    with FakeHub(tokens={TOKEN: "alice"}) as server:
        server.add_repo("bob/taken", {"config.json": b"{}", "README.md": b"bob's model\n"})
        yield server
    assert server._server is None  # stopped at teardown


def _client_env(hub_url: str, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE",)}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _saved_folder(tmp_path: Path, kind: str = "llama-gqa") -> tuple[Path, torch.nn.Module]:
    model = make_model(kind)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    return folder, model


def test_push_model_and_folder_then_load_back_through_the_hub(hub, tmp_path):
    cases = [
        # Uniform FFN pruning: a stock Llama config.
        {"kind": "llama-gqa", "attention_sparsity": 0.0, "mlp_sparsity": 0.5, "repo": "alice/llama-mem",
         "folder": False},
        # OPT with heads removed: no stock OPT config can say it, so it loads through the osscar quantizer.
        {"kind": "opt", "attention_sparsity": 0.5, "mlp_sparsity": 0.5, "repo": "alice/opt-mem", "folder": False},
        # KV groups and neurons removed, pushed as a saved folder.
        {"kind": "llama-gqa", "attention_sparsity": 0.5, "mlp_sparsity": 0.25, "repo": "alice/gqa-dir", "folder": True},
        # The remote-code format: its two Python files go up with the weights, and come back from the Hub.
        {"kind": "opt", "attention_sparsity": 0.5, "mlp_sparsity": 0.5, "repo": "alice/opt-remote-code",
         "folder": True, "format": "remote_code"},
    ]
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(cases), str(out)], cwd=ROOT,
                          env=_client_env(hub.url, tmp_path / "home", TOKEN), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["repo"]: r for r in map(json.loads, proc.stdout.strip().splitlines()[-len(cases):])}
    assert hub.unhandled == []

    for case in cases:
        repo, name = case["repo"], case["repo"].replace("/", "--")
        logits = torch.load(out / f"{name}.pt")
        torch.testing.assert_close(logits["actual"], logits["expected"], rtol=1e-5, atol=1e-5)
        assert results[repo]["parameters"] == results[repo]["expected_parameters"]

        files = hub.files(repo)
        assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
        # One commit after the repo's creation, holding weights, config, tokenizer and our card together.
        assert hub.commits(repo) == ["initial commit", "Upload model pruned with OSSCAR"]
        readme = files["README.md"].decode()
        assert readme == (out / f"{name}.md").read_text(encoding="utf-8")  # our card, byte for byte
        assert not any(marker in readme for marker in GENERIC_CARD_MARKERS)
        card = ModelCard(readme)
        assert card.data.tags == ["osscar", "pruned", "structured-pruning"]
        assert card.data.base_model == f"tests/tiny-{case['kind']}"
        assert {r.metric_value for r in card.data.eval_results} == {90.0, 95.0}
        if case.get("format") == "remote_code":
            assert json.loads(files["config.json"])["model_type"] == "osscar_opt"
            for name in ("configuration_osscar.py", "modeling_osscar.py"):
                assert files[name] == (out / case["repo"].replace("/", "--") / name).read_bytes()
            assert "trust_remote_code=True" in readme
        elif case["kind"] == "opt":
            assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "osscar"


def test_push_folder_in_process_replaces_readme_and_stale_weights(hub, tmp_path):
    folder, _ = _saved_folder(tmp_path)
    (folder / "README.md").write_text("---\nlicense: mit\n---\nlocal readme\n")
    info = push_pruned(folder, "alice/folder", token=TOKEN, endpoint=hub.url)
    assert info.oid == hub.repos["alice/folder"].branches["main"]
    assert hub.files("alice/folder")["README.md"] == b"---\nlicense: mit\n---\nlocal readme\n"

    # An earlier sharded push left an index and shards; the new single-file push removes them.
    hub.add_repo("alice/folder", {**hub.files("alice/folder"), "model.safetensors.index.json": b"{}",
                                  "model-00001-of-00002.safetensors": b"x", "notes.txt": b"kept"})
    push_pruned(folder, "alice/folder", card="---\ntags:\n- osscar\n---\n# our card\n", token=TOKEN,
                endpoint=hub.url, commit_message="second push")
    files = hub.files("alice/folder")
    assert "model.safetensors.index.json" not in files and "model-00001-of-00002.safetensors" not in files
    assert files["notes.txt"] == b"kept" and files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert files["README.md"] == b"---\ntags:\n- osscar\n---\n# our card\n"
    assert hub.commits("alice/folder")[-1] == "second push"


def test_no_token_is_a_clear_error(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
    folder, _ = _saved_folder(tmp_path)
    before = len(hub.requests)
    with pytest.raises(HubAuthenticationError, match="no Hugging Face token found.*`--token` on the command line.*"
                                                     "HF_TOKEN.*hf auth login"):
        push_pruned(folder, "alice/no-token", endpoint=hub.url)
    assert len(hub.requests) == before  # refused before any request


def test_rejected_token_is_a_clear_error(hub, tmp_path):
    folder, _ = _saved_folder(tmp_path)
    with pytest.raises(HubAuthenticationError, match="rejected the token.*invalid or expired.*HF_TOKEN"):
        push_pruned(folder, "alice/bad-token", token="hf_not_a_token", endpoint=hub.url)
    assert "alice/bad-token" not in hub.repos


@pytest.mark.parametrize("repo_id", ["bob/taken", "bob/new-model"])
def test_someone_elses_repo_is_a_clear_error(hub, tmp_path, repo_id):
    folder, _ = _saved_folder(tmp_path)
    with pytest.raises(HubPermissionError, match=f"may not write to {repo_id}.*your own namespace .e.g. 'alice/"):
        push_pruned(folder, repo_id, token=TOKEN, endpoint=hub.url)
    assert hub.files("bob/taken")["README.md"] == b"bob's model\n"
    assert "bob/new-model" not in hub.repos


def test_unreachable_hub_is_a_clear_error(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder, _ = _saved_folder(tmp_path)
    with pytest.raises(HubConnectionError, match=f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}.*"
                                                 "check the network connection"):
        push_pruned(folder, "alice/offline", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(
    "source,repo_id,match",
    [
        ("missing-folder", "alice/x", "is not a folder"),
        ("empty-folder", "alice/x", "no config.json"),
        ("saved", "no-namespace", "namespace/name"),
        (42, "alice/x", "PreTrainedModel or the path"),
    ],
)
def test_bad_inputs_are_refused_before_any_request(hub, tmp_path, source, repo_id, match):
    folder, _ = _saved_folder(tmp_path)
    (tmp_path / "empty-folder").mkdir()
    target = source if isinstance(source, int) else (folder if source == "saved" else tmp_path / source)
    before = len(hub.requests)
    with pytest.raises(HubPushError, match=match):
        push_pruned(target, repo_id, token=TOKEN, endpoint=hub.url)
    assert len(hub.requests) == before


def test_tokenizer_is_pushed_with_an_in_memory_model(hub):
    model = make_model("opt")
    push_pruned(model, "alice/with-tokenizer", tokenizer=make_tokenizer(), token=TOKEN, endpoint=hub.url,
                card="---\ntags:\n- osscar\n---\n# card\n", private=True)
    files = hub.files("alice/with-tokenizer")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert hub.repos["alice/with-tokenizer"].private


def _pruned_opt():
    from osscar_hf import OsscarConfig, OsscarPruner
    from tests.conftest import make_text

    words = make_text(2000).split()
    texts = [" ".join(words[i : i + 100]) for i in range(0, len(words), 100)]
    config = OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=texts, num_samples=4, seq_len=32,
                          device="cpu")
    return OsscarPruner(config).prune(make_model("opt"), make_tokenizer(), progress=False)


def test_model_push_to_hub_uploads_weights_config_and_our_card(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    # transformers' push reads the Hub's card (hf_hub_download builds its URL from this template)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    model = _pruned_opt()
    model.push_to_hub("alice/pushed-by-method", token=TOKEN, commit_message="from push_to_hub")
    files = hub.files("alice/pushed-by-method")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "- structured-pruning" in card and "| 0 | 2 / 4 | 24 / 48 |" in card
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "osscar"
    # transformers' own options are passed on (here: shards of at most 20 kB, and a tag the card gets)
    model.push_to_hub("alice/other", token=TOKEN, max_shard_size="20KB", tags=["my-tag"])
    files = hub.files("alice/other")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    card = files["README.md"].decode()
    assert "- structured-pruning" in card and "- my-tag" in card
    assert not any(marker in card for marker in GENERIC_CARD_MARKERS)


def test_save_pretrained_writes_the_card_but_keeps_a_foreign_readme(tmp_path):
    model = _pruned_opt()
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---") and "- osscar" in card and "OSSCAR" in card
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "README.md").write_text("my own notes\n")
    model.save_pretrained(foreign)
    assert (foreign / "README.md").read_text() == "my own notes\n"
    assert (foreign / "model.safetensors").exists()
