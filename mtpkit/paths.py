"""Where mtpkit caches things ($MTPKIT_CACHE, else $XDG_CACHE_HOME/mtpkit, else ~/.cache/mtpkit), and the one
way it writes anything so that a reader never sees half of it: a file (`atomic_file`, `atomic_write`), a directory
(`atomic_dir`), or a set of entries of an output directory (`atomic_entries`). Each fills a temporary beside its
destination and renames it into place only on success; on any error the temporary is removed. A process killed
outright (kill -9, power loss) cannot remove its temporary: each temporary's name carries its process id, and the
next writer of the same destination removes those whose process is gone."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("MTPKIT_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mtpkit"


def check_writable(d: Path, what: str) -> None:
    """Fail now, in one line, if files cannot be created in directory `d` (or, where it does not exist yet, in its
    nearest existing ancestor): before the long work whose result would be written there. Creates nothing."""
    from mtpkit.errors import MtpkitError
    p = Path(d).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise MtpkitError(f"{what}: {p} is not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=p, prefix=f".mtpkit-probe.{os.getpid()}.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise MtpkitError(f"{what}: cannot write in {p} ({e.strerror or e})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(parent: Path, prefix: str) -> None:
    """Remove temporaries `{prefix}{pid}-*` / `{prefix}{pid}.*` in `parent` left by processes that are gone."""
    pat = re.compile(re.escape(prefix) + r"(\d+)[-.]")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pat.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def swap_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory `tmp` at `dest`; an existing `dest` is kept as `.{name}.old` until then."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside `dest` to fill; on success it replaces `dest`, on any error it is removed.

    keep_existing: a cache entry that another process may have published meanwhile: theirs is kept, ours dropped
    (replacing it would pull a directory from under its readers)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep(dest.parent, f".{dest.name}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-{os.getpid()}-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result is an ordinary directory
    try:
        yield tmp
        if not keep_existing:
            swap_dir(tmp, dest)
        else:
            try:
                os.replace(tmp, dest)  # fails if dest exists and is not empty
            except OSError:
                if not dest.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest` (an empty file) for a writer to fill; on success it replaces `dest`,
    on any error it is removed. For writers that take a path (a compiler, savefig); not safetensors' save_file, which
    writes through a `.tmpXXXXXX` of its own beside the path (write `safetensors.torch.save`'s bytes with atomic_write)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep(dest.parent, f".{dest.name}.")
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:  # name the file the user asked for, not our temporary
        raise OSError(e.errno, e.strerror, str(dest)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the result is an ordinary file
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(dest: Path, data: bytes | str) -> None:
    """Write `data` (str: as UTF-8) to `dest` atomically."""
    with atomic_file(Path(dest)) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_entries(dest: Path, names: Sequence[str]) -> Iterator[Path]:
    """Yield an empty staging directory to fill with entries called `names` (files or directories) for the output
    directory `dest`; on success each replaces `dest/name` atomically, in the order of `names`, and a name the
    staging directory lacks is removed from `dest` (a stale file of an earlier run would be read as this one's).
    Other entries of `dest` are left alone. On any error nothing in `dest` changes (a `dest` this call created is
    removed again). The staging directory lives in `dest`, so every rename stays on one filesystem."""
    dest = Path(dest)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    sweep(dest, ".staging-")
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=dest))
    try:
        yield stage
        extra = sorted(p.name for p in stage.iterdir() if p.name not in names)
        if extra:
            raise RuntimeError(f"atomic_entries: {extra} staged for {dest} but not named")
        for name in names:
            src, dst = stage / name, dest / name
            if src.is_dir():
                swap_dir(src, dst)
            elif src.exists():
                os.replace(src, dst)
            elif dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if still empty
        raise
    shutil.rmtree(stage, ignore_errors=True)


def compiled_library(what: str, name: str, source: str, args: Sequence[str], key: str = "") -> Path:
    """C `source` built by the system compiler (`$CC`, cc or gcc) with `args` (flags and libraries) into a shared
    library in the user cache, once per (source, args, key): cache_dir()/name/<hash>/libmtpkit_<name>.so, written
    atomically. RuntimeError naming `what` when there is no compiler or the build fails (its first error line)."""
    import hashlib
    import subprocess
    digest = hashlib.sha256("\0".join([source, *args, key]).encode()).hexdigest()[:16]
    out = cache_dir() / name / digest / f"libmtpkit_{name}.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError(f"no C compiler (cc/gcc) to build {what}")
    with atomic_file(out) as lib, tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(lib), *args], capture_output=True,
                           text=True)
        if r.returncode:
            err = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.strip().splitlines() or ["?"]
            raise RuntimeError(f"{what} did not build: {err[0].strip()}")
    return out
