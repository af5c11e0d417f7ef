"""Where an `rrp serve` can be reached: the endpoints file it writes into its working directory, and what the
deployer resolves from it (the shared model store, the inference address and its token)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing.errors import FailedPrecondition, NotFound, quote
from serving.client import read_token
from serving.registry import Registry, read_json, write_json
from serving.rollout.records import dump_record, load_record
from serving.torchserve import KEY_FILE

if TYPE_CHECKING:
    from serving.torchserve import LocalTorchServe

ENDPOINTS_FILE = "endpoints.json"  # written by `rrp serve` into its working directory


@dataclass(frozen=True)
class ServedEndpoints:
    """The endpoints file: what `rrp deploy` and `rrp autopilot` need to find an `rrp serve` (no keys)."""

    inference: str = ""  # gRPC inference address
    management: str = ""  # gRPC management address (loopback only)
    metrics: str = ""  # TorchServe's metrics URL
    model_store: str = ""
    routing: str = ""  # the registry's routing.json


def write_endpoints(serve_dir: Path, server: LocalTorchServe) -> None:
    """Written by `rrp serve` once its TorchServe is up."""
    endpoints = ServedEndpoints(
        inference=server.inference_address, management=server.management_address, metrics=server.metrics_url,
        model_store=str(server.model_store), routing=str(Registry(server.model_store).routing_path),
    )  # fmt: skip
    write_json(serve_dir / ENDPOINTS_FILE, dump_record(endpoints))


def read_endpoints(serve_dir: Path) -> ServedEndpoints | None:
    """The serve directory's endpoints file; None when there is none."""
    path = serve_dir / ENDPOINTS_FILE
    return load_record(ServedEndpoints, read_json(path)) if path.is_file() else None


def model_store_of(serve_dir: Path) -> Path:
    """The model store of an `rrp serve` working directory: the one its endpoints file names, else its own."""
    written = read_endpoints(serve_dir)
    if written is not None and written.model_store:
        return Path(written.model_store)
    if (serve_dir / "model-store").is_dir():
        return serve_dir / "model-store"
    raise NotFound(
        f"no model store under {serve_dir}: give --model-store, or start rrp serve --workdir {quote(str(serve_dir))}"
    )


@dataclass(frozen=True)
class Endpoints:
    """What the deployer reaches: the shared model store (the registry), and TorchServe's inference API for the gate.

    No management address: model servers follow the registry themselves (`serving.reconcile`)."""

    model_store: Path
    inference: str
    inference_key: str | None

    @classmethod
    def resolve(cls, serve_dir: Path, model_store: Path | None, inference: str, token_file: Path | None) -> Endpoints:
        """Each one given, else from the serve directory's endpoints file and key file."""
        written = read_endpoints(serve_dir) or ServedEndpoints()
        store = model_store or (Path(written.model_store) if written.model_store else serve_dir / "model-store")
        inference = inference or written.inference
        if not inference:
            raise FailedPrecondition(
                f"no model server: start one (rrp serve --workdir {serve_dir}), or give --model-server ADDR"
            )
        if token_file is None and (serve_dir / KEY_FILE).is_file():
            token_file = serve_dir / KEY_FILE
        return cls(store, inference, read_token(token_file))
