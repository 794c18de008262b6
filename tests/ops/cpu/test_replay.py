"""Replay (ops/cpu/replay.py): the model's block loop recorded once and made again in one C call, against the same
steps made eagerly (``BLACKMAMBA_CPU_REPLAY=0``) — bit-identical logits and states, however states are made,
reset, cut, dropped or the thread count changed in between; and a run that computes anything but the kernels is
never replayed."""

import gc
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.csrc import c_signatures, signature

import blackmamba
from blackmamba.ops import replayable
from blackmamba.ops.cpu import build as cpu
from blackmamba.ops.cpu import replay
from blackmamba.quantize import quantize_model
from blackmamba.state import State

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")


def _model(mode="fp32", layers=("r", "8", "r", "8"), seed=0):
    torch.manual_seed(seed)
    model = blackmamba.BlackMambaLM(blackmamba.preset("tiny", layers=list(layers))).eval()
    if mode == "bf16":
        return model.to_dtype(torch.bfloat16)
    return model if mode == "fp32" else quantize_model(model, mode)


def _eager_step(model, monkeypatch):
    monkeypatch.setenv("BLACKMAMBA_CPU_REPLAY", "0")
    step = model.bind_step()
    monkeypatch.delenv("BLACKMAMBA_CPU_REPLAY")
    return step


@pytest.fixture
def replays(monkeypatch):
    """How many replays have run (each one C call for the whole block loop)."""
    count = [0]
    real = replay._Recording.replay

    def counted(self, x):
        count[0] += 1
        return real(self, x)

    monkeypatch.setattr(replay._Recording, "replay", counted)
    return count


def _prefilled(model, ids):
    state = model.new_state(ids.shape[0])
    with torch.no_grad():
        model(ids, state=state)
    return state


def _same_states(a: State, b: State) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_replayed_steps_are_the_eager_steps_bit_for_bit(mode, batch, replays, monkeypatch):
    model = _model(mode)
    eager, replayed = _eager_step(model, monkeypatch), model.bind_step()
    ids = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(1))
    s_eager, s_replay = _prefilled(model, ids), _prefilled(model, ids)
    tok = ids[:, -1]
    with torch.no_grad():
        for _ in range(6):
            want = eager(tok, s_eager)
            got = replayed(tok, s_replay)
            assert torch.equal(got, want)
            assert _same_states(s_replay, s_eager)
            tok = want.argmax(-1)
    assert replays[0] == 4  # the first step eager, the second recorded, then replayed
    assert s_replay.seqlen == s_eager.seqlen == 11


def test_generation_and_a_stepper_replay(replays):
    model = _model("int4")
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=8)
    assert replays[0] == 6
    assert out.shape == (2, 12)


# a run of operations on one state (and its successors) of a batch: the replayed step must follow the eager one
_ACTIONS = st.lists(st.one_of(
    st.just(("step",)),
    st.tuples(st.just("reset"), st.lists(st.integers(0, 2), min_size=1, max_size=2)),  # in place
    st.tuples(st.just("select"), st.lists(st.integers(0, 2), min_size=1, max_size=3)),  # a new State
    st.tuples(st.just("threads"), st.integers(1, 2)),
    st.just(("drop",)),  # the state freed, a fresh one in its place (maybe at the same id and addresses)
), min_size=3, max_size=14)


@settings(max_examples=25, deadline=None)
@given(actions=_ACTIONS, seed=st.integers(0, 3))
def test_replay_follows_the_eager_step_through_state_operations(actions, seed):
    model = _model("int8", seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        eager = _eager_step(model, mp)
    replayed = model.bind_step()
    gen = torch.Generator().manual_seed(seed)
    s_eager = _prefilled(model, torch.randint(0, 256, (3, 3), generator=gen))
    s_replay = s_eager.clone()
    threads = torch.get_num_threads()
    replays, run = [0], 0  # run: steps since the state or the thread count last changed
    real = replay._Recording.replay

    def counted(self, x):
        replays[0] += 1
        return real(self, x)

    try:
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(replay._Recording, "replay", counted)
            for action in actions:
                rows = s_eager.batch_size
                if action[0] == "step":
                    tok = torch.randint(0, 256, (rows,), generator=gen)
                    assert torch.equal(replayed(tok, s_replay), eager(tok, s_eager))
                    assert _same_states(s_replay, s_eager)
                    run += 1
                    if run >= 3:  # (a state met twice is recorded: its third step in a row at the latest replays)
                        assert replays[0] > 0
                    continue
                run = 0 if action[0] != "reset" else run
                if action[0] == "reset":
                    which = sorted({r % rows for r in action[1]})
                    s_eager.reset(which)
                    s_replay.reset(which)
                elif action[0] == "select":
                    which = [r % rows for r in action[1]]
                    s_eager, s_replay = s_eager.select(which), s_replay.select(which)
                elif action[0] == "threads":
                    torch.set_num_threads(action[1])
                else:
                    del s_replay
                    gc.collect()
                    s_replay = model.new_state(rows)
                    s_eager = model.new_state(rows)
    finally:
        torch.set_num_threads(threads)


def test_a_run_that_computes_outside_the_kernels_is_never_replayed(replays, caplog):
    model = _model("fp32")
    blocks = [blk.bind_step() for blk in model.decoder.layers]

    def fn(h, state):
        residual = None
        for blk, s in zip(blocks, state.layers):
            h, residual = blk(h, residual, s)
            h = h * 1.0  # a torch op between the kernels: a replay would skip it
        return h, residual

    run, state, twin = replayable(fn), model.new_state(1), model.new_state(1)
    x = torch.randn(1, model.config.hidden_size)
    with torch.no_grad(), caplog.at_level("DEBUG", logger="blackmamba"):
        for _ in range(4):
            got, want = run(x, state), fn(x, twin)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert replays[0] == 0
    assert "not replayed: it runs torch ops besides the kernels (aten.mul.Tensor)" in caplog.text
    assert run.refused == {(x.shape, x.dtype)}


def test_attention_layers_are_stepped_eagerly(replays):
    model = _model("fp32", layers=("r", "8", "a", "1"))
    step, state = model.bind_step(), _prefilled(model, torch.tensor([[1, 2, 3]]))
    with torch.no_grad():
        for tok in torch.tensor([[4], [5], [6]]):
            step(tok, state)
    assert replays[0] == 0 and state.seqlen == 6


def test_replay_off_is_the_function_itself(monkeypatch):
    def fn(x, state):
        return (x,)

    monkeypatch.setenv("BLACKMAMBA_CPU_REPLAY", "0")
    assert replayable(fn) is fn
    monkeypatch.setenv("BLACKMAMBA_CPU_REPLAY", "1")
    assert replayable(fn) is not fn


def test_every_kernel_call_goes_through_launch():
    """A kernel called past ``launch`` would be missing from a recording, and no torch op would show it."""
    queries = {"bm_vector_bytes", "bm_scan_chunk", "bm_scan_max_state", "bm_scan_ranges", "bm_mamba_step_max_rows",
               "bm_gemv_max_rows", "bm_replay_max_args", "bm_replay"}
    direct = []
    for path in sorted(cpu.CSRC.parent.glob("*.py")):
        for line in path.read_text().splitlines():
            for name in re.findall(r"(?<!launch\()\b(?:lib|library\(\))\.(bm_\w+)\(", line):
                if name not in queries:
                    direct.append(f"{path.name}: {line.strip()}")
    assert direct == []
    assert set(replay.REPLAY_CODE) <= set(cpu.SIGNATURES)


def test_the_replay_dispatch_declares_the_kernels_as_defined():
    """csrc/replay.cpp declares the kernels it makes and switches on REPLAY_CODE: both must match."""
    source = (cpu.CSRC / "replay.cpp").read_text()
    declared = {name: signature(ret, params)
                for ret, name, params in re.findall(r"^(int) (bm_\w+)\(([^)]*)\);", source, re.M)}
    defined = c_signatures()
    assert set(declared) == set(replay.REPLAY_CODE)
    assert all(declared[name] == defined[name] for name in declared)
    enum = dict(re.findall(r"(k\w+) = (\d+)", source.split("enum Kernel")[1].split("}")[0]))
    cases = dict(re.findall(r"case (k\w+):\s*return (bm_\w+)\(", source))
    assert {cases[k]: int(v) for k, v in enum.items()} == replay.REPLAY_CODE
    for name in replay.REPLAY_CODE:  # every argument slot read, in order, once
        call = source.split(f"return {name}(")[1].split(";")[0]
        slots = [int(i) for i in re.findall(r"x\.\w+(?:<[^>]*>)?\((\d+)\)", call)]
        assert slots == list(range(len(cpu.SIGNATURES[name][1])))


def test_a_recording_fits_only_the_live_state_it_was_made_for():
    model = _model("int4")
    blocks = [blk.bind_step() for blk in model.decoder.layers]

    def fn(h, state):
        residual = None
        for blk, s in zip(blocks, state.layers):
            h, residual = blk(h, residual, s)
        return h, residual

    run, state = replayable(fn), model.new_state(2)
    x = torch.randn(2, model.config.hidden_size)
    threads = torch.get_num_threads()
    with torch.no_grad():
        run(x, state)
        run(x, state)
        (rec,) = run.recordings.values()
        assert rec.fits(x, state)
        assert not rec.fits(x.double(), state) and not rec.fits(x[:1], state)
        assert not rec.fits(x, state.clone())  # another State: its own recording
        try:
            torch.set_num_threads(1 if threads > 1 else 2)
            assert not rec.fits(x, state)  # the recorded calls' thread counts are no longer torch's
        finally:
            torch.set_num_threads(threads)
        assert rec.fits(x, state)
        state.reset([1])  # in place: still the recorded tensors
        assert rec.fits(x, state)
        state.layers[0].conv = state.layers[0].conv.clone()  # a tensor replaced: its address is not recorded
        assert not rec.fits(x, state)
        del state
        gc.collect()
        assert rec.state() is None  # held weakly: a dropped state is never replayed into
