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
 * Two optional inputs come after the weights (ort.h): R float [..., N], Y = R + A W^T; G float [K], the RMS norm's weight: A's rows
 * normalized first, x g / sqrt(mean(x^2) + epsilon) (attribute epsilon, default 1e-5; lepton/runners/norm_graph.py).
 * Inputs: A float [..., K]; B uint8 [ceil(N / 16), K / 32, 256] (lepton/runners/q4_graph.py packs it: per
 * panel of 16 outputs and block, 8 groups of 32 bytes, byte 2l + t of group g = q[l][4g + t] |
 * q[l][4g + 2 + t] << 4, so a group's low nibbles are inputs 4g, 4g + 1 and its high ones 4g + 2, 4g + 3 of
 * the 16 outputs, one vdpbf16ps each); scales and mins float16 [ceil(N / 16), K / 32, 16]. Attributes: K
 * (a multiple of 32), N; isa (optional): 0 = the best this processor runs, 1 = plain C, 2 = AVX2 + FMA (the
 * nibbles widened to float32 128 + q, plain C's fused multiply-adds in its order: the same bits), 3 = AVX-512 BF16.
 * Each output's sums are formed in the order of vdpbf16ps' definition on every path; a processor may round
 * a pair's sum once instead of twice, so AVX-512 BF16 agrees with the others to float32 rounding, not bit for bit.
 *
 * Work: the rows of A are rounded and summed per block once, then each task computes one panel of 16
 * outputs for up to 64 rows, 8 rows at a time (8 block sums and 8 accumulators in registers).
 *
 * int8 activations (attribute int8 = 1; what MatMulNBits computes at accuracy level 4, which the export asks
 * for): each row of A is quantized per block of 32 (scale s = max|a| / 127, codes rint(a / s), nearest even,
 * as MatMulQ8 does) and per block y += d s (sum q a_q - 8 sum a_q) + (m + 8 d) sum(a), sum(a) the float sum of
 * the block's inputs. The codes enter the integer dot centred on 8 (as MatMulNBits' zero point 8 centres
 * them): the rounding error of a_q then meets q - 8, not q, a quarter of the error's variance (KL 0.0097 ->
 * 0.0031 on SmolLM2 without float activations anywhere). B is packed for it (q4_graph.pack(int8=True)): per
 * block, 4 vectors of 64 bytes, byte 4l + t of vector v = q[l][8v + t] | q[l][8v + 4 + t] << 4, so an AND
 * gives group 2v (16 outputs x 4 inputs, as vpdpbusd multiplies them) and a shift and an AND group 2v + 1;
 * one vpdpbusd a row and group multiplies 64 codes (two vdpbf16ps for bfloat16), 16 rows a pass. isa: 1 =
 * plain C, 2 = AVX2 (vpmaddubsw of the codes with a row's 4 codes, broadcast, the 8 groups' pair sums added as
 * 16-bit integers, at most 8 x 2 x 15 x 127 = 30,480: never saturating, then vpmaddwd), 3 = AVX-512 VNNI; all
 * give the same integers and the same float operations in the same order.
 *
 * int16 activations (attribute int16 = 1; what the runner asks for at accuracy level 0 on a processor with AVX2
 * but no AVX-512 BF16, lepton/runners/q4_graph.py): each row of A is quantized per block of 32 to int16 (scale
 * s = max|a| / 32767, codes rint(a / s), nearest even; an error of at most s / 2, below bfloat16's half unit
 * in the last place for every input within 128x of its block's largest) and per block y += d s (sum q a_q) +
 * m sum(a), sum(a) the float sum of the block's inputs. B is packed as for bfloat16 activations: a group's 16
 * bytes of 8 outputs widened to 16-bit words, an AND gives each output's codes of inputs 4g, 4g + 1 as the
 * pair vpmaddwd multiplies with a row's two codes of them, a shift its codes of 4g + 2, 4g + 3: 16 products
 * an instruction, exact in int32 (at most 32 x 15 x 32,767 = 15,728,160 a block, below 2^24: its float32 is
 * exact too), against 8 an FMA on the bfloat16 path. isa: 1 = plain C, 2 = AVX2 (with F16C); both give the same
 * integers and the same float operations in the same order.
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
enum { INT8_VECTOR_BYTES = 64 }; /* int8 activations: a block's codes as 4 vectors of 16 outputs x 4 inputs x 2 nibbles */
#define OP "MatMulQ4"
#define CODE_BIAS 128.0f /* 0x4300 | q is the bfloat16 value 128 + q */

typedef struct QProduct QProduct;
typedef void (*QTileFn)(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1);
typedef void (*ConvertFn)(void *data, size_t task);

typedef struct {
    int64_t k, n;
    int gated;     /* attribute gated = 1 */
    int int8;      /* 1: int8 activations (accuracy level 4) */
    int int16;     /* 1: int16 activations */
    float epsilon; /* the RMS norm's (input 5, optional) */
    QTileFn tile;
    ConvertFn convert;
} QKernel;

struct QProduct {
    const float *a;
    const uint8_t *b;
    const half_t *scales, *mins;
    float *y;
    uint32_t *pairs; /* [rows, K / 2]: each row's inputs as bfloat16 pairs; int16: as int16 pairs (the even input
                      * in the low half), AVX2_ROWS rows interleaved, pair by pair ([rows / AVX2_ROWS][K / 2][AVX2_ROWS]) */
    float *sums;     /* [rows, K / 32]: each block's sum of the rounded inputs (int8, int16: of the inputs) */
    float *rounded;  /* AVX2, bfloat16 activations: [rows / AVX2_ROWS, K, AVX2_ROWS] the rounded inputs as float32 */
    int8_t *aq;      /* int8: [rows, K / 32, 32] the inputs' codes */
    float *ascale;   /* int8, int16: [rows, K / 32] their scales */
    int32_t *offset; /* int8: [rows, K / 32] -8 x the block's sum of codes */
    int64_t rows, k, n, blocks, pairs_per_row, panels, chunks;
    const float *residual;       /* NULL, or R [rows, N]: Y = R + A W^T */
    int64_t gated, row0, panel0; /* gated: Y [rows, N / 2] = silu(gate) x up (ort.h PRODUCT_TASK) */
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

static inline void store(const QProduct *pr, int64_t panel, int64_t m, const float *acc) { STORE_PANEL(pr, panel, m, acc); }

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
        if (mt > PREFETCH_ROWS)
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
    STORE_ROWS(pr, panel, m, acc, mt);
}

BF16 static void tile_bf16(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    ROWS_AT_A_TIME(q4_rows, pr, panel, m0, m1, 8);
}

/* ---- int8 activations (accuracy level 4) ------------------------------------------------------- */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define CODE_ZERO 8 /* the codes' centre in the integer dot (MatMulNBits' zero point) */

/* A block's largest |x|. */
static inline __attribute__((always_inline)) float block_top(const float *x) {
    float top = 0.0f;
#pragma omp simd reduction(max : top)
    for (int i = 0; i < BLOCK; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
    return top;
}

/* A block's float sum in a fixed order that vectorizes: 8 columns, then a tree (the AVX-512 quantizer's order too). */
static inline __attribute__((always_inline)) float block_sum(const float *x) {
    float part[8];
    for (int i = 0; i < 8; i++) part[i] = ((x[i] + x[8 + i]) + x[16 + i]) + x[24 + i];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* Rows [CONVERT_ROWS task, ...) of A to int8 per block of 32 (scale max|a| / 127, a x (1 / scale) rounded to
 * nearest even: a product and a rounding, the same codes from every clone), each block's -8 sum of codes and
 * its float sum of the inputs (in one fixed order). */
CLONED
static void quantize_rows_int8(void *data, size_t task) {
    const QProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++)
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const int64_t at = m * pr->blocks + blk;
            const float *x = pr->a + m * pr->k + blk * BLOCK;
            int8_t *q = pr->aq + at * BLOCK;
            const float top = block_top(x);
            const float scale = top / 127.0f, inverse = top != 0.0f ? 1.0f / scale : 0.0f;
            int32_t codes = 0;
#pragma omp simd reduction(+ : codes)
            for (int i = 0; i < BLOCK; i++) {
                const int32_t v = (int32_t)__builtin_rintf(x[i] * inverse);
                q[i] = (int8_t)v;
                codes += v;
            }
            const float sum = block_sum(x);
            pr->ascale[at] = scale;
            pr->offset[at] = -CODE_ZERO * codes;
            pr->sums[at] = sum;
        }
}

/* quantize_rows_int8 with AVX-512 (the VNNI path's; ort.h quantize_block_avx512): the same codes, scales, offsets
 * and sums (the float sum's columns x[i] + x[8 + i] + x[16 + i] + x[24 + i] are the registers' halves added in that
 * order, then the same tree). */
__attribute__((target("avx512f"))) static inline __m256 high_half(__m512 x) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void quantize_rows_int8_avx512(void *data, size_t task) {
    const QProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++)
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const int64_t at = m * pr->blocks + blk;
            const float *x = pr->a + m * pr->k + blk * BLOCK;
            __m512i v0, v1;
            const float scale = quantize_block_avx512(x, &v0, &v1);
            const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
            int8_t *q = pr->aq + at * BLOCK;
            _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(v0));
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(v1));
            const __m256 columns = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(x0), high_half(x0)),
                                                               _mm512_castps512_ps256(x1)),
                                                 high_half(x1));
            float part[8];
            _mm256_storeu_ps(part, columns);
            pr->ascale[at] = scale;
            pr->offset[at] = -CODE_ZERO * _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
            pr->sums[at] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        }
}

/* Plain C: the same integers and the same float operations, in the same order, as the VNNI path. */
static void tile_int8_generic(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    for (int64_t m = m0; m < m1; m++) {
        float acc[LANES] = {0};
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const int64_t at = m * pr->blocks + blk;
            const uint8_t *w = codes + blk * BLOCK_BYTES;
            const int8_t *q = pr->aq + at * BLOCK;
            for (int l = 0; l < LANES; l++) {
                int32_t dot = pr->offset[at];
                for (int v = 0; v < GROUPS / 2; v++)
                    for (int t = 0; t < 4; t++) { /* NOTE: low nibbles: inputs 8v + t; high: 8v + 4 + t */
                        const uint8_t byte = w[v * INT8_VECTOR_BYTES + 4 * l + t];
                        dot += (int32_t)(byte & 15) * q[8 * v + t] + (int32_t)(byte >> 4) * q[8 * v + 4 + t];
                    }
                const float d = (float)scales[blk * LANES + l];
                acc[l] = fmaf((float)dot, d * pr->ascale[at], acc[l]);
                acc[l] = fmaf(pr->sums[at], fmaf((float)CODE_ZERO, d, (float)mins[blk * LANES + l]), acc[l]);
            }
        }
        store(pr, panel, m, acc);
    }
}

/* One block's dots for `mt` (at most 8) rows from row m: each of the 8 groups' codes (w8, laid out for
 * vpdpbusd) times each row's 4 codes of it, broadcast; then scaled into acc. */
static inline __attribute__((always_inline)) VNNI void int8_block(const QProduct *pr, const __m512i *w8, int64_t m, int64_t blk,
                                                                    __m512 d, __m512 c, __m512 *acc, const int mt) {
    __m512i dot[8];
    for (int i = 0; i < mt; i++) dot[i] = _mm512_set1_epi32(pr->offset[(m + i) * pr->blocks + blk]);
    for (int g = 0; g < GROUPS; g++)
        for (int i = 0; i < mt; i++) {
            int32_t four;
            memcpy(&four, pr->aq + ((m + i) * pr->blocks + blk) * BLOCK + 4 * g, 4);
            dot[i] = _mm512_dpbusd_epi32(dot[i], w8[g], _mm512_set1_epi32(four));
        }
    for (int i = 0; i < mt; i++) {
        const int64_t at = (m + i) * pr->blocks + blk;
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_mul_ps(d, _mm512_set1_ps(pr->ascale[at])), acc[i]);
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(pr->sums[at]), c, acc[i]);
    }
}

/* `mt` (at most 16) rows from row m in one pass over the panel: per block, its 8 groups' codes from 4 vectors
 * (a vector's low nibbles are group 2v as vpdpbusd reads it, 16 outputs x 4 inputs, its high nibbles group
 * 2v + 1), then the first 8 rows' dots and the rest's. */
static inline __attribute__((always_inline)) VNNI void int8_rows(const QProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    const __m512i nibbles = _mm512_set1_epi8(0x0f);
    const __m512 zero = _mm512_set1_ps((float)CODE_ZERO);
    const int first = mt < 8 ? mt : 8;
    __m512 acc[16];
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        const uint8_t *w = codes + blk * BLOCK_BYTES;
        if (mt > PREFETCH_ROWS)
            for (int line = 0; line < BLOCK_BYTES; line += 64) _mm_prefetch((const char *)(w + PREFETCH_BYTES + line), _MM_HINT_T0);
        __m512i w8[GROUPS];
        for (int v = 0; v < GROUPS / 2; v++) {
            const __m512i x = _mm512_loadu_si512((const void *)(w + v * INT8_VECTOR_BYTES));
            w8[2 * v] = _mm512_and_si512(x, nibbles);
            w8[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibbles);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + blk * LANES)));
        const __m512 c = _mm512_fmadd_ps(zero, d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + blk * LANES))));
        int8_block(pr, w8, m, blk, d, c, acc, first);
        if (mt > 8) int8_block(pr, w8, m + 8, blk, d, c, acc + 8, mt - 8);
    }
    STORE_ROWS(pr, panel, m, acc, mt);
}

VNNI static void tile_int8_vnni(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    ROWS_AT_A_TIME(int8_rows, pr, panel, m0, m1, 16);
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))
enum { AVX2_ROWS = 4 }; /* AVX2: rows a pass (int8: 8 16-bit sums and a vector's 4 groups of codes in registers) */
_Static_assert(ROW_CHUNK % AVX2_ROWS == 0, "a tile's passes start at multiples of AVX2_ROWS (convert_rows_rounded)");

/* The AVX2 paths' `mt` rows of two 8-output halves into Y (through store: the epilogues). */
static inline __attribute__((always_inline)) AVX2 void store_avx2(const QProduct *pr, int64_t panel, int64_t m, __m256 (*acc)[2],
                                                                   const int mt) {
    float out[FEW_ROWS][LANES];
#pragma GCC unroll 6
    for (int i = 0; i < mt; i++) _mm256_storeu_ps(out[i], acc[i][0]), _mm256_storeu_ps(out[i] + 8, acc[i][1]);
    for (int i = 0; i < mt; i++) store(pr, panel, m + i, out[i]);
}

/* AVX2: per block, each of its 4 vectors of codes as two 8-output halves, each half's two groups (an AND, or a
 * shift and an AND, of 32 bytes) times each of `mt` rows' 4 codes of the group, broadcast once for both halves,
 * with vpmaddubsw (codes unsigned, activations signed: 15 x 127 x 2 at most a pair), the groups' 16-bit sums
 * added in registers (at most 30,480), then per half widened and paired with vpmaddwd, the offset added: the VNNI
 * path's integers; then its float operations. NOTE: the rows inside the groups' loop, not the halves: with the
 * halves outside it GCC kept each row's broadcasts for the second half on the stack (16 rows 33.99 -> 32.24 ms a
 * step's products, 128 rows 241.1 -> 213.4); and the sums IN_REGISTER after each group: without it GCC summed a
 * block's 64 products as a tree, each stored and reloaded (16 rows 576 x 16,384 3,817 -> 2,461 us, 128 rows
 * 576 x 3,072 6,195 -> 2,893; docs/performance.md). */
static inline __attribute__((always_inline)) AVX2 void int8_rows_avx2(const QProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    const __m256i nibbles = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256 zero = _mm256_set1_ps((float)CODE_ZERO);
    __m256 acc[FEW_ROWS][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        const uint8_t *w = codes + blk * BLOCK_BYTES;
        if (mt > PREFETCH_ROWS)
            for (int line = 0; line < BLOCK_BYTES; line += 64) _mm_prefetch((const char *)(w + PREFETCH_BYTES + line), _MM_HINT_T0);
        __m256i sum16[FEW_ROWS][2];
        for (int i = 0; i < mt; i++) sum16[i][0] = sum16[i][1] = _mm256_setzero_si256();
        for (int v = 0; v < GROUPS / 2; v++) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(w + v * INT8_VECTOR_BYTES));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(w + v * INT8_VECTOR_BYTES + 32));
            const __m256i lo0 = _mm256_and_si256(x0, nibbles), lo1 = _mm256_and_si256(x1, nibbles);
            const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(x0, 4), nibbles), hi1 = _mm256_and_si256(_mm256_srli_epi16(x1, 4), nibbles);
            for (int i = 0; i < mt; i++) {
                const int8_t *q = pr->aq + ((m + i) * pr->blocks + blk) * BLOCK + 8 * v;
                int32_t four;
                memcpy(&four, q, 4);
                const __m256i a0 = _mm256_set1_epi32(four);
                sum16[i][0] = _mm256_add_epi16(sum16[i][0], _mm256_maddubs_epi16(lo0, a0));
                sum16[i][1] = _mm256_add_epi16(sum16[i][1], _mm256_maddubs_epi16(lo1, a0));
                memcpy(&four, q + 4, 4);
                const __m256i a1 = _mm256_set1_epi32(four);
                sum16[i][0] = _mm256_add_epi16(sum16[i][0], _mm256_maddubs_epi16(hi0, a1));
                sum16[i][1] = _mm256_add_epi16(sum16[i][1], _mm256_maddubs_epi16(hi1, a1));
                IN_REGISTER(sum16[i][0], sum16[i][1]);
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + blk * LANES + 8 * h)));
            const __m256 c = _mm256_fmadd_ps(zero, d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + blk * LANES + 8 * h))));
            for (int i = 0; i < mt; i++) {
                const int64_t at = (m + i) * pr->blocks + blk;
                const __m256i dot = _mm256_add_epi32(_mm256_set1_epi32(pr->offset[at]), _mm256_madd_epi16(sum16[i][h], ones));
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(pr->ascale[at])), acc[i][h]);
                acc[i][h] = _mm256_fmadd_ps(_mm256_set1_ps(pr->sums[at]), c, acc[i][h]);
            }
        }
    }
    store_avx2(pr, panel, m, acc, mt);
}

AVX2 static void tile_int8_avx2(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    FEW_ROWS_AT_A_TIME(int8_rows_avx2, pr, panel, m0, m1, AVX2_ROWS);
}

/* ---- bfloat16 activations with AVX2 + FMA (no AVX-512 BF16) ------------------------------------ */

/* convert_rows_generic, then each row's rounded inputs as float32 (rounded), for the AVX2 path to broadcast from
 * memory: AVX2_ROWS rows interleaved, input by input ([rows / AVX2_ROWS][K][AVX2_ROWS]), so that a pass reads its
 * rows' inputs through one pointer at fixed offsets. NOTE: with a row's inputs in a row of their own GCC kept a
 * pointer a row, spilled them and rebuilt each address (16 rows 1536 x 576: 653 -> 531 us a product, 128 rows
 * 5,656 -> 4,611; one row and 4 the same). */
static void convert_rows_rounded(void *data, size_t task) {
    convert_rows_generic(data, task);
    const QProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++)
        for (int64_t j = 0; j < pr->pairs_per_row; j++) {
            const uint32_t pair = pr->pairs[m * pr->pairs_per_row + j];
            float *x = pr->rounded + (m / AVX2_ROWS * pr->k + 2 * j) * AVX2_ROWS + m % AVX2_ROWS;
            x[0] = from_bf16((uint16_t)(pair & 0xffffu));
            x[AVX2_ROWS] = from_bf16((uint16_t)(pair >> 16));
        }
}

/* Per block and group: the group's 32 bytes (16 outputs x 2 codes' bytes) widened to 2 x 8 words (byte 2l | byte
 * 2l + 1 << 8), each nibble put into a float32's mantissa under 128's exponent (0x43000000 | q << 16 = 128 + q, the
 * plain C path's CODE_BIAS + q exactly) with a shift, an AND and an OR, one kind of input at a time (a pair's odd
 * input, then its even one, low nibbles before high ones: plain C's order); each of `mt` rows' input broadcast
 * from memory and fma'd into both halves' dots: plain C's operations in plain C's order, lane by lane, so the
 * same bits. */
static inline __attribute__((always_inline)) AVX2 void bf16_rows_avx2(const QProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    const float *x = pr->rounded + m / AVX2_ROWS * pr->k * AVX2_ROWS; /* NOTE: m is a multiple of AVX2_ROWS */
    const float *sums = pr->sums + m * pr->blocks;
    const __m256i nibble = _mm256_set1_epi32(0x000f0000), bias = _mm256_set1_epi32(0x43000000);
    const __m256 minus_bias = _mm256_set1_ps(-CODE_BIAS);
    /* NOTE: (shift putting the nibble at bit 16, input of the group): odd low, even low, odd high, even high */
    static const int shift[4] = {8, 16, 4, 12}, input[4] = {1, 0, 3, 2};
    __m256 acc[FEW_ROWS][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        const uint8_t *w = codes + blk * BLOCK_BYTES;
        __m256 dot[FEW_ROWS][2];
        for (int i = 0; i < mt; i++) dot[i][0] = dot[i][1] = _mm256_setzero_ps();
        for (int g = 0; g < GROUPS; g++) {
            const __m256i words0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + g * GROUP_BYTES)));
            const __m256i words1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + g * GROUP_BYTES + 16)));
#pragma GCC unroll 4
            for (int kind = 0; kind < 4; kind++) {
                const __m128i count = _mm_cvtsi32_si128(shift[kind]);
                const __m256 w0 = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(_mm256_sll_epi32(words0, count), nibble), bias));
                const __m256 w1 = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(_mm256_sll_epi32(words1, count), nibble), bias));
                for (int i = 0; i < mt; i++) {
                    const __m256 a = _mm256_broadcast_ss(x + (blk * BLOCK + 4 * g + input[kind]) * AVX2_ROWS + i);
                    dot[i][0] = _mm256_fmadd_ps(a, w0, dot[i][0]);
                    dot[i][1] = _mm256_fmadd_ps(a, w1, dot[i][1]);
                }
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + blk * LANES + 8 * h)));
            const __m256 c = _mm256_fmadd_ps(minus_bias, d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + blk * LANES + 8 * h))));
            for (int i = 0; i < mt; i++) {
                acc[i][h] = _mm256_fmadd_ps(dot[i][h], d, acc[i][h]);
                acc[i][h] = _mm256_fmadd_ps(_mm256_set1_ps(sums[i * pr->blocks + blk]), c, acc[i][h]);
            }
        }
    }
    store_avx2(pr, panel, m, acc, mt);
}

AVX2 static void tile_bf16_avx2(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    FEW_ROWS_AT_A_TIME(bf16_rows_avx2, pr, panel, m0, m1, AVX2_ROWS);
}

/* ---- int16 activations (AVX2 without AVX-512 BF16) --------------------------------------------- */

enum { INT16_TOP = 32767 }; /* the largest int16 code */

/* Row m's int16 pairs, AVX2_ROWS rows interleaved (QProduct.pairs). */
static inline uint32_t *int16_pairs(const QProduct *pr, int64_t m) {
    return pr->pairs + m / AVX2_ROWS * pr->pairs_per_row * AVX2_ROWS + m % AVX2_ROWS;
}

/* Rows [CONVERT_ROWS task, ...) of A to int16 per block of 32 (scale max|a| / 32767, a x (1 / scale) rounded to
 * nearest even: the same codes from every clone), into their interleaved pairs; each block's scale and its float
 * sum of the inputs (quantize_rows_int8's order). */
CLONED
static void quantize_rows_int16(void *data, size_t task) {
    const QProduct *pr = data;
    for (int64_t m = (int64_t)task * CONVERT_ROWS; m < range_end((int64_t)task, CONVERT_ROWS, pr->rows); m++) {
        uint32_t *p = int16_pairs(pr, m);
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const int64_t at = m * pr->blocks + blk;
            const float *x = pr->a + m * pr->k + blk * BLOCK;
            const float top = block_top(x);
            const float scale = top / (float)INT16_TOP, inverse = top != 0.0f ? 1.0f / scale : 0.0f;
            int16_t q[BLOCK];
#pragma omp simd
            for (int i = 0; i < BLOCK; i++) q[i] = (int16_t)__builtin_rintf(x[i] * inverse);
            for (int j = 0; j < PAIRS; j++)
                p[(blk * PAIRS + j) * AVX2_ROWS] = (uint32_t)(uint16_t)q[2 * j] | (uint32_t)(uint16_t)q[2 * j + 1] << 16;
            pr->ascale[at] = scale;
            pr->sums[at] = block_sum(x);
        }
    }
}

static inline int32_t int16_low(uint32_t pair) { return (int16_t)(uint16_t)(pair & 0xffffu); }
static inline int32_t int16_high(uint32_t pair) { return (int16_t)(uint16_t)(pair >> 16); }

/* Plain C: per output and block the integer dot, then acc = fma(dot, d s, acc) and fma(sum, m, acc), as the AVX2 path. */
static void tile_int16_generic(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    for (int64_t m = m0; m < m1; m++) {
        const uint32_t *p = int16_pairs(pr, m);
        float acc[LANES] = {0};
        for (int64_t blk = 0; blk < pr->blocks; blk++) {
            const int64_t at = m * pr->blocks + blk;
            const uint8_t *w = codes + blk * BLOCK_BYTES;
            for (int l = 0; l < LANES; l++) {
                int32_t dot = 0;
                for (int g = 0; g < GROUPS; g++)
                    for (int half = 0; half < 2; half++) { /* NOTE: low nibbles: inputs 4g, 4g + 1 (pair 2g); high: pair 2g + 1 */
                        const uint32_t pair = p[(blk * PAIRS + 2 * g + half) * AVX2_ROWS];
                        const int shift = 4 * half;
                        dot += ((w[g * GROUP_BYTES + 2 * l] >> shift) & 15) * int16_low(pair) +
                               ((w[g * GROUP_BYTES + 2 * l + 1] >> shift) & 15) * int16_high(pair);
                    }
                const float d = (float)scales[blk * LANES + l];
                acc[l] = fmaf((float)dot, d * pr->ascale[at], acc[l]);
                acc[l] = fmaf(pr->sums[at], (float)mins[blk * LANES + l], acc[l]);
            }
        }
        store(pr, panel, m, acc);
    }
}

/* AVX2: per block and group, each 8-output half's 16 bytes widened to words (an AND: the codes of the pair 2g, a
 * shift: of 2g + 1, as vpmaddwd pairs them) times each of `mt` rows' two pairs, broadcast, with vpmaddwd, added
 * into int32 dots (IN_REGISTER: see int8_rows_avx2); per block the dots scaled into acc: plain C's integers and
 * float operations (harness, one thread, 1,536 x 576: 1 row 61.5 -> 23.6 us, 16 rows 550 -> 259, 128 rows 4,595 ->
 * 2,053 against the bfloat16 path; docs/performance.md). */
static inline __attribute__((always_inline)) AVX2 void int16_rows_avx2(const QProduct *pr, int64_t panel, int64_t m, const int mt) {
    const uint8_t *codes = pr->b + panel * pr->blocks * BLOCK_BYTES;
    const half_t *scales = pr->scales + panel * pr->blocks * LANES, *mins = pr->mins + panel * pr->blocks * LANES;
    const int32_t *p = (const int32_t *)int16_pairs(pr, m); /* NOTE: m is a multiple of AVX2_ROWS */
    const __m256i nibble = _mm256_set1_epi16(0x000f);
    __m256 acc[FEW_ROWS][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < pr->blocks; blk++) {
        const uint8_t *w = codes + blk * BLOCK_BYTES;
        __m256i dot[FEW_ROWS][2];
        for (int i = 0; i < mt; i++) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
        for (int g = 0; g < GROUPS; g++) {
            const __m256i b0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + g * GROUP_BYTES)));
            const __m256i b1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + g * GROUP_BYTES + 16)));
            const __m256i lo0 = _mm256_and_si256(b0, nibble), lo1 = _mm256_and_si256(b1, nibble);
            const __m256i hi0 = _mm256_srli_epi16(b0, 4), hi1 = _mm256_srli_epi16(b1, 4);
            for (int i = 0; i < mt; i++) {
                const __m256i a0 = _mm256_set1_epi32(p[(blk * PAIRS + 2 * g) * AVX2_ROWS + i]);
                const __m256i a1 = _mm256_set1_epi32(p[(blk * PAIRS + 2 * g + 1) * AVX2_ROWS + i]);
                dot[i][0] = _mm256_add_epi32(dot[i][0], _mm256_madd_epi16(lo0, a0));
                dot[i][1] = _mm256_add_epi32(dot[i][1], _mm256_madd_epi16(lo1, a0));
                dot[i][0] = _mm256_add_epi32(dot[i][0], _mm256_madd_epi16(hi0, a1));
                dot[i][1] = _mm256_add_epi32(dot[i][1], _mm256_madd_epi16(hi1, a1));
                IN_REGISTER(dot[i][0], dot[i][1]);
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + blk * LANES + 8 * h)));
            const __m256 c = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + blk * LANES + 8 * h)));
            for (int i = 0; i < mt; i++) {
                const int64_t at = (m + i) * pr->blocks + blk;
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][h]), _mm256_mul_ps(d, _mm256_set1_ps(pr->ascale[at])), acc[i][h]);
                acc[i][h] = _mm256_fmadd_ps(_mm256_set1_ps(pr->sums[at]), c, acc[i][h]);
            }
        }
    }
    store_avx2(pr, panel, m, acc, mt);
}

AVX2 static void tile_int16_avx2(const QProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    FEW_ROWS_AT_A_TIME(int16_rows_avx2, pr, panel, m0, m1, AVX2_ROWS);
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
    pr.gated = kernel->gated;
    TRY(product_output(OP, context, a_dims, a_rank, pr.k, pr.gated ? pr.n / 2 : pr.n, &pr.rows, &pr.y));
    TRY(residual_input(OP, context, 4, a_dims, a_rank, pr.n, pr.gated, &pr.residual));
    if (pr.rows == 0) return NULL;
    float *normed = NULL;
    TRY(normalized_input(OP, context, 5, pr.rows, pr.k, kernel->epsilon, &pr.a, &normed));
    const size_t values = (size_t)(pr.rows * pr.blocks);
    const int rounded = kernel->convert == convert_rows_rounded;
    const size_t interleaved = (size_t)((pr.rows + AVX2_ROWS - 1) / AVX2_ROWS * AVX2_ROWS * pr.pairs_per_row); /* NOTE: int16 pairs */
    char *buffer = kernel->int8    ? malloc(values * (BLOCK + 3 * sizeof(float)))
                   : kernel->int16 ? malloc(interleaved * sizeof(uint32_t) + 2 * values * sizeof(float))
                                   : malloc((size_t)(pr.rows * pr.pairs_per_row) * sizeof(uint32_t) + values * sizeof(float) +
                                         (rounded ? (size_t)((pr.rows + AVX2_ROWS - 1) / AVX2_ROWS * AVX2_ROWS * pr.k) * sizeof(float) : 0));
    if (!buffer) {
        free(normed);
        return out_of_memory(OP);
    }
    if (kernel->int8) { /* NOTE: float and int32 arrays first, the codes after them */
        pr.sums = (float *)buffer;
        pr.ascale = pr.sums + values;
        pr.offset = (int32_t *)(pr.ascale + values);
        pr.aq = (int8_t *)(pr.offset + values);
    } else if (kernel->int16) { /* NOTE: the last pairs' rows past `rows` are never read */
        pr.pairs = (uint32_t *)buffer;
        pr.sums = (float *)(pr.pairs + interleaved);
        pr.ascale = pr.sums + values;
    } else {
        pr.pairs = (uint32_t *)buffer;
        pr.sums = (float *)(pr.pairs + pr.rows * pr.pairs_per_row);
        if (rounded) pr.rounded = pr.sums + values;
    }
    pr.tile = kernel->tile;
    pr.chunks = (pr.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    prepare_then_multiply(context, kernel->convert, (size_t)((pr.rows + CONVERT_ROWS - 1) / CONVERT_ROWS), pr.rows * pr.k,
                          product_task, product_tasks(&pr), &pr);
    free(buffer);
    free(normed);
    return NULL;
}

/* int8 activations: 1 plain C, 2 AVX2 (with FMA and F16C), 3 AVX-512 VNNI (with F16C for the float16 scales). */
static int int8_runs(int isa) {
    __builtin_cpu_init();
    return isa == BF16_ISA_GENERIC ||
           (isa == BF16_ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
            __builtin_cpu_supports("f16c")) ||
           (isa == BF16_ISA_AVX512 && has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c"));
}

/* bfloat16 activations: 1 plain C, 2 AVX2 (with FMA and F16C), 3 AVX-512 BF16. */
static int bfloat16_runs(int isa) {
    __builtin_cpu_init();
    return bf16_runs(isa) && (isa != BF16_ISA_AVX2 || __builtin_cpu_supports("f16c"));
}

static int bfloat16_best_isa(void) {
    return bfloat16_runs(BF16_ISA_AVX512) ? BF16_ISA_AVX512 : bfloat16_runs(BF16_ISA_AVX2) ? BF16_ISA_AVX2 : BF16_ISA_GENERIC;
}

/* int16 activations: 1 plain C, 2 AVX2 (with FMA and F16C). */
static int int16_runs(int isa) {
    __builtin_cpu_init();
    return isa == BF16_ISA_GENERIC || (isa == BF16_ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                         __builtin_cpu_supports("f16c"));
}

static int int16_best_isa(void) { return int16_runs(BF16_ISA_AVX2) ? BF16_ISA_AVX2 : BF16_ISA_GENERIC; }

static int int8_best_isa(void) {
    return int8_runs(BF16_ISA_AVX512) ? BF16_ISA_AVX512 : int8_runs(BF16_ISA_AVX2) ? BF16_ISA_AVX2 : BF16_ISA_GENERIC;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    QKernel *kernel = calloc(1, sizeof(QKernel));
    if (!kernel) return out_of_memory(OP);
    const int64_t int8 = optional_int(info, "int8", 0);
    if (int8 != 0 && int8 != 1) {
        free(kernel);
        return invalid(OP ": int8 = %lld, expected 0 (bfloat16 activations) or %lld (int8 activations)", (long long)int8, 1);
    }
    kernel->int8 = (int)int8;
    const int64_t int16 = optional_int(info, "int16", 0);
    if (int16 != 0 && int16 != 1) {
        free(kernel);
        return invalid(OP ": int16 = %lld, expected 0 (bfloat16 activations) or %lld (int16 activations)", (long long)int16, 1);
    }
    if (int8 && int16) {
        free(kernel);
        return invalid(OP ": int8 = %lld and int16 = %lld: one kind of activations, not both", 1, 1);
    }
    kernel->int16 = (int)int16;
    int isa = 0;
    OrtStatus *status =
        int16 ? product_attributes(OP, info, BLOCK, "K = %lld is not a positive multiple of the block size %lld", int16_runs,
                                   int16_best_isa(), "int16 = 1: 1 plain C, 2 AVX2", &kernel->k, &kernel->n, &isa, &kernel->gated)
        : int8 ? product_attributes(OP, info, BLOCK, "K = %lld is not a positive multiple of the block size %lld", int8_runs,
                                  int8_best_isa(), "int8 = 1: 1 plain C, 2 AVX2, 3 AVX-512 VNNI", &kernel->k, &kernel->n, &isa,
                                  &kernel->gated)
             : product_attributes(OP, info, BLOCK, "K = %lld is not a positive multiple of the block size %lld", bfloat16_runs,
                                  bfloat16_best_isa(), "1 plain C, 2 AVX2, 3 AVX-512 BF16",
                                  &kernel->k, &kernel->n, &isa, &kernel->gated);
    if (!status) status = norm_epsilon(OP, info, &kernel->epsilon);
    if (status) {
        free(kernel);
        return status;
    }
    if (int16) {
        kernel->tile = isa == BF16_ISA_AVX2 ? tile_int16_avx2 : tile_int16_generic;
        kernel->convert = quantize_rows_int16;
    } else if (int8) {
        kernel->tile = isa == BF16_ISA_AVX512 ? tile_int8_vnni : isa == BF16_ISA_AVX2 ? tile_int8_avx2 : tile_int8_generic;
        kernel->convert = isa == BF16_ISA_AVX512 ? quantize_rows_int8_avx512 : quantize_rows_int8;
    } else {
        kernel->tile = isa == BF16_ISA_AVX512 ? tile_bf16 : isa == BF16_ISA_AVX2 ? tile_bf16_avx2 : tile_generic;
        kernel->convert = isa == BF16_ISA_AVX512 ? convert_rows_bf16 : isa == BF16_ISA_AVX2 ? convert_rows_rounded : convert_rows_generic;
    }
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_UINT8 : index == 0 || index >= 4 ? ELEMENT_FLOAT : ELEMENT_FLOAT16;
}

PRODUCT_OPERATOR(lepton_q4_matmul, OP, 6, input_type, create_kernel, compute);
