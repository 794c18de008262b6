"""Perplexity / bits per byte, the lm-evaluation-harness adapter and ``blackmamba eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from ecosystem_fixtures import TEXT, model_folder, tiny_model, train_tokenizer

import blackmamba
from blackmamba.cli import main
from blackmamba.eval.perplexity import score_text, score_tokens
from blackmamba.eval.state import select_rows
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


# ----------------------------------------------------------------------------- state rows
def test_select_rows_copies_and_continues_each_row(model):
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    state = model.new_state(2)
    model(ids[:, :5], state=state)
    copy = select_rows(state, torch.tensor([1, 0, 1]))
    got = model(ids[[1, 0, 1], 5:], state=copy).logits
    torch.testing.assert_close(got, model(ids[[1, 0, 1]]).logits[:, 5:], rtol=1e-5, atol=1e-5)
    # the original state was not touched by continuing the copy
    torch.testing.assert_close(model(ids[:, 5:], state=state).logits, model(ids).logits[:, 5:], rtol=1e-5, atol=1e-5)


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
    common = (f"dataset_path: json\ntest_split: test\n")

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
