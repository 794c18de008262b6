"""Bridge between transformers' ``Cache`` and the core model's recurrent ``State``.

The cache is transformers' own ``DynamicCache(config=...)``: one cache layer per model layer, by
``config.layer_types`` — a ``LinearAttentionLayer`` (conv + SSM state) per Mamba layer, a ``DynamicLayer``
(keys / values) per attention layer and a stateless ``DummyLayer`` per MLP / MoE layer. ``bind_state``
returns a core ``State`` whose Mamba tensors *are* the cache's tensors, so the core model's in-place
updates land in the cache with no copy. Attention keys / values grow by concatenation; ``commit`` appends
the new ones to the cache after the forward.

Beam search reorders the cache's tensors (``Cache.reorder_cache``); the next ``bind_state`` picks the
reordered tensors up.

``save_pretrained`` copies this file next to the weights for ``trust_remote_code``: import the core package
by absolute name, the other ``blackmamba.hf`` modules relatively.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from blackmamba.layers.attention import AttentionState
from blackmamba.layers.mamba import MambaState
from blackmamba.model import BlackMambaLM, State


def past_length(cache: Cache, lm: BlackMambaLM) -> int | None:
    """Tokens the attention layers of ``cache`` hold; ``None`` for a model without attention layers (a
    recurrent state does not know how many tokens it has seen)."""
    for i, blk in enumerate(lm.decoder.layers):
        if blk.kind == "attention":
            return cache.layers[i].get_seq_length()
    return None


def _check_batch(cached: torch.Tensor, batch_size: int, layer: int) -> None:
    if cached.shape[0] != batch_size:
        raise ValueError(f"cache_params holds {cached.shape[0]} sequences at layer {layer}, "
                         f"but input_ids has batch size {batch_size}")


def bind_state(cache: Cache, lm: BlackMambaLM, batch_size: int, past_mask: torch.Tensor | None) -> State:
    """A core ``State`` over ``cache``'s tensors (created on first use).

    ``past_mask`` (b, past): the attention mask of the tokens already in the cache, which attention layers
    need to keep cached padding masked (Mamba layers never see it: padding left no trace in their state);
    ``None``: every past token is real.
    """
    if len(cache.layers) != len(lm.decoder.layers):
        raise ValueError(f"cache_params has {len(cache.layers)} layers, the model has {len(lm.decoder.layers)}: "
                         f"make it with DynamicCache(config=model.config)")
    past = past_length(cache, lm)
    if past is not None and past_mask is not None and past_mask.shape[1] != past:
        raise ValueError(f"attention_mask covers {past_mask.shape[1]} past tokens but the cache holds {past}: "
                         f"give a mask over the cached and the new tokens, or over the new tokens only")
    layers = []
    for i, blk in enumerate(lm.decoder.layers):
        if blk.kind == "mamba":
            if cache.get_conv_state(i) is None:
                fresh = blk.new_state(batch_size, lm.dtype, lm.device)
                cache.update_conv_state(fresh.conv, i)
                cache.update_recurrent_state(fresh.ssm, i)
            conv = cache.get_conv_state(i)
            _check_batch(conv, batch_size, i)
            layers.append(MambaState(conv=conv, ssm=cache.get_recurrent_state(i)))
        elif blk.kind == "attention":
            st = blk.new_state(batch_size, lm.dtype, lm.device)
            if past:
                layer = cache.layers[i]
                _check_batch(layer.keys, batch_size, i)
                st.k, st.v = layer.keys, layer.values
                st.key_mask = (past_mask.bool() if past_mask is not None
                               else torch.ones(batch_size, past, dtype=torch.bool, device=lm.device))
            layers.append(st)
        else:
            layers.append(None)
    return State(layers=layers, batch_size=batch_size, seqlen=past or 0)


def commit(cache: Cache, state: State, past: int) -> None:
    """Append the keys / values the forward added to each attention layer of ``cache``."""
    for i, st in enumerate(state.layers):
        if isinstance(st, AttentionState):
            cache.update(st.k[:, :, past:], st.v[:, :, past:], i)
