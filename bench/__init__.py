"""ISP Bench: the benchmark harness around isp_core. Folders follow a cell's way through the program:

    run_bench.py      -> bench/cli/         argument parsing only: main (sweep), compare, history, nightly, plan,
                                            export, dashboard
    1. what to run       bench/config/      rules and schema (sections), checks, cell, YAML file + --set, matrix,
                                            entries (exclude/include/baseline/canaries), limits (alias bombs,
                                            cell count, name length)
    2. run the sweep     bench/sweep/       runner (one cell after another), launch (one torchrun job), lock,
                                            processes (nothing left behind), nodes/team/lockstep/multinode
                                            (several nodes through torch's c10d store: store, a deadline on
                                            every call; roll_call, the nodes' checks; peer_loss; attempt_logs),
                                            env_info, hang + hang_diagnosis (which rank holds the others,
                                            before the kill), torchrun (torchrun without its slow exit), zygote
                                            (each torchrun a fork of one launcher that has imported torch),
                                            references (one loss reference per key), pool (run.reuse_workers:
                                            one job serves many cells)
    3. one cell, ranks   bench/worker/      python -m bench.worker: cell (build, warm up, measure, profile,
                                            gather), timing, memory, nvml, profiling, nvtx, collectives, finish,
                                            collective_ring + hang_watch (each rank's last collectives in a
                                            mapped file, stacks, Flight Recorder), rank_figures, ring_overhead,
                                            pool (a reused job's ranks: cell after cell)
    4. numbers           bench/metrics/     measurement (the typed hand-over), assemble (every metric of a
                                            record), formulas, overlap, trace_figures, nccl_trace, roofline,
                                            loss_check, collectives_spec, per_rank (each rank, the straggler),
                                            phases (where a cell's time goes)
    5. read and judge    bench/results/     records (writer and reader), torn, report, plots, compare, render,
                                            verdict, history (+ history_rows, acks), changepoint, series_state
                                            (open regressions), nightly_series (machine / straggler / code),
                                            loss_nights, nightly, straggler_line, gate_rules, gate_accuracy,
                                            export (pytorch-oss, github-action-benchmark, tensorboard)
    what trains          bench/strategies/  registry of isp, fsdp2, ddp, ulysses: each a trainer and its
                                            communication formula
    before any run       bench/plan/        memory, communication and step time of any layout at any scale
    on a new GPU         bench/gpu_check/   python -m bench.gpu_check: every CUDA path in one short table
    the history, a site  bench/dashboard/   model (read the DB once), judgements, charts (bokeh), pages, build;
                                            browser (headless Chromium over DevTools), measure, libcompare

Dependencies point down this list and into isp_core, never back (tests/unit/test_architecture.py).
"""
