"""Stock llama.cpp as a bench baseline: its own `llama-server` program (built by devices/llamacpp/build.sh from
the source llama-cpp-python 0.3.36 vendors) on the same GGUF files, plain and with `--spec-type draft-mtp` and our
exported drafter.gguf, driven over its HTTP API (`/completion` with token ids), so the numbers come out in the
bench's own schema.

Timing is the server's: `timings.predicted_ms` runs from the first generated token to the last, the bench's own
definition of decode time; `predicted_n` counts the tokens, `draft_n` / `draft_n_accepted` the drafts. Every
target forward yields one sampled token plus the drafts it accepted, so forwards = n - 1 - accepted.
The same code drives a server on a phone through `adb forward` (devices/android/bench.sh).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpkit.bench.methods import Method, Run, Sampling
from mtpkit.errors import MtpkitError

LLAMACPP_VERSION = "0.3.36"  # llama-cpp-python whose vendored llama.cpp devices/llamacpp/build.sh builds
SERVER = "llama-server"
# The settings of mtpkit's llama.cpp backend (docs/gguf.md): flash attention, q8_0 K/V, every sliding position
# kept, no weight repacking. On this x86 CPU a verify batch then computes what one-token steps compute and
# draft-mtp's greedy output equals plain decoding (24/24 prompts; with llama-server's defaults 0/6), at no cost in
# plain speed. On CUDA (H200) they neither make it identical (8/24) nor come free (q8_0 K/V: llama-bench tg128
# 764 vs 983 tok/s), so GPU runs use llama-server's defaults (bench/results/h200_stock).
EXACT_FLAGS = ("-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "--swa-full", "-nr")


def find_programs(bin_dir: str | os.PathLike | None = None, gpu: bool = False) -> Path | None:
    """The directory holding `llama-server`: `bin_dir`, else $MTPKIT_LLAMACPP_BIN, else the build cache of
    devices/llamacpp/build.sh (its cuda flavour for a GPU run, else metal / cpu). None if absent."""
    from mtpkit.paths import cache_dir
    if bin_dir is None:
        bin_dir = os.environ.get("MTPKIT_LLAMACPP_BIN") or None
    if bin_dir is not None:
        d = Path(bin_dir)
        if not (d / SERVER).is_file():
            raise MtpkitError(f"{d / SERVER} not found (build llama.cpp's programs with devices/llamacpp/build.sh)")
        return d
    root = cache_dir() / "llamacpp"
    # a GPU run compares with the CUDA build only (a CPU build would silently decode on the CPU); on a Mac the
    # default build has Metal on
    flavours = ["cuda"] if gpu else ["metal", "cpu"] if platform.system() == "Darwin" else ["cpu"]
    for f in flavours:
        for d in sorted(root.glob(f"{LLAMACPP_VERSION}-{f}*/bin")):
            if (d / SERVER).is_file():
                return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the bench process dies, even by kill -9 (no orphan server)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LlamaServer:
    """A llama-server process on a free local port (or one already running at `url`), closed with `close()`."""

    def __init__(self, args: list[str] | None = None, url: str | None = None, log: Path | None = None,
                 timeout: float = 300.0):
        self.proc: subprocess.Popen | None = None
        if url is None:
            assert args is not None
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            self._log = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
            self.proc = subprocess.Popen([*args, "--host", "127.0.0.1", "--port", str(port)], stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent if platform.system() == "Linux" else None)
        self.url = url.rstrip("/")
        self.log = log
        self._wait(timeout)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _wait(self, timeout: float) -> None:
        t_end = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log else []
                raise MtpkitError(f"llama-server exited with code {self.proc.returncode} while loading"
                                  + (f": {' | '.join(tail)}" if tail else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > t_end:
                self.close()
                raise MtpkitError(f"llama-server at {self.url} did not become ready in {timeout:.0f} s")
            time.sleep(0.2)

    def post(self, path: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise MtpkitError(f"llama-server {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, ConnectionError) as e:
            raise MtpkitError(f"llama-server {path}: {e}") from None

    def complete(self, ids: list[int], max_new_tokens: int, sampling: Sampling) -> dict[str, Any]:
        """One generation from token ids (no prompt cache between requests), greedy at temperature 0, else plain
        sampling at the temperature (no top-k / top-p / min-p: the target's distribution, as ours)."""
        body: dict[str, Any] = {"prompt": ids, "n_predict": max_new_tokens, "cache_prompt": False,
                                "return_tokens": True, "stream": False, "seed": sampling.seed,
                                "repeat_penalty": 1.0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}
        if sampling.temperature <= 0:
            body.update(temperature=0.0, top_k=1)
        else:
            body.update(temperature=sampling.temperature, top_k=0)
        return self.post("/completion", body)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self._log is not subprocess.DEVNULL:
            self._log.close()
        self.proc = None


def run_of(resp: dict[str, Any]) -> Run:
    """A bench Run from a /completion response (`tokens` holds every generated token, the end-of-generation one
    included, as our loop's output does)."""
    toks = [int(t) for t in resp.get("tokens", [])]
    tm = resp.get("timings", {})
    n = int(tm.get("predicted_n", len(toks)))
    drafted, accepted = int(tm.get("draft_n", 0)), int(tm.get("draft_n_accepted", 0))
    forwards = max(n - 1 - accepted, 0)
    return Run(toks, float(tm.get("predicted_ms", 0.0)) / 1000.0, forwards, drafted=drafted, accepted=accepted)


@dataclass
class LlamaServerMethod(Method):
    server: LlamaServer | None = None
    sampling: Sampling | None = None

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def run(self, ids: list[int], max_new_tokens: int) -> Run:
        return run_of(self.server.complete(ids, max_new_tokens, self.sampling))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def server_command(bin_dir: Path, target: Path, drafter: Path | None, *, threads: int, n_ctx: int, k: int,
                   gpu: bool, exact: bool | None = None) -> list[str]:
    """llama-server as docs/gguf.md runs it: one slot, our context size, threads and draft length, and EXACT_FLAGS
    when `exact` (default: on the CPU, where they give greedy identity at no cost; not on a GPU, see EXACT_FLAGS)."""
    exact = not gpu if exact is None else exact
    cmd = [str(bin_dir / SERVER), "-m", str(target), "-c", str(n_ctx), "-np", "1", "-t", str(threads),
           "-tb", str(threads), "--no-webui", "-ngl", "all" if gpu else "0", *(EXACT_FLAGS if exact else ())]
    if drafter is not None:
        cmd += ["-md", str(drafter), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(k),
                "-ngld", "all" if gpu else "0"]
    return cmd


def llama_server_methods(bin_dir: Path, target: Path, drafter: Path | None, *, threads: int, n_ctx: int, k: int,
                         sampling: Sampling, gpu: bool, log_dir: Path | None = None) -> list[Method]:
    """`llama_server` (plain) and, with an exported drafter.gguf, `llama_server_mtp` (--spec-type draft-mtp)."""
    w = f"GGUF {target.name}, stock llama.cpp ({'GPU' if gpu else 'CPU'})"
    mb = target.stat().st_size / 2**20
    out: list[Method] = []
    for name, dft in (("llama_server", None), ("llama_server_mtp", drafter)):
        if name == "llama_server_mtp" and drafter is None:
            continue
        cmd = server_command(bin_dir, target, dft, threads=threads, n_ctx=n_ctx, k=k, gpu=gpu)
        log = log_dir / f"{name}.log" if log_dir is not None else None
        try:
            srv = LlamaServer(cmd, log=log)
        except MtpkitError:
            for m in out:
                m.close()
            raise
        shown = " ".join([SERVER, *cmd[1:]])
        if dft is None:
            out.append(LlamaServerMethod(name, f"stock llama.cpp: {shown}", w, mb, reference="plain", server=srv,
                                         sampling=sampling))
        else:
            out.append(LlamaServerMethod(name, f"stock llama.cpp draft-mtp with our drafter.gguf: {shown}",
                                         w + " + drafter.gguf", mb + dft.stat().st_size / 2**20,
                                         reference="llama_server", must_match=True, server=srv, sampling=sampling))
    return out


def stock_bench(plain: LlamaServer, mtp: LlamaServer, *, suite: str, limit: int, max_new_tokens: int,
                temperature: float, seed: int, repeats: int, machine: dict[str, Any], settings: dict[str, Any],
                models: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """A bench document (docs/bench.md schema) of stock llama.cpp alone: `plain` = llama-server's plain decoding,
    `speculative` = llama-server draft-mtp with our drafter.gguf. For devices where mtpkit's own loop does not run
    (phones: the servers run there, this process drives them through `adb forward`). Prompts are tokenized by the
    server itself (/tokenize, with BOS), so this needs neither torch nor our tokenizer."""
    from mtpkit.bench.runner import document, measure, spread
    from mtpkit.suites import load_suite
    prompts = spread(load_suite(suite), limit)
    ids = [plain.post("/tokenize", {"content": p.text, "add_special": True})["tokens"] for p in prompts]
    sp = Sampling(temperature, seed, set())
    tmb, dmb = models["target"]["mb"], models["drafter"]["mb"]
    methods: list[Method] = [
        LlamaServerMethod("plain", "stock llama-server, plain decoding", "target.gguf", tmb, server=plain, sampling=sp),
        LlamaServerMethod("speculative", "stock llama-server --spec-type draft-mtp with our drafter.gguf",
                          "target.gguf + drafter.gguf", tmb + dmb, reference="plain", must_match=True, server=mtp,
                          sampling=sp)]
    t0 = time.perf_counter()
    rows = measure(methods, prompts, ids, max_new_tokens, repeats, temperature <= 0, progress=progress)
    cfg = dict(settings, suite=suite, limit=limit, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
               repeats=repeats)
    return document(methods, rows, temperature <= 0, skipped={}, settings=cfg, machine=machine, models=models,
                    wall_s=time.perf_counter() - t0)
