#!/usr/bin/env python3
"""ISP Bench: `python run_bench.py [CONFIG.yaml] [options]`; see `--help` and docs/config.md."""

import sys

from bench.cli.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
