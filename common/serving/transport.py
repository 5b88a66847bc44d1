"""gRPC channel and server options, shared by every client (the gateway's channels and the SDK) and every server
so both ends agree. One copy, in the client distribution: `imagegen_client.transport`."""

from imagegen_client.transport import (  # noqa: F401 (re-exported)
    DEFAULT_MESSAGE_LIMIT,
    INTERNAL_CONNECTION_AGE_MS,
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    Options,
    client_options,
    server_options,
)
