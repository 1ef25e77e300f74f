"""``python -m osscar_hf``: the same command line as ``osscar-hf``."""

from osscar_hf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
