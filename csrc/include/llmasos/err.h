/*
 * err.h - return codes shared by every part of the LLMasOS C core.
 *
 * Functions that can fail for reasons the caller must expect return 0 on
 * success or one of the negative codes below, and leave the state they were
 * given unchanged.  A broken internal invariant is not a return code: the
 * core aborts with "function: condition" (see LLM_ASSERT in the sources).
 * llm_strerror() names a code in a few words; callers add the context.
 */
#ifndef LLMASOS_ERR_H
#define LLMASOS_ERR_H

enum llm_err {
    LLM_OK = 0,
    LLM_ENOMEM = -1,      /* the heap has no run of free pages that large */
    LLM_EQUOTA = -2,      /* the process would exceed its page quota */
    LLM_EINVAL = -3,      /* an argument out of range */
    LLM_EHANDLE = -4,     /* a handle that names no block of this heap */
    LLM_ESTALE = -5,      /* a handle to a block that was freed */
    LLM_EDOUBLEFREE = -6, /* a block freed twice */
    LLM_ECLOSED = -7,     /* the channel's receiver is gone or closed it */
    LLM_EAGAIN = -8,      /* a non-blocking call would have blocked */
    LLM_ETIMEDOUT = -9,   /* a wait ran out of time */
    LLM_EOWNERDEAD = -10, /* acquired; the previous holder died holding it */
    LLM_ELAYOUT = -11,    /* shared memory of another layout or not ours */
    LLM_ESYS = -12,       /* a system call failed; errno tells which way */
    LLM_EEXIST = -13,     /* a heap of that name exists already */
    LLM_ENOENT = -14,     /* no heap of that name */
    LLM_ETABLEFULL = -15, /* no free entry in a fixed-size table */
    LLM_EINTR = -16,      /* a wait was interrupted by a signal */
    LLM_ENOHUGE = -17,    /* huge pages asked for, none available */
    LLM_EPERM = -18,      /* released by a thread that does not hold it */
    LLM_EDEADLK = -19,    /* the calling thread holds this lock already */
    LLM_ETOOBIG = -20,    /* a message larger than a slot */
};

/* A short English name for code, e.g. "out of heap pages". */
const char *llm_strerror(int code);

#endif
