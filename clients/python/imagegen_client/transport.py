"""gRPC channel and server options: keepalive, reconnection, load balancing, message sizes. One list for every
client (the gateway's internal channels and the SDK) and one for every server, so both ends agree.

No torch here: the SDK and the servers share this module.
"""

from __future__ import annotations

import json
from typing import Any

Options = list[tuple[str, Any]]
# The largest message an internal server or channel takes (--max-message-bytes): embeddings, condition latents,
# decoded images. Bounded, so a malformed or hostile message cannot exhaust memory.
DEFAULT_MESSAGE_LIMIT = 512 << 20

# A long unary call (a denoise at 4096^2) sends nothing for minutes; load balancers with idle timeouts would cut
# it. Clients ping every 20 s even without data, and servers accept that (below).
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Internal servers close connections after this age (in-flight calls finish first), so that gateways re-resolve
# a headless Service's DNS and spread calls over new replicas too.
INTERNAL_CONNECTION_AGE_MS = 300_000
# Spread calls over every resolved replica and skip those whose health says NOT_SERVING (loading, draining): a
# call waiting for a ready backend then waits for one that can take work.
_INTERNAL_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def client_options(max_receive_bytes: int = -1, internal: bool = False) -> Options:
    options: Options = [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect soon after a backend restarts: gRPC's default backoff (1 s growing to 120 s) would keep a
        # waiting call waiting long after the backend is back.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if internal:
        options += [
            ("grpc.service_config", _INTERNAL_SERVICE_CONFIG),
            # A restarted pod has a new address: re-resolve soon after a connection fails (default 30 s).
            ("grpc.dns_min_time_between_resolutions_ms", 1000),
        ]
    return options


def server_options(max_receive_bytes: int, internal: bool) -> Options:
    options: Options = [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared with another process
        # Accept the clients' keepalive pings (default: one per 5 minutes, then GOAWAY "too_many_pings").
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Ping clients too, so the work of a caller that vanished without closing its connection is dropped.
        ("grpc.keepalive_time_ms", 3 * KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ]
    if internal:
        options.append(("grpc.max_connection_age_ms", INTERNAL_CONNECTION_AGE_MS))
    return options
