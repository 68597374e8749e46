# The flush: gather a client's queue into iovecs and sendmsg() it (runs on the flush threads).
# Part of fanout_core/_core.pyx (textually included: one extension module).

# ---------------------------------------------------------------- flush (C)
# Module-level and nogil: these run on the flush threads, and touch only the
# client they are given (its queue, arena, blocked/nodata flags), the shared
# read-only message bodies, and the caller's FlushAcc. See the module
# docstring for why that is safe.

cdef int gather(Client *c, iovec *iov, unsigned char (*scratch)[HEAD_MAX], Py_ssize_t *want) noexcept nogil:
    """Describe the next batch of queued bytes as iovecs (at most IOV_BATCH,
    one scratch head per data frame); returns the iovec count and sets
    ``want`` to their byte total. The same gather serves the socket write
    and :meth:`Core.take_dirty`, so tests see the bytes that really go out."""
    cdef int i = c.shead, k = 0, h = 0
    cdef Py_ssize_t skip = c.sdone, hl, total = 0
    cdef Seg *sg
    while i < c.nseg and k < IOV_BATCH - 1 and h < HEAD_SLOTS:
        sg = &c.segs[i]
        if sg.m == NULL:
            iov[k].iov_base = <void *>(c.arena + seg_off(sg) + skip)
            iov[k].iov_len = seg_len(c, sg) - skip
            k += 1
        else:
            hl = write_head(c, sg, scratch[h])
            if skip < hl:
                iov[k].iov_base = <void *>(scratch[h] + skip)
                iov[k].iov_len = hl - skip
                k += 1
                skip = 0
            else:
                skip -= hl
            h += 1
            iov[k].iov_base = <void *>(body_ptr(c, sg.m) + skip)
            iov[k].iov_len = body_len(c, sg.m) - skip
            k += 1
        total += seg_len(c, sg) - (c.sdone if i == c.shead else 0)
        skip = 0
        i += 1
    want[0] = total
    return k


cdef void advance(Client *c, Py_ssize_t n) noexcept nogil:
    """Account ``n`` bytes as written: whole segments leave the queue (and
    drop their message reference, atomically: other flush threads may drop
    references to the same message at the same time)."""
    cdef Py_ssize_t rem
    cdef Seg *sg
    c.queued -= n
    while n > 0:
        sg = &c.segs[c.shead]
        rem = seg_len(c, sg) - c.sdone
        if n >= rem:
            n -= rem
            if sg.m != NULL:
                msg_decref_shared(sg.m)
            c.shead += 1
            c.sdone = 0
        else:
            c.sdone += n
            n = 0


cdef void drained(Client *c) noexcept nogil:
    """The queue is empty (shead == nseg: no references left): reset it and
    free buffers grown past what an idle client keeps."""
    c.shead = c.nseg = 0
    c.sdone = 0
    c.alen = 0
    c.queued = 0
    if c.acap > KEEP_BUF:
        free(c.arena)
        c.arena = NULL
        c.acap = 0
    if c.segcap > KEEP_SEGS:
        free(c.segs)
        c.segs = NULL
        c.segcap = 0


cdef int send_some(Client *c, FlushAcc *acc) noexcept nogil:
    """Write what is queued for one client with sendmsg(): 0 drained, 1 blocked, -1 dead."""
    cdef iovec iov[IOV_BATCH]
    cdef unsigned char scratch[HEAD_SLOTS][HEAD_MAX]
    cdef msghdr mh
    cdef ssize_t n
    cdef Py_ssize_t want
    cdef int k, err
    while c.shead < c.nseg:
        k = gather(c, iov, scratch, &want)
        memset(&mh, 0, sizeof(mh))
        mh.msg_iov = iov
        mh.msg_iovlen = k
        n = c_sendmsg(c.fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL)
        acc.send_calls += 1
        if n < 0:
            err = errno          # errno is per thread
            if err == EINTR:
                continue
            if err == EAGAIN:
                c.blocked = 1
                acc.send_blocked += 1
                return 1
            c.nodata = 1
            return -1
        acc.bytes_sent += n
        advance(c, n)
        if n < want:
            # The kernel took less than offered: its buffer is full.
            c.blocked = 1
            acc.send_blocked += 1
            return 1
    drained(c)
    return 0


cdef void flush_job(void *arg, int tid) noexcept nogil:
    """One flush thread's share: take FLUSH_CHUNK work items at a time from
    the shared cursor until none is left (dynamic, so a thread that drew
    slow sockets does not hold the others up)."""
    cdef FlushJob *job = <FlushJob *>arg
    cdef int i, k, end
    cdef FlushAcc *acc = &job.acc[tid]
    while True:
        i = fo_fetch_add(&job.next, FLUSH_CHUNK)
        if i >= job.n:
            return
        end = i + FLUSH_CHUNK
        if end > job.n:
            end = job.n
        for k in range(i, end):
            job.res[k] = <signed char>send_some(&job.clients[job.work[k]], acc)
