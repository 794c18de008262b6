"""blackmamba.files: atomic writes with the umask's permissions, cleanup, the folder lock, output checks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

import blackmamba
from blackmamba.files import (FolderLock, OutputError, atomic_dir, atomic_file, check_free_space, stale_temporaries,
                              umask, write_json, writable_folder)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def with_umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(with_umask):
    assert umask() == with_umask and umask() == with_umask


def test_written_files_and_folders_get_the_umasks_permissions(tmp_path, with_umask):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("x")
    assert mode(tmp_path / "a.json") == 0o666 & ~with_umask
    assert mode(tmp_path / "d") == 0o777 & ~with_umask
    # what users write: a model folder, a release folder, a converted folder, a run's checkpoint
    model = blackmamba.BlackMambaLM(blackmamba.preset("tiny"))
    model.save_pretrained(tmp_path / "native")
    blackmamba.save_release(model, tmp_path / "release")
    from blackmamba.checkpoint.convert import convert

    convert(tmp_path / "native", tmp_path / "converted", "native")
    for folder in ("native", "release", "converted"):
        assert mode(tmp_path / folder) == 0o777 & ~with_umask, folder
        for f in (tmp_path / folder).iterdir():
            assert mode(f) == 0o666 & ~with_umask, f


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "a.json").read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and not stale_temporaries(tmp_path)


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    for v in ("1", "2"):
        with atomic_dir(tmp_path / "d") as d:
            (d / v).write_text(v)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_stale_temporaries_are_what_a_killed_writer_leaves(tmp_path):
    code = ("import os, sys; from blackmamba.files import atomic_file\n"
            f"with atomic_file({str(tmp_path / 'model.safetensors')!r}) as t:\n"
            "    t.write_bytes(b'x' * 10); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    (stale,) = stale_temporaries(tmp_path)
    assert stale.name.startswith(".model.safetensors.") and stale.name.endswith(".tmp")


def test_folder_lock_is_exclusive_and_names_its_holder(tmp_path):
    with FolderLock(tmp_path / "run", "run folder"):
        with pytest.raises(OutputError, match=rf"in use by pid {os.getpid()} "):
            FolderLock(tmp_path / "run", "run folder")
    with FolderLock(tmp_path / "run"):  # released
        pass


def test_output_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file/run: cannot write there \(Not a directory\)"):
        writable_folder(tmp_path / "file" / "run")
    assert writable_folder(tmp_path / "a" / "b").is_dir()
    with pytest.raises(OutputError, match="needs about 1,000,000,000,000 MB"):
        check_free_space(tmp_path, 10**18, "this")
    check_free_space(tmp_path, 1, "this")
