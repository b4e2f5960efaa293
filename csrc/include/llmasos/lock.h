/*
 * lock.h - locks, semaphores and events shared by processes and threads.
 *
 * They live in the heap's sync table and are named by a 64-bit id (table
 * index and generation), so any attached process can use them.
 *
 *  - A lock is a robust, error-checking mutex: if its holder dies, the next
 *    acquirer gets it with LLM_EOWNERDEAD and should repair what the lock
 *    protects.  Only the holding thread may release it.
 *  - A semaphore counts units and remembers which process holds how many,
 *    so llm_heap_reclaim() gives back the units of a dead process.
 *  - An event is a flag that waiters sleep on until it is set.
 *
 * Waits take a timeout in nanoseconds (negative: for ever) and return
 * LLM_EINTR when a signal arrives, so callers can run signal handlers.
 *
 * Entry points: llm_sync_create / llm_sync_destroy, llm_lock_acquire /
 * llm_lock_release, llm_sem_acquire / llm_sem_release, llm_event_set /
 * llm_event_clear / llm_event_wait.
 */
#ifndef LLMASOS_LOCK_H
#define LLMASOS_LOCK_H

#include <stdint.h>

#include "heap.h"

typedef uint64_t llm_sync_id;

enum llm_sync_kind { LLM_SYNC_LOCK = 1, LLM_SYNC_SEM = 2, LLM_SYNC_EVENT = 3 };

/* Make a sync object; value is the semaphore's initial count. */
int llm_sync_create(llm_heap *h, int kind, uint32_t value, llm_sync_id *out);
int llm_sync_destroy(llm_heap *h, llm_sync_id id);
/* The kind of a live sync object, or a negative code. */
int llm_sync_kind(llm_heap *h, llm_sync_id id);

int llm_lock_acquire(llm_heap *h, llm_sync_id id, int64_t timeout_ns);
int llm_lock_release(llm_heap *h, llm_sync_id id);

int llm_sem_acquire(llm_heap *h, llm_sync_id id, int64_t timeout_ns);
int llm_sem_release(llm_heap *h, llm_sync_id id);
int llm_sem_value(llm_heap *h, llm_sync_id id, uint32_t *value);

int llm_event_set(llm_heap *h, llm_sync_id id);
int llm_event_clear(llm_heap *h, llm_sync_id id);
int llm_event_is_set(llm_heap *h, llm_sync_id id);
int llm_event_wait(llm_heap *h, llm_sync_id id, int64_t timeout_ns);

#endif
