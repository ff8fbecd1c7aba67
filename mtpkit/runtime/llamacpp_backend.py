"""The llama.cpp backend: target and drafter GGUFs (`mtpkit export --format gguf`) in stock llama.cpp through
llama-cpp-python's low-level API, the drafter context sharing the target's KV cache.

- Target context: flash attention, q8_0 K/V, full-size SWA cache (`swa_full`: every position of the sliding
  layers is kept, so rollback = `llama_memory_seq_rm` is exact past the window). `embeddings` gives the
  post-norm hidden of each output row; it is switched on only for the rows the loop needs.
- `verify_rows` (the loop's default for every step, plain ones too): the verify's graph stops after the final norm (the
  target context's eval callback) and each row's logits are computed when acceptance reads it, by ggml's own
  mul_mat over the graph's own head weight, bit-identical to the graph's (runtime/ggml_head.py), or for a Q8_0
  head by q8_head.c: the same rows bit for bit, several from one pass over the weights (4 rows 11.8 ms vs ggml's
  20.6 ms here). The tied 262k-row head is ~55 % of a plain step on this repo's CPU; a round whose first draft is
  rejected pays one row. Set up only with a drafter loaded; without one, or with lazy_rows off (the bench's `plain`),
  a step is llama.cpp's own decode.
- Drafter context: `ctx_type = MTP`, `ctx_other = target`: llama.cpp's gemma4-assistant graph reads the
  target's last sliding and last full layer K/V in place (no copy, nothing written). Each draft step is one
  `llama_process` of one token at the bonus position with its h row set by `llama_batch_ext_set_embd_token`
  (`llama_batch_ext_set_embd_state` is an unimplemented stub in this llama.cpp: it always returns False).
- Drafter head: `dense` = llama.cpp's own (logits over the whole vocabulary from the drafter's token_embd, then
  `llama_get_embeddings_nextn_ith` for the next h) -- what `llama-server --spec-type draft-mtp` runs.
  `centroid` (drafters exported with a centroid head) = llama.cpp runs the blocks and final norm; a ggml eval
  callback (the public `cb_eval` hook) reads `result_norm` and stops the graph there, and mtpkit computes the
  sparse head (router -> top clusters -> ~4k candidate logits) and the post-projection from the same GGUF's
  tensors. It skips llama.cpp's dense 262k-row head, which costs more than the drafter's blocks.

Greedy output equals this backend's plain decoding token for token when llama.cpp's kernels give a row the
same result whatever the batch size: measured true on x86 CPUs for Q4_1/Q5_1/F32... weights with flash
attention, q8_0 K/V and no weight repacking (`use_extra_bufts = False`): on this x86 CPU for the source Q4_K_M
file and for q8_0/q4_0 exports, logits bit-identical between one-token and batched forwards. With repacking, the
Q4_K gemm and gemv kernels round differently and near-ties flip, as in llama.cpp's own speculative decoding.
"""

from __future__ import annotations

import ctypes
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.runtime.backend import Backend, BackendInfo, DraftStep, Loaded

HEADS = ("auto", "dense", "centroid")
SIBLING_DRAFTER = "drafter.gguf"  # `mtpkit export --format gguf` writes it beside target.gguf


@dataclass(frozen=True)
class Options:
    threads: int | None = None  # llama.cpp's CPU threads; default: the CPUs this process may use
    head: str = "auto"  # the drafter's head: centroid (mtpkit computes it) | dense (llama.cpp's own) | auto


def load(target: str, drafter: str | None, opts: Options, *, max_len: int, max_draft: int) -> Loaded:
    """`target`: a gemma3 .gguf (e.g. DIR/target.gguf from `mtpkit export --format gguf`); `drafter`: a
    gemma4-assistant .gguf or None."""
    t = Path(target)
    if t.suffix != ".gguf" or not t.is_file():
        raise MtpkitError(f"backend llamacpp needs a target .gguf file, got {target!r} "
                          f"(make one with `mtpkit export --format gguf --out DIR`, then pass DIR/target.gguf)")
    be = LlamaCppBackend(t, drafter, max_len=max_len, threads=opts.threads, head=opts.head, max_draft=max_draft)
    return Loaded(be, be.tokenizer, be.config, drafter, {"kind": "gguf", "path": str(t.resolve())})


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1

_LOG_CALLBACK = None


def quiet_llama_logs() -> None:
    """llama.cpp's C log: keep errors (and their continuation lines), drop the rest: warnings such as "using
    full-size SWA cache", the KV sharing of an assistant drafter, or Gemma's "control-looking token" notes."""
    global _LOG_CALLBACK
    import ctypes
    import sys

    import llama_cpp
    if _LOG_CALLBACK is None:
        last = [0]

        @llama_cpp.llama_log_callback
        def cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
            if level == 4 or (level == 5 and last[0] == 4):
                print(text.decode("utf-8", "replace"), end="", file=sys.stderr)
            if level != 5:
                last[0] = level
        _LOG_CALLBACK = cb
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _lib():
    try:
        import llama_cpp
        from llama_cpp import llama_cpp_ext
    except ImportError:
        raise MtpkitError("backend llamacpp needs llama-cpp-python (pip install -e '.[gguf]')") from None
    return llama_cpp, llama_cpp_ext


class _Rows:
    """Rows of a GGUF matrix, dequantized on demand (Q8_0/F16/BF16/F32), read from the memory-mapped file."""

    def __init__(self, t):
        import gguf
        Q = gguf.GGMLQuantizationType
        self.kind = t.tensor_type
        if self.kind not in (Q.Q8_0, Q.F16, Q.BF16, Q.F32):
            raise MtpkitError(f"the centroid head reads {t.name} rows as Q8_0/F16/BF16/F32; this file has "
                              f"{self.kind.name} (export the drafter with --drafter-quant q8_0, or use --head dense)")
        self.Q = Q
        self.n = int(t.shape[0])
        with warnings.catch_warnings():  # read-only memory map: we never write through it
            warnings.simplefilter("ignore", UserWarning)
            self.raw = np.asarray(t.data)  # [rows, bytes per row] or [rows, n]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        g = self.raw[ids]
        n = ids.shape[0]
        if self.kind == self.Q.Q8_0:  # blocks of (f16 scale, 32 x int8)
            g = g.reshape(n, -1, 34)
            d = np.ascontiguousarray(g[:, :, :2]).view(np.float16).astype(np.float32)
            q = np.ascontiguousarray(g[:, :, 2:]).view(np.int8).astype(np.float32)
            return (q * d).reshape(n, -1)
        if self.kind == self.Q.F16:
            return (g.view(np.float16) if g.dtype == np.uint8 else g).astype(np.float32)
        if self.kind == self.Q.BF16:  # bfloat16 = the high half of a float32
            bits = g.view(np.uint16) if g.dtype == np.uint8 else g.astype(np.uint16)
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return g.astype(np.float32)


class _ClusterRows:
    """The centroid head's candidate rows, dequantized per cluster on first use and kept in float32 (the
    `capacity` most recently used clusters): a draft step's top clusters are then one small matrix-vector
    product each instead of dequantizing ~4k rows per step. Measured on this repo's CPU with the shipped
    drafter: 6.1 ms -> 0.5 ms per step; 256 clusters (84 MB) held 97.8 % of the clusters 6 HumanEval/MT-Bench
    generations asked for (456 distinct of 2048)."""

    def __init__(self, rows: _Rows, clusters: np.ndarray, width: int, capacity: int = 256):
        self.rows, self.clusters, self.width, self.capacity = rows, clusters, width, capacity
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def logits(self, top: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Logits of every candidate of clusters `top`, in the order of `self.clusters[top].reshape(-1)`."""
        n = self.clusters.shape[1]
        out = np.empty(len(top) * n, np.float32)
        for i, c in enumerate(top.tolist()):
            m = self.cache.get(c)
            if m is None:
                m = self.cache[c] = np.ascontiguousarray(self.rows(self.clusters[c])[:, :self.width])
                if len(self.cache) > self.capacity:
                    self.cache.popitem(last=False)
            else:
                self.cache.move_to_end(c)
            np.matmul(m, x, out=out[i * n:(i + 1) * n])
        return out


class LlamaCppBackend(Backend):
    def __init__(self, target_gguf: str | Path, drafter_gguf: str | Path | None = None, *, max_len: int = 4096,
                 threads: int | None = None, head: str = "auto", max_draft: int = 16):
        L, X = _lib()
        quiet_llama_logs()
        if head not in HEADS:
            raise MtpkitError(f"--head must be one of {HEADS}, got {head!r}")
        self.L, self.X = L, X
        self.path = Path(target_gguf)
        if not self.path.is_file():
            raise MtpkitError(f"target GGUF not found: {self.path}")
        self.config, self.tokenizer = _target_meta(self.path)
        c = self.config
        if c.head_dim % 32:
            raise MtpkitError(f"backend llamacpp keeps K/V in q8_0 (blocks of 32): head_dim {c.head_dim} is not a multiple")
        self.vocab_size, self.max_len, self.max_draft = c.vocab_size, max_len, max_draft
        if threads is not None and threads < 1:
            raise MtpkitError(f"threads must be >= 1, got {threads}")
        self.threads = threads or default_threads()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        # no weight repacking: the repacked Q4_K gemm (batches) and gemv (one token) kernels round differently,
        # which would make a verified batch disagree with plain decoding at near-ties
        mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise MtpkitError(f"llama.cpp cannot load {self.path}")
        from mtpkit.runtime.ggml_head import HeadWatch
        self._watch = HeadWatch()  # the target graph's eval callback: finds the head, stops before it for verify_rows
        self.cparams = self._cparams()
        self.cparams.cb_eval = self._watch.callback
        self.cparams.cb_eval_user_data = None
        self.ctx = L.llama_init_from_model(self.model, self.cparams)
        if not self.ctx:
            raise MtpkitError("llama.cpp could not create the target context")
        self.mem = L.llama_get_memory(self.ctx)
        self.d_model = L.llama_model_n_embd(self.model)
        self.batch = L.llama_batch_init(max(max_draft + 1, 512), 0, 1)
        self._len = 0
        self._emb_on = None
        self.dmodel = self.dctx = None
        self.head = None
        self.drafter_path = None
        self.draft_temperature = 1.0
        if drafter_gguf is not None:
            self._load_drafter(Path(drafter_gguf), head)
        self.has_drafter = self.dctx is not None
        self._row_head, self.row_head_off = None, "no drafter"
        self.verify_rows = self._verify_rows if self.has_drafter and self._setup_row_head() else None
        # adaptive drafting ("auto"): a rejected draft costs no head row through verify_rows, and at T > 0 the stops
        # cost more than they save (replay, bench/results/cpu_lazy_rows: T = 1 0.988 -> 0.995x MT-Bench, 0.993 ->
        # 1.035x HumanEval without them); at T = 0 they still pay (1.017 vs 1.003x MT-Bench)
        self.auto_adaptive = (True, False) if self.verify_rows is not None else (True, True)

    def _setup_row_head(self) -> bool:
        """One decode (after the drafter's context exists: creating it resets the shared KV cells) shows the graph's
        head to the eval callback; the head computed here for that row must equal the graph's logits bit for bit."""
        from mtpkit.runtime.ggml_head import RowHead
        self._decode([0], outputs=True)
        logits, hidden = self._rows(1)
        self.L.llama_memory_clear(self.mem, True)
        self._len = 0
        if self._watch.weight is None:
            self.row_head_off = self._watch.why or "the target graph has no result_output node"
            return False
        self._row_head = RowHead(self._watch, self.threads)
        if not np.array_equal(self._row_head(hidden[0]), logits[0]):
            self.row_head_off = "ggml's head product differs from the graph's logits"
            return False
        self.row_head_off = None
        return True

    # ------------------------------------------------------------------ setup
    def _cparams(self):
        L = self.L
        p = L.llama_context_default_params()
        p.n_ctx = self.max_len
        p.n_batch = p.n_ubatch = 512
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.type_k = p.type_v = L.GGML_TYPE_Q8_0
        p.swa_full = True
        p.embeddings = False
        p.no_perf = True
        return p

    def _load_drafter(self, path: Path, head: str) -> None:
        L, X = self.L, self.X
        if not path.is_file():
            raise MtpkitError(f"drafter GGUF not found: {path}")
        from mtpkit.model.config import check_finite, check_token_ordering
        from mtpkit.model.files import gguf_array, open_gguf
        r = open_gguf(path)
        arch = r.fields["general.architecture"].contents() if "general.architecture" in r.fields else None
        if arch != "gemma4-assistant":
            raise MtpkitError(f"{path.name} is a {arch!r} GGUF, not a gemma4-assistant drafter")
        f = {k: r.fields[k].contents() for k in r.fields
             if k.startswith(("gemma4-assistant.", "mtpkit.")) and k not in ("mtpkit.centroids", "mtpkit.token_ordering")}
        if f.get("gemma4-assistant.embedding_length_out") != self.d_model:
            raise MtpkitError(f"drafter {path.name} expects a target hidden size of "
                              f"{f.get('gemma4-assistant.embedding_length_out')}, this target has {self.d_model}")
        has_centroid = f.get("mtpkit.head") == "centroid"
        if head == "auto":
            head = "centroid" if has_centroid else "dense"
        if head == "centroid" and not has_centroid:
            raise MtpkitError(f"--head centroid: {path.name} has no centroid head (it was exported from a dense drafter)")
        self.head = head
        self.drafter_path = path
        self.draft_temperature = float(f.get("mtpkit.draft_temperature", 1.0))  # the drafter's calibrated factor
        self._result_norm = None
        dp = self._cparams()
        dp.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
        dp.ctx_other = self.ctx
        if head == "centroid":
            t = {x.name: x for x in r.tensors}
            self.d_unpadded = int(f.get("mtpkit.unpadded_embedding_length", f["gemma4-assistant.embedding_length"]))
            self.top_k = int(f["mtpkit.centroid_top_k"])
            n_c = int(f["mtpkit.num_centroids"])
            d = self.d_unpadded
            order = np.asarray(r.fields["mtpkit.token_ordering"].contents(), np.int64)
            check_token_ordering(order, self.vocab_size, f"drafter {path.name}")  # before the reshape can fail
            self.clusters = order.reshape(n_c, -1)
            self.centroids = np.asarray(r.fields["mtpkit.centroids"].contents(), np.float32).reshape(n_c, d)
            self.post = np.ascontiguousarray(gguf_array(t["nextn.post_projection.weight"])[:, :d])
            check_finite({"mtpkit.centroids": self.centroids, "nextn.post_projection.weight": self.post},
                         f"drafter {path.name}")
            self.rows = _ClusterRows(_Rows(t["token_embd.weight"]), self.clusters, d)
            self._install_callback(dp)
            # numpy's BLAS on one thread for the head's matrix-vector products: with more, its worker threads
            # spin after each call and take the cores llama.cpp's own threads need (bench/llamacpp_draft_cost.py)
            from threadpoolctl import ThreadpoolController
            blas = ThreadpoolController()
            self._one_blas_thread = lambda: blas.limit(limits=1, user_api="blas")
        self.dmodel = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.dmodel:
            raise MtpkitError(f"llama.cpp cannot load the drafter {path}")
        # created before any target decode: creating it resets the shared KV cells
        self.dctx = L.llama_init_from_model(self.dmodel, dp)
        if not self.dctx:
            raise MtpkitError("llama.cpp could not create the drafter context (ctx_type MTP over the target's)")
        if head == "dense":
            X.llama_set_embeddings_nextn(self.dctx, True, True)
        self.dbatch = L.llama_batch_ext_init(self.dctx)
        self._h = (ctypes.c_float * self.d_model)()
        self._pos = L.llama_pos(0)

    def _install_callback(self, p) -> None:
        """Observe `result_norm` (the drafter's final-normed features) and stop the graph right after it."""
        L = self.L
        from llama_cpp._ggml import libggml as ggml
        ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_get_name.restype = ctypes.c_char_p
        ggml.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
        ggml.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
        ggml.ggml_nelements.argtypes = [ctypes.c_void_p]
        ggml.ggml_nelements.restype = ctypes.c_int64
        get_name, get_data, nel = ggml.ggml_get_name, ggml.ggml_get_data_f32, ggml.ggml_nelements
        want = b"result_norm"

        def cb(t, ask, _ud):
            if get_name(t) != want:
                return False if ask else True
            if ask:
                return True
            n = nel(t)
            self._result_norm = np.ctypeslib.as_array(get_data(t), shape=(n,)).copy()
            return False  # cancel the rest of the graph: llama.cpp's dense head and post-projection

        self._cb = L.ggml_backend_sched_eval_callback(cb)  # kept alive as long as the context
        p.cb_eval = self._cb
        p.cb_eval_user_data = None

    def close(self) -> None:
        L = self.L
        if getattr(self, "_row_head", None) is not None:
            self._row_head.close()
        if getattr(self, "dctx", None):
            L.llama_batch_ext_free(self.dbatch)
            L.llama_free(self.dctx)
            L.llama_model_free(self.dmodel)
            self.dctx = None
        if getattr(self, "ctx", None):
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def info(self) -> BackendInfo:
        L = self.L
        rh = self._row_head if self.verify_rows is not None else None
        return BackendInfo("llamacpp", "cpu", _ftype(self.path), self.threads, int(L.llama_model_n_params(self.model)),
                           int(L.llama_model_size(self.model)), self.config.vocab_size * self.config.hidden_size,
                           self.config, None, int(L.llama_model_n_params(self.dmodel)) if self.dmodel else 0,
                           int(L.llama_model_size(self.dmodel)) if self.dmodel else 0, self.head,
                           extra={"llama_context": {"flash_attn": True, "type_k": "q8_0", "type_v": "q8_0",
                                                    "swa_full": True},
                                  "verify_rows": self.verify_rows is not None, "verify_rows_off": self.row_head_off,
                                  "head_blocks": None if rh is None else {w: rh.engine[w] for w in sorted(rh.engine)},
                                  "q8_head_off": None if rh is None else rh.kernel_off})

    # ------------------------------------------------------------------ target
    @property
    def length(self) -> int:
        return self._len

    def _decode(self, tokens: list[int], outputs: bool) -> None:
        L = self.L
        b = self.batch
        n = len(tokens)
        if outputs != self._emb_on:
            L.llama_set_embeddings(self.ctx, outputs)
            self._emb_on = outputs
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self._len + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = outputs
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise MtpkitError(f"llama_decode failed (code {rc}) at position {self._len}")
        self._len += n

    def _rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        L = self.L
        lg = L.llama_get_logits(self.ctx)
        em = L.llama_get_embeddings(self.ctx)
        return (np.ctypeslib.as_array(lg, shape=(n, self.vocab_size)).copy(),
                np.ctypeslib.as_array(em, shape=(n, self.d_model)).copy())

    def start(self, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(t) for t in prompt]
        if len(ids) >= self.max_len:
            raise MtpkitError(f"prompt of {len(ids)} tokens does not fit the context ({self.max_len})")
        self.L.llama_memory_clear(self.mem, True)
        self._len = 0
        for i in range(0, len(ids) - 1, 512):  # no outputs: the prompt needs logits/hidden at its last token only
            self._decode(ids[i:min(i + 512, len(ids) - 1)], outputs=False)
        self._decode(ids[-1:], outputs=True)
        logits, hidden = self._rows(1)
        return logits[0], hidden[0]

    def _fits(self, tokens: np.ndarray) -> list[int]:
        """A verify's token ids, if they fit the context."""
        ids = np.asarray(tokens).reshape(-1).tolist()
        if self._len + len(ids) > self.max_len:
            raise MtpkitError(f"context full: {self._len + len(ids)} positions > {self.max_len}")
        return ids

    def verify(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self._fits(tokens)
        self._decode(ids, outputs=True)
        return self._rows(len(ids))

    def _verify_rows(self, tokens: np.ndarray, reach: list[float] | None = None) -> tuple[_LazyRows, np.ndarray]:
        """verify() with the head computed for the rows read, in blocks planned for `reach` (the chance that
        acceptance reads each row): the graph stops after the final norm."""
        ids = self._fits(tokens)
        w = self._watch
        w.capture, w.norm = True, None
        try:
            self._decode(ids, outputs=True)
        finally:
            w.capture = False
        if w.norm is None or w.norm.shape != (len(ids), self.d_model):
            raise MtpkitError("llama.cpp's graph did not pass the final norm's rows to the eval callback")
        return _LazyRows(self._row_head, w.norm, reach), w.norm

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise MtpkitError(f"rollback to {length}: the cache holds {self._len} positions")
        if length < self._len and not self.L.llama_memory_seq_rm(self.mem, 0, length, -1):
            raise MtpkitError(f"llama.cpp could not remove positions >= {length} from the KV cache")
        self._len = length

    # ------------------------------------------------------------------ drafter
    def draft_step(self, token: np.ndarray, h: np.ndarray) -> DraftStep:
        """One llama.cpp drafter forward at the bonus position."""
        L, X = self.L, self.X
        if self.dctx is None:
            raise MtpkitError("this backend has no drafter")
        token = int(np.asarray(token).reshape(-1)[0])
        b = self.dbatch
        L.llama_batch_ext_clear(b)
        i = L.llama_batch_ext_add_token(b, 0, token)
        if i < 0:
            raise MtpkitError(f"llama.cpp refused draft token {token} (code {i})")
        self._pos.value = self._len
        L.llama_batch_ext_set_pos(b, i, ctypes.byref(self._pos))
        hv = np.ascontiguousarray(h, dtype=np.float32)
        ctypes.memmove(self._h, hv.ctypes.data, hv.nbytes)
        if not L.llama_batch_ext_set_embd_token(b, i, L.llama_embd(ctypes.cast(self._h, ctypes.POINTER(ctypes.c_float)),
                                                                   1, self.d_model)):
            raise MtpkitError("llama_batch_ext_set_embd_token refused the drafter's h row")
        L.llama_batch_ext_set_output_logits(b, i, True)
        rc = L.llama_process(self.dctx, L.LLAMA_PROCESS_TYPE_DECODE, b)
        if rc != 0:
            raise MtpkitError(f"llama.cpp drafter step failed (code {rc}) at position {self._len}")
        if self.head == "dense":
            lg = L.llama_get_logits_ith(self.dctx, i)
            hn = X.llama_get_embeddings_nextn_ith(self.dctx, i)
            return DraftStep(np.ctypeslib.as_array(lg, shape=(self.vocab_size,)).copy(), None,
                             np.ctypeslib.as_array(hn, shape=(self.d_model,)).copy())
        x = self._result_norm[:self.d_unpadded]
        self._result_norm = None
        with self._one_blas_thread():
            router = self.centroids @ x
            top = np.argpartition(-router, self.top_k - 1)[:self.top_k]
            top = top[np.argsort(-router[top], kind="stable")]  # clusters in router order, as the reference's topk
            return DraftStep(self.rows.logits(top, x), self.clusters[top].reshape(-1), self.post @ x)


class _LazyRows:
    """rows(i) -> logits [V] of verify row i (Backend.verify_rows), the head computed when a row is first read, in
    the blocks ggml_head.plan_blocks picks for the loop's `reach` (the chance each row is read; default: each draft
    accepted with probability DEFAULT_ACCEPT): the whole verify as one block where drafts are likely accepted (a
    block of 4-8 rows costs little more than one), row 0 alone where they are likely rejected."""

    DEFAULT_ACCEPT = 0.7

    def __init__(self, head, norm: np.ndarray, reach: list[float] | None = None):
        from mtpkit.runtime.ggml_head import plan_blocks
        self.head, self.norm, self.done = head, norm, {}
        n = norm.shape[0]
        if reach is None or len(reach) != n:
            reach = [self.DEFAULT_ACCEPT ** i for i in range(n)]
        self.starts = plan_blocks(head.seconds, [1.0] + list(reach[1:]))

    def __len__(self) -> int:
        return self.norm.shape[0]

    @property
    def computed(self) -> int:
        """Rows whose logits were computed so far (what the round paid for: its outcome for the gate's costs)."""
        return len(self.done)

    def __call__(self, i: int) -> np.ndarray:
        if i not in self.done:
            s = max(x for x in self.starts if x <= i)
            e = min([x for x in self.starts if x > i] + [len(self)])
            for j, row in enumerate(self.head(self.norm[s:e])):
                self.done[s + j] = row
        return self.done[i]


def _ftype(path: Path) -> str:
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            return str(json.loads(side.read_text()).get("quant", "gguf"))
        except (ValueError, OSError):
            pass
    return "gguf"


def _target_meta(path: Path):
    """(GemmaConfig, Tokenizer) of a target GGUF: from the `target.json` + `tokenizer.model` that
    `mtpkit export --format gguf` writes beside it (fast), else parsed from the GGUF's metadata."""
    from mtpkit.model.config import GemmaConfig
    from mtpkit.tokenizer import Tokenizer
    side, spm = path.with_suffix(".json"), path.parent / "tokenizer.model"
    if side.is_file() and spm.is_file():
        meta = json.loads(side.read_text())
        if "target_config" in meta:
            return GemmaConfig.from_dict(meta["target_config"]), Tokenizer.from_sentencepiece(spm)
    from mtpkit.model.files import gguf_config, open_gguf
    r = open_gguf(path)
    return gguf_config(r), Tokenizer.from_gguf(r)
