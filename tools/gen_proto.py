"""Generate moderator/v1/*_pb2*.py(i) from proto/ with grpcio-tools.

python tools/gen_proto.py           # regenerate in place
python tools/gen_proto.py --check   # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILES = sorted(PROTO_ROOT.rglob("*.proto"))
OUT_PACKAGE = Path("moderator") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    (out_root / OUT_PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(
        p.relative_to(out_root)
        for p in (out_root / OUT_PACKAGE).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def stale_files(fresh_root: Path, generated: list[Path]) -> list[Path]:
    committed = {
        p.relative_to(REPO)
        for p in (REPO / OUT_PACKAGE).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    }
    stale = [p for p in generated if not (REPO / p).exists()]
    stale += [p for p in generated if (REPO / p).exists() and not _same(fresh_root / p, REPO / p)]
    stale += sorted(committed - set(generated))
    return stale


def _same(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


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
                names = ", ".join(str(p) for p in stale)
                print(f"generated protobuf code is stale: {names}; run `make proto`")
                return 1
            print(f"generated protobuf code is up to date ({len(generated)} files)")
            return 0
        for rel in generated:
            shutil.copyfile(fresh / rel, REPO / rel)
        print(f"wrote {len(generated)} files to {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
