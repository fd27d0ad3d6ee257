"""The committed gRPC stubs are exactly what scripts/gen_proto.sh makes from proto/."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "python" / "cascadeinfer" / "proto" / "v1"


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "proto" / "v1"
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)], check=True, cwd=ROOT)
    generated = sorted(p.name for p in out.iterdir() if p.name != "__init__.py")
    committed = sorted(
        p.name
        for p in COMMITTED.iterdir()
        if p.suffix in {".py", ".pyi"} and p.name != "__init__.py"
    )
    assert generated == committed
    _, mismatch, errors = filecmp.cmpfiles(out, COMMITTED, generated, shallow=False)
    assert not mismatch and not errors, (
        f"stale stubs: {mismatch + errors}; run scripts/gen_proto.sh"
    )
