"""The target's output head for one row at a time, computed by ggml's own CPU kernel over llama.cpp's own weight
tensor: the llama.cpp backend's `verify_rows` (a verify whose logits rows are computed only when acceptance reads
them).

On a CPU the head is most of a llama.cpp verify: Gemma 3 270M's tied 262,144 x 640 head costs ~7 ms a row on this
repo's 2 cores, the 18 layers ~5 ms for one row and ~13 ms for four. A verify of k + 1 tokens computes k + 1 head
rows, and acceptance reads only rows 0..n (n accepted drafts): a rejected first draft paid k head rows for nothing.
Here the verify stops its graph after the final norm (an eval callback), and row i's logits are one `ggml_mul_mat`
of the head weight (the tensor the graph's own `result_output` multiplies: read from that node, no copy) with row
i of the norm's output, on the same thread count. Same kernel, same inputs: the logits are bit-identical to the
graph's (checked at load and in tests/test_backend_contract.py).

A Q8_0 head (the source GGUF's) also has `q8_head.c`: the same rows bit for bit, several at once from one pass over
the weights (ggml computes one row per pass, and its tiled kernels for several rows round otherwise), built once
with the system C compiler into the user cache. On this repo's CPU, 1..8 rows: 6.2 / 7.2 / 10.9 / 11.8 / 12.3 / 12.9 /
14.9 / 17.2 ms, against ggml's 7.1 / 16.3 / 18.6 / 20.6 / 32.7 / 39.7 / 38.5 / 25.9 (bench/results/cpu_lazy_rows/NOTES.md).
RowHead times both at load and uses, per block width, the cheaper one whose rows equal ggml's row alone.

ggml's tensor struct is read through ctypes; the layout below is llama-cpp-python 0.3.36's ggml (checked against
`ggml_tensor_overhead()` and a tensor made here before anything is read through it).
"""

from __future__ import annotations

import ctypes
import platform
import sys
from ctypes import POINTER, c_bool, c_char, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path

import numpy as np

from mtpkit.errors import MtpkitError

GGML_TYPE_F32 = 0
GGML_TYPE_Q8_0 = 8
Q8_0_BLOCK = (32, 34)  # values, bytes
KERNEL_SOURCE = Path(__file__).with_name("q8_head.c")
NORM_NAMES = (b"result_norm", b"result_embd_pooled")  # the final norm's output (renamed when embeddings are on)


class Tensor(ctypes.Structure):  # struct ggml_tensor (ggml.h, GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_NAME 64)
    _fields_ = [("type", c_int), ("buffer", c_void_p), ("ne", c_int64 * 4), ("nb", c_size_t * 4), ("op", c_int),
                ("op_params", c_int32 * 16), ("flags", c_int32), ("src", c_void_p * 10), ("view_src", c_void_p),
                ("view_offs", c_size_t), ("data", c_void_p), ("name", c_char * 64), ("extra", c_void_p),
                ("padding", c_char * 8)]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


OBJECT_SIZE = 32  # struct ggml_object, which precedes every tensor in a context


def _lib_dir() -> Path:
    import llama_cpp
    return Path(llama_cpp.__file__).parent / "lib"


def q8_kernel():
    """q8_head.c's `mtpkit_q8_head`, compiled once per (source, ggml library, CPU) into the user cache and loaded;
    RuntimeError(why) where it cannot be (not Linux x86-64, no C compiler, a CPU without VNNI)."""
    from mtpkit.paths import compiled_library
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("the Q8_0 head kernel is built for Linux x86-64 only")
    lib_dir = _lib_dir()
    try:  # -march=native: one build per CPU
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    out = compiled_library("the Q8_0 head kernel", "q8_head", KERNEL_SOURCE.read_text(),
                           ["-march=native", "-ffp-contract=off", "-fopenmp", f"-L{lib_dir}", "-lggml-cpu",
                            f"-Wl,-rpath,{lib_dir}"], key=flags)
    fn = ctypes.CDLL(str(out)).mtpkit_q8_head
    fn.argtypes = [c_void_p, c_int64, c_int, c_void_p, c_int, c_void_p, c_int]
    fn.restype = c_int
    return fn


def _libs():
    d = _lib_dir()
    names = {"base": ["libggml-base.so", "libggml-base.dylib", "ggml-base.dll"],
             "cpu": ["libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"]}
    out = {}
    for k, cands in names.items():
        path = next((d / n for n in cands if (d / n).exists()), None)
        if path is None:
            return None
        out[k] = ctypes.CDLL(str(path))
    base, cpu = out["base"], out["cpu"]
    base.ggml_tensor_overhead.restype = c_size_t
    base.ggml_init.argtypes = [_InitParams]
    base.ggml_init.restype = c_void_p
    base.ggml_free.argtypes = [c_void_p]
    base.ggml_new_tensor_2d.argtypes = [c_void_p, c_int, c_int64, c_int64]
    base.ggml_new_tensor_2d.restype = c_void_p
    base.ggml_mul_mat.argtypes = [c_void_p, c_void_p, c_void_p]
    base.ggml_mul_mat.restype = c_void_p
    base.ggml_new_graph.argtypes = [c_void_p]
    base.ggml_new_graph.restype = c_void_p
    base.ggml_build_forward_expand.argtypes = [c_void_p, c_void_p]
    base.ggml_set_name.argtypes = [c_void_p, c_char_p]
    base.ggml_set_name.restype = c_void_p
    base.ggml_op_name.argtypes = [c_int]
    base.ggml_op_name.restype = c_char_p
    base.ggml_get_name.argtypes = [c_void_p]
    base.ggml_get_name.restype = c_char_p
    base.ggml_backend_buffer_is_host.argtypes = [c_void_p]
    base.ggml_backend_buffer_is_host.restype = c_bool
    cpu.ggml_graph_compute_with_ctx.argtypes = [c_void_p, c_void_p, c_int]
    cpu.ggml_graph_compute_with_ctx.restype = c_int
    return base, cpu


def _layout_ok(base) -> bool:
    """Our Tensor struct is ggml's: same size, and a tensor made here reads back its type, shape and name."""
    if base.ggml_tensor_overhead() != OBJECT_SIZE + ctypes.sizeof(Tensor):
        return False
    ctx = base.ggml_init(_InitParams(1 << 16, None, True))
    try:
        t = base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 7, 3)
        base.ggml_set_name(t, b"mtpkit_probe")
        s = Tensor.from_address(t)
        return (s.type == GGML_TYPE_F32 and list(s.ne) == [7, 3, 1, 1] and s.nb[0] == 4 and s.nb[1] == 28
                and s.name == b"mtpkit_probe" and s.data is None)
    finally:
        base.ggml_free(ctx)


class HeadWatch:
    """The target context's eval callback. Always: finds the head (the `result_output` node, a MUL_MAT of a host
    weight by the final norm's output). While `capture` is set: copies the norm's output [rows, d] to `norm` and
    stops the graph there (no head, no logits)."""

    def __init__(self):
        libs = _libs()
        self.base, self.cpu = libs if libs else (None, None)
        self.ok = libs is not None and _layout_ok(self.base)
        self.weight = None  # the head weight tensor's address, once seen and usable
        self.why = None if self.ok else "ggml's tensor layout is not the one mtpkit reads"
        self.capture = False
        self.norm: np.ndarray | None = None
        self._norm_node = None
        get_name = self.base.ggml_get_name if self.ok else None

        def cb(t, ask, _ud):
            if not self.ok:
                return False
            name = get_name(t)
            if ask:
                if name in NORM_NAMES:
                    self._norm_node = t
                    return self.capture
                if name == b"result_output" and self.weight is None and self.why is None:
                    self._found(t)
                return False
            s = Tensor.from_address(t)
            ptr = ctypes.cast(s.data, POINTER(c_float))
            self.norm = np.ctypeslib.as_array(ptr, shape=(int(s.ne[1]), int(s.ne[0]))).copy()
            return False  # stop the graph: the head and the logits are computed on demand

        import llama_cpp
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(cb)  # kept alive with the context

    def _found(self, t) -> None:
        s = Tensor.from_address(t)
        w = Tensor.from_address(s.src[0]) if s.src[0] else None
        if self.base.ggml_op_name(s.op) != b"MUL_MAT" or s.src[1] != self._norm_node:
            self.why = "the target's head is not one matrix product of the final norm (a logit softcap?)"
        elif w is None or not w.buffer or not self.base.ggml_backend_buffer_is_host(w.buffer) or not w.data:
            self.why = "the target's head weight is not in host memory"
        else:
            self.weight = s.src[0]


class RowHead:
    """logits [m, V] = x [m, d] @ head weight^T on `threads` threads, in blocks of the widths they are cheapest at,
    each block through ggml's CPU mul_mat or (a Q8_0 head) q8_head.c, whichever is cheaper at that width. ggml's
    kernels are not linear in the rows: on this repo's 2-core x86 CPU the Q8_0 head took 6.4 / 16.3 / 18.1 / 19.7 /
    31.9 / 35.6 / 37.1 / 25.7 ms for 1..8 rows (tile shapes), so 5 rows cost less padded to 8. `cost[w]` (seconds,
    measured at load: the best of two runs each) says what a block of w rows costs, infinite where a row's logits in
    it differ from the row's alone through ggml (then that width is never used): every row's logits are those of a
    plain decoding step. `kernel_off`: why q8_head.c is not in use (None: it is, at the widths in `engine`)."""

    MAX_WIDTH = 8

    def __init__(self, watch: HeadWatch, threads: int):
        if watch.weight is None:
            raise MtpkitError(f"no target head to compute rows with: {watch.why or 'not seen yet'}")
        self.base, self.cpu, self.threads, self.weight = watch.base, watch.cpu, threads, watch.weight
        w = Tensor.from_address(watch.weight)
        self.d, self.vocab = int(w.ne[0]), int(w.ne[1])
        self.graphs: dict[int, tuple] = {}  # width -> (ctx, graph, x [w, d], y [w, V])
        self.cost: dict[int, float] = {}
        self.engine: dict[int, str] = {}  # width -> "ggml" or "q8_head"
        self.kernel, self.kernel_off = None, None
        if w.type != GGML_TYPE_Q8_0 or w.nb[0] != Q8_0_BLOCK[1] or w.nb[1] != self.d // Q8_0_BLOCK[0] * Q8_0_BLOCK[1]:
            self.kernel_off = "the head's weights are not contiguous Q8_0 rows"
        else:
            try:
                self.kernel = q8_kernel()
                self._w_data = w.data
            except (RuntimeError, OSError) as e:
                self.kernel_off = str(e)
        self.calibrate()

    def _graph(self, width: int):
        if width not in self.graphs:
            size = 4 * width * (self.d + self.vocab) + 64 * width * self.d + (4 << 20)  # x, y, quantized x, graph
            ctx = self.base.ggml_init(_InitParams(size, None, False))
            if not ctx:
                raise MtpkitError("ggml could not allocate the head's context")
            x = self.base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, self.d, width)
            y = self.base.ggml_mul_mat(ctx, self.weight, x)
            graph = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(graph, y)
            xs, ys = Tensor.from_address(x), Tensor.from_address(y)
            if list(ys.ne) != [self.vocab, width, 1, 1] or ys.type != GGML_TYPE_F32:
                self.base.ggml_free(ctx)
                raise MtpkitError("ggml's head product has an unexpected shape")
            xv = np.ctypeslib.as_array(ctypes.cast(xs.data, POINTER(c_float)), shape=(width, self.d))
            yv = np.ctypeslib.as_array(ctypes.cast(ys.data, POINTER(c_float)), shape=(width, self.vocab))
            self.graphs[width] = (ctx, graph, xv, yv)
        return self.graphs[width]

    def _run(self, x: np.ndarray, width: int, engine: str | None = None) -> np.ndarray:
        if (engine or self.engine.get(width)) == "q8_head":
            m = x.shape[0]
            xs = np.zeros((width, self.d), np.float32)
            xs[:m] = x
            y = np.empty((width, self.vocab), np.float32)
            rc = self.kernel(self._w_data, self.vocab, self.d, xs.ctypes.data, width, y.ctypes.data, self.threads)
            if rc != 0:
                raise MtpkitError(f"the Q8_0 head kernel refused a block of {width} rows (status {rc})")
            return y[:m]
        ctx, graph, xv, yv = self._graph(width)
        m = x.shape[0]
        xv[:m] = x
        xv[m:] = 0
        rc = self.cpu.ggml_graph_compute_with_ctx(ctx, graph, self.threads)
        if rc != 0:
            raise MtpkitError(f"ggml could not compute the head (status {rc})")
        return yv[:m].copy()

    def calibrate(self) -> None:
        import time
        x = np.random.default_rng(0).standard_normal((self.MAX_WIDTH, self.d)).astype(np.float32)
        alone = [self._run(x[i:i + 1], 1, "ggml")[0] for i in range(self.MAX_WIDTH)]  # (also warms the caches up)
        for w in range(1, self.MAX_WIDTH + 1):
            self.cost[w] = float("inf")
            for engine in ("ggml", "q8_head") if self.kernel is not None else ("ggml",):
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    y = self._run(x[:w], w, engine)
                    best = min(best, time.perf_counter() - t0)
                # a width whose kernel rounds a row otherwise than ggml's row alone is never used (tiled GEMMs)
                if all(np.array_equal(y[i], alone[i]) for i in range(w)) and best < self.cost[w]:
                    self.cost[w], self.engine[w] = best, engine
        self._block = {m: cheapest_block(self.cost, m) for m in range(1, self.MAX_WIDTH + 1)}  # read every round

    def block(self, m: int) -> tuple[int, float]:
        """(width, seconds): the cheapest block that holds m <= MAX_WIDTH rows."""
        return self._block[m]

    def seconds(self, m: int) -> float:
        """What m rows cost through __call__ (blocks of at most MAX_WIDTH)."""
        full, rest = divmod(m, self.MAX_WIDTH)
        return full * self._block[self.MAX_WIDTH][1] + (self._block[rest][1] if rest else 0.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[m, d] -> [m, V] (a [d] row -> [V])."""
        one = x.ndim == 1
        x = x.reshape(-1, self.d)
        out = [self._run(x[i:i + self.MAX_WIDTH], self.block(min(self.MAX_WIDTH, x.shape[0] - i))[0])
               for i in range(0, x.shape[0], self.MAX_WIDTH)]
        y = out[0] if len(out) == 1 else np.concatenate(out)
        return y[0] if one else y

    def close(self) -> None:
        for ctx, *_ in self.graphs.values():
            self.base.ggml_free(ctx)
        self.graphs = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def cheapest_block(cost: dict[int, float], m: int) -> tuple[int, float]:
    """(width, seconds): of the block widths `cost` prices (seconds by width), the cheapest that holds m rows."""
    return min(((w, cost[w]) for w in range(m, max(cost) + 1)), key=lambda wc: wc[1])


def rows_seconds(cost: dict[int, float], m: int) -> float:
    """What m rows cost in blocks of at most the widest priced width, each the cheapest that holds its rows
    (RowHead.seconds for a cost table: bench/gate_replay.py prices recorded rounds with it)."""
    wmax = max(cost)
    full, rest = divmod(m, wmax)
    return full * cheapest_block(cost, wmax)[1] + (cheapest_block(cost, rest)[1] if rest else 0.0)


def plan_blocks(seconds, reach: list[float]) -> list[int]:
    """The first row of each block to compute a verify's head rows in, read in order: reach[i] = the chance that
    acceptance reads row i (reach[0] = 1; row i > 0 is read when drafts 1..i are accepted), seconds(m) = what a block
    of m rows costs. A block is computed when its first row is read, so the expected cost of a plan is the sum over
    its blocks of reach[first row] * seconds(rows): the least one by dynamic programming over where blocks start.
    High acceptance gives one block (the whole verify, padded to a cheap width); low gives row 0 alone."""
    n = len(reach)
    best, nxt = [0.0] * (n + 1), [n] * (n + 1)
    for s in range(n - 1, -1, -1):
        best[s], nxt[s] = min((reach[s] * seconds(m) + best[s + m], s + m) for m in range(1, n - s + 1))
    starts, s = [], 0
    while s < n:
        starts.append(s)
        s = nxt[s]
    return starts
