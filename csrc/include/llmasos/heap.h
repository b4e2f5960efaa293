/*
 * heap.h - the paged shared heap and its allocator.
 *
 * A heap is one POSIX shared-memory file mapped by every process of a
 * system.  It is cut into pages of page_size bytes.  Large blocks take a run
 * of N = ceil(M / page_size) pages; small blocks (up to page_size / 2) come
 * from size-class pools carved out of page runs called spans.  Every page
 * and every block has an owner process, and llm_heap_reclaim() gives back
 * everything a dead process owned.
 *
 * Rules of use:
 *  - One llm_heap per process per heap: it carries the process's pool cache.
 *    It may be used from several threads; the cache has a process-local lock.
 *  - A child made by fork() must not use its parent's llm_heap: the cache
 *    is reset in the child, but call llm_heap_attach() for a clean start.
 *  - Blocks are named across processes by a 64-bit handle; a handle carries
 *    a generation, so a handle to a freed block is refused, not followed.
 *
 * Entry points: llm_heap_create / llm_heap_attach / llm_heap_detach /
 * llm_heap_destroy, llm_malloc / llm_free, llm_open, llm_heap_reclaim,
 * llm_heap_stats, llm_set_quota.
 */
#ifndef LLMASOS_HEAP_H
#define LLMASOS_HEAP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "err.h"

typedef struct llm_heap llm_heap;

/* A handle: 24 bits of generation above 40 bits of offset / 16. */
typedef uint64_t llm_handle;

#define LLM_NAME_MAX 48
#define LLM_MIN_PAGE_SIZE 4096u

struct llm_heap_options {
    size_t size;            /* bytes of the whole heap, metadata included */
    size_t page_size;       /* a power of two >= 4096; 0 means 4096 */
    unsigned max_channels;  /* entries of the channel table; 0 means 256 */
    unsigned max_syncs;     /* locks, semaphores and events; 0 means 256 */
    unsigned max_procs;     /* processes with pages at once; 0 means 256 */
    int huge_pages;         /* back the heap with hugetlbfs pages */
};

struct llm_proc_stats;

/* Create a new heap named name ([A-Za-z0-9_.-], at most 47 bytes). */
int llm_heap_create(const char *name, const struct llm_heap_options *opt,
                    llm_heap **out);
/* Map an existing heap by name; refuses one of another layout. */
int llm_heap_attach(const char *name, llm_heap **out);
/* Unmap the heap from this process; blocks stay where they are. */
void llm_heap_detach(llm_heap *h);
/* Remove the heap's name; processes that mapped it keep their mapping. */
int llm_heap_unlink(const char *name);

const char *llm_heap_name(const llm_heap *h);
size_t llm_heap_page_size(const llm_heap *h);
size_t llm_heap_size(const llm_heap *h);
void *llm_heap_base(const llm_heap *h);

/* Allocate n > 0 bytes for the calling process; 16-byte aligned. */
int llm_malloc(llm_heap *h, size_t n, llm_handle *out, void **ptr);
/* Free the block named by handle, from any process attached to the heap. */
int llm_free(llm_heap *h, llm_handle handle);
/* Look a handle up: its address and the size asked for at malloc. */
int llm_open(llm_heap *h, llm_handle handle, void **ptr, size_t *size);
/* 0 if handle still names a live block, LLM_ESTALE or LLM_EHANDLE if not. */
int llm_check(llm_heap *h, llm_handle handle);
/* Make pid the owner of a live block (used when a channel hands it over). */
int llm_give(llm_heap *h, llm_handle handle, pid_t pid);
/* The pid that owns a live block. */
int llm_owner(llm_heap *h, llm_handle handle, pid_t *pid);

/* Return all that pid owned to the heap.  pid must be dead (or leaving). */
int llm_heap_reclaim(llm_heap *h, pid_t pid);
/* Give the calling process's empty pool spans back to the heap. */
void llm_heap_trim(llm_heap *h);
/* Limit pid to at most pages pages (0 lifts the limit). */
int llm_set_quota(llm_heap *h, pid_t pid, uint32_t pages);

/*
 * The page counts of the process table, without walking the heap: fills
 * up to max entries (pid, pages, quota_pages) and returns how many.
 */
unsigned llm_heap_proc_pages(llm_heap *h, struct llm_proc_stats *procs,
                             unsigned max);

struct llm_proc_stats {
    pid_t pid;
    uint32_t pages;        /* pages charged to pid: spans and large runs */
    uint32_t quota_pages;  /* 0: no limit */
    uint64_t blocks;       /* live blocks owned by pid */
    uint64_t bytes;        /* bytes asked for by those blocks */
};

struct llm_heap_stats {
    uint64_t page_size;
    uint32_t pages_total;  /* data pages: the heap less its metadata */
    uint32_t pages_free;
    uint32_t pages_meta;
    uint32_t pages_large;  /* in large blocks */
    uint32_t pages_pool;   /* in pool spans */
    uint32_t largest_free_run;
    uint64_t blocks_small;
    uint64_t blocks_large;
    uint64_t bytes_in_use; /* bytes asked for by live blocks */
    uint32_t spans;
    uint32_t orphan_spans; /* spans whose owner died, with blocks alive */
    uint32_t channels;
    uint32_t syncs;
    uint32_t nprocs;       /* entries filled in procs[] */
};

/*
 * Walk the heap under its lock and fill st; procs (room for max_procs
 * entries) receives one entry per process owning pages or blocks.
 */
int llm_heap_stats(llm_heap *h, struct llm_heap_stats *st,
                   struct llm_proc_stats *procs, unsigned max_procs);

/* Size classes: how many, and the block size of class i. */
unsigned llm_nclasses(const llm_heap *h);
size_t llm_class_size(const llm_heap *h, unsigned i);

#endif
