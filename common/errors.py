"""Errors that the runtime raises on purpose.

Each carries enough to become one clear CLI line or one precise gRPC status: `InvalidArgument` names the
offending request field, `ModelLoadError` names the file, class or dtype that made a checkpoint unusable.
"""

from __future__ import annotations

# One base for the server's errors and the SDK's (the CLI prints any of them as one line).
from imagegen_client.errors import ImagegenError


class InvalidArgument(ImagegenError):
    """A request field has a value we cannot serve; `field` is its name in the request/CLI."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(ImagegenError):
    """A model folder cannot be loaded: missing file, unsupported class, unknown family or bad dtype."""


class Cancelled(ImagegenError):
    """The caller cancelled the request or its deadline passed; raised between denoising steps."""
