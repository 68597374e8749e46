"""The compiled fan-out core. Re-exports only; see ``_core.pyx``."""

from ._core import Core

__all__ = ["Core"]
