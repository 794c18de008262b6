"""Our Mamba mixer against an independent peer: transformers' MambaMixer with copied weights."""

import inspect

import pytest
import torch

pytestmark = pytest.mark.ecosystem  # also run against the lowest declared transformers / peft / lm-eval

transformers = pytest.importorskip("transformers")
from transformers import MambaConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer  # noqa: E402

from blackmamba.layers import MambaMixer  # noqa: E402


def pair(hidden=24, state=8, conv=4, expand=2, seed=0):
    torch.manual_seed(seed)
    ours = MambaMixer(hidden, state, conv, expand).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p + 0.1 * torch.randn_like(p))
    hf_cfg = MambaConfig(hidden_size=hidden, state_size=state, conv_kernel=conv, expand=expand,
                         num_hidden_layers=1, use_bias=False, use_conv_bias=True,
                         time_step_rank=ours.dt_rank, use_mambapy=False)
    peer = HFMambaMixer(hf_cfg, layer_idx=0).eval()
    missing, unexpected = peer.load_state_dict(ours.state_dict(), strict=True)
    return ours, peer, hf_cfg


@pytest.mark.parametrize("L", [1, 3, 17])
def test_full_forward_matches_transformers(L):
    ours, peer, _ = pair()
    h = torch.randn(2, L, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(h), peer(h), rtol=0, atol=1e-5)


def test_cached_stepping_matches_transformers():
    ours, peer, cfg = pair(seed=1)
    h = torch.randn(2, 11, 24)
    prompt = 5
    # transformers 5.24 renamed the mixer's cache argument from cache_params to cache
    name = "cache" if "cache" in inspect.signature(HFMambaMixer.forward).parameters else "cache_params"
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        ref = [peer(h[:, :prompt], **{name: cache})]
        state = ours.new_state(2, torch.float32, "cpu")
        got = [ours(h[:, :prompt], state=state)]
        for t in range(prompt, 11):
            ref.append(peer(h[:, t:t + 1], **{name: cache}))
            got.append(ours(h[:, t:t + 1], state=state))
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(ref, 1), rtol=0, atol=1e-5)
    # and both agree with one uncached pass
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(got, 1), peer(h), rtol=0, atol=1e-5)
