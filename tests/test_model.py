"""The model: chunked state == one pass == token by token, input checks, loss, every layer kind with a state."""

import pytest
import torch
from support.models import SMALL, random_model
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba import BlackMambaConfig
from blackmamba.generation import pad_prompts


@pytest.fixture(scope="module")
def model():
    return random_model(BlackMambaConfig(**SMALL), seed=0)


@settings(max_examples=15, deadline=None)
@given(l=st.integers(2, 20), data=st.data())
def test_chunked_prefill_equals_full(model, l, data):
    ids = torch.randint(0, 97, (2, l), generator=torch.Generator().manual_seed(l))
    cut = data.draw(st.integers(1, l - 1))
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_state(batch_size=2)
        a = model(ids[:, :cut], state=state).logits
        b = model(ids[:, cut:], state=state).logits
    torch.testing.assert_close(b, full[:, cut:], rtol=0, atol=1e-5)
    torch.testing.assert_close(a, full[:, :cut], rtol=0, atol=1e-5)
    assert state.seqlen == l


def test_token_by_token_decode_equals_full(model):
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_state(batch_size=3)
        steps = torch.cat([model(ids[:, t:t + 1], state=state).logits for t in range(12)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)


def test_one_token_forward_is_the_step_bound_or_not(model):
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(5))
    bound, calls = model.bind_step(), []

    def counted(tokens, state):
        calls.append(tokens.tolist())
        return bound(tokens, state)

    with torch.no_grad():
        plain, ones, given = (model.new_state(batch_size=3) for _ in range(3))
        for t in range(6):
            tok = ids[:, t:t + 1]
            a = model(tok, state=plain).logits
            b = model(tok, state=ones, attention_mask=torch.ones_like(tok)).logits  # all ones: the step too
            c = model(tok, state=given, bound_step=counted).logits
            assert torch.equal(a, b) and torch.equal(a, c)
    assert calls == [ids[:, t].tolist() for t in range(6)]  # the bound step, not one bound per call
    for state in (plain, ones, given):
        assert state.seqlen == 6 and state.started == [True] * 3  # a step consumes a real token a row


def test_logits_to_keep_is_the_last_positions_logits(model):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        for k in (1, 4, 9):
            state = model.new_state(2)
            kept = model(ids, state=state, logits_to_keep=k).logits
            assert kept.shape == (2, k, full.shape[-1]) and state.seqlen == 9
            torch.testing.assert_close(kept, full[:, -k:], rtol=0, atol=1e-5)
    for bad, kw in ((-1, {}), (1.5, {}), (2, {"targets": ids})):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad, **kw)


def test_bad_token_ids_and_shapes_are_named(model):
    with pytest.raises(ValueError, match="token id 97 is out of range.*0..96"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.tensor([[1], [2]]), state=model.new_state(batch_size=1))
    with pytest.raises(ValueError, match="no rows"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no rows"):
        model.generate(torch.zeros(0, 5, dtype=torch.long))


def test_attention_mask_must_be_left_padding(model):
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    bad = {"a hole": [[1, 0, 1, 1], [1, 1, 1, 1]], "right padding": [[1, 1, 1, 1], [1, 1, 0, 0]],
           "all padding": [[1, 1, 1, 1], [0, 0, 0, 0]], "not 0/1": [[1, 1, 2, 1], [1, 1, 1, 1]]}
    messages = {"a hole": "row 0 has padding after a token", "right padding": "row 1 has padding after a token",
                "all padding": "row 1 is all padding", "not 0/1": "must hold 0"}
    for case, mask in bad.items():
        with pytest.raises(ValueError, match=messages[case]):
            model(ids, attention_mask=torch.tensor(mask))
        with pytest.raises(ValueError, match=messages[case]):
            model.generate(ids, attention_mask=torch.tensor(mask), max_new_tokens=2)
    # a long left padding may fill a whole chunk of a chunked prefill; after a row's first token, no more
    state = model.new_state(2)
    model(ids[:, :2], state=state, attention_mask=torch.tensor([[1, 1], [0, 0]]))
    model(ids[:, 2:], state=state, attention_mask=torch.tensor([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="row 0 has padding after a token"):
        model(ids[:, :2], state=state, attention_mask=torch.tensor([[0, 1], [1, 1]]))


def test_loss_and_backward(model):
    m = random_model(BlackMambaConfig(**SMALL), seed=3).train()
    ids = torch.randint(0, 97, (2, 16))
    out = m(ids[:, :-1], targets=ids[:, 1:])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in m.named_parameters():
        if "local_experts" not in name:  # experts that received no token have no gradient
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for blk in m.decoder.layers:
        if blk.kind == "moe":
            assert any(e.linear_fc1.weight.grad is not None for e in blk.mixer.local_experts)


def test_attention_and_dense_layers_support_state():
    cfg = BlackMambaConfig(layers=["a", "1", "r", "4", "a", "4"], hidden_size=32, vocab_size=50, ffn_hidden_size=32,
                           num_heads=4)
    m = random_model(cfg)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = m(ids).logits
        st_ = m.new_state(2)
        parts = [m(ids[:, :4], state=st_).logits] + [m(ids[:, t:t + 1], state=st_).logits for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ids, mask = pad_prompts(prompts)
    batch = m.generate(ids, max_new_tokens=4, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert batch[i, ids.shape[1]:].tolist() == m.generate(torch.tensor([p]), max_new_tokens=4)[0, len(p):].tolist()


def test_state_size_is_independent_of_context(model):
    state = model.new_state(batch_size=1)
    before = state.nbytes()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 50)), state=state)
    assert state.nbytes() == before
