"""ghz, the standard gRPC load tester, against a sim-backed cluster: a bounded run of 2,000
streaming Generate calls at 100 concurrent streams finishes with no error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.worker.daemons import start_scheduler, workers

GHZ = Path(sys.executable).parent / "ghz"
SCENARIO = Path(__file__).resolve().parents[2] / "bench" / "ghz" / "generate_short.json"
SIM = ["--engine", "sim", "--sim-kv-bytes-per-token", "64", "--sim-max-model-len", "8192"]


def test_2000_streams_at_100_concurrency_finish_without_error(tmp_path: Path) -> None:
    with workers([SIM] * 6, tmp_path) as daemons:
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(
            ["--workers", addresses, "--stages", "0-256:2,256-512:2,512-8192:2"], tmp_path
        )
        try:
            out = subprocess.run(
                [str(GHZ), "--config", SCENARIO.name, "--format", "json", scheduler.address],
                cwd=SCENARIO.parent,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            scheduler.stop()
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["count"] == 2000
    assert report["statusCodeDistribution"] == {"OK": 2000}, report.get("errorDistribution")
