/*
 * internal.h - the layout of a heap in shared memory, and helpers that the
 * core's files share.  Nothing here is part of the SDK.
 *
 * A heap file, in order:
 *
 *   struct llm_hdr        magic, layout version, geometry, the heap lock
 *   struct llm_page[n]    one descriptor per page
 *   struct llm_chan[c]    the channel table
 *   struct llm_sync[s]    the sync-object table
 *   struct llm_proc[p]    the process table (page counts and quotas)
 *   ...                   metadata pages end here; data pages follow
 *
 * Lock order: a channel's send lock, then a sync object's lock, then the
 * heap lock.  No code takes two locks of one kind at once.
 *
 * Page runs.  The first page of every run (its head) holds the run's kind
 * and length in one 64-bit word, written last: that write commits an
 * allocation, a free or a merge, so a process killed mid-way leaves the
 * previous state.  Everything else about runs (the free bins, the back
 * links of free runs, the per-process page counts) is derived and is rebuilt
 * from the head words by heap_repair() when the heap lock is found with its
 * holder dead.
 */
#ifndef LLMASOS_INTERNAL_H
#define LLMASOS_INTERNAL_H

#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>

#include "llmasos/llmasos.h"

#define LLM_MAGIC 0x50414548534f4d4cULL /* "LMOSHEAP" */
#define LLM_LAYOUT_VERSION 1u
#define LLM_NIL 0xffffffffu
#define LLM_NBINS 32
#define LLM_MAX_CLASSES 96
#define LLM_SPAN_MIN_SLOTS 8u
#define LLM_GEN_BITS 24
#define LLM_GEN_MASK ((1u << LLM_GEN_BITS) - 1)
#define LLM_OFF_BITS 40

#define LLM_ASSERT(cond)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "llmasos: %s: %s (%s:%d)\n", __func__, #cond,  \
                    __FILE__, __LINE__);                                   \
            abort();                                                       \
        }                                                                  \
    } while (0)

/* Page kinds, in the low 8 bits of a run head's word. */
enum { PAGE_TAIL = 0, PAGE_FREE = 1, PAGE_LARGE = 2, PAGE_SPAN = 3,
       PAGE_META = 4 };

static inline uint64_t run_word(unsigned kind, uint32_t len)
{
    return (uint64_t)len << 8 | kind;
}
static inline unsigned run_kind(uint64_t w) { return (unsigned)(w & 0xff); }
static inline uint32_t run_len(uint64_t w) { return (uint32_t)(w >> 8); }

/*
 * One page.  head is meaningful on run heads only and is the commit point.
 * Protected by the heap lock, except: gen and owner of a large block are
 * read without it (checked against the handle), and head is read without
 * it by lookups, which then check kind and bounds.
 */
struct llm_page {
    _Atomic uint64_t head;   /* run_word(kind, len) on a run head */
    _Atomic int32_t owner;   /* head of LARGE/SPAN: owning pid */
    _Atomic uint32_t gen;    /* head of LARGE: generation; bit 31: live */
    uint64_t size;           /* LARGE head: bytes asked; FREE tail: head */
    uint32_t next, prev;     /* FREE head: links in its bin */
};

/*
 * One process that owns pages.  Under the heap lock; pages is derived
 * (rebuilt by heap_repair), quota is not.
 */
struct llm_proc {
    int32_t pid;
    uint32_t pages;
    uint32_t quota;
    uint32_t pad;
};

/*
 * A channel table entry.  gen and state change under send_lock and the heap
 * lock together; the ring is written by senders under send_lock and read by
 * the receiver alone.  tail is published with release order after the slot
 * is written; head likewise after the slot is read.
 */
struct llm_chan {
    _Atomic uint32_t gen;
    _Atomic uint32_t state;  /* CHAN_FREE, CHAN_OPEN, CHAN_CLOSED */
    _Atomic int32_t receiver;
    uint32_t capacity;       /* a power of two */
    uint32_t slot_size;
    uint32_t pad0;
    llm_handle ring;         /* a block owned by the receiver */
    pthread_mutex_t send_lock;
    /* under send_lock: the send in progress, for repair */
    int32_t pend_pid;
    uint32_t pend_stage;     /* 0 idle, 1 block given, tail not yet moved */
    uint64_t pend_pos;
    llm_handle pend_handle;
    uint64_t sent;
    uint64_t wakeups;
    _Alignas(64) _Atomic uint64_t tail;
    _Atomic uint32_t rx_seq;      /* futex: bumped by a sender to wake */
    _Atomic uint32_t rx_sleeping;
    _Alignas(64) _Atomic uint64_t head;
    _Atomic uint32_t tx_seq;      /* futex: bumped by the receiver */
    _Atomic uint32_t tx_waiting;
};

enum { CHAN_FREE = 0, CHAN_OPEN = 1, CHAN_CLOSED = 2 };

/* A ring slot: header, then inline bytes. */
struct llm_slot {
    uint32_t kind;
    uint32_t len;
    llm_handle handle;
};

#define LLM_SEM_HOLDERS 16

/*
 * A sync table entry.  gen and kind under the heap lock.  For a semaphore,
 * value and holders are under mutex; seq is the futex its waiters sleep on.
 * For an event, value is the flag and the futex word.
 */
struct llm_sync {
    _Atomic uint32_t gen;
    _Atomic uint32_t kind;   /* 0 when free */
    _Atomic uint32_t value;
    _Atomic uint32_t seq;
    pthread_mutex_t mutex;
    struct { int32_t pid; uint32_t units; } holders[LLM_SEM_HOLDERS];
};

/* The heap header, at offset 0. */
struct llm_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t hdr_size;        /* sizeof(struct llm_hdr), checked at attach */
    uint32_t page_desc_size;
    uint32_t chan_size;
    uint32_t sync_size;
    uint32_t mutex_size;
    uint64_t heap_size;
    uint32_t page_size;
    uint32_t page_shift;
    uint32_t npages;
    uint32_t meta_pages;
    uint32_t max_channels;
    uint32_t max_syncs;
    uint32_t max_procs;
    uint32_t nclasses;
    uint64_t pages_off, chans_off, syncs_off, procs_off;
    int32_t creator;
    uint32_t huge;
    char name[LLM_NAME_MAX];
    uint32_t class_size[LLM_MAX_CLASSES];
    uint32_t class_span_pages[LLM_MAX_CLASSES];

    /* Under lock.  Derived state, rebuilt by heap_repair(). */
    pthread_mutex_t lock;
    uint32_t bins[LLM_NBINS];
    uint32_t free_pages;
    uint32_t orphans;         /* spans with owner 0 */
    uint32_t span_serial;     /* seeds the generations of a new span */
};

/*
 * The head of a pool span, at the start of its first page.  owner is
 * written under the heap lock (adoption); local_free and cursor only by the
 * owner's process under its cache lock; remote_free by any process with
 * compare-and-swap; used atomically by all.
 */
struct llm_span {
    uint32_t magic;
    uint32_t cls;
    _Atomic int32_t owner;     /* 0: orphan, its owner died */
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t first;            /* offset of slot 0 from the span */
    uint32_t page;             /* index of the span's head page */
    uint32_t local_free;       /* slot index; LLM_NIL ends the list */
    _Atomic uint32_t remote_free;
    _Atomic uint32_t used;     /* slots allocated */
    uint32_t next_mine;        /* owner's list of its spans of this class */
    _Atomic uint32_t collecting; /* owner: rest of a remote list being taken */
};

#define LLM_SPAN_MAGIC 0x4e415053u /* "SPAN" */

/*
 * A slot header, 16 bytes before the block.  word holds the generation
 * above a 2-bit state.  A block is SLOT_USED from malloc to free;
 * SLOT_REMOTE while another process hands it back through remote_free.
 */
struct llm_block {
    _Atomic uint32_t word;
    _Atomic int32_t owner;
    uint32_t size;
    uint32_t next;             /* free-list link while free */
};

enum { SLOT_FREE = 0, SLOT_USED = 1, SLOT_REMOTE = 2 };

static inline uint32_t slot_word(uint32_t gen, unsigned state)
{
    return (gen & LLM_GEN_MASK) << 2 | state;
}
static inline unsigned slot_state(uint32_t w) { return w & 3; }
static inline uint32_t slot_gen(uint32_t w) { return w >> 2; }

/* The process-local side of a heap. */
struct llm_heap {
    struct llm_hdr *hdr;
    char *base;
    size_t size;
    int fd;
    pid_t pid;                     /* the process these caches belong to */
    pthread_mutex_t cache_lock;    /* process-local */
    uint32_t cur[LLM_MAX_CLASSES]; /* span page in use per class */
    uint32_t mine[LLM_MAX_CLASSES];/* head of our span list per class */
    int refs;                      /* attaches of this heap by the process */
    char name[LLM_NAME_MAX];
    struct llm_heap *next_attached;
};

/* Addressing. */
static inline struct llm_page *page_desc(llm_heap *h, uint32_t i)
{
    return (struct llm_page *)(h->base + h->hdr->pages_off) + i;
}
static inline char *page_addr(llm_heap *h, uint32_t i)
{
    return h->base + ((uint64_t)i << h->hdr->page_shift);
}
static inline struct llm_chan *chan_entry(llm_heap *h, uint32_t i)
{
    return (struct llm_chan *)(h->base + h->hdr->chans_off) + i;
}
static inline struct llm_sync *sync_entry(llm_heap *h, uint32_t i)
{
    return (struct llm_sync *)(h->base + h->hdr->syncs_off) + i;
}
static inline struct llm_proc *proc_entry(llm_heap *h, uint32_t i)
{
    return (struct llm_proc *)(h->base + h->hdr->procs_off) + i;
}
static inline llm_handle make_handle(uint64_t off, uint32_t gen)
{
    return (uint64_t)(gen & LLM_GEN_MASK) << LLM_OFF_BITS | off >> 4;
}
static inline uint64_t handle_off(llm_handle hd)
{
    return (hd & ((1ull << LLM_OFF_BITS) - 1)) << 4;
}
static inline uint32_t handle_gen(llm_handle hd)
{
    return (uint32_t)(hd >> LLM_OFF_BITS) & LLM_GEN_MASK;
}

/* heap.c: the heap lock and page runs; all expect the heap lock held. */
void heap_lock(llm_heap *h);      /* repairs the heap if its holder died */
void heap_unlock(llm_heap *h);
int pages_alloc(llm_heap *h, uint32_t n, unsigned kind, pid_t owner,
                uint32_t *first);
void pages_free(llm_heap *h, uint32_t first);
int proc_charge(llm_heap *h, pid_t pid, int64_t pages, int check_quota);

/* pool.c */
unsigned pool_class_of(const struct llm_hdr *hdr, size_t n);
void pool_init_classes(struct llm_hdr *hdr);
int pool_malloc(llm_heap *h, unsigned cls, size_t n, llm_handle *out,
                void **ptr);
int pool_free(llm_heap *h, struct llm_span *sp, struct llm_block *b,
              uint32_t gen);
void pool_reclaim_span(llm_heap *h, uint32_t page, pid_t pid);
void pool_reset_cache(llm_heap *h);
struct llm_span *span_at(llm_heap *h, uint32_t page);

/* chan.c and lock.c: called by reclaim before it takes the heap lock. */
void chan_reclaim(llm_heap *h, pid_t pid);
void sync_reclaim(llm_heap *h, pid_t pid);

/* lock.c: robust process-shared mutexes and futexes. */
int mutex_init_robust(pthread_mutex_t *m);
/* 0, LLM_EOWNERDEAD (held; caller repairs, then mutex_consistent) or
 * LLM_ETIMEDOUT, LLM_EINTR is never returned: mutex waits are not cut. */
int mutex_acquire(pthread_mutex_t *m, int64_t timeout_ns);
void mutex_consistent(pthread_mutex_t *m);
void mutex_release(pthread_mutex_t *m);
int futex_wait(_Atomic uint32_t *word, uint32_t expect, int64_t timeout_ns);
void futex_wake(_Atomic uint32_t *word, int n);
int64_t now_ns(void);
int pid_alive(pid_t pid);

#endif
