/*
 * _core.c - the CPython binding of the LLMasOS C core (module llmasos._core).
 *
 * Types: Heap, Buffer, Channel, Sender, Sync.  The hot calls (malloc, free,
 * send, recv) take positional arguments with METH_FASTCALL or METH_O and
 * allocate one object at most, because from Python the cost of crossing
 * into C, not the transport, sets the floor.  Blocking waits release the
 * GIL and come back to Python between slices to run signal handlers.
 *
 * Return codes of the core become exceptions in exactly one place,
 * raise_code(), with the object and the operation named in the message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <signal.h>
#include <sys/prctl.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>

#include "llmasos/llmasos.h"

#define KIND_BLOB LLM_MSG_BLOB
#define NOWAIT (-2) /* a timeout meaning: do not wait (BlockingIOError) */

static PyObject *exc_heap, *exc_layout, *exc_handle, *exc_stale, *exc_double,
    *exc_huge, *exc_closed, *exc_internal;

/* ---- errors: the one place codes become exceptions ---- */

static PyObject *code_class(int rc)
{
    switch (rc) {
    case LLM_ENOMEM:
    case LLM_EQUOTA:
        return PyExc_MemoryError;
    case LLM_EINVAL:
    case LLM_ETOOBIG:
        return PyExc_ValueError;
    case LLM_EHANDLE:
        return exc_handle;
    case LLM_ESTALE:
        return exc_stale;
    case LLM_EDOUBLEFREE:
        return exc_double;
    case LLM_ECLOSED:
        return exc_closed;
    case LLM_EAGAIN:
        return PyExc_BlockingIOError;
    case LLM_ETIMEDOUT:
        return PyExc_TimeoutError;
    case LLM_ELAYOUT:
        return exc_layout;
    case LLM_EEXIST:
        return PyExc_FileExistsError;
    case LLM_ENOENT:
        return PyExc_FileNotFoundError;
    case LLM_ENOHUGE:
        return exc_huge;
    case LLM_EPERM:
    case LLM_EDEADLK:
        return PyExc_RuntimeError;
    case LLM_ETABLEFULL:
        return exc_heap;
    case LLM_ESYS:
        return PyExc_OSError;
    default:
        return exc_internal;
    }
}

/* Raise the exception for rc: "<what>: <reason>", with errno for ESYS. */
static PyObject *raise_code(int rc, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    int err = errno;

    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (rc == LLM_ESYS)
        PyErr_Format(PyExc_OSError, "%s: %s", what, strerror(err));
    else
        PyErr_Format(code_class(rc), "%s: %s", what, llm_strerror(rc));
    return NULL;
}

static int64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* PyErr_Format without its limits: the full printf syntax. */
static PyObject *raise_fmt(PyObject *exc, const char *fmt, ...)
{
    char msg[640];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PyErr_SetString(exc, msg);
    return NULL;
}

/* Timeout in seconds (None: for ever) to nanoseconds. */
static int timeout_ns(PyObject *o, int64_t *out)
{
    double t;

    if (o == NULL || o == Py_None) {
        *out = -1;
        return 0;
    }
    t = PyFloat_AsDouble(o);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (t < 0) {
        PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
        return -1;
    }
    *out = t > 9e9 ? -1 : (int64_t)(t * 1e9);
    return 0;
}

/*
 * The slow path of a METH_FASTCALL | METH_KEYWORDS method: parse the call
 * with PyArg_ParseTupleAndKeywords after building the tuple and dict.
 */
static int parse_slow(PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames, const char *fmt, char **kwlist, ...)
{
    PyObject *tuple = PyTuple_New(nargs), *dict = NULL;
    va_list ap;
    int ok = 0;

    if (tuple == NULL)
        return 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(tuple, i, args[i]);
    }
    if (kwnames && (dict = PyDict_New()) == NULL)
        goto out;
    for (Py_ssize_t i = 0; kwnames && i < PyTuple_GET_SIZE(kwnames); i++)
        if (PyDict_SetItem(dict, PyTuple_GET_ITEM(kwnames, i),
                           args[nargs + i]) < 0)
            goto out;
    va_start(ap, kwlist);
    ok = PyArg_VaParseTupleAndKeywords(tuple, dict, fmt, kwlist, ap);
    va_end(ap);
out:
    Py_DECREF(tuple);
    Py_XDECREF(dict);
    return ok;
}

/*
 * The fast path of send and recv with a timeout, as every call between
 * services makes them: the timeout is the argument at position ``at``, given
 * by position or as the one keyword ``timeout``.  Returns it, or NULL when
 * the call has another shape (then parse_slow says what is wrong, or
 * parses the other keywords).
 */
static PyObject *timeout_arg(PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames, Py_ssize_t at)
{
    if (kwnames == NULL)
        return nargs == at + 1 ? args[at] : NULL;
    if (nargs == at && PyTuple_GET_SIZE(kwnames) == 1 &&
        PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                         "timeout") == 0)
        return args[at];
    return NULL;
}

/* ---- Heap ---- */

typedef struct {
    PyObject_HEAD
    llm_heap *h;
    Py_ssize_t views; /* memoryviews alive on buffers of this heap */
} HeapObject;

static PyTypeObject HeapType;

static int heap_usable(HeapObject *self)
{
    if (self->h == NULL) {
        PyErr_SetString(exc_heap, "the heap was closed in this process");
        return 0;
    }
    return 1;
}

static PyObject *heap_create(PyObject *cls, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "name",      "size",      "page_size",
                              "max_channels", "max_syncs", "max_procs",
                              "huge_pages", NULL };
    struct llm_heap_options o = { 0 };
    const char *name;
    Py_ssize_t size, ps = 4096;
    unsigned mc = 0, ms = 0, mp = 0;
    int huge = 0, rc;
    HeapObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "sn|nIIIp", kwlist, &name,
                                     &size, &ps, &mc, &ms, &mp, &huge))
        return NULL;
    if (size <= 0 || ps <= 0)
        return raise_fmt(PyExc_ValueError,
                            "heap size and page size must be positive");
    o = (struct llm_heap_options){ (size_t)size, (size_t)ps, mc, ms, mp,
                                   huge };
    self = (HeapObject *)((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls,
                                                         0);
    if (self == NULL)
        return NULL;
    rc = llm_heap_create(name, &o, &self->h);
    if (rc == LLM_EINVAL) {
        Py_DECREF(self);
        return raise_fmt(PyExc_ValueError,
                         "cannot create heap '%s' of %zd bytes: too small "
                         "for its own tables (%u channels, %u locks, %u "
                         "processes, a descriptor per page) plus two data "
                         "pages, or the name is not 1-47 characters of "
                         "[A-Za-z0-9_.-]; make it larger or the tables smaller",
                         name, size, mc ? mc : 256, ms ? ms : 256,
                         mp ? mp : 256);
    }
    if (rc != 0) {
        Py_DECREF(self);
        return raise_code(rc, "cannot create heap '%s' of %zd bytes", name,
                          size);
    }
    return (PyObject *)self;
}

static PyObject *heap_attach(PyObject *cls, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    HeapObject *self;
    int rc;

    if (name == NULL)
        return NULL;
    self = (HeapObject *)((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls,
                                                         0);
    if (self == NULL)
        return NULL;
    rc = llm_heap_attach(name, &self->h);
    if (rc != 0) {
        Py_DECREF(self);
        if (rc == LLM_ELAYOUT)
            return raise_code(rc, "cannot attach heap '%s': it was made by "
                              "an incompatible version of LLMasOS, or is "
                              "not an LLMasOS heap", name);
        return raise_code(rc, "cannot attach heap '%s'", name);
    }
    return (PyObject *)self;
}

static PyObject *heap_close(HeapObject *self, PyObject *Py_UNUSED(a))
{
    if (self->views > 0)
        return raise_fmt(PyExc_BufferError,
                            "cannot close heap: %zd memoryviews of its "
                            "buffers are alive", self->views);
    if (self->h) {
        llm_heap_detach(self->h);
        self->h = NULL;
    }
    Py_RETURN_NONE;
}

static void heap_dealloc(HeapObject *self)
{
    if (self->h)
        llm_heap_detach(self->h);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *core_unlink(PyObject *Py_UNUSED(m), PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    int rc;

    if (name == NULL)
        return NULL;
    rc = llm_heap_unlink(name);
    if (rc != 0 && rc != LLM_ENOENT)
        return raise_code(rc, "cannot remove heap '%s'", name);
    return PyBool_FromLong(rc == 0);
}

/* ---- Buffer ---- */

enum { BUF_OWNED = 0, BUF_BORROWED = 1, BUF_DEAD = 2 };

typedef struct {
    PyObject_HEAD
    HeapObject *heap;
    llm_handle handle;
    char *ptr;
    Py_ssize_t size;
    Py_ssize_t exports;
    int state;
    const char *why_dead; /* "freed" or "sent" */
} BufferObject;

static PyTypeObject BufferType;

static BufferObject *buffer_new(HeapObject *heap, llm_handle hd, void *ptr,
                                size_t size, int state)
{
    BufferObject *b = PyObject_New(BufferObject, &BufferType);

    if (b == NULL)
        return NULL;
    Py_INCREF(heap);
    b->heap = heap;
    b->handle = hd;
    b->ptr = ptr;
    b->size = (Py_ssize_t)size;
    b->exports = 0;
    b->state = state;
    b->why_dead = NULL;
    return b;
}

static void buffer_dealloc(BufferObject *b)
{
    Py_DECREF(b->heap);
    PyObject_Free(b);
}

/* Ready for use: alive here, and (checked in the heap) not freed
 * elsewhere.  Sets an exception and returns 0 if not. */
static int buffer_live(BufferObject *b)
{
    int rc;

    if (b->state == BUF_DEAD) {
        raise_fmt(exc_stale, "buffer %#llx was %s and may not be used",
                     (unsigned long long)b->handle, b->why_dead);
        return 0;
    }
    if (!heap_usable(b->heap))
        return 0;
    rc = llm_check(b->heap->h, b->handle);
    if (rc != 0) {
        raise_code(rc, "buffer %#llx", (unsigned long long)b->handle);
        return 0;
    }
    return 1;
}

static int buffer_getbuffer(BufferObject *b, Py_buffer *view, int flags)
{
    if (!buffer_live(b))
        return -1;
    if (PyBuffer_FillInfo(view, (PyObject *)b, b->ptr, b->size, 0, flags))
        return -1;
    b->exports++;
    b->heap->views++;
    return 0;
}

static void buffer_releasebuffer(BufferObject *b, Py_buffer *Py_UNUSED(v))
{
    b->exports--;
    b->heap->views--;
}

static PyBufferProcs buffer_as_buffer = {
    (getbufferproc)buffer_getbuffer,
    (releasebufferproc)buffer_releasebuffer,
};

static Py_ssize_t buffer_len(BufferObject *b) { return b->size; }

static PySequenceMethods buffer_as_sequence = {
    .sq_length = (lenfunc)buffer_len,
};

/* Refuse to free or send b while views of it are alive. */
static int buffer_movable(BufferObject *b, const char *verb)
{
    if (b->exports == 0)
        return 1;
    raise_fmt(PyExc_BufferError,
                 "cannot %s buffer %#llx: %zd memoryviews of it are still "
                 "alive; release them first (del them, or use 'with "
                 "memoryview(buf) as m:')",
                 verb, (unsigned long long)b->handle, b->exports);
    return 0;
}

static void buffer_kill(BufferObject *b, const char *why)
{
    b->state = BUF_DEAD;
    b->why_dead = why;
    b->ptr = NULL;
}

static PyObject *buffer_repr(BufferObject *b)
{
    static const char *states[] = { "owned", "borrowed", "dead" };

    char text[128];

    snprintf(text, sizeof text, "<llmasos.Buffer handle=%#llx size=%zd %s>",
             (unsigned long long)b->handle, b->size, states[b->state]);
    return PyUnicode_FromString(text);
}

static PyObject *buffer_get_handle(BufferObject *b, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(b->handle);
}

static PyObject *buffer_get_alive(BufferObject *b, void *Py_UNUSED(c))
{
    return PyBool_FromLong(b->state != BUF_DEAD && b->heap->h &&
                           llm_check(b->heap->h, b->handle) == 0);
}

static PyObject *buffer_get_heap(BufferObject *b, void *Py_UNUSED(c))
{
    Py_INCREF(b->heap);
    return (PyObject *)b->heap;
}

static PyObject *buffer_get_address(BufferObject *b, void *Py_UNUSED(c))
{
    if (!buffer_live(b))
        return NULL;
    return PyLong_FromVoidPtr(b->ptr);
}

static PyObject *buffer_get_owner(BufferObject *b, void *Py_UNUSED(c))
{
    pid_t pid;
    int rc;

    if (!heap_usable(b->heap))
        return NULL;
    rc = llm_owner(b->heap->h, b->handle, &pid);
    if (rc != 0)
        return raise_code(rc, "buffer %#llx", (unsigned long long)b->handle);
    return PyLong_FromLong(pid);
}

static PyGetSetDef buffer_getset[] = {
    { "handle", (getter)buffer_get_handle, NULL,
      "The handle another process of the heap can open.", NULL },
    { "alive", (getter)buffer_get_alive, NULL,
      "False once the block was freed or sent.", NULL },
    { "heap", (getter)buffer_get_heap, NULL, "The heap of the block.", NULL },
    { "address", (getter)buffer_get_address, NULL,
      "The block's address in this process.", NULL },
    { "owner", (getter)buffer_get_owner, NULL,
      "The pid of the process that owns the block.", NULL },
    { NULL }
};

static PyObject *heap_free_buffer(HeapObject *self, BufferObject *b);

static PyObject *buffer_enter(BufferObject *b, PyObject *Py_UNUSED(a))
{
    Py_INCREF(b);
    return (PyObject *)b;
}

/* Leaving a with-block frees an owned buffer that was not sent. */
static PyObject *buffer_exit(BufferObject *b, PyObject *Py_UNUSED(a))
{
    if (b->state == BUF_OWNED)
        return heap_free_buffer(b->heap, b);
    Py_RETURN_NONE;
}

static PyMethodDef buffer_methods[] = {
    { "__enter__", (PyCFunction)buffer_enter, METH_NOARGS, NULL },
    { "__exit__", (PyCFunction)buffer_exit, METH_VARARGS, NULL },
    { NULL }
};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmasos.Buffer",
    .tp_doc = "A block of the shared heap, seen without copying.\n\n"
              "memoryview(buf) and numpy.frombuffer(buf) see the shared "
              "bytes.  buf.handle names the block for other processes.",
    .tp_basicsize = sizeof(BufferObject),
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_repr = (reprfunc)buffer_repr,
    .tp_as_buffer = &buffer_as_buffer,
    .tp_as_sequence = &buffer_as_sequence,
    .tp_getset = buffer_getset,
    .tp_methods = buffer_methods,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

/* ---- Heap: blocks ---- */

/* MemoryError with what was asked for and what is free. */
static PyObject *raise_nomem(HeapObject *self, int rc, Py_ssize_t n)
{
    struct llm_heap_stats st;
    size_t ps = llm_heap_page_size(self->h);

    llm_heap_stats(self->h, &st, NULL, 0);
    if (rc == LLM_EQUOTA)
        return raise_fmt(PyExc_MemoryError,
                            "malloc(%zd) on heap '%s': over this process's "
                            "page quota (%zd pages of %zu bytes asked for)",
                            n, llm_heap_name(self->h),
                            (Py_ssize_t)((n + ps - 1) / ps), ps);
    return raise_fmt(PyExc_MemoryError,
                        "malloc(%zd) on heap '%s': out of memory: %zd pages "
                        "of %zu bytes needed, %u pages free, the largest free "
                        "run is %u pages",
                        n, llm_heap_name(self->h),
                        (Py_ssize_t)((n + ps - 1) / ps), ps, st.pages_free,
                        st.largest_free_run);
}

static PyObject *heap_malloc(HeapObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    llm_handle hd;
    void *ptr;
    int rc;

    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n <= 0)
        return raise_fmt(PyExc_ValueError,
                            "malloc(%zd): the size must be at least 1 byte",
                            n);
    if (!heap_usable(self))
        return NULL;
    rc = llm_malloc(self->h, (size_t)n, &hd, &ptr);
    if (rc == LLM_ENOMEM || rc == LLM_EQUOTA)
        return raise_nomem(self, rc, n);
    if (rc != 0)
        return raise_code(rc, "malloc(%zd)", n);
    return (PyObject *)buffer_new(self, hd, ptr, (size_t)n, BUF_OWNED);
}

static PyObject *heap_free_buffer(HeapObject *self, BufferObject *b)
{
    int rc;

    if (b->heap != self)
        return raise_fmt(exc_handle, "buffer %#llx belongs to another "
                            "heap", (unsigned long long)b->handle);
    if (b->state == BUF_DEAD)
        return raise_fmt(b->why_dead[0] == 'f' ? exc_double : exc_stale,
                            "buffer %#llx was %s already",
                            (unsigned long long)b->handle, b->why_dead);
    if (!buffer_movable(b, "free") || !heap_usable(self))
        return NULL;
    rc = llm_free(self->h, b->handle);
    if (rc != 0)
        return raise_code(rc, "free of buffer %#llx",
                          (unsigned long long)b->handle);
    buffer_kill(b, "freed");
    Py_RETURN_NONE;
}

static PyObject *heap_free(HeapObject *self, PyObject *arg)
{
    unsigned long long hd;
    int rc;

    if (Py_TYPE(arg) == &BufferType)
        return heap_free_buffer(self, (BufferObject *)arg);
    if (!PyLong_Check(arg))
        return raise_fmt(PyExc_TypeError, "free() takes a Buffer or a "
                            "handle, not %.100s", Py_TYPE(arg)->tp_name);
    hd = PyLong_AsUnsignedLongLong(arg);
    if (hd == (unsigned long long)-1 && PyErr_Occurred())
        return raise_code(LLM_EHANDLE, "free() of a handle out of range");
    if (!heap_usable(self))
        return NULL;
    rc = llm_free(self->h, hd);
    if (rc != 0)
        return raise_code(rc, "free of handle %#llx", hd);
    Py_RETURN_NONE;
}

static PyObject *heap_open(HeapObject *self, PyObject *arg)
{
    unsigned long long hd = PyLong_AsUnsignedLongLong(arg);
    void *ptr;
    size_t size;
    int rc;

    if (hd == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return raise_code(LLM_EHANDLE, "open() of a handle out of range");
    }
    if (!heap_usable(self))
        return NULL;
    rc = llm_open(self->h, hd, &ptr, &size);
    if (rc != 0)
        return raise_code(rc, "open of handle %#llx", hd);
    return (PyObject *)buffer_new(self, hd, ptr, size, BUF_BORROWED);
}

/* _adopt(handle): open a block whose ownership was handed to us. */
static PyObject *heap_adopt(HeapObject *self, PyObject *arg)
{
    BufferObject *b = (BufferObject *)heap_open(self, arg);

    if (b != NULL)
        b->state = BUF_OWNED;
    return (PyObject *)b;
}

/* give(buf, pid): make pid the owner of buf; buf is dead here after. */
static PyObject *heap_give(HeapObject *self, PyObject *args)
{
    BufferObject *b;
    long pid;
    int rc;

    if (!PyArg_ParseTuple(args, "O!l", &BufferType, &b, &pid) ||
        !heap_usable(self) || !buffer_movable(b, "give away") ||
        !buffer_live(b))
        return NULL;
    rc = llm_give(self->h, b->handle, (pid_t)pid);
    if (rc != 0)
        return raise_code(rc, "give of buffer %#llx to pid %ld",
                          (unsigned long long)b->handle, pid);
    buffer_kill(b, "given away");
    Py_RETURN_NONE;
}

static PyObject *heap_reclaim(HeapObject *self, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    int rc;

    if (pid == -1 && PyErr_Occurred())
        return NULL;
    if (!heap_usable(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = llm_heap_reclaim(self->h, (pid_t)pid);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return raise_code(rc, "reclaim(%ld)", pid);
    Py_RETURN_NONE;
}

static PyObject *heap_trim(HeapObject *self, PyObject *Py_UNUSED(a))
{
    if (!heap_usable(self))
        return NULL;
    llm_heap_trim(self->h);
    Py_RETURN_NONE;
}

static PyObject *heap_set_quota(HeapObject *self, PyObject *args)
{
    long pid;
    unsigned int pages;
    int rc;

    if (!PyArg_ParseTuple(args, "lI", &pid, &pages) || !heap_usable(self))
        return NULL;
    rc = llm_set_quota(self->h, (pid_t)pid, pages);
    if (rc != 0)
        return raise_code(rc, "set_quota(%ld, %u)", pid, pages);
    Py_RETURN_NONE;
}

#define SET_ITEM(d, k, v)                                                  \
    do {                                                                   \
        PyObject *_v = (v);                                                \
        if (_v == NULL || PyDict_SetItemString(d, k, _v) < 0) {            \
            Py_XDECREF(_v);                                                \
            goto fail;                                                     \
        }                                                                  \
        Py_DECREF(_v);                                                     \
    } while (0)

static PyObject *proc_dict(const struct llm_proc_stats *p)
{
    PyObject *d = PyDict_New();

    if (d == NULL)
        return NULL;
    SET_ITEM(d, "pid", PyLong_FromLong(p->pid));
    SET_ITEM(d, "pages", PyLong_FromUnsignedLong(p->pages));
    SET_ITEM(d, "quota_pages", PyLong_FromUnsignedLong(p->quota_pages));
    SET_ITEM(d, "blocks", PyLong_FromUnsignedLongLong(p->blocks));
    SET_ITEM(d, "bytes", PyLong_FromUnsignedLongLong(p->bytes));
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *stats_dict(const struct llm_heap_stats *st,
                            const struct llm_proc_stats *procs)
{
    PyObject *d = PyDict_New(), *list = NULL;

    if (d == NULL)
        return NULL;
    SET_ITEM(d, "page_size", PyLong_FromUnsignedLongLong(st->page_size));
    SET_ITEM(d, "pages_total", PyLong_FromUnsignedLong(st->pages_total));
    SET_ITEM(d, "pages_free", PyLong_FromUnsignedLong(st->pages_free));
    SET_ITEM(d, "pages_meta", PyLong_FromUnsignedLong(st->pages_meta));
    SET_ITEM(d, "pages_large", PyLong_FromUnsignedLong(st->pages_large));
    SET_ITEM(d, "pages_pool", PyLong_FromUnsignedLong(st->pages_pool));
    SET_ITEM(d, "largest_free_run",
             PyLong_FromUnsignedLong(st->largest_free_run));
    SET_ITEM(d, "blocks_small", PyLong_FromUnsignedLongLong(st->blocks_small));
    SET_ITEM(d, "blocks_large", PyLong_FromUnsignedLongLong(st->blocks_large));
    SET_ITEM(d, "bytes_in_use", PyLong_FromUnsignedLongLong(st->bytes_in_use));
    SET_ITEM(d, "spans", PyLong_FromUnsignedLong(st->spans));
    SET_ITEM(d, "orphan_spans", PyLong_FromUnsignedLong(st->orphan_spans));
    SET_ITEM(d, "channels", PyLong_FromUnsignedLong(st->channels));
    SET_ITEM(d, "syncs", PyLong_FromUnsignedLong(st->syncs));
    list = PyList_New(st->nprocs);
    if (list == NULL)
        goto fail;
    for (unsigned i = 0; i < st->nprocs; i++) {
        PyObject *p = proc_dict(&procs[i]);
        if (p == NULL)
            goto fail;
        PyList_SET_ITEM(list, i, p);
    }
    SET_ITEM(d, "procs", list);
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *heap_stats(HeapObject *self, PyObject *Py_UNUSED(a))
{
    enum { MAXP = 4096 };
    struct llm_proc_stats *procs;
    struct llm_heap_stats st;
    PyObject *d;

    if (!heap_usable(self))
        return NULL;
    procs = PyMem_Malloc(MAXP * sizeof *procs);
    if (procs == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    llm_heap_stats(self->h, &st, procs, MAXP);
    Py_END_ALLOW_THREADS
    d = stats_dict(&st, procs);
    PyMem_Free(procs);
    return d;
}

/* _proc_pages() -> {pid: pages}: the process table, no walk of the heap. */
static PyObject *heap_proc_pages(HeapObject *self, PyObject *Py_UNUSED(a))
{
    enum { MAXP = 4096 };
    struct llm_proc_stats *procs;
    PyObject *d;
    unsigned n;

    if (!heap_usable(self))
        return NULL;
    procs = PyMem_Malloc(MAXP * sizeof *procs);
    if (procs == NULL)
        return PyErr_NoMemory();
    n = llm_heap_proc_pages(self->h, procs, MAXP);
    d = PyDict_New();
    for (unsigned i = 0; d && i < n; i++) {
        PyObject *k = PyLong_FromLong(procs[i].pid);
        PyObject *v = PyLong_FromUnsignedLong(procs[i].pages);
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    PyMem_Free(procs);
    return d;
}

static PyObject *heap_get_name(HeapObject *self, void *Py_UNUSED(c))
{
    if (!heap_usable(self))
        return NULL;
    return PyUnicode_FromString(llm_heap_name(self->h));
}

static PyObject *heap_get_page_size(HeapObject *self, void *Py_UNUSED(c))
{
    if (!heap_usable(self))
        return NULL;
    return PyLong_FromSize_t(llm_heap_page_size(self->h));
}

static PyObject *heap_get_size(HeapObject *self, void *Py_UNUSED(c))
{
    if (!heap_usable(self))
        return NULL;
    return PyLong_FromSize_t(llm_heap_size(self->h));
}

static PyObject *heap_get_classes(HeapObject *self, void *Py_UNUSED(c))
{
    PyObject *t;
    unsigned n;

    if (!heap_usable(self))
        return NULL;
    n = llm_nclasses(self->h);
    t = PyTuple_New(n);
    for (unsigned i = 0; t && i < n; i++)
        PyTuple_SET_ITEM(t, i,
                         PyLong_FromSize_t(llm_class_size(self->h, i)));
    return t;
}

static PyObject *heap_get_closed(HeapObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->h == NULL);
}

static PyGetSetDef heap_getset[] = {
    { "name", (getter)heap_get_name, NULL, "The heap's name.", NULL },
    { "page_size", (getter)heap_get_page_size, NULL, "Page size S.", NULL },
    { "size", (getter)heap_get_size, NULL, "Bytes mapped.", NULL },
    { "size_classes", (getter)heap_get_classes, NULL,
      "Block sizes of the pools.", NULL },
    { "closed", (getter)heap_get_closed, NULL,
      "True once closed in this process.", NULL },
    { NULL }
};

static PyMethodDef heap_methods[] = {
    { "_create", (PyCFunction)(void (*)(void))heap_create,
      METH_VARARGS | METH_KEYWORDS | METH_CLASS, NULL },
    { "_attach", (PyCFunction)heap_attach, METH_O | METH_CLASS, NULL },
    { "malloc", (PyCFunction)heap_malloc, METH_O,
      "malloc(n) -> Buffer: n bytes of the heap, owned by this process." },
    { "free", (PyCFunction)heap_free, METH_O,
      "free(buf): give a Buffer (or a handle) back to the heap." },
    { "open", (PyCFunction)heap_open, METH_O,
      "open(handle) -> Buffer: a block another process allocated." },
    { "_adopt", (PyCFunction)heap_adopt, METH_O, NULL },
    { "give", (PyCFunction)heap_give, METH_VARARGS,
      "give(buf, pid): hand buf over to process pid; buf is dead here." },
    { "reclaim", (PyCFunction)heap_reclaim, METH_O,
      "reclaim(pid): give back all a dead process owned." },
    { "trim", (PyCFunction)heap_trim, METH_NOARGS,
      "trim(): release this process's empty pool spans." },
    { "set_quota", (PyCFunction)heap_set_quota, METH_VARARGS,
      "set_quota(pid, pages): limit pid to pages pages (0: no limit)." },
    { "_stats", (PyCFunction)heap_stats, METH_NOARGS, NULL },
    { "_proc_pages", (PyCFunction)heap_proc_pages, METH_NOARGS, NULL },
    { "close", (PyCFunction)heap_close, METH_NOARGS,
      "close(): unmap the heap from this process." },
    { NULL }
};

static PyTypeObject HeapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmasos._core.Heap",
    .tp_basicsize = sizeof(HeapObject),
    .tp_dealloc = (destructor)heap_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_methods = heap_methods,
    .tp_getset = heap_getset,
};

/* ---- Channel (the receiving end) and Sender ---- */

typedef struct {
    PyObject_HEAD
    HeapObject *heap;
    llm_chan_id id;
    int64_t spin_ns;
    uint32_t max_inline;
} ChanObject;

static PyTypeObject ChannelType, SenderType;

static ChanObject *chan_new(PyTypeObject *type, HeapObject *heap,
                            llm_chan_id id)
{
    ChanObject *c = (ChanObject *)type->tp_alloc(type, 0);

    if (c == NULL)
        return NULL;
    Py_INCREF(heap);
    c->heap = heap;
    c->id = id;
    c->spin_ns = 100000;
    c->max_inline = llm_chan_max_inline(heap->h, id);
    return c;
}

static void chan_dealloc(ChanObject *c)
{
    Py_XDECREF(c->heap);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *chan_create(PyObject *cls, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "heap", "capacity", "slot_size", NULL };
    HeapObject *heap;
    unsigned int cap = 1024, slot = 256;
    llm_chan_id id;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|II", kwlist, &HeapType,
                                     &heap, &cap, &slot) ||
        !heap_usable(heap))
        return NULL;
    rc = llm_chan_create(heap->h, cap, slot, &id);
    if (rc == LLM_EINVAL)
        return raise_fmt(PyExc_ValueError,
                            "Channel.create(capacity=%u, slot_size=%u): the "
                            "capacity must be 1 to 2**24 and the slot size a "
                            "multiple of 16 from 32 to 2**20", cap, slot);
    if (rc != 0)
        return raise_code(rc, "Channel.create on heap '%s'",
                          llm_heap_name(heap->h));
    return (PyObject *)chan_new((PyTypeObject *)cls, heap, id);
}

static PyObject *sender_open(PyObject *cls, PyObject *args)
{
    HeapObject *heap;
    unsigned long long id;
    struct llm_chan_stats st;
    int rc;

    if (!PyArg_ParseTuple(args, "O!K", &HeapType, &heap, &id) ||
        !heap_usable(heap))
        return NULL;
    rc = llm_chan_stats(heap->h, id, &st);
    if (rc != 0)
        return raise_code(LLM_ECLOSED, "cannot open channel %#llx of heap "
                          "'%s'", id, llm_heap_name(heap->h));
    return (PyObject *)chan_new((PyTypeObject *)cls, heap, id);
}

/* Copy bytes too large for a slot into a block of the heap. */
static int blob_alloc(ChanObject *c, const Py_buffer *v, llm_handle *hd)
{
    void *ptr;
    int rc = llm_malloc(c->heap->h, (size_t)v->len, hd, &ptr);

    if (rc == LLM_ENOMEM || rc == LLM_EQUOTA) {
        raise_nomem(c->heap, rc, v->len);
        return -1;
    }
    if (rc != 0) {
        raise_code(rc, "send of %zd bytes", v->len);
        return -1;
    }
    memcpy(ptr, v->buf, (size_t)v->len);
    return 0;
}

/*
 * Send msg, waiting as tmo says (nanoseconds; -1 for ever; NOWAIT); the GIL
 * is released to wait.  A channel still full gives LLM_EAGAIN for NOWAIT and
 * LLM_ETIMEDOUT for a timeout, 0 included.
 */
static int send_wait(ChanObject *c, struct llm_msg *m, int64_t tmo)
{
    int64_t deadline = tmo >= 0 ? mono_ns() + tmo : -1;
    int rc = llm_chan_send(c->heap->h, c->id, m, 0);

    while (rc == LLM_EAGAIN && tmo != NOWAIT) {
        int64_t left = deadline < 0 ? -1 : deadline - mono_ns();
        if (deadline >= 0 && left <= 0)
            return LLM_ETIMEDOUT;
        Py_BEGIN_ALLOW_THREADS
        rc = llm_chan_send(c->heap->h, c->id, m, left);
        Py_END_ALLOW_THREADS
        if (rc == LLM_EINTR) {
            if (PyErr_CheckSignals() < 0)
                return LLM_EINTR;
            rc = LLM_EAGAIN;
        }
    }
    return rc;
}

static PyObject *send_impl(ChanObject *c, PyObject *obj, int64_t tmo)
{
    struct llm_msg m = { .kind = LLM_MSG_BYTES };
    BufferObject *b = NULL;
    Py_buffer v;
    int rc;

    if (!heap_usable(c->heap))
        return NULL;
    if (Py_TYPE(obj) == &BufferType) {
        b = (BufferObject *)obj;
        if (b->heap != c->heap)
            return raise_fmt(exc_handle, "cannot send buffer %#llx: it "
                                "belongs to another heap",
                                (unsigned long long)b->handle);
        if (!buffer_movable(b, "send") || !buffer_live(b))
            return NULL;
        m = (struct llm_msg){ .kind = LLM_MSG_BLOCK, .len = 0,
                              .handle = b->handle };
        rc = send_wait(c, &m, tmo);
    } else {
        if (PyObject_GetBuffer(obj, &v, PyBUF_SIMPLE) < 0)
            return NULL;
        if (v.len <= (Py_ssize_t)c->max_inline) {
            m.len = (uint32_t)v.len;
            m.data = v.buf;
        } else {
            m.kind = KIND_BLOB;
            m.len = 0;
            if (blob_alloc(c, &v, &m.handle) < 0) {
                PyBuffer_Release(&v);
                return NULL;
            }
        }
        rc = send_wait(c, &m, tmo);
        PyBuffer_Release(&v);
        if (rc != 0 && m.kind == KIND_BLOB)
            llm_free(c->heap->h, m.handle);
    }
    if (rc == LLM_EINTR)
        return NULL;
    if (rc == LLM_EAGAIN)
        return raise_fmt(PyExc_BlockingIOError, "channel %#llx is full",
                         (unsigned long long)c->id);
    if (rc == LLM_ETIMEDOUT)
        return raise_fmt(PyExc_TimeoutError, "channel %#llx stayed full",
                         (unsigned long long)c->id);
    if (rc != 0)
        return raise_code(rc, "send on channel %#llx",
                          (unsigned long long)c->id);
    if (b)
        buffer_kill(b, "sent");
    Py_RETURN_NONE;
}

static PyObject *sender_send(ChanObject *c, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames)
{
    static char *kw[] = { "msg", "timeout", "block", NULL };
    PyObject *msg, *tmo_o = Py_None;
    int block = 1;
    int64_t tmo;

    if (kwnames == NULL && nargs == 1)
        return send_impl(c, args[0], -1);
    if ((tmo_o = timeout_arg(args, nargs, kwnames, 1)) != NULL) {
        if (timeout_ns(tmo_o, &tmo) < 0)
            return NULL;
        return send_impl(c, args[0], tmo);
    }
    tmo_o = Py_None;
    if (!parse_slow(args, nargs, kwnames, "O|Op:send", kw, &msg, &tmo_o,
                    &block) ||
        timeout_ns(tmo_o, &tmo) < 0)
        return NULL;
    return send_impl(c, msg, block ? tmo : NOWAIT);
}

static PyObject *sender_send_nowait(ChanObject *c, PyObject *msg)
{
    return send_impl(c, msg, NOWAIT);
}

/* Turn the message at the head of the channel into a Python object. */
static PyObject *recv_object(ChanObject *c, const struct llm_msg *m)
{
    PyObject *o = NULL;
    void *ptr;
    size_t size;
    int rc;

    if (m->kind == LLM_MSG_BYTES)
        return PyBytes_FromStringAndSize(m->data, m->len);
    rc = llm_open(c->heap->h, m->handle, &ptr, &size);
    if (rc != 0)
        return raise_code(rc, "message on channel %#llx names a bad block",
                          (unsigned long long)c->id);
    if (m->kind == LLM_MSG_BLOCK)
        return (PyObject *)buffer_new(c->heap, m->handle, ptr, size,
                                      BUF_OWNED);
    o = PyBytes_FromStringAndSize(ptr, (Py_ssize_t)size);
    if (o != NULL)
        llm_free(c->heap->h, m->handle);
    return o;
}

static PyObject *recv_impl(ChanObject *c, int64_t tmo)
{
    struct llm_msg m;
    PyObject *o;
    int rc;

    if (!heap_usable(c->heap))
        return NULL;
    rc = llm_chan_recv(c->heap->h, c->id, &m, 0, 0);
    if (rc == LLM_EAGAIN && tmo == 0)
        rc = LLM_ETIMEDOUT;
    while (rc == LLM_EAGAIN && tmo != NOWAIT) {
        int64_t spin = c->spin_ns;
        Py_BEGIN_ALLOW_THREADS
        rc = llm_chan_recv(c->heap->h, c->id, &m, tmo, spin);
        Py_END_ALLOW_THREADS
        if (rc == LLM_EINTR) {
            /* Waits are not resumed with the time left: a signal is rare,
             * and the caller's timeout restarts, at most once per signal. */
            if (PyErr_CheckSignals() < 0)
                return NULL;
            rc = LLM_EAGAIN;
        }
    }
    if (rc == LLM_EAGAIN)
        return raise_fmt(PyExc_BlockingIOError, "channel %#llx is empty",
                            (unsigned long long)c->id);
    if (rc == LLM_ETIMEDOUT)
        return raise_fmt(PyExc_TimeoutError, "nothing arrived on channel "
                            "%#llx in time", (unsigned long long)c->id);
    if (rc != 0)
        return raise_code(rc, "recv on channel %#llx",
                          (unsigned long long)c->id);
    o = recv_object(c, &m);
    llm_chan_release(c->heap->h, c->id);
    return o;
}

static PyObject *chan_recv(ChanObject *c, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    static char *kw[] = { "timeout", NULL };
    PyObject *tmo_o = Py_None;
    int64_t tmo;

    if (nargs == 0 && kwnames == NULL)
        return recv_impl(c, -1);
    if ((tmo_o = timeout_arg(args, nargs, kwnames, 0)) == NULL) {
        tmo_o = Py_None;
        if (!parse_slow(args, nargs, kwnames, "|O:recv", kw, &tmo_o))
            return NULL;
    }
    if (timeout_ns(tmo_o, &tmo) < 0)
        return NULL;
    return recv_impl(c, tmo);
}

static PyObject *chan_recv_nowait(ChanObject *c, PyObject *Py_UNUSED(a))
{
    return recv_impl(c, NOWAIT);
}

static PyObject *chan_destroy(ChanObject *c, PyObject *Py_UNUSED(a))
{
    int rc;

    if (!heap_usable(c->heap))
        return NULL;
    rc = llm_chan_destroy(c->heap->h, c->id);
    if (rc != 0 && rc != LLM_EHANDLE)
        return raise_code(rc, "destroy of channel %#llx",
                          (unsigned long long)c->id);
    Py_RETURN_NONE;
}

static PyObject *chan_close(ChanObject *c, PyObject *Py_UNUSED(a))
{
    if (!heap_usable(c->heap))
        return NULL;
    llm_chan_close(c->heap->h, c->id);
    Py_RETURN_NONE;
}

static PyObject *chan_stats(ChanObject *c, PyObject *Py_UNUSED(a))
{
    struct llm_chan_stats st;
    PyObject *d;
    int rc;

    if (!heap_usable(c->heap))
        return NULL;
    rc = llm_chan_stats(c->heap->h, c->id, &st);
    if (rc != 0)
        return raise_code(LLM_ECLOSED, "stats of channel %#llx",
                          (unsigned long long)c->id);
    d = PyDict_New();
    if (d == NULL)
        return NULL;
    SET_ITEM(d, "receiver", PyLong_FromLong(st.receiver));
    SET_ITEM(d, "capacity", PyLong_FromUnsignedLong(st.capacity));
    SET_ITEM(d, "slot_size", PyLong_FromUnsignedLong(st.slot_size));
    SET_ITEM(d, "queued", PyLong_FromUnsignedLong(st.queued));
    SET_ITEM(d, "closed", PyBool_FromLong(st.closed));
    SET_ITEM(d, "receiver_sleeping", PyBool_FromLong(st.receiver_sleeping));
    SET_ITEM(d, "sent", PyLong_FromUnsignedLongLong(st.sent));
    SET_ITEM(d, "wakeups", PyLong_FromUnsignedLongLong(st.wakeups));
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *chan_get_handle(ChanObject *c, void *Py_UNUSED(x))
{
    return PyLong_FromUnsignedLongLong(c->id);
}

static PyObject *chan_get_spin(ChanObject *c, void *Py_UNUSED(x))
{
    return PyFloat_FromDouble((double)c->spin_ns / 1000.0);
}

static int chan_set_spin(ChanObject *c, PyObject *v, void *Py_UNUSED(x))
{
    double us = v ? PyFloat_AsDouble(v) : -1;

    if (us == -1.0 && PyErr_Occurred())
        return -1;
    if (us < 0) {
        PyErr_SetString(PyExc_ValueError, "spin_us must be >= 0");
        return -1;
    }
    c->spin_ns = (int64_t)(us * 1000.0);
    return 0;
}

static PyMemberDef chan_members[] = {
    { "max_inline", T_UINT, offsetof(ChanObject, max_inline), READONLY,
      "The largest message copied into a slot; larger ones go by block." },
    { NULL }
};

static PyObject *chan_get_queued(ChanObject *c, void *Py_UNUSED(x))
{
    struct llm_chan_stats st;

    if (!heap_usable(c->heap))
        return NULL;
    if (llm_chan_stats(c->heap->h, c->id, &st) != 0)
        return raise_code(LLM_ECLOSED, "channel %#llx",
                          (unsigned long long)c->id);
    return PyLong_FromUnsignedLong(st.queued);
}

static PyObject *chan_get_heap(ChanObject *c, void *Py_UNUSED(x))
{
    Py_INCREF(c->heap);
    return (PyObject *)c->heap;
}

static PyGetSetDef chan_getset[] = {
    { "heap", (getter)chan_get_heap, NULL, "The channel's heap.", NULL },
    { "queued", (getter)chan_get_queued, NULL,
      "Messages sent and not yet received.", NULL },
    { "handle", (getter)chan_get_handle, NULL,
      "The id senders open the channel by.", NULL },
    { "spin_us", (getter)chan_get_spin, (setter)chan_set_spin,
      "Microseconds recv spins before it sleeps (default 100).", NULL },
    { NULL }
};

static PyMethodDef chan_methods[] = {
    { "_create", (PyCFunction)(void (*)(void))chan_create,
      METH_VARARGS | METH_KEYWORDS | METH_CLASS, NULL },
    { "recv", (PyCFunction)(void (*)(void))chan_recv,
      METH_FASTCALL | METH_KEYWORDS,
      "recv(timeout=None) -> bytes | Buffer" },
    { "recv_nowait", (PyCFunction)chan_recv_nowait, METH_NOARGS,
      "recv_nowait() -> bytes | Buffer; BlockingIOError when empty." },
    { "close", (PyCFunction)chan_close, METH_NOARGS,
      "close(): senders now get ChannelClosed." },
    { "destroy", (PyCFunction)chan_destroy, METH_NOARGS,
      "destroy(): close and free the channel." },
    { "stats", (PyCFunction)chan_stats, METH_NOARGS, "stats() -> dict" },
    { NULL }
};

static PyMethodDef sender_methods[] = {
    { "_open", (PyCFunction)sender_open, METH_VARARGS | METH_CLASS, NULL },
    { "send", (PyCFunction)(void (*)(void))sender_send,
      METH_FASTCALL | METH_KEYWORDS,
      "send(msg, timeout=None, block=True): bytes-like or Buffer." },
    { "send_nowait", (PyCFunction)sender_send_nowait, METH_O,
      "send_nowait(msg); BlockingIOError when full." },
    { "stats", (PyCFunction)chan_stats, METH_NOARGS, "stats() -> dict" },
    { NULL }
};

static PyTypeObject ChannelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmasos._core.Channel",
    .tp_basicsize = sizeof(ChanObject),
    .tp_dealloc = (destructor)chan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_methods = chan_methods,
    .tp_members = chan_members,
    .tp_getset = chan_getset,
};

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmasos._core.Sender",
    .tp_basicsize = sizeof(ChanObject),
    .tp_dealloc = (destructor)chan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_methods = sender_methods,
    .tp_members = chan_members,
    .tp_getset = chan_getset,
};

/* ---- Sync objects ---- */

typedef struct {
    PyObject_HEAD
    HeapObject *heap;
    llm_sync_id id;
    int kind;
} SyncObject;

static PyTypeObject SyncType;

static SyncObject *sync_new(PyTypeObject *t, HeapObject *heap,
                            llm_sync_id id, int kind)
{
    SyncObject *s = (SyncObject *)t->tp_alloc(t, 0);

    if (s == NULL)
        return NULL;
    Py_INCREF(heap);
    s->heap = heap;
    s->id = id;
    s->kind = kind;
    return s;
}

static void sync_dealloc(SyncObject *s)
{
    Py_XDECREF(s->heap);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *sync_create(PyObject *cls, PyObject *args)
{
    HeapObject *heap;
    int kind;
    unsigned int value = 0;
    llm_sync_id id;
    int rc;

    if (!PyArg_ParseTuple(args, "O!i|I", &HeapType, &heap, &kind, &value) ||
        !heap_usable(heap))
        return NULL;
    rc = llm_sync_create(heap->h, kind, value, &id);
    if (rc != 0)
        return raise_code(rc, "cannot make a lock on heap '%s'",
                          llm_heap_name(heap->h));
    return (PyObject *)sync_new((PyTypeObject *)cls, heap, id, kind);
}

static PyObject *sync_open(PyObject *cls, PyObject *args)
{
    HeapObject *heap;
    unsigned long long id;
    int kind;

    if (!PyArg_ParseTuple(args, "O!Ki", &HeapType, &heap, &id, &kind) ||
        !heap_usable(heap))
        return NULL;
    if (llm_sync_kind(heap->h, id) != kind)
        return raise_code(LLM_EHANDLE, "cannot open lock %#llx on heap '%s'",
                          id, llm_heap_name(heap->h));
    return (PyObject *)sync_new((PyTypeObject *)cls, heap, id, kind);
}

typedef int (*wait_fn)(llm_heap *, llm_sync_id, int64_t);

/*
 * Run a blocking wait: first without waiting, holding the GIL; then with
 * the GIL released, in slices of at most 100 ms so signal handlers run.
 * Returns the core's code, or LLM_EINTR with an exception set.
 */
static int sync_wait(SyncObject *s, wait_fn fn, int64_t tmo)
{
    const int64_t slice = 100000000;
    int64_t waited = 0;
    int rc = fn(s->heap->h, s->id, 0);

    while (rc == LLM_ETIMEDOUT && tmo != 0) {
        int64_t step = tmo < 0 || tmo - waited > slice ? slice : tmo - waited;
        Py_BEGIN_ALLOW_THREADS
        rc = fn(s->heap->h, s->id, step);
        Py_END_ALLOW_THREADS
        waited += step;
        if (rc == LLM_EINTR || rc == LLM_ETIMEDOUT) {
            if (PyErr_CheckSignals() < 0)
                return LLM_EINTR;
            if (tmo >= 0 && waited >= tmo)
                return LLM_ETIMEDOUT;
            rc = LLM_ETIMEDOUT;
        }
    }
    return rc;
}

/* acquire / wait: returns 0, 1 (a lock's previous holder died: the caller
 * now holds it) or None on timeout.  Raises on anything else. */
static PyObject *sync_wait_py(SyncObject *s, PyObject *arg)
{
    int64_t tmo;
    wait_fn fn;
    int rc;

    if (timeout_ns(arg, &tmo) < 0 || !heap_usable(s->heap))
        return NULL;
    fn = s->kind == LLM_SYNC_LOCK  ? llm_lock_acquire
         : s->kind == LLM_SYNC_SEM ? llm_sem_acquire
                                   : llm_event_wait;
    rc = sync_wait(s, fn, tmo);
    if (rc == LLM_EINTR)
        return NULL;
    if (rc == LLM_ETIMEDOUT)
        Py_RETURN_NONE;
    if (rc == LLM_EOWNERDEAD)
        return PyLong_FromLong(1);
    if (rc == LLM_EDEADLK)
        return raise_fmt(PyExc_RuntimeError, "lock %#llx is held by this "
                            "thread already (locks are not reentrant)",
                            (unsigned long long)s->id);
    if (rc != 0)
        return raise_code(rc, "wait on lock %#llx",
                          (unsigned long long)s->id);
    return PyLong_FromLong(0);
}

static PyObject *sync_post(SyncObject *s, PyObject *Py_UNUSED(a))
{
    int rc;

    if (!heap_usable(s->heap))
        return NULL;
    rc = s->kind == LLM_SYNC_LOCK  ? llm_lock_release(s->heap->h, s->id)
         : s->kind == LLM_SYNC_SEM ? llm_sem_release(s->heap->h, s->id)
                                   : llm_event_set(s->heap->h, s->id);
    if (rc == LLM_EPERM)
        return raise_fmt(PyExc_RuntimeError, "cannot release lock %#llx: "
                            "this thread does not hold it",
                            (unsigned long long)s->id);
    if (rc != 0)
        return raise_code(rc, "release of lock %#llx",
                          (unsigned long long)s->id);
    Py_RETURN_NONE;
}

static PyObject *sync_value(SyncObject *s, PyObject *Py_UNUSED(a))
{
    uint32_t v = 0;
    int rc;

    if (!heap_usable(s->heap))
        return NULL;
    if (s->kind == LLM_SYNC_EVENT) {
        rc = llm_event_is_set(s->heap->h, s->id);
        if (rc < 0)
            return raise_code(rc, "event %#llx", (unsigned long long)s->id);
        return PyLong_FromLong(rc);
    }
    rc = llm_sem_value(s->heap->h, s->id, &v);
    if (rc != 0)
        return raise_code(rc, "semaphore %#llx", (unsigned long long)s->id);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *sync_clear(SyncObject *s, PyObject *Py_UNUSED(a))
{
    int rc;

    if (!heap_usable(s->heap))
        return NULL;
    rc = llm_event_clear(s->heap->h, s->id);
    if (rc != 0)
        return raise_code(rc, "event %#llx", (unsigned long long)s->id);
    Py_RETURN_NONE;
}

static PyObject *sync_destroy(SyncObject *s, PyObject *Py_UNUSED(a))
{
    if (!heap_usable(s->heap))
        return NULL;
    llm_sync_destroy(s->heap->h, s->id);
    Py_RETURN_NONE;
}

static PyObject *sync_get_handle(SyncObject *s, void *Py_UNUSED(x))
{
    return PyLong_FromUnsignedLongLong(s->id);
}

static PyGetSetDef sync_getset[] = {
    { "handle", (getter)sync_get_handle, NULL,
      "The id other processes open it by.", NULL },
    { NULL }
};

static PyMethodDef sync_methods[] = {
    { "_create", (PyCFunction)sync_create, METH_VARARGS | METH_CLASS, NULL },
    { "_open", (PyCFunction)sync_open, METH_VARARGS | METH_CLASS, NULL },
    { "_wait", (PyCFunction)sync_wait_py, METH_O, NULL },
    { "_post", (PyCFunction)sync_post, METH_NOARGS, NULL },
    { "_value", (PyCFunction)sync_value, METH_NOARGS, NULL },
    { "_clear", (PyCFunction)sync_clear, METH_NOARGS, NULL },
    { "destroy", (PyCFunction)sync_destroy, METH_NOARGS,
      "destroy(): remove it from the heap." },
    { NULL }
};

static PyTypeObject SyncType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmasos._core.Sync",
    .tp_basicsize = sizeof(SyncObject),
    .tp_dealloc = (destructor)sync_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_methods = sync_methods,
    .tp_getset = sync_getset,
};

/* ---- module ---- */

/* set_pdeathsig(sig): the signal this process gets when its parent dies. */
static PyObject *core_set_pdeathsig(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long sig = PyLong_AsLong(arg);

    if (sig == -1 && PyErr_Occurred())
        return NULL;
    if (prctl(PR_SET_PDEATHSIG, sig) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* set_child_subreaper(): orphans of our descendants become our children. */
static PyObject *core_set_subreaper(PyObject *Py_UNUSED(m),
                                    PyObject *Py_UNUSED(a))
{
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    { "set_pdeathsig", (PyCFunction)core_set_pdeathsig, METH_O,
      "set_pdeathsig(sig): get sig when the parent process dies." },
    { "set_child_subreaper", (PyCFunction)core_set_subreaper, METH_NOARGS,
      "set_child_subreaper(): adopt orphaned descendants." },
    { "unlink", (PyCFunction)core_unlink, METH_O,
      "unlink(name) -> bool: remove a heap's name from the system." },
    { NULL }
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "llmasos._core",
    .m_doc = "The C core of LLMasOS: heap, buffers, channels and locks.",
    .m_size = -1,
    .m_methods = core_methods,
};

static int load_errors(void)
{
    PyObject *m = PyImport_ImportModule("llmasos.errors");
    struct { PyObject **slot; const char *name; } map[] = {
        { &exc_heap, "HeapError" },       { &exc_layout, "LayoutMismatch" },
        { &exc_handle, "InvalidHandle" }, { &exc_stale, "StaleHandle" },
        { &exc_double, "DoubleFree" },    { &exc_huge, "HugePagesUnavailable" },
        { &exc_closed, "ChannelClosed" }, { &exc_internal, "InternalError" },
    };

    if (m == NULL)
        return -1;
    for (size_t i = 0; i < sizeof map / sizeof *map; i++) {
        *map[i].slot = PyObject_GetAttrString(m, map[i].name);
        if (*map[i].slot == NULL) {
            Py_DECREF(m);
            return -1;
        }
    }
    Py_DECREF(m);
    return 0;
}

PyMODINIT_FUNC PyInit__core(void)
{
    PyTypeObject *types[] = { &HeapType, &BufferType, &ChannelType,
                              &SenderType, &SyncType };
    const char *names[] = { "Heap", "Buffer", "Channel", "Sender", "Sync" };
    PyObject *m;

    if (load_errors() < 0)
        return NULL;
    m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        if (PyType_Ready(types[i]) < 0 ||
            PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    PyModule_AddIntConstant(m, "SYNC_LOCK", LLM_SYNC_LOCK);
    PyModule_AddIntConstant(m, "SYNC_SEM", LLM_SYNC_SEM);
    PyModule_AddIntConstant(m, "SYNC_EVENT", LLM_SYNC_EVENT);
    PyModule_AddIntConstant(m, "LAYOUT_VERSION", 1);
    return m;
}
