/* Lepton's 8-bit weight product: an ONNX Runtime custom operator (domain "ai.lepton", op "MatMulQ8").
 *
 * It computes what com.microsoft MatMulNBits computes for bits=8, block_size=32, no zero points
 * (weights (code - 128) * scale per block of 32 along K) at accuracy_level=4 (activations quantized to
 * int8 per row and block of 32: scale max|a| / 127, rounded to nearest even): Y = A W^T, Y [..., N].
 * The weights come packed for the vector units (lepton/runners/q8_graph.py packs them when the runner
 * rewrites the graph): panels of 16 outputs, each block of 32 inputs as 8 groups of 4 inputs x 16
 * outputs, so that one AVX-512 VNNI instruction (vpdpbusd: unsigned codes times signed activations,
 * four products summed into each of 16 int32 lanes) advances 16 outputs by 4 inputs, and the codes'
 * offset of 128 is taken off by starting each block's sums at -128 x the sum of its activations.
 *
 * Inputs: A float [..., K]; B uint8 [ceil(N / 16), K / 32, 512]; scales float16 [ceil(N / 16), K / 32, 16] (as
 * llama.cpp's Q8_0 keeps them: 2 bytes a block of 32 weights instead of 4, 5.6 % less to read a token; the
 * quantizer writes scales float16 holds exactly, export/nbits.py, so MatMulNBits' float32 ones are the same).
 * Two optional inputs come after the weights (ort.h): R float [..., N], Y = R + A W^T; G float [K], the RMS norm's weight: A's rows
 * normalized first, x g / sqrt(mean(x^2) + epsilon) (attribute epsilon, default 1e-5; lepton/runners/norm_graph.py).
 * Attributes: K, N; isa (optional): 0 = the best this processor runs, 1 = plain C, 2 = AVX2, 3 =
 * AVX-512 VNNI (the tests run each; all give the same integers and the same float operations in the
 * same order, so the same bits).
 *
 * Work: the rows of A are quantized once (on ONNX Runtime's intra-op threads when there are many), then
 * each task computes one panel of 16 outputs for up to 64 rows: a product of at most 16 rows (decodes) in
 * one pass over the panel's codes, so that computing overlaps reading them (16 decodes of SmolLM2 q8_0:
 * 10.5-13.3 ms a step's products against 13.2-18.6 in two passes of 8; benchmarks.products), more rows 8
 * at a time (8 int32 and 8 float accumulators in registers), the panel's codes staying in the first-level
 * cache across the row tiles.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "ort.h"

enum { BLOCK = 32, LANES = 16, PANEL_BYTES = BLOCK * LANES, ROW_CHUNK = 64, QUANTIZE_ROWS = 16 };
/* The quantized activations are kept in tiles of up to 16 rows (fewer rows: one tile of them all): per
 * block, 8 groups of 4 codes x the tile's rows (one row's 4 codes for one vpdpbusd next to the tile's other
 * rows'), and the block's scales and offsets as [tile, block, tile rows]: a tile's rows are one pointer and
 * constant offsets away, never 16 pointers, and one row's block is 32 bytes in a row. */
enum { TILE_ROWS = 16 };
/* NOTE: codes read this far ahead are asked for early (the next panel's, past a panel's end): a 16-decode
 * step of SmolLM2 q8_0 took 20.8 ms with 1,024 bytes, 22.2 without, 21.0 with 4,096 (step_shapes). Only in
 * passes of more than PREFETCH_ROWS rows: with fewer the codes stream faster than they are computed and the
 * processor's own prefetcher keeps up, while the asked-for lines take fill buffers from it (one decode's
 * products 5.46 -> 4.61 ms without, 4 rows 5.04 -> 4.95, 8 and 16 rows level; docs/performance.md). */
enum { PREFETCH_BYTES = 1024 };
/* NOTE: the products' tasks go one at a time to whichever thread is free: handed out in runs of
 * consecutive panels (ParallelFor's batches), a run waits for its thread when another job holds that core
 * (16 decodes 20.7 ms in one run, 27.0 in another; docs/performance.md). */
enum { ISA_GENERIC = 1, ISA_AVX2 = 2, ISA_AVX512_VNNI = 3 }; /* NOTE: 0 = the best this processor runs */
#define OP "MatMulQ8"

typedef struct Product Product;
typedef void (*TileFn)(const Product *pr, int64_t panel, int64_t m0, int64_t m1);

typedef struct {
    int64_t k, n;
    int gated;     /* attribute gated = 1 */
    float epsilon; /* the RMS norm's (input 4, optional) */
    TileFn tile;
    void (*quantize)(void *product, size_t task); /* the activations' quantization for the path of `tile` */
} Kernel;

struct Product {
    const float *a;
    const half_t *scales;
    const uint8_t *b;
    float *y;
    int8_t *aq;      /* [tiles, blocks, 8 groups, tile rows, 4] */
    float *ascale;   /* [tiles, blocks, tile rows] */
    int32_t *offset; /* [rows, blocks]: -128 x the block's sum of quantized activations */
    int64_t rows, k, n, blocks, panels, chunks;
    const float *residual;       /* NULL, or R [rows, N]: Y = R + A W^T */
    int64_t gated, row0, panel0; /* gated: Y [rows, N / 2] = silu(gate) x up (ort.h PRODUCT_TASK) */
    int64_t tile_rows, group_stride; /* min(rows, TILE_ROWS), 4 x tile_rows */
    TileFn tile;
};

/* ---- activations ------------------------------------------------------------------------------- */

/* Row m's scale and offset for block blk: their index in ascale and offset. */
static inline int64_t act_index(const Product *pr, int64_t m, int64_t blk) {
    return (m / pr->tile_rows * pr->blocks + blk) * pr->tile_rows + m % pr->tile_rows;
}

/* Row m's first 4 codes of block blk; codes 4j to 4j + 3 lie group_stride x j further. */
static inline int8_t *act_codes(const Product *pr, int64_t m, int64_t blk) {
    return pr->aq + (m / pr->tile_rows * pr->blocks + blk) * BLOCK * pr->tile_rows + m % pr->tile_rows * 4;
}

/* Rows [QUANTIZE_ROWS task, ...) of A to int8, per block of 32: scale max|a| / 127, a x (1 / scale)
 * rounded to nearest even (rintf: vroundps where the clone has SSE4.1; a product and a rounding, nothing
 * a compiler may fuse, so every clone gives the same codes). */
CLONED
static void quantize_rows(void *data, size_t task) {
    const Product *pr = data;
    const int64_t m0 = (int64_t)task * QUANTIZE_ROWS;
    const int64_t m1 = range_end((int64_t)task, QUANTIZE_ROWS, pr->rows);
    for (int64_t m = m0; m < m1; m++)
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const float *x = pr->a + m * pr->k + blk * BLOCK;
            int8_t *q = act_codes(pr, m, blk);
            float top = 0.0f;
#pragma omp simd reduction(max : top)
            for (int i = 0; i < BLOCK; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
            const float scale = top / 127.0f, inverse = top != 0.0f ? 1.0f / scale : 0.0f;
            int32_t sum = 0;
            int8_t codes[BLOCK];
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < BLOCK; i++) {
                const int32_t v = (int32_t)__builtin_rintf(x[i] * inverse);
                codes[i] = (int8_t)v;
                sum += v;
            }
            for (int j = 0; j < BLOCK / 4; j++) memcpy(q + j * pr->group_stride, codes + 4 * j, 4);
            pr->ascale[act_index(pr, m, blk)] = scale;
            pr->offset[act_index(pr, m, blk)] = -128 * sum;
        }
}

/* quantize_rows with AVX-512 (the VNNI path's; ort.h quantize_block_avx512): the same codes, scales and offsets.
 * The 16-row products of a SmolLM2 step 10.47 -> 9.61 ms (benchmarks.products), 16 streams in process 1.03x
 * (docs/performance.md). */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void quantize_rows_avx512(void *data, size_t task) {
    const Product *pr = data;
    const int64_t m0 = (int64_t)task * QUANTIZE_ROWS;
    const int64_t m1 = range_end((int64_t)task, QUANTIZE_ROWS, pr->rows);
    const int64_t stride = pr->group_stride;
    for (int64_t m = m0; m < m1; m++)
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            __m512i v0, v1;
            const float scale = quantize_block_avx512(pr->a + m * pr->k + blk * BLOCK, &v0, &v1);
            const __m128i c0 = _mm512_cvtepi32_epi8(v0), c1 = _mm512_cvtepi32_epi8(v1);
            int8_t *q = act_codes(pr, m, blk);
            if (stride == 4) {
                _mm_storeu_si128((__m128i *)q, c0);
                _mm_storeu_si128((__m128i *)(q + 16), c1);
            } else {
                int32_t groups[8];
                _mm_storeu_si128((__m128i *)groups, c0);
                _mm_storeu_si128((__m128i *)(groups + 4), c1);
                for (int j = 0; j < 8; j++) memcpy(q + j * stride, groups + j, 4);
            }
            pr->ascale[act_index(pr, m, blk)] = scale;
            pr->offset[act_index(pr, m, blk)] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
        }
}

/* ---- products: one panel of 16 outputs for rows [m0, m1) --------------------------------------- */

static inline void store(const Product *pr, int64_t panel, int64_t m, const float *acc) { STORE_PANEL(pr, panel, m, acc); }

/* Plain C: the same integers and the same float operations, in the same order, as the vector paths. */
static void tile_generic(const Product *pr, int64_t panel, int64_t m0, int64_t m1) {
    const uint8_t *codes = pr->b + panel * pr->blocks * PANEL_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES;
    for (int64_t m = m0; m < m1; m++) {
        float acc[LANES] = {0};
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const int8_t *q = act_codes(pr, m, blk);
            const uint8_t *w = codes + blk * PANEL_BYTES;
            const float as = pr->ascale[act_index(pr, m, blk)];
            for (int l = 0; l < LANES; l++) {
                int32_t dot = pr->offset[act_index(pr, m, blk)];
                for (int j = 0; j < BLOCK / 4; j++)
                    for (int t = 0; t < 4; t++) dot += (int32_t)w[j * 4 * LANES + l * 4 + t] * q[j * pr->group_stride + t];
                acc[l] = fmaf((float)dot, (float)scales[blk * LANES + l] * as, acc[l]);
            }
        }
        store(pr, panel, m, acc);
    }
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* AVX2 (no VNNI): codes made signed (xor 128), then vpmaddubsw of |a| with the codes carrying a's sign
 * (|a| <= 127, |code - 128| <= 127: the pair sums never saturate) and vpmaddwd by ones; two rows of
 * two 8-output halves at a time, the sums IN_REGISTER (16 rows 576 x 3,072 784 -> 670 us). */
static inline __attribute__((always_inline)) AVX2 void avx2_rows(const Product *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * PANEL_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[2][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        __m256i dot[2][2];
        for (int i = 0; i < mt; i++) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
        const uint8_t *w = codes + blk * PANEL_BYTES;
        for (int j = 0; j < BLOCK / 4; j++) {
            const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + j * 64)), flip);
            const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + j * 64 + 32)), flip);
            for (int i = 0; i < mt; i++) {
                int32_t four;
                memcpy(&four, act_codes(pr, m + i, blk) + j * pr->group_stride, 4);
                const __m256i a = _mm256_set1_epi32(four), magnitude = _mm256_sign_epi8(a, a);
                dot[i][0] = _mm256_add_epi32(dot[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w0, a)), ones));
                dot[i][1] = _mm256_add_epi32(dot[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w1, a)), ones));
                IN_REGISTER(dot[i][0], dot[i][1]);
            }
        }
        const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + blk * LANES)));
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + blk * LANES + 8)));
        for (int i = 0; i < mt; i++) {
            const __m256 as = _mm256_set1_ps(pr->ascale[act_index(pr, m + i, blk)]);
            acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][0]), _mm256_mul_ps(s0, as), acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][1]), _mm256_mul_ps(s1, as), acc[i][1]);
        }
    }
    for (int i = 0; i < mt; i++) {
        float out[LANES];
        _mm256_storeu_ps(out, acc[i][0]);
        _mm256_storeu_ps(out + 8, acc[i][1]);
        store(pr, panel, m + i, out);
    }
}

AVX2 static void tile_avx2(const Product *pr, int64_t panel, int64_t m0, int64_t m1) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) avx2_rows(pr, panel, m, 2);
    if (m < m1) avx2_rows(pr, panel, m, 1);
}

/* AVX-512 VNNI: vpdpbusd of the 64 bytes of a group (16 outputs x 4 inputs) with each row's 4
 * activations broadcast, for `mt` (at most 8) rows of one block (aq, offset, ascale: the first row's
 * codes, offset and scale of the block; stride: from one group of codes to the next); their sums then
 * scaled into acc. */
static inline __attribute__((always_inline)) VNNI void vnni_block(const uint8_t *w, const int8_t *aq, int64_t stride,
                                                                   const int32_t *offset, const float *ascale, __m512 s,
                                                                   __m512 *acc, const int mt, const int prefetch) {
    __m512i dot[8];
    for (int i = 0; i < mt; i++) dot[i] = _mm512_set1_epi32(offset[i]);
    for (int j = 0; j < BLOCK / 4; j++) {
        if (prefetch) _mm_prefetch((const char *)(w + j * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512i wj = _mm512_loadu_si512((const void *)(w + j * 64));
        for (int i = 0; i < mt; i++) {
            int32_t four;
            memcpy(&four, aq + j * stride + i * 4, 4);
            dot[i] = _mm512_dpbusd_epi32(dot[i], wj, _mm512_set1_epi32(four));
        }
    }
    for (int i = 0; i < mt; i++)
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_mul_ps(s, _mm512_set1_ps(ascale[i])), acc[i]);
}

/* `mt` (at most 16, rows m .. m + mt - 1 of one tile) rows in one pass over the panel's codes: per block,
 * the first 8 rows then the rest (the block's codes come from memory for the first and from the
 * first-level cache for the second), so 16 decodes compute while the weights stream in instead of reading
 * them for 8 rows and computing alone for the next 8 (16 float accumulators and 8 int32 sums in
 * registers). */
static inline __attribute__((always_inline)) VNNI void vnni_rows(const Product *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * PANEL_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES;
    const int8_t *aq = act_codes(pr, m, 0);
    const int64_t first_row = act_index(pr, m, 0);
    const int32_t *offset = pr->offset + first_row;
    const float *ascale = pr->ascale + first_row;
    const int first = mt < 8 ? mt : 8;
    __m512 acc[16];
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        const uint8_t *w = codes + blk * PANEL_BYTES;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + blk * LANES)));
        const int8_t *q = aq + blk * BLOCK * pr->tile_rows;
        const int64_t at = blk * pr->tile_rows;
        vnni_block(w, q, pr->group_stride, offset + at, ascale + at, s, acc, first, mt > PREFETCH_ROWS);
        if (mt > 8) vnni_block(w, q + 8 * 4, pr->group_stride, offset + at + 8, ascale + at + 8, s, acc + 8, mt - 8, 0);
    }
    STORE_ROWS(pr, panel, m, acc, mt);
}

VNNI static void tile_vnni(const Product *pr, int64_t panel, int64_t m0, int64_t m1) {
    if (pr->rows <= 16) /* NOTE: decodes: one pass; more rows: 8 at a time, as fast at 64-128 rows */
        ROWS_AT_A_TIME(vnni_rows, pr, panel, m0, m1, 16);
    else
        ROWS_AT_A_TIME(vnni_rows, pr, panel, m0, m1, 8);
}

PRODUCT_TASK(Product)

/* ---- the operator ------------------------------------------------------------------------------ */

static int runs(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case ISA_GENERIC: return 1;
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case ISA_AVX512_VNNI:
        return has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
    default: return 0;
    }
}

static int best_isa(void) { return runs(ISA_AVX512_VNNI) ? ISA_AVX512_VNNI : runs(ISA_AVX2) ? ISA_AVX2 : ISA_GENERIC; }

static TileFn tile_for(int isa) {
    return isa == ISA_AVX512_VNNI ? tile_vnni : isa == ISA_AVX2 ? tile_avx2 : tile_generic;
}

static OrtStatus *input(OrtKernelContext *context, size_t index, const void **data, int64_t *dims, size_t rank, size_t *rank_out) {
    return get_input(OP, 3, context, index, data, dims, rank, rank_out);
}

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const Kernel *kernel = kernel_data;
    int64_t a_dims[4], b_dims[4], s_dims[4];
    size_t a_rank = 0;
    Product pr = {0};
    TRY(input(context, 0, (const void **)&pr.a, a_dims, (size_t)-1, &a_rank));
    TRY(input(context, 1, (const void **)&pr.b, b_dims, 3, NULL));
    TRY(input(context, 2, (const void **)&pr.scales, s_dims, 3, NULL));
    pr.k = kernel->k, pr.n = kernel->n, pr.blocks = kernel->k / BLOCK, pr.panels = (kernel->n + LANES - 1) / LANES;
    TRY(check_panels(OP, "B", b_dims, pr.panels, pr.blocks, PANEL_BYTES, BLOCK, "packed blocks", " bytes"));
    TRY(check_panels(OP, "scales", s_dims, pr.panels, pr.blocks, LANES, BLOCK, "blocks", ""));
    pr.gated = kernel->gated;
    TRY(product_output(OP, context, a_dims, a_rank, pr.k, pr.gated ? pr.n / 2 : pr.n, &pr.rows, &pr.y));
    TRY(residual_input(OP, context, 3, a_dims, a_rank, pr.n, pr.gated, &pr.residual));
    if (pr.rows == 0) return NULL;
    float *normed = NULL;
    TRY(normalized_input(OP, context, 4, pr.rows, pr.k, kernel->epsilon, &pr.a, &normed));
    pr.tile_rows = pr.rows < TILE_ROWS ? pr.rows : TILE_ROWS, pr.group_stride = 4 * pr.tile_rows;
    const int64_t padded = (pr.rows + pr.tile_rows - 1) / pr.tile_rows * pr.tile_rows; /* NOTE: the last tile's rows past `rows` are never read */
    char *buffer = malloc((size_t)(padded * pr.k) + (size_t)(padded * pr.blocks) * (sizeof(float) + sizeof(int32_t)));
    if (!buffer) {
        free(normed);
        return out_of_memory(OP);
    }
    pr.ascale = (float *)buffer;
    pr.offset = (int32_t *)(pr.ascale + padded * pr.blocks);
    pr.aq = (int8_t *)(pr.offset + padded * pr.blocks);
    pr.tile = kernel->tile;
    pr.chunks = (pr.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    prepare_then_multiply(context, kernel->quantize, (size_t)((pr.rows + QUANTIZE_ROWS - 1) / QUANTIZE_ROWS), pr.rows * pr.k,
                          product_task, product_tasks(&pr), &pr);
    free(buffer);
    free(normed);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    Kernel *kernel = calloc(1, sizeof(Kernel));
    if (!kernel) return out_of_memory(OP);
    int isa = 0;
    OrtStatus *status = product_attributes(OP, info, BLOCK, "K = %lld is not a positive multiple of the block size %lld",
                                           runs, best_isa(), "1 plain C, 2 AVX2, 3 AVX-512 VNNI", &kernel->k, &kernel->n, &isa, &kernel->gated);
    if (!status) status = norm_epsilon(OP, info, &kernel->epsilon);
    if (status) {
        free(kernel);
        return status;
    }
    kernel->tile = tile_for(isa);
    kernel->quantize = isa == ISA_AVX512_VNNI ? quantize_rows_avx512 : quantize_rows;
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_UINT8 : index == 2 ? ELEMENT_FLOAT16 : ELEMENT_FLOAT;
}

PRODUCT_OPERATOR(lepton_q8_matmul, OP, 5, input_type, create_kernel, compute);
