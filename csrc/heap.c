/*
 * heap.c - the shared heap: creating and attaching it, the heap lock and
 * its repair, page runs, large blocks, the process table, reclaim, stats.
 *
 * Page runs are kept in LLM_NBINS free lists, run lengths in
 * [2^b, 2^(b+1)) in bin b; an allocation takes the first fitting run of the
 * smallest bin that can hold it and splits off the rest.  Freeing merges a
 * run with free neighbours on both sides.  See internal.h for the rule that
 * makes this safe against a process dying in the middle.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(sizeof(struct llm_page) == 32, "page descriptor is 32 bytes");
_Static_assert(sizeof(struct llm_block) == 16, "block header is 16 bytes");
_Static_assert(sizeof(struct llm_slot) == LLM_SLOT_HEADER, "slot header");
_Static_assert(offsetof(struct llm_hdr, magic) == 0, "magic comes first");
_Static_assert(sizeof(struct llm_span) % 16 == 0, "span head keeps 16 B");

static const char *const errnames[] = {
    [0] = "success",
    [-LLM_ENOMEM] = "out of heap pages",
    [-LLM_EQUOTA] = "over the process's page quota",
    [-LLM_EINVAL] = "invalid argument",
    [-LLM_EHANDLE] = "handle names no block of this heap",
    [-LLM_ESTALE] = "handle to a freed block",
    [-LLM_EDOUBLEFREE] = "block freed twice",
    [-LLM_ECLOSED] = "channel closed",
    [-LLM_EAGAIN] = "would block",
    [-LLM_ETIMEDOUT] = "timed out",
    [-LLM_EOWNERDEAD] = "previous holder died",
    [-LLM_ELAYOUT] = "incompatible heap layout",
    [-LLM_ESYS] = "system call failed",
    [-LLM_EEXIST] = "heap exists already",
    [-LLM_ENOENT] = "no such heap",
    [-LLM_ETABLEFULL] = "table full",
    [-LLM_EINTR] = "interrupted",
    [-LLM_ENOHUGE] = "no huge pages available",
    [-LLM_EPERM] = "not held by the calling thread",
    [-LLM_EDEADLK] = "already held by the calling thread",
    [-LLM_ETOOBIG] = "message larger than a slot",
};

const char *llm_strerror(int code)
{
    if (code > 0 || -code >= (int)(sizeof errnames / sizeof *errnames))
        return "unknown error";
    return errnames[-code];
}

/* ---- the heap lock ---- */

static void heap_repair(llm_heap *h);

void heap_lock(llm_heap *h)
{
    if (mutex_acquire(&h->hdr->lock, -1) == LLM_EOWNERDEAD) {
        heap_repair(h);
        mutex_consistent(&h->hdr->lock);
    }
}

void heap_unlock(llm_heap *h)
{
    mutex_release(&h->hdr->lock);
}

/* ---- the process table; under the heap lock ---- */

/*
 * The entry of pid, made if asked.  The table is an open-addressing hash
 * on pid with linear probing; an entry given up becomes a tombstone (pid
 * -1), so that the probe chains of others stay whole.
 */
static struct llm_proc *proc_find(llm_heap *h, pid_t pid, int create)
{
    uint32_t n = h->hdr->max_procs, at = ((uint32_t)pid * 2654435761u) % n;
    struct llm_proc *p = NULL, *reuse = NULL;

    for (uint32_t k = 0; k < n; k++, at = at + 1 == n ? 0 : at + 1) {
        p = proc_entry(h, at);
        if (p->pid == pid)
            return p;
        if (p->pid == 0)
            break;
        if (p->pid == -1 && reuse == NULL)
            reuse = p;
    }
    if (reuse == NULL && p != NULL && p->pid == 0)
        reuse = p;
    if (!create || reuse == NULL)
        return NULL;
    memset(reuse, 0, sizeof *reuse);
    reuse->pid = pid;
    return reuse;
}

static void proc_drop_if_idle(struct llm_proc *p)
{
    if (p->pages == 0 && p->quota == 0)
        p->pid = -1;
}

/* Charge pages (negative: credit) to pid; checks the quota if asked. */
int proc_charge(llm_heap *h, pid_t pid, int64_t pages, int check_quota)
{
    struct llm_proc *p;

    if (pid <= 0)
        return 0;
    p = proc_find(h, pid, pages > 0);
    if (p == NULL)
        return pages > 0 ? LLM_ETABLEFULL : 0;
    if (check_quota && p->quota && p->pages + pages > p->quota)
        return LLM_EQUOTA;
    p->pages = (uint32_t)(p->pages + pages);
    proc_drop_if_idle(p);
    return 0;
}

int llm_set_quota(llm_heap *h, pid_t pid, uint32_t pages)
{
    struct llm_proc *p;

    heap_lock(h);
    p = proc_find(h, pid, 1);
    if (p) {
        p->quota = pages;
        proc_drop_if_idle(p);
    }
    heap_unlock(h);
    return p ? 0 : LLM_ETABLEFULL;
}

unsigned llm_heap_proc_pages(llm_heap *h, struct llm_proc_stats *procs,
                             unsigned max)
{
    unsigned n = 0;

    heap_lock(h);
    for (uint32_t i = 0; i < h->hdr->max_procs && n < max; i++) {
        struct llm_proc *p = proc_entry(h, i);
        if (p->pid <= 0)
            continue;
        memset(&procs[n], 0, sizeof procs[n]);
        procs[n].pid = p->pid;
        procs[n].pages = p->pages;
        procs[n].quota_pages = p->quota;
        n++;
    }
    heap_unlock(h);
    return n;
}

/* ---- free bins; under the heap lock ---- */

static unsigned bin_of(uint32_t len)
{
    return 31u - (unsigned)__builtin_clz(len);
}

static void bin_insert(llm_heap *h, uint32_t i, uint32_t len)
{
    struct llm_page *p = page_desc(h, i);
    uint32_t *bin = &h->hdr->bins[bin_of(len)];

    p->prev = LLM_NIL;
    p->next = *bin;
    if (*bin != LLM_NIL)
        page_desc(h, *bin)->prev = i;
    *bin = i;
    page_desc(h, i + len - 1)->size = i; /* back link from the tail */
}

static void bin_remove(llm_heap *h, uint32_t i, uint32_t len)
{
    struct llm_page *p = page_desc(h, i);

    if (p->prev != LLM_NIL)
        page_desc(h, p->prev)->next = p->next;
    else
        h->hdr->bins[bin_of(len)] = p->next;
    if (p->next != LLM_NIL)
        page_desc(h, p->next)->prev = p->prev;
}

/* Make pages [i, i+len) one free run, committed by its head word. */
static void run_make_free(llm_heap *h, uint32_t i, uint32_t len)
{
    atomic_store(&page_desc(h, i)->head, run_word(PAGE_FREE, len));
    atomic_store(&page_desc(h, i)->owner, 0);
    bin_insert(h, i, len);
}

/*
 * Take a run of n pages of the given kind for owner.  The head word is
 * written last.  Returns LLM_ENOMEM or LLM_EQUOTA with nothing changed.
 */
int pages_alloc(llm_heap *h, uint32_t n, unsigned kind, pid_t owner,
                uint32_t *first)
{
    struct llm_hdr *hdr = h->hdr;
    uint32_t found = LLM_NIL, len = 0;
    int rc;

    if (n == 0 || n > hdr->free_pages)
        return n == 0 ? LLM_EINVAL : LLM_ENOMEM;
    for (unsigned b = bin_of(n); b < LLM_NBINS && found == LLM_NIL; b++) {
        for (uint32_t i = hdr->bins[b]; i != LLM_NIL;
             i = page_desc(h, i)->next) {
            len = run_len(atomic_load(&page_desc(h, i)->head));
            if (len >= n) {
                found = i;
                break;
            }
        }
    }
    if (found == LLM_NIL)
        return LLM_ENOMEM;
    rc = proc_charge(h, owner, n, 1);
    if (rc != 0)
        return rc;

    bin_remove(h, found, len);
    if (len > n)
        run_make_free(h, found + n, len - n);
    atomic_store(&page_desc(h, found)->owner, owner);
    atomic_store(&page_desc(h, found)->head, run_word(kind, n));
    hdr->free_pages -= n;
    *first = found;
    return 0;
}

/*
 * Give back the run whose head is page i, merging with free neighbours.
 * Only run heads carry a kind: the head of a neighbour merged into this run
 * is turned into a tail after the merge is committed, so that no stale head
 * is left inside a run for a later merge to trust.
 */
void pages_free(llm_heap *h, uint32_t i)
{
    struct llm_hdr *hdr = h->hdr;
    uint64_t w = atomic_load(&page_desc(h, i)->head);
    uint32_t len = run_len(w), start = i, total = len, right = LLM_NIL;

    LLM_ASSERT(run_kind(w) == PAGE_LARGE || run_kind(w) == PAGE_SPAN);
    proc_charge(h, atomic_load(&page_desc(h, i)->owner), -(int64_t)len, 0);
    hdr->free_pages += len;

    if (i + len < hdr->npages) {
        uint64_t nw = atomic_load(&page_desc(h, i + len)->head);
        if (run_kind(nw) == PAGE_FREE) {
            bin_remove(h, i + len, run_len(nw));
            total += run_len(nw);
            right = i + len;
        }
    }
    if (i > hdr->meta_pages) {
        uint32_t ph = (uint32_t)page_desc(h, i - 1)->size;
        uint64_t pw = ph < i ? atomic_load(&page_desc(h, ph)->head) : 0;
        if (run_kind(pw) == PAGE_FREE && ph + run_len(pw) == i) {
            bin_remove(h, ph, run_len(pw));
            start = ph;
            total += run_len(pw);
        }
    }
    run_make_free(h, start, total);
    if (start != i)
        atomic_store(&page_desc(h, i)->head, run_word(PAGE_TAIL, 0));
    if (right != LLM_NIL)
        atomic_store(&page_desc(h, right)->head, run_word(PAGE_TAIL, 0));
}

static void repair_free_run(llm_heap *h, uint32_t start, uint32_t end)
{
    for (uint32_t k = start + 1; k < end; k++)
        atomic_store(&page_desc(h, k)->head, run_word(PAGE_TAIL, 0));
    run_make_free(h, start, end - start);
    h->hdr->free_pages += end - start;
}

static void heap_repair(llm_heap *h)
{
    struct llm_hdr *hdr = h->hdr;
    uint32_t i = hdr->meta_pages, free_start = LLM_NIL;

    for (unsigned b = 0; b < LLM_NBINS; b++)
        hdr->bins[b] = LLM_NIL;
    for (uint32_t p = 0; p < hdr->max_procs; p++)
        proc_entry(h, p)->pages = 0;
    hdr->free_pages = 0;
    hdr->orphans = 0;

    while (i < hdr->npages) {
        uint64_t w = atomic_load(&page_desc(h, i)->head);
        uint32_t len = run_len(w);
        int torn = len == 0 || i + len > hdr->npages;

        if (run_kind(w) == PAGE_FREE || torn) {
            /* a free run, or a page that no committed run covers */
            if (free_start == LLM_NIL)
                free_start = i;
            i += torn ? 1 : len;
            continue;
        }
        if (free_start != LLM_NIL)
            repair_free_run(h, free_start, i);
        free_start = LLM_NIL;
        if (run_kind(w) == PAGE_SPAN && atomic_load(&page_desc(h, i)->owner) == 0)
            hdr->orphans++;
        proc_charge(h, atomic_load(&page_desc(h, i)->owner), len, 0);
        i += len;
    }
    if (free_start != LLM_NIL)
        repair_free_run(h, free_start, hdr->npages);
}

/* ---- creating and attaching ---- */

static llm_heap *attached_list;
static pthread_mutex_t attached_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void)
{
    pthread_mutex_lock(&attached_lock);
    for (llm_heap *h = attached_list; h; h = h->next_attached)
        pthread_mutex_lock(&h->cache_lock);
}

static void atfork_parent(void)
{
    for (llm_heap *h = attached_list; h; h = h->next_attached)
        pthread_mutex_unlock(&h->cache_lock);
    pthread_mutex_unlock(&attached_lock);
}

/* The child owns none of its parent's spans: it starts with empty caches. */
static void atfork_child(void)
{
    for (llm_heap *h = attached_list; h; h = h->next_attached) {
        pthread_mutex_init(&h->cache_lock, NULL);
        h->pid = getpid();
        pool_reset_cache(h);
    }
    pthread_mutex_init(&attached_lock, NULL);
}

static void register_atfork(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static int valid_name(const char *name)
{
    size_t n = strlen(name);

    if (n == 0 || n >= LLM_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!(c == '_' || c == '-' || c == '.' || (c >= '0' && c <= '9') ||
              (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')))
            return 0;
    }
    return name[0] != '.';
}

static void shm_path(const char *name, char *out, size_t n)
{
    snprintf(out, n, "/llmasos.%s", name);
}

static llm_heap *heap_new(const char *name, void *base, size_t size, int fd)
{
    llm_heap *h = calloc(1, sizeof *h);

    if (h == NULL)
        return NULL;
    h->hdr = base;
    h->base = base;
    h->size = size;
    h->fd = fd;
    h->refs = 1;
    h->pid = getpid();
    pthread_mutex_init(&h->cache_lock, NULL);
    snprintf(h->name, sizeof h->name, "%s", name);
    pool_reset_cache(h);

    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&attached_lock);
    h->next_attached = attached_list;
    attached_list = h;
    pthread_mutex_unlock(&attached_lock);
    return h;
}

static size_t align_up(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

/* Lay the metadata out in an empty heap; returns LLM_EINVAL if it leaves
 * no data page. */
static int heap_format(struct llm_hdr *hdr, const char *name,
                       const struct llm_heap_options *o, size_t ps)
{
    size_t off = align_up(sizeof *hdr, 64);

    hdr->version = LLM_LAYOUT_VERSION;
    hdr->hdr_size = sizeof *hdr;
    hdr->page_desc_size = sizeof(struct llm_page);
    hdr->chan_size = sizeof(struct llm_chan);
    hdr->sync_size = sizeof(struct llm_sync);
    hdr->mutex_size = sizeof(pthread_mutex_t);
    hdr->heap_size = o->size;
    hdr->page_size = (uint32_t)ps;
    hdr->page_shift = (uint32_t)__builtin_ctzll(ps);
    hdr->npages = (uint32_t)(o->size / ps);
    hdr->max_channels = o->max_channels ? o->max_channels : 256;
    hdr->max_syncs = o->max_syncs ? o->max_syncs : 256;
    hdr->max_procs = o->max_procs ? o->max_procs : 256;
    hdr->creator = getpid();
    hdr->huge = o->huge_pages != 0;
    snprintf(hdr->name, sizeof hdr->name, "%s", name);

    hdr->pages_off = off;
    off = align_up(off + (size_t)hdr->npages * sizeof(struct llm_page), 64);
    hdr->chans_off = off;
    off = align_up(off + hdr->max_channels * sizeof(struct llm_chan), 64);
    hdr->syncs_off = off;
    off = align_up(off + hdr->max_syncs * sizeof(struct llm_sync), 64);
    hdr->procs_off = off;
    off += hdr->max_procs * sizeof(struct llm_proc);
    hdr->meta_pages = (uint32_t)(align_up(off, ps) / ps);
    if (hdr->meta_pages + 2 > hdr->npages)
        return LLM_EINVAL;

    pool_init_classes(hdr);
    if (mutex_init_robust(&hdr->lock) != 0)
        return LLM_ESYS;
    return 0;
}

static void heap_format_pages(llm_heap *h)
{
    struct llm_hdr *hdr = h->hdr;

    for (unsigned b = 0; b < LLM_NBINS; b++)
        hdr->bins[b] = LLM_NIL;
    atomic_store(&page_desc(h, 0)->head, run_word(PAGE_META, hdr->meta_pages));
    run_make_free(h, hdr->meta_pages, hdr->npages - hdr->meta_pages);
    hdr->free_pages = hdr->npages - hdr->meta_pages;
    for (uint32_t i = 0; i < hdr->max_channels; i++)
        mutex_init_robust(&chan_entry(h, i)->send_lock);
    for (uint32_t i = 0; i < hdr->max_syncs; i++)
        mutex_init_robust(&sync_entry(h, i)->mutex);
}

static int open_backing(const char *name, int huge, int flags, int *fd)
{
    char path[LLM_NAME_MAX + 64];

    if (huge) {
        /* hugetlbfs has no shm_open(); its usual mount point is used. */
        snprintf(path, sizeof path, "/dev/hugepages/llmasos.%s", name);
        *fd = open(path, flags | O_CLOEXEC, 0600);
    } else {
        shm_path(name, path, sizeof path);
        *fd = shm_open(path, flags, 0600);
    }
    if (*fd >= 0)
        return 0;
    if (errno == EEXIST)
        return LLM_EEXIST;
    if (errno == ENOENT)
        return huge ? LLM_ENOHUGE : LLM_ENOENT;
    return LLM_ESYS;
}

int llm_heap_create(const char *name, const struct llm_heap_options *opt,
                    llm_heap **out)
{
    size_t ps = opt->page_size ? opt->page_size : LLM_MIN_PAGE_SIZE;
    size_t size = opt->size & ~(ps - 1);
    struct llm_heap_options o = *opt;
    void *base;
    int fd, rc;

    if (!valid_name(name) || ps < LLM_MIN_PAGE_SIZE || (ps & (ps - 1)) ||
        size < 2 * ps || size / ps >= (1ull << 31) || ps > (1u << 30))
        return LLM_EINVAL;
    o.size = size;
    rc = open_backing(name, opt->huge_pages, O_RDWR | O_CREAT | O_EXCL, &fd);
    if (rc != 0)
        return rc;
    rc = posix_fallocate(fd, 0, (off_t)size);
    if (rc != 0) {
        errno = rc;
        rc = LLM_ESYS;
        goto fail;
    }
    base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = LLM_ESYS;
        goto fail;
    }
    rc = heap_format(base, name, &o, ps);
    if (rc == 0)
        *out = heap_new(name, base, size, fd);
    if (rc == 0 && *out == NULL)
        rc = LLM_ESYS;
    if (rc != 0) {
        munmap(base, size);
        goto fail;
    }
    heap_format_pages(*out);
    atomic_thread_fence(memory_order_release);
    ((struct llm_hdr *)base)->magic = LLM_MAGIC;
    return 0;
fail:
    close(fd);
    llm_heap_unlink(name);
    return rc;
}

static int check_layout(const struct llm_hdr *hdr, size_t size)
{
    if (size < sizeof *hdr || hdr->magic != LLM_MAGIC)
        return LLM_ELAYOUT;
    if (hdr->version != LLM_LAYOUT_VERSION || hdr->hdr_size != sizeof *hdr ||
        hdr->page_desc_size != sizeof(struct llm_page) ||
        hdr->chan_size != sizeof(struct llm_chan) ||
        hdr->sync_size != sizeof(struct llm_sync) ||
        hdr->mutex_size != sizeof(pthread_mutex_t) ||
        hdr->heap_size != size)
        return LLM_ELAYOUT;
    return 0;
}

/* The process's llm_heap for name, if it has one: one cache per process. */
static llm_heap *find_attached(const char *name)
{
    llm_heap *h;

    pthread_mutex_lock(&attached_lock);
    for (h = attached_list; h; h = h->next_attached)
        if (strcmp(h->name, name) == 0 && h->pid == getpid())
            break;
    if (h)
        h->refs++;
    pthread_mutex_unlock(&attached_lock);
    return h;
}

int llm_heap_attach(const char *name, llm_heap **out)
{
    struct stat st;
    void *base;
    int fd, rc;

    if (!valid_name(name))
        return LLM_EINVAL;
    if ((*out = find_attached(name)) != NULL)
        return 0;
    rc = open_backing(name, 0, O_RDWR, &fd);
    if (rc == LLM_ENOENT && open_backing(name, 1, O_RDWR, &fd) == 0)
        rc = 0;
    if (rc != 0)
        return rc == LLM_ENOHUGE ? LLM_ENOENT : rc;
    if (fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(struct llm_hdr)) {
        close(fd);
        return LLM_ELAYOUT;
    }
    base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                fd, 0);
    if (base == MAP_FAILED) {
        close(fd);
        return LLM_ESYS;
    }
    rc = check_layout(base, (size_t)st.st_size);
    if (rc == 0 && (*out = heap_new(name, base, (size_t)st.st_size, fd)) == NULL)
        rc = LLM_ESYS;
    if (rc != 0) {
        munmap(base, (size_t)st.st_size);
        close(fd);
    }
    return rc;
}

void llm_heap_detach(llm_heap *h)
{
    pthread_mutex_lock(&attached_lock);
    if (--h->refs > 0) {
        pthread_mutex_unlock(&attached_lock);
        return;
    }
    for (llm_heap **p = &attached_list; *p; p = &(*p)->next_attached) {
        if (*p == h) {
            *p = h->next_attached;
            break;
        }
    }
    pthread_mutex_unlock(&attached_lock);
    munmap(h->base, h->size);
    close(h->fd);
    free(h);
}

int llm_heap_unlink(const char *name)
{
    char path[LLM_NAME_MAX + 64];

    if (!valid_name(name))
        return LLM_EINVAL;
    shm_path(name, path, sizeof path);
    if (shm_unlink(path) == 0)
        return 0;
    snprintf(path, sizeof path, "/dev/hugepages/llmasos.%s", name);
    if (unlink(path) == 0)
        return 0;
    return errno == ENOENT ? LLM_ENOENT : LLM_ESYS;
}

const char *llm_heap_name(const llm_heap *h) { return h->name; }
size_t llm_heap_page_size(const llm_heap *h) { return h->hdr->page_size; }
size_t llm_heap_size(const llm_heap *h) { return h->size; }
void *llm_heap_base(const llm_heap *h) { return h->base; }

/* ---- blocks ---- */

static int large_alloc(llm_heap *h, size_t n, llm_handle *out, void **ptr)
{
    uint64_t pages = (n + h->hdr->page_size - 1) >> h->hdr->page_shift;
    struct llm_page *p;
    uint32_t first, gen;
    int rc;

    if (pages > h->hdr->npages)
        return LLM_ENOMEM;
    heap_lock(h);
    rc = pages_alloc(h, (uint32_t)pages, PAGE_LARGE, h->pid, &first);
    if (rc == 0) {
        p = page_desc(h, first);
        p->size = n;
        gen = (atomic_load(&p->gen) + 1) & LLM_GEN_MASK;
        atomic_store(&p->gen, gen | 0x80000000u);
        *out = make_handle((uint64_t)first << h->hdr->page_shift, gen);
        *ptr = page_addr(h, first);
    }
    heap_unlock(h);
    return rc;
}

/*
 * What a handle names: a large block's head page (large != NULL), or a
 * pool block (span and block != NULL).  Checks bounds, kind and alignment;
 * the generation is the caller's to check.
 */
struct lookup {
    struct llm_page *large;
    uint32_t page;
    struct llm_span *span;
    struct llm_block *block;
};

static int lookup(llm_heap *h, llm_handle hd, struct lookup *lk)
{
    struct llm_hdr *hdr = h->hdr;
    uint64_t off = handle_off(hd);
    uint32_t pg = (uint32_t)(off >> hdr->page_shift), head = pg;
    uint64_t w;

    memset(lk, 0, sizeof *lk);
    if (off >= h->size || pg < hdr->meta_pages)
        return LLM_EHANDLE;
    w = atomic_load(&page_desc(h, pg)->head);
    if ((off & (hdr->page_size - 1)) == 0) {
        uint32_t g = atomic_load(&page_desc(h, pg)->gen);
        if (run_kind(w) != PAGE_LARGE)
            return (g & LLM_GEN_MASK) == handle_gen(hd) ? LLM_ESTALE
                                                        : LLM_EHANDLE;
        lk->large = page_desc(h, pg);
        lk->page = pg;
        return 0;
    }
    /* A pool block: find the span's head page by walking back over tails,
     * at most the span length of the largest class. */
    for (uint32_t k = 0; run_kind(w) == PAGE_TAIL && k < 64 && head > 0; k++)
        w = atomic_load(&page_desc(h, --head)->head);
    if (run_kind(w) != PAGE_SPAN || head + run_len(w) <= pg)
        return LLM_EHANDLE;
    lk->span = span_at(h, head);
    if (lk->span->magic != LLM_SPAN_MAGIC)
        return LLM_EHANDLE;
    {
        uint64_t rel = off - ((uint64_t)head << hdr->page_shift);
        uint64_t s = lk->span->slot_size;
        if (rel < lk->span->first + sizeof(struct llm_block) ||
            (rel - lk->span->first - sizeof(struct llm_block)) % s ||
            (rel - lk->span->first) / s >= lk->span->nslots)
            return LLM_EHANDLE;
        lk->block = (struct llm_block *)(h->base + off) - 1;
    }
    return 0;
}

static int check_gen(const struct lookup *lk, llm_handle hd)
{
    uint32_t want = handle_gen(hd);

    if (lk->large) {
        uint32_t g = atomic_load(&lk->large->gen);
        return (g & 0x80000000u) && (g & LLM_GEN_MASK) == want ? 0
                                                               : LLM_ESTALE;
    }
    uint32_t w = atomic_load(&lk->block->word);
    return slot_state(w) == SLOT_USED && slot_gen(w) == want ? 0 : LLM_ESTALE;
}

int llm_malloc(llm_heap *h, size_t n, llm_handle *out, void **ptr)
{
    unsigned cls;

    if (n == 0 || n > h->size)
        return n == 0 ? LLM_EINVAL : LLM_ENOMEM;
    cls = pool_class_of(h->hdr, n);
    if (cls < h->hdr->nclasses)
        return pool_malloc(h, cls, n, out, ptr);
    return large_alloc(h, n, out, ptr);
}

static int large_free(llm_heap *h, const struct lookup *lk, llm_handle hd)
{
    int rc;

    heap_lock(h);
    rc = check_gen(lk, hd);
    if (rc == 0) {
        atomic_fetch_and(&lk->large->gen, LLM_GEN_MASK);
        pages_free(h, lk->page);
    }
    heap_unlock(h);
    return rc == LLM_ESTALE ? LLM_EDOUBLEFREE : rc;
}

int llm_free(llm_heap *h, llm_handle hd)
{
    struct lookup lk;
    int rc = lookup(h, hd, &lk);

    if (rc != 0)
        return rc == LLM_ESTALE ? LLM_EDOUBLEFREE : rc;
    if (lk.large)
        return large_free(h, &lk, hd);
    return pool_free(h, lk.span, lk.block, handle_gen(hd));
}

int llm_check(llm_heap *h, llm_handle hd)
{
    struct lookup lk;
    int rc = lookup(h, hd, &lk);

    return rc ? rc : check_gen(&lk, hd);
}

int llm_open(llm_heap *h, llm_handle hd, void **ptr, size_t *size)
{
    struct lookup lk;
    int rc = lookup(h, hd, &lk);

    if (rc == 0)
        rc = check_gen(&lk, hd);
    if (rc != 0)
        return rc;
    *ptr = h->base + handle_off(hd);
    *size = lk.large ? lk.large->size : lk.block->size;
    return 0;
}

int llm_owner(llm_heap *h, llm_handle hd, pid_t *pid)
{
    struct lookup lk;
    int rc = lookup(h, hd, &lk);

    if (rc == 0)
        rc = check_gen(&lk, hd);
    if (rc == 0)
        *pid = lk.large ? atomic_load(&lk.large->owner)
                        : atomic_load(&lk.block->owner);
    return rc;
}

int llm_give(llm_heap *h, llm_handle hd, pid_t pid)
{
    struct lookup lk;
    int rc = lookup(h, hd, &lk);

    if (rc != 0)
        return rc;
    if (lk.block) {
        rc = check_gen(&lk, hd);
        if (rc == 0)
            atomic_store(&lk.block->owner, pid);
        return rc;
    }
    heap_lock(h);
    rc = check_gen(&lk, hd);
    if (rc == 0 && atomic_load(&lk.large->owner) != pid) {
        uint32_t len = run_len(atomic_load(&lk.large->head));
        /* A hand-over never fails for quota: the pages exist already. */
        rc = proc_charge(h, pid, len, 0);
        if (rc == 0) {
            proc_charge(h, atomic_load(&lk.large->owner), -(int64_t)len, 0);
            atomic_store(&lk.large->owner, pid);
        }
    }
    heap_unlock(h);
    return rc;
}

/* ---- reclaim and stats ---- */

int llm_heap_reclaim(llm_heap *h, pid_t pid)
{
    struct llm_hdr *hdr = h->hdr;
    struct llm_proc *p;

    if (pid <= 0)
        return LLM_EINVAL;
    chan_reclaim(h, pid);
    sync_reclaim(h, pid);
    heap_lock(h);
    for (uint32_t i = hdr->meta_pages; i < hdr->npages;) {
        uint64_t w = atomic_load(&page_desc(h, i)->head);
        uint32_t len = run_len(w) ? run_len(w) : 1;
        unsigned kind = run_kind(w);

        if (kind == PAGE_LARGE && atomic_load(&page_desc(h, i)->owner) == pid) {
            atomic_fetch_and(&page_desc(h, i)->gen, LLM_GEN_MASK);
            pages_free(h, i);
        } else if (kind == PAGE_SPAN) {
            pool_reclaim_span(h, i, pid);
        }
        i += len;
    }
    p = proc_find(h, pid, 0);
    if (p && p->pages == 0)
        p->pid = -1;
    heap_unlock(h);
    return 0;
}

static void stats_add_proc(struct llm_proc_stats *procs, unsigned *n,
                           unsigned max, pid_t pid, uint32_t pages,
                           uint64_t blocks, uint64_t bytes)
{
    unsigned i;

    if (pid == 0)
        return;
    for (i = 0; i < *n && procs[i].pid != pid; i++)
        ;
    if (i == *n) {
        if (*n == max)
            return;
        memset(&procs[i], 0, sizeof procs[i]);
        procs[i].pid = pid;
        (*n)++;
    }
    procs[i].pages += pages;
    procs[i].blocks += blocks;
    procs[i].bytes += bytes;
}

static void stats_span(llm_heap *h, uint32_t i, struct llm_heap_stats *st,
                       struct llm_proc_stats *procs, unsigned max)
{
    struct llm_span *sp = span_at(h, i);
    char *base = (char *)sp + sp->first;

    st->spans++;
    if (sp->magic != LLM_SPAN_MAGIC)
        return; /* torn at birth; reclaiming its creator frees it */
    if (atomic_load(&sp->owner) == 0)
        st->orphan_spans++;
    for (uint32_t k = 0; k < sp->nslots; k++) {
        struct llm_block *b = (struct llm_block *)(base + k * sp->slot_size);
        if (slot_state(atomic_load(&b->word)) != SLOT_USED)
            continue;
        st->blocks_small++;
        st->bytes_in_use += b->size;
        stats_add_proc(procs, &st->nprocs, max, atomic_load(&b->owner), 0, 1,
                       b->size);
    }
}

int llm_heap_stats(llm_heap *h, struct llm_heap_stats *st,
                   struct llm_proc_stats *procs, unsigned max_procs)
{
    struct llm_hdr *hdr = h->hdr;

    memset(st, 0, sizeof *st);
    st->page_size = hdr->page_size;
    st->pages_meta = hdr->meta_pages;
    st->pages_total = hdr->npages - hdr->meta_pages;
    heap_lock(h);
    for (uint32_t i = hdr->meta_pages; i < hdr->npages;) {
        uint64_t w = atomic_load(&page_desc(h, i)->head);
        uint32_t len = run_len(w) ? run_len(w) : 1;
        struct llm_page *p = page_desc(h, i);

        if (run_kind(w) == PAGE_FREE) {
            st->pages_free += len;
            if (len > st->largest_free_run)
                st->largest_free_run = len;
        } else if (run_kind(w) == PAGE_LARGE) {
            st->pages_large += len;
            st->blocks_large++;
            st->bytes_in_use += p->size;
            stats_add_proc(procs, &st->nprocs, max_procs,
                           atomic_load(&p->owner), len, 1, p->size);
        } else if (run_kind(w) == PAGE_SPAN) {
            st->pages_pool += len;
            stats_add_proc(procs, &st->nprocs, max_procs,
                           atomic_load(&p->owner), len, 0, 0);
            stats_span(h, i, st, procs, max_procs);
        }
        i += len;
    }
    for (uint32_t i = 0; i < hdr->max_procs; i++) {
        struct llm_proc *pr = proc_entry(h, i);
        for (unsigned k = 0; pr->pid > 0 && k < st->nprocs; k++)
            if (procs[k].pid == pr->pid)
                procs[k].quota_pages = pr->quota;
    }
    for (uint32_t i = 0; i < hdr->max_channels; i++)
        st->channels += atomic_load(&chan_entry(h, i)->state) != CHAN_FREE;
    for (uint32_t i = 0; i < hdr->max_syncs; i++)
        st->syncs += atomic_load(&sync_entry(h, i)->kind) != 0;
    heap_unlock(h);
    return 0;
}
