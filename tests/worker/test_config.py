"""cascade-worker configuration: the shipped example parses, flags override, bad values say why."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from cascadeinfer.security import TOKEN_ENV
from cascadeinfer.worker.config import from_toml, parse_args
from cascadeinfer.worker.engines.factory import vllm_options

from tests.worker.daemons import SIM_WORKER, workers

EXAMPLE = (
    Path(__file__).resolve().parents[2] / "services" / "cascade-worker" / "worker.example.toml"
)


def test_the_shipped_example_parses_and_flags_override_it(tmp_path: Path) -> None:
    assert from_toml(EXAMPLE).engine == "vllm"
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    flags = ["--engine", "sim", "--port", "0", "--sim-time-scale", "0"]
    config = parse_args(["--config", str(EXAMPLE), *flags, "--auth-token-file", str(token)])
    assert (config.engine, config.port, config.sim.time_scale) == ("sim", 0, 0.0)
    assert config.scheduler == "scheduler.internal:50051"
    assert config.auth_token == "t0k3n"


def test_other_hosts_need_a_token_or_mtls_unless_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="--insecure"):
        parse_args(["--host", "0.0.0.0"])
    assert parse_args(["--host", "0.0.0.0", "--insecure"]).insecure
    assert parse_args(["--host", "::1"]).host == "::1"  # loopback needs nothing
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert parse_args(["--host", "10.0.0.7"]).auth_token == "from-env"


def test_vllm_options_and_load_format() -> None:
    config = parse_args(
        ["--engine", "vllm", "--load-format", "dummy", "--vllm-option", "max_model_len=4096"]
    )
    assert config.vllm == {"load_format": "dummy", "max_model_len": 4096}


def test_the_ranks_side_channel_listens_and_is_reached_as_the_daemon_is() -> None:
    """Unless the [vllm] table says otherwise: bound on the daemon's host, advertised as the
    host of its advertise_address (the only place a peer learns it from is GetInfo there)."""
    config = parse_args(["--engine", "vllm", "--host", "0.0.0.0", "--insecure"])
    assert vllm_options(config) == {"kv_peer_host": "0.0.0.0", "kv_peer_advertise_host": "0.0.0.0"}
    argv = ["--engine", "vllm", "--host", "10.0.3.17", "--insecure"]
    config = parse_args([*argv, "--advertise-address", "gpu-3.internal:50061"])
    options = vllm_options(config)
    assert options["kv_peer_host"] == "10.0.3.17"
    assert options["kv_peer_advertise_host"] == "gpu-3.internal"
    config = parse_args(["--engine", "vllm", "--vllm-option", "kv_peer_host=", "--insecure"])
    assert vllm_options(config) == {"kv_peer_host": ""}  # the road turned off


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "vllm", "--vllm-option", "oops"], "KEY=VALUE"),
        (["--port", "70000"], "port"),
        # Each was a traceback (OverflowError), or a bound silently off (NaN never expires).
        (["--metrics-port", "99999"], "metrics_port = 99999: must be in"),
        (["--link-timeout-s", "inf"], "link_timeout_s = inf: must be a finite number > 0"),
        (["--link-timeout-s", "nan"], "link_timeout_s = nan"),
        (["--orphan-timeout-s", "nan"], "orphan_timeout_s = nan"),
        (["--drain-timeout-s", "nan"], "drain_timeout_s = nan: must be a finite number >= 0"),
        # Printed raw by `cascade status` (a screen cleared, a fake row); too long to register.
        (
            ["--worker-id", "ok\n\x1b[2J"],
            r"worker_id: its character 3 \(U\+000A\) is not printable",
        ),
        (["--worker-id", "w" * 300], "worker_id is longer than 256 characters"),
        (["--port", "5000", "--metrics-port", "5000"], "port and metrics_port are both 5000"),
        # Past gRPC's C int of keepalive milliseconds: an OverflowError traceback.
        (["--link-timeout-s", "1e7"], "link_timeout_s = 10000000.0: must be a finite number"),
        # Past 65535 the resolver wrapped the port: 127.0.0.1:70000 dialled port 4464.
        (["--scheduler", "127.0.0.1:70000"], "scheduler: '127.0.0.1:70000' is not HOST:PORT"),
        (["--scheduler", "127.0.0.1"], "scheduler: '127.0.0.1' is not HOST:PORT"),
        (["--advertise-address", "h:99999"], "advertise_address: 'h:99999' is not HOST:PORT"),
    ],
)
def test_bad_values_name_the_field(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_unknown_toml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text('engine = "sim"\nengnie = "vllm"\n')
    with pytest.raises(ValueError, match="engnie"):
        from_toml(path)


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Windows editors write one; tomllib said only "Invalid statement (at line 1, column 1)".
    path = tmp_path / "w.toml"
    path.write_bytes(b"\xef\xbb\xbfport = 5123\n")
    assert parse_args(["--config", str(path)]).port == 5123


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "abc"', "port = 'abc': expected an integer"),
        ("[sim]\nnum_blocks = 1.5", r"\[sim\]: num_blocks = 1.5: expected an integer"),
        ("engine = 3", "engine = 3: expected a string"),
        ("port = [", "w.toml: "),
        # Both were a TypeError traceback from the table's dataclass.
        ("[sim]\ntime_scal = 0.5", r"\[sim\]: unknown keys \['time_scal'\]"),
        ("[tls]\ncerts = 'x.pem'", r"\[tls\]: unknown keys \['certs'\]"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_not_a_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "w.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        from_toml(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "sim", "--sim-num-blocks", "-3"], "sim num_blocks = -3: must be in"),
        (["--engine", "sim", "--sim-num-blocks", "0"], "sim num_blocks = 0: must be in"),
        # The warm-up request could not fit: the worker died at warm-up with a traceback.
        (
            ["--engine", "sim", "--sim-max-model-len", "4"],
            r"sim max_model_len = 4: must be in \[8,",
        ),
        # Past 32 bits: the worker said it served, then died registering.
        (
            ["--engine", "sim", "--sim-max-model-len", "50000000000"],
            "sim max_model_len = 50000000000",
        ),
        (["--engine", "vllm", "--model", "/nonexistent/model"], "no such model directory"),
    ],
)
def test_an_engine_that_could_run_nothing_is_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_num_batched_tokens": 0}, "vllm.max_num_batched_tokens = 0: None or >= 1"),
        ({"max_num_batched_token": 4096}, r"unknown options \['max_num_batched_token'\]"),
    ],
)
def test_a_vllm_option_out_of_bounds_or_unknown_is_named(
    tmp_path: Path, options: dict[str, int], message: str
) -> None:
    from cascadeinfer.worker.engines.vllm_engine import resolve_config

    with pytest.raises(ValueError, match=message):
        resolve_config(str(tmp_path), options).validate()


def test_a_worker_with_the_smallest_sim_vocabulary_starts_and_serves(tmp_path: Path) -> None:
    """--sim-vocab-size 2 is accepted, so the daemon must also warm up and serve with it (its
    warm-up prompt held ids up to 4: the worker died at start with a traceback)."""
    with workers([[*SIM_WORKER, "--sim-vocab-size", "2"]], tmp_path) as (worker,):
        stub = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(worker.address))
        request = worker_pb2.GenerateRequest(
            request_id="r",
            prompt_token_ids=[0, 1, 1],
            sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
        )
        tokens = [t for r in stub.Generate(request, timeout=30) for t in r.tokens.token_ids]
    assert len(tokens) == 3 and set(tokens) <= {0, 1}
