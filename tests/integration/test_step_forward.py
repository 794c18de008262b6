"""One computation per idea, held from three sides: for random layer patterns (all four kinds) and random chunkings,
token-by-token ``model.step`` == chunked ``forward`` with a state == one ``forward``, on every backend this machine
has (the reference, the cpu kernels, and the Triton kernels under the interpreter)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import random_model
from support.triton_interpreter import HAS_TRITON

from blackmamba import BlackMambaConfig
from blackmamba.ops import available_backends, set_backend

V = 61
BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if b in available_backends("mamba_step", "cpu")
                             and (b != "triton" or HAS_TRITON)]


def chunks_of(length: int, cuts: list[int]) -> list[tuple[int, int]]:
    edges = sorted({c % length for c in cuts if 0 < c % length} | {0, length})
    return list(zip(edges, edges[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(layers=st.lists(st.sampled_from(["r", "3", "1", "a"]), min_size=1, max_size=4),
       length=st.integers(2, 9), cuts=st.lists(st.integers(1, 50), max_size=3), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_step_equals_chunked_forward_equals_one_forward(backend, layers, length, cuts, batch, seed):
    model = random_model(BlackMambaConfig(layers=layers, hidden_size=16, vocab_size=V, ffn_hidden_size=24,
                                          num_heads=2), seed=seed % 7)
    ids = torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    set_backend(backend)
    try:
        with torch.no_grad():
            whole = model(ids).logits
            state = model.new_state(batch)
            chunked = torch.cat([model(ids[:, a:b], state=state).logits for a, b in chunks_of(length, cuts)], 1)
            state = model.new_state(batch)
            stepped = torch.stack([model.step(ids[:, t], state) for t in range(length)], 1)
    finally:
        set_backend(None)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-4)
    assert state.seqlen == length
