"""``greedy``, the greedy choice of generate, the server and the decode benches: torch's argmax answer (each row's
first maximum, a NaN counting as the maximum) for every float dtype, ties, infinities and NaNs."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blackmamba.generation.sampling import greedy

SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0]


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 8), vocab=st.integers(1, 300), levels=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=6),
       seed=st.integers(0, 2**16))
@example(rows=2, vocab=5, levels=1, dtype=torch.float32, specials=[(3, float("nan")), (1, float("nan"))], seed=0)
@example(rows=1, vocab=4, levels=1, dtype=torch.bfloat16, specials=[(2, float("inf")), (0, float("inf"))], seed=1)
def test_greedy_is_torch_argmax(rows, vocab, levels, dtype, specials, seed):
    """Few distinct values (levels) make ties; specials put NaNs and infinities at chosen places."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, vocab), generator=g).to(dtype)
    flat = scores.view(-1)
    for at, value in specials:
        flat[at % flat.numel()] = value
    got = greedy(scores)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, scores.argmax(dim=-1))


def test_greedy_on_a_strided_view_and_without_touching_autograd():
    base = torch.randn(6, 1000, requires_grad=True)
    view = base[::2, 10:]  # not contiguous
    assert torch.equal(greedy(view), view.argmax(dim=-1))
    assert torch.equal(greedy(base), base.argmax(dim=-1))
