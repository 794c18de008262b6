"""Text generation: a padded batch gives every row exactly what it gives alone, sampling is reproducible
with a seed, streaming gives the same text as batch generation, stop strings and EOS end the text."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import random_model
from support.text import isolated_cache, one_thread, play_text  # noqa: F401  (fixtures)

from blackmamba import BlackMambaConfig
from blackmamba.data.tokenizer import train_bpe
from blackmamba.generation import TextStream, generate_text, pad_prompts, stream_text

PROMPTS = ["ROMEO.\nWhat", "K", "JULIET.\nO gentle father, speak: the night is", "Thou"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe([play_text(i, 120) for i in range(3)], 300)


@pytest.fixture(scope="module")
def model(tok):
    cfg = BlackMambaConfig(layers=["r", "4", "r", "4"], hidden_size=32, ffn_hidden_size=64, vocab_size=tok.vocab_size,
                           pad_vocab_size_multiple=16)
    return random_model(cfg, seed=1)


def test_padded_batch_logits_and_tokens_equal_each_prompt_alone(model, tok):
    encoded = [tok.encode(p) for p in PROMPTS]
    assert len({len(e) for e in encoded}) > 2  # really different lengths: real left padding
    ids, mask = pad_prompts(encoded, pad_id=tok.eos_id)
    batch_logits = model(ids, attention_mask=mask).logits[:, -1]
    batch = model.generate(ids, 24, attention_mask=mask)
    for i, e in enumerate(encoded):
        alone = torch.tensor([e])
        torch.testing.assert_close(batch_logits[i], model(alone).logits[0, -1], rtol=1e-5, atol=1e-5)
        assert batch[i, ids.shape[1]:].tolist() == model.generate(alone, 24)[0, len(e):].tolist()


def test_generate_text_batch_equals_stream_alone(model, tok):
    texts = generate_text(model, tok, PROMPTS, 20)
    for prompt, text in zip(PROMPTS, texts):
        assert "".join(stream_text(model, tok, prompt, 20)) == text
        assert len(text) > 0


def test_sampling_is_reproducible_with_a_seed(model, tok):
    kw = dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    a = generate_text(model, tok, PROMPTS, 30, seed=7, **kw)
    b = generate_text(model, tok, PROMPTS, 30, seed=7, **kw)
    c = generate_text(model, tok, PROMPTS, 30, seed=8, **kw)
    assert a == b and a != c
    s1 = "".join(stream_text(model, tok, PROMPTS[0], 30, seed=5, **kw))
    assert s1 == "".join(stream_text(model, tok, PROMPTS[0], 30, seed=5, **kw))


def test_stop_strings_end_the_text_and_are_not_included(model, tok):
    full = "".join(stream_text(model, tok, PROMPTS[0], 40))
    stop = full[5:7]  # something the model is known to produce
    cut = full.index(stop)
    assert "".join(stream_text(model, tok, PROMPTS[0], 40, stop=[stop])) == full[:cut]
    assert generate_text(model, tok, [PROMPTS[0], PROMPTS[1]], 40, stop=[stop])[0] == full[:cut]


def test_eos_ends_generation(model, tok):
    # make EOS the only possible continuation: its logit row dominates every other
    m = random_model(model.config, seed=1)
    with torch.no_grad():
        m.embedding.word_embeddings.weight[tok.eos_id] *= 200
    assert generate_text(m, tok, ["ROMEO."], 10) == [""]
    assert list(stream_text(m, tok, "ROMEO.", 10)) == []


def test_prompt_that_tokenizes_to_nothing_is_refused(model, tok):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        generate_text(model, tok, ["fine", ""], 5)


def test_prompts_of_a_sampled_batch_do_not_share_a_stream(model, tok):
    """Different prompts must not converge on the same text because they draw the same random numbers."""
    prompts = ["ROMEO.", "KING.", "JULIET."]
    kw = dict(do_sample=True, temperature=1.0, seed=0)
    texts = generate_text(model, tok, prompts, 25, **kw)
    assert len(set(texts)) == 3
    same = generate_text(model, tok, ["ROMEO."] * 3, 25, **kw)
    assert len(set(same)) == 3, same  # even one prompt three times gives three texts
    assert generate_text(model, tok, prompts, 25, **kw) == texts


def test_text_that_is_not_utf8_is_refused(model, tok):
    bad = b"ROMEO \xff".decode("utf-8", "surrogateescape")  # how a command line carries undecodable bytes
    with pytest.raises(ValueError, match="not valid UTF-8"):
        generate_text(model, tok, [bad], 5)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        list(stream_text(model, tok, bad, 5))


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.sampled_from(list("ab é—\n🙂KING.") + ["thou ", "speak"]), min_size=1,
                     max_size=40).map("".join), data=st.data())
def test_text_stream_pieces_are_the_text_up_to_the_first_stop(tok, text, data):
    """Token by token, TextStream releases exactly the decoded text up to the first stop string to appear
    (multi-byte characters split across tokens included), never a character it must take back."""
    def piece_of_text():  # stop strings mostly taken from the text itself, so that they occur
        i = data.draw(st.integers(0, len(text) - 1))
        return text[i:i + data.draw(st.integers(1, 4))]
    stops = data.draw(st.lists(st.one_of(st.builds(piece_of_text), st.sampled_from(["zz", "é.", "🙂🙂"])),
                               max_size=3))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    want, hits = text, []
    for k in range(len(ids)):  # generation stops at the first token after which a stop string is in the text
        so_far = tok.decode(ids[:k + 1])
        hits = [i for i in (so_far.find(s) for s in stops) if i >= 0]
        if hits:
            want = so_far[:min(hits)]
            break
    stream = TextStream(tok, stops)
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        assert want.startswith("".join(pieces))  # released text is final
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == want
    assert stream.stopped == bool(hits)
