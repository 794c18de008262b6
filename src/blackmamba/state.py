"""The recurrent state of a batch of sequences, and the row operations a server needs.

A ``State`` holds one entry per layer: ``MambaState`` (conv (b, I, K-1), ssm (b, I, N)), ``AttentionState``
(keys / values growing with the context, their mask, each row's position), or None (MLP and MoE layers keep
nothing). Every tensor has the batch first, so one row is one sequence, and the row operations are generic:

    state.select(rows)          a new State of those rows, copied (reorder, duplicate, drop: beams, forks)
    State.cat([a, b, ...])      a new State of all their rows (requests joining a batch)
    state.put(rows, src)        src's rows written into these rows, in place (a slot pool, restoring a snapshot)
    state.reset(rows)           rows back to a fresh sequence, in place
    state.clone()               a copy (a snapshot: ``state.select([i])`` snapshots row i)

A Mamba state has the same size whatever the context, so these are cheap copies of a few hundred KB a row.
Attention rows of different lengths are aligned by padding their keys on the left (masked, never attended to).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

def _time_dims(st) -> dict[str, int]:
    """The fields of a per-layer state that grow with the context, and their time dimension (a layer state class
    declares them as ``TIME_DIMS``; a Mamba state has none)."""
    return getattr(type(st), "TIME_DIMS", {})


def _pad_left(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """``t`` left-padded with zeros (False) along ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class State:
    """Recurrent state of a batch: one entry per layer (see the module docstring)."""

    layers: list = field(default_factory=list)
    batch_size: int = 0
    seqlen: int = 0  # positions consumed so far, padding included (the same for every row)
    started: list[bool] = field(default_factory=list)  # per row: a real (unpadded) token was consumed

    def tensors(self):
        for st in self.layers:
            if st is not None:
                for f in dataclasses.fields(st):
                    yield getattr(st, f.name)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------------ row operations
    def select(self, rows) -> "State":
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        layers = []
        for st in self.layers:
            layers.append(None if st is None else type(st)(**{
                f.name: getattr(st, f.name).index_select(0, rows.to(getattr(st, f.name).device))
                for f in dataclasses.fields(st)}))
        return State(layers, len(rows), self.seqlen, [self.started[i] for i in rows.tolist()])

    def clone(self) -> "State":
        return self.select(torch.arange(self.batch_size))

    @staticmethod
    def cat(states: list["State"]) -> "State":
        if not states:
            raise ValueError("State.cat: no states")
        layers = []
        for parts in zip(*(s.layers for s in states)):
            if parts[0] is None:
                layers.append(None)
                continue
            dims = _time_dims(parts[0])
            fields = {}
            for f in dataclasses.fields(parts[0]):
                ts = [getattr(p, f.name) for p in parts]
                if f.name in dims:
                    length = max(t.shape[dims[f.name]] for t in ts)
                    ts = [_pad_left(t, dims[f.name], length) for t in ts]
                fields[f.name] = torch.cat(ts)
            layers.append(type(parts[0])(**fields))
        return State(layers, sum(s.batch_size for s in states), max(s.seqlen for s in states),
                     [x for s in states for x in s.started])

    def put(self, rows, src: "State") -> None:
        """Write ``src``'s rows into ``rows`` of this state (``len(rows) == src.batch_size``), in place where the
        shapes allow (attention keys of a different length are realigned)."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if len(rows) != src.batch_size:
            raise ValueError(f"State.put: {len(rows)} rows for a state of {src.batch_size}")
        for dst, st in zip(self.layers, src.layers):
            if dst is None:
                continue
            dims = _time_dims(dst)
            for f in dataclasses.fields(dst):
                d, s = getattr(dst, f.name), getattr(st, f.name)
                if f.name in dims:  # align the time dimension: pad whichever side is shorter
                    length = max(d.shape[dims[f.name]], s.shape[dims[f.name]])
                    d, s = _pad_left(d, dims[f.name], length), _pad_left(s, dims[f.name], length)
                    setattr(dst, f.name, d)
                d.index_copy_(0, rows.to(d.device), s.to(d.dtype))
        self.seqlen = max(self.seqlen, src.seqlen)
        for i, r in enumerate(rows.tolist()):
            self.started[r] = src.started[i]

    def reset(self, rows=None) -> None:
        """Rows (all by default) back to a fresh sequence: zero state, nothing consumed."""
        rows = torch.arange(self.batch_size) if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        for t in self.tensors():
            t.index_fill_(0, rows.to(t.device), 0)
        for r in rows.tolist():
            self.started[r] = False
        if len(rows) == self.batch_size:
            self.seqlen = 0
