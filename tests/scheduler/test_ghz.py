"""ghz, the standard gRPC load tester, against a sim-backed cluster: a bounded run of 2,000
streaming Generate calls at 100 concurrent streams finishes with no error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.worker.daemons import sim_cluster

GHZ = Path(sys.executable).parent / "ghz"
SCENARIO = Path(__file__).resolve().parents[2] / "bench" / "ghz" / "generate_short.json"


def test_2000_streams_at_100_concurrency_finish_without_error(tmp_path: Path) -> None:
    stages = ["--stages", "0-256:2,256-512:2,512-8192:2"]
    with sim_cluster(6, stages, tmp_path) as (scheduler, _):
        out = subprocess.run(
            [str(GHZ), "--config", SCENARIO.name, "--format", "json", scheduler.address],
            cwd=SCENARIO.parent,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["count"] == 2000
    assert report["statusCodeDistribution"] == {"OK": 2000}, report.get("errorDistribution")
