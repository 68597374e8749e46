# Delta messages (PROTOCOL 1.2): one Fossil delta per published message,
# computed once per subject, and the rule for who may get it.
# Part of fanout_core/_core.pyx (textually included: one extension module).
#
# The base rule. A subject (route) keeps its last published message
# (``dprev``, a reference: usually a message the replay rings hold anyway).
# At publish, when some subscriber of the subject asked for deltas (the
# route's ``drs``), a message gets a second shared body: the delta from
# ``dprev``'s payload, framed as ``"delta":"..."`` in place of
# ``"data":...``, compressed once per window like any body. The route also
# keeps two sets of client slots (``dgot0``/``dgot1``, by the parity of its
# publish count): who was queued the previous message, and who is queued
# this one.
# A client gets the delta frame only when it asked, its bit says it was
# queued the previous message, in order, and nothing changed its bases since
# (``dforget``, a clock stamp, below). Everyone else gets the full frame: a
# full message may always stand where a delta could. Throttle drops and
# conflation leave the client's bit clear, so its next message of that
# subject is full. Catch-up history, replay, unsubscribe and a new client in
# the slot stamp ``dforget`` with the delta clock (one tick per message
# published to a route): a previous message published before that stamp no
# longer counts, so the next message of every subject is full.
#
# Hot path: per delivery to a client that asked, three membership tests
# (a bit, or a binary search in a short array) and, only when the client's
# membership changes (it was dropped, or is new), one insert or removal; no
# per-client table. Memory (issue 19): every delta set (the opt-ins of
# patterns and routes, the two "sent" sets) is an RSet like the recipient
# sets (routes.pxi): 4 bytes per member while small, a bitset of the node
# when dense, nothing when empty; counted in Core.set_bytes. So a subject with
# one delta subscriber costs a message reference and a few bytes, not 2.5 KiB
# of bitsets at 10,000 slots. A slot whose opt-in on a route goes leaves the
# route's sent sets too (they do not collect departed clients). The route
# cache bounds subjects (``max_routes``). Nothing per client.
#
# The payload a delta works on is the text of ``data`` in the frame (the
# published payload without surrounding whitespace). Only payloads that are
# embedded verbatim and are not a JSON string take part (a JSON string
# ``data`` may be the encoding of a non-JSON text payload, so its payload
# bytes are not in the frame); ``data_b64`` (not UTF-8) never does.

cdef enum:
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

cdef int delta_route_init(Core self, _Route r, list tokens) except -1:
    """A new route: may its subject carry deltas (WS_DELTA_CHANNELS)?"""
    r.dallow = False
    for ptoks in self._delta_tokens:
        if _match(ptoks, tokens):
            r.dallow = True
            break
    return 0


cdef void delta_route_free(_Route r) noexcept:
    """The route object goes (__dealloc__): free what the core did not release."""
    cdef RSet *sets[3]
    cdef int i
    if r.dprev != NULL:
        msg_decref(r.dprev)
        r.dprev = NULL
    sets[0] = &r.drs
    sets[1] = &r.dgot0
    sets[2] = &r.dgot1
    for i in range(3):
        free(sets[i].arr)
        free(sets[i].bits)
        sets[i].arr = NULL
        sets[i].bits = NULL
        sets[i].n = sets[i].cap = 0


cdef void delta_route_release(Core self, _Route r) noexcept:
    """The core drops the route (its last pattern went, or the cache reset):
    its base and delta sets go, counted out of set_bytes."""
    if r.dprev != NULL:
        msg_decref(r.dprev)
        r.dprev = NULL
    rs_free(self, &r.drs)
    rs_free(self, &r.dgot0)
    rs_free(self, &r.dgot1)


cdef int delta_route_bit(Core self, _Route r, int slot) except -1:
    """Recompute the slot's membership of the route's opt-ins from its patterns."""
    cdef _Pattern q
    cdef bint on = False
    if r.dallow:
        for q in r.patterns:
            if rs_has(&q.drs, slot) and rs_has(&q.rs, slot):
                on = True
                break
    if on:
        if rs_add(self, &r.drs, slot):
            delta_forget(self, &self.clients[slot])     # newly opted in here: start with full messages
    elif rs_remove(self, &r.drs, slot):
        delta_forget(self, &self.clients[slot])
        rs_remove(self, &r.dgot0, slot)                 # the sent sets keep no departed client
        rs_remove(self, &r.dgot1, slot)
    return 0


cdef int delta_link(Core self, _Pattern p, _Route r) except -1:
    """A pattern joins a route: its delta subscribers join the route's."""
    if p.drs.n == 0 or not r.dallow:
        return 0
    rs_union(self, &r.drs, &p.drs)      # drs is a subset of rs (subscribe adds to rs first, unsubscribe removes from drs first)
    return 0


cdef int delta_subscribed(Core self, _Pattern p, int slot, bint on) except -1:
    """After subscribe: the slot asked (or not) for deltas on this pattern."""
    if on and not self._delta_tokens:
        on = False
    if on:
        if not rs_add(self, &p.drs, slot):
            return 0
    elif not rs_remove(self, &p.drs, slot):
        return 0
    for subject in route_subjects(self, p):
        delta_route_bit(self, self._routes[subject], slot)
    return 0


cdef int delta_unsubscribed(Core self, _Pattern p, int slot) except -1:
    """Before the pattern's bit goes: the slot's opt-in goes, and its table
    (the client forgets its bases on unsubscribe)."""
    delta_forget(self, &self.clients[slot])
    if not rs_remove(self, &p.drs, slot):
        return 0
    for subject in route_subjects(self, p):
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
    d.dtime = m.dtime
    d.t = m.t
    d.refcnt = 1                                  # held by m (msg_free drops it)
    fo_atomic_inc(&_live_msgs)
    fo_atomic_add(&_live_msg_bytes, <Py_ssize_t>sizeof(Msg) + dlen)
    self.delta_made += 1
    self.delta_ns += mono_ns() - t0
    return d


cdef int delta_prepare(Core self, _Route r, Msg *m) except -1:
    """At publish, once per message: its delta when some subscriber of the
    subject may take one, the bitsets its deliveries read and write, and it
    becomes the subject's next base."""
    self._dclock += 1
    m.dtime = self._dclock
    if r.drs.n == 0:
        if r.dprev != NULL:
            msg_decref(r.dprev)       # nobody takes deltas here: keep no base
            r.dprev = NULL
        rs_free(self, &r.dgot0)
        rs_free(self, &r.dgot1)
        return 0
    r.dseq += 1
    # This message's set is the one of two messages ago: each recipient
    # leaves it when the message reaches it without being queued to it as a
    # delta subscriber, and joins it when it is (delta_deliver around
    # Core._deliver), so several messages of one subject in one publish_batch
    # (each client visited in message order) chain correctly.
    m.dbits = &r.drs
    if r.dseq & 1:
        m.dgot_cur = &r.dgot1
        m.dgot_prev = &r.dgot0
    else:
        m.dgot_cur = &r.dgot0
        m.dgot_prev = &r.dgot1
    if r.dprev != NULL:
        m.dprev_time = r.dprev.dtime
        m.delta = delta_make(self, r.dprev, m)
        msg_decref(r.dprev)
    m.refcnt += 1
    r.dprev = m
    return 0


# ---------------------------------------------------------------- per client

cdef int delta_deliver(Core self, int slot, Msg *m, bint catchup) except -1:
    """_deliver of a message with delta sets: the slot is in the message's
    "sent" set afterwards exactly when it was queued to it as a delta
    subscriber (delta_queue says so in ``_dqueued``); the set changes only
    when that differs from before (dropped, conflated, or new here)."""
    cdef bint had = rs_has(m.dgot_cur, slot)
    cdef int k
    self._dqueued = False
    self._dinner = True
    try:
        k = self._deliver(slot, m, catchup)
    finally:
        self._dinner = False
    if self._dqueued:
        if not had:
            rs_add(self, m.dgot_cur, slot)
    elif had:
        rs_remove(self, m.dgot_cur, slot)
    return k


cdef int delta_queue(Core self, Client *c, int slot, uint64_t seq, Msg *m, bint catchup) except -1:
    """Queue data frame ``seq``: the delta form of ``m`` when this client asked
    for deltas on its subject and was queued its base, else the full one."""
    cdef Msg *out = m
    cdef Py_ssize_t before = c.queued
    cdef int k
    if catchup or m.subject == 0:
        delta_forget(self, c)         # history: the client's bases move outside the sets
    elif m.dbits != NULL and rs_has(m.dbits, slot):
        if m.delta != NULL and c.dforget < m.dprev_time and rs_has(m.dgot_prev, slot):
            out = m.delta
        self._dqueued = True          # delta_deliver puts it in m.dgot_cur
    queue_data(self, c, seq, out)
    k = 1 if out != m else 0
    self.kind_bytes[k] += c.queued - before
    self.kind_frames[k] += 1
    return 0


cdef inline void delta_forget(Core self, Client *c) noexcept:
    """The client's next message of every subject is full: what it was
    queued before now no longer counts as its base."""
    c.dforget = self._dclock


cdef inline Py_ssize_t rs_nbytes(Core self, const RSet *s) noexcept:
    if s.bits != NULL:
        return self.nwords * sizeof(uint64_t)
    return s.cap * sizeof(uint32_t)


cdef dict delta_stats(Core self):
    cdef _Route r
    cdef Py_ssize_t bases = 0, base_bytes = 0, seen = 0
    for r in self._routes.values():
        if r.dprev != NULL:
            bases += 1
            base_bytes += r.dprev.tail_len
        seen += rs_nbytes(self, &r.dgot0) + rs_nbytes(self, &r.dgot1)
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
        "seen_bytes": seen,
    }
