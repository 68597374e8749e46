# Subscriptions: patterns, the route cache (subject -> recipients) and matching.
# Part of fanout_core/_core.pyx (textually included: one extension module).
#
# Memory (issue 19). A recipient set (RSet) is a sorted array of slots while
# small and a bitset of the node's size when dense (CRoaring's rule: the
# array while it is smaller than the bitset, i.e. up to sparse_max = 2 x
# nwords slots of 4 bytes; back to an array at half that, so a subject going
# up and down around the limit does not convert on every change). An empty
# set holds no allocation. Every byte the sets hold is counted in
# Core.set_bytes (a gauge, and the leak check of the tests).
#
# The route cache keeps one _Route per published subject that has recipients,
# and, while wildcard patterns exist, negative entries (computing them means
# matching every wildcard). It is bounded by max_routes (dropped whole when
# full: it is a cache). A route whose last pattern goes is dropped at once,
# and so are the negative entries when the last wildcard goes, so the cache
# returns to empty when every client leaves.

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil


cdef class _Pattern:
    def __dealloc__(self):
        free(self.rs.arr)
        free(self.rs.bits)
        free(self.drs.arr)
        free(self.drs.bits)


cdef class _Route:
    def __dealloc__(self):
        free(self.rs.arr)
        free(self.rs.bits)
        delta_route_free(self)


# A route for subjects nobody matches while no wildcard exists: not cached
# (an exact-pattern miss costs one dict lookup, as the cache would).
cdef _Route _NO_ROUTE = _Route()
_NO_ROUTE.patterns = ()


cdef inline uint32_t rs_find(const RSet *s, uint32_t slot) noexcept nogil:
    """Index of the first array entry >= slot (binary search)."""
    cdef uint32_t lo = 0, hi = s.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if s.arr[mid] < slot:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline bint rs_has(const RSet *s, uint32_t slot) noexcept nogil:
    cdef uint32_t i
    if s.bits != NULL:
        return (s.bits[slot >> 6] >> (slot & 63)) & 1
    i = rs_find(s, slot)
    return i < s.n and s.arr[i] == slot


cdef int rs_to_dense(Core self, RSet *s) except -1:
    cdef uint64_t *bits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
    cdef uint32_t i, v
    if bits == NULL:
        raise MemoryError()
    for i in range(s.n):
        v = s.arr[i]
        bits[v >> 6] |= (<uint64_t>1) << (v & 63)
    free(s.arr)
    self.set_bytes += self.nwords * sizeof(uint64_t) - s.cap * sizeof(uint32_t)
    s.arr = NULL
    s.cap = 0
    s.bits = bits
    return 0


cdef void rs_to_sparse(Core self, RSet *s) noexcept:
    """Back to an array (at n <= sparse_max / 2). If malloc fails the set
    simply stays a bitset: both forms are correct."""
    cdef uint32_t cap = s.n + s.n // 4 + 4     # some room to grow, well below the bitset
    cdef uint32_t *arr
    cdef uint32_t k = 0
    cdef int w, b
    cdef uint64_t word
    if cap > <uint32_t>self.sparse_max:
        cap = self.sparse_max
    arr = <uint32_t *>malloc(cap * sizeof(uint32_t))
    if arr == NULL:
        return
    for w in range(self.nwords):
        word = s.bits[w]
        while word:
            b = __builtin_ctzll(word)
            word &= word - 1
            arr[k] = <uint32_t>((w << 6) | b)
            k += 1
    free(s.bits)
    self.set_bytes += cap * sizeof(uint32_t) - self.nwords * sizeof(uint64_t)
    s.bits = NULL
    s.arr = arr
    s.cap = cap


cdef int rs_add(Core self, RSet *s, uint32_t slot) except -1:
    """Add a slot; 1 if it was not there, else 0."""
    cdef uint64_t mask
    cdef uint32_t i, cap
    cdef uint32_t *arr
    if s.bits == NULL:
        i = rs_find(s, slot)
        if i < s.n and s.arr[i] == slot:
            return 0
        if s.n < <uint32_t>self.sparse_max:
            if s.n == s.cap:
                cap = s.cap * 2 if s.cap else 4
                if cap > <uint32_t>self.sparse_max:
                    cap = self.sparse_max
                arr = <uint32_t *>realloc(s.arr, cap * sizeof(uint32_t))
                if arr == NULL:
                    raise MemoryError()
                self.set_bytes += (cap - s.cap) * sizeof(uint32_t)
                s.arr = arr
                s.cap = cap
            memmove(s.arr + i + 1, s.arr + i, (s.n - i) * sizeof(uint32_t))
            s.arr[i] = slot
            s.n += 1
            return 1
        rs_to_dense(self, s)
    mask = (<uint64_t>1) << (slot & 63)
    if s.bits[slot >> 6] & mask:
        return 0
    s.bits[slot >> 6] |= mask
    s.n += 1
    return 1


cdef int rs_remove(Core self, RSet *s, uint32_t slot) noexcept:
    """Remove a slot; 1 if it was there, else 0. Never fails (a shrink that
    cannot allocate keeps the larger form)."""
    cdef uint64_t mask
    cdef uint32_t i, cap
    cdef uint32_t *arr
    if s.bits != NULL:
        mask = (<uint64_t>1) << (slot & 63)
        if not s.bits[slot >> 6] & mask:
            return 0
        s.bits[slot >> 6] &= ~mask
        s.n -= 1
        if s.n == 0:
            rs_free(self, s)
        elif s.n <= <uint32_t>(self.sparse_max // 2):
            rs_to_sparse(self, s)
        return 1
    if s.n == 0:
        return 0
    i = rs_find(s, slot)
    if i >= s.n or s.arr[i] != slot:
        return 0
    memmove(s.arr + i, s.arr + i + 1, (s.n - i - 1) * sizeof(uint32_t))
    s.n -= 1
    if s.n == 0:
        rs_free(self, s)
    elif s.cap > 4 and s.n * 4 <= s.cap:
        cap = s.cap // 2
        arr = <uint32_t *>realloc(s.arr, cap * sizeof(uint32_t))
        if arr != NULL:
            self.set_bytes -= (s.cap - cap) * sizeof(uint32_t)
            s.arr = arr
            s.cap = cap
    return 1


cdef void rs_free(Core self, RSet *s) noexcept:
    if s.bits != NULL:
        self.set_bytes -= self.nwords * sizeof(uint64_t)
        free(s.bits)
        s.bits = NULL
    if s.arr != NULL:
        self.set_bytes -= s.cap * sizeof(uint32_t)
        free(s.arr)
        s.arr = NULL
    s.n = s.cap = 0


cdef int rs_union(Core self, RSet *dst, const RSet *src) except -1:
    """dst |= src."""
    cdef uint32_t i
    cdef int w
    cdef uint32_t n = 0
    if src.n == 0:
        return 0
    if src.bits == NULL:
        for i in range(src.n):
            rs_add(self, dst, src.arr[i])
        return 0
    if dst.bits == NULL:
        rs_to_dense(self, dst)
    for w in range(self.nwords):
        dst.bits[w] |= src.bits[w]
        n += __builtin_popcountll(dst.bits[w])
    dst.n = n
    return 0


cdef list rs_members(const RSet *s, int nwords):
    cdef list out = []
    cdef int w, b
    cdef uint32_t i
    cdef uint64_t word
    if s.bits == NULL:
        for i in range(s.n):
            out.append(s.arr[i])
        return out
    for w in range(nwords):
        word = s.bits[w]
        while word:
            b = __builtin_ctzll(word)
            word &= word - 1
            out.append(w * 64 + b)
    return out


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


cdef _Pattern route_new_pattern(Core self, str text):
    cdef _Pattern p = _Pattern()
    cdef _Route r
    cdef list tokens = text.split(".")
    p.text = text
    p.wild = "*" in tokens or ">" in tokens
    self._patterns[text] = p
    if p.wild:
        p.tokens = tokens
        p.routes = set()
        self._wild[text] = p
        for subject, r in self._routes.items():
            if _match(tokens, subject.split(".")):
                route_link(self, p, subject, r)
    else:
        r = self._routes.get(text)
        if r is not None:
            route_link(self, p, text, r)
    return p


cdef int route_link(Core self, _Pattern p, str subject, _Route r) except -1:
    r.patterns = r.patterns + (p,)
    if p.wild:
        p.routes.add(subject)
    rs_union(self, &r.rs, &p.rs)
    delta_link(self, p, r)
    return 0


cdef void route_unlink_slot(Core self, _Route r, _Pattern p, uint32_t slot) noexcept:
    """``slot`` left pattern ``p``: it leaves route ``r`` too unless another of
    the route's patterns still has it."""
    cdef _Pattern q
    for q in r.patterns:
        if q is not p and rs_has(&q.rs, slot):
            return
    rs_remove(self, &r.rs, slot)


cdef list route_subjects(Core self, _Pattern p):
    """The cached subjects whose route includes pattern p."""
    if p.wild:
        return list(p.routes)
    return [p.text] if p.text in self._routes else []


cdef int route_drop_pattern(Core self, _Pattern p) except -1:
    """Pattern p lost its last subscriber: unlink it from its routes (dropping
    those left with no pattern) and forget it."""
    cdef _Route r
    for subject in route_subjects(self, p):
        r = self._routes[subject]
        r.patterns = tuple([q for q in r.patterns if q is not p])
        if not r.patterns:
            rs_free(self, &r.rs)
            delta_route_release(self, r)
            del self._routes[subject]
    rs_free(self, &p.rs)
    rs_free(self, &p.drs)
    del self._patterns[p.text]
    if p.wild:
        del self._wild[p.text]
        if not self._wild:
            # Negative entries only save matching wildcards: none left.
            for subject in [s for s, r in self._routes.items() if not r.patterns]:
                del self._routes[subject]
    return 0


cdef int route_clear(Core self) except -1:
    cdef _Route r
    cdef _Pattern p
    for p in self._wild.values():
        p.routes.clear()
    for r in self._routes.values():
        rs_free(self, &r.rs)
        delta_route_release(self, r)
    self._routes.clear()
    return 0


cdef _Route route_get(Core self, str subject):
    cdef _Route r = self._routes.get(subject)
    cdef _Pattern p, exact
    cdef list tokens
    if r is not None:
        return r
    self.route_misses += 1
    exact = self._patterns.get(subject)
    if exact is not None and exact.wild:
        exact = None
    if exact is None and not self._wild:
        return _NO_ROUTE
    if len(self._routes) >= self.max_routes:
        # The cache is a cache: drop it whole rather than track recency.
        route_clear(self)
    r = _Route()
    tokens = subject.split(".")
    r.patterns = ()
    self._route_ids += 1
    r.id = self._route_ids
    r.conflate = False
    for ptoks in self._conflate_tokens:
        if _match(ptoks, tokens):
            r.conflate = True
            break
    delta_route_init(self, r, tokens)
    self._routes[subject] = r
    if exact is not None:
        route_link(self, exact, subject, r)
    for p in self._wild.values():
        if _match(p.tokens, tokens):
            route_link(self, p, subject, r)
    return r
