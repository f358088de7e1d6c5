/* Lepton's float32 weight product: an ONNX Runtime custom operator (domain "ai.lepton", op "MatMulF32").
 *
 * Y = A W^T in float32 throughout (weights, activations, sums): what a float32 export's MatMul and Gemm compute,
 * with the weights packed for the vector units (lepton/runners/f32_graph.py packs them when the runner rewrites
 * the graph): panels of 16 outputs, each input's 16 weights side by side (64 bytes), so that one FMA advances 16
 * outputs by one input with the row's input broadcast. ONNX Runtime's MLAS reads a float32 weight matrix once per
 * 16-decode step's few rows at ~137 GFLOP/s and one row at ~28 GB/s here (benchmarks.products); a decode step's
 * rows here take each panel in one pass, every row's sums in registers.
 *
 * Two optional inputs come after the weights (ort.h): R float [..., N], Y = R + A W^T; G float [K], the RMS norm's
 * weight: A's rows normalized first, x g / sqrt(mean(x^2) + epsilon) (attribute epsilon, default 1e-5;
 * lepton/runners/norm_graph.py). Inputs: A float [..., K]; B float [ceil(N / 16), K, 16]. Attributes: K, N;
 * isa (optional): 0 = the best this processor runs, 1 = plain C, 2 = AVX2 + FMA, 3 = AVX-512F; gated (optional,
 * ort.h). Every
 * path computes, per output, acc = fma(a[k], w[k], acc) for k = 0, 1, 2, ... (one rounding a step): the paths
 * agree bit for bit.
 *
 * Work: the rows of A are laid out in tiles (input k of a tile's rows side by side: one pointer and constant
 * offsets for the broadcasts; a single row is read where it is), then each task computes one panel of 16 outputs
 * for up to 64 rows: a product of at most 16 rows (decodes) in one pass over the panel (16 accumulators), more
 * rows 16 at a time (their panel read again from the second-level cache). The panel is prefetched 4 KB ahead in
 * passes of more than PREFETCH_ROWS rows (with fewer the processor's prefetcher keeps up: one decode 14.7 -> 13.9 ms).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort.h"

enum { LANES = 16, ROW_CHUNK = 64, TILE_ROWS = 16, PREFETCH_BYTES = 4096 };
enum { F32_ISA_GENERIC = 1, F32_ISA_AVX2 = 2, F32_ISA_AVX512 = 3 };
enum { AVX2_ROWS = 6 }; /* AVX2: rows a pass, 2 x 6 accumulators, 2 weight registers and a broadcast of 16 */
#define OP "MatMulF32"
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

typedef struct FProduct FProduct;
typedef void (*FTileFn)(const FProduct *pr, int64_t panel, int64_t m0, int64_t m1);

typedef struct {
    int64_t k, n;
    int gated;
    float epsilon;
    FTileFn tile;
} FKernel;

struct FProduct {
    const float *a;
    const float *b;
    float *y;
    const float *tiles; /* the rows in tiles of tile_rows rows, [tiles, K, tile_rows]: row m's input k at
                         * tiles[(m / tile_rows) K tile_rows + k tile_rows + m % tile_rows] */
    int64_t rows, k, n, panels, chunks, tile_rows;
    const float *residual;
    int64_t gated, row0, panel0;
    FTileFn tile;
};

static int f32_runs(int isa) {
    __builtin_cpu_init();
    return isa == F32_ISA_GENERIC || (isa == F32_ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ||
           (isa == F32_ISA_AVX512 && __builtin_cpu_supports("avx512f"));
}

static int f32_best_isa(void) {
    return f32_runs(F32_ISA_AVX512) ? F32_ISA_AVX512 : f32_runs(F32_ISA_AVX2) ? F32_ISA_AVX2 : F32_ISA_GENERIC;
}

static inline const float *row_inputs(const FProduct *pr, int64_t m) {
    return pr->tiles + (m / pr->tile_rows) * pr->k * pr->tile_rows + m % pr->tile_rows;
}

static inline void store(const FProduct *pr, int64_t panel, int64_t m, const float *acc) { STORE_PANEL(pr, panel, m, acc); }

/* Plain C: one fma a step, in k's order (the vector path's arithmetic). */
static void tile_generic(const FProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    const float *w = pr->b + panel * pr->k * LANES;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = row_inputs(pr, m);
        float acc[LANES] = {0};
        for (int64_t j = 0; j < pr->k; j++) {
            const float xj = x[j * pr->tile_rows];
            for (int l = 0; l < LANES; l++) acc[l] = fmaf(xj, w[j * LANES + l], acc[l]);
        }
        store(pr, panel, m, acc);
    }
}

/* AVX-512F: the panel's 16 weights of input j (one load) times each of `mt` rows' input j (broadcast). */
static inline __attribute__((always_inline)) AVX512 void f32_rows(const FProduct *pr, int64_t panel, int64_t m, const int mt) {
    const float *w = pr->b + panel * pr->k * LANES;
    const float *x = row_inputs(pr, m);
    const int64_t stride = pr->tile_rows;
    __m512 acc[16];
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pr->k; j++, x += stride) {
        if (mt > PREFETCH_ROWS) _mm_prefetch((const char *)(w + j * LANES) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512 wj = _mm512_loadu_ps(w + j * LANES);
        for (int i = 0; i < mt; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), wj, acc[i]);
    }
    STORE_ROWS(pr, panel, m, acc, mt);
}

AVX512 static void tile_avx512(const FProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    ROWS_AT_A_TIME(f32_rows, pr, panel, m0, m1, TILE_ROWS);
}

/* AVX2 + FMA: the panel's 16 weights of input j as two 8-lane halves times each of `mt` rows' input j
 * (broadcast); at most AVX2_ROWS rows a pass (the registers hold no more), so a 16-decode step reads each
 * panel three times, the second and third from the cache. */
static inline __attribute__((always_inline)) AVX2 void f32_rows_avx2(const FProduct *pr, int64_t panel, int64_t m, const int mt) {
    const float *w = pr->b + panel * pr->k * LANES;
    const float *x = row_inputs(pr, m);
    const int64_t stride = pr->tile_rows;
    __m256 lo[FEW_ROWS], hi[FEW_ROWS];
    for (int i = 0; i < mt; i++) lo[i] = hi[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < pr->k; j++, x += stride) {
        if (mt > PREFETCH_ROWS) _mm_prefetch((const char *)(w + j * LANES) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(w + j * LANES), w1 = _mm256_loadu_ps(w + j * LANES + 8);
        for (int i = 0; i < mt; i++) {
            const __m256 xi = _mm256_broadcast_ss(x + i);
            lo[i] = _mm256_fmadd_ps(xi, w0, lo[i]);
            hi[i] = _mm256_fmadd_ps(xi, w1, hi[i]);
        }
    }
    float out[FEW_ROWS][LANES];
#pragma GCC unroll 6
    for (int i = 0; i < mt; i++) _mm256_storeu_ps(out[i], lo[i]), _mm256_storeu_ps(out[i] + 8, hi[i]);
    for (int i = 0; i < mt; i++) store(pr, panel, m + i, out[i]);
}

/* Rows [m0, m1) tile by tile (a pass's rows must share a tile: one pointer and constant offsets). */
AVX2 static void tile_avx2(const FProduct *pr, int64_t panel, int64_t m0, int64_t m1) {
    for (int64_t t0 = m0; t0 < m1;) {
        const int64_t t1 = (t0 / pr->tile_rows + 1) * pr->tile_rows < m1 ? (t0 / pr->tile_rows + 1) * pr->tile_rows : m1;
        FEW_ROWS_AT_A_TIME(f32_rows_avx2, pr, panel, t0, t1, AVX2_ROWS);
        t0 = t1;
    }
}

PRODUCT_TASK(FProduct)

typedef struct {
    const float *a;
    float *tiles;
    int64_t rows, k, tile_rows;
} Layout;

/* Tile `task`'s rows of A, input k of each side by side. */
static void layout_tile(void *data, size_t task) {
    const Layout *lt = data;
    const int64_t m0 = (int64_t)task * lt->tile_rows, m1 = range_end((int64_t)task, lt->tile_rows, lt->rows);
    float *tile = lt->tiles + m0 * lt->k;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = lt->a + m * lt->k;
        for (int64_t j = 0; j < lt->k; j++) tile[j * lt->tile_rows + (m - m0)] = x[j];
    }
}

/* ---- the operator ------------------------------------------------------------------------------ */

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const FKernel *kernel = kernel_data;
    int64_t a_dims[4], b_dims[4];
    size_t a_rank = 0;
    FProduct pr = {0};
    TRY(get_input(OP, 2, context, 0, (const void **)&pr.a, a_dims, (size_t)-1, &a_rank));
    TRY(get_input(OP, 2, context, 1, (const void **)&pr.b, b_dims, 3, NULL));
    pr.k = kernel->k, pr.n = kernel->n, pr.panels = (kernel->n + LANES - 1) / LANES;
    TRY(check_panels(OP, "B", b_dims, pr.panels, pr.k, LANES, 1, "rows of 16 weights", " values"));
    pr.gated = kernel->gated;
    TRY(product_output(OP, context, a_dims, a_rank, pr.k, pr.gated ? pr.n / 2 : pr.n, &pr.rows, &pr.y));
    TRY(residual_input(OP, context, 2, a_dims, a_rank, pr.n, pr.gated, &pr.residual));
    if (pr.rows == 0) return NULL;
    float *normed = NULL, *tiles = NULL;
    TRY(normalized_input(OP, context, 3, pr.rows, pr.k, kernel->epsilon, &pr.a, &normed));
    pr.tile_rows = pr.rows < TILE_ROWS ? pr.rows : TILE_ROWS;
    if (pr.tile_rows == 1) {
        pr.tiles = pr.a; /* NOTE: one row a tile: A's own layout */
    } else {
        const int64_t count = (pr.rows + pr.tile_rows - 1) / pr.tile_rows;
        if (!(tiles = malloc((size_t)(count * pr.tile_rows * pr.k) * sizeof(float)))) {
            free(normed);
            return out_of_memory(OP);
        }
        Layout lt = {.a = pr.a, .tiles = tiles, .rows = pr.rows, .k = pr.k, .tile_rows = pr.tile_rows};
        if (pr.rows * pr.k <= 32768) /* NOTE: as prepare_then_multiply: not worth waking the pool */
            for (int64_t t = 0; t < count; t++) layout_tile(&lt, (size_t)t);
        else
            parallel_for(context, layout_tile, (size_t)count, &lt);
        pr.tiles = tiles;
    }
    pr.tile = kernel->tile;
    pr.chunks = (pr.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    parallel_for(context, product_task, product_tasks(&pr), &pr);
    free(tiles);
    free(normed);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    FKernel *kernel = calloc(1, sizeof(FKernel));
    if (!kernel) return out_of_memory(OP);
    int isa = 0;
    OrtStatus *status = product_attributes(OP, info, 1, "K = %lld is not a positive number (at least %lld)", f32_runs,
                                           f32_best_isa(), "1 plain C, 2 AVX2 + FMA, 3 AVX-512F", &kernel->k, &kernel->n, &isa, &kernel->gated);
    if (!status) status = norm_epsilon(OP, info, &kernel->epsilon);
    if (status) {
        free(kernel);
        return status;
    }
    kernel->tile = isa == F32_ISA_AVX512 ? tile_avx512 : isa == F32_ISA_AVX2 ? tile_avx2 : tile_generic;
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) {
    (void)op, (void)index;
    return ELEMENT_FLOAT;
}

PRODUCT_OPERATOR(lepton_f32_matmul, OP, 4, input_type, create_kernel, compute);
