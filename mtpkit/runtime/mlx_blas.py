"""MLX on Linux CPUs: route MLX's float32 matmuls to OpenBLAS instead of the reference BLAS its wheel ships.

The `mlx[cpu]` wheel links the netlib *reference* BLAS it vendors (`mlx_cpu.libs/libblas-*.so.3.10.0`), whose
`cblas_sgemm` is an unoptimized triple loop: on a 2-core x86 machine the 640 x 262144 head of Gemma 3 takes
126 ms for one row and 828 ms for six (numpy's OpenBLAS: 68 / 115 ms), so a verify of k + 1 tokens costs k + 1
decode steps and speculative decoding cannot win. MLX resolves `cblas_sgemm` through the dynamic linker, and a
library loaded with RTLD_GLOBAL before `import mlx.core` comes first in the lookup. `scipy-openblas32` (PyPI)
ships OpenBLAS with its symbols prefixed (`scipy_cblas_sgemm`), so a five-line shim forwards the one symbol;
it is compiled once with the system C compiler into the user cache.

Only on Linux, only before MLX is imported; `MTPKIT_MLX_BLAS=0` turns it off. When it cannot be applied the
reason is printed once on stderr: nothing falls back to the slow path silently.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from mtpkit.errors import MtpkitError
from mtpkit.paths import compiled_library

SHIM = r"""
typedef int I;
extern void scipy_cblas_sgemm(I, I, I, I, I, I, float, const float*, I, const float*, I, float, float*, I);
long mtpkit_sgemm_calls = 0;
void cblas_sgemm(I o, I ta, I tb, I m, I n, I k, float al, const float* a, I lda, const float* b, I ldb,
                 float be, float* c, I ldc)
{ mtpkit_sgemm_calls++; scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
"""

_state: dict[str, object] = {}  # "lib": the loaded shim, or "why": the reason it is not in use


def _build(lib_dir: str) -> Path:
    """Compile the shim against `lib_dir`/libscipy_openblas.so once per (source, library dir)."""
    return compiled_library("the OpenBLAS shim", "mlx_blas", SHIM,
                            [f"-L{lib_dir}", "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"])


def use_openblas() -> bool:
    """Load the shim if it applies (Linux, MLX not imported yet); True if MLX's sgemm now goes to OpenBLAS."""
    if "lib" in _state or "why" in _state:
        return "lib" in _state
    why = None
    if not sys.platform.startswith("linux"):
        why = ""  # macOS MLX uses Accelerate / Metal: nothing to do, nothing to say
    elif os.environ.get("MTPKIT_MLX_BLAS") == "0":
        why = ""
    elif "mlx.core" in sys.modules:
        why = "mlx was imported before mtpkit could route its matmuls to OpenBLAS"
    else:
        try:
            import scipy_openblas32
            _state["lib"] = ctypes.CDLL(str(_build(scipy_openblas32.get_lib_dir())), mode=ctypes.RTLD_GLOBAL)
            return True
        except ImportError:
            why = "scipy-openblas32 is not installed (pip install -e '.[mlx]')"
        except (RuntimeError, OSError) as e:
            why = str(e)
    _state["why"] = why
    if why:
        print(f"note: MLX runs with its reference BLAS, several times slower here: {why}", file=sys.stderr)
    return False


def set_threads(n: int) -> None:
    """OpenBLAS threads for MLX's float32 matmuls (the shim must be in use: Linux)."""
    if "lib" not in _state:
        raise MtpkitError("threads: MLX's CPU threads are set here only for its Linux OpenBLAS matmuls, "
                          "which are not in use" + (f" ({_state['why']})" if _state.get("why") else ""))
    import scipy_openblas32
    ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / "libscipy_openblas.so")).scipy_openblas_set_num_threads(n)


def sgemm_calls() -> int | None:
    """How many float32 matmuls went through the shim (None if it is not loaded)."""
    lib = _state.get("lib")
    return None if lib is None else ctypes.c_long.in_dll(lib, "mtpkit_sgemm_calls").value
