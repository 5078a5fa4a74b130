"""``python -m torchderiv`` / ``torchderiv``: the command line (``torchderiv bench --help``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .bench._cli import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
