/*
 * lock.c - robust mutexes, futexes, and the lock, semaphore and event
 * objects of the sync table.
 *
 * Every mutex in a heap is a process-shared, robust, error-checking pthread
 * mutex: the kernel releases it when its holder dies and the next acquirer
 * is told so.  Waiting on anything else is done on a futex word in shared
 * memory (not FUTEX_PRIVATE: the word is seen by several processes).
 */
#include "internal.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* 1 if pid is alive (or not ours to signal), 0 if it has gone. */
int pid_alive(pid_t pid)
{
    if (pid <= 0)
        return 0;
    return kill(pid, 0) == 0 || errno != ESRCH;
}

static struct timespec ns_to_abs(int64_t timeout_ns)
{
    int64_t t = now_ns() + timeout_ns;
    struct timespec ts = { .tv_sec = t / 1000000000,
                           .tv_nsec = t % 1000000000 };
    return ts;
}

int mutex_init_robust(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    int rc;

    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc == 0 ? 0 : LLM_ESYS;
}

/*
 * A waiter woken by an unlock takes the lock only when it runs again; if it
 * is killed in between, the wake-up is lost and the other waiters would
 * sleep for ever on a free lock (robust mutexes cover dead owners, not dead
 * waiters).  So nobody sleeps on a mutex longer than this before looking
 * again.
 */
#define LOST_WAKE_NS 20000000

/*
 * Acquire m, waiting at most timeout_ns (negative: for ever).  Returns 0,
 * LLM_EOWNERDEAD with m held (the caller repairs, then calls
 * mutex_consistent), LLM_ETIMEDOUT, or LLM_EDEADLK.
 */
int mutex_acquire(pthread_mutex_t *m, int64_t timeout_ns)
{
    int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
    int rc = pthread_mutex_trylock(m);

    while (rc == EBUSY && timeout_ns != 0) {
        int64_t left = deadline < 0 ? LOST_WAKE_NS : deadline - now_ns();
        struct timespec ts;

        if (left <= 0) {
            rc = ETIMEDOUT;
            break;
        }
        ts = ns_to_abs(left < LOST_WAKE_NS ? left : LOST_WAKE_NS);
        rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
        if (rc == ETIMEDOUT)
            rc = EBUSY;
    }
    switch (rc) {
    case 0:
        return 0;
    case EOWNERDEAD:
        return LLM_EOWNERDEAD;
    case EBUSY:
    case ETIMEDOUT:
        return LLM_ETIMEDOUT;
    case EDEADLK:
        return LLM_EDEADLK;
    default:
        /* ENOTRECOVERABLE: a holder died and nobody repaired; our bug. */
        LLM_ASSERT(rc == 0);
        return LLM_ESYS;
    }
}

void mutex_consistent(pthread_mutex_t *m)
{
    LLM_ASSERT(pthread_mutex_consistent(m) == 0);
}

void mutex_release(pthread_mutex_t *m)
{
    LLM_ASSERT(pthread_mutex_unlock(m) == 0);
}

/*
 * Sleep while *word == expect, at most timeout_ns (negative: for ever).
 * Returns 0 when woken or the word changed, LLM_ETIMEDOUT, or LLM_EINTR.
 */
int futex_wait(_Atomic uint32_t *word, uint32_t expect, int64_t timeout_ns)
{
    struct timespec rel, *tp = NULL;

    if (timeout_ns >= 0) {
        rel.tv_sec = timeout_ns / 1000000000;
        rel.tv_nsec = timeout_ns % 1000000000;
        tp = &rel;
    }
    if (syscall(SYS_futex, word, FUTEX_WAIT, expect, tp, NULL, 0) == 0)
        return 0;
    if (errno == ETIMEDOUT)
        return LLM_ETIMEDOUT;
    if (errno == EINTR)
        return LLM_EINTR;
    return 0; /* EAGAIN: the word had changed already */
}

void futex_wake(_Atomic uint32_t *word, int n)
{
    syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* ---- the sync table ---- */

static struct llm_sync *sync_get(llm_heap *h, llm_sync_id id, int kind)
{
    uint32_t i = (uint32_t)id, gen = (uint32_t)(id >> 32);
    struct llm_sync *s;

    if (i >= h->hdr->max_syncs)
        return NULL;
    s = sync_entry(h, i);
    if (atomic_load(&s->gen) != gen || atomic_load(&s->kind) == 0)
        return NULL;
    if (kind && atomic_load(&s->kind) != (uint32_t)kind)
        return NULL;
    return s;
}

int llm_sync_create(llm_heap *h, int kind, uint32_t value, llm_sync_id *out)
{
    struct llm_sync *s = NULL;
    uint32_t i;

    if (kind < LLM_SYNC_LOCK || kind > LLM_SYNC_EVENT)
        return LLM_EINVAL;
    heap_lock(h);
    for (i = 0; i < h->hdr->max_syncs; i++) {
        s = sync_entry(h, i);
        if (atomic_load(&s->kind) == 0)
            break;
    }
    if (i == h->hdr->max_syncs) {
        heap_unlock(h);
        return LLM_ETABLEFULL;
    }
    memset(s->holders, 0, sizeof s->holders);
    if (mutex_init_robust(&s->mutex) != 0) {
        heap_unlock(h);
        return LLM_ESYS;
    }
    atomic_store(&s->value, kind == LLM_SYNC_SEM ? value : 0);
    atomic_store(&s->seq, 0);
    atomic_fetch_add(&s->gen, 1);
    atomic_store(&s->kind, (uint32_t)kind);
    *out = (uint64_t)atomic_load(&s->gen) << 32 | i;
    heap_unlock(h);
    return 0;
}

int llm_sync_destroy(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s;

    heap_lock(h);
    s = sync_get(h, id, 0);
    if (s == NULL) {
        heap_unlock(h);
        return LLM_EHANDLE;
    }
    atomic_store(&s->kind, 0);
    atomic_fetch_add(&s->gen, 1);
    atomic_fetch_add(&s->seq, 1);
    atomic_store(&s->value, 1);
    heap_unlock(h);
    futex_wake(&s->seq, INT_MAX);
    futex_wake(&s->value, INT_MAX);
    return 0;
}

int llm_sync_kind(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s = sync_get(h, id, 0);

    return s ? (int)atomic_load(&s->kind) : LLM_EHANDLE;
}

int llm_lock_acquire(llm_heap *h, llm_sync_id id, int64_t timeout_ns)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_LOCK);
    int rc;

    if (s == NULL)
        return LLM_EHANDLE;
    rc = mutex_acquire(&s->mutex, timeout_ns);
    if (rc == LLM_EOWNERDEAD)
        mutex_consistent(&s->mutex);
    return rc;
}

int llm_lock_release(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_LOCK);

    if (s == NULL)
        return LLM_EHANDLE;
    return pthread_mutex_unlock(&s->mutex) == 0 ? 0 : LLM_EPERM;
}

/* Lock a semaphore's own mutex; a dead holder of it changed nothing yet
 * that matters, since its updates are single stores of value and holders. */
static void sem_lock(struct llm_sync *s)
{
    if (mutex_acquire(&s->mutex, -1) == LLM_EOWNERDEAD)
        mutex_consistent(&s->mutex);
}

/* Count one more unit held by pid; expects s->mutex held. */
static void sem_note(struct llm_sync *s, pid_t pid, int delta)
{
    int free_at = -1;

    for (int i = 0; i < LLM_SEM_HOLDERS; i++) {
        if (s->holders[i].pid == pid) {
            s->holders[i].units += (uint32_t)delta;
            if (s->holders[i].units == 0)
                s->holders[i].pid = 0;
            return;
        }
        if (s->holders[i].pid == 0 && free_at < 0)
            free_at = i;
    }
    /* More holding processes than the table tracks: their units are not
     * given back at reclaim.  Sixteen is plenty for a service's replicas. */
    if (delta > 0 && free_at >= 0) {
        s->holders[free_at].pid = pid;
        s->holders[free_at].units = (uint32_t)delta;
    }
}

static int sem_try(struct llm_sync *s)
{
    int got = 0;

    sem_lock(s);
    if (atomic_load(&s->value) > 0) {
        atomic_fetch_sub(&s->value, 1);
        sem_note(s, getpid(), 1);
        got = 1;
    }
    mutex_release(&s->mutex);
    return got;
}

int llm_sem_acquire(llm_heap *h, llm_sync_id id, int64_t timeout_ns)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_SEM);
    int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;

    if (s == NULL)
        return LLM_EHANDLE;
    for (;;) {
        uint32_t seq = atomic_load(&s->seq);
        int64_t left = deadline < 0 ? -1 : deadline - now_ns();
        int rc;

        if (sem_try(s))
            return 0;
        if (deadline >= 0 && left <= 0)
            return LLM_ETIMEDOUT;
        rc = futex_wait(&s->seq, seq, left);
        if (rc == LLM_EINTR)
            return rc;
        if (sync_get(h, id, LLM_SYNC_SEM) == NULL)
            return LLM_EHANDLE;
    }
}

int llm_sem_release(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_SEM);

    if (s == NULL)
        return LLM_EHANDLE;
    sem_lock(s);
    atomic_fetch_add(&s->value, 1);
    sem_note(s, getpid(), -1);
    atomic_fetch_add(&s->seq, 1);
    mutex_release(&s->mutex);
    /* all, not one: a waiter woken and killed before it took the unit
     * would leave the others asleep */
    futex_wake(&s->seq, INT_MAX);
    return 0;
}

int llm_sem_value(llm_heap *h, llm_sync_id id, uint32_t *value)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_SEM);

    if (s == NULL)
        return LLM_EHANDLE;
    *value = atomic_load(&s->value);
    return 0;
}

int llm_event_set(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_EVENT);

    if (s == NULL)
        return LLM_EHANDLE;
    if (atomic_exchange(&s->value, 1) == 0)
        futex_wake(&s->value, INT_MAX);
    return 0;
}

int llm_event_clear(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_EVENT);

    if (s == NULL)
        return LLM_EHANDLE;
    atomic_store(&s->value, 0);
    return 0;
}

int llm_event_is_set(llm_heap *h, llm_sync_id id)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_EVENT);

    if (s == NULL)
        return LLM_EHANDLE;
    return atomic_load(&s->value) != 0;
}

int llm_event_wait(llm_heap *h, llm_sync_id id, int64_t timeout_ns)
{
    struct llm_sync *s = sync_get(h, id, LLM_SYNC_EVENT);
    int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;

    if (s == NULL)
        return LLM_EHANDLE;
    while (atomic_load(&s->value) == 0) {
        int64_t left = deadline < 0 ? -1 : deadline - now_ns();
        int rc;

        if (deadline >= 0 && left <= 0)
            return LLM_ETIMEDOUT;
        rc = futex_wait(&s->value, 0, left);
        if (rc == LLM_EINTR)
            return rc;
        if (sync_get(h, id, LLM_SYNC_EVENT) == NULL)
            return LLM_EHANDLE;
    }
    return 0;
}

/* Give back the semaphore units held by the dead process pid. */
void sync_reclaim(llm_heap *h, pid_t pid)
{
    for (uint32_t i = 0; i < h->hdr->max_syncs; i++) {
        struct llm_sync *s = sync_entry(h, i);
        uint32_t units = 0;

        if (atomic_load(&s->kind) != LLM_SYNC_SEM)
            continue;
        sem_lock(s);
        for (int j = 0; j < LLM_SEM_HOLDERS; j++) {
            if (s->holders[j].pid == pid) {
                units = s->holders[j].units;
                s->holders[j].pid = 0;
                s->holders[j].units = 0;
            }
        }
        atomic_fetch_add(&s->value, units);
        atomic_fetch_add(&s->seq, 1);
        mutex_release(&s->mutex);
        if (units)
            futex_wake(&s->seq, INT_MAX);
    }
}
