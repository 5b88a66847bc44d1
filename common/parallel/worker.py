"""A non-leader rank of a denoiser group started on this machine: load the transformer, follow rank 0."""

from __future__ import annotations

import argparse
import sys

import torch
from imagegen.common.parallel.launch import follow_as_rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--cfg-parallel", action="store_true")
    parser.add_argument("--ulysses", type=int, default=None, help="Ulysses degree U of the U x ring layout")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    follow_as_rank(args.model, args.sp, args.cfg_parallel, args.dtype, args.device, args.timeout, args.ulysses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
