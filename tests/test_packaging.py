"""What the two wheels install: the server puts only `imagegen` at the top of site-packages (its common/ and
services/ inside it, as real files although the checkout reaches them through symlinks), the client only
`imagegen_client`; the client needs no torch and declares exactly the dependencies it imports; the floors the
generated code needs are declared."""

from __future__ import annotations

import email
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_SOURCES = ("pyproject.toml", "README.md", "imagegen", "common", "services")
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")


def _wheel(source: Path, out: Path) -> zipfile.ZipFile:
    # The venv's setuptools, no isolation: quick, and nothing is downloaded.
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run(argv, check=True, cwd=source, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _copy(names, source: Path, target: Path) -> None:
    """A copy to build from, so that the build leaves nothing in the checkout; symlinks stay symlinks (as in a
    clone), so the build sees imagegen/common -> ../common."""
    for name in names:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, symlinks=True, ignore=IGNORE)
        else:
            shutil.copy2(path, target / name)


def _requires(wheel: zipfile.ZipFile) -> dict[str, str]:
    metadata_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    requires = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    return {r.split(">")[0].split("=")[0].split("<")[0].strip().lower(): r for r in requires}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("wheels")
    server, client = tmp / "server-src", tmp / "client-src"
    server.mkdir()
    _copy(SERVER_SOURCES, ROOT, server)
    shutil.copytree(ROOT / "clients" / "python", client, ignore=IGNORE)
    return {"server": _wheel(server, tmp / "server-wheel"), "client": _wheel(client, tmp / "client-wheel")}


def _top_level(wheel: zipfile.ZipFile) -> set[str]:
    return {name.split("/", 1)[0] for name in wheel.namelist() if not name.split("/", 1)[0].endswith(".dist-info")}


def test_server_wheel_installs_only_the_imagegen_package(wheels):
    server = wheels["server"]
    names = set(server.namelist())
    assert _top_level(server) == {"imagegen"}  # no site-packages/common, no site-packages/services
    assert {
        "imagegen/common/__init__.py",
        "imagegen/common/serving/gateway.py",
        "imagegen/services/gateway.py",
    } <= names
    assert {"imagegen/services/http_api.py", "imagegen/v1/encoder_pb2.py", "imagegen/cli.py"} <= names
    assert "imagegen/v1/image_service_pb2.py" not in names  # the public stubs are the client's (one copy)
    # Discovery finds every package of the checkout (no hand-kept list to forget one in) and nothing else.
    folders = [p.parent.relative_to(ROOT) for top in ("common", "services") for p in (ROOT / top).rglob("__init__.py")]
    packages = {f"imagegen/{folder.as_posix()}" for folder in folders} | {"imagegen", "imagegen/v1"}
    assert {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")} == packages
    # The symlinks of the checkout become real files: a symlink in a wheel would point nowhere once installed.
    links = [i.filename for i in server.infolist() if stat.S_ISLNK(i.external_attr >> 16)]
    assert not links and server.getinfo("imagegen/common/kernels.py").file_size > 0
    assert server.read("imagegen/common/kernels.py") == (ROOT / "common" / "kernels.py").read_bytes()
    requires = _requires(wheels["server"])
    assert requires["imagegen-client"] == "imagegen-client==0.1.0"
    for grpc_package in ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status"):
        assert requires[grpc_package] == f"{grpc_package}>=1.85.1"  # what the generated stubs demand


def test_client_wheel_is_torch_free_and_declares_what_it_imports(wheels):
    client = wheels["client"]
    assert _top_level(client) == {"imagegen_client"}
    names = set(client.namelist())
    assert {"imagegen_client/sdk.py", "imagegen_client/v1/image_service_pb2_grpc.py"} <= names
    assert not any(name.endswith(("encoder_pb2.py", "denoiser_pb2.py", "vae_pb2.py")) for name in names)
    imported = set()
    for name in names:
        if name.endswith(".py"):
            text = client.read(name).decode()
            assert "import torch" not in text and "from imagegen." not in text and "from imagegen " not in text, name
            for line in text.splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] in ("import", "from") and not line.startswith(" "):
                    imported.add(words[1].split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"imagegen_client", "__future__"}
    assert third_party == {"grpc", "google", "numpy", "PIL"}
    requires = _requires(client)
    assert set(requires) == {"grpcio", "protobuf", "googleapis-common-protos", "numpy", "pillow"}
    assert requires["grpcio"] == "grpcio>=1.85.1" and requires["protobuf"].startswith("protobuf<8,>=7.35.1")
