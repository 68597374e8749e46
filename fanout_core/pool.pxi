# The flush thread pool (plain C pthreads) and atomics.
# Part of fanout_core/_core.pyx (textually included: one extension module).

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
