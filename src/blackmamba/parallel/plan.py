"""Memory and communication of one training rank, estimated before launching N processes.

    p = plan_training(cfg, world_size=8, ep=8, batch=16, seq=2048, dtype="bf16", activation_checkpointing=True)
    p.total, p.comm_total                  # bytes per rank: at the step's peak; moved per optimizer step
    print(describe_plan(p))                # what ``blackmamba info MODEL --world-size N ...`` prints

``plan_training`` validates its arguments (``ConfigError`` naming the problem: the CLI's exit status 2) and
describes the sharding ``blackmamba.parallel.apply.parallelize`` applies; every number is for the rank that holds
the most (rank 0: FSDP pads the last ranks' shards to the first's size). N ranks, expert-parallel size E_p:

- the mesh: all N ranks are data-parallel (rank r trains on windows [r B/N, (r+1) B/N) of each global
  micro-batch of B windows); with E_p > 1 they also form an (N / E_p) × E_p mesh (edp, ep);
- FSDP units (``fsdp_units``): every block (``decoder.layers[i]``) and the root (embedding, final LayerNorm, the
  untied head) over all N ranks; with E_p > 1 a rank keeps E / E_p experts of every MoE layer, one unit per
  layer over its edp group (N / E_p ranks), inside its block's; with E_p = 1 the experts are part of the block.
  FSDP2 shards each tensor on its first dimension: a rank holds ceil(d0 / G) rows of a (d0, ...) tensor over a
  group of G. A block unit is resharded after its forward, so it is all-gathered twice per micro-batch (forward,
  backward; the activation-checkpointing recompute runs while it is gathered); the root is not, so once;
- one rank (N = 1) is the single-process code: nothing is sharded, gathered or sent.

Memory per rank (bytes):

- params, grads, optimizer: 4, 4 and 2 × 4 (AdamW's moments) per element of the rank's shards: the fp32 master
  weights, whatever ``dtype`` (mixed precision is torch autocast; ``dtype`` changes the activations only);
- activations: ``train.memory``'s saved tensors for the rank's B / N windows of L tokens (its ``_mamba``, ``_moe``,
  ``_mlp``, ``_attention``, ``_head`` per layer); under bf16 the bf16 copies it counts are of those activations
  and of the weights this rank computes with (all but the other ranks' experts: autocast's cast cache keeps a
  copy of each gathered weight until the forward ends, even where FSDP has resharded the fp32 one);
- working: the widest working set on top of them, one at a time (``train.memory``'s transient: a layer's
  backward, the loss's, or AdamW's step, here over the rank's shards);
- gather_buffer: unsharded fp32 parameters in flight, N > 1: the root (kept from its forward to the end of the
  backward) plus three of the largest block (with its local experts): the one computing, the next one prefetched,
  and the computing one's unsharded gradients before their reduce-scatter; or, at the end of the backward, the
  root and its own gradients, if that is more;
- total: their sum. Not counted: the allocator's slack (``train.memory``), NCCL's buffers, the CUDA context.

Bytes per rank per optimizer step of A = ``grad_accum`` micro-batches, T = B / N × L tokens per rank:

- all_gather: A × Σ_units gathers × (G - 1) / G × 4 P (P: the unit's elements, padded to G equal shards);
- reduce_scatter: A × Σ_units (G - 1) / G × 4 P (one per unit per micro-batch);
- all_to_all (E_p > 1): A × MoE layers × X × T × H × 4 × (E_p - 1) / E_p, X = 4 exchanges (dispatch and combine
  in the forward, their gradients in the backward), 6 with activation checkpointing (the recompute's forward);
  4 bytes per element: fp32 activations (bf16 autocast makes some of them 2: an upper bound there). The tokens
  leave to the expert owners in equal shares (balanced routing); the per-expert counts (E int64) are not counted;
- sinkhorn_gather (N > 1, training routing other than top1, ``parallelize``'s default "global" Sinkhorn scope):
  every MoE layer's forward (and its recompute) all-gathers the router logits of all ranks, (N - 1) × T × E × 4
  bytes received each time, A times per step;
- comm_total: their sum (bytes received by all-gathers, sent by reduce-scatters and all-to-alls). The gradient
  norm's one-scalar all-reduce is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import BlackMambaConfig, ConfigError

F32 = 4
DTYPES = ("fp32", "bf16")


# ----------------------------------------------------------------------------- FSDP units
@dataclass(frozen=True)
class Unit:
    """One FSDP unit: its parameters' shapes, the group it is sharded over and its all-gathers per micro-batch."""

    name: str  # "root", "layers.3", "layers.3.experts"
    shapes: tuple[tuple[int, ...], ...]
    group: int  # ranks it is sharded over (G)
    gathers: int  # all-gathers per micro-batch: 1 (root, kept gathered for the backward) or 2

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def shard(self) -> int:
        """Elements one rank holds: ceil(d0 / G) rows of each (d0, ...) tensor (FSDP2's padded shard)."""
        return sum(-(-s[0] // self.group) * math.prod(s[1:]) for s in self.shapes)

    @property
    def padded(self) -> int:
        """Elements of the unit gathered in full, as the collectives move it (G equal shards)."""
        return self.group * self.shard


def fsdp_units(cfg: BlackMambaConfig, world_size: int, ep: int = 1) -> list[Unit]:
    """The FSDP units of ``cfg`` trained on ``world_size`` ranks with expert-parallel size ``ep`` (arguments as
    ``plan_training`` checks them): the root, then every block, each followed by its experts' unit when ep > 1.
    One rank: the same units over a group of 1 (nothing sharded). The shapes are read from the model itself,
    built on the meta device (no memory, no initialisation cost)."""
    import torch

    from ..model import BlackMambaLM

    with torch.device("meta"):
        model = BlackMambaLM(cfg)
    root = tuple(tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("decoder.layers."))
    units = [Unit("root", root, world_size, 1)]
    for i, blk in enumerate(model.decoder.layers):
        own = tuple(tuple(p.shape) for n, p in blk.named_parameters() if ".local_experts." not in n)
        experts = [tuple(p.shape) for n, p in blk.named_parameters() if ".local_experts." in n]  # expert order
        if ep == 1 or not experts:
            units.append(Unit(f"layers.{i}", own + tuple(experts), world_size, 2))
        else:  # a rank's E / ep experts: its unit over the ranks holding the same ones
            units.append(Unit(f"layers.{i}", own, world_size, 2))
            units.append(Unit(f"layers.{i}.experts", tuple(experts[:len(experts) // ep]), world_size // ep, 2))
    return units


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Bytes per rank (the module docstring says what each counts); the inputs it was made for first."""

    world_size: int
    ep: int
    batch: int  # windows per global micro-batch (B); batch // world_size per rank
    seq: int  # tokens per window (L)
    grad_accum: int
    dtype: str
    activation_checkpointing: bool
    # memory per rank at the step's peak
    params: int
    grads: int
    optimizer: int
    activations: int
    working: int
    gather_buffer: int
    total: int
    # sent or received per rank per optimizer step
    all_gather: int
    reduce_scatter: int
    all_to_all: int
    sinkhorn_gather: int
    comm_total: int


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r}: must be an integer >= 1")


def check_plan(cfg: BlackMambaConfig, world_size: int, ep: int, batch: int, seq: int, grad_accum: int = 1,
               dtype: str = "bf16") -> None:
    """``ConfigError`` (one line, the problem named) unless the arguments describe a run ``parallelize`` can
    shard: positive integers, ep dividing the world size and every MoE layer's experts, the batch splitting
    evenly over the ranks."""
    if not isinstance(cfg, BlackMambaConfig):
        raise ConfigError(f"expected a BlackMambaConfig, got {type(cfg).__name__}")
    for name, value in (("world_size", world_size), ("ep", ep), ("batch", batch), ("seq", seq),
                        ("grad_accum", grad_accum)):
        _positive_int(name, value)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")
    if world_size % ep:
        raise ConfigError(f"ep = {ep} does not divide world_size = {world_size}: the ranks form a "
                          f"(world_size / ep) × ep mesh")
    if ep > 1:
        moe = [(i, e) for i, (kind, e) in enumerate(cfg.layer_kinds()) if kind == "moe"]
        if not moe:
            raise ConfigError(f"ep = {ep}: the model has no MoE layer whose experts could be distributed")
        for i, e in moe:
            if e % ep:
                raise ConfigError(f"ep = {ep} does not divide the {e} experts of MoE layer {i}: choose a "
                                  f"divisor of {e}")
    if batch % world_size:
        raise ConfigError(f"batch = {batch} windows do not split over world_size = {world_size} ranks: choose a "
                          f"multiple of {world_size}")


def _activations(cfg: BlackMambaConfig, b: int, seq: int, dtype: str, checkpointing: bool, device: str,
                 weights: int) -> tuple[int, list[int]]:
    """(saved activation bytes, the sizes of each working set but AdamW's) of one rank's b windows (``train.memory``);
    under bf16 the copies of ``weights`` elements replace its copies of the whole model's."""
    from ..train.config import RunConfig
    from ..train.memory import tensor_sizes

    rc = RunConfig(preset="tiny", model=cfg.to_dict())  # every field overridden: exactly ``cfg``
    rc.data.seq_len, rc.optim.batch_size = seq, b
    rc.train.precision, rc.train.activation_checkpointing, rc.train.threads = dtype, checkpointing, 1
    saved_by_kind, phases, params = tensor_sizes(rc, None, device)
    saved = sum(sum(v) for k, v in saved_by_kind.items() if k != "bf16 copies")
    if dtype == "bf16":
        saved += saved // 2 + 2 * weights
    return saved, [sum(p) for p in phases if p is not params]  # the last phase, ``params``, is AdamW's


def plan_training(cfg: BlackMambaConfig, *, world_size: int, batch: int, seq: int, ep: int = 1,
                  grad_accum: int = 1, dtype: str = "bf16", activation_checkpointing: bool = False,
                  device: str = "cuda") -> Plan:
    """Memory and communication of one rank training ``cfg`` on ``world_size`` ranks with expert-parallel size
    ``ep``: global micro-batches of ``batch`` windows of ``seq`` tokens, ``grad_accum`` per optimizer step,
    activations in ``dtype`` ("fp32" or "bf16" autocast) on ``device`` ("cuda" or "cpu": which MoE kernel's
    activations ``train.memory`` counts). Raises ``ConfigError`` (``check_plan``) for an impossible layout."""
    check_plan(cfg, world_size, ep, batch, seq, grad_accum, dtype)
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device = {device!r}: must be cuda or cpu")
    N, A, T = world_size, grad_accum, batch // world_size * seq  # T: tokens per rank per micro-batch
    units = fsdp_units(cfg, N, ep)
    shards = sum(u.shard for u in units)  # elements this rank holds
    local = sum(u.numel for u in units)  # elements this rank computes with (its experts only)
    activations, phases = _activations(cfg, batch // N, seq, dtype, activation_checkpointing, device, local)
    working = max(phases + [F32 * shards])  # AdamW's step: a temporary per element of the rank's shards

    gather_buffer = 0
    if N > 1:
        root = units[0].padded
        block = max(u.padded + sum(e.padded for e in units if e.name == u.name + ".experts")
                    for u in units[1:] if not u.name.endswith(".experts"))
        gather_buffer = F32 * max(root + 3 * block, 2 * root)

    all_gather = A * sum(u.gathers * (u.group - 1) * u.shard for u in units) * F32
    reduce_scatter = A * sum((u.group - 1) * u.shard for u in units) * F32
    moe = [e for kind, e in cfg.layer_kinds() if kind == "moe"]
    forwards = 2 if activation_checkpointing else 1  # the forward, and the recompute in the backward
    exchanges = 2 * forwards + 2  # dispatch and combine per forward, their gradients in the backward
    all_to_all = A * len(moe) * exchanges * T * cfg.hidden_size * F32 * (ep - 1) // ep
    sinkhorn = cfg.router_train_mode != "top1"
    sinkhorn_gather = A * forwards * (N - 1) * T * sum(moe) * F32 if sinkhorn else 0

    params = F32 * shards
    return Plan(world_size=N, ep=ep, batch=batch, seq=seq, grad_accum=A, dtype=dtype,
                activation_checkpointing=activation_checkpointing,
                params=params, grads=params, optimizer=2 * params, activations=activations, working=working,
                gather_buffer=gather_buffer, total=4 * params + activations + working + gather_buffer,
                all_gather=all_gather, reduce_scatter=reduce_scatter, all_to_all=all_to_all,
                sinkhorn_gather=sinkhorn_gather,
                comm_total=all_gather + reduce_scatter + all_to_all + sinkhorn_gather)


# ----------------------------------------------------------------------------- the table
def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B" if n else "0"


def describe_plan(plan: Plan) -> str:
    """What ``blackmamba info MODEL --world-size N ...`` prints after the model: one line of settings, then the
    memory and the bytes moved per rank and over all ranks."""
    p, N = plan, plan.world_size
    mesh = f" (ep {p.ep}: a {N // p.ep} × {p.ep} mesh)" if p.ep > 1 else ""
    ckpt = ", activation checkpointing" if p.activation_checkpointing else ""
    head = (f"plan            {N} rank{'s' if N > 1 else ''}{mesh}, {p.dtype} activations{ckpt}\n"
            f"                micro-batches of {p.batch} windows × {p.seq} tokens ({p.batch // N} per rank), "
            f"grad_accum {p.grad_accum}")
    sections = [("memory", [("parameters (fp32 shards)", p.params), ("gradients (fp32 shards)", p.grads),
                            ("AdamW moments", p.optimizer), ("activations", p.activations),
                            ("backward working set", p.working), ("gathered units", p.gather_buffer),
                            ("total", p.total)]),
                ("per optimizer step", [("all-gather (parameters)", p.all_gather),
                                        ("reduce-scatter (gradients)", p.reduce_scatter),
                                        ("all-to-all (expert tokens)", p.all_to_all),
                                        ("all-gather (Sinkhorn logits)", p.sinkhorn_gather),
                                        ("total", p.comm_total)])]
    cells = []
    for title, items in sections:
        cells.append((title, "per rank", f"all {N} ranks"))
        cells += [(f"  {name}", _size(v), _size(N * v)) for name, v in items]
    if N == 1:  # the second column would repeat the first
        cells = [(a, b, "") for a, b, _ in cells]
    w = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [head] + [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}".rstrip() for a, b, c in cells]
    return "\n".join(lines)
