"""v3 of the Triton kd_loss compiled on a GPU (skipped without CUDA): rows cut into chunks whose programs meet at
barriers. Triton's interpreter runs the chunks' math in stages (tests/test_kd_loss.py), never the barriers; these run
them: against one program per row (FASTDISTILL_TRITON_ROW=v2, the same kernel with C = 1), bit for bit run to run,
with every chunk count up to the SM count, and beside another launch competing for the SMs."""

import pytest
import torch
from conftest import DIVERGENCES, loss_and_grads
from tolerances import assert_close

import fastdistill
from fastdistill.ops.triton import kd_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(n, v, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = torch.randn(n, v, device="cuda", generator=g) * 3
    ts = [torch.randn(n, v, device="cuda", generator=g) * 3 for _ in range(k)]
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = -100
    return s, ts, labels


def _chunks(v, k, tiles, monkeypatch):
    if tiles:
        monkeypatch.setenv(kd_loss.CHUNK_TILES_ENV, tiles)
    else:
        monkeypatch.delenv(kd_loss.CHUNK_TILES_ENV, raising=False)
    block = kd_loss._block(kd_loss._teacher_bucket(k))
    return kd_loss.row_split(-(-v // block), k, 4, block, torch.device("cuda"), 64)[0]


CASES = [(v, k, div, "") for div in DIVERGENCES for v, k in ((3000, 1), (32768, 4), (128256, 1))] + [
    (128256, 1, "kl", "1"),  # 63 chunks of two tiles: the most a row may have on an H200 (half its 132 SMs)
    (32768, 2, "jsd", "3"),  # ragged: 11 chunks, the last of 2 tiles
]


@pytest.mark.parametrize("v,k,divergence,tiles", CASES)
def test_row_split_matches_one_program_per_row(monkeypatch, v, k, divergence, tiles):
    """Loss and every gradient (student and teachers; CE with labels and ignored rows; grad_output 0.7), float32:
    v3 against v2 within float32 tolerance, and v3 twice bit for bit (no float atomics)."""
    chunks = _chunks(v, k, tiles, monkeypatch)
    assert chunks > 1, "the case must cut its rows into chunks"
    s, ts, labels = _inputs(64, v, k)
    kw = dict(divergence=divergence, temperature=2.0, labels=labels, ce_weight=0.25, backend="triton")
    go = torch.tensor(0.7, device="cuda")
    loss, grads = loss_and_grads(s, ts, go, True, **kw)
    again, grads_again = loss_and_grads(s, ts, go, True, **kw)
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again)), (
        "v3 is not reproducible run to run"
    )
    monkeypatch.setenv(kd_loss.ROW_KERNEL_ENV, "v2")
    ref_loss, ref_grads = loss_and_grads(s, ts, go, True, **kw)
    assert torch.isfinite(loss).all(), f"NaN loss with {chunks} chunks a row: did a barrier give up?"
    assert_close(loss, ref_loss, torch.float32, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad")


def test_row_split_beside_a_competing_launch(monkeypatch):
    """Two v3 launches of 63 chunks a row (the most, on an H200) on two streams at once: their programs compete for
    the SMs (and so start in interleaved order), and the tickets keep every row's programs progressing: both finish,
    with the values one launch alone gives."""
    monkeypatch.setenv(kd_loss.CHUNK_TILES_ENV, "1")
    s, ts, _ = _inputs(2048, 128256, 1)
    alone = fastdistill.kd_loss(s, ts, backend="triton", reduction="none")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    out = []
    for st in streams:
        with torch.cuda.stream(st):
            out.append(fastdistill.kd_loss(s, ts, backend="triton", reduction="none"))
    torch.cuda.synchronize()
    for o in out:
        assert torch.equal(o, alone)


def test_row_split_traffic_fits_the_cache_plan():
    """The chunking the launcher picks at the benchmark shapes (bf16): ~16 KB of input a chunk, C <= the SM count."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for v, k in ((32768, 1), (32768, 4), (128256, 1), (128256, 4)):
        block = kd_loss._block(kd_loss._teacher_bucket(k))
        chunks, tiles = kd_loss.row_split(-(-v // block), k, 2, block, torch.device("cuda"), 8192)
        assert 1 < chunks <= min(kd_loss.CMAX, sms // 2)
        assert tiles * block * (k + 1) * 2 <= 2 * kd_loss.CHUNK_BYTES
