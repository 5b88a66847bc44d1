"""Rebuild the generated gRPC/protobuf code from `protos/imagegen/v1/*.proto`.

    python tools/gen_protos.py           # regenerate in place
    python tools/gen_protos.py --check   # exit 1 if the checked-in code is stale

The public API (`common.proto`, `image_service.proto`) goes to the client distribution,
`clients/python/imagegen_client/v1/`. The internal stage APIs stay in the server's `imagegen/v1/`. Every import of
a public module, in either place, is rewritten to `imagegen_client.v1` (one copy in the descriptor pool).

The output depends on the grpcio-tools version (it bundles protoc); `tests/test_protos.py` runs the check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("imagegen") / "v1"
PUBLIC = ("common", "image_service")  # the protos a client needs
PUBLIC_DIR = ROOT / "clients" / "python" / "imagegen_client" / "v1"
INTERNAL_DIR = ROOT / PACKAGE
# No .pyi stubs: protoc writes them in a style our ruff settings reject, and ruff excludes only *_pb2*.py.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def _is_public(name: str) -> bool:
    return name.removesuffix(".py").removesuffix("_grpc").removesuffix("_pb2") in PUBLIC


def _relocate(text: str) -> str:
    """Point the imports of the public modules (and, in a public module, its classes' __module__) at
    imagegen_client.v1."""
    for stem in PUBLIC:
        text = text.replace(f"from imagegen.v1 import {stem}_pb2 ", f"from imagegen_client.v1 import {stem}_pb2 ")
        text = text.replace(f"'imagegen.v1.{stem}_pb2'", f"'imagegen_client.v1.{stem}_pb2'")
    return text


def generate() -> dict[Path, str]:
    """Run protoc (from grpcio-tools) over every proto; returns {destination: text} of the generated files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        result = {}
        for path in sorted((out_dir / PACKAGE).iterdir()):
            if not path.name.endswith(GENERATED_SUFFIXES):
                continue
            folder = PUBLIC_DIR if _is_public(path.name) else INTERNAL_DIR
            result[folder / path.name] = _relocate(path.read_text())
        return result


def generated_files() -> list[Path]:
    """The checked-in generated files (public and internal)."""
    found = []
    for folder in (PUBLIC_DIR, INTERNAL_DIR):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES)]
    return sorted(found)


def stale_files() -> list[str]:
    """Generated files that differ from (or are missing in, or extra in) the checked-in ones, relative to ROOT."""
    fresh = generate()
    current = set(generated_files())
    stale = [p for p in fresh.keys() | current if p not in fresh or p not in current or p.read_text() != fresh[p]]
    return sorted(str(p.relative_to(ROOT)) for p in stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    fresh = generate()
    for path in generated_files():
        path.unlink()  # protos removed since the last run must not leave modules behind
    for path, text in fresh.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
