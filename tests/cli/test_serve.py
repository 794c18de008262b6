"""``blackmamba serve`` mistakes: one line, exit status 2, before the model loads (flags checked by the engine's
own validation; a port that is taken; a model that is not there). The server itself: tests/serve/test_server.py."""

import socket

import pytest

from blackmamba.cli import main


@pytest.mark.parametrize("flags,expected", [
    (["--max-batch", "0"], "--max-batch 0: must be an integer >= 1"),
    (["--max-context", "1"], "--max-context 1: must be an integer >= 2"),
    (["--prefix-cache-mb", "-5"], "--prefix-cache-mb -5.0: must be a number >= 0"),
    (["--max-queue", "-1"], "--max-queue -1: must be an integer >= 0"),
    (["--port", "70000"], "--port 70000: must be in 0..65535"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout -1.0: must be >= 0"),
])
def test_flag_mistakes_name_the_flag(tmp_path, capsys, flags, expected):
    assert main(["serve", str(tmp_path / "no-such-model"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and err.count("\n") == 0, err


def test_a_taken_port_and_a_missing_model_are_one_line(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "no-such-model"), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 0, err
    assert main(["serve", str(tmp_path / "no-such-model"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and err.count("\n") == 0, err
