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

Layout: one extension module, its parts textually included by concern (as
asyncpg's ``protocol/``): ``pool.pxi`` (the flush thread pool, C),
``queue.pxi`` (messages and per-client output queues), ``frames.pxi``
(frame headers, compress-once), ``flush.pxi`` (gather + ``sendmsg``, run on
the flush threads), ``routes.pxi`` (patterns and the route cache),
``throttle.pxi`` (the throttle and conflation policy), ``fossil.pxi`` (the
Fossil delta encoder, C) and ``delta.pxi`` (PROTOCOL 1.2 delta messages: one
delta per message and subject, and who may get it; a message's delta is a
message of its own that the full one holds, freed with it, atomically, like
any reference a flush thread drops). This file holds the ``Core`` class: the
Python-facing API and the match-and-enqueue loops.

Limits: a client whose queue stays over ``queue_limit`` is judged over
windows of time (``raise_seconds``, ``grace_seconds``; see
``throttle_check`` in throttle.pxi): up one level while its queue does not
shrink, and at the heaviest level (or with throttling off) it stops getting
data and is reported by :meth:`Core.take_slow` (the caller closes it with
1008). Its queue never holds more than ``hard_limit`` bytes plus one message:
non-critical data is dropped from half ``hard_limit`` on, and a
message that passes ``hard_limit`` marks it slow at once.
"""

from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memmove, memset, memcmp
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


cdef extern from *:
    """
    #include <stdlib.h>
    #ifdef __GLIBC__
    #include <malloc.h>
    static int fo_malloc_trim(void) { return malloc_trim(0); }
    #if __GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33)
    static int fo_heap_stats(size_t *in_use, size_t *free_bytes) {
        struct mallinfo2 m = mallinfo2();     /* sums every arena */
        *in_use = m.uordblks + m.hblkhd;
        *free_bytes = m.fordblks;
        return 1;
    }
    #else
    static int fo_heap_stats(size_t *in_use, size_t *free_bytes) { *in_use = 0; *free_bytes = 0; return 0; }
    #endif
    #else
    static int fo_malloc_trim(void) { return 0; }
    static int fo_heap_stats(size_t *in_use, size_t *free_bytes) { *in_use = 0; *free_bytes = 0; return 0; }
    #endif
    """
    int fo_malloc_trim() nogil
    int fo_heap_stats(size_t *in_use, size_t *free_bytes) nogil


def heap_stats():
    """``(in_use, free)``: bytes of the C heap in use by live blocks (mmapped
    ones included), and bytes it holds free inside its arenas (glibc
    ``mallinfo2``, summed over every arena; ``(0, 0)`` elsewhere). Tells a
    leak (``in_use`` grows) from fragmentation (``free`` grows) under churn;
    the fanout_heap_* gauges. Walks the arenas' free lists: a scrape-time
    call, not a hot-path one."""
    cdef size_t in_use = 0, free_bytes = 0
    with nogil:
        fo_heap_stats(&in_use, &free_bytes)
    return in_use, free_bytes


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


include "pool.pxi"
include "queue.pxi"
include "frames.pxi"
include "flush.pxi"
include "routes.pxi"
include "throttle.pxi"
include "fossil.pxi"
include "delta.pxi"


cdef class Core:
    """See the module docstring. Not thread-safe: one event loop owns it (its
    flush uses threads of its own, see "Parallel flush" there)."""

    def __cinit__(self, int capacity, int replay_size=100, Py_ssize_t queue_limit=262144,
                  int slow_strikes=3, int max_routes=65536, int compress_level=6,
                  throttle_percents=(100, 75, 50, 25), bint throttle=False, int max_level=3,
                  conflate=(), int flush_threads=1, int parallel_min=PARALLEL_MIN,
                  double raise_seconds=0.5, double grace_seconds=2.0, Py_ssize_t hard_limit=0,
                  delta=(), Py_ssize_t delta_min_bytes=0):
        if capacity < 1 or replay_size < 1 or queue_limit < 1 or slow_strikes < 1:
            raise ValueError("capacity, replay_size, queue_limit and slow_strikes must be >= 1")
        if raise_seconds < 0 or grace_seconds < 0:
            raise ValueError("raise_seconds and grace_seconds must be >= 0")
        if hard_limit == 0:
            hard_limit = 8 * queue_limit
        if hard_limit < 2 * queue_limit:
            raise ValueError("hard_limit must be at least twice queue_limit (0: 8 times)")
        self.raise_seconds = raise_seconds
        self.grace_seconds = grace_seconds
        self.hard_limit = hard_limit
        self.soft_cap = hard_limit // 2
        self.fixed_clock = False
        self.clock = 0.0
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
        if max_routes < BATCH:
            raise ValueError(f"max_routes must be >= {BATCH}")
        self.max_routes = max_routes
        self.zlevel = compress_level
        self.nwords = (capacity + 63) // 64
        self.sparse_max = 2 * self.nwords      # an array of that many uint32 is as big as the bitset
        self.set_bytes = 0
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
        delta_init(self, delta, delta_min_bytes)

    def __dealloc__(self):
        cdef int s
        if self.clients != NULL:
            for s in range(self._next_slot):
                self._release(s)
            free(self.clients)
        free(self.dirty)
        free(self._work)
        free(self._res)
        delta_core_free(self)
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
        delta_forget(self, c)     # the slot's previous client may be in the subjects' delta bitsets
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
        clear_queue(c)
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
        c.over = 0                # a new level: evidence starts again

    def level(self, int slot):
        return self._check(slot).level

    def set_clock(self, now):
        """Fix the throttle policy's clock at ``now`` (seconds; tests, or a hub
        on a fake clock), or with None go back to CLOCK_MONOTONIC."""
        if now is None:
            self.fixed_clock = False
        else:
            self.fixed_clock = True
            self.clock = float(now)

    def throttle_tick(self):
        """Judge every client whose queue is over the limit on the queue as it
        is now (periodic: a reader whose stream went quiet is still raised or
        closed in time). Raises and slow clients are reported as after a
        publish (take_raised, take_slow)."""
        self._idle()
        throttle_sweep(self, self.clock if self.fixed_clock else mono_now())

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
        """Slots still behind at the heaviest level after the grace time, or
        past the hard limit (see the module docstring).

        They get no more data; the caller decides what to do (close with 1008).
        """
        out, self._slow = self._slow, []
        return out

    # ------------------------------------------------------------ subscriptions
    def subscribe(self, int slot, str pattern, bint delta=False):
        """Add a (valid) pattern for a client; False if it already had it.
        ``delta``: it takes Fossil deltas on this pattern's subjects (where
        the core's ``delta`` patterns allow them); a repeat updates that."""
        self._check(slot)
        cdef set subs = self._subs[slot]
        if pattern in subs:
            delta_subscribed(self, self._patterns[pattern], slot, delta)
            return False
        cdef _Pattern p = self._patterns.get(pattern)
        if p is None:
            p = route_new_pattern(self, pattern)
        cdef _Route r
        rs_add(self, &p.rs, slot)
        subs.add(pattern)
        if p.wild:
            for subject in p.routes:
                r = self._routes[subject]
                rs_add(self, &r.rs, slot)
        else:
            r = self._routes.get(pattern)
            if r is not None:
                rs_add(self, &r.rs, slot)
        delta_subscribed(self, p, slot, delta)
        return True

    def unsubscribe(self, int slot, str pattern):
        """Remove a pattern from a client; False if it did not have it."""
        self._check(slot)
        cdef set subs = self._subs[slot]
        if pattern not in subs:
            return False
        subs.discard(pattern)
        cdef _Pattern p = self._patterns[pattern]
        cdef _Route r
        delta_unsubscribed(self, p, slot)
        rs_remove(self, &p.rs, slot)
        if p.wild:
            for subject in p.routes:
                route_unlink_slot(self, <_Route>self._routes[subject], p, slot)
        else:
            r = self._routes.get(pattern)
            if r is not None:
                route_unlink_slot(self, r, p, slot)
        if p.rs.n == 0:
            route_drop_pattern(self, p)
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

    def recipients(self, str subject):
        """Slots that a message on ``subject`` would reach (tests, debugging)."""
        cdef _Route r = route_get(self, subject)
        return rs_members(&r.rs, self.nwords)

    # ---------------------------------------------------------------- publish
    def publish(self, str subject, bytes tail, int priority=2):
        """Queue one data message for every client subscribed to ``subject``.

        ``tail`` is the shared rest of the JSON object after the per-client
        ``{"seq":N,`` prefix, e.g. ``b'"type":"message",...,"data":{...}}'``.
        Returns the number of clients it was queued for.
        """
        self._idle()
        cdef _Route r = route_get(self, subject)
        self.published += 1
        if r.rs.n == 0:
            return 0
        cdef Msg *m = msg_new(tail, priority)
        m.subject = r.id
        m.conflate = r.conflate
        try:
            delta_prepare(self, r, m)
        except BaseException:
            msg_decref(m)
            raise
        cdef int w, b, words = (self._next_slot + 63) >> 6
        cdef uint64_t word
        cdef int count = 0
        cdef uint64_t *bits = r.rs.bits
        cdef uint32_t *arr = r.rs.arr
        cdef uint32_t i, n = r.rs.n
        try:
            if bits == NULL:
                for i in range(n):
                    count += self._deliver(arr[i], m)
            else:
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
        Returns the number of frames queued.

        Dense subjects are walked word by word in their bitsets; sparse ones
        (sorted slot arrays) through a cursor each, turned into the same 64-slot
        word as the walk reaches it, so both meet in one client-major loop.
        When every set in the batch is sparse the walk jumps straight to the
        next word that has a member."""
        self._idle()
        cdef Py_ssize_t n = len(subjects), start, end, j, k
        cdef Msg *msgs[BATCH]
        cdef uint64_t *bits[BATCH]
        cdef uint32_t *arrs[BATCH]
        cdef uint32_t lens[BATCH]
        cdef uint32_t cur[BATCH]
        cdef uint64_t sw[BATCH]
        cdef int w, b, slot, ndense, words = (self._next_slot + 63) >> 6
        cdef uint64_t word, mask, x
        cdef uint32_t v
        cdef int count = 0
        cdef _Route r
        if len(tails) != n or len(priorities) != n:
            raise ValueError("subjects, tails and priorities differ in length")
        cdef list alive = []           # the batch's routes: a route cache reset mid-batch must not free their bitsets
        start = 0
        while start < n:
            k = 0
            ndense = 0
            end = min(n, start + BATCH)
            if len(self._routes) + (end - start) > self.max_routes:
                route_clear(self)    # never in the middle of a batch: its sets are in use below
            try:
                for j in range(start, end):
                    r = route_get(self, subjects[j])
                    alive.append(r)
                    self.published += 1
                    if r.rs.n == 0:
                        continue
                    bits[k] = r.rs.bits
                    arrs[k] = r.rs.arr
                    lens[k] = r.rs.n
                    cur[k] = 0
                    if bits[k] != NULL:
                        ndense += 1
                    msgs[k] = msg_new(tails[j], priorities[j])
                    msgs[k].subject = r.id
                    msgs[k].conflate = r.conflate
                    k += 1
                    delta_prepare(self, r, msgs[k - 1])
                w = 0
                while w < words:
                    if ndense == 0:
                        # All sparse: go to the lowest word any cursor points at.
                        w = words
                        for j in range(k):
                            if cur[j] < lens[j] and <int>(arrs[j][cur[j]] >> 6) < w:
                                w = arrs[j][cur[j]] >> 6
                        if w >= words:
                            break
                    word = 0
                    for j in range(k):
                        if bits[j] != NULL:
                            x = bits[j][w]
                        else:
                            x = 0
                            while cur[j] < lens[j]:
                                v = arrs[j][cur[j]]
                                if <int>(v >> 6) != w:
                                    break
                                x |= (<uint64_t>1) << (v & 63)
                                cur[j] += 1
                        sw[j] = x
                        word |= x
                    while word:
                        b = __builtin_ctzll(word)
                        word &= word - 1
                        mask = (<uint64_t>1) << b
                        slot = (w << 6) | b
                        for j in range(k):
                            if sw[j] & mask:
                                count += self._deliver(slot, msgs[j])
                    w += 1
            finally:
                for j in range(k):
                    msg_decref(msgs[j])
            start = end
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

    cdef int _deliver(self, int slot, Msg *m, bint catchup=False) except -1:
        if m.dgot_cur != NULL and not self._dinner:
            return delta_deliver(self, slot, m, catchup)     # keeps the subject's "sent" set; calls back here
        cdef Client *c = &self.clients[slot]
        if c.nodata or not c.active:
            return 0
        if self.shed_low and m.priority == 0 and not catchup:
            count_drop(self, c, DROP_THROTTLED, 0)
            return 0
        if (c.level or c.queued >= self.soft_cap) and m.priority < PRIORITY_CRITICAL and not catchup:
            if m.conflate:
                # Latest value per subject: never sampled away (it may be the
                # newest), but it replaces an older version still queued.
                if c.wbits and m.ztail[c.wbits] == NULL:
                    msg_compress(self, m, c.wbits)
                if conflate_replace(self, c, m):
                    count_drop(self, c, DROP_CONFLATED, m.priority)
                    throttle_check(self, slot, c, m)
                    self._mark_dirty(slot, c)
                    return 1
            elif c.queued >= self.soft_cap or not throttle_sample(self, c, m.priority):
                # Sampled away, or past half the hard cap (the other half
                # is room for critical messages). A dropped message takes no
                # seq: the client sees no false gap. It is still evidence.
                count_drop(self, c, DROP_THROTTLED, m.priority)
                throttle_check(self, slot, c, m)
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
        delta_queue(self, c, slot, c.seq, m, catchup)
        self.deliveries += 1
        if not catchup:
            throttle_check(self, slot, c, m)
        self._mark_dirty(slot, c)
        return 1

    @property
    def throttled_drops(self):
        """Messages not sent to throttled clients (load shedding included)."""
        return sum(self.drops_by[DROP_THROTTLED][p] for p in range(4))

    @property
    def conflated_drops(self):
        """Queued messages replaced by a newer one of their subject."""
        return sum(self.drops_by[DROP_CONFLATED][p] for p in range(4))

    # ------------------------------------------------------------------ queue

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
        memcpy(queue_inline(c, n, 1), &view[0], n)
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
        cdef unsigned char *p = <unsigned char *>queue_inline(c, hlen + plen, 1)
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
                memcpy(queue_inline(c, n, 1), PyBytes_AS_STRING(frame), n)
                self.bytes_queued += n
                self._mark_dirty(s, c)

    def truncate(self, int slot):
        """Drop the queued data frames not yet begun (keep the one partly
        written, and every control frame: replies, throttle_update notices,
        pongs), e.g. before a 1008 close of a slow client, so the client can
        still learn why. Returns the bytes dropped."""
        cdef Client *c = self._check(slot)
        cdef int i, cut, keep
        cdef Py_ssize_t dropped = 0
        cut = c.shead + 1 if c.sdone > 0 else c.shead
        while cut < c.nseg and not seg_boundary(&c.segs[cut]):
            cut += 1
        keep = cut if cut > c.shead else c.shead
        for i in range(keep, c.nseg):
            if c.segs[i].m != NULL:
                dropped += seg_len(c, &c.segs[i])
                msg_decref(c.segs[i].m)
            else:
                c.segs[keep] = c.segs[i]        # inline: its arena bytes stay where they are
                keep += 1
        c.nseg = keep
        c.queued -= dropped
        if c.shead == c.nseg:
            clear_queue(c)
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
        if s <= hi:
            delta_forget(self, c)     # replayed messages are full and reset the client's bases
        while s <= hi:
            queue_data(self, c, s, c.ring[s % self.replay_size])
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
                clear_queue(c)
        self.ndirty = 0
        return total

    def trim_memory(self):
        """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``;
        a no-op elsewhere). Returns whether any were.

        Why: messages, rings and queues are many small blocks. When clients
        leave, glibc keeps the freed blocks for reuse and only returns memory
        at the top of the heap, so RSS would stay at its peak for good (the
        issue 19 "RSS stayed at its peak after every client left"). The hub
        calls this after clients left, at most every few seconds; it takes
        about 2 ms for a 100 MB heap."""
        self._idle()
        cdef int r
        with nogil:
            r = fo_malloc_trim()
        return bool(r)

    def client_memory(self):
        """``(queued, buffers)``: bytes queued for all clients and not yet
        written, and bytes their queues and rings hold allocated (arenas and
        segment arrays, up to KEEP_BUF + KEEP_SEGS segments kept per idle
        client; ring arrays, replay_size pointers per client that got data).
        One pass over the slots."""
        self._idle()
        cdef int s
        cdef Client *c
        cdef Py_ssize_t queued = 0, buffers = 0
        for s in range(self._next_slot):
            c = &self.clients[s]
            if c.active:
                queued += c.queued
                buffers += c.acap + c.segcap * sizeof(Seg)
                if c.ring != NULL:
                    buffers += self.replay_size * sizeof(Msg *)
        return queued, buffers

    def stats(self):
        out = {
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
            "set_bytes": self.set_bytes,
            "messages_held": _live_msgs,
            "message_bytes": _live_msg_bytes,
        }
        out["queued_bytes"], out["buffer_bytes"] = self.client_memory()
        return out

    def delta_stats(self):
        """Delta counters and memory: computed, seconds, refused_not_smaller,
        refused_not_utf8, bytes_full/bytes_delta and frames_full/frames_delta
        (data frames queued, as on the wire), bases (subjects holding one),
        base_bytes, seen_bytes (the subjects' bitsets of who was sent the base)."""
        return delta_stats(self)
