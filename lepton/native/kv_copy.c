/* The K/V a slot-graph step wrote into its slots, copied over to the paged pools (lepton/runners/
 * slot_runner.py, after every step whose attention was ONNX Runtime's GroupQueryAttention: Lepton's
 * SlotAttention writes them into the pools itself; the pools are what prefix caching, the paged graph and
 * refills read).
 * Not an ONNX Runtime operator: the runner calls it through ctypes between graph runs. numpy's fancy
 * indexing did the same in 1.2 ms a 16-decode step and 24 ms a 512-token step (SmolLM2: 30 layers,
 * 3 kv heads of 64), most of it per-row overhead: each token's row of one layer and kv head is a
 * separate 256-byte piece on both sides. Here: a token's kv heads of one layer written one after
 * another (one run of its pool row), tokens prefetched a few ahead, written with streaming stores (the
 * pools are read again only by refills, prefix hits and the paged graph; float16 slots widened into
 * float32 pools with F16C where the processor has it, streamed too), keys and values of every layer split
 * over the runner's compute threads when the step has enough rows (a 128-token prompt's rows into
 * consecutive pool rows, float16 slots: 0.50-0.66 ms layer by layer and head by head, 0.31-0.36 so). */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "half.h"

typedef struct {
    const char *stores[2]; /* NOTE: keys, values */
    char *pools[2];
    const int64_t *slots, *positions, *targets;
    int64_t count, first, end; /* NOTE: a share of the (kind, layer) pairs: kind = i / layers, layer = i % layers */
    int64_t layers, num_slots, kv_heads, capacity, pool_rows, row_bytes; /* NOTE: row_bytes: a slot row's */
    WidenFn widen; /* float16 slot rows into float32 pool rows (2 x row_bytes); NULL: rows copied as they are */
    int int8; /* 8-bit slot rows (row_bytes - 4 int8 codes, then their float32 scale) into float32 pool rows */
} Copy;

#define AHEAD 8 /* NOTE: tokens prefetched ahead */
#define MAX_THREADS 8
/* NOTE: a helper thread is started per MIN_PIECES_A_THREAD pieces (a token's row of one layer, kind and kv
 * head) beyond the first share: a step of a few decodes copies on the caller's thread alone, without
 * starting and joining one (one decode of SmolLM2, 180 pieces out of cache: 0.10 ms a step with a helper,
 * 0.08 without). */
#define MIN_PIECES_A_THREAD 2048

/* float16 row into a float32 row with streaming stores (dst 32-byte aligned, n a multiple of 8). */
F16C static void widen_stream_f16c(float *restrict dst, const half_t *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
        _mm256_stream_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
}

static void copy_layers(const Copy *c) {
    const int64_t pool_row_bytes = c->int8 ? 4 * (c->row_bytes - 4) : c->widen ? 2 * c->row_bytes : c->row_bytes;
    for (int64_t pair = c->first; pair < c->end; pair++) {
        const int64_t layer = pair % c->layers;
        const char *store = c->stores[pair / c->layers];
        char *pools = c->pools[pair / c->layers];
        const int aligned = ((uintptr_t)pools % 64 == 0) && pool_row_bytes % 64 == 0;
        const int streamed = !c->widen && aligned && (uintptr_t)store % 64 == 0;
        const int widen_streamed = c->widen == widen_f16c && aligned && c->row_bytes % 16 == 0;
        /* NOTE: token by token, its kv heads one after another: a token's rows of a layer are one run of
         * the pool (kv_heads x pool_row_bytes), written in order. */
        for (int64_t i = 0; i < c->count; i++) {
            if (i + AHEAD < c->count) {
                const int64_t j = i + AHEAD;
                for (int64_t head = 0; head < c->kv_heads; head++) {
                    const char *next = store + (((layer * c->num_slots + c->slots[j]) * c->kv_heads + head) * c->capacity + c->positions[j]) * c->row_bytes;
                    for (int64_t b = 0; b < c->row_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
                }
            }
            char *dst = pools + (layer * c->pool_rows + c->targets[i]) * c->kv_heads * pool_row_bytes;
            for (int64_t head = 0; head < c->kv_heads; head++, dst += pool_row_bytes) {
                const char *src = store + (((layer * c->num_slots + c->slots[i]) * c->kv_heads + head) * c->capacity + c->positions[i]) * c->row_bytes;
                if (c->int8) {
                    widen_int8_row((float *)dst, src, c->row_bytes - 4);
                } else if (widen_streamed) {
                    widen_stream_f16c((float *)dst, (const half_t *)src, c->row_bytes / 2);
                } else if (c->widen) {
                    c->widen((float *)dst, (const half_t *)src, c->row_bytes / 2);
                } else if (streamed) {
                    for (int64_t b = 0; b < c->row_bytes; b += 32)
                        _mm_stream_si128((__m128i *)(dst + b), _mm_load_si128((const __m128i *)(src + b))),
                        _mm_stream_si128((__m128i *)(dst + b + 16), _mm_load_si128((const __m128i *)(src + b + 16)));
                } else {
                    memcpy(dst, src, (size_t)c->row_bytes);
                }
            }
        }
    }
    _mm_sfence();
}

static void *copy_thread(void *c) {
    copy_layers(c);
    return NULL;
}

/* Token i's rows (slot slots[i], position positions[i]) of every layer and kv head of the key and value
 * stores [layers, num_slots, kv_heads, capacity, row_bytes] go to row targets[i] of the key and value
 * pools [layers, pool_rows, kv_heads, row_bytes] (widen 1: float16 stores, float32 pools of twice the row
 * bytes; widen 2: 8-bit rows of row_bytes - 4 codes and a float32 scale, float32 pools of their values),
 * the (kind, layer) pairs split over up to `threads` threads (the caller's and ones started here: ONNX
 * Runtime's are idle between runs). Returns 0, or
 * i + 1 for the first token with an index out of range (then nothing is copied). */
__attribute__((visibility("default"))) int64_t lepton_slots_to_pools(
    const char *key_store, const char *value_store, char *key_pools, char *value_pools, const int64_t *slots,
    const int64_t *positions, const int64_t *targets, int64_t count, int64_t layers, int64_t num_slots,
    int64_t kv_heads, int64_t capacity, int64_t pool_rows, int64_t row_bytes, int64_t threads, int64_t widen) {
    for (int64_t i = 0; i < count; i++) {
        if (slots[i] < 0 || slots[i] >= num_slots || positions[i] < 0 || positions[i] >= capacity ||
            targets[i] < 0 || targets[i] >= pool_rows)
            return i + 1;
    }
    Copy parts[MAX_THREADS];
    pthread_t helpers[MAX_THREADS];
    const int64_t pairs = 2 * layers;
    int64_t n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    const int64_t useful = 1 + count * pairs * kv_heads / MIN_PIECES_A_THREAD;
    if (n > useful) n = useful;
    if (n > pairs) n = pairs;
    for (int64_t t = 0; t < n; t++)
        parts[t] = (Copy){{key_store, value_store}, {key_pools, value_pools}, slots, positions, targets, count,
                          t * pairs / n, (t + 1) * pairs / n, layers, num_slots, kv_heads, capacity, pool_rows,
                          row_bytes, widen != 1 ? NULL : has_f16c() ? widen_f16c : widen_plain, widen == 2};
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < n; t++) started[t] = pthread_create(&helpers[t], NULL, copy_thread, &parts[t]) == 0;
    copy_layers(&parts[0]);
    for (int64_t t = 1; t < n; t++) {
        if (started[t]) pthread_join(helpers[t], NULL);
        else copy_layers(&parts[t]); /* NOTE: no thread to be had: this one copies those layers too */
    }
    return 0;
}
