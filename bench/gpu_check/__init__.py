"""`python -m bench.gpu_check`: the first run on a new GPU machine, a short table that can fail for
the right reasons and says what to fix first.

On the GPU itself (device.py): the bf16 and float32 GEMM rates (8192^3) and the attention kernel's
rate, each judged against the datasheet peak or the GEMM rate; flash-attn against SDPA on packed
documents with GQA in bf16. Then cells through run_bench.py (sweeps.py; configs/gpu-check-*.yaml):
one profiled world-size-1 cell whose TFLOP/s per rank must lie between a fraction of the GEMM
rate and the GEMM rate, whose NVML energy must come from the counter and agree with mean power x
time at a plausible power, and whose memory snapshot's allocator events must replay to its
max_memory_allocated; the world-size-1 variants (memory pool, checkpoint 0.5 and 1, block unit,
gathered head, DDP, FSDP2, Ulysses); with two or more GPUs, ISP and FSDP2 at world size 2 with
NCCL kernels in their traces, and a collectives cell. Every training cell: loss equal to its
one-process reference, counted bytes equal to the formula, flash-attn when it is installed.

Rows (rows.py): one per check, each guarded on its own; a failed cell's reason whole, with its
rank log and run folder; the last line says what to fix first. gpu_check.json in the scratch
folder holds the rates (bench.plan's `plan --calibrate` reads them) and every row.
Without CUDA (a CPU build of torch) nothing is checked and it exits 0; a CUDA build that sees no
GPU exits 1 with the reason.
"""
