/* bfloat16 as Lepton's weight products round their activations (bf16_matmul.c, q4_matmul.c): float32 rows
 * to pairs of bfloat16 (the even input in the low half, what one vdpbf16ps lane multiplies), rounded as
 * vcvtne2ps2bf16 rounds (nearest even, a NaN quiet, a denormal flushed to a signed zero) on every path.
 */
#ifndef LEPTON_BF16_H
#define LEPTON_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

/* The operators' isa attribute: 1 plain C, 2 AVX2 + FMA (bfloat16 widened to float32, one FMA a product),
 * 3 AVX-512 BF16 (0: the best this processor runs). */
enum { BF16_ISA_GENERIC = 1, BF16_ISA_AVX2 = 2, BF16_ISA_AVX512 = 3 };

static inline int bf16_runs(int isa) {
    __builtin_cpu_init();
    return isa == BF16_ISA_GENERIC || (isa == BF16_ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ||
           (isa == BF16_ISA_AVX512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"));
}

static inline int bf16_best_isa(void) {
    return bf16_runs(BF16_ISA_AVX512) ? BF16_ISA_AVX512 : bf16_runs(BF16_ISA_AVX2) ? BF16_ISA_AVX2 : BF16_ISA_GENERIC;
}

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

/* x[0 .. k) (k even) as pairs p[0], p[stride], p[2 stride], ...: one row of a tile of `stride` rows whose pair j
 * lies side by side for all its rows (what the products' row tiles hold); stride 1: a row on its own. */
static inline void bf16_pairs_strided(const float *x, uint32_t *p, int64_t k, int64_t stride) {
    for (int64_t i = 0; i < k; i += 2) p[i / 2 * stride] = (uint32_t)to_bf16(x[i]) | (uint32_t)to_bf16(x[i + 1]) << 16;
}

/* x[from .. k) (from and k even) as bfloat16 pairs p[from / 2 ..). */
static inline void bf16_pairs(const float *x, uint32_t *p, int64_t from, int64_t k) {
    bf16_pairs_strided(x + from, p + from / 2, k - from, 1);
}

/* bf16_pairs with vcvtne2ps2bf16, 32 inputs at a time (the same bits). */
static inline BF16 void bf16_pairs_avx512(const float *x, uint32_t *p, int64_t k) {
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(p + i / 2), (__m512i)h);
    }
    bf16_pairs(x, p, i, k);
}

/* bf16_pairs_strided with vcvtne2ps2bf16, 32 inputs at a time (the same bits). */
static inline BF16 void bf16_pairs_strided_avx512(const float *x, uint32_t *p, int64_t k, int64_t stride) {
    if (stride == 1) {
        bf16_pairs_avx512(x, p, k);
        return;
    }
    int64_t i = 0;
    uint32_t pairs[16];
    for (; i + 32 <= k; i += 32) {
        _mm512_storeu_si512((void *)pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
        for (int l = 0; l < 16; l++) p[(i / 2 + l) * stride] = pairs[l];
    }
    bf16_pairs_strided(x + i, p + i / 2 * stride, k - i, stride);
}

#endif
