# Delta messages (PROTOCOL 1.2): one Fossil delta per published message,
# computed once per subject, and the rule for who may get it.
# Part of fanout_core/_core.pyx (textually included: one extension module).
#
# The base rule. A subject (route) keeps its last published message
# (``dprev``, a reference: usually a message the replay rings hold anyway).
# At publish, when some subscriber of the subject asked for deltas (the
# route's ``dbits``), a message gets a second shared body: the delta from
# ``dprev``'s payload, framed as ``"delta":"..."`` in place of
# ``"data":...``, compressed once per window like any body. The route also
# keeps two bitsets over client slots (``dgot``, by the parity of its publish
# count): who was queued the previous message, and who is queued this one.
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
# Hot path: per delivery to a client that asked, two bit tests and a bit set
# in bitsets walked in slot order (the publish loops visit slots in order),
# no per-client table. Memory: per subject with delta subscribers, one
# message reference and 2 bits per client slot (2.5 KiB at 10,000 slots); the
# route cache bounds subjects (``max_routes``). Nothing per client.
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
    if r.dprev != NULL:
        msg_decref(r.dprev)
        r.dprev = NULL
    free(r.dbits)
    r.dbits = NULL
    free(r.dgot)
    r.dgot = NULL


cdef int delta_route_bit(Core self, _Route r, int slot) except -1:
    """Recompute the slot's bit of the route's opt-ins from its patterns."""
    cdef int w = slot >> 6
    cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
    cdef _Pattern q
    cdef bint on = False
    if r.dallow:
        for q in r.patterns:
            if q.dbits != NULL and (q.dbits[w] & mask) and rs_has(&q.rs, slot):
                on = True
                break
    if on:
        if r.dbits == NULL:
            r.dbits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
            if r.dbits == NULL:
                raise MemoryError()
        if not (r.dbits[w] & mask):
            r.dbits[w] |= mask
            delta_forget(self, &self.clients[slot])     # newly opted in here: start with full messages
    elif r.dbits != NULL and (r.dbits[w] & mask):
        r.dbits[w] &= ~mask
        delta_forget(self, &self.clients[slot])
    return 0


cdef int delta_link(Core self, _Pattern p, _Route r) except -1:
    """A pattern joins a route: its delta subscribers join the route's."""
    cdef int i, b
    cdef uint64_t word
    if p.dbits == NULL or not r.dallow:
        return 0
    if r.dbits == NULL:
        r.dbits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
        if r.dbits == NULL:
            raise MemoryError()
    for i in range(self.nwords):
        word = p.dbits[i]
        while word:
            b = __builtin_ctzll(word)
            word &= word - 1
            if rs_has(&p.rs, (i << 6) | b):
                r.dbits[i] |= (<uint64_t>1) << b
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
        if p.dbits[w] & mask:
            return 0
        p.dbits[w] |= mask
    elif p.dbits != NULL:
        if not (p.dbits[w] & mask):
            return 0
        p.dbits[w] &= ~mask
    else:
        return 0
    for subject in route_subjects(self, p):
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
    cdef int w, words = (self._next_slot + 63) >> 6
    cdef bint wanted = False
    self._dclock += 1
    m.dtime = self._dclock
    if r.dbits != NULL:
        for w in range(words):
            if r.dbits[w]:
                wanted = True
                break
    if not wanted:
        if r.dprev != NULL:
            msg_decref(r.dprev)       # nobody takes deltas here: keep no base
            r.dprev = NULL
        free(r.dgot)
        r.dgot = NULL
        return 0
    if r.dgot == NULL:
        r.dgot = <uint64_t *>calloc(2 * self.nwords, sizeof(uint64_t))
        if r.dgot == NULL:
            raise MemoryError()
    r.dseq += 1
    # This message's bitset is the one of two messages ago: each recipient's
    # bit is cleared when the message reaches it (delta_visit) and set once it
    # is queued (delta_queue), so several messages of one subject in one
    # publish_batch (each client visited in message order) chain correctly.
    m.dbits = r.dbits
    m.dgot_cur = r.dgot + (r.dseq & 1) * self.nwords
    m.dgot_prev = r.dgot + ((r.dseq + 1) & 1) * self.nwords
    if r.dprev != NULL:
        m.dprev_time = r.dprev.dtime
        m.delta = delta_make(self, r.dprev, m)
        msg_decref(r.dprev)
    m.refcnt += 1
    r.dprev = m
    return 0


# ---------------------------------------------------------------- per client

cdef inline void delta_visit(Client *c, int slot, Msg *m) noexcept:
    """A message reaches a recipient (first thing in _deliver): until it is
    queued, the client is not one that was sent it."""
    if m.dgot_cur != NULL:
        m.dgot_cur[slot >> 6] &= ~((<uint64_t>1) << (slot & 63))


cdef int delta_queue(Core self, Client *c, int slot, uint64_t seq, Msg *m, bint catchup) except -1:
    """Queue data frame ``seq``: the delta form of ``m`` when this client asked
    for deltas on its subject and was queued its base, else the full one."""
    cdef Msg *out = m
    cdef Py_ssize_t before = c.queued
    cdef int k, w = slot >> 6
    cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
    if catchup or m.subject == 0:
        delta_forget(self, c)         # history: the client's bases move outside the bitsets
    elif m.dbits != NULL and (m.dbits[w] & mask):
        if m.delta != NULL and (m.dgot_prev[w] & mask) and c.dforget < m.dprev_time:
            out = m.delta
        m.dgot_cur[w] |= mask
    queue_data(self, c, seq, out)
    k = 1 if out != m else 0
    self.kind_bytes[k] += c.queued - before
    self.kind_frames[k] += 1
    return 0


cdef inline void delta_forget(Core self, Client *c) noexcept:
    """The client's next message of every subject is full: what it was
    queued before now no longer counts as its base."""
    c.dforget = self._dclock


cdef dict delta_stats(Core self):
    cdef _Route r
    cdef Py_ssize_t bases = 0, base_bytes = 0, seen = 0
    for r in self._routes.values():
        if r.dprev != NULL:
            bases += 1
            base_bytes += r.dprev.tail_len
        if r.dgot != NULL:
            seen += 2 * self.nwords * sizeof(uint64_t)
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
