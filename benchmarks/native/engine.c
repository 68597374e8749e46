/*
 * The load generator's receive engine: after the Python side has opened a
 * connection and sent the WebSocket handshake (and the subscription), it
 * hands the socket here. One thread per worker process runs an epoll loop
 * over all of that worker's sockets and, per message, does only what the
 * measurement needs: frame parsing, inflating (permessage-deflate, with or
 * without context takeover), the per-client seq check (fanout protocol) or
 * the per-subject counter check (NATS), and one latency histogram bucket.
 * Pings are answered; close frames are answered and the socket closed.
 *
 * Why C: the load generator shares 2 cores with the server it measures and
 * must cost less per message than that server. Pure-Python asyncio spends
 * 5-10 us per message here; this spends well under 1 us plus the recv().
 *
 * Threading: one engine thread (eng_run) and the Python thread (every other
 * call). They share one mutex; the engine thread holds it while it handles
 * one batch of ready sockets, never while waiting in epoll_wait.
 *
 * Notifications to Python go through a pipe, 8 bytes each:
 * (slot << 8) | kind, kind 1 = subscribed/ready, 2 = closed.
 *
 * Build: cc -O2 -shared -fPIC engine.c -lz -lm -lpthread (done by native.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define HB 2100            /* histogram buckets, as benchmarks/common.py */
#define NCLS 2             /* 0 fast, 1 slow readers */
#define NEV 32             /* event counters, see EV_* */
#define RBUF (256 * 1024)
#define MAX_MSG (64u << 20)

enum { F_NATS = 1, F_SLOW = 2, F_DEFLATE = 4, F_NOCTX = 8 };
enum { S_FREE = 0, S_OPEN = 1, S_READY = 2, S_CLOSED = 3 };
enum { N_READY = 1, N_CLOSED = 2 };
/* EV_CLOSE_BASE + (code - 1000) for codes 1000..1015 */
enum {
    EV_CLOSE_BASE = 0, EV_CLOSE_OTHER = 16, EV_EOF = 17, EV_PROTO = 18, EV_INFLATE = 19,
    EV_ERROR_FRAME = 20, EV_THROTTLE = 21, EV_NATS_ERR = 22, EV_OVERSIZE = 23, EV_RESET = 24,
};

typedef struct {
    uint64_t received, gaps, dups, bytes;
    uint64_t hist[HB];
} tally_t;

typedef struct { uint64_t key; int64_t val; } kv_t;

typedef struct {
    unsigned char *p;
    size_t n, cap;
} buf_t;

typedef struct {
    int fd, slot;
    int flags, state, paused;
    int metered;         /* reads only the bytes eng_credit gave it (slow readers at a set rate) */
    int64_t credit;
    int frag_active, frag_comp, frag_op;
    int64_t next_seq;
    buf_t in;    /* incomplete WebSocket frame bytes */
    buf_t frag;  /* fragments of one message */
    buf_t nats;  /* NATS protocol bytes not parsed yet */
    buf_t out;   /* inflated message */
    z_stream *zs;
    kv_t *kv;    /* NATS: last counter per subject (open addressing) */
    int kvcap, kvn;
} conn_t;

typedef struct {
    int ep, notify_fd;
    pthread_mutex_t mu;
    conn_t **conns;
    int nconns;
    tally_t tally[NCLS];
    uint64_t ev[NEV];
    unsigned char *rbuf;
    volatile int stop;
    double inv_log_base;
} eng_t;

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + extra) cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(buf_t *b, const unsigned char *p, size_t n) {
    if (buf_reserve(b, n)) return -1;
    memcpy(b->p + b->n, p, n);
    b->n += n;
    return 0;
}

static void buf_free(buf_t *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }

static void notify(eng_t *e, int slot, int kind) {
    uint64_t v = ((uint64_t)slot << 8) | (uint64_t)kind;
    ssize_t r = write(e->notify_fd, &v, sizeof v);
    (void)r; /* a full pipe loses a notification; Python polls states as a fallback */
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void record_latency(eng_t *e, tally_t *t, int64_t lat_ns) {
    double us = (double)lat_ns / 1000.0;
    if (us < 1.0) us = 1.0;
    long idx = (long)(log(us) * e->inv_log_base);
    if (idx >= HB) idx = HB - 1;
    if (idx < 0) idx = 0;
    t->hist[idx]++;
}

/* Parse a decimal integer at p (n bytes available); *ok = 0 when none. */
static int64_t parse_int(const unsigned char *p, size_t n, size_t *used) {
    int64_t v = 0;
    size_t i = 0;
    int neg = 0;
    while (i < n && p[i] == ' ') i++;
    if (i < n && p[i] == '-') { neg = 1; i++; }
    size_t start = i;
    while (i < n && p[i] >= '0' && p[i] <= '9') { v = v * 10 + (p[i] - '0'); i++; }
    *used = i > start ? i : 0;
    return neg ? -v : v;
}

/* A masked client frame (mask key 0: the XOR is a no-op, the frame is valid). */
static void send_frame(conn_t *c, int op, const unsigned char *p, size_t n) {
    unsigned char hdr[14];
    size_t h = 0;
    if (n > 125) return; /* only small control replies are sent from here */
    hdr[h++] = 0x80 | (unsigned char)op;
    hdr[h++] = 0x80 | (unsigned char)n;
    memset(hdr + h, 0, 4);
    h += 4;
    unsigned char frame[14 + 125];
    memcpy(frame, hdr, h);
    if (n) memcpy(frame + h, p, n);
    ssize_t r = send(c->fd, frame, h + n, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)r;
}

static void conn_close(eng_t *e, conn_t *c, int notify_kind) {
    if (c->state == S_CLOSED || c->state == S_FREE) return;
    epoll_ctl(e->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = S_CLOSED;
    buf_free(&c->in);
    buf_free(&c->frag);
    buf_free(&c->nats);
    buf_free(&c->out);
    if (c->zs) { inflateEnd(c->zs); free(c->zs); c->zs = NULL; }
    free(c->kv); c->kv = NULL; c->kvcap = c->kvn = 0;
    if (notify_kind) notify(e, c->slot, notify_kind);
}

/* ---- NATS per-subject counters ---------------------------------------- */
static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h | 1; /* never 0: 0 marks an empty slot */
}

static int64_t *kv_get(conn_t *c, uint64_t key, int *created) {
    if (c->kvn * 2 >= c->kvcap) {
        int ncap = c->kvcap ? c->kvcap * 2 : 16;
        kv_t *nk = calloc((size_t)ncap, sizeof(kv_t));
        if (!nk) return NULL;
        for (int i = 0; i < c->kvcap; i++) {
            if (!c->kv[i].key) continue;
            int j = (int)(c->kv[i].key & (uint64_t)(ncap - 1));
            while (nk[j].key) j = (j + 1) & (ncap - 1);
            nk[j] = c->kv[i];
        }
        free(c->kv);
        c->kv = nk;
        c->kvcap = ncap;
    }
    int j = (int)(key & (uint64_t)(c->kvcap - 1));
    while (c->kv[j].key && c->kv[j].key != key) j = (j + 1) & (c->kvcap - 1);
    *created = !c->kv[j].key;
    if (*created) { c->kv[j].key = key; c->kvn++; }
    return &c->kv[j].val;
}

/* ---- messages ---------------------------------------------------------- */
static const unsigned char *find(const unsigned char *p, size_t n, const char *needle) {
    return memmem(p, n, needle, strlen(needle));
}

static void fanout_msg(eng_t *e, conn_t *c, const unsigned char *p, size_t n, int64_t now) {
    tally_t *t = &e->tally[(c->flags & F_SLOW) ? 1 : 0];
    if (n > 7 && memcmp(p, "{\"seq\":", 7) == 0) {
        size_t used;
        int64_t seq = parse_int(p + 7, n - 7, &used);
        if (!used) { e->ev[EV_PROTO]++; return; }
        if (seq >= c->next_seq) {
            t->gaps += (uint64_t)(seq - c->next_seq);
            c->next_seq = seq + 1;
            t->received++;
        } else {
            t->dups++;
        }
        t->bytes += n;
        size_t off = 7 + used;
        const unsigned char *d = find(p + off, n - off, "\"t\":");
        if (d) {
            int64_t ts = parse_int(d + 4, (size_t)(p + n - (d + 4)), &used);
            if (used) record_latency(e, t, now - ts);
        }
        return;
    }
    if (find(p, n, "\"subscribed\"")) {
        if (c->state == S_OPEN) { c->state = S_READY; notify(e, c->slot, N_READY); }
    } else if (find(p, n, "\"error\"")) {
        e->ev[EV_ERROR_FRAME]++;
    } else if (find(p, n, "\"throttle_update\"")) {
        e->ev[EV_THROTTLE]++;
    }
}

/* Parse NATS protocol bytes; returns how many were consumed. */
static size_t nats_parse(eng_t *e, conn_t *c, const unsigned char *p, size_t n, int64_t now) {
    tally_t *t = &e->tally[(c->flags & F_SLOW) ? 1 : 0];
    size_t pos = 0;
    while (pos < n) {
        const unsigned char *nl = memmem(p + pos, n - pos, "\r\n", 2);
        if (!nl) break;
        size_t le = (size_t)(nl - p); /* line end */
        const unsigned char *l = p + pos;
        size_t ll = le - pos;
        if (ll > 4 && memcmp(l, "MSG ", 4) == 0) {
            /* MSG <subject> <sid> [reply] <size> */
            size_t s0 = 4, s1 = s0;
            while (s1 < ll && l[s1] != ' ') s1++;
            size_t k = ll;
            while (k > 0 && l[k - 1] != ' ') k--;
            size_t used;
            int64_t size = parse_int(l + k, ll - k, &used);
            if (!used || size < 0) { e->ev[EV_PROTO]++; return n; }
            size_t ps = le + 2, pe = ps + (size_t)size;
            if (pe + 2 > n) break;
            pos = pe + 2;
            const unsigned char *pl = p + ps;
            size_t pn = (size_t)size;
            t->bytes += pn;
            const unsigned char *d = find(pl, pn, "\"t\":");
            if (d) {
                int64_t ts = parse_int(d + 4, (size_t)(pl + pn - (d + 4)), &used);
                if (used) record_latency(e, t, now - ts);
            }
            const unsigned char *di = find(pl, pn, "\"i\":");
            if (!di) { t->received++; continue; }
            int64_t i = parse_int(di + 4, (size_t)(pl + pn - (di + 4)), &used);
            int created;
            int64_t *last = kv_get(c, fnv1a(l + s0, s1 - s0), &created);
            if (!last) { t->received++; continue; }
            if (created || i > *last) {
                if (!created && i > *last + 1) t->gaps += (uint64_t)(i - *last - 1);
                *last = i;
                t->received++;
            } else {
                t->dups++;
            }
        } else if (ll >= 4 && memcmp(l, "PING", 4) == 0) {
            send_frame(c, 2, (const unsigned char *)"PONG\r\n", 6);
            pos = le + 2;
        } else if (ll >= 4 && memcmp(l, "PONG", 4) == 0) {
            if (c->state == S_OPEN) { c->state = S_READY; notify(e, c->slot, N_READY); }
            pos = le + 2;
        } else {
            if (ll >= 4 && memcmp(l, "-ERR", 4) == 0) e->ev[EV_NATS_ERR]++;
            pos = le + 2; /* INFO, +OK */
        }
    }
    return pos;
}

static void nats_msg(eng_t *e, conn_t *c, const unsigned char *p, size_t n, int64_t now) {
    if (c->nats.n) {
        if (buf_append(&c->nats, p, n)) { e->ev[EV_OVERSIZE]++; return; }
        size_t used = nats_parse(e, c, c->nats.p, c->nats.n, now);
        if (c->state == S_CLOSED) return;
        memmove(c->nats.p, c->nats.p + used, c->nats.n - used);
        c->nats.n -= used;
    } else {
        size_t used = nats_parse(e, c, p, n, now);
        if (c->state == S_CLOSED) return;
        if (used < n && buf_append(&c->nats, p + used, n - used)) e->ev[EV_OVERSIZE]++;
    }
}

static void deliver(eng_t *e, conn_t *c, const unsigned char *p, size_t n, int comp, int64_t now) {
    if (comp) {
        if (!c->zs) { e->ev[EV_PROTO]++; conn_close(e, c, N_CLOSED); return; }
        static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
        c->out.n = 0;
        z_stream *zs = c->zs;
        for (int part = 0; part < 2; part++) {
            zs->next_in = (unsigned char *)(part ? tail : p);
            zs->avail_in = (uInt)(part ? 4 : n);
            do {
                if (buf_reserve(&c->out, n * 4 + 4096)) { e->ev[EV_OVERSIZE]++; return; }
                zs->next_out = c->out.p + c->out.n;
                zs->avail_out = (uInt)(c->out.cap - c->out.n);
                int r = inflate(zs, Z_SYNC_FLUSH);
                c->out.n = c->out.cap - zs->avail_out;
                if (r == Z_BUF_ERROR) break; /* no progress possible: needs more input */
                if (r != Z_OK && r != Z_STREAM_END) {
                    e->ev[EV_INFLATE]++;
                    conn_close(e, c, N_CLOSED);
                    return;
                }
                if (c->out.n > MAX_MSG) { e->ev[EV_OVERSIZE]++; conn_close(e, c, N_CLOSED); return; }
            } while (zs->avail_in || zs->avail_out == 0);
        }
        if (c->flags & F_NOCTX) inflateReset(zs);
        p = c->out.p;
        n = c->out.n;
    }
    if (c->flags & F_NATS) nats_msg(e, c, p, n, now);
    else fanout_msg(e, c, p, n, now);
}

static void control(eng_t *e, conn_t *c, int op, const unsigned char *p, size_t n) {
    if (op == 9) {
        send_frame(c, 10, p, n);
    } else if (op == 8) {
        int code = n >= 2 ? (p[0] << 8) | p[1] : 1005;
        if (code >= 1000 && code <= 1015) e->ev[EV_CLOSE_BASE + code - 1000]++;
        else e->ev[EV_CLOSE_OTHER]++;
        send_frame(c, 8, p, n >= 2 ? 2 : 0);
        conn_close(e, c, N_CLOSED);
    } else if (op != 10) {
        e->ev[EV_PROTO]++;
        conn_close(e, c, N_CLOSED);
    }
}

/* Parse complete frames in p[0..n); returns bytes consumed. */
static size_t frames(eng_t *e, conn_t *c, const unsigned char *p, size_t n, int64_t now) {
    size_t pos = 0;
    while (n - pos >= 2) {
        unsigned b0 = p[pos], b1 = p[pos + 1];
        if (b1 & 0x80) { e->ev[EV_PROTO]++; conn_close(e, c, N_CLOSED); return n; }
        uint64_t ln = b1 & 0x7f;
        size_t h = 2;
        if (ln == 126) {
            if (n - pos < 4) break;
            ln = ((uint64_t)p[pos + 2] << 8) | p[pos + 3];
            h = 4;
        } else if (ln == 127) {
            if (n - pos < 10) break;
            ln = 0;
            for (int i = 0; i < 8; i++) ln = (ln << 8) | p[pos + 2 + i];
            h = 10;
        }
        if (ln > MAX_MSG) { e->ev[EV_OVERSIZE]++; conn_close(e, c, N_CLOSED); return n; }
        if (n - pos < h + ln) break;
        const unsigned char *pl = p + pos + h;
        pos += h + (size_t)ln;
        int op = b0 & 0x0f, fin = b0 & 0x80, rsv1 = (b0 & 0x40) != 0;
        if (op >= 8) {
            control(e, c, op, pl, (size_t)ln);
        } else if (op == 0) {
            if (!c->frag_active) { e->ev[EV_PROTO]++; conn_close(e, c, N_CLOSED); return n; }
            if (buf_append(&c->frag, pl, (size_t)ln)) { e->ev[EV_OVERSIZE]++; return n; }
            if (fin) {
                c->frag_active = 0;
                deliver(e, c, c->frag.p, c->frag.n, c->frag_comp, now);
                if (c->state != S_CLOSED) c->frag.n = 0;
            }
        } else if (!fin) {
            c->frag_active = 1;
            c->frag_comp = rsv1;
            c->frag_op = op;
            c->frag.n = 0;
            if (buf_append(&c->frag, pl, (size_t)ln)) { e->ev[EV_OVERSIZE]++; return n; }
        } else {
            deliver(e, c, pl, (size_t)ln, rsv1, now);
        }
        if (c->state == S_CLOSED) return n;
    }
    return pos;
}

/* Bytes arrived for c: parse with whatever was left from last time. */
static void feed(eng_t *e, conn_t *c, const unsigned char *p, size_t n, int64_t now) {
    if (c->in.n) {
        if (buf_append(&c->in, p, n)) { e->ev[EV_OVERSIZE]++; conn_close(e, c, N_CLOSED); return; }
        size_t used = frames(e, c, c->in.p, c->in.n, now);
        if (c->state == S_CLOSED) return;
        memmove(c->in.p, c->in.p + used, c->in.n - used);
        c->in.n -= used;
    } else {
        size_t used = frames(e, c, p, n, now);
        if (c->state == S_CLOSED) return;
        if (used < n && buf_append(&c->in, p + used, n - used)) {
            e->ev[EV_OVERSIZE]++;
            conn_close(e, c, N_CLOSED);
        }
    }
}

/* ---- API --------------------------------------------------------------- */
eng_t *eng_new(int notify_fd) {
    eng_t *e = calloc(1, sizeof(eng_t));
    if (!e) return NULL;
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    e->notify_fd = notify_fd;
    e->rbuf = malloc(RBUF);
    e->inv_log_base = 1.0 / log(1.01);
    pthread_mutex_init(&e->mu, NULL);
    return e;
}

int eng_add(eng_t *e, int fd, int slot, int flags, const unsigned char *left, size_t nleft) {
    pthread_mutex_lock(&e->mu);
    if (slot >= e->nconns) {
        int ncap = e->nconns ? e->nconns : 1024;
        while (ncap <= slot) ncap *= 2;
        conn_t **nc = realloc(e->conns, sizeof(conn_t *) * (size_t)ncap);
        if (!nc) { pthread_mutex_unlock(&e->mu); return -1; }
        memset(nc + e->nconns, 0, sizeof(conn_t *) * (size_t)(ncap - e->nconns));
        e->conns = nc;
        e->nconns = ncap;
    }
    conn_t *c = e->conns[slot];
    if (!c) c = e->conns[slot] = calloc(1, sizeof(conn_t));
    else if (c->state != S_FREE && c->state != S_CLOSED) { pthread_mutex_unlock(&e->mu); return -2; }
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->slot = slot;
    c->flags = flags;
    c->state = S_OPEN;
    c->next_seq = 1;
    if (flags & F_DEFLATE) {
        c->zs = calloc(1, sizeof(z_stream));
        inflateInit2(c->zs, -15);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)slot};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        c->state = S_FREE;
        pthread_mutex_unlock(&e->mu);
        return -3;
    }
    if (nleft) feed(e, c, left, nleft, now_ns());
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int eng_state(eng_t *e, int slot) {
    pthread_mutex_lock(&e->mu);
    int s = (slot < e->nconns && e->conns[slot]) ? e->conns[slot]->state : S_FREE;
    pthread_mutex_unlock(&e->mu);
    return s;
}

void eng_pause(eng_t *e, int slot, int paused) {
    pthread_mutex_lock(&e->mu);
    conn_t *c = slot < e->nconns ? e->conns[slot] : NULL;
    if (c && (c->state == S_OPEN || c->state == S_READY) && c->paused != paused) {
        struct epoll_event ev = {.events = paused ? 0 : EPOLLIN, .data.u32 = (uint32_t)slot};
        epoll_ctl(e->ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->paused = paused;
    }
    pthread_mutex_unlock(&e->mu);
}

/* A metered reader: may read `bytes` more (then it pauses until the next
 * credit). The credit is capped at `cap`, so a reader that got nothing to
 * read for a while does not then read a burst. */
void eng_credit(eng_t *e, int slot, int64_t bytes, int64_t cap) {
    pthread_mutex_lock(&e->mu);
    conn_t *c = slot < e->nconns ? e->conns[slot] : NULL;
    if (c && (c->state == S_OPEN || c->state == S_READY)) {
        c->metered = 1;
        c->credit += bytes;
        if (c->credit > cap) c->credit = cap;
        if (c->credit > 0 && c->paused) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)slot};
            epoll_ctl(e->ep, EPOLL_CTL_MOD, c->fd, &ev);
            c->paused = 0;
        }
    }
    pthread_mutex_unlock(&e->mu);
}

/* Close from the Python side: a close frame with `code`, then the socket
 * (no wait for the server's answer). No notification. */
void eng_close(eng_t *e, int slot, int code) {
    pthread_mutex_lock(&e->mu);
    conn_t *c = slot < e->nconns ? e->conns[slot] : NULL;
    if (c && (c->state == S_OPEN || c->state == S_READY)) {
        unsigned char p[2] = {(unsigned char)(code >> 8), (unsigned char)code};
        send_frame(c, 8, p, 2);
        conn_close(e, c, 0);
    }
    pthread_mutex_unlock(&e->mu);
}

int eng_open_count(eng_t *e) {
    int n = 0;
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < e->nconns; i++)
        if (e->conns[i] && e->conns[i]->state == S_READY) n++;
    pthread_mutex_unlock(&e->mu);
    return n;
}

/* out: per class [received, gaps, dups, bytes, n_ready, hist[HB]], then ev[NEV].
 * The histograms are handed over and zeroed (deltas); counters are totals. */
void eng_stats(eng_t *e, uint64_t *out) {
    pthread_mutex_lock(&e->mu);
    uint64_t ready[NCLS] = {0, 0};
    for (int i = 0; i < e->nconns; i++) {
        conn_t *c = e->conns[i];
        if (c && c->state == S_READY) ready[(c->flags & F_SLOW) ? 1 : 0]++;
    }
    size_t o = 0;
    for (int k = 0; k < NCLS; k++) {
        tally_t *t = &e->tally[k];
        out[o++] = t->received;
        out[o++] = t->gaps;
        out[o++] = t->dups;
        out[o++] = t->bytes;
        out[o++] = ready[k];
        memcpy(out + o, t->hist, sizeof t->hist);
        memset(t->hist, 0, sizeof t->hist);
        o += HB;
    }
    memcpy(out + o, e->ev, sizeof e->ev);
    pthread_mutex_unlock(&e->mu);
}

void eng_reset(eng_t *e) {
    pthread_mutex_lock(&e->mu);
    memset(e->tally, 0, sizeof e->tally);
    memset(e->ev, 0, sizeof e->ev);
    pthread_mutex_unlock(&e->mu);
}

/* The engine thread: runs until eng_stop. Called with the GIL released. */
void eng_run(eng_t *e) {
    struct epoll_event evs[256];
    while (!e->stop) {
        int k = epoll_wait(e->ep, evs, 256, 100);
        if (k <= 0) continue;
        int64_t now = now_ns();
        pthread_mutex_lock(&e->mu);
        for (int i = 0; i < k; i++) {
            int slot = (int)evs[i].data.u32;
            conn_t *c = slot < e->nconns ? e->conns[slot] : NULL;
            if (!c || (c->state != S_OPEN && c->state != S_READY) || c->paused) continue;
            for (int rounds = 0; rounds < 4; rounds++) {
                size_t want = RBUF;
                if (c->metered) {
                    if (c->credit <= 0) {
                        struct epoll_event ev = {.events = 0, .data.u32 = (uint32_t)slot};
                        epoll_ctl(e->ep, EPOLL_CTL_MOD, c->fd, &ev);
                        c->paused = 1;
                        break;
                    }
                    if ((int64_t)want > c->credit) want = (size_t)c->credit;
                }
                ssize_t r = recv(c->fd, e->rbuf, want, MSG_DONTWAIT);
                if (r > 0) {
                    if (c->metered) c->credit -= r;
                    feed(e, c, e->rbuf, (size_t)r, now);
                    if (c->state == S_CLOSED || r < RBUF) break;
                } else if (r == 0) {
                    e->ev[EV_EOF]++;
                    conn_close(e, c, N_CLOSED);
                    break;
                } else {
                    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                        e->ev[EV_RESET]++;
                        conn_close(e, c, N_CLOSED);
                    }
                    break;
                }
            }
        }
        pthread_mutex_unlock(&e->mu);
    }
}

void eng_stop(eng_t *e) { e->stop = 1; }

void eng_free(eng_t *e) {
    for (int i = 0; i < e->nconns; i++) {
        conn_t *c = e->conns[i];
        if (!c) continue;
        conn_close(e, c, 0);
        free(c);
    }
    free(e->conns);
    free(e->rbuf);
    close(e->ep);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

int eng_hist_buckets(void) { return HB; }
int eng_n_events(void) { return NEV; }
