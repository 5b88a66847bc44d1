"""A non-leader rank of a denoiser group started on this machine: load the transformer, follow rank 0.

Its one argument is rank 0's `GroupSpec` as JSON, so it builds exactly the group rank 0 builds."""

from __future__ import annotations

import argparse
import sys

import torch

from imagegen.common.parallel.launch import follow_as_rank
from imagegen.common.parallel.spec import GroupSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the group's GroupSpec, as JSON")
    spec = GroupSpec.from_json(parser.parse_args(argv).spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.set_grad_enabled(False)
    follow_as_rank(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
