"""`imagegen serve all` (one process) with the CLI's `--target`, a graceful drain on SIGTERM, and TLS on the
public port with mTLS between the services."""

from __future__ import annotations

import datetime
import ipaddress
import time

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2
from imagegen_client.sdk import ImageClient, UnavailableError

from imagegen.cli import main as cli_main
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.v1 import common_pb2, encoder_pb2_grpc, image_service_pb2, image_service_pb2_grpc
from tests.service_harness import INTERNAL_TOKEN, TORCH_THREADS, Service, free_port, stop_all, token_env

INTERNAL_METADATA = (("x-imagegen-internal-token", INTERNAL_TOKEN),)
OPTIONS = ["--prompt", "a red fox", "--width", "64", "--height", "48", "--steps", "2", "--seed", "4"]


def _certificate(name: str, key, issuer_name, issuer_key, is_ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and one certificate it signed (for 127.0.0.1), used by every service as server and client."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("imagegen-test-ca", ca_key, None, None, is_ca=True)
    cert = _certificate("imagegen-service", key, ca.subject, ca_key, is_ca=False)
    pem = serialization.Encoding.PEM
    files = {
        "ca": ca.public_bytes(pem),
        "cert": cert.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return {name: folder / f"{name}.pem" for name in files} | {"bytes": files}


def _flag(server: Service, name: str) -> str:
    return next(a.split("=", 1)[1] for a in server.proc.args if a.startswith(f"--{name}="))


def _stage_ports() -> list[str]:
    return [f"--{stage}=127.0.0.1:{free_port()}" for stage in ("encoder", "denoiser", "vae")]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, pki):
    logs = tmp_path_factory.mktemp("serve-all-logs")
    model = ["--model", str(tiny_checkpoint_cached("qwen-image")), "--model-id", "tiny-qwen"]
    plain = Service("all-plain", "all", model + _stage_ports() + [f"--health-port={free_port()}"], logs)
    tls_flags = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"])]
    tls_flags.append(f"--health-port={free_port()}")
    secure = Service("all-tls", "all", model + _stage_ports() + tls_flags, logs, env=token_env(logs))
    try:
        plain.wait_serving()
        secure.wait_serving(credentials=grpc.ssl_channel_credentials(root_certificates=pki["bytes"]["ca"]))
        yield {"plain": plain, "tls": secure}
    finally:
        stop_all([plain, secure])


@pytest.fixture
def pinned_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(previous)


def test_cli_target_equals_in_process_cli(servers, tmp_path, pinned_threads, capsys):
    model = str(tiny_checkpoint_cached("qwen-image"))
    assert cli_main(["generate", "--model", model, *OPTIONS, "--output", str(tmp_path / "local.npy")]) == 0
    target = servers["plain"].address
    assert cli_main(["generate", "--target", target, *OPTIONS, "--output", str(tmp_path / "remote.npy")]) == 0
    local, remote = np.load(tmp_path / "local.npy"), np.load(tmp_path / "remote.npy")
    assert remote.shape == (1, 48, 64, 3) and np.array_equal(local, remote)
    assert "seed 4" in capsys.readouterr().err
    # A bad option comes back as one line naming the field, not a traceback.
    bad = ["generate", "--target", target, *OPTIONS, "--steps", "1", "--output", str(tmp_path / "x.npy")]
    assert cli_main(bad) == 2
    assert "steps" in capsys.readouterr().err


def test_tls_public_port_and_mtls_between_services(servers, pki):
    ca, cert, key = (pki["bytes"][name] for name in ("ca", "cert", "key"))
    with ImageClient(servers["plain"].address, timeout=60) as client:
        expected = client.generate("a red fox", width=64, height=48, steps=2, seed=4, output_format="npy").array
    with ImageClient(servers["tls"].address, root_certificates=ca, timeout=60) as client:
        result = client.generate("a red fox", width=64, height=48, steps=2, seed=4, output_format="npy")
    assert np.array_equal(result.array, expected)
    # Kubelet probes use the plaintext health port.
    health_port = f"127.0.0.1:{_flag(servers['tls'], 'health-port')}"
    assert servers["tls"].health(address=health_port) == health_pb2.HealthCheckResponse.SERVING
    with ImageClient(servers["tls"].address, timeout=5) as client, pytest.raises(UnavailableError):
        client.list_models()  # plaintext against the TLS port
    # The stages of the TLS process listen on loopback and require a client certificate signed by the CA.
    encoder = _flag(servers["tls"], "encoder")
    for credentials, ok in (
        (grpc.ssl_channel_credentials(root_certificates=ca), False),
        (grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert), True),
    ):
        with grpc.secure_channel(encoder, credentials) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            try:
                # The stages also require the internal token (issue 20).
                info = stub.Describe(common_pb2.DescribeRequest(), timeout=5, metadata=INTERNAL_METADATA)
                assert ok and info.model_id == "tiny-qwen"
            except grpc.RpcError as error:
                assert not ok and error.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_drains_in_flight_requests(servers):
    """Runs last in this module: it stops the plain server."""
    server = servers["plain"]
    with grpc.insecure_channel(server.address) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        request = image_service_pb2.GenerateImageRequest(prompt="drain", width=256, height=256, steps=12, seed=1)
        call = stub.GenerateImageStream(request, timeout=60)
        for event in call:
            if event.progress.stage == common_pb2.STAGE_DENOISING:
                break
        server.terminate()
        health_port = f"127.0.0.1:{_flag(server, 'health-port')}"
        deadline = time.monotonic() + 5
        while server.health(address=health_port) == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "still SERVING after SIGTERM"
            time.sleep(0.02)
        # Draining: the probe port answers NOT_SERVING (not a refused connection) while the request finishes.
        assert server.health(address=health_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.alive(), "exited without draining"
        events = list(call)  # the request finishes although the process is stopping
        assert events[-1].HasField("result") and len(events[-1].result.images) == 1
    assert server.proc.wait(30) == 0
    assert '"message": "draining"' in server.log()
