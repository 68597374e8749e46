"""fanout: a WebSocket fan-out node (asyncio control plane over a Cython core).

Importing the package does not need the compiled core: ``fanout.client`` and
``fanout.publisher`` work without it. The node checks for it when it starts
(:func:`fanout._core_check.require_core`, called by ``fanout serve``).
"""

__version__ = "0.1.0"
