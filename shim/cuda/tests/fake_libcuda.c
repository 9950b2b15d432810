/*
 * fake_libcuda.c — just enough of the CUDA driver API to test the CUDA shim's host
 * logic (shim/cuda/runtime.cpp) on a machine without a GPU. tests/test_cuda_runtime.py
 * compiles it into a temporary libcuda.so.1 and puts it first on LD_LIBRARY_PATH.
 *
 * "Device memory" is host memory. Work is queued per stream and runs only when
 * someone waits (cuStreamSynchronize, cuEventSynchronize), like a slow GPU, so the
 * shim's deferred frees and pending command buffers are observable. Every operation
 * that runs appends a line to $FAKE_CUDA_LOG.
 *
 * A module's "PTX" is a list of lines the fake understands:
 *   entry <function> <behaviour>     cover | axpb | fault | record
 *   global <symbol> <u32> ...        a __device__ array (the kernels' value sizes)
 *   maxthreads <function> <n>        CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
 *   smem <function> <bytes>          CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
 * and an image containing "bad ptx" fails to load with a JIT error log.
 * Environment: FAKE_CUDA_DEVICES (default 1), FAKE_CUDA_MEM_LIMIT (bytes),
 * FAKE_CUDA_MAX_GRID_Y (default 65535).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda_abi.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NO_DEVICE = 100, INVALID_PTX = 218,
       NOT_FOUND = 500, NOT_READY = 600, ILLEGAL_ADDRESS = 700 };

static int sticky;  /* once a kernel faulted, every call fails with this */
static unsigned long long mem_used;
static double clock_ms;

static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void log_line(const char *fmt, ...) {
    const char *path = getenv("FAKE_CUDA_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

/* ---- device ------------------------------------------------------------------ */

static int devices(void) {
    const char *e = getenv("FAKE_CUDA_DEVICES");
    return e ? atoi(e) : 1;
}
CUresult cuInit(unsigned flags) { (void)flags; return devices() > 0 ? OK : NO_DEVICE; }
CUresult cuDeviceGetCount(int *n) { *n = devices(); return OK; }
CUresult cuDeviceGet(int *d, int i) { *d = i; return i < devices() ? OK : INVALID_VALUE; }
CUresult cuDeviceGetName(char *name, int len, int d) {
    (void)d;
    snprintf(name, len, "Fake GPU");
    return OK;
}
CUresult cuDeviceGetAttribute(int *v, int attr, int d) {
    (void)d;
    const char *gy = getenv("FAKE_CUDA_MAX_GRID_Y");
    switch (attr) {
        case 1: *v = 1024; break;                             /* threads per block */
        case 2: case 3: *v = 1024; break;                     /* block x, y */
        case 4: *v = 64; break;                               /* block z */
        case 5: *v = 0x7fffffff; break;                       /* grid x */
        case 6: *v = gy ? atoi(gy) : 65535; break;            /* grid y */
        case 7: *v = 65535; break;                            /* grid z */
        case 10: *v = 32; break;                              /* warp */
        case 75: *v = 9; break;
        case 76: *v = 0; break;
        case 97: *v = 232448; break;                          /* smem per block, opt-in */
        default: *v = 0;
    }
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t *b, int d) { (void)d; *b = 1ull << 34; return OK; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int d) { (void)d; *ctx = (void *)0x1; return OK; }
CUresult cuCtxSetCurrent(void *ctx) { (void)ctx; return OK; }

static const char *err_name(CUresult r) {
    switch (r) {
        case OK: return "CUDA_SUCCESS";
        case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case INVALID_PTX: return "CUDA_ERROR_INVALID_PTX";
        case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case NOT_READY: return "CUDA_ERROR_NOT_READY";
        case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    }
    return NULL;
}
CUresult cuGetErrorName(CUresult r, const char **s) { *s = err_name(r); return *s ? OK : INVALID_VALUE; }
CUresult cuGetErrorString(CUresult r, const char **s) {
    *s = r == ILLEGAL_ADDRESS ? "an illegal memory access was encountered" : err_name(r);
    return *s ? OK : INVALID_VALUE;
}

/* ---- memory -------------------------------------------------------------------- */

struct alloc { uint8_t *p; size_t n; struct alloc *next; };
static struct alloc *allocs;

CUresult cuMemAlloc_v2(CUdeviceptr *d, size_t n) {
    if (sticky) return sticky;
    const char *lim = getenv("FAKE_CUDA_MEM_LIMIT");
    if (lim && mem_used + n > strtoull(lim, NULL, 10)) return OUT_OF_MEMORY;
    struct alloc *a = malloc(sizeof *a);
    a->p = malloc(n);
    memset(a->p, 0xAB, n); /* garbage, as real device memory: the shim must zero it */
    a->n = n;
    a->next = allocs;
    allocs = a;
    mem_used += n;
    *d = (CUdeviceptr)(uintptr_t)a->p;
    log_line("alloc %zu", n);
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr d) {
    for (struct alloc **pp = &allocs; *pp; pp = &(*pp)->next) {
        if ((CUdeviceptr)(uintptr_t)(*pp)->p != d) continue;
        struct alloc *a = *pp;
        *pp = a->next;
        mem_used -= a->n;
        log_line("free %zu", a->n);
        free(a->p);
        free(a);
        return sticky ? sticky : OK;
    }
    return INVALID_VALUE;
}
CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    const char *lim = getenv("FAKE_CUDA_MEM_LIMIT");
    *total = lim ? strtoull(lim, NULL, 10) : 1ull << 34;
    *free_b = *total - mem_used;
    return OK;
}
CUresult cuMemHostAlloc(void **p, size_t n, unsigned flags) {
    (void)flags;
    *p = malloc(n);
    return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void *p) { free(p); return OK; }

/* ---- modules ------------------------------------------------------------------- */

struct func { char name[64], behaviour[16]; int max_threads, smem, dyn_limit; };
struct global { char name[96]; uint32_t values[64]; int n; };
struct module { struct func funcs[64]; int nfuncs; struct global globals[64]; int nglobals; };

CUresult cuModuleLoadDataEx(struct module **out, const void *image, unsigned nopt, int *opts,
                            void **values) {
    if (sticky) return sticky;
    const char *text = image;
    if (strstr(text, "bad ptx")) {
        for (unsigned i = 0; i < nopt; i++)
            if (opts[i] == 5) /* CU_JIT_ERROR_LOG_BUFFER */
                snprintf(values[i], 200, "ptxas application ptx input, line 3; error   : "
                                         "fake syntax error");
        return INVALID_PTX;
    }
    struct module *m = calloc(1, sizeof *m);
    const char *line = text;
    if (strstr(text, ".entry ")) {  /* real PTX from the translator: entries only record */
        for (; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
            const char *e = strstr(line, ".entry ");
            const char *g = strstr(line, "_value_sizes[");
            const char *eol = strchr(line, '\n');
            if (e && (!eol || e < eol) && m->nfuncs < 64) {
                struct func *f = &m->funcs[m->nfuncs++];
                sscanf(e + 7, "%63[A-Za-z0-9_]", f->name);
                snprintf(f->behaviour, sizeof f->behaviour, "record");
                f->max_threads = 1024;
                f->dyn_limit = 48 * 1024;
            } else if (g && (!eol || g < eol) && m->nglobals < 64) {
                struct global *gl = &m->globals[m->nglobals++];
                const char *start = g;
                while (start > line && start[-1] != ' ') start--;
                sscanf(start, "%95[A-Za-z0-9_]", gl->name);
                int bytes = atoi(g + 13);
                const char *p = strchr(g, '{');
                uint8_t *out = (uint8_t *)gl->values;
                memset(out, 0, sizeof gl->values);
                for (int i = 0; p && i < bytes && i < 256; i++) {
                    unsigned v;
                    int used;
                    if (sscanf(p + 1, " %u%n", &v, &used) != 1) break;
                    out[i] = (uint8_t)v;
                    p = strchr(p + 1 + used, ',');
                }
                gl->n = bytes / 4;
            }
        }
        *out = m;
        return OK;
    }
    while (line && *line) {
        char w[16], a[96], b[96];
        if (sscanf(line, "%15s %95s %95s", w, a, b) >= 2) {
            if (!strcmp(w, "entry")) {
                struct func *f = &m->funcs[m->nfuncs++];
                snprintf(f->name, sizeof f->name, "%s", a);
                snprintf(f->behaviour, sizeof f->behaviour, "%s", b);
                f->max_threads = 1024;
                f->dyn_limit = 48 * 1024;
            } else if (!strcmp(w, "global")) {
                struct global *g = &m->globals[m->nglobals++];
                snprintf(g->name, sizeof g->name, "%s", a);
                const char *p = strstr(line, a) + strlen(a);
                int consumed;
                unsigned v;
                while (sscanf(p, "%u%n", &v, &consumed) == 1 && g->n < 64) {
                    g->values[g->n++] = v;
                    p += consumed;
                }
            } else if (!strcmp(w, "maxthreads") || !strcmp(w, "smem")) {
                for (int i = 0; i < m->nfuncs; i++)
                    if (!strcmp(m->funcs[i].name, a)) {
                        if (w[0] == 'm') m->funcs[i].max_threads = atoi(b);
                        else m->funcs[i].smem = atoi(b);
                    }
            }
        }
        line = strchr(line, '\n');
        if (line) line++;
    }
    *out = m;
    return OK;
}
CUresult cuModuleUnload(struct module *m) { free(m); return OK; }
CUresult cuModuleGetFunction(struct func **f, struct module *m, const char *name) {
    for (int i = 0; i < m->nfuncs; i++)
        if (!strcmp(m->funcs[i].name, name)) { *f = &m->funcs[i]; return OK; }
    return NOT_FOUND;
}
CUresult cuModuleGetGlobal_v2(CUdeviceptr *d, size_t *n, struct module *m, const char *name) {
    for (int i = 0; i < m->nglobals; i++)
        if (!strcmp(m->globals[i].name, name)) {
            *d = (CUdeviceptr)(uintptr_t)m->globals[i].values;
            *n = 4 * m->globals[i].n;
            return OK;
        }
    return NOT_FOUND;
}
CUresult cuFuncGetAttribute(int *v, int attr, struct func *f) {
    *v = attr == 0 ? f->max_threads : attr == 1 ? f->smem : attr == 8 ? f->dyn_limit : 0;
    return OK;
}
CUresult cuFuncSetAttribute(struct func *f, int attr, int v) {
    if (attr != 8 || v + f->smem > 232448) return INVALID_VALUE;
    f->dyn_limit = v;
    log_line("setattr %s max_dynamic_shared %d", f->name, v);
    return OK;
}

/* ---- streams, events and the queued work ------------------------------------- */

enum op_kind { OP_MEMSET, OP_HTOD, OP_DTOH, OP_LAUNCH, OP_EVENT, OP_GEMM };
struct event { int recorded, done; double ms; };
struct op {
    enum op_kind kind;
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
    struct func *f;
    unsigned grid[3], block[3], smem;
    camel_cuda_args args;
    struct event *e;
    int m, n_, k, lda, ldb, ldc;  /* OP_GEMM: column-major, as cuBLAS */
    const float *a, *b;
    float *c;
};
struct stream { struct op *ops; int n, cap; };

CUresult cuStreamCreate(struct stream **s, unsigned flags) {
    (void)flags;
    *s = calloc(1, sizeof **s);
    return OK;
}
static void push(struct stream *s, struct op op) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->ops = realloc(s->ops, s->cap * sizeof *s->ops);
    }
    s->ops[s->n++] = op;
}

/* One launch on the "GPU": the behaviour, thread by thread. */
static CUresult run_launch(const struct op *op) {
    const camel_cuda_args *a = &op->args;
    const char *b = op->f->behaviour;
    log_line("launch %s grid %u %u %u block %u %u %u smem %u origin %u %u %u", op->f->name,
             op->grid[0], op->grid[1], op->grid[2], op->block[0], op->block[1], op->block[2],
             op->smem, a->group_origin[0], a->group_origin[1], a->group_origin[2]);
    if (!strcmp(b, "fault")) return ILLEGAL_ADDRESS;
    if (!strcmp(b, "record")) return OK;
    for (unsigned bz = 0; bz < op->grid[2]; bz++)
    for (unsigned by = 0; by < op->grid[1]; by++)
    for (unsigned bx = 0; bx < op->grid[0]; bx++)
    for (unsigned tz = 0; tz < op->block[2]; tz++)
    for (unsigned ty = 0; ty < op->block[1]; ty++)
    for (unsigned tx = 0; tx < op->block[0]; tx++) {
        unsigned blk[3] = {bx, by, bz}, t[3] = {tx, ty, tz}, gid[3];
        for (int i = 0; i < 3; i++)
            gid[i] = (a->group_origin[i] + blk[i]) * a->dispatch_threads_per_threadgroup[i] + t[i];
        if (!strcmp(b, "cover")) {
            uint32_t *counts = a->buffers[0], *sizes = a->buffers[1], *errors = a->buffers[2];
            if (gid[0] >= a->threads_per_grid[0] || gid[1] >= a->threads_per_grid[1] ||
                gid[2] >= a->threads_per_grid[2]) {
                errors[0]++;  /* a thread outside the grid ran */
                continue;
            }
            size_t i = gid[0] + (size_t)a->threads_per_grid[0] *
                                    (gid[1] + (size_t)a->threads_per_grid[1] * gid[2]);
            counts[i]++;
            sizes[i] = op->block[0] | op->block[1] << 11 | op->block[2] << 22;
        } else if (!strcmp(b, "axpb")) {
            const float *x = a->buffers[0];
            float *y = a->buffers[1];
            float alpha = *(const float *)a->buffers[2], beta = *(const float *)a->buffers[3];
            uint32_t n = *(const uint32_t *)a->buffers[4];
            if (gid[0] < n) y[gid[0]] = alpha * x[gid[0]] + beta;
        }
    }
    return OK;
}

/* Run the stream's queue up to (and including) the record of `until`, or all of it. */
static CUresult run(struct stream *s, struct event *until) {
    int i = 0;
    CUresult r = OK;
    for (; i < s->n && !r; i++) {
        struct op *op = &s->ops[i];
        switch (op->kind) {
            case OP_MEMSET: memset(op->dst, (int)(op->n >> 32), op->n & 0xffffffff); break;
            case OP_HTOD: memcpy(op->dst, op->src, op->n); log_line("htod %zu", op->n); break;
            case OP_DTOH: memcpy(op->dst, op->src, op->n); log_line("dtoh %zu", op->n); break;
            case OP_LAUNCH: r = run_launch(op); break;
            case OP_GEMM:
                for (int j = 0; j < op->n_; j++)
                    for (int i2 = 0; i2 < op->m; i2++) {
                        float acc = 0;
                        for (int l = 0; l < op->k; l++)
                            acc += op->a[i2 + l * op->lda] * op->b[l + j * op->ldb];
                        op->c[i2 + j * op->ldc] = acc;
                    }
                log_line("sgemm %d %d %d", op->m, op->n_, op->k);
                break;
            case OP_EVENT:
                clock_ms += 1.0;
                op->e->ms = clock_ms;
                op->e->done = 1;
                break;
        }
        if (op->kind == OP_EVENT && op->e == until) { i++; break; }
    }
    memmove(s->ops, s->ops + i, (s->n - i) * sizeof *s->ops);
    s->n -= i;
    if (r) {
        sticky = r;
        s->n = 0;
    }
    return r;
}

static struct stream *event_stream(struct event *e);
CUresult cuStreamSynchronize(struct stream *s) { return sticky ? sticky : run(s, NULL); }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, struct stream *s) {
    if (sticky) return sticky;
    push(s, (struct op){.kind = OP_MEMSET, .dst = (uint8_t *)(uintptr_t)d,
                        .n = n | (size_t)v << 32});
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, struct stream *s) {
    if (sticky) return sticky;
    push(s, (struct op){.kind = OP_HTOD, .dst = (uint8_t *)(uintptr_t)d, .src = h, .n = n});
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *h, CUdeviceptr d, size_t n, struct stream *s) {
    if (sticky) return sticky;
    push(s, (struct op){.kind = OP_DTOH, .dst = h, .src = (const uint8_t *)(uintptr_t)d, .n = n});
    return OK;
}
CUresult cuLaunchKernel(struct func *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned smem, struct stream *s, void **params,
                        void **extra) {
    (void)extra;
    if (sticky) return sticky;
    if ((unsigned long long)bx * by * bz > (unsigned)f->max_threads || gy > 65535 || gz > 65535)
        return INVALID_VALUE;
    if (smem + f->smem > 48 * 1024 && (int)smem > f->dyn_limit) return INVALID_VALUE;
    struct op op = {.kind = OP_LAUNCH, .f = f, .grid = {gx, gy, gz}, .block = {bx, by, bz},
                    .smem = smem};
    memcpy(&op.args, params[0], sizeof op.args);
    push(s, op);
    return OK;
}

/* Events remember the stream they were last recorded on. */
struct event_slot { struct event *e; struct stream *s; };
static struct event_slot slots[4096];
static int nslots;
static struct stream *event_stream(struct event *e) {
    for (int i = 0; i < nslots; i++)
        if (slots[i].e == e) return slots[i].s;
    return NULL;
}
CUresult cuEventCreate(struct event **e, unsigned flags) {
    (void)flags;
    *e = calloc(1, sizeof **e);
    return OK;
}
CUresult cuEventRecord(struct event *e, struct stream *s) {
    if (sticky) return sticky;
    e->recorded = 1;
    e->done = 0;
    int i = 0;
    while (i < nslots && slots[i].e != e) i++;
    if (i == nslots) nslots++;
    slots[i] = (struct event_slot){e, s};
    push(s, (struct op){.kind = OP_EVENT, .e = e});
    return OK;
}
CUresult cuEventQuery(struct event *e) {
    if (sticky) return sticky;
    return e->done ? OK : NOT_READY;
}
CUresult cuEventSynchronize(struct event *e) {
    if (sticky) return sticky;
    if (e->done) return OK;
    return run(event_stream(e), e);
}
CUresult cuEventElapsedTime_v2(float *ms, struct event *a, struct event *b) {
    if (!a->done || !b->done) return NOT_READY;
    *ms = (float)(b->ms - a->ms);
    return OK;
}

/* ---- a fake cuBLAS (CAMEL_CUBLAS=<this library>): column-major SGEMM, queued ---- */

static struct stream *blas_stream;
int cublasCreate_v2(void **h) { *h = (void *)0x2; return 0; }
int cublasSetStream_v2(void *h, struct stream *s) { (void)h; blas_stream = s; return 0; }
int cublasSetMathMode(void *h, int mode) {
    (void)h;
    log_line("cublas math mode %d", mode);
    return 0;
}
int cublasSgemm_v2(void *h, int ta, int tb, int m, int n, int k, const float *alpha,
                   const float *a, int lda, const float *b, int ldb, const float *beta, float *c,
                   int ldc) {
    (void)h;
    if (ta || tb || *alpha != 1.0f || *beta != 0.0f || !blas_stream) return 7;
    push(blas_stream, (struct op){.kind = OP_GEMM, .m = m, .n_ = n, .k = k, .lda = lda,
                                  .ldb = ldb, .ldc = ldc, .a = a, .b = b, .c = c});
    return 0;
}
