"""The command line: info on presets and folders; user mistakes are one line, exit status 2; the command
asks for huge pages before torch loads, and ``import blackmamba`` does not load torch."""

import os
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


_PROBE = """
import os, sys
import blackmamba.cli
assert "torch" not in sys.modules, "importing the command imported torch before setting its allocator options"
import torch
x = torch.ones(4 << 20)  # 16 MB: above PyTorch's 2 MB huge-page threshold
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")] if sys.platform == "linux" else []
print(os.environ["THP_MEM_ALLOC_ENABLE"], huge[0].split()[1] if huge else "-")
"""


def _probe(env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_command_asks_for_huge_pages_before_torch_loads():
    setting, huge_kb = _probe()
    assert setting == "1"
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[never]" not in open(thp).read():
        assert int(huge_kb) >= 2048  # PyTorch honoured it: the 16 MB tensor sits on 2 MB pages


def test_users_huge_page_setting_wins():
    setting, _ = _probe("0")
    assert setting == "0"


def test_package_exports_resolve_lazily():
    import blackmamba

    for name in blackmamba.__all__:
        assert getattr(blackmamba, name) is not None
    assert set(blackmamba.__all__) <= set(dir(blackmamba))
    r = subprocess.run([sys.executable, "-c", "import blackmamba, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
