"""Fossil delta decoding (the client side of PROTOCOL 1.2 delta messages), pure Python.

A Fossil delta (https://fossil-scm.org/home/doc/tip/www/delta_format.wiki) is
the target's size as a base-64 integer and ``\\n``, then commands ``N@O,``
(copy N bytes of the source from offset O) and ``N:`` + N literal bytes, and
last ``C;`` with the checksum of the target. :func:`apply_delta` checks every
bound and the checksum, so a corrupted delta or a wrong base raises
:class:`DeltaError` instead of returning wrong bytes. The node's encoder is in
the compiled core (``fanout_core/fossil.pxi``).
"""

from __future__ import annotations

__all__ = ["DeltaError", "apply_delta", "checksum"]

_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUE = {c: i for i, c in enumerate(_DIGITS)}


class DeltaError(ValueError):
    """The delta cannot be applied to this source (malformed, out of bounds, or a checksum mismatch)."""


def checksum(data: bytes) -> int:
    """Fossil's 32-bit checksum: the bytes as big-endian 32-bit words, summed
    (a last partial word padded with zeros on the right)."""
    n = len(data)
    whole = n - n % 4
    total = sum(int.from_bytes(data[i:i + 4], "big") for i in range(0, whole, 4))
    if n % 4:
        total += int.from_bytes(data[whole:].ljust(4, b"\0"), "big")
    return total & 0xFFFFFFFF


def _int(delta: bytes, pos: int) -> tuple[int, int]:
    v = 0
    start = pos
    n = len(delta)
    while pos < n:
        d = _VALUE.get(delta[pos])
        if d is None:
            break
        v = (v << 6) + d
        pos += 1
    if pos == start:
        raise DeltaError(f"expected a number at byte {start}")
    return v, pos


def apply_delta(source: bytes, delta: bytes) -> bytes:
    """The target that ``delta`` makes of ``source``; :class:`DeltaError` if it does not apply."""
    limit, pos = _int(delta, 0)
    if pos >= len(delta) or delta[pos] != 0x0A:
        raise DeltaError("size not terminated by a newline")
    pos += 1
    out = bytearray()
    n = len(delta)
    while pos < n:
        cnt, pos = _int(delta, pos)
        if pos >= n:
            raise DeltaError("command without an operator")
        op = delta[pos]
        pos += 1
        if op == 0x40:                                   # '@': copy from the source
            ofst, pos = _int(delta, pos)
            if pos >= n or delta[pos] != 0x2C:
                raise DeltaError("copy command not terminated by ','")
            pos += 1
            if len(out) + cnt > limit:
                raise DeltaError("copy exceeds the output size")
            if ofst + cnt > len(source):
                raise DeltaError("copy extends past the end of the source")
            out += source[ofst:ofst + cnt]
        elif op == 0x3A:                                 # ':': literal bytes
            if len(out) + cnt > limit:
                raise DeltaError("insert exceeds the output size")
            if pos + cnt > n:
                raise DeltaError("insert extends past the end of the delta")
            out += delta[pos:pos + cnt]
            pos += cnt
        elif op == 0x3B:                                 # ';': checksum, the end
            result = bytes(out)
            if len(result) != limit:
                raise DeltaError("output size does not match the header")
            if cnt != checksum(result):
                raise DeltaError("bad checksum")
            return result
        else:
            raise DeltaError(f"unknown operator {chr(op)!r}")
    raise DeltaError("delta not terminated")
