/* Lepton's slot attention: an ONNX Runtime custom operator (domain "ai.lepton", op "SlotAttention").
 *
 * It computes what com.microsoft GroupQueryAttention computes for the slot graph
 * (lepton/runners/slot_graph.py): packed qkv [B, S, (N + 2 KVH) D], rotate-half rotary on queries and
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
 * scripts/build_native.sh (run by `make setup`) builds it into lepton/native/liblepton_ops.so, which the
 * slot runner loads when it exists; the hot loops are compiled for AVX-512, AVX2 + FMA and plain x86-64,
 * the loader picking one for the processor it runs on. Only the C ABI of ONNX Runtime is used (ort.h).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort.h"

/* ---- the computation ------------------------------------------------------------------------- */

enum { KEYS_PER_CHUNK = 64, QUERY_BLOCK = 16 };

typedef struct {
    int64_t num_heads, kv_heads;
    float scale;
} Kernel;

typedef struct {
    const float *qkv, *past_key, *past_value, *cos, *sin;
    float *out, *key, *value;
    const int32_t *seqlens;
    int64_t batch, length, heads, kv_heads, capacity, dim, blocks;
    int first_prompt;
    float scale;
    volatile int out_of_memory; /* a task could not allocate its buffer */
} Step;

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

/* chunk_any for a head size known here: the query and the accumulator stay in vector registers. */
#define CHUNK_FIXED(DIM)                                                                                          \
    static inline __attribute__((always_inline)) void chunk_##DIM(                                                \
        const float *restrict q, const float *restrict k, const float *restrict v, int64_t count, float *restrict a, \
        float *maximum, float *sum, float *restrict score) {                                                      \
        enum { N = DIM / 8 };                                                                                     \
        v8 qv[N], av[N];                                                                                          \
        for (int i = 0; i < N; i++) qv[i] = *(const v8 *)(q + 8 * i);                                             \
        int64_t j = 0;                                                                                            \
        for (; j + 8 <= count; j += 8) {                                                                          \
            v8 dots[8];                                                                                           \
            for (int t = 0; t < 8; t++) {                                                                         \
                const v8 *kj = (const v8 *)(k + (j + t) * DIM);                                                   \
                dots[t] = qv[0] * kj[0];                                                                          \
                for (int i = 1; i < N; i++) dots[t] += qv[i] * kj[i];                                             \
            }                                                                                                     \
            *(v8 *)(score + j) = lane_sums(dots);                                                                 \
        }                                                                                                         \
        for (; j < count; j++) {                                                                                  \
            const v8 *kj = (const v8 *)(k + j * DIM);                                                             \
            v8 s0 = qv[0] * kj[0];                                                                                \
            for (int i = 1; i < N; i++) s0 += qv[i] * kj[i];                                                      \
            score[j] = ((s0[0] + s0[4]) + (s0[1] + s0[5])) + ((s0[2] + s0[6]) + (s0[3] + s0[7]));                 \
        }                                                                                                         \
        const float rescale = fold(score, count, maximum, sum);                                                   \
        for (int i = 0; i < N; i++) av[i] = *(const v8 *)(a + 8 * i) * rescale;                                   \
        for (int64_t j = 0; j < count; j++) {                                                                     \
            const v8 *vj = (const v8 *)(v + j * DIM);                                                             \
            const float p = score[j];                                                                             \
            for (int i = 0; i < N; i++) av[i] += p * vj[i];                                                       \
        }                                                                                                         \
        for (int i = 0; i < N; i++) *(v8 *)(a + 8 * i) = av[i];                                                   \
    }
CHUNK_FIXED(64)
CHUNK_FIXED(128)

/* Phase 1, one (sequence, kv head): the past rows into the present cache when they are two buffers,
 * then this step's keys (rotated) and values. */
CLONED
static void write_cache(void *data, size_t task) {
    const Step *st = data;
    const int64_t b = (int64_t)task / st->kv_heads, g = (int64_t)task % st->kv_heads, dim = st->dim;
    const int64_t fresh = new_tokens(st, b), past = cached_tokens(st, b);
    const int64_t width = (st->heads + 2 * st->kv_heads) * dim, base = (b * st->kv_heads + g) * st->capacity * dim;
    float *key = st->key + base, *value = st->value + base;
    if (key != st->past_key + base) memcpy(key, st->past_key + base, (size_t)(past * dim) * sizeof(float));
    if (value != st->past_value + base) memcpy(value, st->past_value + base, (size_t)(past * dim) * sizeof(float));
    for (int64_t s = 0; s < fresh; s++) {
        const float *row = st->qkv + (b * st->length + s) * width;
        const int64_t pos = past + s;
        rotate(key + pos * dim, row + (st->heads + g) * dim, st->cos + pos * dim / 2, st->sin + pos * dim / 2,
               dim / 2, 1.0f);
        memcpy(value + pos * dim, row + (st->heads + st->kv_heads + g) * dim, (size_t)dim * sizeof(float));
    }
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
    float *buffer = malloc((size_t)(2 * rows * dim + 2 * rows + KEYS_PER_CHUNK) * sizeof(float));
    if (!buffer) {
        ((Step *)st)->out_of_memory = 1;
        return;
    }
    float *query = buffer, *acc = query + rows * dim, *maximum = acc + rows * dim, *sum = maximum + rows;
    float *score = sum + rows;
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
    const int64_t base = (b * st->kv_heads + g) * st->capacity * dim;
    const float *key = st->key + base, *value = st->value + base;
    for (int64_t j0 = 0; j0 < keys_end; j0 += KEYS_PER_CHUNK)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t end_r = past + s0 + r / group + 1; /* causal: up to the row's own position */
            if (j0 >= end_r) continue;
            const int64_t count = j0 + KEYS_PER_CHUNK < end_r ? KEYS_PER_CHUNK : end_r - j0;
            const float *q = query + r * dim, *k = key + j0 * dim, *v = value + j0 * dim;
            float *a = acc + r * dim;
            if (dim == 64)
                chunk_64(q, k, v, count, a, maximum + r, sum + r, score);
            else if (dim == 128)
                chunk_128(q, k, v, count, a, maximum + r, sum + r, score);
            else
                chunk_any(q, k, v, count, dim, a, maximum + r, sum + r, score);
        }
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

static OrtStatus *input(OrtKernelContext *context, size_t index, const void **data, int64_t *dims, size_t rank) {
    return get_input("SlotAttention", 7, context, index, data, dims, rank, NULL);
}

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const Kernel *kernel = kernel_data;
    int64_t qkv_dims[4], key_dims[4], value_dims[4], seq_dims[4], total_dims[4], cos_dims[4], sin_dims[4];
    Step st = {0};
    const int32_t *total;
    TRY(input(context, 0, (const void **)&st.qkv, qkv_dims, 3));
    TRY(input(context, 1, (const void **)&st.past_key, key_dims, 4));
    TRY(input(context, 2, (const void **)&st.past_value, value_dims, 4));
    TRY(input(context, 3, (const void **)&st.seqlens, seq_dims, 1));
    TRY(input(context, 4, (const void **)&total, total_dims, (size_t)-1));
    TRY(input(context, 5, (const void **)&st.cos, cos_dims, 2));
    TRY(input(context, 6, (const void **)&st.sin, sin_dims, 2));
    st.batch = qkv_dims[0], st.length = qkv_dims[1];
    st.heads = kernel->num_heads, st.kv_heads = kernel->kv_heads, st.scale = kernel->scale;
    st.capacity = key_dims[2], st.dim = key_dims[3];
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
    const int64_t out_dims[3] = {st.batch, st.length, st.heads * st.dim};
    TRY(get_output(context, 0, out_dims, 3, &st.out));
    TRY(get_output(context, 1, key_dims, 4, &st.key));
    TRY(get_output(context, 2, value_dims, 4, &st.value));
    st.blocks = (st.length + QUERY_BLOCK - 1) / QUERY_BLOCK;
    parallel_for(context, write_cache, (size_t)(st.batch * st.kv_heads), &st);
    parallel_for(context, attend, (size_t)(st.batch * st.kv_heads * st.blocks), &st);
    if (st.out_of_memory) return out_of_memory("SlotAttention");
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    Kernel *kernel = calloc(1, sizeof(Kernel));
    if (!kernel) return out_of_memory("SlotAttention");
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

static int input_type(const CustomOp *op, size_t index) {
    (void)op;
    return index == 3 || index == 4 ? ELEMENT_INT32 : ELEMENT_FLOAT;
}

OPERATOR(lepton_slot_attention, "SlotAttention", 7, 3, input_type, create_kernel, compute);
