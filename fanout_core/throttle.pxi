# The throttle and conflation policy: sampling, strikes and level raises, conflation.
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
                c.ring[idx] = m          # replay gives what was sent for that seq
                m.refcnt += 1
                msg_decref(old)
            msg_decref(old)
            return True
        i -= 1
    return False


cdef void count_drop(Core self, Client *c, int reason, int priority) noexcept:
    """Count a data message this client does not get (reason: DROP_*)."""
    c.dropped += 1
    self.drops_by[reason][priority] += 1


cdef int throttle_strike(Core self, int slot, Client *c) except -1:
    """After a live delivery: count it against the queue limit, raise the
    throttle level or mark the client slow."""
    if c.queued > self.queue_limit and c.queued > c.mark + self.queue_limit // 4:
        # Over the limit, and (after a level change) a quarter of the limit
        # past where the queue stood then: a client that drains after a
        # step down in rate is left to drain, one that keeps falling
        # behind goes on striking.
        c.strikes += 1
        if c.strikes >= self.slow_strikes:
            c.strikes = 0
            if self.throttle_enabled and c.level < self.max_level:
                c.level += 1
                c.credit = 0
                c.mark = c.queued
                self._raised.append(slot)
                self.level_raises += 1
            else:
                c.nodata = 1
                self._slow.append(slot)
                self.slow_marked += 1
    elif c.queued <= self.queue_limit:
        c.strikes = 0
        c.mark = 0
    return 0
