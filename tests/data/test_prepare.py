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
    (folder,) = (tmp_path / "a" / "tokens" / "inputs").iterdir()
    chunks = sorted(folder.glob("chunk-*.json"))
    assert len(chunks) > 5
    # one pass over the same documents, without chunks, gives the same token stream
    monkeypatch.setattr(prep, "CHUNK_CHARS", 1 << 30)
    one = prepared(jsonl, tok, tmp_path / "b")
    assert np.array_equal(np.asarray(one.train), np.asarray(whole.train))
    assert np.array_equal(np.asarray(one.val), np.asarray(whole.val))
    assert one.manifest["inputs"][0]["bad"] == whole.manifest["inputs"][0]["bad"] == {"non-string 'text'": 9}
    monkeypatch.setattr(prep, "CHUNK_CHARS", 2000)
    # interrupted after its last chunk, before the summary: nothing is read again, nothing counted twice
    (folder / "input.json").unlink()
    again = prepared(jsonl, tok, tmp_path / "a")
    assert again.manifest["inputs"] == whole.manifest["inputs"]
    assert sorted(folder.glob("chunk-*.json")) == chunks
    # interrupted after chunk 3: the summary and the later chunks never got written
    (folder / "input.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in folder.glob("*-0000[0-3].bin")}
    for c in chunks[4:]:
        c.unlink()
    again = prepared(jsonl, tok, tmp_path / "a")
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the complete chunks were not redone
    assert again.manifest["inputs"] == whole.manifest["inputs"]
    assert np.array_equal(np.asarray(again.train), np.asarray(whole.train))


def test_a_changed_input_is_tokenized_again_and_the_others_are_not(jsonl, tmp_path):
    tok = train_bpe([play_text(i, 20) for i in range(3)], 300)
    other = tmp_path / "d.txt"
    other.write_text(play_text(3, 40))
    prep.prepare_data([jsonl, other], tokenizer=tok, cache=tmp_path / "c")
    folders = {p.name: {q.name: q.stat().st_mtime_ns for q in p.iterdir()}
               for p in (tmp_path / "c" / "tokens" / "inputs").iterdir()}
    other.write_text(play_text(4, 40))
    changed = prep.prepare_data([jsonl, other], tokenizer=tok, cache=tmp_path / "c")
    now = {p.name: {q.name: q.stat().st_mtime_ns for q in p.iterdir()}
           for p in (tmp_path / "c" / "tokens" / "inputs").iterdir()}
    # the JSONL's folder is untouched (and the old text's stays, unused): only the changed file was tokenized
    assert len(now) == 3 and all(now[k] == v for k, v in folders.items())
    assert changed.manifest["inputs"][1]["documents"] == 1


def test_shards_read_as_one_array_across_boundaries_and_empty_shards(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from blackmamba.data.dataset import ShardedTokens

    sizes = [5, 0, 1, 7, 0, 3]
    shards, start = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"s{i}.bin"
        np.arange(start, start + n, dtype=np.uint16).tofile(path)
        shards.append((path, n))
        start += n
    tokens = ShardedTokens(shards, np.uint16, 0, {})
    whole = np.arange(start, dtype=np.uint16)
    assert len(tokens) == start and np.array_equal(np.asarray(tokens), whole)

    @settings(max_examples=200, deadline=None)
    @given(a=st.integers(-20, 20), b=st.integers(-20, 20))
    def check(a, b):
        assert np.array_equal(tokens[a:b], whole[a:b])

    check()
    assert tokens[-1] == whole[-1] and tokens[5] == 5
    ShardedTokens.OPEN_SHARDS = 2  # fewer maps open than shards: still the same values
    ShardedTokens._open.clear()
    try:
        assert np.array_equal(np.asarray(ShardedTokens(shards, np.uint16, 0, {})), whole)
        assert len(ShardedTokens._open) <= 2
    finally:
        ShardedTokens.OPEN_SHARDS = 64
    (tmp_path / "s3.bin").unlink()
    with pytest.raises(Exception, match="a token shard is missing; delete"):
        ShardedTokens(shards, np.uint16, 0, {})


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

    from blackmamba.data.sources import Memo, inputs

    memo_path = tmp_path / "memo.json"
    memo = Memo(memo_path)
    (first,) = inputs([jsonl], memo=memo)
    key = first.key()
    memo.save()
    assert list(json.loads(memo_path.read_text()).values()) == [key]
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert inputs([jsonl], memo=Memo(memo_path))[0].key() == key and str(jsonl) not in opened  # from the memo
    monkeypatch.undo()
    moved = tmp_path / "moved.jsonl"
    os.link(jsonl, moved)
    assert inputs([moved])[0].key() == key  # the content, not the name
    jsonl.write_text(jsonl.read_text().replace("ROMEO", "JULIET", 1))
    os.utime(jsonl, ns=(1, 1))
    memo = Memo(memo_path)
    changed = inputs([jsonl], memo=memo)[0].key()
    memo.save()
    assert changed != key and len(json.loads(memo_path.read_text())) == 2
