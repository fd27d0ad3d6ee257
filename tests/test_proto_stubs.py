"""The committed gRPC stubs are exactly what scripts/gen_proto.sh makes from proto/."""

from __future__ import annotations

import filecmp
import re
import subprocess
import tomllib
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


def _floor(requirement_prefix: str) -> tuple[int, ...]:
    """The `>=` floor pyproject.toml gives a runtime dependency, as a version tuple."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(rf"{re.escape(requirement_prefix)}>=([0-9.]+)(,<\d+)?", requirement)
        if match:
            return tuple(int(part) for part in match.group(1).split("."))
    raise AssertionError(f"no {requirement_prefix}>= floor in pyproject.toml's dependencies")


def test_runtime_floors_are_the_versions_the_stubs_check_at_import() -> None:
    """An older grpcio or protobuf refuses to import the stubs, so the package must not allow one."""
    grpc_stub = (COMMITTED / "worker_pb2_grpc.py").read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_stub)
    assert generated, "the gRPC stub no longer names its generator's version"
    grpc_needed = tuple(int(part) for part in generated.group(1).split("."))
    for package in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert _floor(package) == grpc_needed, package

    message_stub = (COMMITTED / "worker_pb2.py").read_text()
    checked = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        message_stub,
    )
    assert checked, "the message stub no longer checks the protobuf runtime's version"
    assert _floor("protobuf") == tuple(int(part) for part in checked.groups())
