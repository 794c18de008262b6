"""The command line: info on presets and folders; user mistakes are one line, exit status 2; at its entry the
command asks for huge pages before torch loads and tunes glibc's malloc (unless the user's environment sets
either), while importing blackmamba (or its command module) changes nothing and does not load torch."""

import os
import subprocess
import sys

import pytest
from support.env import checkout_env
from support.models import SMALL, random_model

from blackmamba import BlackMambaConfig
from blackmamba.cli import main
from blackmamba.cli.process import MALLOC_SETTINGS, tune_malloc


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


def test_generate_mistakes_name_the_flag_and_come_before_the_model_loads(tmp_path):
    """The command checks with the API's own validation; a prompt of undecodable bytes is refused in one line."""
    env = checkout_env()
    missing = str(tmp_path / "no-such-model")  # the model's error would come later: these come first
    cases = [(["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"), (["--min-p", "2"], "--min-p 2.0: must be in [0, 1]"),
             (["--top-k", "0"], "--top-k 0: must be an integer >= 1"),
             (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be a number > 0"),
             (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be an integer >= 0")]
    for flags, expected in cases:
        r = subprocess.run([sys.executable, "-m", "blackmamba", "generate", missing, "hi", *flags],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 2 and expected in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    r = subprocess.run([sys.executable.encode(), b"-m", b"blackmamba", b"generate", missing.encode(), b"ROMEO \xff"],
                       capture_output=True, env=env)
    err = r.stderr.decode(errors="replace").strip()
    assert r.returncode == 2 and "not valid UTF-8" in err and err.count("\n") == 0, err


_PROBE = """
import os, sys
before = os.environ.get("THP_MEM_ALLOC_ENABLE")
import blackmamba.cli.process
assert "torch" not in sys.modules and os.environ.get("THP_MEM_ALLOC_ENABLE") == before, "the import changed things"
blackmamba.cli.process.prepare()  # what main() does first
assert "torch" not in sys.modules
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


def test_main_prepares_the_process_first():
    code = ("import os, blackmamba.cli as c; os.environ.pop('THP_MEM_ALLOC_ENABLE', None); "
            "code = c.main(['info', 'tiny']); print(code, os.environ['THP_MEM_ALLOC_ENABLE'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=checkout_env())
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["0", "1"], r.stderr


def test_command_asks_for_huge_pages_before_torch_loads():
    setting, huge_kb = _probe()
    assert setting == "1"
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(thp) or "[never]" in open(thp).read():
        pytest.skip("this kernel gives no transparent huge pages: whether PyTorch asks cannot be seen")
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


class _FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


@pytest.mark.parametrize("environ, applied", [
    ({}, True),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, True),  # not about malloc
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, False),
    ({"MALLOC_ARENA_MAX": "2"}, False),
])
def test_malloc_tuning_leaves_the_users_malloc_settings_alone(environ, applied):
    libc = _FakeLibc()
    assert tune_malloc(environ, libc) is applied
    assert libc.calls == (list(MALLOC_SETTINGS.items()) if applied else [])


def test_malloc_tuning_reports_a_refused_setting_or_a_libc_without_mallopt():
    assert tune_malloc({}, _FakeLibc(result=0)) is False
    assert tune_malloc({}, object()) is False


_FAULTS = """
import resource, sys
applied = False
if sys.argv[1] == "command":
    import blackmamba.cli.process
    blackmamba.cli.process.prepare()  # what the command does at its entry
    applied = blackmamba.cli.process.tune_malloc()  # True where glibc takes the settings
import torch
torch.set_num_threads(1)  # one thread, one arena: with two, a busy machine sometimes sends an allocation
# to a second glibc arena, whose heap is handed back when empty (what this test is not about)
def step():  # a tensor of a few MB allocated, written and freed every step, as a scan's output
    torch.empty(1 << 20).fill_(1.0)
for _ in range(5):
    step()
faults = []  # per step: a step that gets the freed block back faults nothing in
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2], sum(faults), applied)  # the median step, all 20
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_command_keeps_freed_memory_for_the_next_step():
    def faults(mode):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # as the command sets it, in both
        r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        median, total, applied = r.stdout.split()
        return int(median), int(total), applied == "True"

    (tuned, tuned_total, applied), (default, _, _) = faults("command"), faults("plain")  # default: the message
    if not applied:
        pytest.skip("no glibc mallopt here")
    # 20 steps of a 4 MB tensor: the median step faults no page in again (glibc's defaults hand the freed block
    # back to the kernel and fault it in again, 1,024 pages a step, unless its dynamic mmap threshold has already
    # moved). The median, not only the sum: now and then Python's own small allocations split the freed block, and
    # a step takes fresh pages whatever the settings — a few steps of 20 at most (a whole step is 1,024 pages).
    assert tuned < 50, (tuned, default)
    assert tuned_total < 5 * 1100, (tuned_total, default)
