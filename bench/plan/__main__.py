"""`python -m bench.plan ...`, the same as `run_bench.py plan ...`."""

from bench.cli.plan import main

raise SystemExit(main())
