"""The model card: rendered from the packaged template, YAML metadata that huggingface_hub parses back,
per-block shapes, the exact config, evaluation results as model-index, and clear errors on bad input."""

import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import osscar_hf
from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.card import TAGS, CardError, build_model_card, template_path
from osscar_hf.config import describe_dataset
from osscar_hf.evaluation import PerplexityResult
from osscar_hf.report import BlockReport, ConsumerReport, PruneReport
from tests.conftest import make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")


def _report(config: OsscarConfig, blocks=((1, 2, 24, 48), (2, 2, 12, 48))) -> PruneReport:
    """A hand-made report: (attention kept, attention total, neurons kept, neurons total) per block."""
    return PruneReport(
        model_type="llama",
        config=config.to_dict(),
        calibration={"num_samples": 8, "seq_len": 32, "tokens": 256},
        parameters_before=21_664,
        parameters_after=15_000,
        total_seconds=1.25,
        blocks=[
            BlockReport(index=i, seconds=0.5,
                        attention=ConsumerReport(structures=at, kept=ak, kept_indices=list(range(ak)), solved=ak < at),
                        mlp=ConsumerReport(structures=mt, kept=mk, kept_indices=list(range(mk)), solved=mk < mt))
            for i, (ak, at, mk, mt) in enumerate(blocks)
        ],
    )


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def _config_block(text: str) -> dict:
    match = re.search(r"```json\n(.*?)\n```", text, re.DOTALL)
    assert match, "the card has no JSON config block"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def pruned_run(tokenizer, calibration_texts):
    config = OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=calibration_texts, **SMALL)
    pruner = OsscarPruner(config)
    pruner.prune(make_model("llama-gqa"), tokenizer, progress=False)
    return pruner


def test_card_of_a_real_run_renders_with_metadata_table_config_and_citation(pruned_run, tmp_path):
    report, config = pruned_run.report, pruned_run.config
    card = build_model_card(report, base_model="tests/tiny-llama", config=config, repo_id="alice/tiny-osscar")
    text = str(card)

    meta = _front_matter(text)
    assert meta["base_model"] == "tests/tiny-llama"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == TAGS == ["osscar", "pruned", "structured-pruning"]
    assert "base_model_relation" not in meta
    assert "model-index" not in meta  # no evaluation given

    # huggingface_hub parses the metadata back, from text and from a saved file.
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "tests/tiny-llama" and loaded.data.tags == TAGS
    assert loaded.data.library_name == "transformers" and loaded.data.pipeline_tag == "text-generation"
    assert loaded.content.strip() == text.strip()

    for block in report.blocks:
        row = (f"| {block.index} | {block.attention.kept} / {block.attention.structures} | "
               f"{block.mlp.kept} / {block.mlp.structures} |")
        assert row in text
    assert "| 0 | 1 / 2 | 24 / 48 |" in text  # llama-gqa: 2 KV groups, 48 neurons, half of each kept
    assert f"| parameters | {report.parameters_before:,} | {report.parameters_after:,} (" in text

    shown = _config_block(text)
    assert shown == config.to_dict() | {"dataset": describe_dataset(config.dataset)}
    assert shown["dataset"].startswith("<in-memory calibration data: 20 texts, ")
    assert OsscarConfig.from_dict(shown | {"dataset": None}) == OsscarConfig.from_dict(
        config.to_dict() | {"dataset": None})
    assert "In-memory calibration data: 20 texts, " in text and "8 windows of 32 tokens" in text

    assert "import osscar_hf" in text and 'AutoModelForCausalLM.from_pretrained("alice/tiny-osscar")' in text
    assert "@inproceedings{meng2024osscar" in text and "{{OSSCAR}: One-Shot Structured Pruning" in text
    assert "Meng, Xiang and Ibrahim, Shibal and Behdin, Kayhan and Hazimeh, Hussein and Ponomareva, Natalia " \
           "and Mazumder, Rahul" in text
    assert "{{" not in text.replace("{{OSSCAR}", "") and "{%" not in text  # nothing left unrendered


def test_eval_results_become_model_index(tmp_path):
    config = OsscarConfig(0.25, 0.5)
    dense = PerplexityResult(perplexity=20.5, nll=3.02, num_tokens=1000, num_windows=4, seq_len=256)
    pruned = {"perplexity": 24.25, "seq_len": 256}
    card = build_model_card(_report(config), base_model="org/base", config=config, repo_id="alice/base-osscar",
                            eval_results={"dense": dense, "pruned": pruned})
    meta = _front_matter(str(card))
    (entry,) = meta["model-index"]
    assert entry["name"] == "base-osscar"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"name": "WikiText-2", "type": "wikitext", "config": "wikitext-2-raw-v1",
                                 "split": "test"}
    metrics = {m["name"]: m for m in result["metrics"]}
    assert metrics["Perplexity"]["type"] == "perplexity" and metrics["Perplexity"]["value"] == 24.25
    assert metrics["Perplexity of the dense base model (reference)"]["value"] == 20.5

    card.save(tmp_path / "README.md")
    values = {(r.metric_name, r.metric_value) for r in ModelCard.load(tmp_path / "README.md").data.eval_results}
    assert values == {("Perplexity", 24.25), ("Perplexity of the dense base model (reference)", 20.5)}
    text = str(card)
    assert "| dense base model | 20.50 |" in text and "| this pruned model | 24.25 |" in text
    assert "windows of 256 tokens" in text


def test_pruned_perplexity_alone_and_a_custom_dataset():
    config = OsscarConfig(0.0, 0.5)
    card = build_model_card(_report(config), base_model=None, config=config,
                            eval_results={"pruned": 31.0, "dataset_type": "ptb_text_only", "dataset_name": "PTB",
                                          "dataset_config": None, "protocol": "Our own protocol."})
    meta = _front_matter(str(card))
    assert "base_model" not in meta
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [31.0]
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "PTB"
    assert "Our own protocol." in str(card) and "dense base model |" not in str(card)
    assert "a `llama` model pruned with **OSSCAR**" in str(card)


def test_named_calibration_set_is_listed_as_a_hub_dataset():
    config = OsscarConfig(0.25, 0.5, dataset="wikitext2")
    card = build_model_card(_report(config), base_model="org/base", config=config)
    assert _front_matter(str(card))["datasets"] == ["Salesforce/wikitext"]
    assert _config_block(str(card))["dataset"] == "wikitext2"
    assert "[Salesforce/wikitext](https://huggingface.co/datasets/Salesforce/wikitext)" in str(card)


@pytest.mark.parametrize(
    "eval_results,match",
    [
        ({"dense": 20.0}, "needs 'pruned'"),
        ({"pruned": 20.0, "ppl": 3}, "unknown eval_results keys \\['ppl'\\]"),
        ({"pruned": float("nan")}, "finite number"),
        ({"pruned": "24"}, "perplexity"),
        ({"pruned": {"perplexity": 24.0, "seq_len": 128}, "dense": {"perplexity": 20.0, "seq_len": 256}},
         "same protocol"),
        ([24.0], "must be a dict"),
    ],
)
def test_bad_eval_results_are_refused(eval_results, match):
    config = OsscarConfig(0.25, 0.5)
    with pytest.raises(CardError, match=match):
        build_model_card(_report(config), base_model="org/base", config=config, eval_results=eval_results)


def test_loading_instructions_follow_the_checkpoint_format():
    config = OsscarConfig(0.25, 0.5)

    def card(checkpoint_format):
        return str(build_model_card(_report(config), base_model="org/base", config=config, repo_id="alice/m",
                                    checkpoint_format=checkpoint_format))

    default = card(None)
    assert card("osscar") == default  # the instructions that serve both osscar and stock checkpoints
    stock = card("stock")
    section = stock[stock.index("## How to load it"):stock.index("## Per-block shapes")]
    assert 'AutoModelForCausalLM.from_pretrained("alice/m")' in section
    assert "without `osscar_hf`" in section
    assert "import osscar_hf" not in stock and "trust_remote_code=True" not in section
    remote = card("remote_code")
    section = remote[remote.index("## How to load it"):remote.index("## Per-block shapes")]
    assert 'AutoModelForCausalLM.from_pretrained("alice/m", trust_remote_code=True)' in section
    assert "`configuration_osscar.py` and `modeling_osscar.py`" in section
    assert 'model_type: "osscar_llama"' in section and "`osscar_hf` is not needed" in section
    assert "import osscar_hf" not in remote and "quant_method" not in section
    assert "{{" not in remote.replace("{{OSSCAR}", "") and "{%" not in remote
    # Everything but the loading section is the same card.
    assert remote[:remote.index("## How to load it")] == default[:default.index("## How to load it")]
    assert remote[remote.index("## Per-block shapes"):] == default[default.index("## Per-block shapes"):]
    with pytest.raises(CardError, match=r"checkpoint_format must be None or one of \['stock', 'osscar', "
                                        r"'remote_code'\], got 'remote-code'"):
        card("remote-code")


def test_config_that_did_not_make_the_report_is_refused():
    with pytest.raises(CardError, match="attention_sparsity"):
        build_model_card(_report(OsscarConfig(0.25, 0.5)), base_model=None, config=OsscarConfig(0.5, 0.5))
    with pytest.raises(CardError, match="PruneReport"):
        build_model_card({"blocks": []}, base_model=None, config=OsscarConfig(0.5, 0.5))


def test_template_ships_inside_the_package_and_can_be_replaced(tmp_path):
    with template_path() as path:
        assert path.is_file()
        assert Path(osscar_hf.__file__).parent in path.parents  # package data, found installed or not
        assert "{{ card_data }}" in path.read_text()
    custom = tmp_path / "card.md"
    custom.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}: {{ parameters_after }} parameters\n")
    config = OsscarConfig(0.25, 0.5)
    card = build_model_card(_report(config), base_model="org/base", config=config, template=custom)
    assert card.text.strip() == "# base pruned with OSSCAR: 15,000 parameters"
    with pytest.raises(CardError, match="does not exist"):
        build_model_card(_report(config), base_model="org/base", config=config, template=tmp_path / "nope.md")
