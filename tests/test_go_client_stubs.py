"""The committed Go code in clients/go/gen is exactly what scripts/gen_go_client.sh makes from
proto/ with the pinned plugins that scripts/bootstrap.sh installs."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "clients" / "go" / "gen" / "cascadeinfer" / "v1"


def test_generated_go_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_go_client.sh"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    out = tmp_path / "cascadeinfer" / "v1"
    generated = sorted(p.name for p in out.iterdir())
    assert generated == sorted(p.name for p in COMMITTED.iterdir())
    assert generated == ["common.pb.go", "scheduler.pb.go", "scheduler_grpc.pb.go"]
    _, mismatch, errors = filecmp.cmpfiles(out, COMMITTED, generated, shallow=False)
    assert not mismatch and not errors, (
        f"stale Go code: {mismatch + errors}; run scripts/gen_go_client.sh"
    )
