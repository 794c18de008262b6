"""The command line: info on presets and folders; user mistakes are one line, exit status 2."""

import subprocess
import sys

from conftest import SMALL, random_model

from blackmamba import BlackMambaConfig
from blackmamba.cli import main


def test_info_on_preset(capsys):
    assert main(["info", "blackmamba-2.8b"]) == 0
    out = capsys.readouterr().out
    assert "2,783,213,584 total, 628,770,832 active" in out
    assert 'pattern         ["r", "8"] × 18' in out


def test_info_on_folder(tmp_path, capsys):
    random_model(BlackMambaConfig(**SMALL)).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "native format" in capsys.readouterr().out


def test_user_mistake_is_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "blackmamba", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr
    assert "Traceback" not in r.stderr
