# cython: language_level=3
"""The fan-out hot path: subscriptions as bitsets, match-and-enqueue, replay rings.

One published message in, a framed copy (with the client's own ``seq``) queued
for every subscribed client out, in one C loop: no Python object or call per
client. Clients are dense integer slots; each has an output queue (a byte
buffer), a ``seq`` counter and a ring of the last ``replay_size`` messages it
was sent. Messages are stored once and shared by reference count between the
rings that hold them, so replay rebuilds a frame byte for byte as first sent.

The only I/O here is :meth:`Core.flush`: a non-blocking ``sendmsg()`` per
client with queued bytes, so that every frame queued for a client since the
last flush leaves in one syscall. It never blocks; a client whose socket is
full is reported back so the caller can wait for it to become writable.

Parallel flush (``flush_threads`` > 1, WS_FLUSH_THREADS). The kernel's send
is most of the cost, so the flush runs on several threads with the GIL
released: the calling (event loop) thread and ``flush_threads - 1`` parked
pthreads (started on first use). Why that is safe:

- Exclusive clients. Before any thread starts, the caller alone turns the
  dirty list into a work list with each slot at most once (a slot's dirty
  flag is cleared at its first listing). Threads take disjoint chunks of
  that list through one atomic cursor, so each client's state (queue, arena,
  ``blocked``/``nodata``) is touched by exactly one thread during a flush.
- Nothing else runs. ``flush()`` returns only after every thread finished the
  job (a mutex/condition hand-off at both ends, which also orders all memory
  writes before and after). Meanwhile the calling thread is inside
  ``flush()``, and every other entry point raises RuntimeError while
  ``flushing`` is set, so no Python code (another thread included) reads or
  changes per-client core state mid-flush.
- Shared data is read-only, except reference counts. Message bodies (tail,
  compressed tails) are written before they are queued and only read by the
  flush. A message is shared by many clients' queues, so threads may drop
  references to it at once: that decrement is atomic (``msg_decref_shared``)
  and exactly one thread sees zero and frees it (free() is thread-safe).
  References are only added on the loop thread, between flushes.
- Counters. Each thread adds to its own cache-line-sized FlushAcc; the caller
  sums them after the join. Results (drained/blocked/dead) go to a per-item
  array written only by the item's thread and read after the join, so the
  blocked and dead lists come back in dirty-list order, as with one thread.

Small flushes (fewer than ``parallel_min`` clients) run on the caller with the
GIL held: waking threads costs more than it saves there. Limits: workers are
not restarted in a forked child (the child flushes on one thread); the pool
uses plain pthreads (no OpenMP, no extra build flags).

Limits: a client's queue grows past ``queue_limit`` only for ``slow_strikes``
consecutive messages; then the client stops getting data and is reported by
:meth:`Core.take_slow` (the caller closes it with 1008, or later throttles it).
"""

from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memmove, memset
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint64_t, uint32_t, uint8_t
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
import heapq
import zlib

cdef extern from "sys/socket.h" nogil:
    cdef struct msghdr:
        void *msg_name
        int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t c_sendmsg "sendmsg" (int fd, const msghdr *msg, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil

cdef extern from "time.h" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *tp)
    int CLOCK_MONOTONIC


# The flush thread pool, in plain C (pthreads; no OpenMP, no build flags):
# ``n`` workers parked on a condition variable. fo_pool_run() hands all of
# them one job (a function and its argument), runs the same function as
# thread 0 on the caller, then waits until every worker finished it. The
# mutex hand-offs at start and end order everything the caller wrote before
# a run before the workers' reads, and everything they wrote before the
# caller's return (happens-before through pthread_mutex).
cdef extern from *:
    """
    #include <pthread.h>
    #include <signal.h>
    #include <stdlib.h>
    #include <unistd.h>

    typedef void (*fo_job_fn)(void *, int);

    typedef struct fo_pool {
        pthread_mutex_t mu;
        pthread_cond_t go, done;
        unsigned long gen;      /* job number; a worker runs each once */
        int running;            /* workers still on the current job */
        int stop;
        int n;                  /* workers started */
        fo_job_fn fn;
        void *arg;
        pid_t pid;              /* the process that started them */
        pthread_t *tids;
        struct fo_worker *ws;
    } fo_pool;

    typedef struct fo_worker { fo_pool *p; int id; } fo_worker;

    static void *fo_worker_main(void *a) {
        fo_worker *w = (fo_worker *)a;
        fo_pool *p = w->p;
        unsigned long seen = 0;   /* workers start before the first job (gen 0) */
        pthread_mutex_lock(&p->mu);
        for (;;) {
            while (p->gen == seen && !p->stop)
                pthread_cond_wait(&p->go, &p->mu);
            if (p->stop)
                break;
            seen = p->gen;
            fo_job_fn fn = p->fn;
            void *arg = p->arg;
            pthread_mutex_unlock(&p->mu);
            fn(arg, w->id);
            pthread_mutex_lock(&p->mu);
            if (--p->running == 0)
                pthread_cond_signal(&p->done);
        }
        pthread_mutex_unlock(&p->mu);
        return NULL;
    }

    static void fo_pool_free(fo_pool *p) {
        int i;
        if (p == NULL)
            return;
        pthread_mutex_lock(&p->mu);
        p->stop = 1;
        pthread_cond_broadcast(&p->go);
        pthread_mutex_unlock(&p->mu);
        for (i = 0; i < p->n; i++)
            pthread_join(p->tids[i], NULL);
        pthread_cond_destroy(&p->go);
        pthread_cond_destroy(&p->done);
        pthread_mutex_destroy(&p->mu);
        free(p->tids);
        free(p->ws);
        free(p);
    }

    /* Up to n workers; NULL when none could start (the caller then flushes alone). */
    static fo_pool *fo_pool_new(int n) {
        int i;
        sigset_t all, old;
        pthread_attr_t attr;
        fo_pool *p = (fo_pool *)calloc(1, sizeof(fo_pool));
        if (p == NULL || n < 1)
            return (free(p), (fo_pool *)NULL);
        p->tids = (pthread_t *)calloc(n, sizeof(pthread_t));
        p->ws = (fo_worker *)calloc(n, sizeof(fo_worker));
        if (p->tids == NULL || p->ws == NULL) {
            free(p->tids); free(p->ws); free(p);
            return NULL;
        }
        pthread_mutex_init(&p->mu, NULL);
        pthread_cond_init(&p->go, NULL);
        pthread_cond_init(&p->done, NULL);
        p->pid = getpid();
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);   /* send_some needs ~21 KiB */
        /* Workers block every signal: Python's handlers run on the main thread. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (i = 0; i < n; i++) {
            p->ws[i].p = p;
            p->ws[i].id = i + 1;
            if (pthread_create(&p->tids[i], &attr, fo_worker_main, &p->ws[i]) != 0)
                break;
            p->n++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
        if (p->n == 0) {
            fo_pool_free(p);
            return NULL;
        }
        return p;
    }

    static int fo_pool_size(fo_pool *p) { return p->n; }
    static int fo_pool_owned(fo_pool *p) { return p->pid == getpid(); }

    /* Run fn(arg, 1..n) on the workers and fn(arg, 0) here; return when all are done. */
    static void fo_pool_run(fo_pool *p, fo_job_fn fn, void *arg) {
        pthread_mutex_lock(&p->mu);
        p->fn = fn;
        p->arg = arg;
        p->running = p->n;
        p->gen++;
        pthread_cond_broadcast(&p->go);
        pthread_mutex_unlock(&p->mu);
        fn(arg, 0);
        pthread_mutex_lock(&p->mu);
        while (p->running > 0)
            pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }

    static inline Py_ssize_t fo_atomic_dec(Py_ssize_t *v) {
        return __atomic_sub_fetch(v, 1, __ATOMIC_ACQ_REL);
    }
    static inline Py_ssize_t fo_atomic_inc(Py_ssize_t *v) {
        return __atomic_add_fetch(v, 1, __ATOMIC_RELAXED);
    }
    static inline int fo_fetch_add(int *v, int d) {
        return __atomic_fetch_add(v, d, __ATOMIC_RELAXED);
    }
    """
    ctypedef struct fo_pool:
        pass
    ctypedef void (*fo_job_fn)(void *, int) noexcept nogil
    fo_pool *fo_pool_new(int n) nogil
    void fo_pool_free(fo_pool *p) nogil
    int fo_pool_size(fo_pool *p) nogil
    int fo_pool_owned(fo_pool *p) nogil
    void fo_pool_run(fo_pool *p, fo_job_fn fn, void *arg) nogil
    Py_ssize_t fo_atomic_dec(Py_ssize_t *v) nogil
    Py_ssize_t fo_atomic_inc(Py_ssize_t *v) nogil
    int fo_fetch_add(int *v, int d) nogil


cdef inline double mono_now() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9

cdef enum:
    OP_TEXT = 0x81            # FIN + text
    OP_TEXT_DEFLATE = 0xC1    # FIN + RSV1 + text
    MIN_ARENA = 512
    MIN_SEGS = 16
    KEEP_BUF = 8192           # drained arenas above this are freed (idle memory)
    KEEP_SEGS = 256
    LEN_MASK = 0x7FFFFFFF
    HEAD_SLOTS = 256          # IOV_BATCH / 2: one head per data frame in a sendmsg
    IOV_BATCH = 512           # iovecs per sendmsg (Linux allows 1024)
    BATCH = 64                # messages matched together by publish_batch
    PRIORITY_CRITICAL = 3     # never dropped by throttling
    CONFLATE_SCAN = 1024      # queued frames searched for an older version of a subject
    DROP_THROTTLED = 0        # drops_by rows
    DROP_CONFLATED = 1
    FLUSH_CHUNK = 32          # work items a flush thread takes at a time
    PARALLEL_MIN = 64         # default: flushes of fewer clients run on the caller alone



# Messages alive (made by msg_new, not yet freed): a leak or double-free
# check for tests (live_messages()). Changed atomically: flush threads free.
cdef Py_ssize_t _live_msgs = 0


def live_messages():
    """Messages allocated and not yet freed, across all cores (tests: 0 once
    every core is gone means no reference was lost or dropped twice)."""
    return _live_msgs


cdef inline void msg_free(Msg *m) noexcept nogil:
    cdef int i
    free(m.tail)
    for i in range(MAX_WBITS_SLOTS):
        if m.ztail[i] != NULL:
            free(m.ztail[i])
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
    return m


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


cdef class _Pattern:
    def __dealloc__(self):
        free(self.bits)


cdef class _Route:
    def __dealloc__(self):
        free(self.bits)


cdef bint _match(list ptoks, list stoks):
    cdef Py_ssize_t i, np = len(ptoks), ns = len(stoks)
    for i in range(np):
        t = ptoks[i]
        if t == ">":
            return ns > i
        if i >= ns:
            return False
        if t != "*" and t != stoks[i]:
            return False
    return np == ns


cdef class Core:
    """See the module docstring. Not thread-safe: one event loop owns it (its
    flush uses threads of its own, see "Parallel flush" there)."""

    def __cinit__(self, int capacity, int replay_size=100, Py_ssize_t queue_limit=262144,
                  int slow_strikes=3, int max_routes=65536, int compress_level=6,
                  throttle_percents=(100, 75, 50, 25), bint throttle=False, int max_level=3,
                  conflate=(), int flush_threads=1, int parallel_min=PARALLEL_MIN):
        if capacity < 1 or replay_size < 1 or queue_limit < 1 or slow_strikes < 1:
            raise ValueError("capacity, replay_size, queue_limit and slow_strikes must be >= 1")
        if not 1 <= flush_threads <= MAX_FLUSH_THREADS or parallel_min < 1:
            raise ValueError(f"flush_threads must be 1..{MAX_FLUSH_THREADS} and parallel_min >= 1")
        self.flush_threads = flush_threads
        self.parallel_min = parallel_min
        self._pool = NULL
        self._fepoch = 1
        self._work = <int *>malloc(capacity * sizeof(int))
        self._res = <signed char *>malloc(capacity)
        if self._work == NULL or self._res == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.replay_size = replay_size
        self.queue_limit = queue_limit
        self.slow_strikes = slow_strikes
        self.max_routes = max_routes
        self.zlevel = compress_level
        self.nwords = (capacity + 63) // 64
        self.clients = <Client *>calloc(capacity, sizeof(Client))
        self.dirty = <int *>malloc(capacity * sizeof(int))
        if self.clients == NULL or self.dirty == NULL:
            raise MemoryError()
        self.ndirty = 0
        self._free = []
        self._next_slot = 0
        self._subs = [None] * capacity
        self._patterns = {}
        self._wild = {}
        self._routes = {}
        self._slow = []
        self._zc = [None] * MAX_WBITS_SLOTS
        for i in range(MAX_WBITS_SLOTS):
            self.wbits_count[i] = 0
        pct = list(throttle_percents)
        if len(pct) != 4:
            raise ValueError("throttle_percents needs 4 values")
        for i in range(4):
            self.throttle_pct[i] = int(pct[i])
        if not 1 <= max_level <= 3:
            raise ValueError("max_level must be 1..3")
        self.throttle_enabled = throttle
        self.max_level = max_level
        self._conflate_tokens = [str(p).split(".") for p in conflate]
        self._route_ids = 0
        self._raised = []

    def __dealloc__(self):
        cdef int s
        if self.clients != NULL:
            for s in range(self._next_slot):
                self._release(s)
            free(self.clients)
        free(self.dirty)
        free(self._work)
        free(self._res)
        if self._pool != NULL and fo_pool_owned(<fo_pool *>self._pool):
            fo_pool_free(<fo_pool *>self._pool)    # parked workers: stop and join them

    # ------------------------------------------------------------------ clients
    def add_client(self, int fd, int wbits=0):
        """Take a free slot for a connected socket; returns the slot.

        ``wbits`` is the permessage-deflate window the client allows the server
        (9..15), or 0 for no compression. Raises OverflowError when full.
        """
        self._idle()
        cdef int slot
        cdef uint8_t was_dirty
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._next_slot < self.capacity:
            slot = self._next_slot
            self._next_slot += 1
        else:
            raise OverflowError("no free client slot")
        cdef Client *c = &self.clients[slot]
        was_dirty = c.dirty       # the slot may still be listed for this turn's flush
        memset(c, 0, sizeof(Client))
        c.dirty = was_dirty
        c.fd = fd
        c.active = 1
        if 9 <= wbits <= 15:
            c.wbits = <uint8_t>wbits
            self.wbits_count[wbits] += 1
        self._subs[slot] = set()
        self.clients_active += 1
        return slot

    def remove_client(self, int slot):
        """Forget a client: its subscriptions, queue and ring. The slot is reused."""
        self._check(slot)
        for pattern in list(self._subs[slot]):
            self.unsubscribe(slot, pattern)
        self._release(slot)
        self._subs[slot] = None
        self.clients_active -= 1
        heapq.heappush(self._free, slot)

    cdef void _release(self, int slot) noexcept:
        cdef Client *c = &self.clients[slot]
        cdef int i
        if not c.active:
            return
        if c.ring != NULL:
            for i in range(self.replay_size):
                if c.ring[i] != NULL:
                    msg_decref(c.ring[i])
            free(c.ring)
            c.ring = NULL
        self._clear_queue(c)
        free(c.arena)
        free(c.segs)
        c.arena = NULL
        c.segs = NULL
        c.acap = c.segcap = 0
        if c.wbits:
            self.wbits_count[c.wbits] -= 1
        c.active = 0

    cdef Client *_check(self, int slot) except NULL:
        self._idle()
        if slot < 0 or slot >= self.capacity or not self.clients[slot].active:
            raise KeyError(f"no client in slot {slot}")
        return &self.clients[slot]

    def seq(self, int slot):
        """The last data ``seq`` sent to this client (0 before the first)."""
        return self._check(slot).seq

    def queued(self, int slot):
        """Bytes queued for this client and not yet written."""
        return self._check(slot).queued

    def blocked(self, int slot):
        return bool(self._check(slot).blocked)

    def set_nodata(self, int slot):
        """Send this client no more data frames (it is closing)."""
        self._check(slot).nodata = 1

    def set_level(self, int slot, int level):
        """Throttle level 0..3 (delivery percent from ``throttle_percents``)."""
        if not 0 <= level <= 3:
            raise ValueError("level must be 0..3")
        cdef Client *c = self._check(slot)
        c.level = <uint8_t>level
        c.credit = 0
        c.strikes = 0
        c.mark = c.queued if level else 0

    def level(self, int slot):
        return self._check(slot).level

    def take_raised(self):
        """Slots whose throttle level the core raised (one step each) since the
        last call, in order; a slot may appear more than once."""
        out, self._raised = self._raised, []
        return out

    def take_dropped(self, int slot):
        """Data messages this client did not get since the last call (throttled or conflated)."""
        cdef Client *c = self._check(slot)
        cdef uint32_t n = c.dropped
        c.dropped = 0
        return n

    def drops(self):
        """Drop counts: ``{("throttled"|"conflated", priority): n}``."""
        out = {}
        for i, reason in enumerate(("throttled", "conflated")):
            for p in range(4):
                out[(reason, p)] = self.drops_by[i][p]
        return out

    def lag_histogram(self, byte_bounds, age_bounds):
        """Per-client lag, bucketed: how many clients have at most each bound of
        queued bytes, and of age (seconds) of their oldest queued data frame
        (cumulative counts, last = all clients), and the two sums. One pass in C
        over the slots."""
        self._idle()
        cdef int nb = len(byte_bounds), na = len(age_bounds), s, i, j
        cdef Client *c
        cdef double now = mono_now(), age
        cdef Seg *sg
        qb = [0] * (nb + 1)
        ab = [0] * (na + 1)
        cdef double qsum = 0.0, asum = 0.0
        cdef list bb = [float(x) for x in byte_bounds], gb = [float(x) for x in age_bounds]
        for s in range(self._next_slot):
            c = &self.clients[s]
            if not c.active:
                continue
            age = 0.0
            for j in range(c.shead, c.nseg):
                sg = &c.segs[j]
                if sg.m != NULL:
                    age = now - sg.m.t
                    break
            qsum += c.queued
            asum += age
            for i in range(nb):
                if c.queued <= bb[i]:
                    qb[i] += 1
            qb[nb] += 1
            for i in range(na):
                if age <= gb[i]:
                    ab[i] += 1
            ab[na] += 1
        return qb, ab, qsum, asum

    def take_slow(self):
        """Slots that stayed over the queue limit for ``slow_strikes`` messages.

        They get no more data; the caller decides what to do (close with 1008).
        """
        out, self._slow = self._slow, []
        return out

    # ------------------------------------------------------------ subscriptions
    def subscribe(self, int slot, str pattern):
        """Add a (valid) pattern for a client; False if it already had it."""
        self._check(slot)
        cdef set subs = self._subs[slot]
        if pattern in subs:
            return False
        cdef _Pattern p = self._patterns.get(pattern)
        if p is None:
            p = self._new_pattern(pattern)
        subs.add(pattern)
        cdef int w = slot >> 6
        cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
        cdef _Route r
        p.bits[w] |= mask
        p.count += 1
        for subject in p.routes:
            r = self._routes[subject]
            r.bits[w] |= mask
        return True

    def unsubscribe(self, int slot, str pattern):
        """Remove a pattern from a client; False if it did not have it."""
        self._check(slot)
        cdef set subs = self._subs[slot]
        if pattern not in subs:
            return False
        subs.discard(pattern)
        cdef _Pattern p = self._patterns[pattern]
        cdef _Pattern q
        cdef _Route r
        cdef int w = slot >> 6
        cdef uint64_t mask = (<uint64_t>1) << (slot & 63)
        cdef bint still
        p.bits[w] &= ~mask
        p.count -= 1
        for subject in p.routes:
            r = self._routes[subject]
            still = False
            for q in r.patterns:
                if q is not p and (q.bits[w] & mask):
                    still = True
                    break
            if not still:
                r.bits[w] &= ~mask
        if p.count == 0:
            for subject in p.routes:
                r = self._routes[subject]
                r.patterns.remove(p)
            del self._patterns[pattern]
            self._wild.pop(pattern, None)
        return True

    def subscriptions(self, int slot):
        self._check(slot)
        return frozenset(self._subs[slot])

    @property
    def pattern_count(self):
        return len(self._patterns)

    @property
    def route_count(self):
        return len(self._routes)

    cdef _Pattern _new_pattern(self, str text):
        cdef _Pattern p = _Pattern()
        cdef _Route r
        p.text = text
        p.tokens = text.split(".")
        p.wild = "*" in p.tokens or ">" in p.tokens
        p.bits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
        if p.bits == NULL:
            raise MemoryError()
        p.count = 0
        p.routes = set()
        self._patterns[text] = p
        if p.wild:
            self._wild[text] = p
            for subject, r in self._routes.items():
                if _match(p.tokens, r.tokens):
                    self._link(p, subject, r)
        else:
            r = self._routes.get(text)
            if r is not None:
                self._link(p, text, r)
        return p

    cdef int _link(self, _Pattern p, str subject, _Route r) except -1:
        cdef int i
        r.patterns.append(p)
        p.routes.add(subject)
        if r.bits == NULL:
            r.bits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
            if r.bits == NULL:
                raise MemoryError()
        for i in range(self.nwords):
            r.bits[i] |= p.bits[i]
        return 0

    cdef _Route _route(self, str subject):
        cdef _Route r = self._routes.get(subject)
        cdef _Pattern p
        if r is not None:
            return r
        self.route_misses += 1
        if len(self._routes) >= self.max_routes:
            # The cache is a cache: drop it whole rather than track recency.
            for p in self._patterns.values():
                p.routes.clear()
            self._routes.clear()
        r = _Route()
        r.tokens = subject.split(".")
        r.patterns = []
        r.bits = NULL
        self._route_ids += 1
        r.id = self._route_ids
        r.conflate = False
        for ptoks in self._conflate_tokens:
            if _match(ptoks, r.tokens):
                r.conflate = True
                break
        self._routes[subject] = r
        p = self._patterns.get(subject)
        if p is not None and not p.wild:
            self._link(p, subject, r)
        for p in self._wild.values():
            if _match(p.tokens, r.tokens):
                self._link(p, subject, r)
        return r

    def recipients(self, str subject):
        """Slots that a message on ``subject`` would reach (tests, debugging)."""
        cdef _Route r = self._route(subject)
        cdef int w, b
        cdef uint64_t word
        out = []
        if r.bits == NULL:
            return out
        for w in range(self.nwords):
            word = r.bits[w]
            while word:
                b = __builtin_ctzll(word)
                word &= word - 1
                out.append(w * 64 + b)
        return out

    # ---------------------------------------------------------------- publish
    def publish(self, str subject, bytes tail, int priority=2):
        """Queue one data message for every client subscribed to ``subject``.

        ``tail`` is the shared rest of the JSON object after the per-client
        ``{"seq":N,`` prefix, e.g. ``b'"type":"message",...,"data":{...}}'``.
        Returns the number of clients it was queued for.
        """
        self._idle()
        cdef _Route r = self._route(subject)
        self.published += 1
        if r.bits == NULL:
            return 0
        cdef Msg *m = msg_new(tail, priority)
        m.subject = r.id
        m.conflate = r.conflate
        cdef int w, b, words = (self._next_slot + 63) >> 6
        cdef uint64_t word
        cdef int count = 0
        cdef uint64_t *bits = r.bits
        try:
            for w in range(words):
                word = bits[w]
                while word:
                    b = __builtin_ctzll(word)
                    word &= word - 1
                    count += self._deliver((w << 6) | b, m)
        finally:
            msg_decref(m)
        return count

    def publish_batch(self, list subjects, list tails, list priorities):
        """Publish several messages at once, in order: same result as calling
        :meth:`publish` for each, but client-major: each subscriber's state is
        touched once for all the messages it gets from the batch, not once per
        message (the difference is cache misses, i.e. most of the cost).
        Returns the number of frames queued."""
        self._idle()
        cdef Py_ssize_t n = len(subjects), start, j, k
        cdef Msg *msgs[BATCH]
        cdef uint64_t *bits[BATCH]
        cdef int w, b, slot, words = (self._next_slot + 63) >> 6
        cdef uint64_t word, mask
        cdef int count = 0
        cdef _Route r
        if len(tails) != n or len(priorities) != n:
            raise ValueError("subjects, tails and priorities differ in length")
        start = 0
        while start < n:
            k = 0
            try:
                for j in range(start, min(n, start + BATCH)):
                    r = self._route(subjects[j])
                    self.published += 1
                    if r.bits == NULL:
                        continue
                    bits[k] = r.bits
                    msgs[k] = msg_new(tails[j], priorities[j])
                    msgs[k].subject = r.id
                    msgs[k].conflate = r.conflate
                    k += 1
                for w in range(words):
                    word = 0
                    for j in range(k):
                        word |= bits[j][w]
                    while word:
                        b = __builtin_ctzll(word)
                        word &= word - 1
                        mask = (<uint64_t>1) << b
                        slot = (w << 6) | b
                        for j in range(k):
                            if bits[j][w] & mask:
                                count += self._deliver(slot, msgs[j])
            finally:
                for j in range(k):
                    msg_decref(msgs[j])
            start += BATCH
        return count

    def deliver(self, int slot, bytes tail, int priority=2, bint catchup=False):
        """Queue one data message for one client (resume/snapshot history).
        Returns 1 if queued, 0 if the client takes no data or throttling
        dropped it.

        ``catchup``: the message is history the caller paces by the client's
        socket (it only adds more once the queue drained below its mark), so
        it is never dropped by throttling and never counts as slowness."""
        self._check(slot)
        cdef Msg *m = msg_new(tail, priority)
        try:
            return self._deliver(slot, m, catchup)
        finally:
            msg_decref(m)

    cdef bint _sample(self, Client *c, int priority) noexcept:
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

    cdef bint _replace(self, Client *c, Msg *m) noexcept:
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
                if c.ring != NULL and c.ring[idx] == old:
                    c.ring[idx] = m          # replay gives what was sent for that seq
                    m.refcnt += 1
                    msg_decref(old)
                msg_decref(old)
                return True
            i -= 1
        return False

    cdef int _deliver(self, int slot, Msg *m, bint catchup=False) except -1:
        cdef Client *c = &self.clients[slot]
        if c.nodata or not c.active:
            return 0
        if self.shed_low and m.priority == 0 and not catchup:
            self._drop(c, DROP_THROTTLED, 0)
            return 0
        if c.level and m.priority < PRIORITY_CRITICAL and not catchup:
            if m.conflate:
                # Latest value per subject: never sampled away (it may be the
                # newest), but it replaces an older version still queued.
                if c.wbits and m.ztail[c.wbits] == NULL:
                    self._compress(m, c.wbits)
                if self._replace(c, m):
                    self._drop(c, DROP_CONFLATED, m.priority)
                    self._mark_dirty(slot, c)
                    return 1
            elif not self._sample(c, m.priority):
                # A dropped message takes no seq: the client sees no false gap.
                self._drop(c, DROP_THROTTLED, m.priority)
                return 0
        if c.ring == NULL:
            c.ring = <Msg **>calloc(self.replay_size, sizeof(Msg *))
            if c.ring == NULL:
                raise MemoryError()
        c.seq += 1
        cdef Py_ssize_t idx = c.seq % self.replay_size
        if c.ring[idx] != NULL:
            msg_decref(c.ring[idx])
        c.ring[idx] = m
        m.refcnt += 1
        self._queue_data(c, c.seq, m)
        self.deliveries += 1
        if not catchup:
            self._strike(slot, c)
        self._mark_dirty(slot, c)
        return 1

    cdef void _drop(self, Client *c, int reason, int priority) noexcept:
        """Count a data message this client does not get (reason: DROP_*)."""
        c.dropped += 1
        self.drops_by[reason][priority] += 1

    @property
    def throttled_drops(self):
        """Messages not sent to throttled clients (load shedding included)."""
        return sum(self.drops_by[DROP_THROTTLED][p] for p in range(4))

    @property
    def conflated_drops(self):
        """Queued messages replaced by a newer one of their subject."""
        return sum(self.drops_by[DROP_CONFLATED][p] for p in range(4))

    cdef int _strike(self, int slot, Client *c) except -1:
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

    cdef int _compress(self, Msg *m, int wbits) except -1:
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

    cdef int _queue_data(self, Client *c, uint64_t seq, Msg *m) except -1:
        """Queue data frame ``seq`` carrying message ``m`` (a reference, no copy)."""
        cdef Seg *sg
        cdef Py_ssize_t n
        if c.wbits and m.ztail[c.wbits] == NULL:
            self._compress(m, c.wbits)
        self._grow_segs(c)
        sg = &c.segs[c.nseg]
        sg.m = m
        sg.v = seq
        m.refcnt += 1
        c.nseg += 1
        n = seg_len(c, sg)
        c.queued += n
        self.bytes_queued += n
        return 0

    # ------------------------------------------------------------------ queue
    cdef int _grow_segs(self, Client *c) except -1:
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

    cdef char *_inline(self, Client *c, Py_ssize_t n, bint boundary) except NULL:
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
        self._grow_segs(c)
        sg = &c.segs[c.nseg]
        sg.m = NULL
        sg.v = (<uint64_t>c.alen) | ((<uint64_t>n) << 32) | ((<uint64_t>1 << 63) if boundary else 0)
        c.nseg += 1
        c.alen += n
        c.queued += n
        return c.arena + c.alen - n

    cdef void _clear_queue(self, Client *c) noexcept:
        """Forget everything queued (drops the body references)."""
        cdef int i
        for i in range(c.shead, c.nseg):
            if c.segs[i].m != NULL:
                msg_decref(c.segs[i].m)
        c.shead = c.nseg = 0
        c.sdone = 0
        c.alen = 0
        c.queued = 0

    cdef void _mark_dirty(self, int slot, Client *c) noexcept:
        if not c.dirty and not c.blocked:
            c.dirty = 1
            self.dirty[self.ndirty] = slot
            self.ndirty += 1

    def enqueue_raw(self, int slot, data):
        """Queue bytes as they are: a websockets control frame (pong, close), or
        the HTTP handshake response. Each call is one unit that truncate() keeps
        whole."""
        cdef Client *c = self._check(slot)
        cdef const unsigned char[:] view = data
        cdef Py_ssize_t n = view.shape[0]
        if n == 0:
            return
        memcpy(self._inline(c, n, 1), &view[0], n)
        self.bytes_queued += n
        self._mark_dirty(slot, c)

    def send_text(self, int slot, bytes payload):
        """Queue one uncompressed text frame (control replies: subscribed, error...).

        Not for a client that takes no more data (closing): nothing may follow
        its close frame (RFC 6455 section 5.5.1). Returns whether it was queued."""
        cdef Client *c = self._check(slot)
        if c.nodata:
            return False
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t hlen = 2 if plen < 126 else (4 if plen < 65536 else 10)
        cdef unsigned char *p = <unsigned char *>self._inline(c, hlen + plen, 1)
        write_header(p, OP_TEXT, plen, hlen)
        memcpy(p + hlen, PyBytes_AS_STRING(payload), plen)
        self.bytes_queued += hlen + plen
        self._mark_dirty(slot, c)
        return True

    def broadcast_raw(self, bytes frame):
        """Queue the same frame (a ping) for every client still taking data."""
        self._idle()
        cdef int s
        cdef Client *c
        cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
        if n == 0:
            return
        for s in range(self._next_slot):
            c = &self.clients[s]
            if c.active and not c.nodata:
                memcpy(self._inline(c, n, 1), PyBytes_AS_STRING(frame), n)
                self.bytes_queued += n
                self._mark_dirty(s, c)

    def truncate(self, int slot):
        """Drop queued frames not yet begun (keep the one partly written), e.g.
        before a 1008 close of a slow client. Returns the bytes dropped."""
        cdef Client *c = self._check(slot)
        cdef int i, cut
        cdef Py_ssize_t dropped = 0
        cut = c.shead + 1 if c.sdone > 0 else c.shead
        while cut < c.nseg and not seg_boundary(&c.segs[cut]):
            cut += 1
        for i in range(cut, c.nseg):
            dropped += seg_len(c, &c.segs[i])
            if c.segs[i].m != NULL:
                msg_decref(c.segs[i].m)
        c.nseg = cut if cut > c.shead else c.shead
        c.queued -= dropped
        if c.shead == c.nseg:
            self._clear_queue(c)
        return dropped

    def replay(self, int slot, uint64_t from_seq, uint64_t to_seq):
        """Queue the buffered messages with from_seq <= seq <= to_seq again,
        byte for byte as first sent. Returns ``(sent, missing)`` where
        ``missing`` is ``(first, last)`` of the requested seqs no longer held,
        or None. Seqs above the client's last are ignored."""
        cdef Client *c = self._check(slot)
        cdef uint64_t lo, s, hi
        cdef int sent = 0
        hi = to_seq if to_seq < c.seq else c.seq
        lo = c.seq - <uint64_t>self.replay_size + 1 if c.seq >= <uint64_t>self.replay_size else 1
        if c.ring == NULL:
            lo = c.seq + 1
        missing = None
        if from_seq < lo and from_seq <= hi:
            missing = (from_seq, min(hi, lo - 1))
        if c.nodata:
            return 0, missing
        s = from_seq if from_seq > lo else lo
        while s <= hi:
            self._queue_data(c, s, c.ring[s % self.replay_size])
            sent += 1
            s += 1
        if sent:
            self._mark_dirty(slot, c)
        return sent, missing

    # ------------------------------------------------------------------ flush
    cdef int _idle(self) except -1:
        """Refuse while a flush runs: its threads own the client state then.

        Only reachable from another Python thread (the flushing thread is
        inside :meth:`flush`, which releases the GIL); the event loop that
        owns the core never sees it."""
        if self.flushing:
            raise RuntimeError("the core is flushing (called from another thread while flush() runs)")
        return 0

    cdef int _start_pool(self) noexcept:
        """Start the parked flush threads (once, lazily, and again in a forked
        child, which inherits none). Returns the threads per flush that can
        run, the caller included: fewer than asked when pthread_create fails."""
        cdef fo_pool *p = <fo_pool *>self._pool
        if p != NULL and fo_pool_owned(p):
            return 1 + fo_pool_size(p)
        if p != NULL:
            self._pool = NULL    # a forked child: those threads do not exist here (struct leaked on purpose)
        p = fo_pool_new(self.flush_threads - 1)
        if p == NULL:
            return 1
        self._pool = p
        return 1 + fo_pool_size(p)

    def flush(self):
        """Write every dirty client's queued bytes with ``sendmsg()``, on
        ``flush_threads`` threads (the caller and parked workers) with the GIL
        released, and return once all of them finished.

        Returns ``(blocked, dead)``: lists of slots whose socket is full (wait
        for writable, then :meth:`flush_slot`) or failed (close them), or
        ``None`` in place of an empty list; both in dirty-list order, whatever
        thread sent them.
        """
        self._idle()
        cdef int i, slot, m = 0, t, threads = 1
        cdef Client *c
        cdef FlushJob job
        cdef int n = self.ndirty
        self.ndirty = 0
        # Build the work list on this thread, alone: one entry per slot (the
        # dirty flag is cleared at its first listing, so a slot can never be
        # handed to two threads), only clients with something to send.
        for i in range(n):
            slot = self.dirty[i]
            c = &self.clients[slot]
            if not c.dirty:
                continue
            c.dirty = 0
            if not c.active or c.blocked or c.shead == c.nseg:
                continue
            if c.fepoch != self._fepoch:
                c.fepoch = self._fepoch
                self.reached += 1
            self._work[m] = slot
            m += 1
        if m == 0:
            return None, None
        job.clients = self.clients
        job.work = self._work
        job.res = self._res
        job.n = m
        job.next = 0
        if self.flush_threads > 1 and m >= self.parallel_min:
            threads = self._start_pool()
        memset(job.acc, 0, threads * sizeof(FlushAcc))
        if m < self.parallel_min:
            flush_job(&job, 0)          # a few clients: not worth waking threads or dropping the GIL
        else:
            self.flushing = True
            try:
                with nogil:
                    if threads > 1:
                        fo_pool_run(<fo_pool *>self._pool, flush_job, &job)
                    else:
                        flush_job(&job, 0)
            finally:
                self.flushing = False
        for t in range(threads):
            self.send_calls += job.acc[t].send_calls
            self.bytes_sent += job.acc[t].bytes_sent
            self.send_blocked += job.acc[t].send_blocked
        blocked = None
        dead = None
        for i in range(m):
            if self._res[i] == 1:
                if blocked is None:
                    blocked = []
                blocked.append(self._work[i])
            elif self._res[i] == -1:
                if dead is None:
                    dead = []
                dead.append(self._work[i])
        return blocked, dead

    def flush_slot(self, int slot):
        """After writable: write one client's queue (on this thread). 0 drained, 1 blocked, -1 dead."""
        cdef Client *c = self._check(slot)
        cdef FlushAcc acc
        cdef int r
        c.blocked = 0
        if c.shead == c.nseg:
            return 0
        memset(&acc, 0, sizeof(acc))
        r = send_some(c, &acc)
        self.send_calls += acc.send_calls
        self.bytes_sent += acc.bytes_sent
        self.send_blocked += acc.send_blocked
        return r

    def take_reach(self):
        """Distinct clients that :meth:`flush` sent to since the last call
        (each counted once however many flushes it was in); starts a new
        window. With ``deliveries`` over the same window it gives the frame
        rate per receiving client, which the hub's latency budget uses."""
        cdef uint64_t n = self.reached
        self.reached = 0
        self._fepoch += 1
        if self._fepoch == 0:
            self._fepoch = 1     # 0 is what a fresh slot holds
        return n

    def take_dirty(self):
        """For tests: pop the queued bytes of every dirty client without a
        socket: ``{slot: bytes}``. Uses the flush's own gather and accounting,
        batch by batch, as if every ``sendmsg()`` took everything offered."""
        self._idle()
        cdef int i, j, k, slot
        cdef Client *c
        cdef iovec iov[IOV_BATCH]
        cdef unsigned char scratch[HEAD_SLOTS][HEAD_MAX]
        cdef Py_ssize_t want
        out = {}
        for i in range(self.ndirty):
            slot = self.dirty[i]
            c = &self.clients[slot]
            c.dirty = 0
            if not c.active or c.blocked or c.shead == c.nseg:
                continue
            parts = []
            while c.shead < c.nseg:
                k = gather(c, iov, scratch, &want)
                for j in range(k):
                    parts.append(PyBytes_FromStringAndSize(<char *>iov[j].iov_base, iov[j].iov_len))
                advance(c, want)
            out[slot] = b"".join(parts)
            drained(c)
        self.ndirty = 0
        return out

    def discard_queued(self):
        """Forget every dirty client's queued bytes without writing them
        (benchmarks of match-and-enqueue alone). Returns the bytes dropped."""
        self._idle()
        cdef int i, slot
        cdef Client *c
        cdef Py_ssize_t total = 0
        for i in range(self.ndirty):
            slot = self.dirty[i]
            c = &self.clients[slot]
            c.dirty = 0
            if c.active:
                total += c.queued
                self._clear_queue(c)
        self.ndirty = 0
        return total

    def stats(self):
        return {
            "published": self.published,
            "deliveries": self.deliveries,
            "throttled_drops": self.throttled_drops,
            "conflated_drops": self.conflated_drops,
            "level_raises": self.level_raises,
            "bytes_queued": self.bytes_queued,
            "bytes_sent": self.bytes_sent,
            "send_calls": self.send_calls,
            "send_blocked": self.send_blocked,
            "route_misses": self.route_misses,
            "slow_marked": self.slow_marked,
            "compressions": self.compressions,
            "clients": self.clients_active,
            "patterns": len(self._patterns),
            "routes": len(self._routes),
        }
