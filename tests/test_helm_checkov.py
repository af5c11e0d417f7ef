"""checkov on the chart's rendered manifests, for every values file: no failed check but the justified skips.

checkov lives in its own environment (`.venv-checkov/`, made by scripts/setup.sh): its install is large and pins
many packages of its own. One checkov run per values file, all at once: its graph checks (does a pod have a
NetworkPolicy?) match resources across every file it scans, whatever their namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm_chart import VALUES, render, values

ROOT = Path(__file__).resolve().parents[1]
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
SKIPS = ROOT / "deploy" / "helm" / "checkov-skips.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHECKOV.exists(), reason="checkov's own environment (scripts/setup.sh makes it)"),
]


def _scan(folders: list[Path]) -> dict[Path, dict[str, Any]]:
    """checkov's JSON report for each folder, the scans running side by side (offline: --skip-download)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # checkov's packages, not the project's
    procs = {
        folder: subprocess.Popen(
            [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "--skip-download", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for folder in folders
    }
    reports = {}
    for folder, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode in (0, 1) and out.startswith("{"), err[-3000:]  # 1: some check failed
        reports[folder] = json.loads(out)
    return reports


def _skipped(skips: dict[str, dict[str, Any]], check: str, resource: str) -> bool:
    entry = skips.get(check)
    return entry is not None and any(fnmatch(resource, p) for p in entry.get("resources", ["*"]))


def test_checkov_passes_every_values_file_but_the_justified_skips(tmp_path: Path) -> None:
    skips: dict[str, dict[str, Any]] = yaml.safe_load(SKIPS.read_text())
    assert all(len(entry["why"]) > 40 for entry in skips.values()), "each skip says why"
    sets = {name: values(name) for name in VALUES}
    for name, vals in sets.items():
        folder = tmp_path / name
        folder.mkdir()
        for i, doc in enumerate(render(vals)):
            (folder / f"{i:02d}-{doc['kind']}.yaml").write_text(yaml.safe_dump(doc))
    reports = _scan([tmp_path / name for name in sets])
    used = set()
    for name in sets:
        results = reports[tmp_path / name]["results"]
        passed = len(results["passed_checks"])
        failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
        left = [(check, resource) for check, resource in failed if not _skipped(skips, check, resource)]
        used |= {check for check, _ in failed} & skips.keys()
        print(f"checkov {name}: {passed} passed, {len(failed)} failed; {len(left)} failed past the skips")
        assert passed > 100, name
        assert left == [], f"{name}: {left}"
    assert used == skips.keys(), f"skips no values file needs any more: {skips.keys() - used}"
