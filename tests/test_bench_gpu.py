"""The GPU benchmark's bookkeeping (byte counts, timing, table); the benchmark itself needs a GPU."""

import argparse

import pytest
import torch

import blackmamba
from blackmamba.bench.gpu import decode_bytes_per_token, format_rows, run_gpu_bench, scan_bytes, time_fn


def test_scan_bytes_counts_the_big_tensors():
    b, l, d, n = 2, 3, 5, 4
    fwd = scan_bytes(b, l, d, n, 2, backward=False)
    assert fwd == 4 * b * l * d * 2 + 2 * b * l * n * 2 + d * n * 4 + d * 4 + b * d * n * 4
    both = scan_bytes(b, l, d, n, 2, backward=True)
    assert both - fwd == 7 * b * l * d * 2 + 4 * b * l * n * 2 + 2 * (d * n * 4 + d * 4)


def test_decode_bytes_reads_one_expert_per_token_and_the_state():
    model = blackmamba.BlackMambaLM(blackmamba.preset("tiny"))  # layers r,4,r,4
    per_expert = sum(p.numel() * 4 for p in model.decoder.layers[1].mixer.local_experts[0].parameters())
    all_weights = sum(p.numel() * 4 for p in model.parameters())
    state = model.new_state(1).nbytes()
    assert decode_bytes_per_token(model, 1) == all_weights - 2 * 3 * per_expert + 2 * state
    assert decode_bytes_per_token(model, 8) == all_weights + 2 * model.new_state(8).nbytes()


def test_time_fn_and_table_on_cpu():
    t = time_fn(lambda: torch.ones(10).sum(), torch.device("cpu"), warmup=1, iters=3)
    assert t > 0
    table = format_rows([dict(bench="x", value=123.0, unit="tok/s", vs_reference=2.0, roofline_fraction=0.5)])
    assert "2.00×" in table and "50.0%" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_run_gpu_bench_without_gpu_is_a_clear_error():
    from blackmamba.cli import UserError

    with pytest.raises(UserError, match="no CUDA device"):
        run_gpu_bench(argparse.Namespace(quick=True))
