"""The formats users bring: JSONL (plain, gzip, zstd), Parquet, Hugging Face datasets, folders and globs; bad
records counted by reason, never dropped silently; records held out whole for validation."""

from __future__ import annotations

import gzip
import json

import pytest
from support.text import play_text

from blackmamba.data.corpus import DataError, load_corpus
from blackmamba.data.sources import read_sources

GOOD = [play_text(i, 3) for i in range(12)]


def write_jsonl(path, records, opener=open):
    with opener(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


def test_jsonl_records_and_every_kind_of_bad_one(tmp_path):
    bad = [b"{not json", b"[1, 2]", {"title": "no text"}, {"text": None}, {"text": 7}, b'{"text": "\xff\xfe"}']
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(GOOD[:6])] + bad + [b"   "])
    docs, report = read_sources([tmp_path / "a.jsonl"])
    assert [d.text for d in docs] == GOOD[:6] and all(d.record for d in docs)
    (src,) = report.sources
    assert src.documents == 6 and src.bytes == sum(len(t.encode()) for t in GOOD[:6])
    assert dict(src.bad) == {"invalid JSON": 1, "not a JSON object": 1, "missing 'text'": 2,
                             "non-string 'text'": 1, "invalid UTF-8": 1}
    assert "6 bad records skipped" in report.describe() and "2 missing 'text'" in report.describe()


def test_gzip_and_zstd_jsonl_and_another_field(tmp_path):
    write_jsonl(tmp_path / "b.jsonl.gz", [{"body": t} for t in GOOD[:4]], opener=gzip.open)
    docs, _ = read_sources([tmp_path / "b.jsonl.gz"], text_field="body")
    assert [d.text for d in docs] == GOOD[:4]
    raw = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in GOOD[:3])
    try:
        import zstandard as zstd
    except ImportError:
        (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(DataError, match=r"pip install 'blackmamba\[data\]'"):
            read_sources([tmp_path / "c.jsonl.zst"])
        return
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(raw))
    docs, _ = read_sources([tmp_path / "c.jsonl.zst"])
    assert [d.text for d in docs] == GOOD[:3]


def test_parquet_row_groups_nulls_and_a_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = GOOD[:7] + [None]
    pq.write_table(pa.table({"text": texts, "n": list(range(8))}), tmp_path / "d.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups == 3
    docs, report = read_sources([tmp_path / "d.parquet"])
    assert [d.text for d in docs] == GOOD[:7] and dict(report.sources[0].bad) == {"missing 'text'": 1}
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        read_sources([tmp_path / "d.parquet"], text_field="body")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        (tmp_path / "e.parquet").write_bytes(b"not parquet")
        read_sources([tmp_path / "e.parquet"])


def test_a_hugging_face_dataset_from_a_local_folder(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": t} for t in GOOD[:5]] + [{"text": None}])
    docs, report = read_sources([f"hf:{folder}"])
    assert [d.text for d in docs] == GOOD[:5] and dict(report.sources[0].bad) == {"missing 'text'": 1}
    with pytest.raises(DataError, match=r"hf:.*:no-such-split: could not load the dataset"):
        read_sources([f"hf:{folder}::no-such-split"])
    with pytest.raises(DataError, match="expected hf:NAME"):
        read_sources(["hf:"])


def test_folders_and_globs_mix_formats_in_path_order(tmp_path):
    d = tmp_path / "mix"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(GOOD[0])
    write_jsonl(d / "sub" / "b.jsonl", [{"text": GOOD[1]}, {"text": GOOD[2]}])
    (d / ".hidden.jsonl").write_text(json.dumps({"text": "never"}) + "\n")
    (d / "notes.csv").write_text("ignored")
    docs, report = read_sources([d])
    assert [x.text for x in docs] == GOOD[:3] and [x.record for x in docs] == [False, True, True]
    docs, _ = read_sources([str(d / "**" / "*.jsonl")])
    assert [x.text for x in docs] == GOOD[1:3]
    with pytest.raises(DataError, match="the pattern matches no file"):
        read_sources([str(d / "*.parquet")])


def test_records_are_held_out_whole_and_an_all_bad_source_is_one_line(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"text": t} for t in GOOD[:10]])
    corpus = load_corpus([tmp_path / "r.jsonl"], val_fraction=0.2)  # every 5th record
    assert [d.text for d in corpus.val] == [GOOD[4], GOOD[9]]
    assert [d.text for d in corpus.train] == [t for i, t in enumerate(GOOD[:10]) if i not in (4, 9)]
    write_jsonl(tmp_path / "bad.jsonl", [{"title": "x"}] * 3)
    with pytest.raises(DataError, match=r"empty corpus: .*bad\.jsonl holds no text \(3 bad records skipped\)"):
        load_corpus([tmp_path / "bad.jsonl"])


def test_train_reads_jsonl_and_parquet_and_reports_them(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blackmamba.cli import main

    texts = [play_text(i, 8) for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:20]] + [{"text": 1}])
    pq.write_table(pa.table({"text": texts[20:]}), tmp_path / "b.parquet")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"),
                 "--preset", "tiny", "--no-progress", "--steps", "2", "--set", "data.vocab_size=300",
                 "--set", "data.seq_len=32", "--set", "optim.batch_size=2", "--set", "train.sample_tokens=2"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a.jsonl'}: 20 documents" in out and "1 bad record skipped (1 non-string 'text')" in out
    assert f"{tmp_path / 'b.parquet'}: 20 documents" in out and "in all: 2 inputs, 40 documents" in out
    assert (run / "model.safetensors").is_file()
