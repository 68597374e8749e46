# The throttle and conflation policy: sampling, windows of evidence and level raises,
# the hard cap, conflation.
# Part of fanout_core/_core.pyx (textually included: one extension module).

cdef bint throttle_sample(Core self, Client *c, int priority) noexcept:
    """Throttled delivery: True if this non-critical message goes out.

    Each non-critical message adds the level's percent to the client's
    budget; one that goes out spends 100. ``high`` goes out whenever the
    budget holds 100, ``medium`` only above 200 and ``low`` only above 300,
    i.e. on what higher priorities leave unused. So the client gets the
    level's percent of its non-critical messages (when there are enough),
    and the lowest priorities are the ones dropped."""
    cdef int pct = self.throttle_pct[c.level]
    c.credit += pct
    if c.credit > 400:
        c.credit = 400          # no bursts after a quiet spell
    if c.credit >= 100 + 100 * (2 - priority):
        c.credit -= 100
        return True
    return False


cdef bint conflate_replace(Core self, Client *c, Msg *m) noexcept:
    """Conflation: put ``m`` in place of an older queued version of its
    subject (not yet begun), keeping that frame's seq; True if done."""
    cdef int i, stop = c.shead + (1 if c.sdone > 0 else 0)
    cdef Seg *sg
    cdef Msg *old
    cdef Msg *prev
    cdef Py_ssize_t before
    cdef Py_ssize_t idx
    if c.nseg - stop > CONFLATE_SCAN:
        stop = c.nseg - CONFLATE_SCAN
    i = c.nseg - 1
    while i >= stop:
        sg = &c.segs[i]
        if sg.m != NULL and sg.m.subject == m.subject:
            old = sg.m
            before = seg_len(c, sg)
            sg.m = m
            m.refcnt += 1
            c.queued += seg_len(c, sg) - before
            idx = sg.v % self.replay_size
            if c.ring != NULL and c.ring[idx] != NULL and (c.ring[idx] == old or c.ring[idx].delta == old):
                # The ring holds the full message (the queue may hold its
                # delta): drop the ring's reference to what the ring held.
                prev = c.ring[idx]
                c.ring[idx] = m          # replay gives what was sent for that seq
                m.refcnt += 1
                msg_decref(prev)
            msg_decref(old)
            return True
        i -= 1
    return False


cdef void count_drop(Core self, Client *c, int reason, int priority) noexcept:
    """Count a data message this client does not get (reason: DROP_*)."""
    c.dropped += 1
    self.drops_by[reason][priority] += 1


cdef extern from "sys/ioctl.h" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long TIOCOUTQ                  # = SIOCOUTQ: bytes in a socket's send queue


cdef Py_ssize_t throttle_backlog(Client *c) noexcept:
    """What the client has yet to read: its queue here and its socket's send
    queue in the kernel (one ioctl, at a window's start and end only). The
    kernel part moves as the reader reads, byte by byte, where the queue here
    moves only when the socket takes the next chunk: the sum shows the
    reader's real rate within a window."""
    cdef int outq = 0
    if c.fd >= 0 and ioctl(c.fd, TIOCOUTQ, &outq) != 0:
        outq = 0
    return c.queued + outq


cdef inline double throttle_now(Core self, Msg *m) noexcept:
    """The policy's clock: the time the message entered the core (one
    clock_gettime per message, already taken), or the fixed test clock."""
    return self.clock if self.fixed_clock else m.t


cdef inline int throttle_check(Core self, int slot, Client *c, Msg *m) except -1:
    """After a live delivery (see throttle_over). The common case, a queue
    under its limit with no window open, reads only the client's first cache
    line."""
    if c.queued <= self.queue_limit:
        c.over = 0
        return 0
    return throttle_over(self, slot, c, throttle_now(self, m))


cdef int throttle_over(Core self, int slot, Client *c, double now) except -1:
    """After a live delivery: the queue limit, the window of evidence, the hard cap.

    A client is behind while its queue holds more than ``queue_limit``. From
    the first message over it, evidence is gathered in windows: a window
    lasts ``raise_seconds`` (``grace_seconds`` at the heaviest level, or with
    throttling off) and at least ``slow_strikes`` messages over the limit.
    At its end the client is judged by its backlog's trend (its queue here
    plus its socket's send queue, throttle_backlog): if the backlog is below
    the window's reference (the backlog when the window began), it drains at
    its level and a new window starts; if not, it goes up one level (a new
    window), or at the heaviest level it is marked slow (1008). A queue back under the limit
    ends the window. A stopped reader is thus closed about
    ``max_level * raise_seconds + grace_seconds`` after it passed the limit.
    A queue past ``hard_limit`` is closed at once (see _deliver: non-critical
    data stops at half of it)."""
    if c.queued > self.hard_limit:
        throttle_mark_slow(self, slot, c)
        return 0
    if not c.over:
        throttle_window(c, now, throttle_backlog(c))
    c.strikes += 1
    return throttle_judge(self, slot, c, now, True)


cdef inline void throttle_window(Client *c, double now, Py_ssize_t ref) noexcept:
    """Start a window of evidence, ``ref`` its reference backlog."""
    c.over = 1
    c.since = now
    c.mark = ref
    c.strikes = 0


cdef int throttle_judge(Core self, int slot, Client *c, double now, bint live) except -1:
    """The end of a window (see throttle_check). A window needs its time and
    ``slow_strikes`` messages; from the periodic sweep (``live`` false) a
    window that lasted ``slow_strikes`` times its time without them ends
    anyway: a reader whose stream went quiet is judged by time alone."""
    cdef bint top = not self.throttle_enabled or c.level >= self.max_level
    cdef double hold = self.grace_seconds if top else self.raise_seconds
    if now - c.since < hold:
        return 0
    if c.strikes < self.slow_strikes and (live or now - c.since < hold * self.slow_strikes):
        return 0
    cdef Py_ssize_t backlog = throttle_backlog(c)
    if backlog < c.mark or (c.level and c.queued - conflated_bytes(c) <= self.queue_limit):
        # Draining at this level; or (throttled, so conflating) over the limit
        # only by conflated state, one newest version per subject replaced in
        # place: not behind.
        throttle_window(c, now, backlog)
    elif not top:
        c.level += 1
        c.credit = 0
        throttle_window(c, now, backlog)
        self._raised.append(slot)
        self.level_raises += 1
    else:
        throttle_mark_slow(self, slot, c)
    return 0


cdef Py_ssize_t conflated_bytes(Client *c) noexcept:
    """Bytes of the queued data frames of conflated subjects (not yet begun).
    A scan of the queue, once per window end of a client over its limit."""
    cdef int i
    cdef Py_ssize_t n = 0
    for i in range(c.shead + (1 if c.sdone > 0 else 0), c.nseg):
        if c.segs[i].m != NULL and c.segs[i].m.conflate:
            n += seg_len(c, &c.segs[i])
    return n


cdef int throttle_mark_slow(Core self, int slot, Client *c) except -1:
    """No more data for this client; the caller closes it (take_slow)."""
    if c.nodata:
        return 0
    c.nodata = 1
    c.over = 0
    self._slow.append(slot)
    self.slow_marked += 1
    return 0


cdef int throttle_sweep(Core self, double now) except -1:
    """Judge every client over its limit on the queue as it is now, so a
    reader whose stream went quiet (or that gets only control replies) is
    still raised, or closed, in time."""
    cdef int s
    cdef Client *c
    for s in range(self._next_slot):
        c = &self.clients[s]
        if not c.active or c.nodata:
            continue
        if c.queued <= self.queue_limit:
            c.over = 0
            continue
        if not c.over:
            throttle_window(c, now, throttle_backlog(c))   # over by control replies alone, say
        else:
            throttle_judge(self, s, c, now, False)
    return 0
