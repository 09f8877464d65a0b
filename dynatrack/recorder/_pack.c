/* dynatrack.recorder._pack: pack and count one probe chunk's masks of one layer in one pass.
 *
 * Optional compiled helper of the CPU probe path (dynatrack/recorder/callback.py,
 * _ProbeDecoder). The pure numpy path (numpy.packbits, then one numpy.add.reduceat
 * per layer) reads the masks twice and pays for its per-row loop; this reads each
 * 8-byte word of masks once, packs it and adds it to its class's SWAR counters.
 * Results are identical (tests/recorder/test_capture.py checks both paths against
 * numpy.packbits and a naive count). The GIL is released while it runs.
 *
 * masks:  rows x wpad bytes, each 0 or 1 (a bool mask), C-contiguous; wpad % 8 == 0.
 * starts, classes: int64 [n_blocks]: block b covers rows starts[b] .. starts[b+1] (the
 *         last one .. rows), at most 255 rows each, all of class classes[b].
 * bits:   None, or rows x wpad / 8 bytes: row r's bits, first neuron in the high bit
 *         (numpy.packbits(..., bitorder="big")).
 * counts: None, or int32 [C, wpad] (C above every class): counts[c, j] += rows of class c with mask j set.
 * zero:   whether to set counts to 0 first (a fresh numpy.empty array: cheaper than numpy.zeros,
 *         whose calloc costs several times a memset between training steps).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define DT_SSE2 1
#endif

#if defined(_MSC_VER)
#define DT_RESTRICT __restrict
#else
#define DT_RESTRICT restrict
#endif

#define DT_ACC 512 /* words of counters held at once (4,096 neurons) */

/* Where byte k of a word loaded from memory lands in the integer. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define DT_LANE_SHIFT(k) (56 - 8 * (k))
#else
#define DT_LANE_SHIFT(k) (8 * (k))
#endif

/* One row's masks (n words of 8 bytes) to n packed bytes, big bit order. */
static void
pack_row(const uint8_t *DT_RESTRICT row, uint8_t *DT_RESTRICT out, Py_ssize_t n)
{
    Py_ssize_t q = 0;
#ifdef DT_SSE2
    const __m128i zero = _mm_setzero_si128();
    for (; q + 2 <= n; q += 2) {
        __m128i x = _mm_loadu_si128((const __m128i *)(row + 8 * q));
        /* reverse the bytes of each 8-byte word, so the movemask's bit 0 is the word's last byte */
        x = _mm_shufflelo_epi16(x, _MM_SHUFFLE(0, 1, 2, 3));
        x = _mm_shufflehi_epi16(x, _MM_SHUFFLE(0, 1, 2, 3));
        x = _mm_or_si128(_mm_slli_epi16(x, 8), _mm_srli_epi16(x, 8));
        int set = ~_mm_movemask_epi8(_mm_cmpeq_epi8(x, zero)) & 0xFFFF;
        out[q] = (uint8_t)(set & 0xFF);
        out[q + 1] = (uint8_t)(set >> 8);
    }
#endif
    for (; q < n; q++) {
        uint8_t b = 0;
        for (int k = 0; k < 8; k++) b = (uint8_t)(b | ((row[8 * q + k] != 0) << (7 - k)));
        out[q] = b;
    }
}

/* acc[q] += row word q: eight 8-bit counters per word (the caller flushes every <= 255 rows). */
static void
add_row(const uint8_t *DT_RESTRICT row, uint64_t *DT_RESTRICT acc, Py_ssize_t n)
{
    for (Py_ssize_t q = 0; q < n; q++) {
        uint64_t w;
        memcpy(&w, row + 8 * q, 8);
        acc[q] += w;
    }
}

static int
get_buffer(PyObject *obj, Py_buffer *view, int writable)
{
    if (obj == Py_None) {
        return 0; /* view->obj stays NULL */
    }
    return PyObject_GetBuffer(obj, view, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS);
}

/* starts/classes: C-contiguous 8-byte signed integers (numpy int64), so their lengths count blocks. */
static int
get_index_buffer(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return -1;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') {
        f++;
    }
    if (view->itemsize != 8 || (strcmp(f, "q") != 0 && strcmp(f, "l") != 0)) {
        PyErr_Format(PyExc_TypeError, "pack_count: %s must be int64 (format %s given)", what,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* One layer's call: its buffers (held until task_close) and sizes. */
typedef struct {
    Py_buffer masks, starts, classes, bits, counts;
    Py_ssize_t rows, wpad;
    int zero;
} task;

static void
task_close(task *t)
{
    if (t->masks.obj) PyBuffer_Release(&t->masks);
    if (t->starts.obj) PyBuffer_Release(&t->starts);
    if (t->classes.obj) PyBuffer_Release(&t->classes);
    if (t->bits.obj) PyBuffer_Release(&t->bits);
    if (t->counts.obj) PyBuffer_Release(&t->counts);
}

/* Parse and check one call's arguments (GIL held); on error the buffers are released. */
static int
task_open(PyObject *args, task *t)
{
    PyObject *o_masks, *o_starts, *o_classes, *o_bits, *o_counts;
    memset(t, 0, sizeof(*t));
    if (!PyArg_ParseTuple(args, "OnnOOOO|p", &o_masks, &t->rows, &t->wpad, &o_starts, &o_classes, &o_bits, &o_counts,
                          &t->zero)) {
        return -1;
    }
    if (o_masks == Py_None || o_starts == Py_None || o_classes == Py_None) {
        PyErr_SetString(PyExc_TypeError, "pack_count: masks, starts and classes are required");
        return -1;
    }
    if (get_buffer(o_masks, &t->masks, 0) < 0 || get_index_buffer(o_starts, &t->starts, "starts") < 0 ||
        get_index_buffer(o_classes, &t->classes, "classes") < 0 || get_buffer(o_bits, &t->bits, 1) < 0 ||
        get_buffer(o_counts, &t->counts, 1) < 0) {
        goto fail;
    }
    const Py_ssize_t rows = t->rows, wpad = t->wpad;
    if (rows < 0 || wpad <= 0 || wpad % 8 != 0 || t->masks.len != rows * wpad ||
        (t->bits.obj && t->bits.len != rows * (wpad / 8)) || t->starts.len != t->classes.len ||
        t->starts.len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "pack_count: buffer sizes do not fit rows=%zd, wpad=%zd (masks %zd bytes, bits %zd bytes)",
                     rows, wpad, t->masks.len, t->bits.len);
        goto fail;
    }
    const Py_ssize_t nblocks = t->starts.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *bs = (const int64_t *)t->starts.buf, *bc = (const int64_t *)t->classes.buf;
    int64_t n_classes = 0;
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        const int64_t end = b + 1 < nblocks ? bs[b + 1] : rows;
        if ((b == 0 && bs[0] != 0) || bs[b] > end || end > rows || end - bs[b] > 255 || bc[b] < 0) {
            PyErr_SetString(PyExc_ValueError, "pack_count: the blocks must tile the rows, at most 255 rows each");
            goto fail;
        }
        if (bc[b] >= n_classes) {
            n_classes = bc[b] + 1;
        }
    }
    if (rows > 0 && nblocks == 0) {
        PyErr_SetString(PyExc_ValueError, "pack_count: no blocks for the rows");
        goto fail;
    }
    if (t->counts.obj && (t->counts.len % (wpad * (Py_ssize_t)sizeof(int32_t)) != 0 ||
                          t->counts.len / (wpad * (Py_ssize_t)sizeof(int32_t)) < n_classes)) {
        PyErr_Format(PyExc_ValueError, "pack_count: counts must be int32 [C, %zd] with C > %lld (the largest class)",
                     wpad, (long long)(n_classes - 1));
        goto fail;
    }
    return 0;
fail:
    task_close(t);
    return -1;
}

/* The work (no GIL needed). */
static void
task_run(const task *t)
{
    const Py_ssize_t rows = t->rows, wpad = t->wpad, nw = wpad / 8;
    const Py_ssize_t nblocks = t->starts.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *bs = (const int64_t *)t->starts.buf, *bc = (const int64_t *)t->classes.buf;
    const uint8_t *m = (const uint8_t *)t->masks.buf;
    uint8_t *out = (uint8_t *)t->bits.buf;
    int32_t *cnt = (int32_t *)t->counts.buf;
    uint64_t acc[DT_ACC];
    if (cnt && t->zero) {
        memset(cnt, 0, (size_t)t->counts.len);
    }
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        const Py_ssize_t r0 = (Py_ssize_t)bs[b], r1 = b + 1 < nblocks ? (Py_ssize_t)bs[b + 1] : rows;
        for (Py_ssize_t q0 = 0; q0 < nw; q0 += DT_ACC) {
            const Py_ssize_t qn = nw - q0 < DT_ACC ? nw - q0 : DT_ACC;
            if (cnt) {
                memset(acc, 0, sizeof(uint64_t) * (size_t)qn);
            }
            for (Py_ssize_t r = r0; r < r1; r++) {
                const uint8_t *row = m + r * wpad + 8 * q0;
                if (out) {
                    pack_row(row, out + r * nw + q0, qn);
                }
                if (cnt) {
                    add_row(row, acc, qn);
                }
            }
            if (cnt) {
                int32_t *c = cnt + bc[b] * wpad + 8 * q0;
                for (Py_ssize_t q = 0; q < qn; q++) {
                    const uint64_t a = acc[q];
                    for (int k = 0; k < 8; k++) {
                        c[8 * q + k] += (int32_t)((a >> DT_LANE_SHIFT(k)) & 0xFF); /* the counter of neuron 8q + k */
                    }
                }
            }
        }
    }
}

static PyObject *
pack_count(PyObject *self, PyObject *args)
{
    task t;
    (void)self;
    if (task_open(args, &t) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    task_run(&t);
    Py_END_ALLOW_THREADS
    task_close(&t);
    Py_RETURN_NONE;
}

/* -- submit(): the same calls on a native background thread ---------------------------------
 *
 * The thread never takes the GIL: the buffers are acquired by submit() (GIL held) and released
 * by Pending.wait() or when the Pending is freed (which waits first). So the training thread
 * pays for one call and the work runs on another core, with no GIL hand-off at all. Without
 * POSIX threads submit() runs the calls at once (the Pending is then already done).
 */

typedef struct pending {
    PyObject_HEAD
    task *tasks;
    Py_ssize_t n;
    int done;     /* set by the worker, under dt_mu */
    int released; /* buffers released (GIL held) */
    struct pending *next;
} pending;

static void
pending_release(pending *p)
{
    if (!p->released) {
        for (Py_ssize_t i = 0; i < p->n; i++) task_close(&p->tasks[i]);
        p->released = 1;
    }
}

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define DT_THREADS 1
static pthread_mutex_t dt_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dt_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t dt_done = PTHREAD_COND_INITIALIZER;
static pending *dt_head = NULL, *dt_tail = NULL, *dt_current = NULL;
static int dt_started = 0;

static void *
dt_worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&dt_mu);
    for (;;) {
        while (dt_head == NULL) pthread_cond_wait(&dt_work, &dt_mu);
        pending *p = dt_head;
        dt_head = p->next;
        if (dt_head == NULL) dt_tail = NULL;
        dt_current = p;
        pthread_mutex_unlock(&dt_mu);
        for (Py_ssize_t i = 0; i < p->n; i++) task_run(&p->tasks[i]);
        pthread_mutex_lock(&dt_mu);
        p->done = 1;
        dt_current = NULL;
        pthread_cond_broadcast(&dt_done);
    }
    return NULL;
}

/* A forked child has no worker: finish what was queued (or running) there, start afresh. */
static void
dt_after_fork_child(void)
{
    pthread_mutex_init(&dt_mu, NULL);
    pthread_cond_init(&dt_work, NULL);
    pthread_cond_init(&dt_done, NULL);
    if (dt_current != NULL) { /* the calls are idempotent: submit() requires zero=True with counts */
        for (Py_ssize_t i = 0; i < dt_current->n; i++) task_run(&dt_current->tasks[i]);
        dt_current->done = 1;
        dt_current = NULL;
    }
    for (pending *p = dt_head; p != NULL; p = p->next) {
        for (Py_ssize_t i = 0; i < p->n; i++) task_run(&p->tasks[i]);
        p->done = 1;
    }
    dt_head = dt_tail = NULL;
    dt_started = 0;
}
#endif

/* Block until the worker is done with p (GIL released meanwhile). */
static void
pending_join(pending *p)
{
#ifdef DT_THREADS
    int done;
    pthread_mutex_lock(&dt_mu);
    done = p->done;
    pthread_mutex_unlock(&dt_mu);
    if (!done) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&dt_mu);
        while (!p->done) pthread_cond_wait(&dt_done, &dt_mu);
        pthread_mutex_unlock(&dt_mu);
        Py_END_ALLOW_THREADS
    }
#endif
}

static PyObject *
pending_wait(pending *self, PyObject *unused)
{
    (void)unused;
    pending_join(self);
    pending_release(self);
    Py_RETURN_NONE;
}

static PyObject *
pending_get_done(pending *self, void *closure)
{
    (void)closure;
    int done = self->released;
#ifdef DT_THREADS
    if (!done) {
        pthread_mutex_lock(&dt_mu);
        done = self->done;
        pthread_mutex_unlock(&dt_mu);
    }
#else
    done = 1;
#endif
    return PyBool_FromLong(done);
}

static void
pending_dealloc(pending *self)
{
    pending_join(self);
    pending_release(self);
    PyMem_Free(self->tasks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef pending_methods[] = {
    {"wait", (PyCFunction)pending_wait, METH_NOARGS, "Block until the calls are done; release their buffers."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pending_getset[] = {
    {"done", (getter)pending_get_done, NULL, "Whether the calls are done (never blocks).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dynatrack.recorder._pack.Pending",
    .tp_basicsize = sizeof(pending),
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Calls of pack_count submitted to the background thread.",
    .tp_methods = pending_methods,
    .tp_getset = pending_getset,
};

static PyObject *
submit(PyObject *self, PyObject *arg)
{
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "submit: expected a sequence of pack_count argument tuples");
    if (seq == NULL) {
        return NULL;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    pending *p = PyObject_New(pending, &PendingType);
    if (p == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    p->tasks = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(task));
    p->n = 0;
    p->done = 0;
    p->released = 0;
    p->next = NULL;
    if (p->tasks == NULL) {
        Py_DECREF(seq);
        p->released = 1;
        p->done = 1;
        Py_DECREF(p);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *args = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(args)) {
            PyErr_SetString(PyExc_TypeError, "submit: each call is a tuple of pack_count arguments");
            goto fail;
        }
        if (task_open(args, &p->tasks[i]) < 0) {
            goto fail;
        }
        p->n = i + 1;
        if (p->tasks[i].counts.obj && !p->tasks[i].zero) {
            PyErr_SetString(PyExc_ValueError, "submit: counts must be zeroed by the call (zero=True)");
            goto fail;
        }
    }
    Py_DECREF(seq);
#ifdef DT_THREADS
    pthread_mutex_lock(&dt_mu);
    if (!dt_started) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, dt_worker, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            pthread_mutex_unlock(&dt_mu);
            for (Py_ssize_t i = 0; i < p->n; i++) task_run(&p->tasks[i]); /* no thread: run here */
            p->done = 1;
            return (PyObject *)p;
        }
        dt_started = 1;
    }
    if (dt_tail) {
        dt_tail->next = p;
    } else {
        dt_head = p;
    }
    dt_tail = p; /* no reference: freeing a Pending waits until the worker is done with it */
    pthread_cond_signal(&dt_work);
    pthread_mutex_unlock(&dt_mu);
#else
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < p->n; i++) task_run(&p->tasks[i]);
    Py_END_ALLOW_THREADS
    p->done = 1;
#endif
    return (PyObject *)p;
fail:
    Py_DECREF(seq);
    p->done = 1; /* never queued */
    Py_DECREF(p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"pack_count", pack_count, METH_VARARGS,
     "pack_count(masks, rows, wpad, starts, classes, bits, counts, zero=False): pack and/or count a bool mask block."},
    {"submit", submit, METH_O,
     "submit(calls) -> Pending: run pack_count(*args) for each args in calls on a background thread (no GIL)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pack", "dynatrack's compiled probe-mask kernel.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pack(void)
{
    if (PyType_Ready(&PendingType) < 0) {
        return NULL;
    }
#ifdef DT_THREADS
    static int atfork = 0;
    if (!atfork) {
        pthread_atfork(NULL, NULL, dt_after_fork_child);
        atfork = 1;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&PendingType);
    if (PyModule_AddObject(m, "Pending", (PyObject *)&PendingType) < 0) {
        Py_DECREF(&PendingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
