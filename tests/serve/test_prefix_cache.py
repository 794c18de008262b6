"""PrefixCache: the longest stored prefix shorter than the prompt is found (a hypothesis property against a plain
dictionary of token tuples), lookups hand out copies, and entries are evicted least recently used under the
byte budget."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba import BlackMambaConfig, BlackMambaLM
from blackmamba.serve import PrefixCache

MODEL = BlackMambaLM(BlackMambaConfig(layers=["r", "2"], hidden_size=16, ffn_hidden_size=32, vocab_size=50)).eval()


def state_after(tokens):
    """A state that records its prefix: its first conv entry is len(tokens) (no model run needed)."""
    s = MODEL.new_state(1)
    s.layers[0].conv.fill_(len(tokens) + sum(tokens) * 1e-3)
    return s


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 3), min_size=1, max_size=9)), max_size=30))
def test_lookup_finds_the_longest_stored_prefix(ops):
    cache = PrefixCache(budget_bytes=1 << 30)
    stored = set()
    for is_store, tokens in ops:
        if is_store:
            cache.store(tokens, state_after(tokens))
            stored.add(tuple(tokens))
        else:
            want = max((n for n in range(1, len(tokens)) if tuple(tokens[:n]) in stored), default=0)
            n, state, logits = cache.lookup(tokens)
            assert logits is None
            assert n == want
            if n:
                assert torch.equal(state.layers[0].conv, state_after(tokens[:n]).layers[0].conv)
            else:
                assert state is None


def test_lookup_returns_a_copy_and_a_whole_prompt_only_with_its_logits():
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.store([1, 2, 3], state_after([1, 2, 3]))
    assert cache.lookup([1, 2, 3]) == (0, None, None)  # no logits: the last token must still be computed
    n, state, logits = cache.lookup([1, 2, 3, 4])
    assert n == 3 and logits is None
    state.layers[0].conv.zero_()  # a prefill writes into it
    assert cache.lookup([1, 2, 3, 4])[1].layers[0].conv.abs().sum() > 0
    assert cache.store([1, 2, 3], state_after([1, 2, 3]), torch.arange(5.0))  # the prompt's end, with logits
    assert not cache.store([1, 2, 3], state_after([1, 2, 3]))  # already there
    n, state, logits = cache.lookup([1, 2, 3])
    assert n == 3 and torch.equal(logits, torch.arange(5.0)) and len(cache) == 1
    assert (cache.hits, cache.misses) == (3, 1)


def test_least_recently_used_entries_go_first_under_the_budget():
    row = state_after([0]).nbytes()
    cache = PrefixCache(budget_bytes=3 * row)
    for t in range(3):
        cache.store([t], state_after([t]))
    assert cache.lookup([0, 9])[0] == 1  # [0] is now the most recently used
    cache.store([3], state_after([3]))  # over budget: [1] goes
    assert len(cache) == 3 and cache.nbytes == 3 * row
    assert [cache.lookup([t, 9])[0] for t in range(4)] == [1, 0, 1, 1]
    assert cache.nbytes == sum(e[3] for e in cache.entries.values())
    assert not PrefixCache(budget_bytes=row - 1).store([0], state_after([0]))  # larger than the whole budget
