/*
 * pool.c - size-class pools for small blocks.
 *
 * Small blocks (up to page_size / 2) are carved from spans: page runs cut
 * into equal slots of one size class, each slot a 16-byte block header and
 * the block.  Every span has one owner process, whose cache allocates from
 * it; the fast path pops the span's local free list under the process's
 * own cache lock: no system call, no lock shared with other processes.
 * A block freed by a process that does not own its span is pushed onto the
 * span's remote free list with compare-and-swap, and the owner takes the
 * whole list back when its local list runs dry (as mimalloc does).
 *
 * A block header's word (generation and state) is the commit point of
 * malloc and free; the lists are rebuilt from those words when a span's
 * owner dies (pool_reclaim_span), and the span is then an orphan until a
 * process adopts it or its last block is freed.
 */
#include "internal.h"

#include <string.h>

/* Block size of class i: 16-byte steps to 128, then four steps per
 * doubling. */
static size_t class_size(unsigned i)
{
    unsigned k, step;

    if (i < 8)
        return (i + 1) * 16u;
    k = 7 + (i - 8) / 4;
    step = (i - 8) % 4;
    return ((size_t)1 << k) + (size_t)(step + 1) * ((size_t)1 << (k - 2));
}

void pool_init_classes(struct llm_hdr *hdr)
{
    unsigned i;

    for (i = 0; i < LLM_MAX_CLASSES; i++) {
        size_t size = class_size(i), slot = size + sizeof(struct llm_block);
        size_t need = sizeof(struct llm_span) + LLM_SPAN_MIN_SLOTS * slot;

        if (size > hdr->page_size / 2)
            break;
        hdr->class_size[i] = (uint32_t)size;
        hdr->class_span_pages[i] =
            (uint32_t)((need + hdr->page_size - 1) / hdr->page_size);
    }
    hdr->nclasses = i;
}

unsigned pool_class_of(const struct llm_hdr *hdr, size_t n)
{
    unsigned k, step;

    if (hdr->nclasses == 0 || n > hdr->class_size[hdr->nclasses - 1])
        return hdr->nclasses;
    if (n <= 128)
        return (unsigned)((n + 15) / 16) - (n > 0);
    k = 63u - (unsigned)__builtin_clzll(n - 1);
    step = (unsigned)((n - 1 - ((size_t)1 << k)) >> (k - 2));
    return 8 + (k - 7) * 4 + step;
}

unsigned llm_nclasses(const llm_heap *h) { return h->hdr->nclasses; }

size_t llm_class_size(const llm_heap *h, unsigned i)
{
    return i < h->hdr->nclasses ? h->hdr->class_size[i] : 0;
}

struct llm_span *span_at(llm_heap *h, uint32_t page)
{
    return (struct llm_span *)page_addr(h, page);
}

static struct llm_block *slot_at(struct llm_span *sp, uint32_t i)
{
    return (struct llm_block *)((char *)sp + sp->first +
                                (size_t)i * sp->slot_size);
}

void pool_reset_cache(llm_heap *h)
{
    for (unsigned i = 0; i < LLM_MAX_CLASSES; i++)
        h->cur[i] = h->mine[i] = LLM_NIL;
}

/*
 * Take the remote free list back into the local one.  Expects the span
 * held by the caller: its owner's cache lock, or the heap lock for an
 * orphan.  Returns the new local head.  collecting always names the part
 * of the taken list not yet moved, so a caller killed half-way leaves
 * nothing that pool_reclaim_span() cannot find.
 */
static uint32_t span_collect(struct llm_span *sp)
{
    uint32_t i = atomic_load(&sp->remote_free);

    do {
        if (i == LLM_NIL)
            return sp->local_free;
        atomic_store(&sp->collecting, i);
    } while (!atomic_compare_exchange_weak(&sp->remote_free, &i, LLM_NIL));
    while (i != LLM_NIL) {
        struct llm_block *b = slot_at(sp, i);
        uint32_t next = b->next, w = atomic_load(&b->word);

        atomic_store(&b->word, slot_word(slot_gen(w), SLOT_FREE));
        atomic_store(&sp->collecting, next);
        b->next = sp->local_free;
        sp->local_free = i;
        i = next;
    }
    return sp->local_free;
}

/* Lay out a new span on page for cls and owner; under the heap lock. */
static void span_init(llm_heap *h, uint32_t page, unsigned cls, pid_t owner)
{
    struct llm_hdr *hdr = h->hdr;
    struct llm_span *sp = span_at(h, page);
    size_t bytes = (size_t)hdr->class_span_pages[cls] << hdr->page_shift;
    uint32_t gen0 = (hdr->span_serial++ * 2654435761u) & LLM_GEN_MASK;

    sp->cls = cls;
    sp->owner = owner;
    sp->slot_size = hdr->class_size[cls] + (uint32_t)sizeof(struct llm_block);
    sp->first = sizeof *sp;
    sp->nslots = (uint32_t)((bytes - sp->first) / sp->slot_size);
    sp->page = page;
    sp->local_free = 0;
    atomic_store(&sp->remote_free, LLM_NIL);
    atomic_store(&sp->used, 0);
    atomic_store(&sp->collecting, LLM_NIL);
    sp->next_mine = LLM_NIL;
    for (uint32_t i = 0; i < sp->nslots; i++) {
        struct llm_block *b = slot_at(sp, i);
        atomic_store(&b->word, slot_word(gen0, SLOT_FREE));
        atomic_store(&b->owner, 0);
        b->size = 0;
        b->next = i + 1 < sp->nslots ? i + 1 : LLM_NIL;
    }
    atomic_thread_fence(memory_order_release);
    sp->magic = LLM_SPAN_MAGIC;
}

/* Adopt an orphan span of cls that has a free slot; under the heap lock. */
static uint32_t span_adopt(llm_heap *h, unsigned cls)
{
    struct llm_hdr *hdr = h->hdr;

    for (uint32_t i = hdr->meta_pages; hdr->orphans && i < hdr->npages;) {
        uint64_t w = atomic_load(&page_desc(h, i)->head);
        struct llm_span *sp = span_at(h, i);

        if (run_kind(w) == PAGE_SPAN && atomic_load(&sp->owner) == 0 &&
            sp->cls == cls && span_collect(sp) != LLM_NIL &&
            proc_charge(h, h->pid, run_len(w), 1) == 0) {
            atomic_store(&page_desc(h, i)->owner, h->pid);
            atomic_store(&sp->owner, h->pid);
            hdr->orphans--;
            return i;
        }
        i += run_len(w) ? run_len(w) : 1;
    }
    return LLM_NIL;
}

/*
 * Find the calling process a span of cls with a free slot: one of its own
 * (walking its list of them; the walk is linear, and the list stays short
 * because a process rarely fills many spans of one class), an orphan, or a
 * new span.  Expects the cache lock held.
 */
static int span_refill(llm_heap *h, unsigned cls)
{
    uint32_t page;
    int rc = 0;

    for (page = h->mine[cls]; page != LLM_NIL;) {
        struct llm_span *sp = span_at(h, page);
        if (sp->local_free != LLM_NIL || span_collect(sp) != LLM_NIL) {
            h->cur[cls] = page;
            return 0;
        }
        page = sp->next_mine;
    }

    heap_lock(h);
    page = span_adopt(h, cls);
    if (page == LLM_NIL) {
        rc = pages_alloc(h, h->hdr->class_span_pages[cls], PAGE_SPAN, h->pid,
                         &page);
        if (rc == 0)
            span_init(h, page, cls, h->pid);
    }
    heap_unlock(h);
    if (rc != 0)
        return rc;
    span_at(h, page)->next_mine = h->mine[cls];
    h->mine[cls] = h->cur[cls] = page;
    return 0;
}

int pool_malloc(llm_heap *h, unsigned cls, size_t n, llm_handle *out,
                void **ptr)
{
    struct llm_span *sp = NULL;
    struct llm_block *b;
    uint32_t i = LLM_NIL, gen;

    pthread_mutex_lock(&h->cache_lock);
    if (h->cur[cls] != LLM_NIL) {
        sp = span_at(h, h->cur[cls]);
        i = sp->local_free != LLM_NIL ? sp->local_free : span_collect(sp);
    }
    if (i == LLM_NIL) {
        int rc = span_refill(h, cls);
        if (rc != 0) {
            pthread_mutex_unlock(&h->cache_lock);
            return rc;
        }
        sp = span_at(h, h->cur[cls]);
        i = sp->local_free;
    }
    b = slot_at(sp, i);
    sp->local_free = b->next;
    gen = (slot_gen(atomic_load(&b->word)) + 1) & LLM_GEN_MASK;
    atomic_store(&b->owner, h->pid);
    b->size = (uint32_t)n;
    atomic_store(&b->word, slot_word(gen, SLOT_USED));
    atomic_fetch_add(&sp->used, 1);
    pthread_mutex_unlock(&h->cache_lock);

    *ptr = b + 1;
    *out = make_handle((uint64_t)((char *)(b + 1) - h->base), gen);
    return 0;
}

static int remote_push(struct llm_span *sp, struct llm_block *b, uint32_t i,
                       uint32_t gen);

/* All slots free and none on its way back: the span may be released. */
static int span_idle(struct llm_span *sp)
{
    if (atomic_load(&sp->used) != 0)
        return 0;
    for (uint32_t i = 0; i < sp->nslots; i++)
        if (slot_state(atomic_load(&slot_at(sp, i)->word)) != SLOT_FREE)
            return 0;
    return 1;
}

/* Free into an orphan span, releasing it when it empties; heap lock held. */
static void orphan_free(llm_heap *h, struct llm_span *sp, struct llm_block *b)
{
    uint32_t i = (uint32_t)(((char *)b - (char *)sp - sp->first) /
                            sp->slot_size);

    b->next = sp->local_free;
    sp->local_free = i;
    span_collect(sp);
    if (span_idle(sp)) {
        h->hdr->orphans--;
        sp->magic = 0;
        pages_free(h, sp->page);
    }
}

int pool_free(llm_heap *h, struct llm_span *sp, struct llm_block *b,
              uint32_t gen)
{
    uint32_t used = slot_word(gen, SLOT_USED);
    int32_t owner = atomic_load(&sp->owner);
    uint32_t i;

    if (owner == 0) {
        heap_lock(h);
        owner = atomic_load(&sp->owner);
        if (owner == 0) {
            int ok = atomic_compare_exchange_strong(
                &b->word, &used, slot_word(gen, SLOT_FREE));
            if (ok) {
                atomic_fetch_sub(&sp->used, 1);
                orphan_free(h, sp, b);
            }
            heap_unlock(h);
            return ok ? 0 : LLM_EDOUBLEFREE;
        }
        heap_unlock(h);
    }
    i = (uint32_t)(((char *)b - (char *)sp - sp->first) / sp->slot_size);
    if (owner == h->pid) {
        pthread_mutex_lock(&h->cache_lock);
        if (!atomic_compare_exchange_strong(&b->word, &used,
                                            slot_word(gen, SLOT_FREE))) {
            pthread_mutex_unlock(&h->cache_lock);
            return LLM_EDOUBLEFREE;
        }
        b->next = sp->local_free;
        sp->local_free = i;
        atomic_fetch_sub(&sp->used, 1);
        pthread_mutex_unlock(&h->cache_lock);
        return 0;
    }
    return remote_push(sp, b, i, gen);
}

/* Push block b, slot i, onto sp's remote list; 0 or LLM_EDOUBLEFREE. */
static int remote_push(struct llm_span *sp, struct llm_block *b, uint32_t i,
                       uint32_t gen)
{
    uint32_t used = slot_word(gen, SLOT_USED), head;

    if (!atomic_compare_exchange_strong(&b->word, &used,
                                        slot_word(gen, SLOT_REMOTE)))
        return LLM_EDOUBLEFREE;
    atomic_fetch_sub(&sp->used, 1);
    head = atomic_load(&sp->remote_free);
    do {
        b->next = head;
    } while (!atomic_compare_exchange_weak(&sp->remote_free, &head, i));
    return 0;
}

/* Mark REMOTE blocks along a list, from i, free; at most nslots steps. */
static void free_remote_chain(struct llm_span *sp, uint32_t i)
{
    for (uint32_t k = 0; i != LLM_NIL && k < sp->nslots; k++) {
        struct llm_block *b = slot_at(sp, i);
        uint32_t w = atomic_load(&b->word);

        if (slot_state(w) != SLOT_REMOTE)
            break;
        atomic_store(&b->word, slot_word(slot_gen(w), SLOT_FREE));
        i = b->next;
    }
}

/*
 * Rebuild an orphan's lists from its block words, its dead owner having
 * left them in any state: the remote list and the part of it being taken
 * are freed, then every free slot is linked.  Heap lock held.
 */
static void span_rebuild(struct llm_span *sp)
{
    uint32_t used = 0;

    free_remote_chain(sp, atomic_exchange(&sp->remote_free, LLM_NIL));
    free_remote_chain(sp, atomic_load(&sp->collecting));
    atomic_store(&sp->collecting, LLM_NIL);
    sp->local_free = LLM_NIL;
    for (uint32_t i = sp->nslots; i-- > 0;) {
        struct llm_block *b = slot_at(sp, i);
        unsigned state = slot_state(atomic_load(&b->word));

        used += state == SLOT_USED;
        if (state == SLOT_FREE) {
            b->next = sp->local_free;
            sp->local_free = i;
        }
    }
    atomic_store(&sp->used, used);
}

/*
 * Reclaim what the dead process pid had in the span at page; heap lock
 * held.  Blocks pid owned are freed: straight away in an orphan, through
 * the remote list in a span whose owner lives.  If pid owned the span, the
 * span becomes an orphan, or is released when nothing in it is alive.
 */
void pool_reclaim_span(llm_heap *h, uint32_t page, pid_t pid)
{
    struct llm_span *sp = span_at(h, page);
    struct llm_page *pd = page_desc(h, page);
    int32_t owner = atomic_load(&sp->owner);

    if (sp->magic != LLM_SPAN_MAGIC) {
        /* torn at birth: its creator died before the span was laid out */
        if (atomic_load(&pd->owner) == pid)
            pages_free(h, page);
        return;
    }
    if (owner == pid) {
        atomic_store(&sp->owner, 0);
        atomic_store(&pd->owner, 0);
        proc_charge(h, pid, -(int64_t)run_len(atomic_load(&pd->head)), 0);
        h->hdr->orphans++;
        owner = 0;
    }
    for (uint32_t i = 0; i < sp->nslots; i++) {
        struct llm_block *b = slot_at(sp, i);
        uint32_t w = atomic_load(&b->word);

        if (slot_state(w) != SLOT_USED || atomic_load(&b->owner) != pid)
            continue;
        if (owner == 0)
            atomic_store(&b->word, slot_word(slot_gen(w), SLOT_FREE));
        else
            remote_push(sp, b, i, slot_gen(w));
    }
    if (owner != 0)
        return;
    span_rebuild(sp);
    if (span_idle(sp)) {
        h->hdr->orphans--;
        sp->magic = 0;
        pages_free(h, page);
    }
}

/* Release the calling process's spans that hold no live block. */
void llm_heap_trim(llm_heap *h)
{
    pthread_mutex_lock(&h->cache_lock);
    heap_lock(h);
    for (unsigned c = 0; c < h->hdr->nclasses; c++) {
        uint32_t *link = &h->mine[c];
        while (*link != LLM_NIL) {
            struct llm_span *sp = span_at(h, *link);
            span_collect(sp);
            if (span_idle(sp)) {
                uint32_t page = *link;
                *link = sp->next_mine;
                if (h->cur[c] == page)
                    h->cur[c] = LLM_NIL;
                sp->magic = 0;
                pages_free(h, page);
            } else {
                link = &sp->next_mine;
            }
        }
    }
    heap_unlock(h);
    pthread_mutex_unlock(&h->cache_lock);
}
