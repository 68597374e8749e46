# Delta messages (PROTOCOL 1.2): one Fossil delta per published message,
# computed once per subject, and the rule for who may get it.
# Part of fanout_core/_core.pyx (textually included: one extension module).
#
# The base rule. A subject (route) keeps its last published message
# (``dprev``, a reference: usually a message the replay rings hold anyway).
# At publish, a message gets ``rseq`` (the route's publish count) and, when
# some subscriber of the subject asked for deltas (the route's ``dbits``), a
# second shared body: the delta from ``dprev``'s payload, framed as
# ``"delta":"..."`` in place of ``"data":...``, compressed once per window
# like any body. Each client that asked keeps a small table (route -> rseq of
# the last message of that subject queued to it); it gets the delta frame
# only when that entry is exactly ``rseq - 1``, i.e. it was sent the base
# itself, in order. Everything else gets the full frame, and anything that
# may change what the client holds without going through that table clears
# the table (catch-up history, replay, unsubscribe): a full message may
# always stand where a delta could. Throttle drops and conflation leave the
# entry behind the subject, so the next message of that subject is full.
#
# Memory: per subject with delta subscribers, one message reference (the
# route cache bounds subjects: ``max_routes``); per client that asked, a
# direct-mapped table of at most DSEEN_MAX entries of 8 bytes (a collision
# forgets the older subject: its next message is full).
#
# The payload a delta works on is the text of ``data`` in the frame (the
# published payload without surrounding whitespace). Only payloads that are
# embedded verbatim and are not a JSON string take part (a JSON string
# ``data`` may be the encoding of a non-JSON text payload, so its payload
# bytes are not in the frame); ``data_b64`` (not UTF-8) never does.

cdef enum:
    DSEEN_MIN = 16
    DSEEN_MAX = 1024          # entries per client: 8 KiB
    REFUSED_NOT_SMALLER = 0
    REFUSED_NOT_UTF8 = 1


cdef inline uint64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef int delta_init(Core self, channels, Py_ssize_t min_bytes) except -1:
    self._delta_tokens = [str(p).split(".") for p in channels]
    self.delta_min_bytes = min_bytes if min_bytes > 0 else 0
    return 0


cdef void delta_core_free(Core self) noexcept:
    free(self._dbuf)
    free(self._dhash)
    self._dbuf = NULL
    self._dhash = NULL


# ------------------------------------------------------------ subscriptions

cdef int delta_route_init(Core self, _Route r) except -1:
    """A new route: may its subject carry deltas (WS_DELTA_CHANNELS)?"""
    r.dallow = False
    for ptoks in self._delta_tokens:
        if _match(ptoks, r.tokens):
            r.dallow = True
            break
    return 0


cdef void delta_route_free(_Route r) noexcept:
    if r.dprev != NULL:
        msg_decref(r.dprev)
        r.dprev = NULL
    free(r.dbits)
    r.dbits = NULL


cdef int delta_route_bit(Core self, _Route r, int slot) except -1:
    """Recompute the slot's bit of the route's opt-ins from its patterns."""
    cdef int w = slot >> 6
    cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
    cdef _Pattern q
    cdef bint on = False
    if r.dallow:
        for q in r.patterns:
            if q.dbits != NULL and (q.dbits[w] & mask) and (q.bits[w] & mask):
                on = True
                break
    if on:
        if r.dbits == NULL:
            r.dbits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
            if r.dbits == NULL:
                raise MemoryError()
        r.dbits[w] |= mask
    elif r.dbits != NULL:
        r.dbits[w] &= ~mask
    return 0


cdef int delta_link(Core self, _Pattern p, _Route r) except -1:
    """A pattern joins a route: its delta subscribers join the route's."""
    cdef int i
    if p.dbits == NULL or not r.dallow:
        return 0
    if r.dbits == NULL:
        r.dbits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
        if r.dbits == NULL:
            raise MemoryError()
    for i in range(self.nwords):
        r.dbits[i] |= p.dbits[i] & p.bits[i]
    return 0


cdef int delta_subscribed(Core self, _Pattern p, int slot, bint on) except -1:
    """After subscribe: the slot asked (or not) for deltas on this pattern."""
    cdef int w = slot >> 6
    cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
    if on and not self._delta_tokens:
        on = False
    if on:
        if p.dbits == NULL:
            p.dbits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
            if p.dbits == NULL:
                raise MemoryError()
        p.dbits[w] |= mask
    elif p.dbits != NULL:
        if not (p.dbits[w] & mask):
            return 0
        p.dbits[w] &= ~mask
    else:
        return 0
    for subject in p.routes:
        delta_route_bit(self, self._routes[subject], slot)
    return 0


cdef int delta_unsubscribed(Core self, _Pattern p, int slot) except -1:
    """Before the pattern's bit goes: the slot's opt-in goes, and its table
    (the client forgets its bases on unsubscribe)."""
    cdef int w = slot >> 6
    cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
    delta_forget(self, &self.clients[slot])
    if p.dbits == NULL or not (p.dbits[w] & mask):
        return 0
    p.dbits[w] &= ~mask
    for subject in p.routes:
        delta_route_bit(self, self._routes[subject], slot)
    return 0


# ------------------------------------------------------------------ publish

cdef inline Py_ssize_t data_at(const char *tail, Py_ssize_t n) noexcept nogil:
    """Offset of ``,"data":`` in a message tail, or -1. The first one is the
    field's: the channel before it is JSON-escaped, so no quote in it follows
    a comma."""
    cdef Py_ssize_t i
    for i in range(n - 8):
        if tail[i] == 44 and tail[i + 1] == 34 and memcmp(tail + i + 2, b'data":', 6) == 0:
            return i
    return -1


cdef Msg *delta_make(Core self, Msg *base, Msg *m) except? NULL:
    """The delta message of ``m`` against ``base``, or NULL (not deltable, too
    small, not smaller, or not UTF-8)."""
    cdef Py_ssize_t bpos = data_at(base.tail, base.tail_len)
    cdef Py_ssize_t tpos = data_at(m.tail, m.tail_len)
    cdef const unsigned char *bp
    cdef const unsigned char *tp
    cdef Py_ssize_t bl, tl, n, esc, dlen, need
    cdef uint64_t t0
    cdef Msg *d
    if bpos < 0 or tpos < 0:
        return NULL
    bp = <const unsigned char *>base.tail + bpos + 8
    tp = <const unsigned char *>m.tail + tpos + 8
    bl = base.tail_len - bpos - 9
    tl = m.tail_len - tpos - 9
    if bl <= 0 or tl <= 0 or bp[0] == 34 or tp[0] == 34 or tl < self.delta_min_bytes:
        return NULL
    need = tl + FD_SLACK
    if self._dbuf_cap < need:
        free(self._dbuf)
        self._dbuf = <unsigned char *>malloc(need)
        self._dbuf_cap = need if self._dbuf != NULL else 0
        if self._dbuf == NULL:
            raise MemoryError()
    need = 2 * (bl // FD_NHASH) + 1
    if self._dhash_cap < need:
        free(self._dhash)
        self._dhash = <int *>malloc(need * sizeof(int))
        self._dhash_cap = need if self._dhash != NULL else 0
        if self._dhash == NULL:
            raise MemoryError()
    t0 = mono_ns()
    # Capacity tl: a delta as long as the payload is no use.
    n = fossil_delta(bp, bl, tp, tl, self._dbuf, tl, self._dhash)
    if n < 0:
        self.delta_refused[REFUSED_NOT_SMALLER] += 1
        self.delta_ns += mono_ns() - t0
        return NULL
    if not utf8_valid(self._dbuf, n):
        self.delta_refused[REFUSED_NOT_UTF8] += 1
        self.delta_ns += mono_ns() - t0
        return NULL
    esc = json_escaped_len(self._dbuf, n)
    dlen = tpos + 1 + 9 + esc + 2               # head, "delta":"  ...  "}
    if dlen >= m.tail_len:
        self.delta_refused[REFUSED_NOT_SMALLER] += 1
        self.delta_ns += mono_ns() - t0
        return NULL
    d = <Msg *>calloc(1, sizeof(Msg))
    if d == NULL:
        raise MemoryError()
    d.tail = <char *>malloc(dlen)
    if d.tail == NULL:
        free(d)
        raise MemoryError()
    memcpy(d.tail, m.tail, tpos + 1)
    memcpy(d.tail + tpos + 1, b'"delta":"', 9)
    json_escape(self._dbuf, n, <unsigned char *>d.tail + tpos + 10)
    memcpy(d.tail + dlen - 2, b'"}', 2)
    d.tail_len = dlen
    d.priority = m.priority
    d.subject = m.subject
    d.conflate = m.conflate
    d.rseq = m.rseq
    d.t = m.t
    d.refcnt = 1                                  # held by m (msg_free drops it)
    fo_atomic_inc(&_live_msgs)
    self.delta_made += 1
    self.delta_ns += mono_ns() - t0
    return d


cdef int delta_prepare(Core self, _Route r, Msg *m) except -1:
    """At publish, once per message: its rseq, its delta when some subscriber
    of the subject may take one, and it becomes the subject's next base."""
    cdef int w, words = (self._next_slot + 63) >> 6
    cdef bint wanted = False
    r.dseq += 1
    m.rseq = r.dseq
    if r.dbits != NULL:
        for w in range(words):
            if r.dbits[w]:
                wanted = True
                break
    if not wanted:
        if r.dprev != NULL:
            msg_decref(r.dprev)       # nobody takes deltas here: keep no base
            r.dprev = NULL
        return 0
    m.dbits = r.dbits
    if r.dprev != NULL:
        m.delta = delta_make(self, r.dprev, m)
        msg_decref(r.dprev)
    m.refcnt += 1
    r.dprev = m
    return 0


# ---------------------------------------------------------------- per client

cdef inline uint32_t dseen_hash(uint32_t route) noexcept nogil:
    route ^= route >> 16
    route *= 0x45D9F3B
    return route ^ (route >> 16)


cdef DSeen *dseen_entry(Core self, Client *c, uint32_t route) noexcept:
    """The client's table entry for ``route`` (or the one it would take), the
    table made or grown as needed; NULL without memory (then: full frames)."""
    cdef DSeen *e
    cdef DSeen *nt
    cdef uint32_t i, size
    if c.dseen == NULL:
        c.dseen = <DSeen *>calloc(DSEEN_MIN, sizeof(DSeen))
        if c.dseen == NULL:
            return NULL
        c.dmask = DSEEN_MIN - 1
        self.dseen_bytes += DSEEN_MIN * sizeof(DSeen)
    e = &c.dseen[dseen_hash(route) & c.dmask]
    if e.route != 0 and e.route != route and c.dmask + 1 < DSEEN_MAX:
        size = (c.dmask + 1) * 2
        nt = <DSeen *>calloc(size, sizeof(DSeen))
        if nt != NULL:
            for i in range(c.dmask + 1):
                if c.dseen[i].route != 0:
                    nt[dseen_hash(c.dseen[i].route) & (size - 1)] = c.dseen[i]
            free(c.dseen)
            self.dseen_bytes += (size - c.dmask - 1) * sizeof(DSeen)
            c.dseen = nt
            c.dmask = size - 1
            e = &c.dseen[dseen_hash(route) & c.dmask]
    return e


cdef int delta_queue(Core self, Client *c, int slot, uint64_t seq, Msg *m, bint catchup) except -1:
    """Queue data frame ``seq``: the delta form of ``m`` when this client asked
    for deltas on its subject and was sent its base, else the full one."""
    cdef Msg *out = m
    cdef DSeen *e
    cdef Py_ssize_t before = c.queued
    cdef int k
    if catchup or m.subject == 0:
        delta_forget(self, c)         # history: the client's bases move outside the table
    elif m.dbits != NULL and (m.dbits[slot >> 6] >> (slot & 63)) & 1:
        e = dseen_entry(self, c, m.subject)
        if e != NULL:
            if m.delta != NULL and e.route == m.subject and e.rseq + 1 == m.rseq:
                out = m.delta
            e.route = m.subject
            e.rseq = m.rseq
    queue_data(self, c, seq, out)
    k = 1 if out != m else 0
    self.kind_bytes[k] += c.queued - before
    self.kind_frames[k] += 1
    return 0


cdef void delta_forget(Core self, Client *c) noexcept:
    """The client's next message of every subject is full."""
    if c.dseen != NULL:
        memset(c.dseen, 0, (c.dmask + 1) * sizeof(DSeen))


cdef void delta_client_free(Core self, Client *c) noexcept:
    if c.dseen != NULL:
        self.dseen_bytes -= (c.dmask + 1) * sizeof(DSeen)
        free(c.dseen)
        c.dseen = NULL
        c.dmask = 0


cdef dict delta_stats(Core self):
    cdef _Route r
    cdef Py_ssize_t bases = 0, base_bytes = 0
    for r in self._routes.values():
        if r.dprev != NULL:
            bases += 1
            base_bytes += r.dprev.tail_len
    return {
        "computed": self.delta_made,
        "seconds": self.delta_ns / 1e9,
        "refused_not_smaller": self.delta_refused[REFUSED_NOT_SMALLER],
        "refused_not_utf8": self.delta_refused[REFUSED_NOT_UTF8],
        "bytes_full": self.kind_bytes[0],
        "bytes_delta": self.kind_bytes[1],
        "frames_full": self.kind_frames[0],
        "frames_delta": self.kind_frames[1],
        "bases": bases,
        "base_bytes": base_bytes,
        "table_bytes": self.dseen_bytes,
    }
