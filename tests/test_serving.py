"""Serving: the model archive, a real TorchServe on free ports, its client's errors, and the autopilot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch

from plumbing.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from plumbing.procs import ServiceProcess
from serving import codec
from serving.archive import ArchiveConfig, build_archive
from serving.autopilot import AutopilotConfig, run_autopilot
from serving.client import (
    ModelRef,
    PermissionDenied,
    TorchServeClient,
    Unauthenticated,
    read_token,
)
from serving.inprocess import InProcessClient
from serving.torchserve import LocalTorchServe, TorchServeConfig, free_port
from serving.torchserve_v1 import inference_pb2
from trainer.vision.train import save_weights

from .tiny_models import SMALL, TINY_OFFSET, train_tiny

NAME = "rrp-vision"


def _java_processes_under(workdir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def archive(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(model_dir, "1", tmp_path_factory.mktemp("store"), ArchiveConfig(batch_size=1))


@pytest.fixture(scope="module")
def torchserve(archive: Path) -> Iterator[LocalTorchServe]:
    server = LocalTorchServe(TorchServeConfig()).start()
    workdir = server.workdir
    try:
        server.register(archive)
        yield server
    finally:
        server.stop()
    assert not _java_processes_under(workdir), "TorchServe left processes behind"


@pytest.fixture()
def served(torchserve: LocalTorchServe) -> Iterator[TorchServeClient]:
    assert torchserve.keys is not None
    client = TorchServeClient(torchserve.inference_address, ModelRef(NAME), torchserve.keys.inference)
    yield client
    client.close()


def _frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


# -- the wire format, no server ----------------------------------------------------------------------------------


def test_codec_round_trip_and_refusals() -> None:
    frame = _frame()
    item = codec.encode_request(frame, 12.5)
    back, speed = codec.decode_request(item, 48, 64)
    assert np.array_equal(back, frame) and speed == 12.5
    for broken, words in [
        ({"frame": item["frame"]}, "needs 'frame' and 'speed'"),
        ({**item, "frame": b"123"}, "3 bytes"),
        ({**item, "shape": b"96x128"}, "takes 48x64"),
        ({**item, "speed": b"12"}, "float32"),
        ({**item, "speed": codec.struct.pack("<f", float("nan"))}, "finite"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            codec.decode_request(broken, 48, 64)
    with pytest.raises(InvalidArgument, match="uint8"):
        codec.encode_request(frame.astype(np.float32), 1.0)
    decision = codec.decode_response(codec.encode_response(np.arange(6, dtype=np.float32), 5))
    assert decision.keys == 5 and decision.logits == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    with pytest.raises(InvalidArgument, match="refused the input: bad"):
        codec.decode_response(codec.encode_error("bad"))


def test_generated_torchserve_stubs_do_not_drift(tmp_path: Path) -> None:
    from serving import protogen

    written = protogen.generate(tmp_path)
    checked_in = protogen.REPO_ROOT / protogen.PACKAGE
    assert sorted(p.name for p in written) == sorted(p.name for p in checked_in.iterdir() if p.is_file())
    for path in written:
        assert path.read_bytes() == (checked_in / path.name).read_bytes(), (
            f"{path.name} drifted: python -m serving.protogen"
        )


def test_archive_holds_safetensors_handler_config_and_card(archive: Path, model_dir: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = z.read("model-config.yaml").decode()
    assert {"model.safetensors", "handler.py", "model-config.yaml", "model_card.json", "model_card.md"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)
    assert manifest["model"]["modelName"] == NAME and manifest["model"]["modelVersion"] == "1"
    assert "batchSize: 1" in config and "responseTimeout: 10" in config
    (tmp_path / "bad").mkdir()
    with pytest.raises(NotFound, match=r"no model\.safetensors"):
        build_archive(tmp_path / "bad", "1", tmp_path)
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgument):
        build_archive(tmp_path / "bad", "1", tmp_path)
    with pytest.raises(InvalidArgument, match="version"):
        build_archive(model_dir, "../1", tmp_path)


# -- a real TorchServe ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchserve_answers_like_the_model_in_process(torchserve: LocalTorchServe, served: TorchServeClient) -> None:
    mode = torchserve.key_file.stat().st_mode & 0o777
    assert mode == 0o600 and torchserve.workdir.stat().st_mode & 0o777 == 0o700
    assert torchserve.keys is not None and torchserve.keys.inference not in repr(torchserve.keys)
    local = InProcessClient.load(_weights_of(torchserve))
    assert torch.equal(local.net.decision_offset, TINY_OFFSET)  # the decision offset is served as well
    for seed in range(5):
        frame, speed = _frame(seed), 3.0 * seed
        assert served.infer(frame, speed, 10.0) == local.infer(frame, speed, 10.0)


def test_a_batched_request_through_torchserve_answers_like_single_requests(served: TorchServeClient) -> None:
    frames, speeds = [_frame(seed) for seed in range(6)], [2.0 * k for k in range(6)]
    batched = served.infer_batch(frames, speeds, 10.0)
    for frame, speed, answer in zip(frames, speeds, batched, strict=True):
        single = served.infer(frame, speed, 10.0)
        assert isinstance(answer, codec.Decision) and answer.keys == single.keys
        assert np.allclose(answer.logits, single.logits, atol=1e-5)


def _weights_of(server: LocalTorchServe) -> Path:
    with zipfile.ZipFile(next(server.model_store.glob("*.mar"))) as z:
        target = server.workdir / "check.safetensors"
        target.write_bytes(z.read("model.safetensors"))
    return target


@pytest.mark.slow
def test_lockstep_lap_through_torchserve_equals_the_in_process_lap(
    torchserve: LocalTorchServe, model_dir: Path, game_server_processes: list[ServiceProcess]
) -> None:
    assert torchserve.keys is not None
    key = torchserve.keys.inference
    config = AutopilotConfig(track="oval", mode="lockstep", max_ticks=120, width=64, height=48)
    address = (game_server_processes[0].address,)
    served = run_autopilot(config, address, lambda: TorchServeClient(torchserve.inference_address, ModelRef(NAME), key))
    local = run_autopilot(config, address, lambda: InProcessClient.load(model_dir / "model.safetensors"))
    a, b = served.laps[0], local.laps[0]
    assert len(a.keys) == 120 and len(set(a.keys)) > 1  # the keys change along the lap: the test can tell
    assert a.keys == b.keys
    assert (a.x, a.y, a.progress_fraction) == (b.x, b.y, b.progress_fraction)


def test_missing_and_wrong_tokens_are_told_apart(torchserve: LocalTorchServe, tmp_path: Path) -> None:
    frame = _frame()
    with pytest.raises(Unauthenticated, match="requires a token"):
        TorchServeClient(torchserve.inference_address, ModelRef(NAME), None).infer(frame, 1.0, 5.0)
    with pytest.raises(PermissionDenied, match="refused the token"):
        TorchServeClient(torchserve.inference_address, ModelRef(NAME), "not-the-key").infer(frame, 1.0, 5.0)
    (tmp_path / "token").write_text("bare-token\n")
    assert read_token(tmp_path / "token") == "bare-token"
    assert torchserve.keys is not None and read_token(torchserve.key_file) == torchserve.keys.inference


def test_unknown_model_and_unknown_version_are_not_found(torchserve: LocalTorchServe) -> None:
    assert torchserve.keys is not None
    key, frame = torchserve.keys.inference, _frame()
    with pytest.raises(NotFound, match="'nope' not found"):
        TorchServeClient(torchserve.inference_address, ModelRef("nope"), key).infer(frame, 1.0, 5.0)
    with pytest.raises(NotFound, match="no version '9'"):
        TorchServeClient(torchserve.inference_address, ModelRef.parse(f"{NAME}:9"), key).infer(frame, 1.0, 5.0)
    assert TorchServeClient(torchserve.inference_address, ModelRef.parse(f"{NAME}:1"), key).infer(frame, 1.0, 5.0)


def test_malformed_frames_are_invalid_arguments(served: TorchServeClient) -> None:
    with pytest.raises(InvalidArgument, match="takes 48x64"):
        served.infer(np.zeros((96, 128, 3), np.uint8), 1.0, 5.0)
    with pytest.raises(InvalidArgument, match="uint8"):
        served.infer(np.zeros((48, 64), np.uint8), 1.0, 5.0)
    # Bytes that bypass the client's checks are refused by the handler, and that request alone fails.
    raw = inference_pb2.PredictionsRequest(model_name=NAME, input={"frame": b"\x00" * 10, "speed": b"\x00" * 4})
    answer = served.stub.Predictions(raw, timeout=5.0, metadata=served._metadata)
    with pytest.raises(InvalidArgument, match="10 bytes"):
        codec.decode_response(answer.prediction)
    assert served.infer(_frame(), 1.0, 5.0).keys >= 0  # the worker survived


def test_a_server_that_is_down_is_unavailable() -> None:
    client = TorchServeClient(f"127.0.0.1:{free_port()}", ModelRef(NAME), "key")
    with pytest.raises(Unavailable, match="unreachable"):
        client.infer(_frame(), 1.0, 2.0)


def test_a_late_answer_is_deadline_exceeded(served: TorchServeClient) -> None:
    # A thread preempted long enough can find even a 0.1 ms wait answered: ask a few times.
    late = []
    for _ in range(5):
        try:
            served.infer(_frame(), 1.0, 0.0001)
        except DeadlineExceeded as exc:
            late.append(exc)
    assert late and all("deadline" in str(e) or "unanswered" in str(e) for e in late)


@pytest.mark.slow
def test_an_overloaded_server_is_resource_exhausted(archive: Path) -> None:
    errors: list[BaseException] = []
    with LocalTorchServe(TorchServeConfig(job_queue_size=1)) as server:
        server.register(archive)
        assert server.keys is not None
        key = server.keys.inference

        def hammer() -> None:
            client = TorchServeClient(server.inference_address, ModelRef(NAME), key)
            for _ in range(15):
                try:
                    client.infer(_frame(), 1.0, 10.0)
                except Exception as exc:
                    errors.append(exc)
            client.close()

        threads = [threading.Thread(target=hammer) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors, "12 clients against a queue of 1 were all served"
    assert all(isinstance(e, ResourceExhausted) and "overloaded" in str(e) for e in errors), errors[:3]


@pytest.mark.slow
def test_a_real_time_run_counts_every_tick(
    torchserve: LocalTorchServe, game_server_processes: list[ServiceProcess]
) -> None:
    assert torchserve.keys is not None
    key = torchserve.keys.inference
    config = AutopilotConfig(track="oval", mode="realtime", max_ticks=75, width=64, height=48)
    t0 = time.monotonic()
    result = run_autopilot(
        config,
        (game_server_processes[0].address,),
        lambda: TorchServeClient(torchserve.inference_address, ModelRef(NAME), key),
    )
    wall = time.monotonic() - t0
    lap = result.laps[0]
    assert lap.ticks == 75 and lap.stop_reason == "tick budget 75 spent"
    assert 2.9 < wall < 10  # 75 ticks of 40 ms of wall clock
    # Every observation is either skipped (a newer one had arrived: its tick keeps the fallback sent ahead)
    # or answered; the first command was decided before the stream opened, later ones by an answer or a fallback.
    seen = 75 - lap.skipped_frames
    assert len(lap.frame_ms) == seen and len(lap.keys) == seen
    assert len(lap.inference_ms) + lap.fallbacks == seen - 1 == len(lap.slack_ms)
    assert 0 <= lap.missed_ticks <= 75 and lap.late_commands <= 75
    totals = result.totals()
    assert totals["ticks"] == 75 and totals["inference_ms_p50"] is not None


# -- the commands, as processes -------------------------------------------------------------------------------------


def _otlp_receiver() -> tuple[list[tuple[str, bytes]], grpc.Server, dict[str, str]]:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    spans: list[tuple[str, bytes]] = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    spans.extend((s.name, s.trace_id) for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    return spans, server, env


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rrp.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    lines: list[str] = []

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return proc, lines


def _exit_code(proc: subprocess.Popen[str], timeout_s: float, lines: list[str]) -> int:
    """The exit code; a process still running after `timeout_s` fails the test with its threads' stacks."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        spy = Path(sys.executable).with_name("py-spy")
        stacks = subprocess.run([str(spy), "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=30)
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"still running {timeout_s:g} s after SIGTERM\n{''.join(lines[-30:])}\n{stacks.stdout}{stacks.stderr}"
        ) from None


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(lines):
            if text in line:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen:\n{''.join(lines[-30:])}")


@pytest.mark.slow
def test_serve_and_autopilot_stop_on_sigterm_leaving_nothing_behind_with_traced_ticks(
    archive: Path, game_server_processes: list[ServiceProcess], tmp_path: Path
) -> None:
    spans, receiver, env = _otlp_receiver()
    serve, serve_lines = _start(["serve", "--archive", str(archive), "--workdir", str(tmp_path / "serve")])
    try:
        line = _wait_for(serve_lines, "torchserve listening on", serve, 120)
        address = line.split("listening on ")[1].split()[0]
        key_file = line.rsplit("inference token in ", 1)[1].strip()
        key = json.loads(Path(key_file).read_text())["inference"]["key"]
        assert not any(key in text for text in serve_lines), "the token must never be printed"
        workdir = Path(key_file).parent
        game = game_server_processes[1].address
        autopilot, pilot_lines = _start(
            ["autopilot", "--game", game, "--model-server", address, "--token-file", key_file, "--track", "oval",
             "--realtime", "--max-ticks", "100000", "--width", "64", "--height", "48", "--trace-every", "5"],
            env,
        )  # fmt: skip
        time.sleep(4.0)
        autopilot.send_signal(signal.SIGTERM)
        assert _exit_code(autopilot, 15, pilot_lines) == 0, "".join(pilot_lines[-30:])
        totals = json.loads(_wait_for(pilot_lines, '"mode": "realtime"', autopilot, 5))
        assert totals["ticks"] > 25 and totals["inference_ms_p50"] is not None
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(60)
    assert code == 0, "".join(serve_lines[-30:])
    assert any("TorchServe stopped" in line for line in serve_lines)
    assert not _java_processes_under(workdir), "rrp serve left TorchServe processes behind"
    receiver.stop(0)
    names: dict[bytes, set[str]] = {}
    for name, trace_id in spans:
        names.setdefault(trace_id, set()).add(name)
    ticks = [n for n in names.values() if "autopilot.tick" in n]
    assert ticks, f"no sampled tick traced: {sorted({n for n, _ in spans})}"
    assert any({"autopilot.frame", "autopilot.inference", "autopilot.command"} <= n for n in ticks), ticks[:5]
    # The inference call itself is a gRPC client span inside the tick's trace.
    assert any(any("Predictions" in s for s in n) for n in ticks)


def test_commands_register_with_complete_help_and_package_builds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from rrp.cli import build_parser, main
    from trainer.vision.model import build_model

    for name, flags in {
        "package": ("--model", "--version", "--batch-size", "--max-batch-delay-ms", "--workers"),
        "serve": ("--archive", "--grpc-port", "--grpc-management-port", "--metrics-port"),
        "autopilot": ("--game", "--model-server", "--token-file", "--lockstep", "--realtime", "--cars", "--laps"),
    }.items():
        parser = build_parser([name, "--help"])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        text = sub.choices[name].format_help()
        assert all(flag in text for flag in flags), name
    argv = ["autopilot", "--game", "a:1,b:2", "--model-server", "m:3", "--lockstep"]
    args = build_parser(argv).parse_args(argv)
    assert args.mode == "lockstep" and args.game == ("a:1", "b:2")
    (tmp_path / "model").mkdir()
    save_weights(build_model(SMALL), tmp_path / "model" / "model.safetensors")
    code = main(["package", "--model", str(tmp_path / "model"), "--version", "7", "--out", str(tmp_path)])
    assert code == 0 and (tmp_path / "rrp-vision-7.mar").is_file()
    assert str(tmp_path / "rrp-vision-7.mar") in capsys.readouterr().out


@pytest.mark.slow
def test_the_main_jobs_serving_step_writes_its_figures_and_plot(
    model_dir: Path, game_server_processes: list[ServiceProcess], tmp_path: Path
) -> None:
    from pipeline.serving_job import ServingJobConfig, run_serving_job

    figures = run_serving_job(
        model_dir,
        tuple(p.address for p in game_server_processes),
        tmp_path,
        ServingJobConfig(track="oval", max_ticks=50),  # 8 cars (the default) in races, the ONNX archive
    )
    # Two game servers: each one's 4 cars race together, one request a tick for the race.
    assert 1 <= figures["batch_frames_max"] <= 4, figures
    assert "one per race and tick" in figures["markdown"] and "the onnx archive" in figures["markdown"]
    # A car's lap stops at the first tick it observes at or past its budget: on a busy machine a race may skip
    # the frame of tick 50 and see tick 51 first.
    assert figures["cars"] == 8 and 8 * 50 <= figures["ticks"] <= 8 * 55
    assert figures["markdown"].count("| yes |") + figures["markdown"].count("| no |") == 8  # the per-car table
    # On a busy machine every answer may come after its tick's deadline (each tick then gets the fallback); the
    # figures must say so rather than be missing.
    answered = figures["inference_ms_p50"] is not None
    assert figures["missed_ticks"] >= 0 and (answered or figures["fallbacks"] == figures["ticks"]), figures
    assert figures["torchserve_memory_mb"]["jvm_mb"] > 0
    assert "late commands" in figures["markdown"] and "latency.png" in figures["markdown"]
    for name in ("serving.json", "serving.md", "latency.png"):
        assert (tmp_path / name).is_file()
    assert list((tmp_path / "model-store").glob("rrp-vision-*.mar"))
