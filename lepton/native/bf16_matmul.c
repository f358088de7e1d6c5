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
 * Two optional inputs come after the weights (ort.h): R float [..., N], Y = R + A W^T; G float [K], the RMS norm's weight: A's rows
 * normalized first, x g / sqrt(mean(x^2) + epsilon) (attribute epsilon, default 1e-5; lepton/runners/norm_graph.py).
 * Inputs: A float [..., K]; B uint16 (bfloat16 bits) [ceil(N / 16), K / 2, 32]. Attributes: K (even), N;
 * isa (optional): 0 = the best this processor runs, 1 = plain C, 2 = AVX2 + FMA (the weights widened to float32, the
 * plain C path's FMAs eight outputs at a time: the same bits), 3 = AVX-512 BF16. Every path rounds A the
 * same (vcvtne2ps2bf16's rounding: nearest even, NaN quiet, denormals flushed to zero) and computes,
 * per output, acc = fma(a[k+1], w[k+1], acc) then fma(a[k], w[k], acc) for k = 0, 2, 4, ... (the order of
 * vdpbf16ps' definition; each product of two bfloat16 values is exact in float32); a processor may round
 * the pair's sum once instead of twice, so paths agree to float32 rounding, not bit for bit.
 *
 * Work: the rows of A are rounded once (on ONNX Runtime's intra-op threads when there are many) into tiles of
 * rows (pair j of a tile's rows side by side; on the AVX2 path input k as float32), then each task computes one panel of 16 outputs for up to 64
 * rows: a product of at most 16 rows (decodes) in one pass over the panel (16 accumulators in registers),
 * more rows 8 at a time (their panel read again from the first-level cache). The panel is prefetched 4 KB
 * ahead: at 16 rows a pass consumes its weights slowly enough that 1 KB ahead arrives late; in passes of at
 * most PREFETCH_ROWS rows it is not (the processor's prefetcher keeps up, one decode 7.64 -> 6.55 ms without).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "ort.h"

enum { LANES = 16, PAIR_BYTES = 2 * LANES * 2, ROW_CHUNK = 64, CONVERT_ROWS = 16, PREFETCH_BYTES = 4096 };
/* Row tiles: all the rows of a product of at most TILE_ROWS (a decode step's, taken in one pass over each
 * panel), else PASS_ROWS (a prompt's, taken that many at a time, each tile one pass). */
enum { TILE_ROWS = 16, PASS_ROWS = 8 };
enum { AVX2_ROWS = 4 }; /* AVX2: rows a pass, 4 x 2 accumulators, 4 weight registers, a row's 2 inputs */
#define OP "MatMulBF16"

typedef struct BProduct BProduct;
typedef void (*BTileFn)(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1);

typedef void (*ConvertFn)(void *data, size_t task);

typedef struct {
    int64_t k, n;
    int gated;     /* attribute gated = 1 */
    float epsilon; /* the RMS norm's (input 3, optional) */
    BTileFn tile;
    ConvertFn convert;
} BKernel;

struct BProduct {
    const float *a;
    const uint16_t *b;
    float *y;
    uint32_t *pairs; /* each row's inputs as bfloat16 pairs (low half the even input), in tiles of tile_rows rows:
                      * [tiles, K / 2, tile_rows], so that a tile's rows are one pointer and constant offsets */
    float *rounded;  /* AVX2 (instead of pairs): each row's inputs rounded to bfloat16, as float32, in the same tiles:
                      * [tiles, K, tile_rows] */
    int64_t rows, k, n, pairs_per_row, panels, chunks, tile_rows;
    const float *residual;       /* NULL, or R [rows, N]: Y = R + A W^T */
    int64_t gated, row0, panel0; /* gated: Y [rows, N / 2] = silu(gate) x up (ort.h PRODUCT_TASK) */
    BTileFn tile;
};

/* Row m's pairs: its tile's [K / 2, tile rows] block, the row's column of it. */
static inline uint32_t *row_pairs(const BProduct *pr, int64_t m) {
    return pr->pairs + (m / pr->tile_rows) * pr->pairs_per_row * pr->tile_rows + m % pr->tile_rows;
}

/* Rows [CONVERT_ROWS x task, ...) of A as bfloat16 pairs, into their tiles. */
static void convert_rows_generic(void *data, size_t task) {
    const BProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++)
        bf16_pairs_strided(pr->a + m * pr->k, row_pairs(pr, m), pr->k, pr->tile_rows);
}

static inline void store(const BProduct *pr, int64_t panel, int64_t m, const float *acc) { STORE_PANEL(pr, panel, m, acc); }

/* Plain C: the products in the order the vector path's definition gives. */
static void tile_generic(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    const uint16_t *w = pr->b + panel * pr->pairs_per_row * 2 * LANES;
    for (int64_t m = m0; m < m1; m++) {
        const uint32_t *p = row_pairs(pr, m);
        float acc[LANES] = {0};
        for (int64_t j = 0; j < pr->pairs_per_row; j++) {
            const uint32_t pj = p[j * pr->tile_rows];
            const float lo = from_bf16((uint16_t)(pj & 0xffffu)), hi = from_bf16((uint16_t)(pj >> 16));
            const uint16_t *wj = w + j * 2 * LANES;
            for (int l = 0; l < LANES; l++) {
                acc[l] = fmaf(hi, from_bf16(wj[2 * l + 1]), acc[l]);
                acc[l] = fmaf(lo, from_bf16(wj[2 * l]), acc[l]);
            }
        }
        store(pr, panel, m, acc);
    }
}

/* convert_rows_generic with vcvtne2ps2bf16 (the same bits). */
BF16 static void convert_rows_bf16(void *data, size_t task) {
    const BProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++)
        bf16_pairs_strided_avx512(pr->a + m * pr->k, row_pairs(pr, m), pr->k, pr->tile_rows);
}

/* AVX-512 BF16: vdpbf16ps of the 64 bytes of a pair (16 outputs x 2 inputs) with each row's pair
 * broadcast, `mt` rows (of one tile) at a time. */
static inline __attribute__((always_inline)) BF16 void bf16_rows(const BProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *w = (const uint8_t *)(pr->b + panel * pr->pairs_per_row * 2 * LANES);
    const uint32_t *p = row_pairs(pr, m);
    const int64_t stride = pr->tile_rows;
    __m512 acc[16];
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pr->pairs_per_row; j++, p += stride) {
        if (mt > PREFETCH_ROWS) _mm_prefetch((const char *)(w + j * PAIR_BYTES + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512bh wj = (__m512bh)_mm512_loadu_si512((const void *)(w + j * PAIR_BYTES));
        for (int i = 0; i < mt; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32((int)p[i]), wj);
    }
    STORE_ROWS(pr, panel, m, acc, mt);
}

/* AVX2 + FMA: a pair's 64 bytes as two halves of 8 outputs, each widened to its odd and even inputs' float32
 * weights (an AND and a shift), then per row acc = fma(odd input, odd weight, acc) and fma(even, even, acc), as
 * the plain C path, the inputs broadcast from the rows' rounded float32 (convert_rows_avx2); AVX2_ROWS rows of one
 * tile a pass. NOTE: with the rows' bfloat16 pairs split in the loop (a broadcast, an AND and a shift a row and
 * pair) the loop needed one register more than AVX2's 16 and spilled (harness, one thread, 1,536 x 576: 4 rows
 * 116 -> 85 us, 16 rows 422 -> 366, 128 rows 3,714 -> 3,247; docs/performance.md). */
#define AVX2 __attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) AVX2 void bf16_rows_avx2(const BProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *w = (const uint8_t *)(pr->b + panel * pr->pairs_per_row * 2 * LANES);
    const int64_t stride = pr->tile_rows;
    const float *x = pr->rounded + (m / stride) * pr->k * stride + m % stride; /* NOTE: input k of row m + i: x[k stride + i] */
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 lo[FEW_ROWS], hi[FEW_ROWS];
    for (int i = 0; i < mt; i++) lo[i] = hi[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < pr->pairs_per_row; j++, x += 2 * stride) {
        if (mt > PREFETCH_ROWS) _mm_prefetch((const char *)(w + j * PAIR_BYTES + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + j * PAIR_BYTES));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + j * PAIR_BYTES + 32));
        const __m256 w0_odd = _mm256_castsi256_ps(_mm256_and_si256(w0, high)), w0_even = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        const __m256 w1_odd = _mm256_castsi256_ps(_mm256_and_si256(w1, high)), w1_even = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        for (int i = 0; i < mt; i++) {
            const __m256 odd = _mm256_broadcast_ss(x + stride + i);
            lo[i] = _mm256_fmadd_ps(odd, w0_odd, lo[i]);
            hi[i] = _mm256_fmadd_ps(odd, w1_odd, hi[i]);
            const __m256 even = _mm256_broadcast_ss(x + i);
            lo[i] = _mm256_fmadd_ps(even, w0_even, lo[i]);
            hi[i] = _mm256_fmadd_ps(even, w1_even, hi[i]);
        }
    }
    float out[FEW_ROWS][LANES];
#pragma GCC unroll 6
    for (int i = 0; i < mt; i++) _mm256_storeu_ps(out[i], lo[i]), _mm256_storeu_ps(out[i] + 8, hi[i]);
    for (int i = 0; i < mt; i++) store(pr, panel, m + i, out[i]);
}

AVX2 static void tile_avx2(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    FEW_ROWS_AT_A_TIME(bf16_rows_avx2, pr, panel, m0, m1, AVX2_ROWS); /* NOTE: tiles of 16 or 8 rows: passes of 4 stay in one */
}

/* Rows [CONVERT_ROWS x task, ...) of A rounded as convert_rows_generic rounds them (the same bits), kept as float32
 * in their tiles of `rounded`. */
AVX2 static void convert_rows_avx2(void *data, size_t task) {
    const BProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++) {
        const float *a = pr->a + m * pr->k;
        float *x = pr->rounded + (m / pr->tile_rows) * pr->k * pr->tile_rows + m % pr->tile_rows;
        for (int64_t i = 0; i < pr->k; i++) x[i * pr->tile_rows] = from_bf16(to_bf16(a[i]));
    }
}

BF16 static void tile_bf16(const BProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    if (pr->rows <= TILE_ROWS) /* NOTE: decodes: one pass over the panel (the tile is all the rows) */
        ROWS_AT_A_TIME(bf16_rows, pr, panel, m0, m1, TILE_ROWS);
    else
        ROWS_AT_A_TIME(bf16_rows, pr, panel, m0, m1, PASS_ROWS);
}

PRODUCT_TASK(BProduct)

/* ---- the operator ------------------------------------------------------------------------------ */

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const BKernel *kernel = kernel_data;
    int64_t a_dims[4], b_dims[4];
    size_t a_rank = 0;
    BProduct pr = {0};
    TRY(get_input(OP, 2, context, 0, (const void **)&pr.a, a_dims, (size_t)-1, &a_rank));
    TRY(get_input(OP, 2, context, 1, (const void **)&pr.b, b_dims, 3, NULL));
    pr.k = kernel->k, pr.n = kernel->n, pr.pairs_per_row = kernel->k / 2, pr.panels = (kernel->n + LANES - 1) / LANES;
    TRY(check_panels(OP, "B", b_dims, pr.panels, pr.pairs_per_row, 2 * LANES, 2, "packed pairs", " values"));
    pr.gated = kernel->gated;
    TRY(product_output(OP, context, a_dims, a_rank, pr.k, pr.gated ? pr.n / 2 : pr.n, &pr.rows, &pr.y));
    TRY(residual_input(OP, context, 2, a_dims, a_rank, pr.n, pr.gated, &pr.residual));
    if (pr.rows == 0) return NULL;
    float *normed = NULL;
    TRY(normalized_input(OP, context, 3, pr.rows, pr.k, kernel->epsilon, &pr.a, &normed));
    pr.tile_rows = pr.rows <= TILE_ROWS ? pr.rows : PASS_ROWS;
    const int64_t padded = (pr.rows + pr.tile_rows - 1) / pr.tile_rows * pr.tile_rows; /* NOTE: the last tile's rows past `rows` are never read */
    const int rounded = kernel->convert == convert_rows_avx2;
    void *buffer = malloc((size_t)(padded * pr.pairs_per_row) * (rounded ? 2 * sizeof(float) : sizeof(uint32_t)));
    if (rounded)
        pr.rounded = buffer;
    else
        pr.pairs = buffer;
    if (!buffer) {
        free(normed);
        return out_of_memory(OP);
    }
    pr.tile = kernel->tile;
    pr.chunks = (pr.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    prepare_then_multiply(context, kernel->convert, (size_t)((pr.rows + CONVERT_ROWS - 1) / CONVERT_ROWS), pr.rows * pr.k,
                          product_task, product_tasks(&pr), &pr);
    free(buffer);
    free(normed);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    BKernel *kernel = calloc(1, sizeof(BKernel));
    if (!kernel) return out_of_memory(OP);
    int isa = 0;
    OrtStatus *status = product_attributes(OP, info, 2, "K = %lld is not a positive even number (inputs go in pairs of %lld)",
                                           bf16_runs, bf16_best_isa(), "1 plain C, 2 AVX2 + FMA, 3 AVX-512 BF16", &kernel->k, &kernel->n, &isa, &kernel->gated);
    if (!status) status = norm_epsilon(OP, info, &kernel->epsilon);
    if (status) {
        free(kernel);
        return status;
    }
    kernel->tile = isa == BF16_ISA_AVX512 ? tile_bf16 : isa == BF16_ISA_AVX2 ? tile_avx2 : tile_generic;
    kernel->convert = isa == BF16_ISA_AVX512 ? convert_rows_bf16 : isa == BF16_ISA_AVX2 ? convert_rows_avx2 : convert_rows_generic;
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_UINT16 : ELEMENT_FLOAT;
}

PRODUCT_OPERATOR(lepton_bf16_matmul, OP, 4, input_type, create_kernel, compute);
