"""The compiled receive engine (``engine.c``), built on first use and loaded
with ctypes. See engine.c for what it does and why it exists.

Building needs a C compiler and zlib's headers (``gcc``, ``zlib1g-dev``). The
shared object goes to ``benchmarks/native/build/`` named by a hash of the
source, so an edited engine is rebuilt and a stale one is never loaded.
When it cannot be built, :func:`available` says why and the load generator
falls back to its pure-Python engine (``--engine py``), which costs several
times more CPU per message.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE / "engine.c"
BUILD = HERE / "build"

F_NATS, F_SLOW, F_DEFLATE, F_NOCTX = 1, 2, 4, 8
S_FREE, S_OPEN, S_READY, S_CLOSED = 0, 1, 2, 3
N_READY, N_CLOSED = 1, 2

EVENT_NAMES = {i: f"close_{1000 + i}" for i in range(16)}
EVENT_NAMES.update({
    16: "close_other", 17: "eof", 18: "protocol_error", 19: "inflate_error", 20: "error_frames",
    21: "throttle_updates", 22: "nats_err", 23: "oversize", 24: "reset",
})

_lib: ctypes.CDLL | None = None
_error: str | None = None


def _so_path() -> Path:
    digest = hashlib.sha256(SRC.read_bytes()).hexdigest()[:16]
    return BUILD / f"engine-{digest}.so"


def build() -> Path:
    """Compile engine.c if needed; returns the shared object's path."""
    so = _so_path()
    if so.exists():
        return so
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found")
    BUILD.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=BUILD, suffix=".so")
    os.close(fd)
    cmd = [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SRC), "-lz", "-lm", "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building the load-generator engine failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    os.replace(tmp, so)  # atomic: concurrent builders race harmlessly
    return so


def load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(str(build()))
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.eng_new.restype = vp
    lib.eng_new.argtypes = [i]
    lib.eng_add.restype = i
    lib.eng_add.argtypes = [vp, i, i, i, ctypes.c_char_p, sz]
    lib.eng_state.restype = i
    lib.eng_state.argtypes = [vp, i]
    lib.eng_pause.argtypes = [vp, i, i]
    lib.eng_credit.argtypes = [vp, i, ctypes.c_int64, ctypes.c_int64]
    lib.eng_close.argtypes = [vp, i, i]
    lib.eng_open_count.restype = i
    lib.eng_open_count.argtypes = [vp]
    lib.eng_stats.argtypes = [vp, ctypes.c_void_p]
    lib.eng_reset.argtypes = [vp]
    lib.eng_run.argtypes = [vp]
    lib.eng_stop.argtypes = [vp]
    lib.eng_free.argtypes = [vp]
    lib.eng_hist_buckets.restype = i
    lib.eng_n_events.restype = i
    _lib = lib
    return lib


def available() -> tuple[bool, str]:
    """(True, path) when the engine builds and loads, else (False, why)."""
    global _error
    try:
        lib = load()
        return True, str(lib._name)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _error = str(e)
        return False, _error


class Engine:
    """Thin wrapper of one engine instance (one per worker process)."""

    def __init__(self, notify_fd: int, hist_buckets: int) -> None:
        self.lib = load()
        if self.lib.eng_hist_buckets() != hist_buckets:
            raise RuntimeError("engine.c and common.py disagree on the histogram size")
        self.hb = hist_buckets
        self.nev = self.lib.eng_n_events()
        self.ptr = self.lib.eng_new(notify_fd)
        self._stats = np.zeros(2 * (5 + self.hb) + self.nev, dtype=np.uint64)

    def add(self, fd: int, slot: int, flags: int, leftover: bytes) -> int:
        return self.lib.eng_add(self.ptr, fd, slot, flags, leftover, len(leftover))

    def state(self, slot: int) -> int:
        return self.lib.eng_state(self.ptr, slot)

    def pause(self, slot: int, paused: bool) -> None:
        self.lib.eng_pause(self.ptr, slot, 1 if paused else 0)

    def credit(self, slot: int, nbytes: int, cap: int) -> None:
        """Let a (slow) reader read ``nbytes`` more, its credit capped at ``cap``."""
        self.lib.eng_credit(self.ptr, slot, nbytes, cap)

    def close(self, slot: int, code: int = 1000) -> None:
        self.lib.eng_close(self.ptr, slot, code)

    def open_count(self) -> int:
        return self.lib.eng_open_count(self.ptr)

    def run(self) -> None:
        """Blocks until :meth:`stop` (ctypes drops the GIL meanwhile)."""
        self.lib.eng_run(self.ptr)

    def stop(self) -> None:
        self.lib.eng_stop(self.ptr)

    def reset(self) -> None:
        self.lib.eng_reset(self.ptr)

    def stats(self) -> dict[str, object]:
        """Per class (fast, slow): counters since reset, ready clients, and
        the histogram since the last call; plus the event counters."""
        s = self._stats
        self.lib.eng_stats(self.ptr, s.ctypes.data)
        out: dict[str, object] = {}
        o = 0
        for name in ("fast", "slow"):
            rec, gaps, dups, nbytes, ready = (int(x) for x in s[o : o + 5])
            hist = s[o + 5 : o + 5 + self.hb].astype(np.int64)
            out[name] = {"received": rec, "gaps": gaps, "dups": dups, "bytes": nbytes, "ready": ready,
                         "hist": hist}
            o += 5 + self.hb
        ev = s[o : o + self.nev]
        out["events"] = {EVENT_NAMES.get(i, f"ev{i}"): int(v) for i, v in enumerate(ev) if v}
        return out

    def free(self) -> None:
        if self.ptr:
            self.lib.eng_free(self.ptr)
            self.ptr = None
