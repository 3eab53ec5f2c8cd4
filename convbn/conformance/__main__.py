"""``python -m convbn.conformance [options]``: ``convbn conformance`` as a module, for launchers
that start modules, e.g. ``torchrun --nproc-per-node 4 -m convbn.conformance --distributed``."""

from __future__ import annotations

import sys

from convbn.cli import main

if __name__ == "__main__":
    sys.exit(main(["conformance", *sys.argv[1:]]))
