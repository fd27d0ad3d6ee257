"""The commands that dial a scheduler refuse an address they cannot mean, before dialling: a
port past 65535 wrapped around in the resolver (`127.0.0.1:99999` dialled port 34463)."""

from __future__ import annotations

import pytest
from cascadeinfer.cli.main import main


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
