/*
 * chan.c - bounded MPSC channels: a ring of slots in a block owned by the
 * receiver, and an entry of the heap's channel table holding the ring's
 * indices, the senders' robust lock and the futex words.
 *
 * Senders take send_lock, write the slot at tail, and publish it by storing
 * tail + 1 with release order; the receiver reads the slot at head and
 * hands it back by storing head + 1.  A sender that hands over a block
 * records it in pend_* first, so that whoever next takes send_lock after
 * that sender died (another sender, or reclaim) can finish or undo the
 * hand-over: see chan_repair().
 *
 * Sleeping: the receiver sets rx_sleeping, then re-checks tail, then
 * sleeps on rx_seq; a sender stores tail, then reads rx_sleeping, and only
 * if it is set bumps rx_seq and wakes.  A sequentially consistent fence on
 * both sides makes sure one of them sees the other.  Full channels use
 * tx_waiting and tx_seq the same way in the other direction.
 */
#include "internal.h"

#include <limits.h>
#include <sched.h>
#include <string.h>

#define SEND_CHECK_NS 50000000 /* a blocked sender looks at its receiver */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static struct llm_chan *chan_get(llm_heap *h, llm_chan_id id)
{
    uint32_t i = (uint32_t)id;
    struct llm_chan *c;

    if (i >= h->hdr->max_channels)
        return NULL;
    c = chan_entry(h, i);
    if (atomic_load(&c->gen) != (uint32_t)(id >> 32) ||
        atomic_load(&c->state) == CHAN_FREE)
        return NULL;
    return c;
}

static char *chan_slot(llm_heap *h, struct llm_chan *c, uint64_t pos)
{
    return h->base + handle_off(c->ring) +
           (size_t)(pos & (c->capacity - 1)) * c->slot_size;
}

/*
 * Finish or undo the send of a sender that died holding send_lock.  A
 * published message stays; an unpublished block goes back to the dead
 * sender, so that reclaiming the sender frees it.  send_lock held.
 */
static void chan_repair(llm_heap *h, struct llm_chan *c)
{
    if (c->pend_stage == 1 && atomic_load(&c->tail) == c->pend_pos)
        llm_give(h, c->pend_handle, c->pend_pid);
    c->pend_stage = 0;
}

static void chan_lock(llm_heap *h, struct llm_chan *c)
{
    if (mutex_acquire(&c->send_lock, -1) == LLM_EOWNERDEAD) {
        chan_repair(h, c);
        mutex_consistent(&c->send_lock);
    }
}

static void wake_senders(struct llm_chan *c)
{
    atomic_store(&c->tx_waiting, 0);
    atomic_fetch_add(&c->tx_seq, 1);
    futex_wake(&c->tx_seq, INT_MAX);
}

static void wake_receiver(struct llm_chan *c)
{
    atomic_fetch_add(&c->rx_seq, 1);
    futex_wake(&c->rx_seq, 1);
}

int llm_chan_create(llm_heap *h, uint32_t capacity, uint32_t slot_size,
                    llm_chan_id *out)
{
    struct llm_chan *c = NULL;
    llm_handle ring;
    void *ptr;
    uint32_t cap = 2, i;
    int rc;

    if (slot_size == 0)
        slot_size = 128;
    if (capacity == 0 || capacity > (1u << 24) || slot_size % 16 ||
        slot_size < 32 || slot_size > (1u << 20))
        return LLM_EINVAL;
    while (cap < capacity)
        cap <<= 1;
    rc = llm_malloc(h, (size_t)cap * slot_size, &ring, &ptr);
    if (rc != 0)
        return rc;

    heap_lock(h);
    for (i = 0; i < h->hdr->max_channels; i++) {
        c = chan_entry(h, i);
        if (atomic_load(&c->state) == CHAN_FREE)
            break;
    }
    if (i == h->hdr->max_channels) {
        heap_unlock(h);
        llm_free(h, ring);
        return LLM_ETABLEFULL;
    }
    c->capacity = cap;
    c->slot_size = slot_size;
    c->ring = ring;
    c->pend_stage = 0;
    c->sent = c->wakeups = 0;
    atomic_store(&c->receiver, h->pid);
    atomic_store(&c->tail, 0);
    atomic_store(&c->head, 0);
    atomic_store(&c->rx_sleeping, 0);
    atomic_store(&c->tx_waiting, 0);
    atomic_fetch_add(&c->gen, 1);
    atomic_store(&c->state, CHAN_OPEN);
    *out = (uint64_t)atomic_load(&c->gen) << 32 | i;
    heap_unlock(h);
    return 0;
}

/* Close c and wake everyone; send_lock held. */
static void chan_close_locked(struct llm_chan *c)
{
    atomic_store(&c->state, CHAN_CLOSED);
    wake_senders(c);
    wake_receiver(c);
}

int llm_chan_close(llm_heap *h, llm_chan_id id)
{
    struct llm_chan *c = chan_get(h, id);

    if (c == NULL)
        return LLM_EHANDLE;
    chan_lock(h, c);
    if (atomic_load(&c->gen) == (uint32_t)(id >> 32))
        chan_close_locked(c);
    mutex_release(&c->send_lock);
    return 0;
}

/* Free the table entry of c; send_lock held, takes the heap lock. */
static void chan_release_entry(llm_heap *h, struct llm_chan *c)
{
    chan_close_locked(c);
    heap_lock(h);
    atomic_fetch_add(&c->gen, 1);
    atomic_store(&c->state, CHAN_FREE);
    heap_unlock(h);
}

int llm_chan_destroy(llm_heap *h, llm_chan_id id)
{
    struct llm_chan *c = chan_get(h, id);
    llm_handle ring;

    if (c == NULL)
        return LLM_EHANDLE;
    if (atomic_load(&c->receiver) != h->pid)
        return LLM_EPERM;
    chan_lock(h, c);
    if (atomic_load(&c->gen) != (uint32_t)(id >> 32)) {
        mutex_release(&c->send_lock);
        return LLM_EHANDLE;
    }
    ring = c->ring;
    /* blocks still queued belong to us, the receiver: free them */
    for (uint64_t p = atomic_load(&c->head); p != atomic_load(&c->tail); p++) {
        struct llm_slot *s = (struct llm_slot *)chan_slot(h, c, p);
        if (s->kind == LLM_MSG_BLOCK || s->kind == LLM_MSG_BLOB)
            llm_free(h, s->handle);
    }
    chan_release_entry(h, c);
    mutex_release(&c->send_lock);
    return llm_free(h, ring);
}

/* Close and free the channels that pid received on; repair the ones whose
 * sender died mid-send.  Called by reclaim, before it takes the heap lock. */
void chan_reclaim(llm_heap *h, pid_t pid)
{
    for (uint32_t i = 0; i < h->hdr->max_channels; i++) {
        struct llm_chan *c = chan_entry(h, i);

        if (atomic_load(&c->state) == CHAN_FREE)
            continue;
        chan_lock(h, c);
        if (atomic_load(&c->state) != CHAN_FREE &&
            atomic_load(&c->receiver) == pid)
            chan_release_entry(h, c);
        mutex_release(&c->send_lock);
    }
}

/*
 * Wait for room in c, as the caller of send; send_lock held on entry and
 * on a 0 return, released otherwise.  Returns 0 when there is room.
 */
static int wait_room(llm_heap *h, struct llm_chan *c, uint32_t gen,
                     int64_t deadline)
{
    for (;;) {
        uint32_t seq = atomic_load(&c->tx_seq);
        int64_t left;
        int rc;

        if (atomic_load(&c->gen) != gen ||
            atomic_load(&c->state) != CHAN_OPEN) {
            mutex_release(&c->send_lock);
            return LLM_ECLOSED;
        }
        atomic_store(&c->tx_waiting, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&c->tail) - atomic_load(&c->head) < c->capacity)
            return 0;
        mutex_release(&c->send_lock);

        if (deadline == 0)
            return LLM_EAGAIN;
        if (!pid_alive(atomic_load(&c->receiver))) {
            llm_chan_close(h, (uint64_t)gen << 32 |
                                  (uint32_t)(c - chan_entry(h, 0)));
            return LLM_ECLOSED;
        }
        left = deadline < 0 ? SEND_CHECK_NS : deadline - now_ns();
        if (left <= 0)
            return LLM_ETIMEDOUT;
        rc = futex_wait(&c->tx_seq, seq,
                        left < SEND_CHECK_NS ? left : SEND_CHECK_NS);
        if (rc == LLM_EINTR)
            return rc;
        chan_lock(h, c);
    }
}

int llm_chan_send(llm_heap *h, llm_chan_id id, const struct llm_msg *msg,
                  int64_t timeout_ns)
{
    struct llm_chan *c = chan_get(h, id);
    uint32_t gen = (uint32_t)(id >> 32);
    int64_t deadline = timeout_ns < 0 ? -1
                       : timeout_ns == 0 ? 0 : now_ns() + timeout_ns;
    struct llm_slot *s;
    uint64_t tail;
    int rc;

    if (c == NULL)
        return LLM_ECLOSED;
    if (msg->kind == LLM_MSG_BYTES &&
        msg->len > c->slot_size - LLM_SLOT_HEADER)
        return LLM_ETOOBIG;
    chan_lock(h, c);
    tail = atomic_load_explicit(&c->tail, memory_order_relaxed);
    if (atomic_load(&c->gen) != gen || atomic_load(&c->state) != CHAN_OPEN ||
        tail - atomic_load(&c->head) >= c->capacity) {
        rc = wait_room(h, c, gen, deadline);
        if (rc != 0)
            return rc;
        tail = atomic_load_explicit(&c->tail, memory_order_relaxed);
    }

    s = (struct llm_slot *)chan_slot(h, c, tail);
    if (msg->kind == LLM_MSG_BLOCK || msg->kind == LLM_MSG_BLOB) {
        c->pend_pid = h->pid;
        c->pend_pos = tail;
        c->pend_handle = msg->handle;
        c->pend_stage = 1;
        rc = llm_give(h, msg->handle, atomic_load(&c->receiver));
        if (rc != 0) {
            c->pend_stage = 0;
            mutex_release(&c->send_lock);
            return rc;
        }
    } else if (msg->kind == LLM_MSG_BYTES) {
        memcpy(s + 1, msg->data, msg->len);
    }
    s->kind = msg->kind;
    s->len = msg->len;
    s->handle = msg->handle;
    atomic_store_explicit(&c->tail, tail + 1, memory_order_release);
    c->pend_stage = 0;
    c->sent++;
    atomic_thread_fence(memory_order_seq_cst);
    rc = atomic_load_explicit(&c->rx_sleeping, memory_order_relaxed);
    if (rc)
        c->wakeups++;
    mutex_release(&c->send_lock);
    if (rc)
        wake_receiver(c);
    return 0;
}

static int chan_ready(struct llm_chan *c, uint64_t head)
{
    return atomic_load_explicit(&c->tail, memory_order_acquire) != head;
}

/*
 * Spin until a message arrives or spin_ns pass; 1 if one arrived.  After
 * the first SPIN_PURE_NS the spinner yields the CPU between looks, so that
 * on a machine with more spinners than CPUs the process it waits for can
 * run (with a CPU to spare, sched_yield() returns at once).
 */
#define SPIN_PURE_NS 5000

static int spin_wait(struct llm_chan *c, uint64_t head, int64_t spin_ns)
{
    int64_t start, t;

    if (spin_ns <= 0)
        return 0;
    start = now_ns();
    do {
        for (int k = 0; k < 64; k++) {
            if (chan_ready(c, head))
                return 1;
            cpu_relax();
        }
        t = now_ns();
        if (t - start > SPIN_PURE_NS)
            sched_yield();
    } while (t - start < spin_ns);
    return chan_ready(c, head);
}

/* Sleep until a message arrives, the channel closes, or the deadline. */
static int sleep_wait(struct llm_chan *c, uint64_t head, uint32_t gen,
                      int64_t deadline)
{
    for (;;) {
        uint32_t seq = atomic_load(&c->rx_seq);
        int64_t left = deadline < 0 ? -1 : deadline - now_ns();
        int rc = 0;

        atomic_store(&c->rx_sleeping, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (chan_ready(c, head))
            break;
        if (atomic_load(&c->gen) != gen ||
            atomic_load(&c->state) != CHAN_OPEN)
            rc = LLM_ECLOSED;
        else if (deadline >= 0 && left <= 0)
            rc = LLM_ETIMEDOUT;
        else
            rc = futex_wait(&c->rx_seq, seq, left);
        if (rc == LLM_ECLOSED || rc == LLM_ETIMEDOUT || rc == LLM_EINTR) {
            atomic_store(&c->rx_sleeping, 0);
            return rc;
        }
    }
    atomic_store(&c->rx_sleeping, 0);
    return 0;
}

int llm_chan_recv(llm_heap *h, llm_chan_id id, struct llm_msg *msg,
                  int64_t timeout_ns, int64_t spin_ns)
{
    struct llm_chan *c = chan_get(h, id);
    uint64_t head;
    struct llm_slot *s;

    if (c == NULL)
        return LLM_ECLOSED;
    head = atomic_load_explicit(&c->head, memory_order_relaxed);
    if (!chan_ready(c, head)) {
        int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
        int rc;

        if (timeout_ns == 0)
            return atomic_load(&c->state) == CHAN_OPEN ? LLM_EAGAIN
                                                       : LLM_ECLOSED;
        if (spin_ns > timeout_ns && timeout_ns > 0)
            spin_ns = timeout_ns;
        if (!spin_wait(c, head, spin_ns)) {
            rc = sleep_wait(c, head, (uint32_t)(id >> 32), deadline);
            if (rc != 0)
                return rc;
        }
    }
    s = (struct llm_slot *)chan_slot(h, c, head);
    msg->kind = s->kind;
    msg->len = s->len;
    msg->handle = s->handle;
    msg->data = s + 1;
    return 0;
}

void llm_chan_release(llm_heap *h, llm_chan_id id)
{
    struct llm_chan *c = chan_get(h, id);

    if (c == NULL)
        return;
    atomic_store_explicit(&c->head, atomic_load(&c->head) + 1,
                          memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&c->tx_waiting, memory_order_relaxed))
        wake_senders(c);
}

int llm_chan_stats(llm_heap *h, llm_chan_id id, struct llm_chan_stats *st)
{
    struct llm_chan *c = chan_get(h, id);

    if (c == NULL)
        return LLM_EHANDLE;
    st->receiver = atomic_load(&c->receiver);
    st->capacity = c->capacity;
    st->slot_size = c->slot_size;
    st->queued = (uint32_t)(atomic_load(&c->tail) - atomic_load(&c->head));
    st->closed = atomic_load(&c->state) != CHAN_OPEN;
    st->receiver_sleeping = atomic_load(&c->rx_sleeping) != 0;
    st->sent = c->sent;
    st->wakeups = c->wakeups;
    return 0;
}

uint32_t llm_chan_max_inline(llm_heap *h, llm_chan_id id)
{
    struct llm_chan *c = chan_get(h, id);

    return c ? c->slot_size - LLM_SLOT_HEADER : 0;
}
