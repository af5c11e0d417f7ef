"""Regenerates the Python contracts from `protos/` so that checked-in code can be compared to it."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("rallyrobopilot") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) into `out_dir`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    pkg = out_dir / PACKAGE_DIR
    for init in (out_dir / "rallyrobopilot" / "__init__.py", pkg / "__init__.py"):
        init.write_text('"""Generated gRPC contracts of RallyRoboPilot; do not edit."""\n')
    return sorted(p for p in (out_dir / "rallyrobopilot").rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write rallyrobopilot/v1 into")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        target = args.out / "rallyrobopilot"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(tmp) / "rallyrobopilot", target)
    print(f"generated {len(written)} files into {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
