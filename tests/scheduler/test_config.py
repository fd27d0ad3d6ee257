"""cascade-scheduler configuration: the example file, flags over the file, clear errors."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from cascadeinfer.config import POLICY_NAMES
from cascadeinfer.scheduler.config import SchedulerConfig, from_toml, parse_args
from cascadeinfer.security import CLIENT_TOKEN_ENV, TOKEN_ENV, read_caller_token
from cascadeinfer.toml_config import MAX_CONFIG_BYTES
from cascadeinfer.worker.config import parse_args as parse_worker_args
from cascadeinfer.worker.tiny_model import write_tiny_llama

from tests.scheduler.certs import make_certs

EXAMPLE = Path(__file__).parents[2] / "services/cascade-scheduler/scheduler.example.toml"


def test_example_config_parses() -> None:
    config = from_toml(EXAMPLE)
    assert config.port == 50051
    assert config.tls.ca.endswith("ca.pem") and not config.tls.require_client_cert
    assert config.max_optional_migrations_per_s == 4.0


def test_example_config_lists_every_policy() -> None:
    """The comment beside `policy` is where a reader of the example learns the choices."""
    line = next(li for li in EXAMPLE.read_text().splitlines() if li.startswith("policy ="))
    listed = line.split("#", 1)[1].split("|")
    assert [name.strip() for name in listed] == list(POLICY_NAMES)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('policy = "llumnix"\nworkers = ["a:1", "b:2"]\nmax_queue = 7\n')
    config = parse_args(["--config", str(path), "--policy", "least-load"])
    assert config.policy == "least-load"
    assert config.workers == ("a:1", "b:2") and config.min_workers == 2
    assert config.max_queue == 7


def test_the_capacity_guard_is_on_unless_turned_off(tmp_path: Path) -> None:
    assert parse_args([]).is_capacity_guarded
    assert not parse_args(["--no-capacity-guard"]).is_capacity_guarded
    path = tmp_path / "s.toml"
    path.write_text("is_capacity_guarded = false\n")
    assert not parse_args(["--config", str(path)]).is_capacity_guarded


def test_the_first_token_level_comes_from_flags_or_the_file(tmp_path: Path) -> None:
    default = parse_args([])
    assert (default.ttft_slo_s, default.ttft_slo_per_token_s) == (1.0, 2e-4)
    flags = parse_args(["--ttft-slo-s", "0.5", "--ttft-slo-per-token-s", "1e-4"])
    assert (flags.ttft_slo_s, flags.ttft_slo_per_token_s) == (0.5, 1e-4)
    path = tmp_path / "s.toml"
    path.write_text("ttft_slo_s = 2\nttft_slo_per_token_s = 0.0\n")
    config = parse_args(["--config", str(path)])
    assert (config.ttft_slo_s, config.ttft_slo_per_token_s) == (2, 0.0)
    path.write_text('ttft_slo_s = "fast"\n')
    with pytest.raises(ValueError, match="ttft_slo_s = 'fast'"):
        parse_args(["--config", str(path)])


def test_stages_in_the_file_may_be_a_list_of_parts(tmp_path: Path) -> None:
    """A TOML list is what a reader of the example writes; it ended in a traceback."""
    path = tmp_path / "s.toml"
    path.write_text('stages = ["0-256:1", "256-8192:2"]\nmin_workers = 3\n')
    assert [(s.min_len, s.max_len, s.num_workers) for s in from_toml(path).stages] == [
        (0, 256, 1),
        (256, 8192, 2),
    ]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("max_queu = 3\n")
    with pytest.raises(ValueError, match="max_queu"):
        from_toml(path)


def test_a_client_presents_its_file_its_client_token_or_the_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CLIENT_TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, "cluster")
    assert read_caller_token("") == "cluster"
    monkeypatch.setenv(CLIENT_TOKEN_ENV, "client")
    assert read_caller_token("") == "client"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    assert read_caller_token(str(token)) == "from-file"


def test_token_comes_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert parse_args([]).auth_token == "from-env"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    config = parse_args(["--auth-token-file", str(token)])
    assert config.auth_token == "from-file"
    assert "from-file" not in repr(config), "the token must never reach a log line"
    token.write_text("")
    with pytest.raises(ValueError, match="empty"):
        parse_args(["--auth-token-file", str(token)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "x.pem"], "both cert and key"),
        (["--tls-require-client-cert"], "needs ca"),
        (["--tokenizer", "/nonexistent"], "no tokenizer.json"),
        (["--max-concurrent-migrations", "0"], "max_concurrent_migrations"),
        (["--ttft-slo-s", "-1"], "ttft_slo_s"),
        (["--ttft-slo-per-token-s", "nan"], "ttft_slo_per_token_s"),
        (["--workers", "not-an-address"], "'not-an-address' is not HOST:PORT"),
        (["--workers", "127.0.0.1:5000,127.0.0.1"], "'127.0.0.1' is not HOST:PORT"),
        (["--workers", "h:0"], "'h:0' is not HOST:PORT"),
        # It waited for two workers for good, silently, with one there.
        (["--workers", "h:5000,h:5001,h:5000"], "'h:5000' is listed twice"),
        # -1 routed as if it said 1, and 0 fell back to the default, both without a word.
        (["--min-workers", "-1"], r"min_workers = -1: must be in \[1, 4096\]"),
        (["--min-workers", "0"], r"min_workers = 0: must be in \[1, 4096\]"),
        (["--min-workers", str(10**23)], r"min_workers = 10{23}: must be in"),
        # Checked at start, not once the workers are there (after the servers listened).
        (["--stages", "100-0:1"], r"stages\[0\].min_len = 100: must be 0"),
        (["--stages", "0-100:1,50-8192:1"], r"stages\[1\].min_len = 50: must be 100"),
        (["--stages", "0-100:1,100-100:1"], r"stages\[1\] = \[100, 100\): must be non-empty"),
        (["--stages", "0-100:0,100-200:1"], "has 0 workers"),
        # The first plan came with one worker up: the scheduler served, then stopped.
        (
            ["--workers", "h:1,h:2", "--min-workers", "1", "--stages", "0-96:1,96-2048:1"],
            "stages ask for 2 workers, more than min_workers = 1",
        ),
        (["--stages", "0-96:1,96-2048:1"], "stages ask for 2 workers, more than min_workers = 1"),
        # A workload the first plan cannot read: it stopped the scheduler, or left it refusing.
        (["--workload", "/nonexistent.jsonl"], "neither a preset"),
        (["--rate", "-3"], "rate = -3.0: must be > 0"),
        (["--rate", "nan"], "rate = nan"),
        (["--arrival-cv", "0"], "arrival_cv = 0.0: must be > 0"),
        (["--arrival-cv", "inf"], "arrival_cv = inf"),
        # NaN passed every `<= 0` check: a NaN tick started a scheduler that died at its first
        # tick with a traceback; a NaN link timeout said "cannot convert float NaN to integer".
        (["--tick-interval-s", "nan"], "tick_interval_s = nan: must be a finite number > 0"),
        (["--tick-interval-s", "inf"], "tick_interval_s = inf"),  # it would never tick
        (["--worker-link-timeout-s", "nan"], "worker_link_timeout_s = nan"),
        (["--worker-call-timeout-s", "inf"], "worker_call_timeout_s = inf"),
        (["--migration-timeout-s", "nan"], "migration_timeout_s = nan"),
        (["--max-optional-migrations-per-s", "nan"], "max_optional_migrations_per_s = nan"),
        # A metrics port out of range was the socket module's OverflowError, with a traceback.
        (["--metrics-port", "99999"], "metrics_port = 99999: must be in"),
        (["--metrics-port", "-1"], "metrics_port = -1: must be in"),
        # As good as no bound on a buffer.
        (["--max-queue", str(10**29)], r"max_queue = 10{29}: must be in \[0, 1000000\]"),
        # Finite but past gRPC's integers: an OverflowError traceback once the first worker
        # linked; a call timeout of 1e10 s failed every call at once, one of 1e-7 s queued
        # every placement again without end.
        (["--worker-link-timeout-s", "1e7"], "worker_link_timeout_s = 10000000.0: must be a"),
        (["--worker-call-timeout-s", "1e10"], "at most 1e\\+06"),
        (["--worker-call-timeout-s", "1e-7"], "worker_call_timeout_s = 1e-07: must be at least"),
        (["--migration-timeout-s", "0.001"], "migration_timeout_s = 0.001: must be at least"),
        (["--max-prompt-bytes", "3000000000"], "max_prompt_bytes = 3000000000: must be in"),
        # Refused at the second bind as "the port is in use", naming neither flag.
        (["--port", "5000", "--health-port", "5000"], "port and health_port are both 5000"),
        (["--metrics-port", "5001", "--health-port", "5001"], "metrics_port and health_port"),
    ],
)
def test_bad_settings_are_refused_clearly(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_defaults_validate() -> None:
    SchedulerConfig().validate()


def test_a_body_budget_below_one_body_is_refused(tmp_path: Path) -> None:
    model_dir = write_tiny_llama(tmp_path / "model")
    http = SchedulerConfig(http_port=0, tokenizer=str(model_dir))
    http.validate()
    with pytest.raises(ValueError, match="http_max_body_bytes_in_flight = 1000: must be at least"):
        replace(http, http_max_body_bytes_in_flight=1000).validate()


def test_tls_files_that_do_not_load_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Before, a file that is not PEM (or a key of another certificate) passed the check and
    gRPC failed to bind with a RuntimeError traceback, exit 1, naming neither file."""
    good = make_certs(tmp_path / "good")
    other = make_certs(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    parse_args(["--tls-cert", str(good.cert), "--tls-key", str(good.key), "--tls-ca", str(good.ca)])
    cases = [
        (garbage, good.key, good.ca, "cert"),
        (good.cert, garbage, good.ca, "key"),
        (good.cert, other.key, good.ca, "key"),
        (good.cert, good.key, garbage, "ca"),
    ]
    for cert, key, ca, bad in cases:
        argv = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
        with pytest.raises(ValueError, match=f"tls: {bad} = .* does not load"):
            parse_args(argv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "abc"', "port = 'abc': expected an integer"),
        ("workers = 5", "workers = 5: expected a list of a string"),
        ("insecure = 1", "insecure = 1: expected true or false"),
        ('tls = "x"', "tls must be a table"),
        ("[tls]\ncert = 3", r"\[tls\]: cert = 3: expected a string"),
        # Both were a traceback (TypeError; AttributeError from deep inside the validation).
        ("[tls]\ncerts = 'x.pem'", r"\[tls\]: unknown keys \['certs'\]"),
        ("stages = [256]", "stages = \\[256\\]: expected a string 'MIN-MAX:WORKERS"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_not_a_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        from_toml(path)


def test_config_files_a_daemon_cannot_read_are_refused_naming_the_file(tmp_path: Path) -> None:
    """A FIFO hung the daemon at start without a word, /dev/zero grew it to 9.5 GB, and a file
    nested 100,000 deep ended it with a 3,000-line RecursionError traceback."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "a" * (MAX_CONFIG_BYTES + 10) + "\n")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"port = \xff\n")
    cases = [
        (fifo, "not a regular file"),
        (Path("/dev/zero"), "not a regular file"),
        (deep, "nested too deeply|TOML|Invalid"),
        (huge, "over 1048576 bytes"),
        (binary, "not UTF-8"),
        (tmp_path / "missing.toml", "No such file"),
    ]
    for path, message in cases:
        for parse in (parse_args, parse_worker_args):
            with pytest.raises(ValueError, match=message) as caught:
                parse(["--config", str(path)])
            assert str(path) in str(caught.value)


def test_token_and_certificate_files_a_daemon_cannot_read_are_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    """Read whole, `/dev/zero` as a token file grew a scheduler to 5.9 GB in 3 s (and `cascade
    status` to 7 GB), and a FIFO as the client tokens file hung the scheduler at start."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge"
    huge.write_text("t" * (2 << 20))
    for path, message in [
        (fifo, "not a regular file"),
        (Path("/dev/zero"), "not a regular file"),
        (huge, "over"),
    ]:
        for args, what in [
            (["--auth-token-file", str(path)], "auth token file"),
            (["--client-tokens-file", str(path)], "client tokens file"),
        ]:
            with pytest.raises(ValueError, match=message) as caught:
                parse_args(args)
            assert f"{what} {str(path)!r}" in str(caught.value)
        with pytest.raises(ValueError, match=message):
            parse_worker_args(["--engine", "sim", "--auth-token-file", str(path)])
        with pytest.raises(ValueError, match=message):
            read_caller_token(str(path))
    with pytest.raises(ValueError, match=r"tls: cert = .*: not a regular file"):
        parse_args(["--tls-cert", "/dev/zero", "--tls-key", "/dev/zero"])


def test_a_token_too_long_for_grpc_metadata_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20,000 characters were taken at start, and every call then failed: gRPC refuses
    metadata past 16 KiB (RESOURCE_EXHAUSTED)."""
    monkeypatch.setenv(TOKEN_ENV, "t" * 20_000)
    with pytest.raises(ValueError, match=r"\$CASCADE_AUTH_TOKEN: a token must be at most 4096"):
        parse_args([])
    monkeypatch.setenv(TOKEN_ENV, "t" * 4096)
    assert parse_args([]).auth_token == "t" * 4096
