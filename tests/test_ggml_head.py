"""The llama.cpp backend's head per row (runtime/ggml_head.py): how a verify's rows are split into blocks, and
q8_head.c's rows against ggml's own kernel. The rows in the backend (bit for bit the graph's) are checked in
tests/test_backend_contract.py and tests/test_real_target.py."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest

from mtpkit.runtime.ggml_head import cheapest_block, plan_blocks, rows_seconds

# what ggml's Q8_0 head cost on this repo's 2-core CPU for 1..8 rows (ms): not linear (tile shapes)
MEASURED = {1: 6.4, 2: 15.7, 3: 19.1, 4: 19.3, 5: 32.1, 6: 34.7, 7: 36.9, 8: 25.5}


def _seconds(table):  # blocks of up to 8 rows, each padded to its cheapest width
    return partial(rows_seconds, table)


def _expected(starts, n, reach, seconds):
    ends = starts[1:] + [n]
    return sum(reach[s] * seconds(e - s) for s, e in zip(starts, ends, strict=True))


def test_plan_is_the_cheapest_split_in_expectation():
    """Against every split of up to 9 rows, for random cost tables and acceptance."""
    g = np.random.default_rng(0)
    for _ in range(150):
        n = int(g.integers(1, 10))
        table = {w: float(g.uniform(1, 10)) for w in range(1, 9)}
        a = g.uniform(0, 1, n)
        reach = [1.0] + list(np.cumprod(a[1:]))
        sec = _seconds(table)
        got = plan_blocks(sec, reach)
        assert got[0] == 0 and got == sorted(set(got)) and got[-1] < n
        best = min(_expected([0, *cut], n, reach, sec)
                   for r in range(n) for cut in itertools.combinations(range(1, n), r))
        assert _expected(got, n, reach, sec) == pytest.approx(best)


def test_rows_are_priced_in_blocks_of_their_cheapest_width():
    assert cheapest_block(MEASURED, 5) == (8, 25.5) and cheapest_block(MEASURED, 3) == (3, 19.1)
    assert rows_seconds(MEASURED, 6) == 25.5 and rows_seconds(MEASURED, 11) == 25.5 + 19.1  # 8 + 3
    assert cheapest_block({1: 1.0, 2: float("inf"), 3: 2.0}, 2) == (3, 2.0)  # a width never used is priced inf


def test_high_acceptance_computes_the_verify_as_one_block_and_low_row_0_alone():
    sec = _seconds(MEASURED)
    assert plan_blocks(sec, [0.95 ** i for i in range(6)]) == [0]  # 6 rows padded to 8: 25.5 ms, not 6 x 6.4
    assert plan_blocks(sec, [0.3 ** i for i in range(6)]) == [0, 1, 2, 3, 4, 5]  # row 0 alone, rarely more
    assert plan_blocks(sec, [1.0, 0.9, 0.8, 0.7, 0.6]) == [0, 4]  # 4 rows for the price of 3, then the 5th alone


def _vnni() -> bool:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "f16c" in flags and "fma" in flags and (
        ("avx512_vnni" in flags and "avx512vl" in flags) or "avx_vnni" in flags)


@pytest.mark.skipif(not _vnni(), reason="q8_head.c needs an x86 CPU with AVX2, FMA, F16C and VNNI")
def test_q8_head_kernel_gives_ggml_rows_bit_for_bit():
    """q8_head.c against ggml's own one-row kernel (what a plain step's head runs on x86: ggml_vec_dot_q8_0_q8_0 on the
    activation quantized by quantize_row_q8_0), for 1..8 rows at once, an odd row count split over 3 threads."""
    import ctypes

    pytest.importorskip("llama_cpp")
    from mtpkit.runtime.ggml_head import _lib_dir, q8_kernel
    kernel = q8_kernel()
    ggml = ctypes.CDLL(str(_lib_dir() / "libggml-cpu.so"))
    ggml.ggml_cpu_init()
    quant, dot = ggml.quantize_row_q8_0, ggml.ggml_vec_dot_q8_0_q8_0
    quant.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    dot.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                    ctypes.c_size_t, ctypes.c_int]
    g = np.random.default_rng(0)
    V, d, rb = 1001, 640, 640 // 32 * 34
    wf = (g.standard_normal((V, d)) * g.uniform(0.01, 3, (V, 1))).astype(np.float32)
    wf[7] = 0  # an all-zero row (scale 0)
    W = np.zeros((V, rb), np.uint8)
    for i in range(V):
        quant(wf[i].ctypes.data, W[i].ctypes.data, d)
    x = (g.standard_normal((8, d)) * [[1], [100], [1e-3], [30], [5], [0.5], [60], [2]]).astype(np.float32)
    x[2, :320] = 0
    ref = np.zeros((8, V), np.float32)
    xq, s = np.zeros(rb, np.uint8), ctypes.c_float()
    for r in range(8):
        quant(x[r].ctypes.data, xq.ctypes.data, d)
        for i in range(V):
            dot(d, ctypes.byref(s), 0, W[i].ctypes.data, 0, xq.ctypes.data, 0, 1)
            ref[r, i] = s.value
    for R in range(1, 9):
        out = np.full((R, V), np.nan, np.float32)
        assert kernel(W.ctypes.data, V, d, np.ascontiguousarray(x[:R]).ctypes.data, R, out.ctypes.data, 3) == 0
        assert np.array_equal(out.view(np.uint32), ref[:R].view(np.uint32)), R
    assert kernel(W.ctypes.data, V, d, x.ctypes.data, 9, out.ctypes.data, 2) == 1  # more rows than it holds: refused
