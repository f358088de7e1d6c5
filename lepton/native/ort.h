/* What Lepton's ONNX Runtime operators share: the parts of ONNX Runtime's C ABI they use (no headers: the
 * pip wheel ships none; the entries of its function table are named by their index, checked against the
 * library by calling each, and the table only ever grows at its end) and the helpers that read inputs,
 * make outputs, refuse bad ones and spread work over ONNX Runtime's intra-op threads.
 *
 * ops.c registers the operators (RegisterCustomOps); slot_attention.c, q8_matmul.c, q4_matmul.c,
 * bf16_matmul.c and f32_matmul.c define them.
 */
#ifndef LEPTON_ORT_H
#define LEPTON_ORT_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC visibility push(hidden)

/* ---- ONNX Runtime's C ABI: the parts used here ------------------------------------------------- */

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtShape OrtShape; /* OrtTensorTypeAndShapeInfo */
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;

typedef struct {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2, ELEMENT_UINT16 = 4, ELEMENT_INT32 = 6, ELEMENT_INT64 = 7, ELEMENT_FLOAT16 = 10 };
enum { STATUS_INVALID_ARGUMENT = 2, STATUS_FAIL = 1 };
enum { REQUIRED = 0, OPTIONAL = 1 };

/* API version asked for (and the OrtCustomOp version declared): KernelContext_ParallelFor came with 17. */
#define API_VERSION 17

/* Indices into OrtApi, the table of function pointers (it only ever grows at its end). */
#define API_CREATE_STATUS 0
#define API_CREATE_CUSTOM_OP_DOMAIN 26
#define API_CUSTOM_OP_DOMAIN_ADD 27
#define API_ADD_CUSTOM_OP_DOMAIN 28
#define API_GET_TENSOR_MUTABLE_DATA 51
#define API_GET_DIMENSIONS_COUNT 61
#define API_GET_DIMENSIONS 62
#define API_GET_TENSOR_TYPE_AND_SHAPE 65
#define API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT 85
#define API_KERNEL_INFO_GET_ATTRIBUTE_INT64 86
#define API_KERNEL_CONTEXT_GET_INPUT 90
#define API_KERNEL_CONTEXT_GET_OUTPUT 91
#define API_RELEASE_STATUS 93
#define API_RELEASE_SHAPE 99 /* ReleaseTensorTypeAndShapeInfo */
#define API_KERNEL_CONTEXT_PARALLEL_FOR 274

typedef OrtStatus *(*CreateStatusFn)(int code, const char *msg);
typedef OrtStatus *(*CreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*CustomOpDomainAddFn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*GetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*GetDimensionsCountFn)(const OrtShape *info, size_t *out);
typedef OrtStatus *(*GetDimensionsFn)(const OrtShape *info, int64_t *values, size_t count);
typedef OrtStatus *(*GetTensorTypeAndShapeFn)(const OrtValue *value, OrtShape **out);
typedef void (*ReleaseStatusFn)(OrtStatus *status);
typedef void (*ReleaseShapeFn)(OrtShape *info);
typedef OrtStatus *(*GetAttributeFloatFn)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*GetAttributeInt64Fn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*GetInputFn)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*GetOutputFn)(OrtKernelContext *context, size_t index, const int64_t *dims, size_t count,
                                  OrtValue **out);
typedef OrtStatus *(*ParallelForFn)(const OrtKernelContext *context, void (*fn)(void *, size_t), size_t total,
                                    size_t num_batch, void *user_data);

/* ONNX Runtime's function table, set by RegisterCustomOps (ops.c). */
extern const void *const *lepton_api;

#define API(type, index) ((type)lepton_api[index])
#define TRY(call)                      \
    do {                               \
        OrtStatus *status_ = (call);   \
        if (status_) return status_;   \
    } while (0)

/* OrtCustomOp (CreateKernelV2 and KernelComputeV2, read from version 16, return a status; the four
 * in-place members stay NULL). */
typedef struct CustomOp CustomOp;
struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const CustomOp *op, const void *api, const OrtKernelInfo *info);
    const char *(*GetName)(const CustomOp *op);
    const char *(*GetExecutionProviderType)(const CustomOp *op);
    int (*GetInputType)(const CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const CustomOp *op);
    int (*GetOutputType)(const CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const CustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const CustomOp *op, size_t index);
    int (*GetInputMemoryType)(const CustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const CustomOp *op);
    int (*GetVariadicInputHomogeneity)(const CustomOp *op);
    int (*GetVariadicOutputMinArity)(const CustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const CustomOp *op);
    OrtStatus *(*CreateKernelV2)(const CustomOp *op, const void *api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
    OrtStatus *(*InferOutputShapeFn)(const CustomOp *op, void *context);
    int (*GetStartVersion)(const CustomOp *op);
    int (*GetEndVersion)(const CustomOp *op);
    size_t (*GetMayInplace)(int **inputs, int **outputs);
    void (*ReleaseMayInplace)(int *inputs, int *outputs);
    size_t (*GetAliasMap)(int **inputs, int **outputs);
    void (*ReleaseAliasMap)(int *inputs, int *outputs);
};

/* The hot functions of an operator in three versions, one picked by the loader for the processor it runs
 * on; built with -DLEPTON_ONE_TARGET they are compiled once, for -march's target (the tests build each so). */
#ifdef LEPTON_ONE_TARGET
#define CLONED
#else
#define CLONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

/* An integer vector sum kept as it is, in a register, at this point: GCC reassociates a chain of integer adds
 * (sum += p0; sum += p1; ...) into a tree of all the products, which with 8 sums a pass puts every product on
 * the stack first (AVX2's vpmaddubsw loops: a store and a load per product). Costs no instruction. */
#define IN_REGISTER(a, b) __asm__("" : "+x"(a), "+x"(b))

/* A status naming what is wrong (format: the operator's name first, then two numbers). */
static inline OrtStatus *invalid(const char *format, long long a, long long b) {
    char message[256];
    snprintf(message, sizeof message, format, a, b);
    return API(CreateStatusFn, API_CREATE_STATUS)(STATUS_INVALID_ARGUMENT, message);
}

static inline OrtStatus *out_of_memory(const char *op) {
    char message[128];
    snprintf(message, sizeof message, "%s: out of memory", op);
    return API(CreateStatusFn, API_CREATE_STATUS)(STATUS_FAIL, message);
}

static inline OrtStatus *shape_of(const char *op, const OrtValue *value, int64_t *dims, size_t max_dims, size_t *count) {
    OrtShape *info = NULL;
    TRY(API(GetTensorTypeAndShapeFn, API_GET_TENSOR_TYPE_AND_SHAPE)(value, &info));
    OrtStatus *status = API(GetDimensionsCountFn, API_GET_DIMENSIONS_COUNT)(info, count);
    if (!status && *count > max_dims) {
        char format[128];
        snprintf(format, sizeof format, "%s: an input of rank %%lld (at most %%lld)", op);
        status = invalid(format, (long long)*count, (long long)max_dims);
    }
    if (!status) status = API(GetDimensionsFn, API_GET_DIMENSIONS)(info, dims, *count);
    API(ReleaseShapeFn, API_RELEASE_SHAPE)(info);
    return status;
}

/* An optional integer attribute: its value, or `fallback` when the node has none. */
static inline int64_t optional_int(const OrtKernelInfo *info, const char *name, int64_t fallback) {
    int64_t value = fallback;
    OrtStatus *status = API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, name, &value);
    if (status) {
        API(ReleaseStatusFn, API_RELEASE_STATUS)(status);
        return fallback;
    }
    return value;
}

/* Input `index` of `inputs` (at most 4 dimensions, into dims); rank (size_t)-1 takes any rank, which is
 * then written to *rank_out when it is not NULL. */
static inline OrtStatus *get_input(const char *op, size_t inputs, OrtKernelContext *context, size_t index,
                                   const void **data, int64_t *dims, size_t rank, size_t *rank_out) {
    const OrtValue *value = NULL;
    size_t count = 0;
    char format[128];
    TRY(API(GetInputFn, API_KERNEL_CONTEXT_GET_INPUT)(context, index, &value));
    if (!value) {
        snprintf(format, sizeof format, "%s: input %%lld of %%lld is missing", op);
        return invalid(format, (long long)index, (long long)inputs);
    }
    TRY(shape_of(op, value, dims, 4, &count));
    if (rank != (size_t)-1 && count != rank) {
        snprintf(format, sizeof format, "%s: input %%lld has the wrong rank %%lld", op);
        return invalid(format, (long long)index, (long long)count);
    }
    if (rank_out) *rank_out = count;
    return API(GetTensorMutableDataFn, API_GET_TENSOR_MUTABLE_DATA)((OrtValue *)value, (void **)data);
}

static inline OrtStatus *get_output(OrtKernelContext *context, size_t index, const int64_t *dims, size_t rank, float **data) {
    OrtValue *value = NULL;
    TRY(API(GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(context, index, dims, rank, &value));
    return API(GetTensorMutableDataFn, API_GET_TENSOR_MUTABLE_DATA)(value, (void **)data);
}

/* fn(data, i) for every i < total, on ONNX Runtime's intra-op threads, one i at a time to whichever
 * thread is free. */
static inline void parallel_for(OrtKernelContext *context, void (*fn)(void *, size_t), size_t total, void *data) {
    if (total == 1) {
        fn(data, 0);
        return;
    }
    OrtStatus *status = API(ParallelForFn, API_KERNEL_CONTEXT_PARALLEL_FOR)(context, fn, total, 0, data);
    if (status) { /* NOTE: no thread pool to hand the tasks to: run them here */
        API(ReleaseStatusFn, API_RELEASE_STATUS)(status);
        for (size_t i = 0; i < total; i++) fn(data, i);
    }
}

/* The members every operator here fills the same way. */
static inline const char *op_provider(const CustomOp *op) { (void)op; return NULL; /* NULL: the CPU provider */ }
static inline int required(const CustomOp *op, size_t index) { (void)op, (void)index; return REQUIRED; }
static inline int default_memory(const CustomOp *op, size_t index) { (void)op, (void)index; return 0; }
static inline int one(const CustomOp *op) { (void)op; return 1; }
static inline int zero(const CustomOp *op) { (void)op; return 0; }
static inline int start_version(const CustomOp *op) { (void)op; return 1; }
static inline int end_version(const CustomOp *op) { (void)op; return 2147483647; }
static inline int float_output(const CustomOp *op, size_t index) { (void)op, (void)index; return ELEMENT_FLOAT; }

static inline void free_kernel(void *kernel) { free(kernel); }

/* An operator `var` named `name` with `inputs` inputs (their types from input_type_fn), `outputs` float
 * outputs, a kernel made by create_fn (freed with free) and run by compute_fn. */
#define OPERATOR(var, name, inputs, outputs, input_type_fn, create_fn, compute_fn) \
    TYPED_OPERATOR(var, name, inputs, outputs, input_type_fn, float_output, create_fn, compute_fn)

/* The same with the outputs' types from output_type_fn. */
#define TYPED_OPERATOR(var, name, inputs, outputs, input_type_fn, output_type_fn, create_fn, compute_fn) \
    OPERATOR_WITH(var, name, inputs, outputs, input_type_fn, output_type_fn, required, create_fn, compute_fn)

/* A weight product `var` named `name`: `inputs` inputs (types from input_type_fn), the last two of them optional
 * (the residual R, then the RMS norm's weight G), one float output. */
#define PRODUCT_OPERATOR(var, name, inputs, input_type_fn, create_fn, compute_fn)                          \
    static int var##_characteristic(const CustomOp *op, size_t index) {                                  \
        (void)op;                                                                                        \
        return index + 2 >= (inputs) ? OPTIONAL : REQUIRED;                                              \
    }                                                                                                    \
    OPERATOR_WITH(var, name, inputs, 1, input_type_fn, float_output, var##_characteristic, create_fn, compute_fn)

/* An operator with each input's characteristic (required or optional) from characteristic_fn. */
#define OPERATOR_WITH(var, name, inputs, outputs, input_type_fn, output_type_fn, characteristic_fn, create_fn, compute_fn) \
    static const char *var##_name(const CustomOp *op) { (void)op; return name; }                 \
    static size_t var##_inputs(const CustomOp *op) { (void)op; return inputs; }                  \
    static size_t var##_outputs(const CustomOp *op) { (void)op; return outputs; }                \
    const CustomOp var = {                                                                       \
        .version = API_VERSION,                                                                  \
        .GetName = var##_name,                                                                   \
        .GetExecutionProviderType = op_provider,                                                 \
        .GetInputType = input_type_fn,                                                           \
        .GetInputTypeCount = var##_inputs,                                                       \
        .GetOutputType = output_type_fn,                                                         \
        .GetOutputTypeCount = var##_outputs,                                                     \
        .KernelDestroy = free_kernel,                                                            \
        .GetInputCharacteristic = characteristic_fn,                                             \
        .GetOutputCharacteristic = required,                                                     \
        .GetInputMemoryType = default_memory,                                                    \
        .GetVariadicInputMinArity = one,                                                         \
        .GetVariadicInputHomogeneity = zero,                                                     \
        .GetVariadicOutputMinArity = one,                                                        \
        .GetVariadicOutputHomogeneity = zero,                                                    \
        .CreateKernelV2 = create_fn,                                                             \
        .KernelComputeV2 = compute_fn,                                                           \
        .GetStartVersion = start_version,                                                        \
        .GetEndVersion = end_version,                                                            \
    }

/* ---- what the weight products share --------------------------------------------------------- */

enum { GATE_PAIR = 32 }; /* a gated product's unit: a gate panel of 16 outputs, then its up panel */
/* NOTE: the weight products prefetch their panels only in passes of more than this many rows: in fewer the
 * weights stream in faster than they are computed, the processor's own prefetcher keeps up, and asked-for
 * lines only take its fill buffers (one decode's products without: q8 5.46 -> 4.61 ms, bf16 7.64 -> 6.55,
 * f32 14.7 -> 13.9, q4 with int8 activations 3.93 -> 3.82; 4 rows level or better, 8 rows worse without;
 * `python -m benchmarks.products --library`, 2026-12-07 04:00, docs/performance.md). */
enum { PREFETCH_ROWS = 4 };

/* AVX-512 F, BW and VL: what every AVX-512 path here also needs. */
static inline int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

/* Rows [index x size, ...) of `rows`, the last range cut short. */
static inline int64_t range_end(int64_t index, int64_t size, int64_t rows) {
    return (index + 1) * size < rows ? (index + 1) * size : rows;
}

/* rows_fn(pr, panel, m, mt) over rows [m0, m1): `tile` rows at a time, then the remainder in one call, each count
 * a constant the inlined rows_fn is compiled for: ROWS_AT_A_TIME (tile 8 or 16) compiles rows_fn for 1 .. 15 rows
 * (the cases past tile - 1 are never taken), FEW_ROWS_AT_A_TIME (a tile of at most FEW_ROWS, the AVX2 paths') for
 * 1 .. FEW_ROWS only, so that its accumulator arrays can be sized FEW_ROWS and stay in registers. */
enum { FEW_ROWS = 6 };
#define ROWS_CASE(rows_fn, pr, panel, m, count) \
    case count: rows_fn(pr, panel, m, count); break;
#define ROWS_IN_TILES(rows_fn, pr, panel, m0, m1, tile, remainder_cases)           \
    do {                                                                           \
        int64_t m_ = (m0);                                                         \
        for (; m_ + (tile) <= (m1); m_ += (tile)) rows_fn(pr, panel, m_, tile);    \
        switch ((m1) - m_) {                                                       \
            remainder_cases(rows_fn, pr, panel, m_)                                \
        default: break;                                                            \
        }                                                                          \
    } while (0)
#define FEW_CASES(rows_fn, pr, panel, m)                                                          \
    ROWS_CASE(rows_fn, pr, panel, m, 5) ROWS_CASE(rows_fn, pr, panel, m, 4)                       \
    ROWS_CASE(rows_fn, pr, panel, m, 3) ROWS_CASE(rows_fn, pr, panel, m, 2) ROWS_CASE(rows_fn, pr, panel, m, 1)
#define ALL_CASES(rows_fn, pr, panel, m)                                                            \
    ROWS_CASE(rows_fn, pr, panel, m, 15) ROWS_CASE(rows_fn, pr, panel, m, 14)                       \
    ROWS_CASE(rows_fn, pr, panel, m, 13) ROWS_CASE(rows_fn, pr, panel, m, 12)                       \
    ROWS_CASE(rows_fn, pr, panel, m, 11) ROWS_CASE(rows_fn, pr, panel, m, 10)                       \
    ROWS_CASE(rows_fn, pr, panel, m, 9) ROWS_CASE(rows_fn, pr, panel, m, 8)                         \
    ROWS_CASE(rows_fn, pr, panel, m, 7) ROWS_CASE(rows_fn, pr, panel, m, 6) FEW_CASES(rows_fn, pr, panel, m)
#define ROWS_AT_A_TIME(rows_fn, pr, panel, m0, m1, tile) ROWS_IN_TILES(rows_fn, pr, panel, m0, m1, tile, ALL_CASES)
#define FEW_ROWS_AT_A_TIME(rows_fn, pr, panel, m0, m1, tile) ROWS_IN_TILES(rows_fn, pr, panel, m0, m1, tile, FEW_CASES)

/* The output Y [..., N] of a product of A [..., K] (dims, rank), made; *rows = the rows of A. An A whose rows
 * do not hold K values is refused. */
static inline OrtStatus *product_output(const char *op, OrtKernelContext *context, const int64_t *a_dims, size_t a_rank,
                                        int64_t k, int64_t n, int64_t *rows, float **y) {
    if (a_rank < 1 || a_dims[a_rank - 1] != k) {
        char format[128];
        snprintf(format, sizeof format, "%s: A has %%lld values per row, expected K = %%lld", op);
        return invalid(format, a_rank ? a_dims[a_rank - 1] : 0, k);
    }
    int64_t y_dims[4];
    *rows = 1;
    for (size_t i = 0; i + 1 < a_rank; i++) *rows *= (y_dims[i] = a_dims[i]);
    y_dims[a_rank - 1] = n;
    return get_output(context, 0, y_dims, a_rank, y);
}

/* A weight input laid out per panel of 16 outputs and block of inputs, [panels, blocks, width], else an error
 * naming it: "<op>: <name> has <n> <noun>, expected ceil(N / 16) x K / <block> = <panels x blocks> of <width><unit>". */
static inline OrtStatus *check_panels(const char *op, const char *name, const int64_t *dims, int64_t panels,
                                      int64_t blocks, int64_t width, int block, const char *noun, const char *unit) {
    if (dims[0] == panels && dims[1] == blocks && dims[2] == width) return NULL;
    char format[256];
    snprintf(format, sizeof format, "%s: %s has %%lld %s, expected ceil(N / 16) x K / %d = %%lld of %lld%s", op, name,
             noun, block, (long long)width, unit);
    return invalid(format, dims[0] * dims[1], panels * blocks);
}

/* Output row m's values of panel `panel` (16 outputs, fewer in the last panel) from acc, plus the residual's
 * where r (laid out as y) is not NULL: the same float32 sum an Add after the product makes. */
static inline void store_panel(float *y, const float *r, int64_t n, int64_t panel, int64_t m, const float *acc) {
    const int64_t n0 = panel * 16, count = n - n0 < 16 ? n - n0 : 16;
    float *out = y + m * n + n0;
    if (!r) {
        memcpy(out, acc, (size_t)count * sizeof(float));
        return;
    }
    for (int64_t l = 0; l < count; l++) out[l] = r[m * n + n0 + l] + acc[l];
}

/* store_panel for `mt` rows m, m + 1, ... of 16 float32 sums each (AVX-512 registers). */
static inline __attribute__((always_inline, target("avx512f"))) void store_rows(float *y, const float *r, int64_t n,
                                                                                  int64_t panel, int64_t m,
                                                                                  const __m512 *acc, int mt) {
    const int64_t n0 = panel * 16, count = n - n0 < 16 ? n - n0 : 16;
    const __mmask16 lanes = (__mmask16)((1u << count) - 1u);
    for (int i = 0; i < mt; i++) {
        const int64_t at = (m + i) * n + n0;
        __m512 v = acc[i];
        if (r) v = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, r + at), v);
        _mm512_mask_storeu_ps(y + at, lanes, v);
    }
}

/* A tile's sums for rows m, m + 1, ... of panel `panel` into pr->y (plus pr->residual's, when given), whose
 * first row is row pr->row0 and first panel pr->panel0 (0 and 0 but in a gated product's tasks, which gather
 * a pair of panels in a buffer and take no residual). */
#define STORE_ROWS(pr, panel, m, acc, mt) \
    store_rows((pr)->y, (pr)->residual, (pr)->n, (panel) - (pr)->panel0, (m) - (pr)->row0, acc, mt)
#define STORE_PANEL(pr, panel, m, acc) \
    store_panel((pr)->y, (pr)->residual, (pr)->n, (panel) - (pr)->panel0, (m) - (pr)->row0, acc)

/* The optional residual R, input `index`: *r = NULL when the node has none, else R must have Y's shape (A's
 * dimensions but the last, then N); a gated product takes none. */
static inline OrtStatus *residual_input(const char *op, OrtKernelContext *context, size_t index, const int64_t *a_dims,
                                        size_t a_rank, int64_t n, int gated, const float **r) {
    const OrtValue *value = NULL;
    char format[192];
    *r = NULL;
    TRY(API(GetInputFn, API_KERNEL_CONTEXT_GET_INPUT)(context, index, &value));
    if (!value) return NULL;
    if (gated) {
        snprintf(format, sizeof format, "%s: a gated product (gated = %%lld) takes no residual (input %%lld)", op);
        return invalid(format, 1, (long long)index);
    }
    int64_t dims[4];
    size_t count = 0;
    TRY(shape_of(op, value, dims, 4, &count));
    if (count != a_rank) {
        snprintf(format, sizeof format, "%s: the residual has rank %%lld, expected Y's %%lld", op);
        return invalid(format, (long long)count, (long long)a_rank);
    }
    for (size_t i = 0; i < count; i++) {
        const int64_t want = i + 1 == count ? n : a_dims[i];
        if (dims[i] != want) {
            snprintf(format, sizeof format, "%s: the residual's dimension %zu is %%lld, expected Y's %%lld", op, i);
            return invalid(format, dims[i], want);
        }
    }
    return API(GetTensorMutableDataFn, API_GET_TENSOR_MUTABLE_DATA)((OrtValue *)value, (void **)r);
}

/* A weight product's attributes K and N (K a positive multiple of `k_step`, else the error `k_rule`: a format
 * taking K and k_step; N at least 1), its optional isa (0: `best`), which `runs` must accept, else an error
 * naming the paths `isas` lists, and its optional gated (0 or 1; gated needs N a multiple of 32). */
static inline OrtStatus *product_attributes(const char *op, const OrtKernelInfo *info, int64_t k_step, const char *k_rule,
                                            int (*runs)(int), int best, const char *isas, int64_t *k, int64_t *n, int *isa,
                                            int *gated) {
    char format[256];
    const int64_t asked = optional_int(info, "isa", 0); /* NOTE: optional: the best this processor runs */
    const int64_t gate = optional_int(info, "gated", 0);
    TRY(API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, "K", k));
    TRY(API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, "N", n));
    if (*k < k_step || *k % k_step) {
        snprintf(format, sizeof format, "%s: %s", op, k_rule);
        return invalid(format, *k, k_step);
    }
    if (*n < 1) {
        snprintf(format, sizeof format, "%s: N = %%lld, expected at least %%lld", op);
        return invalid(format, *n, 1);
    }
    if (gate != 0 && gate != 1) {
        snprintf(format, sizeof format, "%s: gated = %%lld, expected 0 (Y = A W^T) or %%lld (Y = silu(gate) x up)", op);
        return invalid(format, gate, 1);
    }
    if (gate && *n % GATE_PAIR) {
        snprintf(format, sizeof format, "%s: N = %%lld, a gated product needs a multiple of %%lld (a gate panel of 16 "
                 "outputs, then its up panel)", op);
        return invalid(format, *n, GATE_PAIR);
    }
    *gated = (int)gate;
    *isa = asked ? (int)asked : best;
    if (!runs(*isa)) {
        snprintf(format, sizeof format, "%s: isa = %%lld needs instructions this processor lacks (%s; it runs up to %%lld)",
                 op, isas);
        return invalid(format, asked, best);
    }
    return NULL;
}

/* ---- the RMS norm before a product: A's rows normalized as the product reads them ----------------- */

/* The optional attribute epsilon of a product's norm (1e-5, ONNX's SimplifiedLayerNormalization's, when the node
 * has none), which must be a positive finite number. */
static inline OrtStatus *norm_epsilon(const char *op, const OrtKernelInfo *info, float *epsilon) {
    *epsilon = 1e-5f;
    OrtStatus *status = API(GetAttributeFloatFn, API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT)(info, "epsilon", epsilon);
    if (status) { /* NOTE: no such attribute: the default */
        API(ReleaseStatusFn, API_RELEASE_STATUS)(status);
        *epsilon = 1e-5f;
    }
    if (!(*epsilon > 0.0f && *epsilon < 1e30f)) {
        char message[160];
        snprintf(message, sizeof message, "%s: epsilon = %g, expected a positive number (the RMS norm's)", op, (double)*epsilon);
        return API(CreateStatusFn, API_CREATE_STATUS)(STATUS_INVALID_ARGUMENT, message);
    }
    return NULL;
}

enum { NORM_ROWS = 16 };

typedef struct {
    const float *x, *g;
    float *out;
    int64_t rows, k;
    float epsilon;
} NormRows;

/* Rows [NORM_ROWS x task, ...): out = x g / sqrt(mean(x^2) + epsilon), the sum of squares in float64 (eight
 * running sums, then theirs), as ONNX Runtime's SimplifiedLayerNormalization sums them; x / r then times g in
 * float32. */
static void norm_rows(void *data, size_t task) {
    const NormRows *nr = data;
    const int64_t k = nr->k;
    for (int64_t m = (int64_t)task * NORM_ROWS; m < range_end((int64_t)task, NORM_ROWS, nr->rows); m++) {
        const float *x = nr->x + m * k;
        float *out = nr->out + m * k;
        double part[8] = {0}, squares = 0.0;
        int64_t j = 0;
        for (; j + 8 <= k; j += 8)
            for (int l = 0; l < 8; l++) part[l] += (double)x[j + l] * (double)x[j + l];
        for (; j < k; j++) part[0] += (double)x[j] * (double)x[j];
        for (int l = 0; l < 8; l++) squares += part[l];
        /* NOTE: sqrtsd itself: the argument is at least epsilon > 0, and the library needs no libm for it */
        const float r = (float)_mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(squares / (double)k + (double)nr->epsilon)));
        for (j = 0; j < k; j++) out[j] = x[j] / r * nr->g[j];
    }
}

/* An optional float input [K], input `index` (`what` names it in errors): *data, or NULL when the node has none. */
static inline OrtStatus *vector_input(const char *op, OrtKernelContext *context, size_t index, int64_t k, const char *what,
                                      const float **data) {
    const OrtValue *value = NULL;
    *data = NULL;
    TRY(API(GetInputFn, API_KERNEL_CONTEXT_GET_INPUT)(context, index, &value));
    if (!value) return NULL;
    int64_t dims[4];
    size_t count = 0;
    TRY(shape_of(op, value, dims, 4, &count));
    if (count != 1 || dims[0] != k) {
        char format[160];
        snprintf(format, sizeof format, count != 1 ? "%s: %s (input %zu) has rank %%lld, expected %%lld"
                 : "%s: %s (input %zu) has %%lld values, expected K = %%lld", op, what, index);
        return count != 1 ? invalid(format, (long long)count, 1) : invalid(format, dims[0], k);
    }
    return API(GetTensorMutableDataFn, API_GET_TENSOR_MUTABLE_DATA)((OrtValue *)value, (void **)data);
}

/* The optional RMS norm's weight G [K], input `index`: when the node has it, *a (rows x K values) becomes a copy
 * of its rows normalized, x g / sqrt(mean(x^2) + epsilon), in *normed (the caller frees it; NULL without a norm).
 * What the export's Pow, ReduceMean, Add, Sqrt, Div and Mul (or ONNX Runtime's SimplifiedLayerNormalization)
 * compute before the product, in the product's own node (lepton/runners/norm_graph.py). */
static inline OrtStatus *normalized_input(const char *op, OrtKernelContext *context, size_t index, int64_t rows, int64_t k,
                                          float epsilon, const float **a, float **normed) {
    const float *g = NULL;
    *normed = NULL;
    TRY(vector_input(op, context, index, k, "the norm's weight", &g));
    if (!g) return NULL;
    NormRows nr = {.x = *a, .g = g, .rows = rows, .k = k, .epsilon = epsilon};
    if (!(nr.out = malloc((size_t)(rows * k) * sizeof(float)))) return out_of_memory(op);
    const size_t tasks = (size_t)((rows + NORM_ROWS - 1) / NORM_ROWS);
    if (rows * k <= 32768) /* NOTE: as prepare_then_multiply: a few microseconds, not worth waking the pool */
        for (size_t t = 0; t < tasks; t++) norm_rows(&nr, t);
    else
        parallel_for(context, norm_rows, tasks, &nr);
    *a = *normed = nr.out;
    return NULL;
}

/* A product's two phases: prepare(data, task) for the `prepare_tasks` tasks of its activations (here when
 * they hold at most 32,768 values: a few microseconds, not worth waking the pool), then multiply(data,
 * task) for `tasks` tasks on ONNX Runtime's intra-op threads. */
static inline void prepare_then_multiply(OrtKernelContext *context, void (*prepare)(void *, size_t), size_t prepare_tasks,
                                         int64_t values, void (*multiply)(void *, size_t), size_t tasks, void *data) {
    if (values <= 32768)
        for (size_t t = 0; t < prepare_tasks; t++) prepare(data, t);
    else
        parallel_for(context, prepare, prepare_tasks, data);
    parallel_for(context, multiply, tasks, data);
}

/* One block of 32 activations to int8 with AVX-512, for MatMulQ8's and MatMulQ4's int8 path: returns the block's
 * scale max|a| / 127 and sets *v0, *v1 to its codes as int32, a x (1 / scale) rounded to nearest even (one product,
 * then the conversion's rounding: the plain loops' codes). max|a| ignores NaN as those loops' comparison does
 * (vmaxps gives its second operand when the first is NaN). A decode step's activations are quantized on one thread
 * while the other waits (prepare_then_multiply); the loops' target clone took ~23 ns a block here
 * (docs/performance.md). */
static inline __attribute__((always_inline, target("avx512f"))) float quantize_block_avx512(const float *x, __m512i *v0,
                                                                                             __m512i *v1) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const __m512 highest = _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps()));
    const float top = _mm512_reduce_max_ps(highest);
    const float scale = top / 127.0f, inverse = top != 0.0f ? 1.0f / scale : 0.0f;
    const __m512 times = _mm512_set1_ps(inverse);
    *v0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x0, times), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    *v1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x1, times), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return scale;
}

/* ---- gated products: Y = silu(gate) x up, the MLP's gate in the product's tasks ----------------- */

/* exp(x) in plain float32 arithmetic the compiler vectorizes (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a
 * polynomial of degree 6 in r, 2^n put into the exponent's bits); x clamped to [-87, 88], so the result is a
 * normal number; within 2 ulp of exp over that range. */
static inline float lepton_expf(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x; /* NOTE: a NaN passes through and makes the result NaN */
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* `rows` rows of a gate panel's 16 sums and its up panel's 16 (pairs: [rows, 32]) -> silu(g) u = g u / (1 +
 * exp(-g)) into y (16 values a row, rows `stride` apart). */
CLONED __attribute__((unused)) static void gate_rows(const float *pairs, int64_t rows, float *y, int64_t stride) {
    for (int64_t m = 0; m < rows; m++) {
        const float *g = pairs + m * GATE_PAIR, *u = g + GATE_PAIR / 2;
        float *out = y + m * stride;
#pragma omp simd
        for (int l = 0; l < GATE_PAIR / 2; l++) out[l] = g[l] * u[l] / (1.0f + lepton_expf(-g[l]));
    }
}

/* product_task(data, task) for a product type with rows, panels, gated, y, residual, n, row0, panel0 and tile(pr,
 * panel, m0, m1) (whose sums go through STORE_ROWS / STORE_PANEL): one task is panel `task % panels` for the
 * rows of chunk `task / panels` (ROW_CHUNK rows); gated, one task is a pair of panels, gate panel 2j and up
 * panel 2j + 1 (the runner interleaves the weights so), whose sums go to a buffer of the task's and leave as
 * outputs 16j .. 16j + 15 of Y [rows, N / 2]. product_tasks(pr) is how many tasks there are. */
#define PRODUCT_TASK(Type)                                                                                   \
    static size_t product_tasks(const Type *pr) { return (size_t)(pr->chunks * (pr->gated ? pr->panels / 2 : pr->panels)); } \
    static void product_task(void *data, size_t task) {                                                      \
        const Type *pr = data;                                                                               \
        const int64_t units = pr->gated ? pr->panels / 2 : pr->panels;                                       \
        const int64_t unit = (int64_t)task % units, chunk = (int64_t)task / units;                           \
        const int64_t m0 = chunk * ROW_CHUNK, m1 = range_end(chunk, ROW_CHUNK, pr->rows);                     \
        if (!pr->gated) {                                                                                    \
            pr->tile(pr, unit, m0, m1);                                                                      \
            return;                                                                                          \
        }                                                                                                    \
        float sums[ROW_CHUNK * GATE_PAIR];                                                                   \
        Type pair = *pr;                                                                                     \
        pair.y = sums, pair.residual = NULL, pair.n = GATE_PAIR, pair.row0 = m0, pair.panel0 = 2 * unit;                           \
        pr->tile(&pair, 2 * unit, m0, m1);                                                                   \
        pr->tile(&pair, 2 * unit + 1, m0, m1);                                                               \
        gate_rows(sums, m1 - m0, pr->y + m0 * (pr->n / 2) + unit * (GATE_PAIR / 2), pr->n / 2);              \
    }

/* The operators (ops.c registers them). */
extern const CustomOp lepton_slot_attention;
extern const CustomOp lepton_slot_attention_f16;
extern const CustomOp lepton_slot_attention_i8;
extern const CustomOp lepton_q8_matmul;
extern const CustomOp lepton_q4_matmul;
extern const CustomOp lepton_bf16_matmul;
extern const CustomOp lepton_f32_matmul;
extern const CustomOp lepton_topk_rescore;

#pragma GCC visibility pop

#endif
