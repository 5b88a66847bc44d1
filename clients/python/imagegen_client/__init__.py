"""imagegen-client: the Python SDK of the imagegen ImageService (gRPC), sync and asyncio. No torch.

    from imagegen_client import ImageClient

    with ImageClient("localhost:50051", api_key="...") as client:
        client.generate("a red fox in the snow", width=512, height=512, seed=7).images[0].save("fox.png")

See `imagegen_client.sdk` for the options; the generated stubs are in `imagegen_client.v1`.
"""

from imagegen_client.sdk import (
    OPTION_FIELDS,
    AsyncImageClient,
    DeadlineExceededError,
    ImageClient,
    ImageServiceError,
    InvalidArgumentError,
    Progress,
    RequestCancelledError,
    ResourceExhaustedError,
    Result,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "OPTION_FIELDS",
    "AsyncImageClient",
    "DeadlineExceededError",
    "ImageClient",
    "ImageServiceError",
    "InvalidArgumentError",
    "Progress",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "Result",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
]
