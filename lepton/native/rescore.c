/* Lepton's rescore of an approximate lm_head's candidates: an ONNX Runtime custom operator (domain "ai.lepton",
 * op "TopKRescore"), after a q8_0 / q4_1 export's 8-bit head (lepton/runners/rescore_graph.py) and after the 4-bit
 * draft of a head in the draft's then branch (lepton/runners/draft_head.py).
 *
 * Y = X, except each row's k largest entries of X (the candidates: X is a cheap head's logits), which become
 * the exact logits dot(h, T[i]) of the head the draft stands in for: h the row's hidden state, T the head's
 * float32 table [N, K] (the tied embedding's rows). What the graph did with TopK, Gather, MatMul and
 * ScatterElements (and, before them, SimplifiedLayerNormalization, Mul and two Casts to bfloat16), in one
 * node and one task a row (SmolLM2's head, 2 threads: one row 0.062 ms in those nodes against 0.041 here, 16 rows
 * 0.735 against 0.382; docs/performance.md).
 *
 * Inputs: X float [..., N]; H float [..., K] (the same leading dimensions); T float [N, K]; then optional
 * S float [K], a column scale (h = H S: a smoothed 8-bit head's weight is T S), and G float [K], the final RMS
 * norm's weight (h = norm(H) first, as the products normalize it, ort.h's norm_rows; epsilon attribute,
 * default 1e-5). Attributes: k (candidates, at least 1; all N when N is smaller), bfloat16 (0 or 1: h and the
 * rows rounded to bfloat16, nearest even, as MatMulBF16 rounds them, before the float32 dot).
 * Output Y float [..., N]. Ties among the k-th largest are broken by position (the first ones kept); a NaN
 * in X is never a candidate (and stays in Y, where the sampler's check finds it). Each dot is summed in
 * float32 in a fixed order per build (vectorized): it may differ from the head's own kernels in the last bits.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "ort.h"

#define OP "TopKRescore"
enum { INPUTS = 5, SCAN = 16 };

typedef struct {
    int64_t k;
    int bfloat16;
    float epsilon;
} RescoreKernel;

typedef struct {
    const float *x, *h, *table, *scale;
    float *y;
    float *work; /* [rows, K]: each row's h, scaled and rounded */
    int64_t *ids; /* [rows, k]: each row's candidates (a min-heap while they are chosen) */
    float *heap;  /* [rows, k]: their values in X */
    int64_t n, kdim, k;
    int bfloat16;
} Rescore;

/* The min-heap of `count` (value, id) pairs restored below position i. */
static void sift_down(float *value, int64_t *id, int64_t count, int64_t i) {
    for (;;) {
        int64_t least = i, left = 2 * i + 1, right = left + 1;
        if (left < count && value[left] < value[least]) least = left;
        if (right < count && value[right] < value[least]) least = right;
        if (least == i) return;
        const float v = value[i];
        const int64_t d = id[i];
        value[i] = value[least], id[i] = id[least];
        value[least] = v, id[least] = d;
        i = least;
    }
}

/* The k largest of x[0 .. n) (no NaN) into id (and value): the first k non-NaN entries heaped, then every later
 * one larger than the heap's least replaces it; SCAN entries at a time are first compared with that least at
 * once (vectorized), most of a row being smaller. Returns how many were found (fewer than k: NaNs). */
CLONED
static int64_t top_k(const float *x, int64_t n, int64_t k, float *value, int64_t *id) {
    int64_t count = 0, i = 0;
    for (; i < n && count < k; i++)
        if (x[i] == x[i]) value[count] = x[i], id[count++] = i;
    for (int64_t j = count / 2 - 1; j >= 0; j--) sift_down(value, id, count, j);
    if (count < k) return count;
    for (; i < n && i % SCAN; i++)
        if (x[i] > value[0]) value[0] = x[i], id[0] = i, sift_down(value, id, k, 0);
    for (; i + SCAN <= n; i += SCAN) {
        const float least = value[0];
        int above = 0;
        for (int l = 0; l < SCAN; l++) above |= x[i + l] > least;
        if (!above) continue;
        for (int l = 0; l < SCAN; l++)
            if (x[i + l] > value[0]) value[0] = x[i + l], id[0] = i + l, sift_down(value, id, k, 0);
    }
    for (; i < n; i++)
        if (x[i] > value[0]) value[0] = x[i], id[0] = i, sift_down(value, id, k, 0);
    return k;
}

CLONED
static float dot(const float *a, const float *b, int64_t k) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < k; j++) sum += a[j] * b[j];
    return sum;
}

/* The same dot with b's values rounded to bfloat16 first (a already rounded). */
CLONED
static float dot_bf16(const float *a, const float *b, int64_t k) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < k; j++) sum += a[j] * from_bf16(to_bf16(b[j]));
    return sum;
}

static void rescore_row(void *data, size_t task) {
    const Rescore *rs = data;
    const int64_t m = (int64_t)task, n = rs->n, kdim = rs->kdim;
    const float *x = rs->x + m * n;
    float *y = rs->y + m * n, *h = rs->work + m * kdim, *value = rs->heap + m * rs->k;
    int64_t *id = rs->ids + m * rs->k;
    memcpy(y, x, (size_t)n * sizeof(float));
    for (int64_t j = 0; j < kdim; j++) {
        const float v = rs->scale ? rs->h[m * kdim + j] * rs->scale[j] : rs->h[m * kdim + j];
        h[j] = rs->bfloat16 ? from_bf16(to_bf16(v)) : v;
    }
    const int64_t found = top_k(x, n, rs->k, value, id);
    for (int64_t c = 0; c < found; c++) {
        const float *row = rs->table + id[c] * kdim;
        y[id[c]] = rs->bfloat16 ? dot_bf16(h, row, kdim) : dot(h, row, kdim);
    }
}

static OrtStatus *compute(void *kernel_data, OrtKernelContext *context) {
    const RescoreKernel *kernel = kernel_data;
    int64_t x_dims[4], h_dims[4], t_dims[4];
    size_t x_rank = 0, h_rank = 0;
    Rescore rs = {.bfloat16 = kernel->bfloat16};
    TRY(get_input(OP, INPUTS, context, 0, (const void **)&rs.x, x_dims, (size_t)-1, &x_rank));
    TRY(get_input(OP, INPUTS, context, 1, (const void **)&rs.h, h_dims, (size_t)-1, &h_rank));
    TRY(get_input(OP, INPUTS, context, 2, (const void **)&rs.table, t_dims, 2, NULL));
    rs.n = t_dims[0], rs.kdim = t_dims[1];
    if (x_rank < 1 || x_dims[x_rank - 1] != rs.n)
        return invalid(OP ": X has %lld values per row, expected the table's N = %lld", x_rank ? x_dims[x_rank - 1] : 0, rs.n);
    if (h_rank != x_rank || h_dims[h_rank - 1] != rs.kdim)
        return invalid(OP ": H has %lld values per row, expected the table's K = %lld", h_rank ? h_dims[h_rank - 1] : 0,
                       rs.kdim);
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_rank; i++) {
        if (h_dims[i] != x_dims[i]) return invalid(OP ": H's leading dimensions differ from X's (%lld against %lld)", h_dims[i], x_dims[i]);
        rows *= x_dims[i];
    }
    TRY(vector_input(OP, context, 3, rs.kdim, "the column scale", &rs.scale));
    TRY(get_output(context, 0, x_dims, x_rank, &rs.y));
    if (rows == 0) return NULL;
    float *normed = NULL;
    TRY(normalized_input(OP, context, 4, rows, rs.kdim, kernel->epsilon, &rs.h, &normed));
    rs.k = kernel->k < rs.n ? kernel->k : rs.n;
    char *buffer = malloc((size_t)(rows * rs.kdim) * sizeof(float) + (size_t)(rows * rs.k) * (sizeof(float) + sizeof(int64_t)));
    if (!buffer) {
        free(normed);
        return out_of_memory(OP);
    }
    rs.ids = (int64_t *)buffer;
    rs.heap = (float *)(rs.ids + rows * rs.k);
    rs.work = rs.heap + rows * rs.k;
    parallel_for(context, rescore_row, (size_t)rows, &rs);
    free(buffer);
    free(normed);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *ort_api, const OrtKernelInfo *info, void **out) {
    (void)op, (void)ort_api;
    RescoreKernel *kernel = calloc(1, sizeof(RescoreKernel));
    if (!kernel) return out_of_memory(OP);
    kernel->k = optional_int(info, "k", 0);
    const int64_t bfloat16 = optional_int(info, "bfloat16", 0);
    OrtStatus *status = NULL;
    if (kernel->k < 1)
        status = invalid(OP ": k = %lld, expected at least %lld candidates", (long long)kernel->k, 1);
    else if (bfloat16 != 0 && bfloat16 != 1)
        status = invalid(OP ": bfloat16 = %lld, expected 0 (float32 rows) or %lld (rounded to bfloat16)", (long long)bfloat16, 1);
    if (!status) status = norm_epsilon(OP, info, &kernel->epsilon);
    if (status) {
        free(kernel);
        return status;
    }
    kernel->bfloat16 = (int)bfloat16;
    *out = kernel;
    return NULL;
}

static int input_type(const CustomOp *op, size_t index) { (void)op, (void)index; return ELEMENT_FLOAT; }

static int characteristic(const CustomOp *op, size_t index) { (void)op; return index >= 3 ? OPTIONAL : REQUIRED; }

OPERATOR_WITH(lepton_topk_rescore, OP, INPUTS, 1, input_type, float_output, characteristic, create_kernel, compute);
