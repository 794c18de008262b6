"""``BlackMambaCache``: transformers' ``Cache`` protocol over the core model's recurrent ``State``.

transformers' own ``DynamicCache`` keeps Mamba states in its ``LinearAttentionLayer``s, whose semantics change
from release to release (5.24 refuses ``get_seq_length`` on a cache without attention layers; 5.25 counts tokens
in ``update_conv_state`` calls). The adapter therefore owns its cache: a ``Cache`` subclass with no transformers
layers that holds the core ``State`` (conv + SSM state per Mamba layer, keys / values per attention layer) and
answers the calls ``generate`` makes through the ``Cache`` base class's public methods:

- ``get_seq_length()``: tokens consumed so far (padding included, as transformers counts the attention mask);
- ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave``: row selection for beam search and
  expanded batches (``State.select``);
- ``crop`` raises: a recurrent state cannot be rolled back (no assisted decoding);
- ``reset`` forgets the state.

The state is created on the first forward, when the batch size is known (``BlackMambaForCausalLM.forward``).

``save_pretrained`` copies this file next to the weights for ``trust_remote_code``: import the core package
by absolute name, the other ``blackmamba.hf`` modules relatively.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from blackmamba.model import State


class BlackMambaCache(Cache):
    """The recurrent state of a batch, as a transformers ``Cache``; ``state`` is None until the first forward."""

    def __init__(self, state: State | None = None):
        super().__init__(layers=[])
        self.state = state

    def __repr__(self) -> str:
        rows = "empty" if self.state is None else f"{self.state.batch_size} rows, {self.state.seqlen} tokens"
        return f"{type(self).__name__}({rows})"

    # ------------------------------------------------------------------ lengths
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.seqlen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum: the state's size does not depend on the length

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    # ------------------------------------------------------------------ rows
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.select(torch.arange(self.state.batch_size).repeat_interleave(repeats))

    def reset(self) -> None:
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a BlackMamba cache holds recurrent states, which cannot be rolled back "
                         "(assisted / speculative decoding is not supported)")

    # ------------------------------------------------------------------ what transformers asks of a cache
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None


__all__ = ["BlackMambaCache"]
