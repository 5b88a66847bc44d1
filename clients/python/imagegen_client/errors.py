"""The SDK's exceptions: one class per gRPC status a caller acts on, each holding the parsed google.rpc details."""

from __future__ import annotations

import grpc

from imagegen_client.status import ErrorDetails, parse_error


class ImagegenError(Exception):
    """Base class for errors that are the caller's or the deployment's fault, not a bug (the server's errors
    derive from it too, so that the CLI prints any of them as one line)."""


class ImageServiceError(ImagegenError):
    """A call failed with a gRPC status; `details` holds the parsed google.rpc details."""

    def __init__(self, details: ErrorDetails) -> None:
        super().__init__(f"{details.code.name}: {details.message}")
        self.details = details
        self.code = details.code
        self.message = details.message


class InvalidArgumentError(ImageServiceError):
    @property
    def field(self) -> str | None:
        """The offending request field (first violation), e.g. "width" or "images[0]"."""
        return self.details.field_violations[0][0] if self.details.field_violations else None


class UnauthenticatedError(ImageServiceError):
    pass


class ResourceExhaustedError(ImageServiceError):
    pass


class DeadlineExceededError(ImageServiceError):
    pass


class UnavailableError(ImageServiceError):
    pass


class RequestCancelledError(ImageServiceError):
    pass


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def error_from(error: grpc.RpcError) -> ImageServiceError:
    details = parse_error(error)
    return _ERRORS.get(details.code, ImageServiceError)(details)
