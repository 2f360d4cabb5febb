"""Generate the client package's moderator_client/v1/*_pb2*.py(i) from proto/ with grpcio-tools.

python tools/gen_proto.py           # regenerate in place
python tools/gen_proto.py --check   # exit 1 if the committed code is stale

The generated code lives once, in clients/python (the `moderator-client` distribution); the
server imports it from there. protoc names Python modules after the .proto file's path
(moderator/v1/...), so the generated imports are moved to the client package's name.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILES = sorted(PROTO_ROOT.rglob("*.proto"))
PROTOC_PACKAGE = Path("moderator") / "v1"  # where protoc writes, after the .proto path
OUT = Path("clients") / "python" / "moderator_client" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PACKAGE_INIT = (
    '"""Generated protobuf and gRPC code for moderator.v1 (make proto). Do not edit."""\n'
)
RENAMES = (
    ("from moderator.v1 import", "from moderator_client.v1 import"),
    ("'moderator.v1.moderator_pb2'", "'moderator_client.v1.moderator_pb2'"),
    ("code in moderator/v1/", "code in moderator_client/v1/"),
)


def generate(out_root: Path) -> list[str]:
    """Generate into `out_root`/OUT; the generated files' names."""
    protoc_root = out_root / "protoc"
    (protoc_root / PROTOC_PACKAGE).mkdir(parents=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={protoc_root}",
        f"--pyi_out={protoc_root}",
        f"--grpc_python_out={protoc_root}",
        *(str(p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / OUT).mkdir(parents=True)
    names = []
    for path in sorted((protoc_root / PROTOC_PACKAGE).iterdir()):
        if path.name.endswith(GENERATED_SUFFIXES):
            (out_root / OUT / path.name).write_text(relocate(path.read_text()))
            names.append(path.name)
    (out_root / OUT / "__init__.py").write_text(PACKAGE_INIT)
    return [*names, "__init__.py"]


def relocate(code: str) -> str:
    for old, new in RENAMES:
        code = code.replace(old, new)
    return code


def committed_files() -> set[str]:
    """Every file in the generated package (anything there is generated, or stale)."""
    return {p.name for p in (REPO / OUT).iterdir() if p.is_file()}


def stale_files(fresh_root: Path, generated: list[str]) -> list[str]:
    stale = [
        name
        for name in generated
        if not (REPO / OUT / name).exists()
        or not filecmp.cmp(fresh_root / OUT / name, REPO / OUT / name, shallow=False)
    ]
    return stale + sorted(committed_files() - set(generated))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generated = generate(fresh)
        if args.check:
            stale = stale_files(fresh, generated)
            if stale:
                print(f"generated protobuf code is stale: {', '.join(stale)}; run `make proto`")
                return 1
            print(f"generated protobuf code is up to date ({len(generated)} files)")
            return 0
        for name in committed_files() - set(generated):
            (REPO / OUT / name).unlink()  # generated once, from a proto that is gone
        for name in generated:
            (REPO / OUT / name).write_text((fresh / OUT / name).read_text())
        print(f"wrote {len(generated)} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
