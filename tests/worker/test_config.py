"""cascade-worker configuration: the shipped example parses, flags override, bad values say why."""

from __future__ import annotations

from pathlib import Path

import pytest
from cascadeinfer.worker.config import from_toml, parse_args

EXAMPLE = (
    Path(__file__).resolve().parents[2] / "services" / "cascade-worker" / "worker.example.toml"
)


def test_the_shipped_example_parses_and_flags_override_it() -> None:
    assert from_toml(EXAMPLE).engine == "vllm"
    config = parse_args(
        ["--config", str(EXAMPLE), "--engine", "sim", "--port", "0", "--sim-time-scale", "0"]
    )
    assert (config.engine, config.port, config.sim.time_scale) == ("sim", 0, 0.0)
    assert config.scheduler == "scheduler.internal:50051"


def test_vllm_options_and_load_format() -> None:
    config = parse_args(
        ["--engine", "vllm", "--load-format", "dummy", "--vllm-option", "max_model_len=4096"]
    )
    assert config.vllm == {"load_format": "dummy", "max_model_len": 4096}


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--engine", "vllm", "--vllm-option", "oops"], "KEY=VALUE"), (["--port", "70000"], "port")],
)
def test_bad_values_name_the_field(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_unknown_toml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text('engine = "sim"\nengnie = "vllm"\n')
    with pytest.raises(ValueError, match="engnie"):
        from_toml(path)
