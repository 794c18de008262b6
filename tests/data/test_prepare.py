"""Preparation: chunked shards equal one-pass encoding, an interrupted preparation resumes at its last complete
chunk and ends identical, bad records counted across chunks, and the data prepare / inspect commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.text import play_text

from blackmamba.data import prepare as prep
from blackmamba.data.tokenizer import train_bpe


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = []
    for i in range(60):
        lines.append(json.dumps({"text": play_text(i, 4)}))
        if i % 7 == 3:
            lines.append('{"text": 5}')
    path.write_text("\n".join(lines) + "\n")
    return path


def prepared(jsonl, tok, cache):
    return prep.prepare_data([jsonl], tokenizer=tok, cache=cache)


def test_an_interrupted_preparation_resumes_and_ends_identical(jsonl, tmp_path, monkeypatch):
    tok = train_bpe([play_text(i, 20) for i in range(3)], 300)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 2000)  # many chunks
    whole = prepared(jsonl, tok, tmp_path / "a")
    folder = next((tmp_path / "a" / "tokens").iterdir())
    chunks = sorted(folder.glob("input-00000-chunk-*.json"))
    assert len(chunks) > 5
    # one pass over the same documents, without chunks, gives the same token stream
    monkeypatch.setattr(prep, "CHUNK_CHARS", 1 << 30)
    one = prepared(jsonl, tok, tmp_path / "b")
    assert np.array_equal(np.asarray(one.train), np.asarray(whole.train))
    assert np.array_equal(np.asarray(one.val), np.asarray(whole.val))
    assert one.manifest["inputs"][0]["bad"] == whole.manifest["inputs"][0]["bad"] == {"non-string 'text'": 9}
    # interrupted after chunk 3: the summary, the manifest and the later chunks never got written
    monkeypatch.setattr(prep, "CHUNK_CHARS", 2000)
    (folder / prep.MANIFEST).unlink()
    (folder / "input-00000.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in folder.glob("input-00000-*-0000[0-3].bin")}
    for c in chunks[4:]:
        c.unlink()
    again = prepared(jsonl, tok, tmp_path / "a")
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the complete chunks were not redone
    assert again.manifest == whole.manifest
    assert np.array_equal(np.asarray(again.train), np.asarray(whole.train))


def test_data_prepare_then_inspect(tmp_path, jsonl, capsys, monkeypatch):
    from blackmamba.cli import main

    monkeypatch.setenv("BLACKMAMBA_CACHE", str(tmp_path / "cache"))
    assert main(["data", "prepare", "--data", str(jsonl), "--set", "data.vocab_size=300", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    folder = out[1]
    assert folder.startswith(str(tmp_path / "cache" / "tokens")) and "tokenized" in out[0]
    assert "60 documents" in out[2] and "9 bad records skipped (9 non-string 'text')" in out[2]
    assert main(["data", "inspect", folder]) == 0
    shown = capsys.readouterr().out
    assert "uint16 tokens" in shown and "60 documents" in shown
    # train with the same settings finds the prepared shards: nothing is tokenized again
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(jsonl), "--set", "data.vocab_size=300", "--preset",
                 "tiny", "--set", "data.seq_len=32", "--set", "optim.batch_size=2", "--steps", "1",
                 "--no-progress", "--set", "train.sample_tokens=0"]) == 0
    assert "tokenized" not in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no such manifest" in capsys.readouterr().err


def test_an_unchanged_file_is_not_hashed_again_and_a_changed_one_is(jsonl, tmp_path, monkeypatch):
    import os

    from blackmamba.data.sources import inputs

    memo = tmp_path / "memo.json"
    (first,) = inputs([jsonl], memo=memo)
    key = first.key()
    assert list(json.loads(memo.read_text()).values()) == [key]
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert inputs([jsonl], memo=memo)[0].key() == key and str(jsonl) not in opened  # from the memo
    monkeypatch.undo()
    jsonl.write_text(jsonl.read_text().replace("ROMEO", "JULIET", 1))
    os.utime(jsonl, ns=(1, 1))
    changed = inputs([jsonl], memo=memo)[0].key()
    assert changed != key and len(json.loads(memo.read_text())) == 2
