# The Fossil delta encoder (C, nogil), its checksum, and the two byte checks
# a delta frame needs (strict UTF-8, JSON string escaping).
# Part of fanout_core/_core.pyx (textually included: one extension module).
#
# Format (https://fossil-scm.org/home/doc/tip/www/delta_format.wiki): the
# target size as a base-64 integer and "\n"; then commands: "N@O," copies N
# bytes from offset O of the source, "N:" is followed by N literal bytes;
# last "C;" where C is the checksum of the target. Integers use the digits
# 0-9 A-Z _ a-z ~ (most significant first). The encoder follows Fossil's
# delta_create(): landmarks every NHASH bytes of the source, a rolling hash
# over the target, copies only where they are shorter than the literal.
# Written here rather than taken from a package: the PyPI bindings for it are
# years old and unmaintained, and the core needs it in C with the GIL
# released, on its own buffers (no Python object per message).

from libc.stdint cimport uint16_t

cdef enum:
    FD_NHASH = 16             # hash window (power of two)
    FD_SLACK = 64             # delta bytes beyond the target's size an encoder may write

cdef const char *FD_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"


cdef struct FdHash:
    uint16_t a
    uint16_t b
    uint16_t i
    unsigned char z[FD_NHASH]


cdef inline void fd_hash_init(FdHash *h, const unsigned char *z) noexcept nogil:
    cdef uint16_t a = 0, b = 0
    cdef int i
    for i in range(FD_NHASH):
        a = <uint16_t>(a + z[i])
        b = <uint16_t>(b + (FD_NHASH - i) * z[i])
        h.z[i] = z[i]
    h.a = a
    h.b = b
    h.i = 0


cdef inline void fd_hash_next(FdHash *h, unsigned char c) noexcept nogil:
    cdef uint16_t old = h.z[h.i]
    h.z[h.i] = c
    h.i = (h.i + 1) & (FD_NHASH - 1)
    h.a = <uint16_t>(h.a - old + c)
    h.b = <uint16_t>(h.b - FD_NHASH * old + h.a)


cdef inline uint32_t fd_hash_value(const FdHash *h) noexcept nogil:
    return (<uint32_t>h.a) | ((<uint32_t>h.b) << 16)


cdef inline int fd_digit_count(uint32_t v) noexcept nogil:
    cdef int i = 1
    cdef uint64_t x = 64
    while v >= x:
        i += 1
        x <<= 6
    return i


cdef inline Py_ssize_t fd_put_int(unsigned char *out, uint32_t v) noexcept nogil:
    cdef unsigned char tmp[8]
    cdef int n = 0, j
    if v == 0:
        out[0] = 48
        return 1
    while v > 0:
        tmp[n] = FD_DIGITS[v & 0x3F]
        v >>= 6
        n += 1
    for j in range(n):
        out[j] = tmp[n - 1 - j]
    return n


cdef uint32_t fd_checksum(const unsigned char *z, Py_ssize_t n) noexcept nogil:
    """Fossil's checksum: the target as big-endian 32-bit words, summed."""
    cdef uint32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0
    while n >= 16:
        s0 += <uint32_t>z[0] + z[4] + z[8] + z[12]
        s1 += <uint32_t>z[1] + z[5] + z[9] + z[13]
        s2 += <uint32_t>z[2] + z[6] + z[10] + z[14]
        s3 += <uint32_t>z[3] + z[7] + z[11] + z[15]
        z += 16
        n -= 16
    while n >= 4:
        s0 += z[0]
        s1 += z[1]
        s2 += z[2]
        s3 += z[3]
        z += 4
        n -= 4
    s3 += (s2 << 8) + (s1 << 16) + (s0 << 24)
    if n == 3:
        s3 += (<uint32_t>z[2]) << 8
    if n >= 2:
        s3 += (<uint32_t>z[1]) << 16
    if n >= 1:
        s3 += (<uint32_t>z[0]) << 24
    return s3


cdef inline Py_ssize_t fd_literal(unsigned char *out, const unsigned char *z, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k = fd_put_int(out, <uint32_t>n)
    out[k] = 58                                    # ':'
    memcpy(out + k + 1, z, n)
    return k + 1 + n


cdef Py_ssize_t fossil_delta(const unsigned char *src, Py_ssize_t lsrc,
                             const unsigned char *dst, Py_ssize_t ldst,
                             unsigned char *out, Py_ssize_t cap, int *table) noexcept nogil:
    """Write the Fossil delta that turns ``src`` into ``dst`` to ``out``; returns
    its length, or -1 when it would not fit in ``cap`` bytes (a caller that
    only wants deltas shorter than the target passes ``cap`` = ``ldst``; at
    most ``ldst + FD_SLACK`` is ever needed). ``table`` has room for
    ``2 * (lsrc // FD_NHASH)`` ints. Sizes stay below 2**31."""
    cdef Py_ssize_t o = 0, base = 0, i, nhash, j, k, x, y, cnt, ofst, litsz, sz
    cdef Py_ssize_t best_cnt, best_ofst, best_litsz
    cdef int *collide
    cdef int *landmark
    cdef int iblock, limit
    cdef uint32_t hv
    cdef FdHash h
    cdef unsigned char num[16]
    if cap < 24:
        return -1
    o += fd_put_int(out + o, <uint32_t>ldst)
    out[o] = 10                                    # '\n'
    o += 1
    if lsrc <= FD_NHASH:
        # No copy can ever pay off: one literal of the whole target.
        if o + 8 + ldst + 8 > cap:
            return -1
        o += fd_literal(out + o, dst, ldst)
    else:
        nhash = lsrc // FD_NHASH
        collide = table
        landmark = table + nhash
        for i in range(nhash):
            landmark[i] = -1
            collide[i] = -1
        i = 0
        while i < lsrc - FD_NHASH:
            fd_hash_init(&h, src + i)
            hv = fd_hash_value(&h) % <uint32_t>nhash
            collide[i // FD_NHASH] = landmark[hv]
            landmark[hv] = <int>(i // FD_NHASH)
            i += FD_NHASH
        while base + FD_NHASH < ldst:
            best_cnt = best_ofst = best_litsz = 0
            fd_hash_init(&h, dst + base)
            i = 0                                  # matching a landmark against dst[base + i]
            while True:
                limit = 250
                hv = fd_hash_value(&h) % <uint32_t>nhash
                iblock = landmark[hv]
                while iblock >= 0 and limit > 0:
                    limit -= 1
                    # Extend the candidate forwards from src[iblock*NHASH] and
                    # backwards (not before dst[base]); keep it if the copy
                    # (with the literal before it) costs less than its bytes.
                    x = iblock * FD_NHASH
                    y = base + i
                    j = 0
                    while x + j < lsrc and y + j < ldst and src[x + j] == dst[y + j]:
                        j += 1
                    j -= 1
                    k = 1
                    while k < x and k <= i and src[x - k] == dst[y - k]:
                        k += 1
                    k -= 1
                    ofst = x - k
                    cnt = j + k + 1
                    litsz = i - k
                    sz = fd_digit_count(<uint32_t>litsz) + fd_digit_count(<uint32_t>cnt) + fd_digit_count(<uint32_t>ofst) + 3
                    if cnt >= sz and cnt > best_cnt:
                        best_cnt = cnt
                        best_ofst = ofst
                        best_litsz = litsz
                    iblock = collide[iblock]
                if best_cnt > 0:
                    if o + best_litsz + 40 > cap:
                        return -1
                    if best_litsz > 0:
                        o += fd_literal(out + o, dst + base, best_litsz)
                        base += best_litsz
                    base += best_cnt
                    o += fd_put_int(out + o, <uint32_t>best_cnt)
                    out[o] = 64                    # '@'
                    o += 1
                    o += fd_put_int(out + o, <uint32_t>best_ofst)
                    out[o] = 44                    # ','
                    o += 1
                    break
                if base + i + FD_NHASH >= ldst:
                    # The end, with no match: the rest is literal.
                    if o + (ldst - base) + 16 > cap:
                        return -1
                    o += fd_literal(out + o, dst + base, ldst - base)
                    base = ldst
                    break
                fd_hash_next(&h, dst[base + i + FD_NHASH])
                i += 1
        if base < ldst:
            if o + (ldst - base) + 16 > cap:
                return -1
            o += fd_literal(out + o, dst + base, ldst - base)
    if o + 8 > cap:
        return -1
    o += fd_put_int(out + o, fd_checksum(dst, ldst))
    out[o] = 59                                    # ';'
    return o + 1


cdef bint utf8_valid(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF):
    what Python's decoder and the WHATWG TextEncoder round trip agree on."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, lo, hi
    cdef int need, k
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            need = 1
        elif 0xE0 <= c <= 0xEF:
            need = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            need = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if i + need >= n:
            return False
        if not (lo <= s[i + 1] <= hi):
            return False
        for k in range(2, need + 1):
            if not (0x80 <= s[i + k] <= 0xBF):
                return False
        i += need + 1
    return True


cdef Py_ssize_t json_escaped_len(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """Bytes of ``s`` as the inside of a JSON string (see json_escape)."""
    cdef Py_ssize_t i, m = n
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        if c == 34 or c == 92 or c == 10:
            m += 1
        elif c < 0x20:
            m += 5
    return m


cdef Py_ssize_t json_escape(const unsigned char *s, Py_ssize_t n, unsigned char *out) noexcept nogil:
    """``s`` (valid UTF-8) as the inside of a JSON string: quote and backslash
    escaped, newline as \\n, other control bytes as \\u00XX, the rest verbatim."""
    cdef Py_ssize_t i, o = 0
    cdef unsigned char c
    cdef const char *hexd = b"0123456789abcdef"
    for i in range(n):
        c = s[i]
        if c == 34 or c == 92:
            out[o] = 92
            out[o + 1] = c
            o += 2
        elif c == 10:
            out[o] = 92
            out[o + 1] = 110                       # n
            o += 2
        elif c < 0x20:
            memcpy(out + o, b"\\u00", 4)
            out[o + 4] = hexd[c >> 4]
            out[o + 5] = hexd[c & 15]
            o += 6
        else:
            out[o] = c
            o += 1
    return o


def _fossil_delta(bytes source, bytes target):
    """The core's Fossil delta of two byte strings (tests check it against an
    independent decoder)."""
    cdef Py_ssize_t ls = PyBytes_GET_SIZE(source), lt = PyBytes_GET_SIZE(target), n
    cdef Py_ssize_t cap = lt + FD_SLACK
    cdef unsigned char *out = <unsigned char *>malloc(cap)
    cdef int *table = <int *>malloc((2 * (ls // FD_NHASH) + 1) * sizeof(int))
    cdef const unsigned char *sp = <const unsigned char *>PyBytes_AS_STRING(source)
    cdef const unsigned char *tp = <const unsigned char *>PyBytes_AS_STRING(target)
    try:
        if out == NULL or table == NULL:
            raise MemoryError()
        with nogil:
            n = fossil_delta(sp, ls, tp, lt, out, cap, table)
        if n < 0:
            raise AssertionError("fossil_delta overflowed its bound")
        return PyBytes_FromStringAndSize(<char *>out, n)
    finally:
        free(out)
        free(table)


def _utf8_valid(bytes data):
    return utf8_valid(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
