"""Builds the project's images without a daemon (buildah, chroot isolation, vfs storage) from a local Debian base.

The base root filesystem comes from Debian's packages (mmdebstrap, minbase) and is cached under
/var/tmp/rrp-image-cache, keyed by its inputs; the Python dependencies come from a wheelhouse repacked from this
environment (deploy/images/wheelhouse.py), so the build downloads nothing but the base's first creation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RRP_IMAGE_CACHE", "/var/tmp/rrp-image-cache"))
SUITE = "bookworm"
# What the Dockerfile expects of a base: python3 with venv, and the runtime libraries (so no apt-get runs).
BASE_PACKAGES = ("python3", "python3-venv", "libx11-6", "libxcb1", "ca-certificates")


def debian_mirror() -> str:
    """The mirror apt uses here (deb822 sources or sources.list), so mmdebstrap goes where apt goes."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Buildah:
    """buildah with a private storage root (vfs: no overlay mounts needed) and chroot isolation."""

    root: Path

    def cmd(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root", str(self.root / "storage"),
            "--runroot", str(self.root / "run"),
            "--storage-driver", "vfs",
            *args,
        ]  # fmt: skip

    def run(self, *args: str, timeout_s: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
        proc = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout_s, env=env)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"buildah {' '.join(args[:3])} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc


def base_key(mirror: str) -> str:
    inputs = {
        "suite": SUITE,
        "variant": "minbase",
        "packages": BASE_PACKAGES,
        "mirror": mirror,
        "arch": os.uname().machine,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def base_rootfs(timeout_s: float = 900.0) -> tuple[Path, str, float]:
    """The cached Debian rootfs tarball (made with mmdebstrap on first use): path, key, seconds spent making it."""
    mirror = debian_mirror()
    key = base_key(mirror)
    tar = CACHE / f"debian-{SUITE}-{key}.tar"
    if tar.exists():
        return tar, key, 0.0
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tar.with_suffix(".partial")
    started = time.monotonic()
    subprocess.run(
        [
            "mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
            "--include=" + ",".join(BASE_PACKAGES),
            "--format=tar", SUITE, str(partial), mirror,
        ],
        check=True, timeout=timeout_s, capture_output=True,
    )  # fmt: skip
    partial.rename(tar)
    return tar, key, time.monotonic() - started


def base_image(b: Buildah, tar: Path, key: str) -> str:
    """The rootfs as a local image (kept in the private storage between runs)."""
    name = f"localhost/rrp-debian-base:{key}"
    if b.run("inspect", "--type", "image", name, check=False).returncode == 0:
        return name
    ctr = b.run("from", "scratch").stdout.strip()
    try:
        b.run("add", ctr, str(tar), "/")
        b.run("config", "--cmd", "/bin/sh", ctr)
        b.run("commit", "--quiet", ctr, name)
    finally:
        b.run("rm", ctr, check=False)
    return name


def base_python(b: Buildah, image: str) -> str:
    """The Python version of a base image (its markers decide which wheels the build needs)."""
    ctr = b.run("from", "--pull-never", image).stdout.strip()
    try:
        out = b.run(
            "run",
            "--isolation",
            "chroot",
            ctr,
            "--",
            "python3",
            "-c",
            "import platform; print(platform.python_version())",
        )
        return out.stdout.strip()
    finally:
        b.run("rm", ctr, check=False)


def build_context(dest: Path, role: str, python: str) -> Path:
    """The repository's files the Dockerfile copies, with this environment's pins and their wheels."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.whl")
    for package in sorted(p.parent for p in ROOT.glob("*/__init__.py")):
        if package.name not in ("tests", "benchmarks"):
            shutil.copytree(package, dest / package.name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "deploy" / "images", dest / "deploy" / "images", ignore=ignore)
    tool = [sys.executable, str(ROOT / "deploy" / "images" / "wheelhouse.py")]
    lock = subprocess.run([*tool, "lock", role, "--python", python], check=True, capture_output=True, text=True).stdout
    (dest / "deploy" / "images" / f"requirements-{role}.txt").write_text(lock)
    wheels = dest / "deploy" / "images" / "wheelhouse"
    subprocess.run([*tool, "repack", role, str(wheels), "--python", python], check=True, capture_output=True)
    return dest
