"""The compiled fan-out core. Re-exports only; see ``_core.pyx``."""

from ._core import Core, heap_stats

__all__ = ["Core", "heap_stats"]
