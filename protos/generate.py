"""Generate ecserve's Python gRPC code from protos/, or check that the committed code is current.

    python protos/generate.py           # write ecserve/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python protos/generate.py --check   # exit 1 if they differ from what the protos give

The output depends on the protoc bundled with grpcio-tools, so the test extra pins it.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT  # protos/ecserve/v1/x.proto -> ecserve/v1/x_pb2.py, importable as ecserve.v1.x_pb2


def generate(out: Path) -> list[Path]:
    """Run protoc over every .proto under protos/, writing into `out`; returns the files made."""
    from grpc_tools import protoc  # only needed here: grpcio-tools is a test/dev dependency

    protos = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    made = []
    for proto in protos:
        stem = proto.removesuffix(".proto")
        made += [out / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing them")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            path.relative_to(tmp).as_posix()
            for path in generate(Path(tmp))
            if not (OUT / path.relative_to(tmp)).is_file()
            or not filecmp.cmp(path, OUT / path.relative_to(tmp), shallow=False)
        ]
    if stale:
        print("out of date (run python protos/generate.py): " + ", ".join(stale))
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
