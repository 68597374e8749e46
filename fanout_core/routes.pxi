# Subscriptions: patterns, the route cache (subject -> recipients) and matching.
# Part of fanout_core/_core.pyx (textually included: one extension module).

cdef class _Pattern:
    def __dealloc__(self):
        free(self.bits)
        free(self.dbits)


cdef class _Route:
    def __dealloc__(self):
        free(self.bits)
        delta_route_free(self)


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
                route_link(self, p, subject, r)
    else:
        r = self._routes.get(text)
        if r is not None:
            route_link(self, p, text, r)
    return p


cdef int route_link(Core self, _Pattern p, str subject, _Route r) except -1:
    cdef int i
    r.patterns.append(p)
    p.routes.add(subject)
    if r.bits == NULL:
        r.bits = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
        if r.bits == NULL:
            raise MemoryError()
    for i in range(self.nwords):
        r.bits[i] |= p.bits[i]
    delta_link(self, p, r)
    return 0


cdef _Route route_get(Core self, str subject):
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
    delta_route_init(self, r)
    self._routes[subject] = r
    p = self._patterns.get(subject)
    if p is not None and not p.wild:
        route_link(self, p, subject, r)
    for p in self._wild.values():
        if _match(p.tokens, r.tokens):
            route_link(self, p, subject, r)
    return r
