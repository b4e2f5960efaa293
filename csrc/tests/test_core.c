/*
 * test_core.c - tests of the C core through its public header, with real
 * processes (fork) where ownership and crashes are the subject.  Prints
 * "N passed, N failed" and exits non-zero on any failure.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "llmasos/llmasos.h"

static int passed, failed;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: %s: check failed: %s\n", __FILE__,     \
                    __LINE__, __func__, #cond);                            \
            return 1;                                                      \
        }                                                                  \
    } while (0)

static char heap_name[64];

static llm_heap *new_heap(size_t size, size_t page_size)
{
    struct llm_heap_options o = { .size = size, .page_size = page_size };
    llm_heap *h = NULL;

    snprintf(heap_name, sizeof heap_name, "ctest-%d", (int)getpid());
    llm_heap_unlink(heap_name);
    if (llm_heap_create(heap_name, &o, &h) != 0)
        abort();
    return h;
}

static void drop_heap(llm_heap *h)
{
    llm_heap_detach(h);
    llm_heap_unlink(heap_name);
}

static uint32_t free_pages(llm_heap *h)
{
    struct llm_heap_stats st;

    llm_heap_stats(h, &st, NULL, 0);
    return st.pages_free;
}

static int test_heap_malloc_free_small_and_large(void)
{
    llm_heap *h = new_heap(4 << 20, 4096);
    uint32_t before = free_pages(h);
    llm_handle a, b;
    void *pa, *pb;
    size_t n;

    CHECK(llm_malloc(h, 64, &a, &pa) == 0);
    CHECK(llm_malloc(h, 100000, &b, &pb) == 0);
    CHECK(((uintptr_t)pa & 15) == 0 && ((uintptr_t)pb & 4095) == 0);
    memset(pa, 1, 64);
    memset(pb, 2, 100000);
    CHECK(llm_open(h, b, &pb, &n) == 0 && n == 100000);
    CHECK(free_pages(h) == before - 25 - 1);
    CHECK(llm_free(h, a) == 0);
    CHECK(llm_free(h, b) == 0);
    CHECK(llm_free(h, a) == LLM_EDOUBLEFREE);
    CHECK(llm_free(h, b) == LLM_EDOUBLEFREE);
    CHECK(llm_open(h, a, &pa, &n) == LLM_ESTALE);
    CHECK(llm_free(h, 12345) == LLM_EHANDLE);
    CHECK(llm_malloc(h, 0, &a, &pa) == LLM_EINVAL);
    CHECK(llm_malloc(h, 8 << 20, &a, &pa) == LLM_ENOMEM);
    llm_heap_trim(h);
    CHECK(free_pages(h) == before);
    drop_heap(h);
    return 0;
}

static int test_heap_attach_checks_layout(void)
{
    llm_heap *h = new_heap(1 << 20, 4096), *h2;

    CHECK(llm_heap_attach("no-such-heap", &h2) == LLM_ENOENT);
    CHECK(llm_heap_attach(heap_name, &h2) == 0 && h2 == h);
    llm_heap_detach(h2);
    ((uint64_t *)llm_heap_base(h))[0] ^= 1;
    if (fork() == 0) { /* detach what fork gave us, so attach maps again */
        llm_heap_detach(h);
        _exit(llm_heap_attach(heap_name, &h2) == LLM_ELAYOUT ? 0 : 1);
    }
    int status;
    wait(&status);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ((uint64_t *)llm_heap_base(h))[0] ^= 1;
    drop_heap(h);
    return 0;
}

static int test_heap_reclaim_after_sigkill(void)
{
    llm_heap *h = new_heap(8 << 20, 4096);
    uint32_t before = free_pages(h);
    int fds[2], status;
    pid_t pid;
    char c;

    CHECK(pipe(fds) == 0);
    pid = fork();
    if (pid == 0) {
        llm_handle hd;
        void *p;
        for (int i = 0; i < 2000; i++)
            llm_malloc(h, (size_t)(16 + i * 37 % 9000), &hd, &p);
        if (write(fds[1], "x", 1) != 1)
            _exit(1);
        pause();
    }
    CHECK(read(fds[0], &c, 1) == 1);
    CHECK(free_pages(h) < before);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    CHECK(llm_heap_reclaim(h, pid) == 0);
    CHECK(free_pages(h) == before);
    close(fds[0]);
    close(fds[1]);
    drop_heap(h);
    return 0;
}

static int test_chan_inline_and_block_messages(void)
{
    llm_heap *h = new_heap(4 << 20, 4096);
    struct llm_msg m = { .kind = LLM_MSG_BYTES, .len = 5, .data = "hello" };
    struct llm_chan_stats st;
    llm_chan_id ch;
    llm_handle blk;
    void *p;
    pid_t owner;

    CHECK(llm_chan_create(h, 4, 64, &ch) == 0);
    CHECK(llm_chan_send(h, ch, &m, 0) == 0);
    CHECK(llm_malloc(h, 1 << 20, &blk, &p) == 0);
    m = (struct llm_msg){ .kind = LLM_MSG_BLOCK, .handle = blk };
    CHECK(llm_chan_send(h, ch, &m, 0) == 0);
    CHECK(llm_chan_recv(h, ch, &m, 0, 0) == 0);
    CHECK(m.kind == LLM_MSG_BYTES && m.len == 5 && !memcmp(m.data, "hello", 5));
    llm_chan_release(h, ch);
    CHECK(llm_chan_recv(h, ch, &m, 0, 0) == 0 && m.handle == blk);
    llm_chan_release(h, ch);
    CHECK(llm_owner(h, blk, &owner) == 0 && owner == getpid());
    CHECK(llm_chan_recv(h, ch, &m, 1000000, 1000) == LLM_ETIMEDOUT);
    m = (struct llm_msg){ .kind = LLM_MSG_BYTES, .len = 49, .data = p };
    CHECK(llm_chan_send(h, ch, &m, 0) == LLM_ETOOBIG);
    for (int i = 0; i < 4; i++) {
        m.len = 1;
        CHECK(llm_chan_send(h, ch, &m, 0) == 0);
    }
    CHECK(llm_chan_send(h, ch, &m, 0) == LLM_EAGAIN);
    CHECK(llm_chan_stats(h, ch, &st) == 0 && st.queued == 4);
    CHECK(llm_free(h, blk) == 0);
    CHECK(llm_chan_destroy(h, ch) == 0);
    CHECK(llm_chan_send(h, ch, &m, 0) == LLM_ECLOSED);
    drop_heap(h);
    return 0;
}

static int test_chan_between_processes(void)
{
    llm_heap *h = new_heap(4 << 20, 4096);
    struct llm_msg m;
    llm_chan_id ch;
    pid_t pid;
    int status;

    CHECK(llm_chan_create(h, 8, 128, &ch) == 0);
    pid = fork();
    if (pid == 0) {
        llm_heap *h2;
        if (llm_heap_attach(heap_name, &h2) != 0)
            _exit(1);
        for (uint32_t i = 0; i < 10000; i++) {
            m = (struct llm_msg){ .kind = LLM_MSG_BYTES, .len = 4, .data = &i };
            if (llm_chan_send(h2, ch, &m, -1) != 0)
                _exit(2);
        }
        _exit(0);
    }
    for (uint32_t i = 0; i < 10000; i++) {
        CHECK(llm_chan_recv(h, ch, &m, 5000000000, 20000) == 0);
        CHECK(m.len == 4 && *(const uint32_t *)m.data == i);
        llm_chan_release(h, ch);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    drop_heap(h);
    return 0;
}

static int test_chan_dead_receiver_closes(void)
{
    llm_heap *h = new_heap(4 << 20, 4096);
    struct llm_msg m = { .kind = LLM_MSG_BYTES, .len = 1, .data = "x" };
    llm_chan_id ch = 0;
    int fds[2], status;
    pid_t pid;

    CHECK(pipe(fds) == 0);
    pid = fork();
    if (pid == 0) {
        llm_heap *h2;
        if (llm_heap_attach(heap_name, &h2) != 0 ||
            llm_chan_create(h2, 2, 32, &ch) != 0 ||
            write(fds[1], &ch, sizeof ch) != sizeof ch)
            _exit(1);
        pause();
    }
    CHECK(read(fds[0], &ch, sizeof ch) == sizeof ch);
    CHECK(llm_chan_send(h, ch, &m, 0) == 0);
    CHECK(llm_chan_send(h, ch, &m, 0) == 0);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    /* full, receiver dead, nobody reclaimed yet: the sender notices */
    CHECK(llm_chan_send(h, ch, &m, 2000000000) == LLM_ECLOSED);
    llm_heap_reclaim(h, pid);
    CHECK(llm_chan_send(h, ch, &m, 0) == LLM_ECLOSED);
    close(fds[0]);
    close(fds[1]);
    drop_heap(h);
    return 0;
}

static int test_lock_owner_died(void)
{
    llm_heap *h = new_heap(1 << 20, 4096);
    llm_sync_id lk;
    pid_t pid;
    int status;

    CHECK(llm_sync_create(h, LLM_SYNC_LOCK, 0, &lk) == 0);
    pid = fork();
    if (pid == 0) {
        llm_lock_acquire(h, lk, -1);
        raise(SIGKILL);
    }
    waitpid(pid, &status, 0);
    CHECK(llm_lock_acquire(h, lk, 1000000000) == LLM_EOWNERDEAD);
    CHECK(llm_lock_acquire(h, lk, 0) == LLM_EDEADLK);
    CHECK(llm_lock_release(h, lk) == 0);
    CHECK(llm_lock_acquire(h, lk, 0) == 0);
    CHECK(llm_lock_release(h, lk) == 0);
    drop_heap(h);
    return 0;
}

static int test_sem_units_of_dead_holder_return(void)
{
    llm_heap *h = new_heap(1 << 20, 4096);
    llm_sync_id sem, ev;
    uint32_t v;
    pid_t pid;
    int status;

    CHECK(llm_sync_create(h, LLM_SYNC_SEM, 2, &sem) == 0);
    CHECK(llm_sync_create(h, LLM_SYNC_EVENT, 0, &ev) == 0);
    pid = fork();
    if (pid == 0) {
        llm_sem_acquire(h, sem, -1);
        llm_sem_acquire(h, sem, -1);
        llm_event_set(h, ev);
        pause();
    }
    CHECK(llm_event_wait(h, ev, 5000000000) == 0);
    CHECK(llm_sem_acquire(h, sem, 1000000) == LLM_ETIMEDOUT);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    llm_heap_reclaim(h, pid);
    CHECK(llm_sem_value(h, sem, &v) == 0 && v == 2);
    CHECK(llm_sem_acquire(h, sem, 0) == 0);
    CHECK(llm_sem_release(h, sem) == 0);
    drop_heap(h);
    return 0;
}

static int test_pool_remote_free_and_quota(void)
{
    llm_heap *h = new_heap(4 << 20, 4096);
    struct llm_heap_stats st;
    llm_handle hd[100];
    uint32_t spans;
    void *p;
    pid_t pid;
    int status;

    for (int i = 0; i < 100; i++)
        CHECK(llm_malloc(h, 48, &hd[i], &p) == 0);
    llm_heap_stats(h, &st, NULL, 0);
    spans = st.spans;
    pid = fork();
    if (pid == 0) {
        llm_heap *h2;
        if (llm_heap_attach(heap_name, &h2) != 0)
            _exit(1);
        for (int i = 0; i < 100; i++)
            if (llm_free(h2, hd[i]) != 0)
                _exit(2);
        if (llm_set_quota(h2, getpid(), 2) != 0 ||
            llm_malloc(h2, 3 * 4096, &hd[0], &p) != LLM_EQUOTA)
            _exit(3);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    llm_heap_reclaim(h, pid);
    for (int i = 0; i < 100; i++)
        CHECK(llm_malloc(h, 48, &hd[i], &p) == 0);
    llm_heap_stats(h, &st, NULL, 0);
    CHECK(st.blocks_small == 100 && st.spans == spans);
    drop_heap(h);
    return 0;
}

int main(void)
{
    int (*tests[])(void) = {
        test_heap_malloc_free_small_and_large,
        test_heap_attach_checks_layout,
        test_heap_reclaim_after_sigkill,
        test_chan_inline_and_block_messages,
        test_chan_between_processes,
        test_chan_dead_receiver_closes,
        test_lock_owner_died,
        test_sem_units_of_dead_holder_return,
        test_pool_remote_free_and_quota,
    };

    for (size_t i = 0; i < sizeof tests / sizeof *tests; i++)
        tests[i]() == 0 ? passed++ : failed++;
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
