"""Replay (ops/cpu/replay.py): the model's block loop recorded once and made again in one C call, against the same
steps made eagerly (``BLACKMAMBA_CPU_REPLAY=0``) — bit-identical logits and states, however states are made,
reset, cut, dropped or the thread count changed in between; and a run that computes anything but the kernels is
never replayed."""

import functools
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


def _model(mode="fp32", layers=("r", "8", "r", "8"), seed=0, **kw):
    torch.manual_seed(seed)
    model = blackmamba.BlackMambaLM(blackmamba.preset("tiny", layers=list(layers), **kw)).eval()
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

    def counted(self, *args):
        count[0] += 1
        return real(self, *args)

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


@functools.lru_cache(maxsize=None)
def _wide_model(seed):
    return _model("int8", seed=seed, hidden_size=128)  # (wide enough for the kernels to run on 2 threads)


# a run of operations on one state (and its successors) of a batch: the replayed step must follow the eager one
_ACTIONS = st.lists(st.one_of(
    st.just(("step",)),
    st.tuples(st.just("reset"), st.lists(st.integers(0, 2), min_size=1, max_size=2)),  # in place
    st.tuples(st.just("put"), st.integers(0, 2)),  # a fresh prefilled row written in place
    st.tuples(st.just("select"), st.lists(st.integers(0, 2), min_size=1, max_size=3)),  # a new State
    st.just(("cat",)),  # a new State: the engine's join
    st.tuples(st.just("threads"), st.integers(1, 2)),
    st.just(("drop",)),  # the state freed, a fresh one in its place (maybe at the same id and addresses)
), min_size=3, max_size=14)


@settings(max_examples=25, deadline=None)
@given(actions=_ACTIONS, seed=st.integers(0, 3))
def test_replay_follows_the_eager_step_through_state_operations(actions, seed):
    model = _wide_model(seed)
    with pytest.MonkeyPatch.context() as mp:
        eager = _eager_step(model, mp)
    replayed = model.bind_step()
    gen = torch.Generator().manual_seed(seed)
    s_eager = _prefilled(model, torch.randint(0, 256, (3, 3), generator=gen))
    s_replay = s_eager.clone()
    threads = torch.get_num_threads()
    replays, run, before = [0], 0, 0  # run: steps since the state (or the thread count) last changed
    real = replay._Recording.replay

    def counted(self, *args):
        replays[0] += 1
        return real(self, *args)

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
                    if run == 2:
                        before = replays[0]
                    if run >= 3:  # met twice, recorded: from its third step in a row on, each one a replay
                        assert replays[0] - before == run - 2
                    continue
                if action[0] not in ("reset", "put"):
                    run = 0
                if action[0] == "reset":
                    which = sorted({r % rows for r in action[1]})
                    s_eager.reset(which)
                    s_replay.reset(which)
                elif action[0] == "put":
                    fresh = _prefilled(model, torch.randint(0, 256, (1, 2), generator=gen))
                    s_eager.put([action[1] % rows], fresh)
                    s_replay.put([action[1] % rows], fresh)
                elif action[0] == "select":
                    which = [r % rows for r in action[1]]
                    s_eager, s_replay = s_eager.select(which), s_replay.select(which)
                elif action[0] == "cat":
                    fresh = _prefilled(model, torch.randint(0, 256, (1, 2), generator=gen))
                    s_eager, s_replay = State.cat([s_eager, fresh]), State.cat([s_replay, fresh])
                elif action[0] == "threads":
                    run = 0 if action[1] != torch.get_num_threads() else run  # (a change: recorded again)
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
    loop = model.bind_blocks()

    def fn(h, state):
        h, residual = loop(h, state)
        return h * 1.0, residual  # a torch op besides the kernels: a replay would skip it

    run, state, twin = replayable(fn), model.new_state(1), model.new_state(1)
    x = torch.randn(1, model.config.hidden_size)
    with torch.no_grad(), caplog.at_level("DEBUG", logger="blackmamba"):
        for _ in range(4):
            got, want = run(x, state), fn(x, twin)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert replays[0] == 0
    assert "not replayed: it runs torch ops besides the kernels (aten.mul.Tensor)" in caplog.text
    assert [type(r) for r in run.recordings.values()] == [replay._Refused]
    assert caplog.text.count("not replayed") == 1  # refused once for the state, not tried at every step


def test_the_callers_input_is_never_written_and_the_outputs_are_reused(replays):
    model = _model("int4")
    run, state = replayable(model.bind_blocks()), model.new_state(2)
    xs = torch.randn(4, 2, model.config.hidden_size)
    kept = xs.clone()
    with torch.no_grad():
        outs = [run(x, state) for x in xs]
    assert torch.equal(xs, kept)
    assert replays[0] == 2 and outs[2][0] is outs[3][0]  # the recording's buffers, overwritten by each replay


def test_a_replayable_inside_a_recording_is_recorded_not_replayed(replays):
    """The inner one's kernels are recorded into the outer recording (a replay of the inner one, a C call no
    dispatch mode sees, would be missing from it)."""
    model = _model("int8")
    inner = replayable(model.bind_blocks())
    outer = replayable(lambda h, state: inner(h, state))
    eager = model.bind_blocks()
    s_outer, s_eager = model.new_state(1), model.new_state(1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):  # the inner one recorded and replayed alone first
            h = torch.randn(1, model.config.hidden_size, generator=gen)
            assert all(torch.equal(a, b) for a, b in zip(inner(h, s_outer), eager(h, s_eager)))
        for _ in range(4):
            h = torch.randn(1, model.config.hidden_size, generator=gen)
            assert all(torch.equal(a, b) for a, b in zip(outer(h, s_outer), eager(h, s_eager)))
            assert _same_states(s_outer, s_eager)
    # the inner one's third and fourth calls (the second through the outer one's first), the outer one's third
    # and fourth; not the inner one inside the outer one's recording
    assert replays[0] == 2 + 2


def test_inference_mode_and_another_thread():
    """Recorded under torch.inference_mode, replayed outside it and on another thread: the same steps."""
    import threading

    model = _model("int4")
    step = model.bind_step()
    with pytest.MonkeyPatch.context() as mp:
        eager = _eager_step(model, mp)
    s_replay, s_eager = model.new_state(1), model.new_state(1)
    toks = torch.randint(0, 256, (6, 1), generator=torch.Generator().manual_seed(4))
    got = []
    with torch.inference_mode():
        for t in toks[:3]:
            got.append(step(t, s_replay))
    worker = threading.Thread(target=lambda: got.extend(step(t, s_replay) for t in toks[3:]))
    with torch.no_grad():
        worker.start()
        worker.join()
        want = [eager(t, s_eager) for t in toks]
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert _same_states(s_replay, s_eager)


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
    for path in sorted(p for p in cpu.CSRC.parent.glob("*.py") if p.name != "replay.py"):  # (launch itself)
        for line in path.read_text().splitlines():
            for name in re.findall(r"(?<!launch\()\b(?:lib|library\(\))\.(bm_\w+)\(", line):
                if name not in queries:
                    direct.append(f"{path.name}: {line.strip()}")
            if re.search(r"(?<!launch\()\bkernel\(", line):  # a bound kernel, called from its variable
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
    accessor = {"i": "c_int", "l": "c_long", "f": "c_float", "p": "pointer"}  # (ctypes names c_int64 c_long)
    for name in replay.REPLAY_CODE:  # every argument slot read, in order, once, as its parameter's type
        call = source.split(f"return {name}(")[1].split(";")[0]
        reads = re.findall(r"x\.(\w)(?:<[^>]*>)?\((\d+)\)", call)
        assert [int(i) for _, i in reads] == list(range(len(defined[name][1])))
        assert [accessor[a] for a, _ in reads] == defined[name][1]


def test_a_recording_replays_only_the_live_state_it_was_made_for():
    model = _model("int4")
    run, state = replayable(model.bind_blocks()), model.new_state(2)
    x = torch.randn(2, model.config.hidden_size)
    threads = torch.get_num_threads()
    with torch.no_grad():
        run(x, state)
        run(x, state)
        (rec,) = run.recordings.values()
        assert rec.live(x, state) is not None
        assert rec.live(x.double(), state) is None and rec.live(x[:1], state) is None
        assert rec.live(x, state.clone()) is None  # another State: its own recording
        try:
            torch.set_num_threads(1 if threads > 1 else 2)
            assert rec.live(x, state) is None  # the recorded calls' thread counts are no longer torch's
        finally:
            torch.set_num_threads(threads)
        assert rec.live(x, state) is not None
        state.reset([1])  # in place: still the recorded tensors
        assert rec.live(x, state) is not None
        state.layers[0].conv = state.layers[0].conv.clone()  # a tensor replaced: its address is not recorded
        assert rec.live(x, state) is None
        del state
        gc.collect()
        assert rec.state() is None  # held weakly: a dropped state is never replayed into
