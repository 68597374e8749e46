"""Whether the compiled core (``fanout_core``) is there, and what to do when not.

Only the node needs the core: ``fanout.client``, ``fanout.publisher``,
``fanout.config`` and the ``fanout`` command's other verbs import without it,
so a backend that only publishes, or a script that only subscribes, can
``pip install`` fanout where no C compiler is. ``fanout serve`` calls
:func:`require_core` first and exits with :data:`BUILD_MESSAGE`.
There is no pure-Python fallback: a slow node would be a silent failure.
"""

from __future__ import annotations

__all__ = ["BUILD_MESSAGE", "require_core"]

BUILD_MESSAGE = (
    "fanout's compiled core (fanout_core._core) is not built. Build it with "
    "`pip install -e .` (or `pip install .`) from the repository root; it needs "
    "a C compiler and Python headers. There is no pure-Python fallback."
)


def require_core() -> None:
    """Import the compiled core or raise ImportError with :data:`BUILD_MESSAGE`."""
    try:
        import fanout_core  # noqa: F401
    except ImportError as exc:
        raise ImportError(BUILD_MESSAGE) from exc
