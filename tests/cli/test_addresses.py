"""The commands that dial a scheduler refuse what they cannot mean before dialling: an address
whose port is past 65535 (it wrapped around in the resolver: `127.0.0.1:99999` dialled port
34463), and prompt token ids or a max_tokens the protocol cannot carry; and one that is not a
scheduler's API port is named as such."""

from __future__ import annotations

from pathlib import Path

import pytest
from cascadeinfer.cli.main import main

from tests.worker.daemons import SIM_WORKER, workers


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["generate", "--prompt-token-ids", "1,2", "--max-tokens", "1"],
    ],
)
@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1", "127.0.0.1:0"])
def test_an_address_without_a_port_in_range_is_refused_with_a_line(
    argv: list[str], address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--address", address]) == 2
    err = capsys.readouterr().err
    assert f"address: '{address}' is not HOST:PORT (a port in [1, 65535])" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ("-1", "token ids are in [0, 4294967295]"),
        ("4294967296", "token ids are in [0, 4294967295]"),
        ("1,,2", "expected comma-separated integers"),  # it was taken for 1,2
        ("1,x", "expected comma-separated integers"),
    ],
)
def test_prompt_token_ids_out_of_the_protocols_range_are_named(
    ids: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--address", "127.0.0.1:1", "--max-tokens", "1"]
    assert main([*argv, "--prompt-token-ids", ids]) == 2
    assert f"--prompt-token-ids {ids!r}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("max_tokens", ["0", "-1", "4294967296", "99999999999"])
def test_max_tokens_out_of_the_protocols_range_is_named(
    max_tokens: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--address", "127.0.0.1:1", "--prompt-token-ids", "1"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--max-tokens", max_tokens])
    assert e.value.code == 2
    assert f"argument --max-tokens: {max_tokens} is out of range" in capsys.readouterr().err


def test_an_address_that_is_not_a_schedulers_api_port_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A worker answers UNIMPLEMENTED ("Method not found!") to the scheduler's calls.
    with workers([SIM_WORKER], tmp_path) as (worker,):
        for argv in (["status"], ["generate", "--prompt-token-ids", "1", "--max-tokens", "1"]):
            assert main([*argv, "--address", worker.address]) == 1
            err = capsys.readouterr().err
            assert "UNIMPLEMENTED" in err
            assert f"{worker.address} does not serve the scheduler's API" in err
