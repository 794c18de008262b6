"""The recurrent state's row operations (select, cat, put, reset, snapshots), held to recomputing each row from
its tokens; the state dtype option."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import random_model

from blackmamba import BlackMambaConfig, State

V = 50


def model_for(layers):
    return random_model(BlackMambaConfig(layers=list(layers), hidden_size=16, vocab_size=V, ffn_hidden_size=24,
                                         num_heads=2), seed=len(layers))


def alone(model, history, tok):
    """The logits a row's history and next token give computed from scratch, in a batch of its own."""
    with torch.no_grad():
        return model(torch.tensor([history + [tok]])).logits[0, -1]


def fed(model, state, rows_tokens):
    with torch.no_grad():
        return model(torch.tensor(rows_tokens), state=state).logits[:, -1]


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(st.sampled_from(["r", "3", "1", "a"]), min_size=1, max_size=4),
       ops=st.lists(st.sampled_from(["feed", "select", "cat", "put", "reset", "snapshot"]), max_size=7),
       seed=st.integers(0, 2**16))
def test_row_operations_equal_recomputing_each_row(layers, ops, seed):
    model = model_for(layers)
    g = torch.Generator().manual_seed(seed)

    def tokens(rows, length):
        return torch.randint(0, V, (rows, length), generator=g).tolist()

    def fresh(rows):  # a new state of `rows` sequences of one random length, and their histories
        chunk = tokens(rows, int(torch.randint(1, 4, (1,), generator=g)))
        state = model.new_state(rows)
        fed(model, state, chunk)
        return state, chunk

    state, histories = fresh(2)
    for op in ops:
        b = state.batch_size
        if op == "feed":
            chunk = tokens(b, int(torch.randint(1, 3, (1,), generator=g)))
            fed(model, state, chunk)
            histories = [h + c for h, c in zip(histories, chunk)]
        elif op == "select":  # reorder, duplicate, drop
            rows = torch.randint(0, b, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            state, histories = state.select(rows), [list(histories[r]) for r in rows]
        elif op == "cat" and b < 5:  # rows of another length join
            other, other_hist = fresh(int(torch.randint(1, 3, (1,), generator=g)))
            state, histories = State.cat([state, other]), histories + other_hist
        elif op == "put":  # a slot pool: other sequences written into some rows
            rows = torch.randperm(b, generator=g)[: int(torch.randint(1, b + 1, (1,), generator=g))].tolist()
            other, other_hist = fresh(len(rows))
            state.put(rows, other)
            for r, h in zip(rows, other_hist):
                histories[r] = h
        elif op == "reset":  # rows become fresh sequences
            rows = torch.randperm(b, generator=g)[:1].tolist()
            state.reset(rows)
            for r in rows:
                histories[r] = []
        elif op == "snapshot":  # copy row 0, advance it, restore the copy
            snap = state.select([0])
            fed(model, state, tokens(b, 2))
            histories = [h + [0, 0] for h in histories]  # placeholders: every row moved on ...
            state.put([0], snap)  # ... and row 0 came back
            histories[0] = histories[0][:-2]
            for r in range(1, b):  # the others' real tokens are unknown here: start them over
                state.reset([r])
                histories[r] = []
    nxt = tokens(state.batch_size, 1)
    got = fed(model, state, nxt)
    for r, (h, t) in enumerate(zip(histories, nxt)):
        torch.testing.assert_close(got[r], alone(model, h, t[0]), rtol=1e-4, atol=1e-4)


def test_selecting_leaves_the_source_untouched():
    model = model_for(["r", "a", "3"])
    state = model.new_state(2)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    fed(model, state, ids[:, :5].tolist())
    copy = state.select([1, 0, 1])
    fed(model, copy, ids[[1, 0, 1], 5:].tolist())
    with torch.no_grad():  # continuing the copy did not move the original
        torch.testing.assert_close(model(ids[:, 5:], state=state).logits, model(ids).logits[:, 5:],
                                   rtol=1e-5, atol=1e-5)


def test_put_checks_its_rows():
    model = model_for(["r"])
    with pytest.raises(ValueError, match="2 rows for a state of 1"):
        model.new_state(3).put([0, 1], model.new_state(1))


@pytest.mark.parametrize("layers", [["r", "3"], ["r", "a"]])
def test_a_float32_state_with_bfloat16_weights(layers):
    """The conv state and attention keys / values may be kept in float32 while the weights are bfloat16."""
    model = model_for(layers).to_dtype(torch.bfloat16)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    s16, s32 = model.new_state(2), model.new_state(2, dtype=torch.float32)
    assert all(t.dtype in (torch.float32, torch.bool, torch.long) for t in s32.tensors())
    with torch.no_grad():
        a, b = model(ids[:, :5], state=s16).logits, model(ids[:, :5], state=s32).logits
        for t in range(5, 8):
            a, b = model.step(ids[:, t], s16), model.step(ids[:, t], s32)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * a.float().abs().max().item())
