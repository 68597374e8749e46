"""fanout: a WebSocket fan-out node (asyncio control plane over a Cython core)."""

try:
    import fanout_core as _core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by hand
    raise ImportError(
        "fanout's compiled core (fanout_core._core) is not built. Build it with "
        "`pip install -e .` (or `pip install .`) from the repository root; it needs "
        "a C compiler and Python headers. There is no pure-Python fallback."
    ) from exc

__version__ = "0.1.0"
