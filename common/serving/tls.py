"""TLS for the public port and mTLS between services, from PEM files named by --tls-cert/--tls-key/--tls-ca, and
the internal token (`auth.InternalToken`) the gateway's internal channels present to the stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from imagegen.common.serving.config import ConfigError


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class TlsConfig:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    internal_token: str | None = None  # sent on every internal call (the stages require it when they have one)

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None) -> TlsConfig:
        if bool(cert) != bool(key):
            raise ConfigError("--tls-cert and --tls-key go together")
        return cls(_read(cert, "--tls-cert"), _read(key, "--tls-key"), _read(ca, "--tls-ca"))

    def server_credentials(self, internal: bool) -> grpc.ServerCredentials | None:
        """TLS when a certificate is configured; internal services with a CA also require client certs."""
        if self.cert is None:
            if internal and self.ca is not None:
                raise ConfigError("--tls-ca on an internal service needs --tls-cert and --tls-key")
            return None
        require = internal and self.ca is not None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca if require else None, require_client_auth=require
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For calls to internal services: mTLS when a CA is configured, else plaintext."""
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
