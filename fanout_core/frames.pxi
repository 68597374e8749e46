# WebSocket data frames: headers written at flush time, bodies compressed once.
# Part of fanout_core/_core.pyx (textually included: one extension module).

cdef inline int utoa(uint64_t v, char *out) noexcept nogil:
    """Decimal digits of v into out; returns the count."""
    cdef char tmp[24]
    cdef int n = 0, i
    if v == 0:
        out[0] = 48
        return 1
    while v:
        tmp[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef inline void write_header(unsigned char *p, unsigned char op, Py_ssize_t plen, Py_ssize_t hlen) noexcept nogil:
    cdef int i
    p[0] = op
    if hlen == 2:
        p[1] = <unsigned char>plen
    elif hlen == 4:
        p[1] = 126
        p[2] = <unsigned char>(plen >> 8)
        p[3] = <unsigned char>(plen & 0xFF)
    else:
        p[1] = 127
        for i in range(8):
            p[2 + i] = <unsigned char>((plen >> (56 - 8 * i)) & 0xFF)


cdef inline int ndigits(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline Py_ssize_t body_len(const Client *c, const Msg *m) noexcept nogil:
    return m.ztail_len[c.wbits] if c.wbits else m.tail_len


cdef inline const char *body_ptr(const Client *c, const Msg *m) noexcept nogil:
    return m.ztail[c.wbits] if c.wbits else m.tail


cdef inline Py_ssize_t head_len(const Client *c, const Seg *sg) noexcept nogil:
    """Bytes of a data frame before its shared body: header, stored-block header, prefix."""
    cdef Py_ssize_t pre = 8 + ndigits(sg.v) + (5 if c.wbits else 0)
    cdef Py_ssize_t plen = pre + body_len(c, sg.m)
    return pre + (2 if plen < 126 else (4 if plen < 65536 else 10))


cdef inline Py_ssize_t seg_len(const Client *c, const Seg *sg) noexcept nogil:
    if sg.m == NULL:
        return <Py_ssize_t>((sg.v >> 32) & LEN_MASK)
    return head_len(c, sg) + body_len(c, sg.m)


cdef inline bint seg_boundary(const Seg *sg) noexcept nogil:
    return sg.m != NULL or (sg.v >> 63) != 0


cdef inline Py_ssize_t seg_off(const Seg *sg) noexcept nogil:
    return <Py_ssize_t>(<uint32_t>sg.v)         # the low 32 bits


cdef Py_ssize_t write_head(const Client *c, const Seg *sg, unsigned char *p) noexcept nogil:
    """Write a data frame's header, stored-block header and prefix; returns the length."""
    cdef char digits[24]
    cdef int nd = utoa(sg.v, digits)
    cdef Py_ssize_t prefix_len = 8 + nd                  # {"seq":N,
    cdef Py_ssize_t blen = body_len(c, sg.m)
    cdef Py_ssize_t plen = prefix_len + blen + (5 if c.wbits else 0)
    cdef Py_ssize_t hlen = 2 if plen < 126 else (4 if plen < 65536 else 10)
    cdef unsigned char *q = p
    write_header(q, OP_TEXT_DEFLATE if c.wbits else OP_TEXT, plen, hlen)
    q += hlen
    if c.wbits:
        # A stored (uncompressed) DEFLATE block carries the client's own
        # prefix; the shared body, compressed once, follows it.
        q[0] = 0                                         # BFINAL=0, BTYPE=00
        q[1] = <unsigned char>(prefix_len & 0xFF)
        q[2] = <unsigned char>(prefix_len >> 8)
        q[3] = <unsigned char>(~prefix_len & 0xFF)
        q[4] = <unsigned char>((~prefix_len >> 8) & 0xFF)
        q += 5
    memcpy(q, b'{"seq":', 7)
    memcpy(q + 7, digits, nd)
    q[7 + nd] = 44                                       # ','
    return (q + 8 + nd) - p


cdef int msg_compress(Core self, Msg *m, int wbits) except -1:
    zc = self._zc[wbits]
    if zc is None:
        zc = zlib.compressobj(self.zlevel, zlib.DEFLATED, -wbits)
        self._zc[wbits] = zc
    # Z_FULL_FLUSH ends the block byte-aligned *and* forgets the history,
    # so this output never refers back to earlier messages: any client
    # can inflate it whatever it decoded before (RFC 7692 section 7.2.1).
    data = zc.compress(PyBytes_FromStringAndSize(m.tail, m.tail_len)) + zc.flush(zlib.Z_FULL_FLUSH)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data) - 4     # drop 00 00 ff ff
    m.ztail[wbits] = <char *>malloc(n if n > 0 else 1)
    if m.ztail[wbits] == NULL:
        raise MemoryError()
    memcpy(m.ztail[wbits], PyBytes_AS_STRING(data), n)
    m.ztail_len[wbits] = n
    self.compressions += 1
    return 0
