"""Upload a pruned model folder (weights, config, tokenizer, report and model card) to the Hugging Face Hub.

    HF_TOKEN=hf_... python examples/push_to_hub.py PRUNED_DIR your-user/model-osscar [--private]

PRUNED_DIR is a folder written by ``osscar-hf prune`` (it holds the model card as README.md, which is
uploaded as is). The push needs a Hub token with write access: set ``HF_TOKEN``, pass ``--token``, or log in
once with ``hf auth login``; create a token at https://huggingface.co/settings/tokens. The repository is
created if needed, and everything goes up in one commit. ``osscar-hf push PRUNED_DIR REPO`` does the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from osscar_hf import OsscarError
from osscar_hf.hub import push_pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the pruned model folder")
    parser.add_argument("repo_id", help="Hub repository, 'namespace/name'")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the saved login)")
    args = parser.parse_args()

    if not (args.folder / "config.json").is_file():
        parser.error(f"{args.folder} is not a model folder (no config.json)")
    try:
        commit = push_pruned(args.folder, args.repo_id, token=args.token, private=args.private or None)
    except OsscarError as err:  # no token, no write access, no network: one line, not a traceback
        sys.exit(f"error: {err}")
    print(f"pushed {args.folder} to {commit.commit_url}")


if __name__ == "__main__":
    main()
