"""Helpers for the data / training / generation tests: a small deterministic play-like corpus written by
the tests themselves, and a per-test BLACKMAMBA_CACHE (import the fixtures into a test module to use them)."""

from __future__ import annotations

import random

import pytest

WORDS = ("the king queen lord love death night day sword crown blood heart heaven fair sweet good my thy thou "
         "art shall will not is and of to what noble gentle father mother speak come go hence").split()
SPEAKERS = ("ROMEO.", "JULIET.", "KING.", "NURSE.")


def play_text(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        out.append(f"{rng.choice(SPEAKERS)}\n{words.capitalize()}{rng.choice('.!?,')}\n\n")
    return "".join(out)


@pytest.fixture
def corpus_dir(tmp_path):
    """Three small 'plays' (about 12 KB each) in a folder, as a user would pass with --data."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"play{i}.txt").write_text(play_text(i, 250), encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own BLACKMAMBA_CACHE: nothing leaks between tests or from the user's cache."""
    monkeypatch.setenv("BLACKMAMBA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run tiny models, for which a second intra-op thread only adds synchronisation (and, on a
    busy machine, waiting): run them single-threaded and restore the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
