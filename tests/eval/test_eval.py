"""Perplexity / bits per byte, the lm-evaluation-harness adapter and ``blackmamba eval``."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.env import checkout_env
from support.ecosystem import EOS, TEXT, model_folder, tiny_model, train_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import blackmamba
from blackmamba.cli import main
from blackmamba.eval.perplexity import score_text, score_tokens
from blackmamba.eval.textstream import PIECE_CHARS, can_cut, encode_text, read_text_chunks, split_pieces
from blackmamba.eval.tokenizer import load_tokenizer, prefix_token_id

V = 320


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("model"), seed=7)


@pytest.fixture(scope="module")
def model(folder):
    return blackmamba.load_pretrained(folder)


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


def direct_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1, one plain forward over the whole sequence, no state."""
    ids = torch.tensor([tokens])
    logits = model(ids).logits[0, :-1, : model.config.vocab_size]
    return F.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None]).squeeze(1)


# ----------------------------------------------------------------------------- perplexity
def test_carried_state_and_windows_score_every_token(model, tok):
    tokens = tok.encode(TEXT).ids[:120]
    eot = prefix_token_id(tok)
    stream = [eot] + tokens
    want = -direct_logprobs(model, stream).sum().item()
    nll, n = score_tokens(model, tokens, prefix=eot, chunk=32)
    assert n == 120
    assert nll == pytest.approx(want, abs=1e-5)
    # a window covering everything is the full context too
    assert score_tokens(model, tokens, prefix=eot, window=200)[0] == pytest.approx(want, abs=1e-5)
    # sliding windows of 50 tokens every 20: each window scores the targets no earlier window scored
    manual = 0.0
    for start, end, new in [(0, 50, 50), (20, 70, 20), (40, 90, 20), (60, 110, 20), (80, 120, 10)]:
        manual -= direct_logprobs(model, stream[start:end + 1])[-new:].sum().item()
    nll_w, n_w = score_tokens(model, tokens, prefix=eot, window=50, stride=20)
    assert n_w == 120 and nll_w == pytest.approx(manual, abs=1e-5)
    assert abs(nll_w - nll) > 1e-3  # the windows really cut the context


def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_text(model, tok, tmp_path):
    text = TEXT[:400]
    score = score_text(model, tok, text)
    eot = prefix_token_id(tok)
    nll = -direct_logprobs(model, [eot] + tok.encode(text).ids).sum().item()
    assert score.bytes == len(text.encode("utf-8")) > len(text)  # "Où", "è": multi-byte
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / score.bytes, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / score.tokens), rel=1e-5)

    # without an end-of-text token the first token is context, and its bytes are not counted
    from tokenizers import Tokenizer

    plain = json.loads(tok.to_str())
    plain["added_tokens"] = []
    bare = Tokenizer.from_str(json.dumps(plain))
    assert prefix_token_id(bare) is None
    s = score_text(model, bare, text)
    enc = bare.encode(text)
    assert s.tokens == len(enc.ids) - 1
    assert s.bytes == len(text.encode()) - len(text[: enc.offsets[0][1]].encode())
    assert s.nll == pytest.approx(-direct_logprobs(model, enc.ids).sum().item(), rel=1e-5)


def test_eval_text_command(folder, model, tok, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT[:500], encoding="utf-8")
    assert main(["eval", str(folder), "--text", str(tmp_path / "t.txt"), "--output", str(tmp_path / "o.json")]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    want = score_text(model, tok, TEXT[:500])
    assert out["tokens"] == want.tokens and out["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert f"{want.bits_per_byte:.4f}" in capsys.readouterr().out
    assert main(["eval", str(folder), "--text", str(tmp_path / "t.txt"), "--window", "64",
                 "--output", str(tmp_path / "w.json")]) == 0
    assert json.loads((tmp_path / "w.json").read_text())["mode"] == "sliding window 64, stride 32"


@pytest.mark.parametrize("argv, message", [
    (["--text", "missing.txt"], "missing.txt: no such file"),
    (["--tasks", "x", "--window", "8"], "--window and --stride go with --text"),
    (["--text", "t.txt", "--limit", "3"], "--limit, --num-fewshot and --include-path go with --tasks"),
    (["--text", "t.txt", "--tokenizer", "nope.json"], "nope.json: no such tokenizer file"),
])
def test_eval_command_errors(folder, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("hello there")
    assert main(["eval", str(folder), *argv]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- long texts in pieces
MULTI_LINE = TEXT[:700].replace(". ", ".\n").replace("? ", "?\n\n  ")  # line breaks, blank and indented lines
ONE_LINE = TEXT[:700]
ENV = checkout_env()


def neox_like(tok):
    """``tok`` with GPT-NeoX-20B's extras: an NFC normalizer and added tokens for runs of whitespace."""
    from tokenizers import AddedToken, Tokenizer, normalizers

    t = Tokenizer.from_str(tok.to_str())
    t.normalizer = normalizers.NFC()
    t.add_tokens([AddedToken(w, normalized=True) for w in ("  ", "   ", "\n\n", "\t\t")])
    return t


@pytest.mark.parametrize("text", [MULTI_LINE, ONE_LINE], ids=["multi-line", "one-line"])
@pytest.mark.parametrize("piece_chars", [1, 13, 200, PIECE_CHARS])
def test_scoring_in_pieces_equals_scoring_the_whole_text(model, tok, text, piece_chars):
    pieces = list(split_pieces([text], piece_chars))
    assert "".join(pieces) == text
    cuts = [i for i in range(1, len(text) - 1)
            if text[i] in " \n" and not text[i - 1].isspace() and not text[i + 1].isspace()]
    if piece_chars == 1:  # every cut point is used
        assert [len(p) for p in pieces] == [b - a for a, b in zip([0, *cuts], [*cuts, len(text)])]
    else:  # the first cut point at or after piece_chars characters
        assert all(len(p) >= piece_chars for p in pieces[:-1])
        assert 1 < len(pieces) <= len(text) // piece_chars + 1 if piece_chars < len(text) else len(pieces) == 1
    assert all(p.startswith((" ", "\n")) for p in pieces[1:])
    # what score_text computed before it encoded in pieces: the whole text at once
    whole = tok.encode(text, add_special_tokens=False)
    eot = prefix_token_id(tok)
    nll, n = score_tokens(model, whole.ids, prefix=eot)
    got = score_text(model, tok, text, piece_chars=piece_chars)
    assert (got.nll, got.tokens, got.bytes) == (nll, len(whole.ids), len(text.encode("utf-8")))
    # chunks as read from a file, cut anywhere, give the same
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
    assert score_text(model, tok, iter(chunks), piece_chars=piece_chars) == got
    # without a prefix token, the bytes of the first token are not counted
    from tokenizers import Tokenizer

    plain = json.loads(tok.to_str())
    plain["added_tokens"] = []
    bare = Tokenizer.from_str(json.dumps(plain))
    nll, n = score_tokens(model, whole.ids, prefix=None)
    got = score_text(model, bare, text, piece_chars=piece_chars)
    assert (got.nll, got.tokens) == (nll, len(whole.ids) - 1)
    assert got.bytes == len(text[whole.offsets[0][1]:].encode("utf-8")) == len(text.encode()) - 3  # "The"


FRAGMENTS = ["the", "dog", "Où", "bibliothèque", "'s", "'ll", "n't", "it's", "'", " ", "  ", "   ", "\n", "\n\n",
             "\t", " \n ", "\r", ".", ",", "?!", "42", "3.14", "-", "\u00a0", "\u3000", "\u2028", "\u0085", "\x1c",
             "\u200b", "\ufeff", "e\u0301", "\u0301", "\u212b", "\u00a8", "字", "漢字。", "😀", EOS]


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=40).map("".join),
       piece_chars=st.integers(1, 12), chunk=st.integers(1, 9))
def test_encoding_in_pieces_gives_the_ids_of_the_whole_text(tok, text, piece_chars, chunk):
    chunks = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for t in (tok, neox_like(tok)):
        assert can_cut(t)
        whole = t.encode(text, add_special_tokens=False)
        got = encode_text(t, iter(chunks), piece_chars)
        assert got.ids.tolist() == whole.ids
        assert got.bytes == len(text.encode("utf-8"))
        assert got.first_token_bytes == (len(text[: whole.offsets[0][1]].encode()) if whole.ids else 0)


def test_a_cut_point_ends_a_pre_token_for_every_character_before_it():
    """The cut rule's premise, over the Basic Multilingual Plane (all of Unicode takes 16 s): every character
    that ``str.isspace`` rejects ends a pre-token of the GPT-2 pattern when a space or line break follows, and
    NFC maps it to text that does not end in whitespace."""
    from tokenizers import normalizers, pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    nfc = normalizers.NFC().normalize_str
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000 and not chr(c).isspace()]
    assert len(chars) > 63_000
    for c in chars:
        for ws in " \n":
            assert 2 in [start for _, (start, _) in split("x" + c + ws + "a")], (hex(ord(c)), ws)
        assert not nfc(c)[-1:].isspace(), hex(ord(c))


def test_other_tokenizers_are_encoded_whole(tok):
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

    def variant(change):
        t = Tokenizer.from_str(tok.to_str())
        change(t)
        return t

    unsafe = [
        variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True))),
        variant(lambda t: t.add_tokens(["the lazy"])),  # an added token that a cut could split
        variant(lambda t: t.add_tokens([AddedToken("fox", rstrip=True)])),  # takes the space after it
        variant(lambda t: t.enable_truncation(16)),
    ]
    others = [
        variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace())),
        variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(use_regex=False))),
        variant(lambda t: setattr(t, "normalizer", normalizers.Lowercase())),
    ]
    assert can_cut(tok) and can_cut(neox_like(tok))
    for t in unsafe + others:
        assert not can_cut(t)
        whole = t.encode(MULTI_LINE, add_special_tokens=False).ids
        assert encode_text(t, MULTI_LINE, piece_chars=1).ids.tolist() == whole
        # encoding these in pieces would be wrong: a piece that starts with a line break gets a space in front,
        # the added tokens would be cut or lose their space, every piece would be truncated
        if t in unsafe:
            pieces = [t.encode(p, add_special_tokens=False).ids for p in split_pieces([MULTI_LINE], 1)]
            assert sum(pieces, []) != whole


def test_text_files_are_read_in_chunks_like_read_text(tmp_path):
    path = tmp_path / "t.txt"
    data = "Où\r\nest\rla\n bibliothèque 😀\r\n\r".encode("utf-8")
    path.write_bytes(data)
    for n in (1, 2, 3, 5, 1000):
        text = "".join(read_text_chunks(path, n))
        assert text == path.read_text(encoding="utf-8") == "Où\nest\nla\n bibliothèque 😀\n\n"
    for bad, offset in [(data[:5] + b"\xff" + data[5:], 5), (data + "😀".encode()[:3], len(data))]:
        path.write_bytes(bad)
        for n in (1, 2, 4, 1000):
            with pytest.raises(ValueError, match=rf"t.txt: not UTF-8 text \(invalid byte at offset {offset}\)"):
                list(read_text_chunks(path, n))


def test_eval_text_command_rejects_invalid_utf8(folder, tmp_path, capsys):
    (tmp_path / "t.txt").write_bytes(b"hello \xc3(there")
    assert main(["eval", str(folder), "--text", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert "t.txt: not UTF-8 text (invalid byte at offset 6)" in err and err.strip().count("\n") == 0


def one_line_text(chars: int, seed: int = 0, words=tuple(TEXT.split())) -> str:
    """A text of ``chars`` characters without a line break: random words, one space apart."""
    rng = random.Random(seed)
    n = chars // (sum(map(len, words)) // len(words) + 1) + 1
    return " ".join(rng.choices(words, k=n))[:chars]


_ENCODE_MEMORY = """
import json, resource, sys
from tokenizers import Tokenizer
from blackmamba.eval.textstream import encode_text, read_text_chunks
tok = Tokenizer.from_file(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
enc = encode_text(tok, read_text_chunks(sys.argv[2]))
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"tokens": len(enc.ids), "bytes": enc.bytes, "grew_mb": grew / 1024}))
"""


def test_encoding_a_long_one_line_file_takes_bounded_memory(folder, tmp_path):
    """6 MB on one line: encoding it whole took 1.2 GB (about 300 bytes a token); in pieces, the ids."""
    path = tmp_path / "one_line.txt"
    path.write_text(one_line_text(6_000_000), encoding="utf-8")
    size = path.stat().st_size
    # the process reports its own peak: RUSAGE_CHILDREN would be the largest of all this session's children
    r = subprocess.run([sys.executable, "-c", _ENCODE_MEMORY, str(folder / "tokenizer.json"), str(path)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bytes"] == size > 6_000_000
    assert size / 1.5 > out["tokens"] > size / 2  # ~1.66 bytes a token with the fixture's small BPE
    assert out["grew_mb"] < 100, out  # ids: 4 bytes a token, twice while joined (~30 MB)


WORDS = ("alpha", "beta", "gamma", "delta", "omega", "kappa")


def word_tokenizer(path: Path) -> Path:
    """A byte-level BPE in which each of ``WORDS`` after a space is one token (scoring a long text is quick)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS * 20)], trainer)
    tok.save(str(path))
    return path


def test_eval_command_scores_a_one_line_file_in_pieces(folder, model, tmp_path):
    """The real command on one line of 2.2 pieces: the numbers of scoring the whole text at once."""
    tok = load_tokenizer(folder, word_tokenizer(tmp_path / "words.json"))
    assert tok.get_vocab_size() <= V and len(tok.encode(" omega").ids) == 1
    text = one_line_text(int(2.2 * PIECE_CHARS), words=WORDS)
    assert len(list(split_pieces([text]))) == 3
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "blackmamba", "eval", str(folder), "--text", str(tmp_path / "t.txt"),
                        "--tokenizer", str(tmp_path / "words.json"), "--output", str(tmp_path / "o.json")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    ids = tok.encode(text, add_special_tokens=False).ids
    nll, n = score_tokens(model, ids, prefix=prefix_token_id(tok))
    assert (out["tokens"], out["bytes"]) == (n, len(text)) == (len(ids), len(text))
    assert out["nll"] == pytest.approx(nll, rel=1e-9)  # another process: its own thread count
    assert f"{n:,} tokens, {len(text):,} bytes scored (carried state)" in r.stdout


# ----------------------------------------------------------------------------- lm-eval
QUIZ = [
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog.", "bold worm.", "gold."], "answer": 0},
    {"question": "A stitch in time saves", "choices": ["nine.", "words.", "the dog."], "answer": 0},
    {"question": "Fortune favours the", "choices": ["bold.", "dog.", "early bird."], "answer": 0},
    {"question": "Fortune favours the", "choices": ["bold.", "worm."], "answer": 1},  # same context again
]
DOCS = [{"text": TEXT[:150]}, {"text": "Où est la bibliothèque? " * 3}]


def write_tasks(root, rows=QUIZ):
    """A multiple-choice, a rolling-loglikelihood and a generation task over local JSON files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    common = ("dataset_path: json\ntest_split: test\n")

    def data(name):
        return f"dataset_kwargs:\n  data_files:\n    test: {root / name}\n  cache_dir: {root / 'hf-cache'}\n"

    (root / "quiz.yaml").write_text(
        "task: bm_quiz\n" + common + data("quiz.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "rolling.yaml").write_text(
        "task: bm_rolling\n" + common + data("docs.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (root / "gen.yaml").write_text(
        "task: bm_gen\n" + common + data("quiz.jsonl") + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def encode_pair(tok, context: str, continuation: str):
    """lm-eval's split of a causal request: the continuation's tokens are those after the context's."""
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def evaluated(folder, model, tok, tmp_path_factory):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from blackmamba.eval.lm_eval_adapter import BlackMambaEvalLM

    root = write_tasks(tmp_path_factory.mktemp("tasks"))
    runs = {}
    for batch_size in (1, 3):
        lm = BlackMambaEvalLM(str(folder), batch_size=batch_size, device="cpu")
        prefilled = []
        real = lm._prefill
        lm._prefill = lambda contexts, real=real, seen=prefilled: seen.extend(contexts) or real(contexts)
        runs[batch_size] = (lm_eval.simple_evaluate(
            model=lm, tasks=["bm_quiz", "bm_rolling", "bm_gen"], log_samples=True,
            task_manager=TaskManager(include_defaults=False, include_path=str(root))), prefilled)
    return runs


def test_lm_eval_loglikelihoods_equal_direct_computation(evaluated, model, tok):
    eot = prefix_token_id(tok)
    for batch_size, (results, prefilled) in evaluated.items():
        samples = sorted(results["samples"]["bm_quiz"], key=lambda s: s["doc_id"])
        correct = 0
        for s, row in zip(samples, QUIZ):
            got = [float(r[0][0]) for r in s["resps"]]
            want = []
            for choice in row["choices"]:
                ctx, cont = encode_pair(tok, row["question"], " " + choice)
                want.append(direct_logprobs(model, ctx + cont)[len(ctx) - 1:].sum().item())
            assert got == pytest.approx(want, abs=1e-5), (batch_size, row)
            correct += int(max(range(len(want)), key=want.__getitem__) == row["answer"])
        assert results["results"]["bm_quiz"]["acc,none"] == pytest.approx(correct / len(QUIZ))
        # every distinct context was prefilled exactly once ("Fortune favours the" serves two documents)
        assert sorted(prefilled) == sorted({tuple(tok.encode(r["question"]).ids) for r in QUIZ})

        lls, nbytes = [], []
        for s, doc in zip(sorted(results["samples"]["bm_rolling"], key=lambda s: s["doc_id"]), DOCS):
            want = direct_logprobs(model, [eot] + tok.encode(doc["text"]).ids).sum().item()
            assert float(s["resps"][0][0]) == pytest.approx(want, abs=1e-5)
            lls.append(want)
            nbytes.append(len(doc["text"].encode()))
        bpb = results["results"]["bm_rolling"]["bits_per_byte,none"]
        assert bpb == pytest.approx(-sum(lls) / sum(nbytes) / math.log(2), abs=1e-5)


def test_lm_eval_generation_equals_greedy_generate(evaluated, model, tok):
    for _, (results, _) in evaluated.items():
        for s in results["samples"]["bm_gen"]:
            row = QUIZ[s["doc_id"]]
            prompt = tok.encode(row["question"]).ids
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=prefix_token_id(tok))
            want = tok.decode(ids[0, len(prompt):].tolist()).split(".")[0]
            assert s["resps"][0][0] == want


def test_eval_tasks_command_with_a_local_task_file(folder, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    root = write_tasks(tmp_path / "tasks", rows=QUIZ[:2])
    code = main(["eval", str(folder), "--tasks", str(root / "quiz.yaml"), "--limit", "1",
                 "--output", str(tmp_path / "r.json")])
    assert code == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert set(out["results"]) == {"bm_quiz"} and "acc,none" in out["results"]["bm_quiz"]
    assert "bm_quiz" in capsys.readouterr().out


def test_the_adapter_needs_an_end_of_text_token(folder, tmp_path):
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer

    from blackmamba.eval.lm_eval_adapter import BlackMambaEvalLM

    plain = json.loads(load_tokenizer(folder).to_str())
    plain["added_tokens"] = []
    Tokenizer.from_str(json.dumps(plain)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="end-of-text"):
        BlackMambaEvalLM(str(folder), tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="batch_size=auto"):
        BlackMambaEvalLM(str(folder), batch_size="auto")


def test_tokenizer_fixture_is_byte_level(tmp_path):
    tok = load_tokenizer(train_tokenizer(tmp_path / "tokenizer.json"))
    assert tok.decode(tok.encode("Où est-il?").ids) == "Où est-il?"
    assert tiny_model().config.vocab_size >= tok.get_vocab_size()
