"""Copying rows of a recurrent ``State``: prefill a context once, then continue it several ways."""

from __future__ import annotations

import dataclasses

import torch

from ..model import State


def select_rows(state: State, rows: torch.Tensor) -> State:
    """A new ``State`` whose row j is a copy of ``state``'s row ``rows[j]`` (rows may repeat).

    Every per-layer state is a dataclass of tensors with the batch first (Mamba: conv, ssm; attention:
    k, v, key_mask), so this copies any of them; the original is left untouched.
    """
    rows = rows.to(dtype=torch.long)
    layers = []
    for st in state.layers:
        if st is None:
            layers.append(None)
            continue
        layers.append(type(st)(**{f.name: getattr(st, f.name).index_select(0, rows.to(getattr(st, f.name).device))
                                  for f in dataclasses.fields(st)}))
    return State(layers=layers, batch_size=len(rows), seqlen=state.seqlen)
