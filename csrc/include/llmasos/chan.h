/*
 * chan.h - bounded multi-producer, single-consumer channels in the heap.
 *
 * A channel is an entry of the heap's channel table and a ring of slots in
 * a block owned by its receiver.  Senders are serialised by a robust lock,
 * so a sender killed mid-send is repaired by the next one; the receiver
 * takes no lock.  A message is either copied into a slot (up to
 * slot_size - LLM_SLOT_HEADER bytes) or is a block handle, whose block
 * changes owner to the receiver: nothing of the payload is copied.
 *
 * Waiting: the receiver spins for spin_ns and then sleeps on a futex; a
 * sender makes the wake-up system call only when the receiver sleeps.
 * A sender of a full channel sleeps too, and wakes at least every 50 ms to
 * see whether the receiver died.  Timeouts are in nanoseconds; a negative
 * timeout waits for ever, zero never waits.
 *
 * Entry points: llm_chan_create / llm_chan_destroy, llm_chan_send,
 * llm_chan_recv, llm_chan_close, llm_chan_stats.
 */
#ifndef LLMASOS_CHAN_H
#define LLMASOS_CHAN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "heap.h"

/* A channel id: table index in the low 32 bits, generation above. */
typedef uint64_t llm_chan_id;

#define LLM_SLOT_HEADER 16u

enum llm_msg_kind {
    LLM_MSG_BYTES = 1,  /* inline bytes */
    LLM_MSG_BLOCK = 2,  /* a block handle; the receiver now owns the block */
    LLM_MSG_BLOB = 3,   /* bytes in a block, owned (and freed) by the receiver */
    LLM_MSG_USER = 16,  /* first kind free for callers (carried as is) */
};

struct llm_msg {
    uint32_t kind;
    uint32_t len;       /* inline bytes; for a block, caller's own use */
    llm_handle handle;  /* for LLM_MSG_BLOCK and caller kinds */
    const void *data;   /* send: bytes to copy; recv: pointer into the slot */
};

/* Make a channel received by the calling process. */
int llm_chan_create(llm_heap *h, uint32_t capacity, uint32_t slot_size,
                    llm_chan_id *out);
/* Close and free a channel; only its receiver may. */
int llm_chan_destroy(llm_heap *h, llm_chan_id id);
/* Mark a channel closed: senders get LLM_ECLOSED; receive drains first. */
int llm_chan_close(llm_heap *h, llm_chan_id id);

/*
 * Send msg.  Returns LLM_EAGAIN when full and timeout_ns == 0, LLM_ETIMEDOUT
 * when it stayed full, LLM_ECLOSED when the receiver is gone, LLM_EINTR when
 * a signal arrived (nothing sent).  A block's ownership moves on success.
 */
int llm_chan_send(llm_heap *h, llm_chan_id id, const struct llm_msg *msg,
                  int64_t timeout_ns);

/*
 * Receive into msg.  For LLM_MSG_BYTES, msg->data points into the slot and
 * is valid until llm_chan_release() (the slot stays taken until then).
 */
int llm_chan_recv(llm_heap *h, llm_chan_id id, struct llm_msg *msg,
                  int64_t timeout_ns, int64_t spin_ns);
/* Hand back the slot of the last message received. */
void llm_chan_release(llm_heap *h, llm_chan_id id);

struct llm_chan_stats {
    pid_t receiver;
    uint32_t capacity;
    uint32_t slot_size;
    uint32_t queued;
    int closed;
    int receiver_sleeping;
    uint64_t sent;
    uint64_t wakeups;      /* futex wake calls made by senders */
};

int llm_chan_stats(llm_heap *h, llm_chan_id id, struct llm_chan_stats *st);
/* The largest inline message a channel carries. */
uint32_t llm_chan_max_inline(llm_heap *h, llm_chan_id id);

#endif
