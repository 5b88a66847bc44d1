"""A non-leader rank of a denoiser group started on this machine: load the transformer, follow rank 0."""

from __future__ import annotations

import argparse
import sys

import torch

from common.checkpoint import open_model_folder, parse_device, parse_dtype
from common.families import get_family
from common.parallel.group import ParallelGroup
from common.parallel.runner import follow_leader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--cfg-parallel", action="store_true")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    folder = open_model_folder(args.model)
    group = ParallelGroup.from_environment(args.sp, args.cfg_parallel, parse_device(args.device), args.timeout)
    denoiser = get_family(folder.family).denoiser(folder, parse_dtype(args.dtype), group.device)
    try:
        follow_leader(group, denoiser)
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
