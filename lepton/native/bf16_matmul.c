/* Lepton's bfloat16 weight product: an ONNX Runtime custom operator (domain "ai.lepton", op "MatMulBF16").
 *
 * Y = A W^T with the weights stored in bfloat16 and each row of A rounded to bfloat16 (nearest even) for
 * the product; sums in float32. It serves a float32 export's weight products in 16 bits (what llama.cpp's
 * BF16 and torch's bfloat16 compute), half the bytes a decode reads and AVX-512 BF16's dot products
 * (vdpbf16ps: pairs of bfloat16 products added into 16 float32 lanes) instead of float32 FMAs. The
 * weights come packed for the vector units (lepton/runners/bf16_graph.py packs them when the runner
 * rewrites the graph): panels of 16 outputs, each pair of inputs as 16 outputs x 2 = 64 bytes, so that
 * one vdpbf16ps advances 16 outputs by 2 inputs with the row's 2 inputs broadcast.
 *
 * Inputs: A float [..., K]; B uint16 (bfloat16 bits) [ceil(N / 16), K / 2, 32]. Attributes: K (even), N;
 * isa (optional): 0 = the best this processor runs, 1 = plain C, 3 = AVX-512 BF16. Every path rounds A the
 * same (vcvtne2ps2bf16's rounding: nearest even, NaN quiet, denormals flushed to zero) and computes,
 * per output, acc = fma(a[k+1], w[k+1], acc) then fma(a[k], w[k], acc) for k = 0, 2, 4, ... (the order of
 * vdpbf16ps' definition; each product of two bfloat16 values is exact in float32); a processor may round
 * the pair's sum once instead of twice, so paths agree to float32 rounding, not bit for bit.
 *
 * Work: the rows of A are rounded once (on ONNX Runtime's intra-op threads when there are many), then each
 * task computes one panel of 16 outputs for up to 64 rows, 8 rows at a time (8 accumulators in registers).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort.h"

enum { LANES = 16, PAIR_BYTES = 2 * LANES * 2, ROW_CHUNK = 64, CONVERT_ROWS = 16, PREFETCH_BYTES = 1024 };
enum { ISA_BEST = 0, ISA_GENERIC = 1, ISA_AVX512_BF16 = 3 };
#define OP "MatMulBF16"

typedef struct BProduct BProduct;
typedef void (*BTileFn)(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1);

typedef void (*ConvertFn)(void *data, size_t task);

typedef struct {
    int64_t k, n;
    BTileFn tile;
    ConvertFn convert;
} BKernel;

struct BProduct {
    const float *a;
    const uint16_t *b;
    float *y;
    uint32_t *pairs; /* [rows, K / 2]: each row's inputs as bfloat16 pairs (low half the even input) */
    int64_t rows, k, n, pairs_per_row, panels, chunks;
    BTileFn tile;
};

/* float32 -> bfloat16 bits as vcvtne2ps2bf16 gives them: rounded to nearest even, a NaN quiet, a
 * denormal input flushed to a signed zero. */
static inline uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* Row m of A as bfloat16 pairs, from input `from` (even) on. */
static void convert_row(const BProduct *pr, int64_t m, int64_t from) {
    const float *x = pr->a + m * pr->k;
    uint32_t *p = pr->pairs + m * pr->pairs_per_row;
    for (int64_t i = from; i < pr->k; i += 2) p[i / 2] = (uint32_t)to_bf16(x[i]) | (uint32_t)to_bf16(x[i + 1]) << 16;
}

/* Rows [CONVERT_ROWS x task, ...) of A as bfloat16 pairs. */
static void convert_rows_generic(void *data, size_t task) {
    const BProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++)
        convert_row(pr, m, 0);
}

static void store(const BProduct *pr, int64_t panel, int64_t m, const float *acc) {
    const int64_t n0 = panel * LANES, count = pr->n - n0 < LANES ? pr->n - n0 : LANES;
    memcpy(pr->y + m * pr->n + n0, acc, (size_t)count * sizeof(float));
}

/* Plain C: the products in the order the vector path's definition gives. */
static void tile_generic(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    const uint16_t *w = pr->b + panel * pr->pairs_per_row * 2 * LANES;
    for (int64_t m = m0; m < m1; m++) {
        const uint32_t *p = pr->pairs + m * pr->pairs_per_row;
        float acc[LANES] = {0};
        for (int64_t j = 0; j < pr->pairs_per_row; j++) {
            const float lo = from_bf16((uint16_t)(p[j] & 0xffffu)), hi = from_bf16((uint16_t)(p[j] >> 16));
            const uint16_t *wj = w + j * 2 * LANES;
            for (int l = 0; l < LANES; l++) {
                acc[l] = fmaf(hi, from_bf16(wj[2 * l + 1]), acc[l]);
                acc[l] = fmaf(lo, from_bf16(wj[2 * l]), acc[l]);
            }
        }
        store(pr, panel, m, acc);
    }
}

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

/* convert_rows_generic with vcvtne2ps2bf16, 32 inputs at a time (the same bits). */
BF16 static void convert_rows_bf16(void *data, size_t task) {
    const BProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++) {
        const float *x = pr->a + m * pr->k;
        uint32_t *p = pr->pairs + m * pr->pairs_per_row;
        int64_t i = 0;
        for (; i + 32 <= pr->k; i += 32) {
            const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
            _mm512_storeu_si512((void *)(p + i / 2), (__m512i)h);
        }
        convert_row(pr, m, i);
    }
}

/* AVX-512 BF16: vdpbf16ps of the 64 bytes of a pair (16 outputs x 2 inputs) with each row's pair
 * broadcast, `mt` rows at a time. */
static inline __attribute__((always_inline)) BF16 void bf16_rows(const BProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *w = (const uint8_t *)(pr->b + panel * pr->pairs_per_row * 2 * LANES);
    const uint32_t *p = pr->pairs + m * pr->pairs_per_row;
    __m512 acc[15]; /* NOTE: 8 rows at most are asked for (ROWS_AT_A_TIME's other cases are never taken) */
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pr->pairs_per_row; j++) {
        _mm_prefetch((const char *)(w + j * PAIR_BYTES + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512bh wj = (__m512bh)_mm512_loadu_si512((const void *)(w + j * PAIR_BYTES));
        for (int i = 0; i < mt; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32((int)p[i * pr->pairs_per_row + j]), wj);
    }
    for (int i = 0; i < mt; i++) {
        float out[LANES];
        _mm512_storeu_ps(out, acc[i]);
        store(pr, panel, m + i, out);
    }
}

BF16 static void tile_bf16(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    ROWS_AT_A_TIME(bf16_rows, pr, panel, m0, m1, 8);
}

PRODUCT_TASK(BProduct)

/* ---- the operator ------------------------------------------------------------------------------ */

static int runs(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case ISA_GENERIC: return 1;
    case ISA_AVX512_BF16:
        return has_avx512() && __builtin_cpu_supports("avx512bf16");
    default: return 0;
    }
}

static int best_isa(void) { return runs(ISA_AVX512_BF16) ? ISA_AVX512_BF16 : ISA_GENERIC; }

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const BKernel *kernel = kernel_data;
    int64_t a_dims[4], b_dims[4];
    size_t a_rank = 0;
    BProduct pr = {0};
    TRY(get_input(OP, 2, context, 0, (const void **)&pr.a, a_dims, (size_t)-1, &a_rank));
    TRY(get_input(OP, 2, context, 1, (const void **)&pr.b, b_dims, 3, NULL));
    pr.k = kernel->k, pr.n = kernel->n, pr.pairs_per_row = kernel->k / 2, pr.panels = (kernel->n + LANES - 1) / LANES;
    if (a_rank < 1 || a_dims[a_rank - 1] != pr.k)
        return invalid(OP ": A has %lld values per row, expected K = %lld", a_rank ? a_dims[a_rank - 1] : 0, pr.k);
    if (b_dims[0] != pr.panels || b_dims[1] != pr.pairs_per_row || b_dims[2] != 2 * LANES)
        return invalid(OP ": B has %lld packed pairs, expected ceil(N / 16) x K / 2 = %lld of 32 values",
                       b_dims[0] * b_dims[1], pr.panels * pr.pairs_per_row);
    int64_t y_dims[4];
    pr.rows = 1;
    for (size_t i = 0; i + 1 < a_rank; i++) pr.rows *= (y_dims[i] = a_dims[i]);
    y_dims[a_rank - 1] = pr.n;
    TRY(get_output(context, 0, y_dims, a_rank, &pr.y));
    if (pr.rows == 0) return NULL;
    pr.pairs = malloc((size_t)(pr.rows * pr.pairs_per_row) * sizeof(uint32_t));
    if (!pr.pairs) return out_of_memory(OP);
    pr.tile = kernel->tile;
    const size_t convert_tasks = (size_t)((pr.rows + CONVERT_ROWS - 1) / CONVERT_ROWS);
    if (pr.rows * pr.k <= 32768) /* NOTE: a few microseconds: not worth waking the pool */
        for (size_t t = 0; t < convert_tasks; t++) kernel->convert(&pr, t);
    else
        parallel_for(context, kernel->convert, convert_tasks, &pr);
    pr.chunks = (pr.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    parallel_for(context, product_task, (size_t)(pr.chunks * pr.panels), &pr);
    free(pr.pairs);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    BKernel *kernel = calloc(1, sizeof(BKernel));
    if (!kernel) return out_of_memory(OP);
    int64_t isa = optional_int(info, "isa", ISA_BEST); /* NOTE: optional: the best this processor runs */
    OrtStatus *status = API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, "K", &kernel->k);
    if (!status) status = API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, "N", &kernel->n);
    if (!status && (kernel->k < 2 || kernel->k % 2))
        status = invalid(OP ": K = %lld is not a positive even number (inputs go in pairs of %lld)", kernel->k, 2);
    if (!status && kernel->n < 1) status = invalid(OP ": N = %lld, expected at least %lld", kernel->n, 1);
    if (!status && isa == ISA_BEST) isa = best_isa();
    if (!status && !runs((int)isa))
        status = invalid(OP ": isa = %lld needs instructions this processor lacks (1 plain C, 3 AVX-512 BF16; it runs up to %lld)",
                         isa, best_isa());
    if (status) {
        free(kernel);
        return status;
    }
    kernel->tile = isa == ISA_AVX512_BF16 ? tile_bf16 : tile_generic;
    kernel->convert = isa == ISA_AVX512_BF16 ? convert_rows_bf16 : convert_rows_generic;
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_UINT16 : ELEMENT_FLOAT;
}

OPERATOR(lepton_bf16_matmul, OP, 2, 1, input_type, create_kernel, compute);
