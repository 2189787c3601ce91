"""ISP Bench: the benchmark harness around isp_core. Folders follow a cell's way through the program:

    run_bench.py      -> bench/cli/         argument parsing only: main (sweep), compare, history, nightly, plan
    1. what to run       bench/config/      rules and schema (sections), checks, cell, YAML file + --set, matrix
    2. run the sweep     bench/sweep/       runner (one cell after another), launch (one torchrun job), lock,
                                            processes (nothing left behind), nodes/team/lockstep/multinode
                                            (several nodes through torch's c10d store), env_info, torchrun
                                            (torchrun without its slow exit), zygote (each torchrun a fork of one
                                            launcher that has imported torch), references (one loss reference
                                            per key), pool (run.reuse_workers: one job serves many cells)
    3. one cell, ranks   bench/worker/      python -m bench.worker: cell (build, warm up, measure, profile,
                                            gather), timing, memory, nvml, profiling, collectives, finish,
                                            pool (a reused job's ranks: cell after cell)
    4. numbers           bench/metrics/     measurement (the typed hand-over), assemble (every metric of a
                                            record), formulas, overlap, trace_figures, nccl_trace, roofline,
                                            loss_check, collectives_spec, phases (where a cell's time goes)
    5. read and judge    bench/results/     records (writer and reader), torn, report, plots, compare, render,
                                            verdict, history, changepoint, nightly, gate_accuracy
    what trains          bench/strategies/  registry of isp, fsdp2, ddp, ulysses: each a trainer and its
                                            communication formula
    before any run       bench/plan/        memory, communication and step time of any layout at any scale
    on a new GPU         bench/gpu_check/   python -m bench.gpu_check: every CUDA path in one short table

Dependencies point down this list and into isp_core, never back (tests/unit/test_architecture.py).
"""
