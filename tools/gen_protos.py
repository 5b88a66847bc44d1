"""Rebuild the generated gRPC/protobuf code under `imagegen/v1/` from `protos/imagegen/v1/*.proto`.

    python tools/gen_protos.py           # regenerate in place
    python tools/gen_protos.py --check   # exit 1 if the checked-in code is stale

The output depends on the grpcio-tools version (it bundles protoc); `tests/test_protos.py` runs the check.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("imagegen") / "v1"
# No .pyi stubs: protoc writes them in a style our ruff settings reject, and ruff excludes only *_pb2*.py.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every proto; returns the generated files under `out_dir`."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return generated_files(out_dir)


def generated_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing in, or extra in) the checked-in package."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        current = {p.name: p for p in generated_files(ROOT)}
        names = sorted(fresh.keys() | current.keys())
        return [n for n in names if n not in fresh or n not in current or not filecmp.cmp(fresh[n], current[n], False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PACKAGE / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generated_files(ROOT) if (ROOT / PACKAGE).is_dir() else []:
        path.unlink()  # protos removed since the last run must not leave modules behind
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
