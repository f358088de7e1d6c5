/* Lepton's 4-bit weight product: an ONNX Runtime custom operator (domain "ai.lepton", op "MatMulQ4").
 *
 * Y = A W^T for weights in llama.cpp's Q4_1 form, per output and block of 32 inputs w = d q + m (q in 0..15;
 * d and m float16, as in a Q4_1 GGUF), each row of A rounded to bfloat16 (nearest even, as MatMulBF16
 * rounds it); sums in float32. What a q4_1 export's MatMulNBits (4 bits, accuracy level 0) plus its offset
 * product compute, reading a quarter of the float32 bytes and using AVX-512 BF16's dot products.
 *
 * A code q becomes the bfloat16 value 128 + q by setting its bits to 0x4300 | q (exact: 7 mantissa bits
 * hold q), so two instructions turn a byte of two codes into two bfloat16 weights; per block,
 * dot = sum a (128 + q) with vdpbf16ps, and y += d dot + (m - 128 d) sum(a), sum(a) being the block's sum of
 * the rounded activations (products of bfloat16 values are exact in float32: the 128 sum(a) cancels to
 * float32 rounding).
 *
 * Inputs: A float [..., K]; B uint8 [ceil(N / 16), K / 32, 256] (lepton/runners/q4_graph.py packs it: per
 * panel of 16 outputs and block, 8 groups of 32 bytes, byte 2l + t of group g = q[l][4g + t] |
 * q[l][4g + 2 + t] << 4, so a group's low nibbles are inputs 4g, 4g + 1 and its high ones 4g + 2, 4g + 3 of
 * the 16 outputs, one vdpbf16ps each); scales and mins float16 [ceil(N / 16), K / 32, 16]. Attributes: K
 * (a multiple of 32), N; isa (optional): 0 = the best this processor runs, 1 = plain C, 3 = AVX-512 BF16.
 * Each output's sums are formed in the order of vdpbf16ps' definition on every path; a processor may round
 * a pair's sum once instead of twice, so the paths agree to float32 rounding, not bit for bit.
 *
 * Work: the rows of A are rounded and summed per block once, then each task computes one panel of 16
 * outputs for up to 64 rows, 8 rows at a time (8 block sums and 8 accumulators in registers).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "half.h"
#include "ort.h"

enum { BLOCK = 32, LANES = 16, GROUPS = 8, GROUP_BYTES = 32, BLOCK_BYTES = GROUPS * GROUP_BYTES };
enum { PAIRS = BLOCK / 2, ROW_CHUNK = 64, CONVERT_ROWS = 16, PREFETCH_BYTES = 1024 };
#define OP "MatMulQ4"
#define CODE_BIAS 128.0f /* 0x4300 | q is the bfloat16 value 128 + q */

typedef struct QProduct QProduct;
typedef void (*QTileFn)(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1);
typedef void (*ConvertFn)(void *data, size_t task);

typedef struct {
    int64_t k, n;
    QTileFn tile;
    ConvertFn convert;
} QKernel;

struct QProduct {
    const float *a;
    const uint8_t *b;
    const half_t *scales, *mins;
    float *y;
    uint32_t *pairs; /* [rows, K / 2]: each row's inputs as bfloat16 pairs */
    float *sums;     /* [rows, K / 32]: each block's sum of the rounded inputs */
    int64_t rows, k, n, blocks, pairs_per_row, panels, chunks;
    QTileFn tile;
};

/* ---- activations ------------------------------------------------------------------------------- */

/* Row m's block sums of its rounded inputs, added in input order (the same on every path). */
static void block_sums(const QProduct *pr, int64_t m) {
    const uint32_t *p = pr->pairs + m * pr->pairs_per_row;
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        float sum = 0.0f;
        for (int j = 0; j < PAIRS; j++) {
            const uint32_t pair = p[blk * PAIRS + j];
            sum += from_bf16((uint16_t)(pair & 0xffffu));
            sum += from_bf16((uint16_t)(pair >> 16));
        }
        pr->sums[m * pr->blocks + blk] = sum;
    }
}

static void convert_rows_generic(void *data, size_t task) {
    const QProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++) {
        bf16_pairs(pr->a + m * pr->k, pr->pairs + m * pr->pairs_per_row, 0, pr->k);
        block_sums(pr, m);
    }
}

BF16 static void convert_rows_bf16(void *data, size_t task) {
    const QProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++) {
        bf16_pairs_avx512(pr->a + m * pr->k, pr->pairs + m * pr->pairs_per_row, pr->k);
        block_sums(pr, m);
    }
}

/* ---- products: one panel of 16 outputs for rows [m0, m1) --------------------------------------- */

static inline void store(const QProduct *pr, int64_t panel, int64_t m, const float *acc) { store_panel(pr->y, pr->n, panel, m, acc); }

/* Plain C: per output, the block's dot in vdpbf16ps' order (a pair's odd input, then its even one), then
 * acc = fma(dot, d, acc) and fma(sum, m - 128 d, acc), as the vector path. */
static void tile_generic(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    for (int64_t m = m0; m < m1; m++) {
        const uint32_t *p = pr->pairs + m * pr->pairs_per_row;
        float acc[LANES] = {0};
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const uint8_t *w = codes + blk * BLOCK_BYTES;
            const float sum = pr->sums[m * pr->blocks + blk];
            for (int l = 0; l < LANES; l++) {
                float dot = 0.0f;
                for (int g = 0; g < GROUPS; g++)
                    for (int half = 0; half < 2; half++) { /* NOTE: low nibbles: inputs 4g, 4g + 1; high: 4g + 2, 4g + 3 */
                        const uint32_t pair = p[blk * PAIRS + 2 * g + half];
                        const int shift = 4 * half;
                        const float even = CODE_BIAS + (float)((w[g * GROUP_BYTES + 2 * l] >> shift) & 15);
                        const float odd = CODE_BIAS + (float)((w[g * GROUP_BYTES + 2 * l + 1] >> shift) & 15);
                        dot = fmaf(from_bf16((uint16_t)(pair >> 16)), odd, dot);
                        dot = fmaf(from_bf16((uint16_t)(pair & 0xffffu)), even, dot);
                    }
                const float d = (float)scales[blk * LANES + l], low = (float)mins[blk * LANES + l];
                acc[l] = fmaf(dot, d, acc[l]);
                acc[l] = fmaf(sum, fmaf(-CODE_BIAS, d, low), acc[l]);
            }
        }
        store(pr, panel, m, acc);
    }
}

/* AVX-512 BF16: per block, each group's 32 bytes widened to 32 words, its low and high nibbles made
 * bfloat16 weights (0x4300 | q) with one vpternlogd each, and vdpbf16ps'd with each of `mt` (at most 8)
 * rows' pairs broadcast; the block's sums then scaled into acc. */
static inline __attribute__((always_inline)) BF16 void q4_rows(const QProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    const uint32_t *p = pr->pairs + m * pr->pairs_per_row;
    const float *sums = pr->sums + m * pr->blocks;
    const __m512i nibble = _mm512_set1_epi16(0x000f), bias = _mm512_set1_epi16(0x4300);
    const __m512 minus_bias = _mm512_set1_ps(-CODE_BIAS);
    __m512 acc[15]; /* NOTE: 8 rows at most are asked for (ROWS_AT_A_TIME's other cases are never taken) */
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        const uint8_t *w = codes + blk * BLOCK_BYTES;
        for (int line = 0; line < BLOCK_BYTES; line += 64) _mm_prefetch((const char *)(w + PREFETCH_BYTES + line), _MM_HINT_T0);
        __m512 dot[15];
        for (int i = 0; i < mt; i++) dot[i] = _mm512_setzero_ps();
        for (int g = 0; g < GROUPS; g++) {
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + g * GROUP_BYTES)));
            const __m512bh low = (__m512bh)_mm512_ternarylogic_epi32(bytes, nibble, bias, 0xea); /* (a & b) | c */
            const __m512bh high = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(bytes, 4), nibble, bias, 0xea);
            for (int i = 0; i < mt; i++) {
                const uint32_t *pi = p + i * pr->pairs_per_row + blk * PAIRS + 2 * g;
                dot[i] = _mm512_dpbf16_ps(dot[i], (__m512bh)_mm512_set1_epi32((int)pi[0]), low);
                dot[i] = _mm512_dpbf16_ps(dot[i], (__m512bh)_mm512_set1_epi32((int)pi[1]), high);
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + blk * LANES)));
        const __m512 c = _mm512_fmadd_ps(minus_bias, d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + blk * LANES))));
        for (int i = 0; i < mt; i++) {
            acc[i] = _mm512_fmadd_ps(dot[i], d, acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(sums[i * pr->blocks + blk]), c, acc[i]);
        }
    }
    store_rows(pr->y, pr->n, panel, m, acc, mt);
}

BF16 static void tile_bf16(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    ROWS_AT_A_TIME(q4_rows, pr, panel, m0, m1, 8);
}

PRODUCT_TASK(QProduct)

/* ---- the operator ------------------------------------------------------------------------------ */

static OrtStatus *input(OrtKernelContext *context, size_t index, const void **data, int64_t *dims, size_t rank, size_t *rank_out) {
    return get_input(OP, 4, context, index, data, dims, rank, rank_out);
}

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const QKernel *kernel = kernel_data;
    int64_t a_dims[4], b_dims[4], s_dims[4], m_dims[4];
    size_t a_rank = 0;
    QProduct pr = {0};
    TRY(input(context, 0, (const void **)&pr.a, a_dims, (size_t)-1, &a_rank));
    TRY(input(context, 1, (const void **)&pr.b, b_dims, 3, NULL));
    TRY(input(context, 2, (const void **)&pr.scales, s_dims, 3, NULL));
    TRY(input(context, 3, (const void **)&pr.mins, m_dims, 3, NULL));
    pr.k = kernel->k, pr.n = kernel->n, pr.blocks = kernel->k / BLOCK, pr.pairs_per_row = kernel->k / 2;
    pr.panels = (kernel->n + LANES - 1) / LANES;
    TRY(check_panels(OP, "B", b_dims, pr.panels, pr.blocks, BLOCK_BYTES, BLOCK, "packed blocks", " bytes"));
    TRY(check_panels(OP, "scales", s_dims, pr.panels, pr.blocks, LANES, BLOCK, "blocks", ""));
    TRY(check_panels(OP, "mins", m_dims, pr.panels, pr.blocks, LANES, BLOCK, "blocks", ""));
    TRY(product_output(OP, context, a_dims, a_rank, pr.k, pr.n, &pr.rows, &pr.y));
    if (pr.rows == 0) return NULL;
    char *buffer = malloc((size_t)(pr.rows * pr.pairs_per_row) * sizeof(uint32_t) + (size_t)(pr.rows * pr.blocks) * sizeof(float));
    if (!buffer) return out_of_memory(OP);
    pr.pairs = (uint32_t *)buffer;
    pr.sums = (float *)(pr.pairs + pr.rows * pr.pairs_per_row);
    pr.tile = kernel->tile;
    pr.chunks = (pr.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    prepare_then_multiply(context, kernel->convert, (size_t)((pr.rows + CONVERT_ROWS - 1) / CONVERT_ROWS), pr.rows * pr.k,
                          product_task, (size_t)(pr.chunks * pr.panels), &pr);
    free(buffer);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    QKernel *kernel = calloc(1, sizeof(QKernel));
    if (!kernel) return out_of_memory(OP);
    int isa = 0;
    OrtStatus *status = product_attributes(OP, info, BLOCK, "K = %lld is not a positive multiple of the block size %lld",
                                           bf16_runs, bf16_best_isa(), "1 plain C, 3 AVX-512 BF16", &kernel->k, &kernel->n, &isa);
    if (status) {
        free(kernel);
        return status;
    }
    kernel->tile = isa == BF16_ISA_AVX512 ? tile_bf16 : tile_generic;
    kernel->convert = isa == BF16_ISA_AVX512 ? convert_rows_bf16 : convert_rows_generic;
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_UINT8 : index == 0 ? ELEMENT_FLOAT : ELEMENT_FLOAT16;
}

OPERATOR(lepton_q4_matmul, OP, 4, 1, input_type, create_kernel, compute);
