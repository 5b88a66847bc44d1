"""The SDK, as the server distribution's CLI and tests import it. Its one copy is the client distribution,
`imagegen_client` (clients/python: `pip install imagegen-client`, no torch); this module re-exports it and adds
what only the CLI needs."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from imagegen_client.sdk import *  # noqa: F403 (the SDK's public names)
from imagegen_client.sdk import ImageClient, __all__, is_loopback  # noqa: F401 (is_loopback: for the tests)

from imagegen.common.serving.convert import OPTION_FIELDS as _REQUEST_OPTIONS

_CLI_OPTIONS = (*_REQUEST_OPTIONS, "num_images")


def run_remote(args: Any, options: Any, images: Sequence[PIL.Image.Image]) -> np.ndarray:
    """`imagegen generate/edit --target HOST:PORT`: the same request through a gateway; float32 `[K, H, W, 3]`."""
    fields = {name: getattr(options, name) for name in _CLI_OPTIONS}
    from imagegen.cli import parse_lora

    fields["loras"] = [parse_lora(value, i) for i, value in enumerate(getattr(args, "lora", None) or [])]
    trusted = os.environ.get("IMAGEGEN_ALLOW_PLAINTEXT_KEY") == "1"  # the CLI's way to say the network is trusted
    with ImageClient(args.target, api_key=args.api_key, model=args.model, allow_plaintext_key=trusted) as client:
        if images:
            result = client.edit(images, options.prompt, output_format="npy", **fields)
        else:
            result = client.generate(options.prompt, output_format="npy", **fields)
    print(f"seed {result.seed}", file=sys.stderr)
    return result.array
