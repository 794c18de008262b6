"""Generation: greedy == argmax of full forwards for any prompt length, a padded batch == each prompt alone (greedy,
and sampled with one seed per row), each row's own random stream, the options' one validation, EOS."""

import pytest
import torch
from support.models import SMALL, random_model

from blackmamba import BlackMambaConfig
from blackmamba.generation import pad_prompts


@pytest.fixture(scope="module")
def model():
    return random_model(BlackMambaConfig(**SMALL), seed=0)


@pytest.mark.parametrize("prompt_len", [1, 2, 3, 4, 9])
def test_greedy_generate_equals_repeated_full_forwards(model, prompt_len):
    ids = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, prompt_len + 8) and torch.equal(out[:, :prompt_len], ids)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq).logits[:, -1, :97].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_padded_batch_equals_each_prompt_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    ids, mask = pad_prompts(prompts, pad_id=0)
    batch = model.generate(ids, max_new_tokens=6, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=6)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()
    with torch.no_grad():  # the logits of the real tokens agree too
        padded = model(ids, attention_mask=mask).logits
        alone = model(torch.tensor([prompts[2]])).logits
    torch.testing.assert_close(padded[2, -3:], alone[0], rtol=0, atol=1e-5)


def test_sampled_padded_batch_equals_each_prompt_alone(model):
    """With one seed per row, a sampled row is what the prompt gives alone with that seed (batch invariance)."""
    prompts = [[5, 6, 7, 8, 9], [3], [40, 41, 42]]
    ids, mask = pad_prompts(prompts, pad_id=0)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    batch = model.generate(ids, attention_mask=mask, seed=[11, 12, 13], **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), seed=[11 + i], **kw)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()


def test_every_row_samples_from_a_stream_of_its_own(model):
    ids = torch.tensor([[7, 8, 9]] * 4)  # the same prompt four times: only the streams can tell the rows apart
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5)
    for seed in (3, None):
        out = model.generate(ids, seed=seed, **kw)[:, 3:].tolist()
        assert len({tuple(r) for r in out}) == 4, out  # no two rows alike
    a, b = model.generate(ids, seed=3, **kw), model.generate(ids, seed=3, **kw)
    assert torch.equal(a, b)  # a seeded batch is reproducible
    assert not torch.equal(a, model.generate(ids, seed=4, **kw))
    torch.manual_seed(0)
    c = model.generate(ids, **kw)
    torch.manual_seed(0)
    assert torch.equal(c, model.generate(ids, **kw))  # unseeded rows follow torch's global generator
    # greedy batches are unaffected: every row equals its prompt alone
    greedy = model.generate(ids, max_new_tokens=6)
    assert all(row.tolist() == greedy[0].tolist() for row in greedy)


@pytest.mark.parametrize("option, value", [("top_p", 0), ("top_p", 1.5), ("min_p", 2), ("top_k", 0), ("top_k", 2.5),
                                           ("temperature", 0), ("temperature", float("nan")),
                                           ("repetition_penalty", 0), ("repetition_penalty", -1.0),
                                           ("max_new_tokens", -1), ("seed", -3), ("seed", [1, 2])])
def test_generation_options_are_checked_with_the_options_name(model, option, value):
    from blackmamba.generation import OptionError

    kw = {"do_sample": True, "max_new_tokens": 3, option: value}
    with pytest.raises(OptionError, match=rf"^{option} ") as e:
        model.generate(torch.tensor([[1, 2, 3]]), **kw)
    assert [name for name, _ in e.value.problems] == [option]


def test_generation_never_emits_padding_rows():
    cfg = BlackMambaConfig(**{**SMALL, "vocab_size": 90, "pad_vocab_size_multiple": 64})
    m = random_model(cfg)
    with torch.no_grad():
        m.embedding.word_embeddings.weight[90:] = 50.0  # padded rows would win every argmax
    out = m.generate(torch.tensor([[1, 2]]), max_new_tokens=5)
    assert out.max() < 90


def test_eos_stops_and_pads_with_eos(model):
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]])
    free = model.generate(ids, max_new_tokens=6)
    eos = int(free[0, 4])  # the second new token of row 0
    assert eos not in free[1, 3:].tolist() and eos != int(free[0, 3])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    # row 0 stops at its EOS and repeats it while row 1 goes on, unchanged, to the end
    assert stopped.shape == free.shape and stopped[1].tolist() == free[1].tolist()
    assert stopped[0].tolist() == free[0, :5].tolist() + [eos] * 4
    alone = model.generate(ids[:1], max_new_tokens=6, eos_token_id=eos)
    assert alone.tolist() == free[:1, :5].tolist()  # alone, generation ends with the EOS
