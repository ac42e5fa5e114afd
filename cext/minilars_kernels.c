/* minilars C core. See minilars_kernels.h for what each kernel reads and writes; the
 * NumPy twins (minilars/ops/lars_gate.py, minilars/kernels.py) are the specification.
 *
 * Portable C99 plus, when the compiler is GCC or Clang, vector extensions for the
 * LARS loops and the dot products; F16C (x86) or __fp16 (ARM) for float16 and AVX-512F
 * or AVX2 intrinsics (x86) for GGUF blocks when the target has them, plain C loops
 * otherwise; OpenMP is optional (the build script tests for it).
 */
#include "minilars_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
/* 64-byte vector values only live inside this file (static inline helpers), so the
 * note about their calling convention without AVX-512 does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <math.h>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#else
#define THREAD_ID() 0
#endif

int minilars_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int minilars_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ------------------------------------------------------------------ small helpers */

#define CHUNK 16    /* floats per inner vector step (one AVX-512 or two AVX2 registers) */
#define RGROUP 4    /* ranks handled together in the x U pass */

#if (defined(__GNUC__) || defined(__clang__)) && !defined(MINILARS_PORTABLE_C)
#define HAVE_VECTOR_EXT 1
/* CHUNK floats as one value; the compiler maps it onto the machine's registers (one
 * AVX-512 register, two AVX ones, four SSE/NEON ones). Accumulators of this type stay in
 * registers, where a float array would make every add wait on a store. */
typedef float chunkf __attribute__((vector_size(CHUNK * 4)));

static inline chunkf load_chunk(const float *p)
{
    chunkf v;
    memcpy(&v, p, sizeof(v));          /* unaligned load */
    return v;
}

/* Sum of the CHUNK (16) lanes as a tree of shuffles and adds: depth 4, not 15. */
typedef int chunki __attribute__((vector_size(CHUNK * 4)));
#if defined(__clang__)
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (chunki){__VA_ARGS__})
#endif

static inline float chunk_sum(const chunkf *v)
{
    chunkf t = *v;
    t += SHUFFLE(t, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    t += SHUFFLE(t, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    t += SHUFFLE(t, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    t += SHUFFLE(t, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
    return t[0];
}
#endif

/* sum_i a[i] * b[i] over n values: 4 x CHUNK partial sums (independent add chains). */
static inline float dot_f32(const float *restrict a, const float *restrict b, int64_t n)
{
    int64_t i = 0;
    float total = 0.0f;
#ifdef HAVE_VECTOR_EXT
    chunkf p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};
    for (; i + 4 * CHUNK <= n; i += 4 * CHUNK) {
        p0 += load_chunk(a + i) * load_chunk(b + i);
        p1 += load_chunk(a + i + CHUNK) * load_chunk(b + i + CHUNK);
        p2 += load_chunk(a + i + 2 * CHUNK) * load_chunk(b + i + 2 * CHUNK);
        p3 += load_chunk(a + i + 3 * CHUNK) * load_chunk(b + i + 3 * CHUNK);
    }
    for (; i + CHUNK <= n; i += CHUNK)
        p0 += load_chunk(a + i) * load_chunk(b + i);
    const chunkf p = (p0 + p1) + (p2 + p3);
    total = chunk_sum(&p);
#endif
    for (; i < n; i++)
        total += a[i] * b[i];
    return total;
}

/* Ut (rank_padded, in) = U^T, rows beyond rank zero; rank_padded = rank rounded up to
 * RGROUP. The kernels work on U^T so every inner loop runs along `in`, contiguous. */
static void transpose_U(const float *U, int64_t in_features, int64_t rank, int64_t rank_padded,
                        float *Ut)
{
    memset(Ut, 0, sizeof(float) * (size_t)(rank_padded * in_features));
    for (int64_t i = 0; i < in_features; i++)
        for (int64_t k = 0; k < rank; k++)
            Ut[k * in_features + i] = U[i * rank + k];
}

/* xU[k] = sum_i x[i] Ut[k, i] for k < rank_padded: RGROUP ranks per pass over x. */
static void row_times_U(const float *restrict x, const float *restrict Ut, int64_t n,
                        int64_t rank_padded, float *restrict xU)
{
    for (int64_t k0 = 0; k0 < rank_padded; k0 += RGROUP) {
        const float *restrict u = Ut + k0 * n;
        float total[RGROUP] = {0};
        int64_t i = 0;
#ifdef HAVE_VECTOR_EXT
        chunkf acc[RGROUP];
        memset(acc, 0, sizeof(acc));
        for (; i + CHUNK <= n; i += CHUNK) {
            const chunkf xc = load_chunk(x + i);
            for (int g = 0; g < RGROUP; g++)
                acc[g] += xc * load_chunk(u + g * n + i);
        }
        for (int g = 0; g < RGROUP; g++)
            total[g] = chunk_sum(&acc[g]);
#endif
        for (int g = 0; g < RGROUP; g++) {
            for (int64_t t = i; t < n; t++)
                total[g] += x[t] * u[g * n + t];
            xU[k0 + g] = total[g];
        }
    }
}

/* The gate of one row from its x: returns rstd; writes zU (rank_padded), s (g), gate (g). */
static float lars_row_gate(const float *xr, const float *Ut, const float *V,
                           float alpha, float eps, int64_t in_features, int64_t rank,
                           int64_t rank_padded, int64_t groups,
                           float *zU, float *s, float *gate)
{
    const float ms = dot_f32(xr, xr, in_features) / (float)in_features;
    const float rstd = 1.0f / sqrtf(ms + eps);
    row_times_U(xr, Ut, in_features, rank_padded, zU);
    for (int64_t k = 0; k < rank_padded; k++)
        zU[k] *= rstd;                                   /* zU = (x rstd) U */
    for (int64_t j = 0; j < groups; j++)
        s[j] = 0.0f;
    for (int64_t k = 0; k < rank; k++) {                 /* s = zU V, V (rank, g) */
        const float zk = zU[k];
        const float *Vk = V + k * groups;
        for (int64_t j = 0; j < groups; j++)
            s[j] += zk * Vk[j];
    }
    for (int64_t j = 0; j < groups; j++)
        gate[j] = 1.0f + alpha * s[j];
    return rstd;
}

static int64_t round_up(int64_t n, int64_t multiple)
{
    return (n + multiple - 1) / multiple * multiple;
}

/* ---------------------------------------------------------------- LARS forward */

static int lars_shape_ok(int64_t in_features, int64_t rank, int64_t block, int threads)
{
    return in_features >= 1 && rank >= 1 && block >= 1 && in_features % block == 0 && threads >= 1;
}

int64_t minilars_lars_forward_workspace(int64_t in_features, int64_t rank, int64_t block,
                                        int threads)
{
    if (!lars_shape_ok(in_features, rank, block, threads))
        return -1;
    const int64_t groups = in_features / block, rank_padded = round_up(rank, RGROUP);
    /* Ut (rank_padded, in) | per thread: zU (rank_padded), s (g), gate (g) */
    return rank_padded * in_features + (int64_t)threads * (rank_padded + 2 * groups);
}

int minilars_lars_forward(const float *x, const float *U, const float *V,
                          float alpha, float eps,
                          int64_t rows, int64_t in_features, int64_t rank, int64_t block,
                          float *x_tilde, int threads, float *workspace, int64_t workspace_floats)
{
    if (rows < 1 || !lars_shape_ok(in_features, rank, block, threads)
        || workspace_floats < minilars_lars_forward_workspace(in_features, rank, block, threads))
        return MINILARS_ERR_ARGS;
    const int64_t groups = in_features / block;
    const int64_t rank_padded = round_up(rank, RGROUP);
    float *Ut = workspace;
    transpose_U(U, in_features, rank, rank_padded, Ut);
    float *per_thread = Ut + rank_padded * in_features;

#pragma omp parallel num_threads(threads)
    {
        float *zU = per_thread + (int64_t)THREAD_ID() * (rank_padded + 2 * groups);
        float *s = zU + rank_padded, *gate = s + groups;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < rows; n++) {
            const float *xr = x + n * in_features;
            float *out = x_tilde + n * in_features;
            lars_row_gate(xr, Ut, V, alpha, eps, in_features, rank, rank_padded, groups,
                          zU, s, gate);
            for (int64_t j = 0; j < groups; j++) {
                const float gj = gate[j];
                const float *restrict xb = xr + j * block;
                float *restrict ob = out + j * block;
                for (int64_t t = 0; t < block; t++)
                    ob[t] = xb[t] * gj;
            }
        }
    }
    return MINILARS_OK;
}

/* ---------------------------------------------------------------- LARS backward */

#define ROW_TILE 4   /* rows whose dU and dz updates share one pass over U and dU */

/* Per-row part of the backward, all O(rank + g) work: recomputes the gate, then
 * dgate, ds, dalpha (returned), dV_t += outer(zU, ds), dzU = V ds. Writes gate, dzU and
 * the two scalars the row's dx needs: *rstd_out and *mean_dz_z_out = (dzU . zU) / in. */
static double lars_row_small_backward(const float *xr, const float *dxt, const float *Ut,
                                      const float *V, float alpha, float eps,
                                      int64_t in_features, int64_t rank, int64_t rank_padded,
                                      int64_t groups, int64_t block, float *zU, float *s,
                                      float *gate, float *ds, float *dzU, float *dV_t,
                                      float *rstd_out, float *mean_dz_z_out)
{
    const float rstd = lars_row_gate(xr, Ut, V, alpha, eps, in_features, rank,
                                     rank_padded, groups, zU, s, gate);
    /* dgate[j] = sum_t dxt * x over block j; ds = alpha dgate; dalpha += dgate . s */
    double dalpha_row = 0.0;
    for (int64_t j = 0; j < groups; j++) {
        const float dgate = dot_f32(dxt + j * block, xr + j * block, block);
        dalpha_row += (double)dgate * (double)s[j];
        ds[j] = alpha * dgate;
    }
    /* dV += outer(zU, ds);  dzU = V ds;  (dzU . zU) */
    float dzU_dot_zU = 0.0f;
    for (int64_t k = 0; k < rank; k++) {
        const float *Vk = V + k * groups;
        float *dVk = dV_t + k * groups;
        const float zk = zU[k];
        float dzk = 0.0f;
        for (int64_t j = 0; j < groups; j++) {
            dVk[j] += zk * ds[j];
            dzk += Vk[j] * ds[j];
        }
        dzU[k] = dzk;
        dzU_dot_zU += dzk * zk;
    }
    *rstd_out = rstd;
    /* mean(dz z) over the row = (dzU . zU) / in, since dz . z = (U dzU) . (x rstd) */
    *mean_dz_z_out = dzU_dot_zU / (float)in_features;
    return dalpha_row;
}

/* The (in)-long part for a tile of `tile_rows` rows (<= ROW_TILE), one pass over U and dU:
 *   dU^T[k, i] += sum_rows coef[row][k] x[row][i]      coef = rstd dzU (so this is z^T dzU)
 *   dz[row][i]  = sum_k dzU[row][k] U^T[k, i]          only when dz is not NULL
 * x_rows[row] points at each row of x; dzU rows are rank_padded apart; dz rows in apart. */
static void lars_tile_long_backward(const float *const *x_rows, int tile_rows,
                                    const float *coef, const float *dzU, const float *Ut,
                                    int64_t in_features, int64_t rank, int64_t rank_padded,
                                    float *dUt_t, float *dz)
{
    int64_t i = 0;
#ifdef HAVE_VECTOR_EXT
    for (; i + CHUNK <= in_features; i += CHUNK) {
        chunkf xc[ROW_TILE], dzc[ROW_TILE];
        for (int r = 0; r < ROW_TILE; r++) {
            xc[r] = r < tile_rows ? load_chunk(x_rows[r] + i) : (chunkf){0};
            dzc[r] = (chunkf){0};
        }
        for (int64_t k = 0; k < rank; k++) {
            const chunkf u = load_chunk(Ut + k * in_features + i);
            chunkf d = load_chunk(dUt_t + k * in_features + i);
            for (int r = 0; r < ROW_TILE; r++) {
                d += coef[r * rank_padded + k] * xc[r];
                dzc[r] += dzU[r * rank_padded + k] * u;
            }
            memcpy(dUt_t + k * in_features + i, &d, sizeof(d));
        }
        if (dz)
            for (int r = 0; r < tile_rows; r++)
                memcpy(dz + r * in_features + i, &dzc[r], sizeof(dzc[r]));
    }
#endif
    for (; i < in_features; i++) {           /* the tail (or everything, without vectors) */
        for (int r = 0; r < tile_rows; r++)
            if (dz)
                dz[r * in_features + i] = 0.0f;
        for (int64_t k = 0; k < rank; k++) {
            const float u = Ut[k * in_features + i];
            float d = dUt_t[k * in_features + i];
            for (int r = 0; r < tile_rows; r++) {
                d += coef[r * rank_padded + k] * x_rows[r][i];
                if (dz)
                    dz[r * in_features + i] += dzU[r * rank_padded + k] * u;
            }
            dUt_t[k * in_features + i] = d;
        }
    }
}

/* per-tile scratch of one thread: zU, dzU, coef (ROW_TILE, rank_padded); s, gate, ds (g);
 * gates (ROW_TILE, g); dz (ROW_TILE, in) */
static int64_t backward_tile_floats(int64_t in_features, int64_t rank_padded, int64_t groups)
{
    return 3 * ROW_TILE * rank_padded + 3 * groups + ROW_TILE * groups + ROW_TILE * in_features;
}

int64_t minilars_lars_backward_workspace(int64_t in_features, int64_t rank, int64_t block,
                                         int threads)
{
    if (!lars_shape_ok(in_features, rank, block, threads))
        return -1;
    const int64_t groups = in_features / block, rank_padded = round_up(rank, RGROUP);
    /* Ut | per thread: dU^T and dV accumulators, dalpha (a double = 2 floats), tile scratch */
    return rank_padded * in_features
           + (int64_t)threads * (rank * in_features + rank * groups + 2
                                 + backward_tile_floats(in_features, rank_padded, groups));
}

int minilars_lars_backward(const float *dx_tilde, const float *x,
                           const float *U, const float *V, float alpha, float eps,
                           int64_t rows, int64_t in_features, int64_t rank, int64_t block,
                           float *dx, float *dU, float *dV, float *dalpha,
                           int threads, float *workspace, int64_t workspace_floats)
{
    if (rows < 1 || !lars_shape_ok(in_features, rank, block, threads)
        || workspace_floats < minilars_lars_backward_workspace(in_features, rank, block, threads))
        return MINILARS_ERR_ARGS;
    const int64_t groups = in_features / block;
    const int64_t rank_padded = round_up(rank, RGROUP);
    const int64_t n_dU = rank * in_features, n_dV = rank * groups, n_acc = n_dU + n_dV;
    const int64_t per_tile = backward_tile_floats(in_features, rank_padded, groups);
    float *Ut = workspace;
    transpose_U(U, in_features, rank, rank_padded, Ut);
    /* per-thread accumulators [thread][dU^T (rank, in) | dV (rank, g)], then dalpha */
    float *acc_all = Ut + rank_padded * in_features;
    float *dalpha_all = acc_all + (int64_t)threads * n_acc;          /* threads doubles */
    float *tile_scratch = dalpha_all + 2 * (int64_t)threads;
    memset(acc_all, 0, sizeof(float) * (size_t)(threads * n_acc + 2 * threads));
    const int64_t tiles = (rows + ROW_TILE - 1) / ROW_TILE;

#pragma omp parallel num_threads(threads)
    {
        const int tid = THREAD_ID();
        float *dUt_t = acc_all + (int64_t)tid * n_acc;            /* (rank, in) */
        float *dV_t = dUt_t + n_dU;                               /* (rank, g) */
        double dalpha_t = 0.0;
        float *scratch = tile_scratch + (int64_t)tid * per_tile;
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < tiles; tile++) {
            float *zU = scratch, *dzU = zU + ROW_TILE * rank_padded;
            float *coef = dzU + ROW_TILE * rank_padded;
            float *s = coef + ROW_TILE * rank_padded, *gate_row = s + groups, *ds = gate_row + groups;
            float *gates = ds + groups, *dz = gates + ROW_TILE * groups;
            const int64_t n0 = tile * ROW_TILE;
            const int tile_rows = (int)(rows - n0 < ROW_TILE ? rows - n0 : ROW_TILE);
            const float *x_rows[ROW_TILE];
            float rstd[ROW_TILE], mean_dz_z[ROW_TILE];
            memset(dzU, 0, sizeof(float) * (size_t)(2 * ROW_TILE * rank_padded));  /* dzU, coef */
            for (int r = 0; r < tile_rows; r++) {
                const float *xr = x + (n0 + r) * in_features;
                const float *dxt = dx_tilde + (n0 + r) * in_features;
                x_rows[r] = xr;
                dalpha_t += lars_row_small_backward(
                    xr, dxt, Ut, V, alpha, eps, in_features, rank, rank_padded, groups, block,
                    zU + r * rank_padded, s, gate_row, ds, dzU + r * rank_padded, dV_t,
                    &rstd[r], &mean_dz_z[r]);
                memcpy(gates + r * groups, gate_row, sizeof(float) * (size_t)groups);
                for (int64_t k = 0; k < rank; k++)
                    coef[r * rank_padded + k] = rstd[r] * dzU[r * rank_padded + k];
            }
            lars_tile_long_backward(x_rows, tile_rows, coef, dzU, Ut, in_features, rank,
                                    rank_padded, dUt_t, dx ? dz : NULL);
            if (!dx)
                continue;
            /* dx = gate dxt + rstd (dz - z mean_dz_z), z = x rstd */
            for (int r = 0; r < tile_rows; r++) {
                const float *restrict xr = x_rows[r];
                const float *restrict dxt = dx_tilde + (n0 + r) * in_features;
                const float *restrict dzr = dz + r * in_features;
                float *restrict dxr = dx + (n0 + r) * in_features;
                const float rs = rstd[r], x_coef = rstd[r] * rstd[r] * mean_dz_z[r];
                for (int64_t j = 0; j < groups; j++) {
                    const float gj = gates[r * groups + j];
                    for (int64_t t = j * block; t < (j + 1) * block; t++)
                        dxr[t] = gj * dxt[t] + rs * dzr[t] - x_coef * xr[t];
                }
            }
        }
        memcpy(dalpha_all + 2 * tid, &dalpha_t, sizeof(double));
    }

    {
        /* reduce the per-thread accumulators in thread order (deterministic);
         * dU (in, rank) is written from the transposed accumulators. */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < in_features; i++)
            for (int64_t k = 0; k < rank; k++) {
                float total = 0.0f;
                for (int t = 0; t < threads; t++)
                    total += acc_all[(size_t)t * (size_t)n_acc + (size_t)(k * in_features + i)];
                dU[i * rank + k] = total;
            }
        for (int64_t e = 0; e < n_dV; e++) {
            float total = 0.0f;
            for (int t = 0; t < threads; t++)
                total += acc_all[(size_t)t * (size_t)n_acc + (size_t)(n_dU + e)];
            dV[e] = total;
        }
        double total = 0.0;
        for (int t = 0; t < threads; t++) {
            double part;
            memcpy(&part, dalpha_all + 2 * t, sizeof(double));
            total += part;
        }
        dalpha[0] = (float)total;
    }
    return MINILARS_OK;
}

/* ------------------------------------------------------- frozen weights: dequantize
 *
 * A frozen weight W (rows, cols) is held in one of the MINILARS_WEIGHT_* formats, row
 * after row. Products with it are driven from minilars/kernels.py: a tile of W is
 * dequantized here into a float32 buffer the caller owns, and NumPy's BLAS multiplies by
 * it. A format is a block of `cols` weights in `bytes` bytes (one value for F16/BF16, 32
 * for GGUF's Q8_0/Q4_0/Q4_1) and one case in dequantize_run.
 *
 * The GGUF blocks must dequantize to exactly the float32 values of minilars.quant.dequantize
 * (and so of the gguf package): the same float32 operations in the same order, d * q for
 * Q8_0 and Q4_0, and for Q4_1 (d * q) + m rounded twice. The module is built with
 * -ffp-contract=off (cext/build_cffi.py) so that no compiler fuses that into one FMA,
 * whether written in C or with intrinsics (GCC's intrinsics are plain vector arithmetic,
 * which it contracts by default in GNU C mode).
 */

typedef struct {
    int64_t cols, bytes;          /* weights per block along a row, bytes per block */
} block_layout;

#define QBLOCK 32                 /* weights per GGUF block */
#define Q8_0_BYTES 34             /* f16 d, int8 q[32]                              */
#define Q4_0_BYTES 18             /* f16 d, 16 bytes: q[j] low nibble, q[j+16] high */
#define Q4_1_BYTES 20             /* f16 d, f16 m, 16 bytes of nibbles as Q4_0      */

static block_layout weight_block(int weight_format)
{
    switch (weight_format) {
    case MINILARS_WEIGHT_F16:
    case MINILARS_WEIGHT_BF16:
        return (block_layout){1, 2};
    case MINILARS_WEIGHT_Q8_0:
        return (block_layout){QBLOCK, Q8_0_BYTES};
    case MINILARS_WEIGHT_Q4_0:
        return (block_layout){QBLOCK, Q4_0_BYTES};
    case MINILARS_WEIGHT_Q4_1:
        return (block_layout){QBLOCK, Q4_1_BYTES};
    default:
        return (block_layout){0, 0};
    }
}

/* IEEE binary16 bits -> float32 (exact: every half is a float). The portable path. */
static inline float f16_bits_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;                                   /* +-0 */
        } else {                                           /* subnormal: m * 2^-24 */
            float value = (float)mantissa * 5.9604644775390625e-8f;
            memcpy(&bits, &value, 4);
            bits |= sign;
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);      /* inf, nan */
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* The float16 at p (2 bytes, any alignment, host byte order as NumPy's view reads it):
 * a GGUF block's scale d or minimum m. */
static inline float f16_at(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__ARM_FP16_FORMAT_IEEE)
    __fp16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#else
    return f16_bits_to_f32(h);
#endif
}

/* dst[i] = float16 src[i], i < n: F16C on x86 (8 at a time: the AVX-512 form, 16 at a
 * time, measured 20% slower on a Xeon Sapphire Rapids), __fp16 on ARM, else the bit
 * manipulation above. */
static void f16_run(const uint16_t *restrict src, int64_t n, float *restrict dst)
{
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#elif defined(__ARM_FP16_FORMAT_IEEE)
    for (; i < n; i++) {
        __fp16 h;
        memcpy(&h, src + i, 2);
        dst[i] = (float)h;
    }
#endif
    for (; i < n; i++)
        dst[i] = f16_bits_to_f32(src[i]);
}

/* dst[i] = bfloat16 src[i], i < n: the bits are the top half of a float32 (the compiler
 * vectorises the shift). */
static void bf16_run(const uint16_t *restrict src, int64_t n, float *restrict dst)
{
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(dst + i, &bits, 4);
    }
}

/* The GGUF block loops, `nblocks` consecutive blocks into dst (nblocks * 32 floats).
 * x86 with AVX-512F or AVX2 converts 16 or 8 weights per instruction with intrinsics
 * (measured 1.7x (Q4_1) to 2.7x (Q4_0) faster than GCC's vectorisation of the plain loops
 * on a Sapphire Rapids core; for Q8_0 the plain loop vectorises as well). Elsewhere (ARM,
 * MINILARS_PORTABLE=1, other compilers) the plain loops, which compilers vectorise. Both
 * compute the same float32 operations, so they give the same bits. */
#if defined(__AVX512F__) && !defined(MINILARS_PORTABLE_C)
#define QUANT_AVX512 1
#elif defined(__AVX2__) && !defined(MINILARS_PORTABLE_C)
#define QUANT_AVX2 1
#endif

/* Q8_0: w[j] = d * q[j], q int8. */
static void q8_0_run(const uint8_t *restrict block, int64_t nblocks, float *restrict dst)
{
    for (int64_t b = 0; b < nblocks; b++, block += Q8_0_BYTES, dst += QBLOCK) {
        const float d = f16_at(block);
        const int8_t *q = (const int8_t *)(block + 2);
#if defined(QUANT_AVX512)
        const __m512 vd = _mm512_set1_ps(d);
        for (int j = 0; j < QBLOCK; j += 16) {
            const __m512i qi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j)));
            _mm512_storeu_ps(dst + j, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(qi)));
        }
#elif defined(QUANT_AVX2)
        const __m256 vd = _mm256_set1_ps(d);
        for (int j = 0; j < QBLOCK; j += 8) {
            const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j)));
            _mm256_storeu_ps(dst + j, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(qi)));
        }
#else
        for (int j = 0; j < QBLOCK; j++)
            dst[j] = d * (float)q[j];
#endif
    }
}

/* Q4_0 (offset 8, m unused) and Q4_1 (offset 0, m the block's minimum at bytes 2..3):
 * w[j] = d * (float)(nibble - offset) (+ m for Q4_1, a second rounding), nibble j of the
 * block: the low nibble of byte j for j < 16, the high nibble of byte j - 16 after. */
static inline void q4_run(const uint8_t *restrict block, int64_t nblocks, int has_min,
                          float *restrict dst)
{
    const int64_t bytes = has_min ? Q4_1_BYTES : Q4_0_BYTES;
    const int offset = has_min ? 0 : 8;
    for (int64_t b = 0; b < nblocks; b++, block += bytes, dst += QBLOCK) {
        const float d = f16_at(block);
        const float m = has_min ? f16_at(block + 2) : 0.0f;
        const uint8_t *q = block + (has_min ? 4 : 2);
#if defined(QUANT_AVX512)
        const __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        const __m512i off = _mm512_set1_epi32(offset);
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
        __m512 lo = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(
            _mm512_sub_epi32(_mm512_and_si512(qi, _mm512_set1_epi32(15)), off)));
        __m512 hi = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(
            _mm512_sub_epi32(_mm512_srli_epi32(qi, 4), off)));
        if (has_min) {
            lo = _mm512_add_ps(lo, vm);
            hi = _mm512_add_ps(hi, vm);
        }
        _mm512_storeu_ps(dst, lo);
        _mm512_storeu_ps(dst + 16, hi);
#elif defined(QUANT_AVX2)
        const __m256i off = _mm256_set1_epi32(offset);
        const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
        for (int j = 0; j < 16; j += 8) {
            const __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + j)));
            __m256 lo = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(
                _mm256_sub_epi32(_mm256_and_si256(qi, _mm256_set1_epi32(15)), off)));
            __m256 hi = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(
                _mm256_sub_epi32(_mm256_srli_epi32(qi, 4), off)));
            if (has_min) {
                lo = _mm256_add_ps(lo, vm);
                hi = _mm256_add_ps(hi, vm);
            }
            _mm256_storeu_ps(dst + j, lo);
            _mm256_storeu_ps(dst + 16 + j, hi);
        }
#else
        for (int j = 0; j < 16; j++) {
            float lo = d * (float)((int)(q[j] & 15) - offset);
            float hi = d * (float)((int)(q[j] >> 4) - offset);
            if (has_min) {
                lo += m;                           /* rounded apart from the product */
                hi += m;
            }
            dst[j] = lo;
            dst[j + 16] = hi;
        }
#endif
    }
}

/* dst[0 : c1-c0] = columns [c0, c1) of one row of W in weight_format (c0, c1 on block
 * boundaries; checked by the callers). */
static void dequantize_run(const uint8_t *row, int weight_format, int64_t c0, int64_t c1,
                           float *dst)
{
    switch (weight_format) {
    case MINILARS_WEIGHT_F16:
        f16_run((const uint16_t *)row + c0, c1 - c0, dst);
        break;
    case MINILARS_WEIGHT_BF16:
        bf16_run((const uint16_t *)row + c0, c1 - c0, dst);
        break;
    case MINILARS_WEIGHT_Q8_0:
        q8_0_run(row + c0 / QBLOCK * Q8_0_BYTES, (c1 - c0) / QBLOCK, dst);
        break;
    case MINILARS_WEIGHT_Q4_0:
        q4_run(row + c0 / QBLOCK * Q4_0_BYTES, (c1 - c0) / QBLOCK, 0, dst);
        break;
    case MINILARS_WEIGHT_Q4_1:
        q4_run(row + c0 / QBLOCK * Q4_1_BYTES, (c1 - c0) / QBLOCK, 1, dst);
        break;
    }
}

/* Bytes of one row of `cols` weights, or -1 for an unknown format or a row the format's
 * blocks do not divide. */
static int64_t weight_row_bytes(int weight_format, int64_t cols)
{
    const block_layout b = weight_block(weight_format);
    if (b.cols < 1 || cols < 1 || cols % b.cols)
        return -1;
    return cols / b.cols * b.bytes;
}

int minilars_dequantize(const void *W, int weight_format, int64_t rows, int64_t cols,
                        int64_t r0, int64_t r1, int64_t c0, int64_t c1, float *tile)
{
    const int64_t row_bytes = weight_row_bytes(weight_format, cols);
    const int64_t block = weight_block(weight_format).cols;
    if (row_bytes < 0 || r0 < 0 || r0 >= r1 || r1 > rows || c0 < 0 || c0 >= c1 || c1 > cols
        || c0 % block || c1 % block)
        return MINILARS_ERR_ARGS;
    const int64_t width = c1 - c0;
    for (int64_t r = r0; r < r1; r++)
        dequantize_run((const uint8_t *)W + r * row_bytes, weight_format, c0, c1,
                       tile + (r - r0) * width);
    return MINILARS_OK;
}

int minilars_gather_rows(const void *W, int weight_format, int64_t rows, int64_t cols,
                         const int64_t *index, int64_t n, float *out)
{
    const int64_t row_bytes = weight_row_bytes(weight_format, cols);
    if (row_bytes < 0 || n < 1)
        return MINILARS_ERR_ARGS;
    for (int64_t i = 0; i < n; i++)                     /* all checked before any write */
        if (index[i] < 0 || index[i] >= rows)
            return MINILARS_ERR_ARGS;
    for (int64_t i = 0; i < n; i++)
        dequantize_run((const uint8_t *)W + index[i] * row_bytes, weight_format, 0, cols,
                       out + i * cols);
    return MINILARS_OK;
}

/* ------------------------------------------------------- few rows: stream W once */

int64_t minilars_matvec_xwT_workspace(int64_t in_features, int threads)
{
    if (in_features < 1 || threads < 1)
        return -1;
    return (int64_t)threads * in_features;
}

int minilars_matvec_xwT(const float *x, const void *W, int weight_format,
                        int64_t rows, int64_t in_features, int64_t out_features, float *y,
                        int threads, float *workspace, int64_t workspace_floats)
{
    const int64_t row_bytes = weight_row_bytes(weight_format, in_features);
    if (rows < 1 || out_features < 1 || row_bytes < 0 || threads < 1
        || workspace_floats < minilars_matvec_xwT_workspace(in_features, threads))
        return MINILARS_ERR_ARGS;
#pragma omp parallel num_threads(threads)
    {
        float *w_row = workspace + (int64_t)THREAD_ID() * in_features;    /* (in) */
#pragma omp for schedule(static)
        for (int64_t c = 0; c < out_features; c++) {
            dequantize_run((const uint8_t *)W + c * row_bytes, weight_format, 0, in_features,
                           w_row);
            for (int64_t n = 0; n < rows; n++)
                y[n * out_features + c] = dot_f32(x + n * in_features, w_row, in_features);
        }
    }
    return MINILARS_OK;
}

/* ---------------------------------------------------------------------- SwiGLU */

/* e^x in double, branch-free so that the loops below vectorise: x = k ln2 + r with
 * k = round(x / ln2) and |r| <= ln2 / 2, e^r by its Taylor series to degree 8 (relative
 * error below 3e-10, far under a float32 ulp), and 2^k written into the exponent bits.
 * x is clamped to [-700, 700] first (e^-700 = 1e-304 is still a normal double, and the
 * float32 results round to 0 long before; e^700 overflows float32 as e^x would). The
 * callers pass x <= 0, or barely above 0 by rounding (S - lse in attention). */
static inline double exp_f64(double x)
{
    x = x < -700.0 ? -700.0 : (x > 700.0 ? 700.0 : x);
    const double shifter = 6755399441055744.0;         /* 1.5 * 2^52: adding it rounds */
    const double k = (x * 1.4426950408889634 + shifter) - shifter;
    const double r = x - k * 0.6931471805599453;
    double p = 1.0 / 40320;                             /* 1/8!, then Horner down to 1 */
    p = p * r + 1.0 / 5040;
    p = p * r + 1.0 / 720;
    p = p * r + 1.0 / 120;
    p = p * r + 1.0 / 24;
    p = p * r + 1.0 / 6;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t bits = ((int64_t)k + 1023) << 52;   /* 2^k, k in [-1010, 1010] */
    double scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* sigmoid(g) in the twin's form (minilars.ops.mlp._sigmoid), in double: the float32
 * results below are then rounded once, not at every step as the twin's are. */
static inline double sigmoid_f64(double g)
{
    const double e = exp_f64(g < 0.0 ? g : -g);
    const double s = 1.0 / (1.0 + e);
    return g < 0.0 ? s * e : s;
}

#define SWIGLU_BLOCK 4096       /* values per thread's turn: 48 KiB of float32s, in L2 */
#define SWIGLU_ONE_THREAD 32768 /* fewer values: one thread (a team costs more than it saves) */

int minilars_swiglu_forward(const float *g, const float *u, int64_t n, float *act, int threads)
{
    if (n < 1 || threads < 1)
        return MINILARS_ERR_ARGS;
    const int64_t blocks = (n + SWIGLU_BLOCK - 1) / SWIGLU_BLOCK;
#pragma omp parallel for schedule(static) num_threads(n < SWIGLU_ONE_THREAD ? 1 : threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t end = (b + 1) * SWIGLU_BLOCK < n ? (b + 1) * SWIGLU_BLOCK : n;
        for (int64_t i = b * SWIGLU_BLOCK; i < end; i++) {
            const double gi = g[i];
            act[i] = (float)(gi * sigmoid_f64(gi) * u[i]);
        }
    }
    return MINILARS_OK;
}

int minilars_swiglu_backward(const float *dact, const float *g, const float *u, int64_t n,
                             float *dg, float *du, int threads)
{
    if (n < 1 || threads < 1)
        return MINILARS_ERR_ARGS;
    const int64_t blocks = (n + SWIGLU_BLOCK - 1) / SWIGLU_BLOCK;
#pragma omp parallel for schedule(static) num_threads(n < SWIGLU_ONE_THREAD ? 1 : threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t end = (b + 1) * SWIGLU_BLOCK < n ? (b + 1) * SWIGLU_BLOCK : n;
        for (int64_t i = b * SWIGLU_BLOCK; i < end; i++) {
            const double gi = g[i], d = dact[i];        /* dact[i] read before dg[i] is written */
            const double s = sigmoid_f64(gi);
            du[i] = (float)(d * (gi * s));
            dg[i] = (float)(d * u[i] * (s * (1.0 + gi * (1.0 - s))));
        }
    }
    return MINILARS_OK;
}

/* ---------------------------------------------------------------- tiled attention
 *
 * The element-wise steps between the tile products of minilars.ops.attention's tiled
 * form. A block of scores is `rows` rows of `cols` floats; with `diagonal` = cols (the
 * block on the causal diagonal: tq = tk) row r sees columns c <= r % diagonal only, and
 * the columns it may not see are written as 0 (the twin adds -inf and takes exp). Rows
 * are independent, so they are split over threads; a row's values are reduced in order
 * within one thread, so results do not depend on the thread count. */

/* e^x in float32 for the scores, branch-free so that the loops vectorise (exp_f64 in
 * double runs at half the lanes and converts each value twice): x = k ln2 + r with
 * k = round(x / ln2) and |r| <= ln2 / 2 (ln2 in two parts, so r is exact to float32),
 * e^r by its Taylor series to degree 7 (relative error below 6e-9), 2^k written into
 * the exponent bits; within 2 ulp of e^x. Below -87, where e^x leaves float32's normal
 * range, it returns 0; x is clamped to 88 above (the callers pass x <= 0, or barely
 * above by rounding). SwiGLU keeps exp_f64: with a float32 exp its results moved the IA3
 * reference test past its bound (cext/README.md). */
static inline float exp_f32(float x)
{
    const int tiny = x < -87.0f;
    x = tiny ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f;                  /* 1.5 * 2^23: adding it rounds */
    const float k = (x * 1.44269504f + shifter) - shifter;
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.0f / 5040;                              /* 1/7!, then Horner down to 1 */
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;    /* 2^k, k in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return tiny ? 0.0f : p * scale;
}

#define ATTENTION_ONE_THREAD (1 << 18)  /* fewer scores: one thread (waking a team costs
                                           * more: 147k scores, 74 us on one thread, 82 on two) */

static inline int64_t visible_cols(int64_t r, int64_t cols, int64_t diagonal)
{
    return diagonal ? r % diagonal + 1 : cols;
}

/* the team for a block: one thread below ATTENTION_ONE_THREAD scores */
static inline int attention_team(int64_t rows, int64_t cols, int threads)
{
    return rows * cols < ATTENTION_ONE_THREAD ? 1 : threads;
}

static int attention_shape_ok(int64_t rows, int64_t cols, int64_t diagonal, int threads)
{
    return rows > 0 && cols > 0 && threads > 0
        && (diagonal == 0 || (diagonal == cols && rows % diagonal == 0));
}

int minilars_attention_tile_softmax(float *S, int64_t rows, int64_t cols, int64_t diagonal,
                                    float *row_max, float *row_sum, float *acc,
                                    int64_t acc_cols, int threads)
{
    if (!attention_shape_ok(rows, cols, diagonal, threads) || acc_cols < 1)
        return MINILARS_ERR_ARGS;
#pragma omp parallel for schedule(static) num_threads(attention_team(rows, cols, threads))
    for (int64_t r = 0; r < rows; r++) {
        float *restrict s = S + r * cols;
        const int64_t n = visible_cols(r, cols, diagonal);
        float m = row_max[r];
#pragma omp simd reduction(max:m)
        for (int64_t c = 0; c < n; c++)
            m = s[c] > m ? s[c] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+:sum)
        for (int64_t c = 0; c < n; c++) {
            const float p = exp_f32(s[c] - m);
            s[c] = p;
            sum += p;
        }
        for (int64_t c = n; c < cols; c++)
            s[c] = 0.0f;
        const float correction = exp_f32(row_max[r] - m);           /* 0 on the first tile */
        row_sum[r] = row_sum[r] * correction + sum;
        row_max[r] = m;
        float *restrict a = acc + r * acc_cols;
        for (int64_t c = 0; c < acc_cols; c++)
            a[c] *= correction;
    }
    return MINILARS_OK;
}

int minilars_attention_tile_probs(float *S, int64_t rows, int64_t cols, int64_t diagonal,
                                  const float *lse, int threads)
{
    if (!attention_shape_ok(rows, cols, diagonal, threads))
        return MINILARS_ERR_ARGS;
#pragma omp parallel for schedule(static) num_threads(attention_team(rows, cols, threads))
    for (int64_t r = 0; r < rows; r++) {
        float *restrict s = S + r * cols;
        const int64_t n = visible_cols(r, cols, diagonal);
        const float l = lse[r];
#pragma omp simd
        for (int64_t c = 0; c < n; c++)
            s[c] = exp_f32(s[c] - l);
        for (int64_t c = n; c < cols; c++)
            s[c] = 0.0f;
    }
    return MINILARS_OK;
}

int minilars_attention_tile_dscores(const float *P, float *dP, int64_t rows, int64_t cols,
                                    const float *D, int threads)
{
    if (!attention_shape_ok(rows, cols, 0, threads))
        return MINILARS_ERR_ARGS;
#pragma omp parallel for schedule(static) num_threads(attention_team(rows, cols, threads))
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict p = P + r * cols;
        float *restrict d = dP + r * cols;
        const float Dr = D[r];
#pragma omp simd
        for (int64_t c = 0; c < cols; c++)
            d[c] = p[c] * (d[c] - Dr);
    }
    return MINILARS_OK;
}

/* ------------------------------------------------------------ what was compiled */

#if defined(__x86_64__) || defined(_M_X64)
#define BUILD_ARCH "x86_64"
#elif defined(__aarch64__)
#define BUILD_ARCH "aarch64"
#elif defined(__arm__)
#define BUILD_ARCH "arm"
#else
#define BUILD_ARCH "other"
#endif

/* the registers the vector-extension loops (CHUNK floats) are mapped onto */
#if defined(__AVX512F__)
#define BUILD_VECTOR "512"
#elif defined(__AVX__)
#define BUILD_VECTOR "256"
#elif defined(__SSE2__) || defined(__ARM_NEON)
#define BUILD_VECTOR "128"
#else
#define BUILD_VECTOR "0"
#endif

#ifdef HAVE_VECTOR_EXT
#define BUILD_LOOPS "vector-ext"
#else
#define BUILD_LOOPS "plain"
#endif

/* the branch f16_at and f16_run compiled */
#if defined(__F16C__)
#define BUILD_F16 "f16c"
#elif defined(__ARM_FP16_FORMAT_IEEE)
#define BUILD_F16 "arm-fp16"
#else
#define BUILD_F16 "bits"
#endif

#if defined(QUANT_AVX512)
#define BUILD_GGUF "avx512"
#elif defined(QUANT_AVX2)
#define BUILD_GGUF "avx2"
#else
#define BUILD_GGUF "plain"
#endif

const char *minilars_build_features(void)
{
    return "arch=" BUILD_ARCH " vector=" BUILD_VECTOR " loops=" BUILD_LOOPS
           " f16=" BUILD_F16 " gguf=" BUILD_GGUF;
}
