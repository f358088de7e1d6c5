/* Lepton's slot attention: an ONNX Runtime custom operator (domain "ai.lepton", op "SlotAttention").
 *
 * It computes what com.microsoft GroupQueryAttention computes for the slot graph
 * (lepton/runners/slot_graph.py): packed qkv [B, S, (N + 2 KVH) D] (or its tokens flat, [B x S, (N + 2 KVH) D],
 * B then being past_key's and the output [B x S, N D]), rotate-half rotary on queries and
 * keys, this step's keys and values written into the caches [B, KVH, M, D] (in place when the past and
 * present caches are one buffer), causal attention over each sequence's cached tokens. ONNX Runtime's
 * CPU kernel runs two small matrix products per (sequence, query head), packing that head's keys each
 * time; here each (sequence, kv head) reads its keys and values once for all the query heads that share
 * them, with a streaming softmax over chunks of keys, spread over ONNX Runtime's own intra-op threads.
 *
 * Sequences, as GroupQueryAttention reads them: seqlens_k[b] + 1 tokens are cached after the step. When
 * S equals total_sequence_length the step is every sequence's first prompt (right padded: sequence b has
 * seqlens_k[b] + 1 new tokens, its padding rows are zero in the output and never written to the caches);
 * otherwise every sequence has S new tokens after seqlens_k[b] + 1 - S cached ones.
 *
 * SlotAttentionF16 computes the same over caches of float16 (RunnerConfig.kv_cache_dtype): this step's keys
 * and values are rounded to float16 (nearest even) as they are written, and each chunk of cached keys and
 * values is widened to float32 once, for all the query heads of its group; the rest is float32 as above.
 * A decode reads half the cache's bytes: 16 decodes over 192 tokens of SmolLM2 read 141 MB of float32
 * keys and values a step, as much as its q8_0 weights.
 *
 * With its three optional inputs (pool_rows [B x S] int64, key_pools and value_pools [layers, P, KVH, D]
 * float32, every layer's pools: one input for all the graph's nodes, the attribute pool_layer picking the
 * node's) each of this step's keys and values is also written into the paged pools, at row
 * pool_rows[b x S + s] of both (-1: nowhere), as the cache holds it, widened to float32 (a float16 row
 * exactly, an 8-bit row as code x scale):
 * what lepton/native/kv_copy.c did after the run, here while the rows are still in cache. The pools are
 * inputs the operator writes into (the runner binds them, nothing else in the graph reads them); no row
 * is written unless every index is in range.
 *
 * SlotAttentionI8 computes the same over caches of 8-bit rows (RunnerConfig.kv_cache_dtype "int8"): each
 * cached row of a kv head is D int8 values and their float32 scale, D + 4 bytes (the caches are uint8
 * [B, KVH, M, D + 4]): x = q s, s = max|x| / 127, q = x (127 / max|x|) rounded to nearest even. This step's
 * keys and values are quantized so as they are written; decodes widen the codes as they read them (a
 * key's dot products scaled once, a value's weight scaled before it multiplies the codes), longer rows
 * widen each chunk of cached rows to float32 once; the rest is float32 as above. A decode reads 68 bytes
 * a row of 64 instead of float16's 128.
 *
 * scripts/build_native.sh (run by `make setup`) builds it into lepton/native/liblepton_ops.so, which the
 * slot runner loads when it exists; the hot loops are compiled for AVX-512, AVX2 + FMA and plain x86-64,
 * the loader picking one for the processor it runs on. Only the C ABI of ONNX Runtime is used (ort.h).
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "ort.h"

/* ---- the computation ------------------------------------------------------------------------- */

enum { KEYS_PER_CHUNK = 64, QUERY_BLOCK = 16 };

typedef struct Step Step;
typedef struct Keys Keys;
typedef void (*KeysFn)(const Step *st, const Keys *w);

typedef struct {
    int64_t num_heads, kv_heads;
    float scale;
    int half; /* caches of float16 (SlotAttentionF16) */
    int int8; /* caches of 8-bit rows with a scale (SlotAttentionI8) */
    KeysFn keys;
    NarrowFn narrow;
    WidenFn widen;
    int64_t pool_layer; /* the layer of the pools inputs this node writes */
} Kernel;

struct Step {
    const float *qkv, *cos, *sin;
    const char *past_key, *past_value; /* float, half_t or 8-bit rows, as `half` and `int8` say */
    float *out;
    char *key, *value;
    const int32_t *seqlens;
    int64_t batch, length, heads, kv_heads, capacity, dim, blocks;
    int64_t row; /* bytes of one cached row (a kv head's D values): 4 D, 2 D when half, D + 4 when int8 */
    int first_prompt, half, int8;
    KeysFn keys; /* phase 2's walk over the keys, for the cache's type and the processor */
    NarrowFn narrow;
    WidenFn widen;
    int stream; /* pool rows written with streaming stores (F16C: AVX2 and F16C) */
    const int64_t *pool_rows; /* NULL: no pools; else token b x length + s's pool row, -1 for none */
    float *key_pool, *value_pool; /* [pool rows, kv_heads, dim] */
    float scale;
    volatile int out_of_memory; /* a task could not allocate its buffer */
};

static int64_t new_tokens(const Step *st, int64_t b) {
    return st->first_prompt ? (int64_t)st->seqlens[b] + 1 : st->length;
}

static int64_t cached_tokens(const Step *st, int64_t b) { return (int64_t)st->seqlens[b] + 1 - new_tokens(st, b); }

/* dst = rotate-half rotary of src at one position (cos, sin: dim / 2 values), times factor. */
static inline void rotate(float *restrict dst, const float *restrict src, const float *restrict cos,
                          const float *restrict sin, int64_t half, float factor) {
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        float x1 = src[i], x2 = src[i + half];
        dst[i] = (x1 * cos[i] - x2 * sin[i]) * factor;
        dst[i + half] = (x2 * cos[i] + x1 * sin[i]) * factor;
    }
}

/* Eight floats (unaligned loads allowed) and eight int32 lanes, GCC's vector extensions: every clone
 * compiles them for its own instruction set. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8 __attribute__((vector_size(32)));

/* e^x for x <= 0 (scores minus their row's maximum), eight at a time: 2^n e^r with n the nearest integer
 * to x / ln 2 (rounded by adding 1.5 * 2^23, whose low mantissa bits are then n), |r| <= ln 2 / 2, Taylor
 * to r^6 (relative error below 2e-7); below -87 it is e^-87 (~1.6e-38, never 0, never a subnormal). */
static inline __attribute__((always_inline)) v8 exp8(v8 x) {
    const v8 floor_ = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    const v8 magic = {12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f,
                      12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f};
    const i8 below = x < floor_;
    x = (v8)(((i8)x & ~below) | ((i8)floor_ & below));
    const v8 shifted = x * 1.44269504f + magic, n = shifted - magic;
    const v8 r = x - n * 0.693145752f - n * 1.42860677e-6f;
    const v8 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    return p * (v8)((((i8)shifted - (i8)magic) + 127) << 23);
}

static inline float exp_nonpositive(float x) {
    const v8 all = {x, x, x, x, x, x, x, x};
    return exp8(all)[0];
}

/* The softmax of one chunk's scores folded into a row's running maximum, sum and accumulator: returns
 * the factor the accumulator is scaled by; score[] becomes the chunk's weights. score has room for
 * `count` rounded up to a multiple of 8 (KEYS_PER_CHUNK is one): the lanes past count weigh e^-87, and
 * are never read. */
static inline __attribute__((always_inline)) float fold(float *restrict score, int64_t count, float *maximum, float *sum) {
    float top = *maximum;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < count; j++) top = score[j] > top ? score[j] : top;
    const float rescale = exp_nonpositive(*maximum - top);
    for (int64_t j = count; j % 8; j++) score[j] = -INFINITY;
    v8 total = {*sum * rescale, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < count; j += 8) {
        const v8 weights = exp8(*(v8 *)(score + j) - top);
        *(v8 *)(score + j) = weights;
        total += weights;
    }
    *maximum = top;
    *sum = ((total[0] + total[4]) + (total[1] + total[5])) + ((total[2] + total[6]) + (total[3] + total[7]));
    return rescale;
}

/* One query row against `count` keys and values (rows of `dim`), any head size. */
static inline void chunk_any(const float *restrict q, const float *restrict k, const float *restrict v, int64_t count,
                             int64_t dim, float *restrict a, float *maximum, float *sum, float *restrict score) {
    for (int64_t j = 0; j < count; j++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; d++) dot += q[d] * k[j * dim + d];
        score[j] = dot;
    }
    const float rescale = fold(score, count, maximum, sum);
#pragma omp simd
    for (int64_t d = 0; d < dim; d++) a[d] *= rescale;
    for (int64_t j = 0; j < count; j++)
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) a[d] += score[j] * v[j * dim + d];
}

/* The lane sums of eight vectors, as one vector: three rounds of pairwise shuffles and adds. */
static inline __attribute__((always_inline)) v8 lane_sums(const v8 x[8]) {
    const i8 even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    const i8 low = {0, 1, 8, 9, 4, 5, 12, 13}, high = {2, 3, 10, 11, 6, 7, 14, 15};
    const i8 first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 p[4], q[2];
    for (int i = 0; i < 4; i++) p[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], even) + __builtin_shuffle(x[2 * i], x[2 * i + 1], odd);
    for (int i = 0; i < 2; i++) q[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], low) + __builtin_shuffle(p[2 * i], p[2 * i + 1], high);
    return __builtin_shuffle(q[0], q[1], first) + __builtin_shuffle(q[0], q[1], second);
}

/* chunk_any for a head size known here: the query and the accumulator stay in vector registers. Cached rows
 * of type T, eight values at a time read as float32 by LOAD (float: as they are; float16: widened). */
#define LOAD_FLOAT(p) (*(const v8 *)(p))
#define LOAD_HALF(p) ((v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define CHUNK_FIXED(NAME, DIM, T, LOAD, ATTR)                                                                     \
    static inline __attribute__((always_inline)) ATTR void NAME(                                                  \
        const float *restrict q, const T *restrict k, const T *restrict v, int64_t count, float *restrict a,     \
        float *maximum, float *sum, float *restrict score) {                                                      \
        enum { N = DIM / 8 };                                                                                     \
        v8 qv[N], av[N];                                                                                          \
        for (int i = 0; i < N; i++) qv[i] = *(const v8 *)(q + 8 * i);                                             \
        int64_t j = 0;                                                                                            \
        for (; j + 8 <= count; j += 8) {                                                                          \
            v8 dots[8];                                                                                           \
            for (int t = 0; t < 8; t++) {                                                                         \
                const T *kj = k + (j + t) * DIM;                                                                  \
                dots[t] = qv[0] * LOAD(kj);                                                                       \
                for (int i = 1; i < N; i++) dots[t] += qv[i] * LOAD(kj + 8 * i);                                  \
            }                                                                                                     \
            *(v8 *)(score + j) = lane_sums(dots);                                                                 \
        }                                                                                                         \
        for (; j < count; j++) {                                                                                  \
            const T *kj = k + j * DIM;                                                                            \
            v8 s0 = qv[0] * LOAD(kj);                                                                             \
            for (int i = 1; i < N; i++) s0 += qv[i] * LOAD(kj + 8 * i);                                           \
            score[j] = ((s0[0] + s0[4]) + (s0[1] + s0[5])) + ((s0[2] + s0[6]) + (s0[3] + s0[7]));                 \
        }                                                                                                         \
        const float rescale = fold(score, count, maximum, sum);                                                   \
        for (int i = 0; i < N; i++) av[i] = *(const v8 *)(a + 8 * i) * rescale;                                   \
        for (int64_t j = 0; j < count; j++) {                                                                     \
            const T *vj = v + j * DIM;                                                                            \
            const float p = score[j];                                                                             \
            for (int i = 0; i < N; i++) av[i] += p * LOAD(vj + 8 * i);                                            \
        }                                                                                                         \
        for (int i = 0; i < N; i++) *(v8 *)(a + 8 * i) = av[i];                                                   \
    }
CHUNK_FIXED(chunk_64, 64, float, LOAD_FLOAT, )
CHUNK_FIXED(chunk_128, 128, float, LOAD_FLOAT, )

CHUNK_FIXED(chunk_64_half, 64, half_t, LOAD_HALF, F16C)
CHUNK_FIXED(chunk_128_half, 128, half_t, LOAD_HALF, F16C)

/* The query heads of one position that share a kv head (a group, GQA) over a chunk together: each key and
 * value row is read (and, from float16, widened) once for all of them instead of once per head. Per head
 * the same sums in the same order as CHUNK_FIXED. q, a: `rows` rows of DIM; maximum, sum: `rows` values;
 * score: `rows` rows of KEYS_PER_CHUNK. Values are accumulated VALUE_BLOCK vectors (32 dims) at a time, so
 * that with three heads accumulators and values stay in AVX2's sixteen vector registers. The rows
 * AHEAD_ROWS on (the next chunk's, up to `ahead`, the cache's rows this walk reads) are prefetched into
 * the second-level cache as each row is read. Rows of ROW bytes, of type T read eight at a time as float32
 * by LOAD, each with a scale SCALE(row) (1 but for 8-bit rows). 16 decodes of SmolLM2 (3 heads a kv head)
 * over 192 float16 tokens (`python -m benchmarks.attention`, 30 layers): 5.6-7.0 ms head by head, 3.7-4.0
 * ms so; float32 caches 7.4-9.6, 6.3-7.4. */
enum { MAX_GROUP = 8, VALUE_BLOCK = 4, AHEAD_ROWS = KEYS_PER_CHUNK };
/* Eight int8 codes as float32; the scale after an 8-bit row's DIM codes. */
#define LOAD_I8(p) ((v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))))
static inline float row_scale(const char *row, int64_t dim) {
    float scale;
    memcpy(&scale, row + dim, sizeof scale);
    return scale;
}
/* A cached row's scale: 1 for float32 and float16 rows; an 8-bit row's (DIM int8 codes, then a float32). */
#define NO_SCALE(p) 1.0f
#define ROW_SCALE_64(p) row_scale((const char *)(p), 64)
#define ROW_SCALE_128(p) row_scale((const char *)(p), 128)
#define CHUNK_GROUP(NAME, DIM, T, ROW, LOAD, SCALE, ATTR)                                                                       \
    static inline __attribute__((always_inline)) ATTR void NAME##_rows(                                                    \
        const float *restrict q, const char *restrict k, const char *restrict v, int64_t count, float *restrict a,         \
        float *maximum, float *sum, float *restrict score, int64_t ahead, const int rows) {                                \
        enum { N = DIM / 8 };                                                                                              \
        int64_t j = 0;                                                                                                     \
        for (; j + 8 <= count; j += 8) {                                                                                   \
            v8 dots[MAX_GROUP][8], scales;                                                                                 \
            for (int t = 0; t < 8; t++) {                                                                                  \
                const T *kj = (const T *)(k + (j + t) * (ROW));                                                            \
                v8 kv[N];                                                                                                  \
                if (j + t + AHEAD_ROWS < ahead)                                                                            \
                    for (int b = 0; b < (ROW); b += 64) _mm_prefetch((const char *)kj + AHEAD_ROWS * (ROW) + b, _MM_HINT_T1); \
                for (int i = 0; i < N; i++) kv[i] = LOAD(kj + 8 * i);                                                      \
                scales[t] = SCALE(kj);                                                                                     \
                for (int r = 0; r < rows; r++) {                                                                           \
                    const float *qr = q + r * DIM;                                                                         \
                    v8 s = *(const v8 *)qr * kv[0];                                                                        \
                    for (int i = 1; i < N; i++) s += *(const v8 *)(qr + 8 * i) * kv[i];                                    \
                    dots[r][t] = s;                                                                                        \
                }                                                                                                          \
            }                                                                                                              \
            for (int r = 0; r < rows; r++) *(v8 *)(score + r * KEYS_PER_CHUNK + j) = lane_sums(dots[r]) * scales;          \
        }                                                                                                                  \
        for (; j < count; j++) {                                                                                           \
            const T *kj = (const T *)(k + j * (ROW));                                                                      \
            v8 kv[N];                                                                                                      \
            for (int i = 0; i < N; i++) kv[i] = LOAD(kj + 8 * i);                                                          \
            const float ks = SCALE(kj);                                                                                    \
            for (int r = 0; r < rows; r++) {                                                                               \
                const float *qr = q + r * DIM;                                                                             \
                v8 s0 = *(const v8 *)qr * kv[0];                                                                           \
                for (int i = 1; i < N; i++) s0 += *(const v8 *)(qr + 8 * i) * kv[i];                                       \
                score[r * KEYS_PER_CHUNK + j] = (((s0[0] + s0[4]) + (s0[1] + s0[5])) + ((s0[2] + s0[6]) + (s0[3] + s0[7]))) * ks; \
            }                                                                                                              \
        }                                                                                                                  \
        for (int r = 0; r < rows; r++) {                                                                                   \
            const float rescale = fold(score + r * KEYS_PER_CHUNK, count, maximum + r, sum + r);                           \
            for (int i = 0; i < N; i++) *(v8 *)(a + r * DIM + 8 * i) = *(const v8 *)(a + r * DIM + 8 * i) * rescale;       \
        }                                                                                                                  \
        for (int i0 = 0; i0 < N; i0 += VALUE_BLOCK) {                                                                      \
            v8 av[MAX_GROUP][VALUE_BLOCK];                                                                                 \
            for (int r = 0; r < rows; r++)                                                                                 \
                for (int i = 0; i < VALUE_BLOCK; i++) av[r][i] = *(const v8 *)(a + r * DIM + 8 * (i0 + i));                \
            for (int64_t jj = 0; jj < count; jj++) {                                                                       \
                const T *vj = (const T *)(v + jj * (ROW));                                                                 \
                v8 vv[VALUE_BLOCK];                                                                                        \
                if (i0 == 0 && jj + AHEAD_ROWS < ahead)                                                                    \
                    for (int b = 0; b < (ROW); b += 64) _mm_prefetch((const char *)vj + AHEAD_ROWS * (ROW) + b, _MM_HINT_T1); \
                for (int i = 0; i < VALUE_BLOCK; i++) vv[i] = LOAD(vj + 8 * (i0 + i));                                     \
                const float vs = SCALE(vj);                                                                                \
                for (int r = 0; r < rows; r++) {                                                                           \
                    const float p = score[r * KEYS_PER_CHUNK + jj] * vs;                                                   \
                    for (int i = 0; i < VALUE_BLOCK; i++) av[r][i] += p * vv[i];                                           \
                }                                                                                                          \
            }                                                                                                              \
            for (int r = 0; r < rows; r++)                                                                                 \
                for (int i = 0; i < VALUE_BLOCK; i++) *(v8 *)(a + r * DIM + 8 * (i0 + i)) = av[r][i];                      \
        }                                                                                                                  \
    }                                                                                                                      \
    /* NOTE: each group size a constant the inlined kernel is unrolled for */                                              \
    static inline __attribute__((always_inline)) ATTR void NAME(                                                           \
        const float *restrict q, const char *restrict k, const char *restrict v, int64_t count, float *restrict a,         \
        float *maximum, float *sum, float *restrict score, int64_t ahead, int rows) {                                      \
        switch (rows) {                                                                                                    \
        case 1: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 1); break;                                      \
        case 2: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 2); break;                                      \
        case 3: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 3); break;                                      \
        case 4: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 4); break;                                      \
        case 5: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 5); break;                                      \
        case 6: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 6); break;                                      \
        case 7: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 7); break;                                      \
        default: NAME##_rows(q, k, v, count, a, maximum, sum, score, ahead, 8); break;                                     \
        }                                                                                                                  \
    }
CHUNK_GROUP(group_64, 64, float, 64 * 4, LOAD_FLOAT, NO_SCALE, )
CHUNK_GROUP(group_128, 128, float, 128 * 4, LOAD_FLOAT, NO_SCALE, )
CHUNK_GROUP(group_64_half, 64, half_t, 64 * 2, LOAD_HALF, NO_SCALE, F16C)
CHUNK_GROUP(group_128_half, 128, half_t, 128 * 2, LOAD_HALF, NO_SCALE, F16C)
/* 8-bit rows (DIM + 4 bytes): a key's dot products are taken with its codes and scaled once, a value's weight
 * is scaled before it multiplies the codes, so the rows are widened where they are used, never copied. */
CHUNK_GROUP(group_64_i8, 64, int8_t, 64 + 4, LOAD_I8, ROW_SCALE_64, F16C)
CHUNK_GROUP(group_128_i8, 128, int8_t, 128 + 4, LOAD_I8, ROW_SCALE_128, F16C)


/* n values as an 8-bit row: n int8 codes q = x (127 / max|x|) rounded to nearest even, then the float32
 * scale max|x| / 127 (unaligned). lepton/runners/slot_cache.py's quantize_rows computes the same bits. */
static inline void quantize_row(char *dst, const float *src, int64_t n) {
    float top = 0.0f;
    for (int64_t i = 0; i < n; i++) top = fabsf(src[i]) > top ? fabsf(src[i]) : top;
    const float scale = top / 127.0f, inverse = top > 0.0f ? 127.0f / top : 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float q = nearbyintf(src[i] * inverse);
        dst[i] = (char)(int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
    }
    memcpy(dst + n, &scale, sizeof scale);
}

/* n values into a cache row: copied, rounded to float16, or quantized to an 8-bit row. */
static inline void put_row(const Step *st, char *dst, const float *src, int64_t n) {
    if (st->int8)
        quantize_row(dst, src, n);
    else if (st->half)
        st->narrow((half_t *)dst, src, n);
    else
        memcpy(dst, src, (size_t)n * sizeof(float));
}

/* n float32 values (n a multiple of 8, dst 32-byte aligned) stored past the caches: the pools are read again
 * only by refills, prefix hits and the paged graph, and a plain store would read each line in first. */
F16C static void stream_row(float *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
}

F16C static void stream_half_row(float *restrict dst, const half_t *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
}

/* A cache row as float32 into a pool row: copied, widened from float16, or code x scale; streamed where the
 * processor has F16C and the row allows it (the caller fences). */
static inline void pool_row(const Step *st, float *dst, const char *src, int64_t n) {
    float widened[st->int8 ? n : 1];
    if (st->int8) { /* NOTE: then a float32 row like the others */
        widen_int8_row(widened, src, n);
        src = (const char *)widened;
    }
    if (st->stream && n % 8 == 0 && (uintptr_t)dst % 32 == 0) {
        if (st->half) stream_half_row(dst, (const half_t *)src, n);
        else stream_row(dst, (const float *)src, n);
    } else if (st->half) {
        st->widen(dst, (const half_t *)src, n);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* Phase 1, one (sequence, kv head): the past rows into the present cache when they are two buffers,
 * then this step's keys (rotated) and values, and with pools their pool rows too. */
CLONED
static void write_cache(void *data, size_t task) {
    const Step *st = data;
    const int64_t b = (int64_t)task / st->kv_heads, g = (int64_t)task % st->kv_heads, dim = st->dim;
    const int64_t fresh = new_tokens(st, b), past = cached_tokens(st, b);
    const int64_t width = (st->heads + 2 * st->kv_heads) * dim, base = (b * st->kv_heads + g) * st->capacity * st->row;
    char *key = st->key + base, *value = st->value + base;
    if (key != st->past_key + base) memcpy(key, st->past_key + base, (size_t)(past * st->row));
    if (value != st->past_value + base) memcpy(value, st->past_value + base, (size_t)(past * st->row));
    float rotated[dim];
    for (int64_t s = 0; s < fresh; s++) {
        const float *row = st->qkv + (b * st->length + s) * width;
        const int64_t pos = past + s;
        rotate(rotated, row + (st->heads + g) * dim, st->cos + pos * dim / 2, st->sin + pos * dim / 2, dim / 2, 1.0f);
        put_row(st, key + pos * st->row, rotated, dim);
        put_row(st, value + pos * st->row, row + (st->heads + st->kv_heads + g) * dim, dim);
        const int64_t target = st->pool_rows ? st->pool_rows[b * st->length + s] : -1;
        if (target >= 0) {
            const int64_t at = (target * st->kv_heads + g) * dim;
            pool_row(st, st->key_pool + at, key + pos * st->row, dim);
            pool_row(st, st->value_pool + at, value + pos * st->row, dim);
        }
    }
    if (st->pool_rows && st->stream) _mm_sfence();
}

/* One (sequence, kv head, block of query positions)'s rows (every query head of the group at each
 * position) and the keys they attend over. */
struct Keys {
    const float *query;
    float *acc, *maximum, *sum, *score, *chunk_keys, *chunk_values; /* chunk_*: room for a widened chunk */
    int64_t rows, group, end0, keys_end, base; /* row r attends to keys [0, end0 + r / group); base: the cache's, in bytes */
};

/* Keys of chunk [j0, j0 + KEYS_PER_CHUNK) that row r attends to (causal: up to its own position). */
static inline int64_t chunk_count(const Keys *w, int64_t r, int64_t j0) {
    const int64_t end = w->end0 + r / w->group;
    return j0 >= end ? 0 : j0 + KEYS_PER_CHUNK < end ? KEYS_PER_CHUNK : end - j0;
}

/* Each row over float32 rows of keys and values, chunk by chunk (k, v: the chunk's first rows): a
 * position's group of heads together where the head size has a CHUNK_GROUP kernel. ahead: rows from k on
 * worth prefetching (the cache's rows up to keys_end; 0 for a widened copy). */
static inline __attribute__((always_inline)) void rows_over_chunk(const Step *st, const Keys *w, int64_t j0,
                                                                   const float *k, const float *v, int64_t ahead) {
    if ((st->dim == 64 || st->dim == 128) && w->group <= MAX_GROUP) {
        for (int64_t r = 0; r < w->rows; r += w->group) {
            const int64_t count = chunk_count(w, r, j0);
            const float *q = w->query + r * st->dim;
            float *a = w->acc + r * st->dim;
            if (!count) continue;
            if (st->dim == 64)
                group_64(q, (const char *)k, (const char *)v, count, a, w->maximum + r, w->sum + r, w->score, ahead, (int)w->group);
            else
                group_128(q, (const char *)k, (const char *)v, count, a, w->maximum + r, w->sum + r, w->score, ahead, (int)w->group);
        }
        return;
    }
    for (int64_t r = 0; r < w->rows; r++) {
        const int64_t count = chunk_count(w, r, j0);
        const float *q = w->query + r * st->dim;
        float *a = w->acc + r * st->dim;
        if (!count) continue;
        if (st->dim == 64)
            chunk_64(q, k, v, count, a, w->maximum + r, w->sum + r, w->score);
        else if (st->dim == 128)
            chunk_128(q, k, v, count, a, w->maximum + r, w->sum + r, w->score);
        else
            chunk_any(q, k, v, count, st->dim, a, w->maximum + r, w->sum + r, w->score);
    }
}

/* The walk over float32 caches. */
CLONED
static void keys_float(const Step *st, const Keys *w) {
    const float *key = (const float *)(st->key + w->base), *value = (const float *)(st->value + w->base);
    for (int64_t j0 = 0; j0 < w->keys_end; j0 += KEYS_PER_CHUNK)
        rows_over_chunk(st, w, j0, key + j0 * st->dim, value + j0 * st->dim, w->keys_end - j0);
}

/* The walk over float16 caches in plain C: each chunk widened once into float32, then as above. */
static void keys_half_plain(const Step *st, const Keys *w) {
    const half_t *key = (const half_t *)(st->key + w->base), *value = (const half_t *)(st->value + w->base);
    for (int64_t j0 = 0; j0 < w->keys_end; j0 += KEYS_PER_CHUNK) {
        const int64_t n = (j0 + KEYS_PER_CHUNK < w->keys_end ? KEYS_PER_CHUNK : w->keys_end - j0) * st->dim;
        widen_plain(w->chunk_keys, key + j0 * st->dim, n);
        widen_plain(w->chunk_values, value + j0 * st->dim, n);
        rows_over_chunk(st, w, j0, w->chunk_keys, w->chunk_values, 0);
    }
}

/* The walk over 8-bit rows in plain C: each chunk widened once into float32 (code x scale), then as above. */
CLONED
static void keys_int8_plain(const Step *st, const Keys *w) {
    const int64_t dim = st->dim, row = st->row;
    const char *key = st->key + w->base, *value = st->value + w->base;
    for (int64_t j0 = 0; j0 < w->keys_end; j0 += KEYS_PER_CHUNK) {
        const int64_t n = j0 + KEYS_PER_CHUNK < w->keys_end ? KEYS_PER_CHUNK : w->keys_end - j0;
        for (int64_t j = 0; j < n; j++) {
            widen_int8_row(w->chunk_keys + j * dim, key + (j0 + j) * row, dim);
            widen_int8_row(w->chunk_values + j * dim, value + (j0 + j) * row, dim);
        }
        rows_over_chunk(st, w, j0, w->chunk_keys, w->chunk_values, 0);
    }
}

/* The walk over float16 caches with F16C: for a few rows (decodes: one position's query heads) head sizes
 * 64 and 128 widen eight values at a time as they are read, a position's group of heads together
 * (CHUNK_GROUP; reading overlaps computing, as with float32 rows; widening each chunk first was slower:
 * 7.2-8.0 ms against 5.3-5.7 head by head); more rows (a prompt's block of positions), or other head sizes,
 * widen each chunk once for all of them. */
enum { WIDEN_ONCE_ROWS = 8 };
static inline __attribute__((always_inline)) F16C void keys_half_vector(const Step *st, const Keys *w) {
    const half_t *key = (const half_t *)(st->key + w->base), *value = (const half_t *)(st->value + w->base);
    const int64_t dim = st->dim;
    for (int64_t j0 = 0; j0 < w->keys_end; j0 += KEYS_PER_CHUNK) {
        const half_t *k = key + j0 * dim, *v = value + j0 * dim;
        if ((dim != 64 && dim != 128) || w->rows > WIDEN_ONCE_ROWS) {
            const int64_t n = (j0 + KEYS_PER_CHUNK < w->keys_end ? KEYS_PER_CHUNK : w->keys_end - j0) * dim;
            widen_f16c(w->chunk_keys, k, n);
            widen_f16c(w->chunk_values, v, n);
            rows_over_chunk(st, w, j0, w->chunk_keys, w->chunk_values, 0);
            continue;
        }
        if (w->group <= MAX_GROUP) {
            for (int64_t r = 0; r < w->rows; r += w->group) {
                const int64_t count = chunk_count(w, r, j0);
                const float *q = w->query + r * dim;
                float *a = w->acc + r * dim;
                if (!count) continue;
                if (dim == 64)
                    group_64_half(q, (const char *)k, (const char *)v, count, a, w->maximum + r, w->sum + r, w->score,
                                  w->keys_end - j0, (int)w->group);
                else
                    group_128_half(q, (const char *)k, (const char *)v, count, a, w->maximum + r, w->sum + r, w->score,
                                  w->keys_end - j0, (int)w->group);
            }
            continue;
        }
        for (int64_t r = 0; r < w->rows; r++) {
            const int64_t count = chunk_count(w, r, j0);
            const float *q = w->query + r * dim;
            float *a = w->acc + r * dim;
            if (!count) continue;
            if (dim == 64)
                chunk_64_half(q, k, v, count, a, w->maximum + r, w->sum + r, w->score);
            else
                chunk_128_half(q, k, v, count, a, w->maximum + r, w->sum + r, w->score);
        }
    }
}

/* The walk over 8-bit rows with AVX2: for a few rows (decodes) head sizes 64 and 128 widen the codes as they
 * are read, a position's group of heads together (CHUNK_GROUP); more rows, or other head sizes, widen
 * each chunk once for all of them (keys_int8_plain). */
static inline __attribute__((always_inline)) F16C void keys_int8_vector(const Step *st, const Keys *w) {
    const int64_t dim = st->dim;
    if ((dim != 64 && dim != 128) || w->rows > WIDEN_ONCE_ROWS || w->group > MAX_GROUP) {
        keys_int8_plain(st, w);
        return;
    }
    const char *key = st->key + w->base, *value = st->value + w->base;
    for (int64_t j0 = 0; j0 < w->keys_end; j0 += KEYS_PER_CHUNK) {
        const char *k = key + j0 * st->row, *v = value + j0 * st->row;
        for (int64_t r = 0; r < w->rows; r += w->group) {
            const int64_t count = chunk_count(w, r, j0);
            if (!count) continue;
            const float *q = w->query + r * dim;
            float *a = w->acc + r * dim;
            if (dim == 64)
                group_64_i8(q, k, v, count, a, w->maximum + r, w->sum + r, w->score, w->keys_end - j0, (int)w->group);
            else
                group_128_i8(q, k, v, count, a, w->maximum + r, w->sum + r, w->score, w->keys_end - j0, (int)w->group);
        }
    }
}

/* keys_half_vector compiled twice: with AVX2, F16C and FMA (sixteen vector registers), and for AVX-512
 * processors (thirty-two: a group's accumulators stay in registers); FMA contracts its products either way. */
__attribute__((target("avx2,f16c,fma"))) static void keys_half_f16c(const Step *st, const Keys *w) { keys_half_vector(st, w); }
__attribute__((target("arch=x86-64-v4"))) static void keys_half_avx512(const Step *st, const Keys *w) { keys_half_vector(st, w); }
__attribute__((target("avx2,f16c,fma"))) static void keys_int8_avx2(const Step *st, const Keys *w) { keys_int8_vector(st, w); }
__attribute__((target("arch=x86-64-v4"))) static void keys_int8_avx512(const Step *st, const Keys *w) { keys_int8_vector(st, w); }

/* keys_half_avx512 where the processor runs x86-64-v4 code; a one-target build (the tests') for a target
 * below it keeps to that target's code. */
static int half_avx512(void) {
#if defined(LEPTON_ONE_TARGET) && !defined(__AVX512F__)
    return 0;
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4");
#endif
}

/* Phase 2, one (sequence, kv head, block of query positions): every query head of the group over the
 * group's keys, chunk by chunk, with a running maximum and sum per query row. */
CLONED
static void attend(void *data, size_t task) {
    const Step *st = data;
    const int64_t per_seq = st->kv_heads * st->blocks;
    const int64_t b = (int64_t)task / per_seq, g = ((int64_t)task % per_seq) / st->blocks;
    const int64_t s0 = ((int64_t)task % st->blocks) * QUERY_BLOCK;
    const int64_t dim = st->dim, group = st->heads / st->kv_heads;
    const int64_t fresh = new_tokens(st, b), past = cached_tokens(st, b);
    const int64_t width = (st->heads + 2 * st->kv_heads) * dim, out_width = st->heads * dim;
    int64_t s1 = s0 + QUERY_BLOCK < st->length ? s0 + QUERY_BLOCK : st->length;
    for (int64_t s = s0 > fresh ? s0 : fresh; s < s1; s++) /* padding rows of a first prompt */
        for (int64_t h = 0; h < group; h++)
            memset(st->out + (b * st->length + s) * out_width + (g * group + h) * dim, 0, (size_t)dim * sizeof(float));
    if (s1 > fresh) s1 = fresh;
    if (s0 >= s1) return;
    const int64_t rows = group * (s1 - s0), keys_end = past + s1;
    const int64_t widened = st->half || st->int8 ? 2 * KEYS_PER_CHUNK * dim : 0; /* NOTE: a chunk's keys and values as float32 */
    const int64_t scores = (group < MAX_GROUP ? group : MAX_GROUP) * KEYS_PER_CHUNK; /* NOTE: a group's rows at once */
    float *buffer = malloc((size_t)(2 * rows * dim + 2 * rows + scores + widened) * sizeof(float));
    if (!buffer) {
        ((Step *)st)->out_of_memory = 1;
        return;
    }
    float *query = buffer, *acc = query + rows * dim, *maximum = acc + rows * dim, *sum = maximum + rows;
    float *score = sum + rows, *chunk_keys = score + scores, *chunk_values = chunk_keys + KEYS_PER_CHUNK * dim;
    for (int64_t s = s0; s < s1; s++) {
        const float *row = st->qkv + (b * st->length + s) * width;
        const int64_t pos = past + s;
        for (int64_t h = 0; h < group; h++) {
            const int64_t r = (s - s0) * group + h;
            rotate(query + r * dim, row + (g * group + h) * dim, st->cos + pos * dim / 2, st->sin + pos * dim / 2,
                   dim / 2, st->scale);
            maximum[r] = -INFINITY;
            sum[r] = 0.0f;
        }
    }
    memset(acc, 0, (size_t)(rows * dim) * sizeof(float));
    const Keys walk = {query, acc, maximum, sum, score, chunk_keys, chunk_values, rows, group, past + s0 + 1, keys_end,
                       (b * st->kv_heads + g) * st->capacity * st->row};
    st->keys(st, &walk);
    for (int64_t s = s0; s < s1; s++)
        for (int64_t h = 0; h < group; h++) {
            const int64_t r = (s - s0) * group + h;
            const float inverse = 1.0f / sum[r];
            float *o = st->out + (b * st->length + s) * out_width + (g * group + h) * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) o[d] = acc[r * dim + d] * inverse;
        }
    free(buffer);
}

/* ---- the operator ------------------------------------------------------------------------------ */

enum { INPUTS = 10 }; /* NOTE: the last three (pool_rows, key_pools, value_pools) optional, all or none */

static OrtStatus *input(OrtKernelContext *context, size_t index, const void **data, int64_t *dims, size_t rank) {
    return get_input("SlotAttention", INPUTS, context, index, data, dims, rank, NULL);
}

/* The optional pools: st->pool_rows stays NULL without them; refused unless all three are given, shaped
 * [B x S], [layers, P, KVH, D] and [layers, P, KVH, D], with pool_layer below layers and every row index
 * below P (or -1). */
static OrtStatus *pools(OrtKernelContext *context, int64_t layer, Step *st) {
    const OrtValue *given[3] = {NULL, NULL, NULL};
    int count = 0;
    for (size_t i = 0; i < 3; i++) {
        TRY(API(GetInputFn, API_KERNEL_CONTEXT_GET_INPUT)(context, 7 + i, &given[i]));
        count += given[i] != NULL;
    }
    if (count == 0) return NULL;
    if (count != 3) return invalid("SlotAttention: pool_rows, key_pools and value_pools go together (%lld of %lld given)", count, 3);
    int64_t rows_dims[4], key_dims[4], value_dims[4];
    TRY(input(context, 7, (const void **)&st->pool_rows, rows_dims, 1));
    TRY(input(context, 8, (const void **)&st->key_pool, key_dims, 4));
    TRY(input(context, 9, (const void **)&st->value_pool, value_dims, 4));
    if (rows_dims[0] != st->batch * st->length)
        return invalid("SlotAttention: pool_rows has %lld values for %lld tokens", rows_dims[0], st->batch * st->length);
    for (int i = 0; i < 4; i++)
        if (value_dims[i] != key_dims[i]) return invalid("SlotAttention: value_pools dimension %lld differs from key_pools' (%lld)", i, value_dims[i]);
    if (key_dims[2] != st->kv_heads || key_dims[3] != st->dim)
        return invalid("SlotAttention: key_pools rows of %lld x %lld values, expected kv_num_heads x head_dim", key_dims[2], key_dims[3]);
    if (layer < 0 || layer >= key_dims[0])
        return invalid("SlotAttention: pool_layer %lld, the pools have %lld layers", layer, key_dims[0]);
    for (int64_t t = 0; t < rows_dims[0]; t++)
        if (st->pool_rows[t] < -1 || st->pool_rows[t] >= key_dims[1])
            return invalid("SlotAttention: pool_rows has %lld, outside [-1, %lld) (the pools' rows)", st->pool_rows[t], key_dims[1]);
    const int64_t offset = layer * key_dims[1] * key_dims[2] * key_dims[3];
    st->key_pool += offset, st->value_pool += offset;
    return NULL;
}

static OrtStatus *cache_output(OrtKernelContext *context, size_t index, const int64_t *dims, char **data) {
    float *out = NULL;
    TRY(get_output(context, index, dims, 4, &out)); /* NOTE: any element type: only the address is taken */
    *data = (char *)out;
    return NULL;
}

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const Kernel *kernel = kernel_data;
    int64_t qkv_dims[4], key_dims[4], value_dims[4], seq_dims[4], total_dims[4], cos_dims[4], sin_dims[4];
    Step st = {0};
    const int32_t *total;
    size_t qkv_rank = 0;
    TRY(get_input("SlotAttention", INPUTS, context, 0, (const void **)&st.qkv, qkv_dims, (size_t)-1, &qkv_rank));
    TRY(input(context, 1, (const void **)&st.past_key, key_dims, 4));
    TRY(input(context, 2, (const void **)&st.past_value, value_dims, 4));
    TRY(input(context, 3, (const void **)&st.seqlens, seq_dims, 1));
    TRY(input(context, 4, (const void **)&total, total_dims, (size_t)-1));
    TRY(input(context, 5, (const void **)&st.cos, cos_dims, 2));
    TRY(input(context, 6, (const void **)&st.sin, sin_dims, 2));
    if (qkv_rank != 2 && qkv_rank != 3)
        return invalid("SlotAttention: qkv has rank %lld, expected %lld ([B, S, width]) or 2 ([B x S, width])", (long long)qkv_rank, 3);
    if (qkv_rank == 2) { /* NOTE: the flat tokens of the product before it: B from the caches, S = rows / B */
        if (key_dims[0] < 1 || qkv_dims[0] % key_dims[0])
            return invalid("SlotAttention: qkv has %lld rows, not S rows for each of past_key's %lld sequences", qkv_dims[0], key_dims[0]);
        st.batch = key_dims[0], st.length = qkv_dims[0] / key_dims[0], qkv_dims[2] = qkv_dims[1];
    } else {
        st.batch = qkv_dims[0], st.length = qkv_dims[1];
    }
    st.heads = kernel->num_heads, st.kv_heads = kernel->kv_heads, st.scale = kernel->scale;
    st.half = kernel->half, st.int8 = kernel->int8, st.keys = kernel->keys, st.narrow = kernel->narrow;
    st.capacity = key_dims[2], st.dim = key_dims[3] - (kernel->int8 ? 4 : 0); /* NOTE: an 8-bit row ends in its scale */
    if (st.dim < 2) return invalid("SlotAttention: past_key rows of %lld values, %lld of them the scale", key_dims[3], kernel->int8 ? 4 : 0);
    st.row = kernel->int8 ? st.dim + 4 : st.dim * (kernel->half ? 2 : 4);
    const int64_t width = (st.heads + 2 * st.kv_heads) * st.dim;
    if (qkv_dims[2] != width) return invalid("SlotAttention: qkv has %lld values per token, expected %lld", qkv_dims[2], width);
    for (int i = 0; i < 4; i++)
        if (value_dims[i] != key_dims[i]) return invalid("SlotAttention: past_value dimension %lld differs from past_key's (%lld)", i, value_dims[i]);
    if (key_dims[0] != st.batch || key_dims[1] != st.kv_heads)
        return invalid("SlotAttention: past_key has %lld sequences, qkv %lld", key_dims[0], st.batch);
    if (seq_dims[0] != st.batch) return invalid("SlotAttention: seqlens_k has %lld values for %lld sequences", seq_dims[0], st.batch);
    if (st.dim % 2 || cos_dims[1] != st.dim / 2 || sin_dims[1] != st.dim / 2 || sin_dims[0] != cos_dims[0])
        return invalid("SlotAttention: cos/sin tables need head_dim / 2 = %lld columns, got %lld", st.dim / 2, cos_dims[1]);
    st.first_prompt = (int64_t)total[0] == st.length;
    for (int64_t b = 0; b < st.batch; b++) {
        const int64_t fresh = new_tokens(&st, b), past = cached_tokens(&st, b);
        if (fresh < 1 || fresh > st.length || past < 0)
            return invalid("SlotAttention: seqlens_k[%lld] = %lld does not fit this step's tokens", b, st.seqlens[b]);
        if (past + fresh > st.capacity)
            return invalid("SlotAttention: %lld tokens do not fit a cache of %lld", past + fresh, st.capacity);
        if (past + fresh > cos_dims[0])
            return invalid("SlotAttention: position %lld is past the rotary tables' %lld", past + fresh - 1, cos_dims[0]);
    }
    const int64_t out_dims[3] = {st.batch, st.length, st.heads * st.dim}, flat_dims[2] = {st.batch * st.length, st.heads * st.dim};
    TRY(qkv_rank == 2 ? get_output(context, 0, flat_dims, 2, &st.out) : get_output(context, 0, out_dims, 3, &st.out));
    TRY(cache_output(context, 1, key_dims, &st.key));
    TRY(cache_output(context, 2, value_dims, &st.value));
    st.widen = kernel->widen, st.stream = kernel->widen == widen_f16c;
    TRY(pools(context, kernel->pool_layer, &st));
    st.blocks = (st.length + QUERY_BLOCK - 1) / QUERY_BLOCK;
    parallel_for(context, write_cache, (size_t)(st.batch * st.kv_heads), &st);
    parallel_for(context, attend, (size_t)(st.batch * st.kv_heads * st.blocks), &st);
    if (st.out_of_memory) return out_of_memory("SlotAttention");
    return NULL;
}

static OrtStatus *create(const OrtKernelInfo *info, void **out, int half, int int8) {
    Kernel *kernel = calloc(1, sizeof(Kernel));
    if (!kernel) return out_of_memory("SlotAttention");
    kernel->half = half, kernel->int8 = int8;
    /* NOTE: isa, optional: 0 = F16C where the processor has it, 1 = plain C (the tests run both) */
    const int f16c = optional_int(info, "isa", 0) == 0 && has_f16c() && __builtin_cpu_supports("fma");
    kernel->keys = int8 ? (!f16c ? keys_int8_plain : half_avx512() ? keys_int8_avx512 : keys_int8_avx2)
                   : !half ? keys_float : !f16c ? keys_half_plain : half_avx512() ? keys_half_avx512 : keys_half_f16c;
    kernel->narrow = f16c ? narrow_f16c : narrow_plain;
    kernel->widen = f16c ? widen_f16c : widen_plain;
    kernel->pool_layer = optional_int(info, "pool_layer", 0);
    OrtStatus *status = API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, "num_heads", &kernel->num_heads);
    if (!status) status = API(GetAttributeInt64Fn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, "kv_num_heads", &kernel->kv_heads);
    if (!status) status = API(GetAttributeFloatFn, API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT)(info, "scale", &kernel->scale);
    if (!status && (kernel->kv_heads < 1 || kernel->num_heads % kernel->kv_heads))
        status = invalid("SlotAttention: num_heads %lld is not a multiple of kv_num_heads %lld", kernel->num_heads, kernel->kv_heads);
    if (status) {
        free(kernel);
        return status;
    }
    *out = kernel;
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    return create(info, out, 0, 0);
}

static OrtStatus *create_kernel_f16(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    return create(info, out, 1, 0);
}

static OrtStatus *create_kernel_i8(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    return create(info, out, 0, 1);
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 3 || index == 4 ? ELEMENT_INT32 : index == 7 ? ELEMENT_INT64 : ELEMENT_FLOAT;
}

static int characteristic(const CustomOp *op, size_t index) {
    (void)op;
    return index >= 7 ? OPTIONAL : REQUIRED;
}

/* SlotAttentionF16: past_key and past_value, present_key and present_value float16. */
static int input_type_f16(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 || index == 2 ? ELEMENT_FLOAT16 : input_type(op, index);
}

static int output_type_f16(const CustomOp *op, size_t index) {
    (void)op;
    return index == 0 ? ELEMENT_FLOAT : ELEMENT_FLOAT16;
}

/* SlotAttentionI8: past_key and past_value, present_key and present_value uint8 rows of D + 4 bytes. */
static int input_type_i8(const CustomOp *op, size_t index) {
    (void)op;
    return index == 1 || index == 2 ? ELEMENT_UINT8 : input_type(op, index);
}

static int output_type_i8(const CustomOp *op, size_t index) {
    (void)op;
    return index == 0 ? ELEMENT_FLOAT : ELEMENT_UINT8;
}

OPERATOR_WITH(lepton_slot_attention, "SlotAttention", INPUTS, 3, input_type, float_output, characteristic, create_kernel,
              compute);
OPERATOR_WITH(lepton_slot_attention_f16, "SlotAttentionF16", INPUTS, 3, input_type_f16, output_type_f16, characteristic,
              create_kernel_f16, compute);
OPERATOR_WITH(lepton_slot_attention_i8, "SlotAttentionI8", INPUTS, 3, input_type_i8, output_type_i8, characteristic,
              create_kernel_i8, compute);
