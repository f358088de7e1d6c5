/* float16 <-> float32 for Lepton's library: the float16 slots' attention (slot_attention.c), their copy
 * into the float32 pools (kv_copy.c) and the 4-bit product's scales (q4_matmul.c, half_t). n values at a
 * time, with F16C's vcvtph2ps / vcvtps2ph (8 at a time) or in plain C: the same values either way
 * (widening is exact, narrowing rounds to nearest even). And the 8-bit slots' rows widened (code x scale),
 * for their attention and their copy. */
#ifndef LEPTON_HALF_H
#define LEPTON_HALF_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#pragma GCC visibility push(hidden)

typedef _Float16 half_t;
typedef void (*WidenFn)(float *dst, const half_t *src, int64_t n);
typedef void (*NarrowFn)(half_t *dst, const float *src, int64_t n);

#define F16C __attribute__((target("avx2,f16c")))

/* F16C (and the AVX2 its 8-wide forms need) on this processor. */
static inline int has_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
}

static inline void widen_plain(float *restrict dst, const half_t *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = (float)src[i];
}

static inline void narrow_plain(half_t *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = (half_t)src[i];
}

/* An 8-bit slot row (n int8 codes, then their float32 scale, unaligned) into n float32 values: code x scale. */
static inline void widen_int8_row(float *restrict dst, const char *restrict src, int64_t n) {
    float scale;
    memcpy(&scale, src + n, sizeof scale);
    const int8_t *restrict codes = (const int8_t *)src;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = (float)codes[i] * scale;
}

F16C static inline void widen_f16c(float *restrict dst, const half_t *restrict src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = (float)src[i];
}

F16C static inline void narrow_f16c(half_t *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = (half_t)src[i];
}

#pragma GCC visibility pop

#endif
