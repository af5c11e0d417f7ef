"""The chart's training Job asks for GPUs through one value, and only when it is above 0."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_helm_chart import SERVING_ON, by_kind, render


def _train_container(gpu: int | None) -> dict[str, Any]:
    train: dict[str, Any] = {"enabled": True} if gpu is None else {"enabled": True, "gpu": gpu}
    docs = render({**SERVING_ON, "jobs": {**SERVING_ON["jobs"], "train": train}})
    (job,) = [j for name, j in by_kind(docs, "Job").items() if "-train-" in name]
    container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("gpu", [None, 0])
def test_the_training_job_runs_on_the_cpu_by_default(gpu: int | None) -> None:
    container = _train_container(gpu)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    assert "--device" not in container["args"]


def test_train_gpu_requests_that_many_gpus_and_trains_on_cuda() -> None:
    container = _train_container(2)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["cpu"] == "2"  # the other limits stay
    args = container["args"]
    assert args[args.index("--device") + 1] == "cuda"
