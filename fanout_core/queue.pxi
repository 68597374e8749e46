# Messages (shared, reference-counted) and the per-client output queues.
# Part of fanout_core/_core.pyx (textually included: one extension module).

# Messages alive (made by msg_new, not yet freed): a leak or double-free
# check for tests (live_messages()). Changed atomically: flush threads free.
cdef Py_ssize_t _live_msgs = 0
# Their bytes: the struct and the uncompressed body (not the deflated copies).
cdef Py_ssize_t _live_msg_bytes = 0

cdef extern from *:
    """
    static inline void fo_atomic_add(Py_ssize_t *v, Py_ssize_t d) {
        __atomic_add_fetch(v, d, __ATOMIC_RELAXED);
    }
    """
    void fo_atomic_add(Py_ssize_t *v, Py_ssize_t d) nogil


def live_messages():
    """Messages allocated and not yet freed, across all cores (tests: 0 once
    every core is gone means no reference was lost or dropped twice)."""
    return _live_msgs


def live_message_bytes():
    """Bytes of the messages alive (struct + uncompressed body), across all cores."""
    return _live_msg_bytes


cdef inline void msg_free(Msg *m) noexcept nogil:
    cdef int i
    fo_atomic_add(&_live_msg_bytes, -(<Py_ssize_t>sizeof(Msg) + m.tail_len))
    free(m.tail)
    for i in range(MAX_WBITS_SLOTS):
        if m.ztail[i] != NULL:
            free(m.ztail[i])
    if m.delta != NULL:
        msg_decref_shared(m.delta)
    free(m)
    fo_atomic_dec(&_live_msgs)


cdef inline void msg_decref(Msg *m) noexcept:
    m.refcnt -= 1
    if m.refcnt == 0:
        msg_free(m)


cdef inline void msg_decref_shared(Msg *m) noexcept nogil:
    """msg_decref for the flush threads: several may drop references to one
    message at once, so the decrement is atomic and exactly one of them sees
    zero and frees it. (References are only ever added on the loop thread,
    between flushes.)"""
    if fo_atomic_dec(&m.refcnt) == 0:
        msg_free(m)


cdef Msg *msg_new(bytes tail, int priority) except NULL:
    """A message holding a copy of ``tail``, with one reference (the caller's)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(tail)
    cdef Msg *m = <Msg *>calloc(1, sizeof(Msg))
    if m == NULL:
        raise MemoryError()
    m.tail = <char *>malloc(n if n > 0 else 1)
    if m.tail == NULL:
        free(m)
        raise MemoryError()
    memcpy(m.tail, PyBytes_AS_STRING(tail), n)
    m.tail_len = n
    m.priority = priority if 0 <= priority <= 3 else 2
    m.refcnt = 1
    m.t = mono_now()
    fo_atomic_inc(&_live_msgs)
    fo_atomic_add(&_live_msg_bytes, <Py_ssize_t>sizeof(Msg) + n)
    return m


cdef void compact(Client *c) noexcept:
    """Move the unsent segments (and the inline bytes they use) to the front."""
    cdef int i, live = c.nseg - c.shead
    cdef Py_ssize_t shift = c.alen
    for i in range(c.shead, c.nseg):
        if c.segs[i].m == NULL:
            shift = seg_off(&c.segs[i])    # inline offsets grow with the queue
            break
    if shift > 0:
        memmove(c.arena, c.arena + shift, c.alen - shift)
        c.alen -= shift
        for i in range(c.shead, c.nseg):
            if c.segs[i].m == NULL:
                c.segs[i].v -= <uint64_t>shift
    if c.shead > 0:
        memmove(c.segs, c.segs + c.shead, live * sizeof(Seg))
        c.nseg = live
        c.shead = 0


cdef int queue_data(Core self, Client *c, uint64_t seq, Msg *m) except -1:
    """Queue data frame ``seq`` carrying message ``m`` (a reference, no copy)."""
    cdef Seg *sg
    cdef Py_ssize_t n
    if c.wbits and m.ztail[c.wbits] == NULL:
        msg_compress(self, m, c.wbits)
    grow_segs(c)
    sg = &c.segs[c.nseg]
    sg.m = m
    sg.v = seq
    m.refcnt += 1
    c.nseg += 1
    n = seg_len(c, sg)
    c.queued += n
    self.bytes_queued += n
    return 0


cdef int grow_segs(Client *c) except -1:
    cdef int newcap
    cdef Seg *ns
    if c.nseg < c.segcap:
        return 0
    if c.shead > 0:
        compact(c)
        if c.nseg < c.segcap:
            return 0
    newcap = c.segcap * 2 if c.segcap else MIN_SEGS
    ns = <Seg *>realloc(c.segs, newcap * sizeof(Seg))
    if ns == NULL:
        raise MemoryError()
    c.segs = ns
    c.segcap = newcap
    return 0


cdef char *queue_inline(Client *c, Py_ssize_t n, bint boundary) except NULL:
    """Room for n inline bytes at the end of the queue (valid until the next queue call)."""
    cdef Py_ssize_t newcap
    cdef char *na
    cdef Seg *sg
    if c.alen + n > c.acap:
        if c.shead > 0:
            compact(c)
        if c.alen + n > c.acap:
            newcap = c.acap * 2 if c.acap else MIN_ARENA
            while newcap < c.alen + n:
                newcap *= 2
            na = <char *>realloc(c.arena, newcap)
            if na == NULL:
                raise MemoryError()
            c.arena = na
            c.acap = newcap
    grow_segs(c)
    sg = &c.segs[c.nseg]
    sg.m = NULL
    sg.v = (<uint64_t>c.alen) | ((<uint64_t>n) << 32) | ((<uint64_t>1 << 63) if boundary else 0)
    c.nseg += 1
    c.alen += n
    c.queued += n
    return c.arena + c.alen - n


cdef void clear_queue(Client *c) noexcept:
    """Forget everything queued (drops the body references)."""
    cdef int i
    for i in range(c.shead, c.nseg):
        if c.segs[i].m != NULL:
            msg_decref(c.segs[i].m)
    c.shead = c.nseg = 0
    c.sdone = 0
    c.alen = 0
    c.queued = 0
