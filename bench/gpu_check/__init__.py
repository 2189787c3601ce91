"""`python -m bench.gpu_check`: one command that checks every CUDA path of the suite.

On one GPU (under 5 minutes): flash-attn against SDPA on packed documents with GQA in
bfloat16; one world-size-1 NCCL cell of configs/gpu-single.yaml with profiling, a memory
snapshot and NVML on, whose record must give an MFU within (0, 1), energy per token equal to
energy per step / tokens per step, traces holding flash kernels, and a snapshot that
memory_viz loads. With two or more GPUs it adds an ISP cell, the collectives and the peers
at world size 2 (their traces must hold NCCL kernels). Without CUDA it prints that nothing
was checked and why, and exits 0.
"""
