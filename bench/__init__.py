"""ISP Bench: the benchmark harness around isp_core. Folders follow a cell's way through the program:

    run_bench.py      -> bench/cli/         argument parsing only: main (sweep), compare, history
    1. what to run       bench/config/      schema (sections, rules), checks, cell, YAML file + --set, matrix
    2. run the sweep     bench/sweep/       runner (one cell after another), launch (one torchrun job), env_info
    3. one cell, ranks   bench/worker/      python -m bench.worker: cell (build, warm up, measure, profile,
                                            gather), timing, memory, nvml, profiling, collectives
    4. numbers           bench/metrics/     measurement (the typed hand-over), assemble (every metric of a
                                            record), formulas, overlap, roofline, loss_check, collectives_spec
    5. read and judge    bench/results/     records (writer and reader), report, plots, compare, render,
                                            verdict, history
    what trains          bench/strategies/  registry of isp, fsdp2, ddp, ulysses: each a trainer and its
                                            communication formula

Dependencies point down this list and into isp_core, never back (tests/unit/test_architecture.py).
"""
