"""`python -m bench.plan ...`, the same as `run_bench.py plan ...`."""

from bench.plan.cli import main

raise SystemExit(main())
