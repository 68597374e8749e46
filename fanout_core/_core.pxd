# The compiled fan-out core: declarations shared by _core.pyx and any future
# Cython module that wants the C-level API.
from libc.stdint cimport uint64_t, uint32_t, uint8_t, int64_t
cimport cython

cdef enum:
    MAX_WBITS_SLOTS = 16      # index by negotiated server window bits (9..15)
    HEAD_MAX = 48             # data frame header + stored-block header + {"seq":N,

cdef extern from "sys/uio.h" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len


cdef struct RSet:
    # A set of client slots in one of two forms chosen by size, as CRoaring's
    # containers are: a sorted array of ``n`` slots (``arr``, room for ``cap``)
    # while n <= Core.sparse_max, else a bitset of Core.nwords words (``bits``).
    # Empty: no allocation at all. So a subject with 3 subscribers costs 16
    # bytes, not a bitset the size of the node; a dense one keeps the bitset.
    uint32_t *arr
    uint64_t *bits
    uint32_t n
    uint32_t cap


cdef struct Msg:
    Py_ssize_t refcnt         # publish call + one per ring entry holding it
    int priority              # 0 low .. 3 critical
    uint32_t subject          # route id of its subject (0: none, e.g. catch-up history)
    uint8_t conflate          # its subject is conflated: newest replaces older queued
    double t                  # CLOCK_MONOTONIC seconds when it entered the core (queue age)
    char *tail                # shared JSON after the per-client prefix: "type":...}
    Py_ssize_t tail_len
    char *ztail[MAX_WBITS_SLOTS]      # tail deflated once per window size in use
    Py_ssize_t ztail_len[MAX_WBITS_SLOTS]
    # Deltas (delta.pxi): this message as a Fossil delta against the previous
    # one of its subject, a message of its own (its tail "delta":"..." and
    # compressed tails) that frames share like any other; owned by this one.
    Msg *delta
    uint64_t dtime            # its place in the core's publish order (delta.pxi's clock)
    # During its publish only (NULL otherwise): the route's delta opt-ins,
    # who was sent the previous message of the subject, who gets this one
    # (sets in the route, sparse or dense like the recipient sets).
    RSet *dbits
    RSet *dgot_prev
    RSet *dgot_cur
    uint64_t dprev_time       # dtime of that previous message


cdef struct Seg:
    # One entry of a client's output queue (16 bytes). A data frame is just
    # (message, seq): its header and ``{"seq":N,`` prefix are written at flush
    # time into a scratch buffer, and the body shared by every client
    # (m.tail, or m.ztail[client wbits] when the client deflates) is sent by
    # reference. So fan-out writes 16 bytes per client, whatever the payload.
    Msg *m                    # NULL: inline bytes (control frames) in the arena
    uint64_t v                # data: the seq; inline: off | len << 32 | boundary << 63


cdef struct Client:
    # Fields the fan-out loop touches come first (one cache line).
    uint64_t seq              # last data seq given to this client
    Msg **ring                # replay ring: ring[seq % replay_size], lazily allocated
    Seg *segs                 # output queue: segs[shead:nseg] are unsent
    char *arena               # inline bytes of the queue
    Py_ssize_t queued         # unsent bytes in all
    int shead
    int nseg
    uint8_t active            # slot in use
    uint8_t nodata            # no more data frames (closing or too slow)
    uint8_t blocked           # last send hit EAGAIN: wait for writable
    uint8_t dirty             # already listed for the next flush
    uint8_t wbits             # permessage-deflate window bits; 0 = uncompressed
    uint8_t level             # throttle level 0..3
    uint8_t over              # a throttle window is open (since, mark, lo valid): queue over the limit
    int strikes               # messages queued over the byte limit in the current window
    int credit                # throttle sampling budget (percent units)
    uint32_t dropped          # data messages not delivered since the last take_dropped()
    Py_ssize_t mark           # the window's reference backlog (queue + the kernel's): judged against it
    double since              # when the current window began
    int segcap
    Py_ssize_t alen
    Py_ssize_t acap
    Py_ssize_t sdone          # bytes of segs[shead] already written
    int fd
    uint32_t fepoch           # reach window this client was last flushed in (take_reach)
    uint64_t dforget          # delta clock when its bases last changed outside live publishes (delta.pxi)


cdef struct FlushAcc:
    # One flush thread's counters, summed by the joining thread; padded to a
    # cache line so threads do not share one.
    uint64_t send_calls
    uint64_t bytes_sent
    uint64_t send_blocked
    uint64_t pad[5]


cdef enum:
    MAX_FLUSH_THREADS = 64    # WS_FLUSH_THREADS upper bound (the auto default stops at 8)


cdef struct FlushJob:
    # One flush, as the threads see it: read-only but for ``next`` (an atomic
    # cursor handing out chunks of ``work``), ``res[i]`` (written only by the
    # thread that took work[i]) and ``acc[tid]`` (only by thread ``tid``).
    Client *clients
    int *work                 # distinct slots to send, built before the threads start
    signed char *res          # per work item: 0 drained, 1 blocked, -1 dead
    int n
    int next
    FlushAcc acc[MAX_FLUSH_THREADS]


cdef class _Pattern:
    cdef str text
    cdef list tokens            # wildcard patterns only; None for an exact one
    cdef bint wild
    cdef RSet rs                # its subscribers
    cdef set routes             # wildcard: subjects whose cached route includes it
                                # (exact: None; its route, if cached, is _routes[text])
    cdef RSet drs               # subscribers that asked for deltas (delta.pxi); a subset of rs


cdef class _Route:
    cdef uint32_t id
    cdef bint conflate
    cdef tuple patterns         # the _Pattern objects that match this subject
    cdef RSet rs                # union of their sets; empty while nobody matches
    # deltas (delta.pxi)
    cdef bint dallow            # WS_DELTA_CHANNELS matches this subject
    cdef uint32_t dseq          # publishes on this subject
    cdef Msg *dprev             # the last one, the base of the next delta (a reference); NULL: none
    cdef RSet drs               # union of the patterns' drs; empty while none asked
    cdef RSet dgot0             # who was sent message dseq, by its parity (dgot0: even);
    cdef RSet dgot1             # empty while no base is kept


@cython.final
cdef class Core:
    cdef Client *clients
    cdef readonly int capacity
    cdef readonly int replay_size
    cdef readonly Py_ssize_t queue_limit
    cdef readonly int slow_strikes
    cdef readonly double raise_seconds  # a throttle window's length below the heaviest level
    cdef readonly double grace_seconds  # ... and at it (or with throttling off): then 1008
    cdef readonly Py_ssize_t hard_limit # a client's queue never grows past this (+ one message)
    cdef Py_ssize_t soft_cap            # hard_limit / 2: non-critical data dropped from here
    cdef double clock                   # fixed clock (tests, a hub on a fake clock) when fixed_clock
    cdef bint fixed_clock
    cdef int nwords
    cdef int *dirty
    cdef int ndirty
    cdef list _free
    cdef int _next_slot
    cdef list _subs           # per slot: set of pattern strings (control path only)
    cdef dict _patterns       # pattern text -> _Pattern
    cdef dict _wild           # wildcard subset of _patterns
    cdef dict _routes         # subject -> _Route (recipient cache)
    cdef readonly int max_routes
    cdef readonly int sparse_max      # a recipient set above this many slots is a bitset
    cdef readonly Py_ssize_t set_bytes  # bytes held by the recipient sets of patterns and routes
    cdef int wbits_count[MAX_WBITS_SLOTS]
    cdef list _zc             # zlib compressor per window bits (Python objects)
    cdef int zlevel
    cdef int throttle_pct[4]
    cdef readonly bint throttle_enabled
    cdef public bint shed_low           # load shedding: low priority goes to nobody
    cdef readonly int max_level
    cdef list _conflate_tokens  # token lists of the conflated patterns
    cdef uint32_t _route_ids
    cdef list _slow
    cdef list _raised
    # counters (exported as metrics by the Python side)
    cdef readonly uint64_t published
    cdef readonly uint64_t deliveries
    cdef uint64_t drops_by[2][4]      # [DROP_THROTTLED, DROP_CONFLATED][priority]
    cdef readonly uint64_t level_raises
    cdef readonly uint64_t bytes_queued
    cdef readonly uint64_t bytes_sent
    cdef readonly uint64_t send_calls
    cdef readonly uint64_t send_blocked
    cdef readonly uint64_t route_misses
    cdef readonly uint64_t slow_marked
    cdef readonly uint64_t compressions
    cdef readonly int clients_active
    # parallel flush (see the module docstring for the concurrency argument)
    cdef readonly int flush_threads     # threads per flush, the calling one included
    cdef readonly int parallel_min      # fewer clients to send than this: one thread, GIL held
    cdef void *_pool                    # fo_pool*: flush_threads - 1 parked pthreads, made lazily
    cdef int *_work
    cdef signed char *_res
    cdef readonly bint flushing         # a flush runs (GIL released): every other entry point refuses
    cdef uint32_t _fepoch
    cdef readonly uint64_t reached      # distinct clients flushed since the last take_reach()
    # deltas (delta.pxi)
    cdef list _delta_tokens             # token lists of WS_DELTA_CHANNELS (empty: deltas off)
    cdef readonly Py_ssize_t delta_min_bytes
    cdef uint64_t delta_made            # deltas computed and kept
    cdef uint64_t delta_ns              # time spent computing deltas (kept or not)
    cdef uint64_t delta_refused[2]      # [not smaller, not UTF-8]
    cdef uint64_t kind_bytes[2]         # data frame bytes queued: [full, delta]
    cdef uint64_t kind_frames[2]
    cdef uint64_t _dclock               # delta clock: +1 per message published to a route
    cdef unsigned char *_dbuf           # encoder scratch: output
    cdef Py_ssize_t _dbuf_cap
    cdef int *_dhash                    # encoder scratch: hash table
    cdef Py_ssize_t _dhash_cap

    cdef bint _dqueued                  # _deliver queued the message to a delta subscriber (delta.pxi)
    cdef bint _dinner                   # _deliver runs inside delta_deliver
    cdef int _deliver(self, int slot, Msg *m, bint catchup=*) except -1
    cdef int _idle(self) except -1
    cdef int _start_pool(self) noexcept
    cdef void _release(self, int slot) noexcept
    cdef Client *_check(self, int slot) except NULL
    cdef void _mark_dirty(self, int slot, Client *c) noexcept
