"""NCCL all-to-all and all-gather bandwidth between the GPUs of one host (run under torchrun)."""

import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
for mb in (1, 12, 50):
    x = torch.randn(mb * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        dist.all_to_all_single(y, x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_to_all_single(y, x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 20
    if rank == 0:
        print(f"all_to_all {mb} MB: {seconds * 1e3:.3f} ms, {mb / 2**10 / seconds:.1f} GB/s per rank")
dist.destroy_process_group()
