/* minilars C core: the few kernels where NumPy spends time or memory it need not.
 *
 * Every kernel has a NumPy twin that is its specification:
 *   LARS gate        minilars/adapters/lars.py   lars_gate_forward / lars_gate_backward
 *   matmuls          minilars/kernels.py         matmul_xwT_numpy / matmul_dyW_numpy
 *
 * Conventions, for every function below:
 *   - arrays are C-contiguous (row-major), float32 unless stated; shapes in comments;
 *   - nothing is checked here beyond sizes being positive: minilars/kernels.py checks
 *     dtype, contiguity and shapes, and names the bad argument, BEFORE calling C;
 *   - outputs are overwritten, never accumulated into; inputs are never written;
 *   - return value: 0 ok, MINILARS_ERR_ARGS for sizes that do not fit,
 *     MINILARS_ERR_NOMEM when a (small, per-thread) scratch allocation failed;
 *   - with OpenMP the work is split over threads (OMP_NUM_THREADS); results are
 *     deterministic for a given thread count (reductions are summed in thread order).
 *
 * The declarations between CDEF BEGIN and CDEF END are read by cext/build_cffi.py as
 * the cffi interface: keep them plain C (no macros other than the integer constants).
 */
#ifndef MINILARS_KERNELS_H
#define MINILARS_KERNELS_H

#include <stdint.h>

/* CDEF BEGIN */
#define MINILARS_OK 0
#define MINILARS_ERR_ARGS -1
#define MINILARS_ERR_NOMEM -2

#define MINILARS_WEIGHT_F16 1   /* IEEE half precision, stored as uint16 bits */
#define MINILARS_WEIGHT_BF16 2  /* bfloat16: the top 16 bits of a float32     */

/* 1 when compiled with OpenMP, else 0. */
int minilars_has_openmp(void);

/* Threads a parallel kernel will use (omp_get_max_threads(), or 1). */
int minilars_max_threads(void);

/* LARS gate, forward, fused (no (N, in) temporary besides the output).
 *   reads   x (rows, in), U (in, rank), V (rank, in/block), alpha, eps
 *   writes  x_tilde (rows, in)
 * Per row: rstd = 1/sqrt(mean(x^2) + eps); zU = rstd * (x U)  (rank values);
 * s = zU V; gate = 1 + alpha s; x_tilde[j*block + t] = x[j*block + t] * gate[j].
 * Scratch: O(rank + in/block) floats per thread. Rows are split over threads. */
int minilars_lars_forward(const float *x, const float *U, const float *V,
                          float alpha, float eps,
                          int64_t rows, int64_t in_features, int64_t rank, int64_t block,
                          float *x_tilde);

/* LARS gate, backward, fused: everything is recomputed from x, row by row.
 *   reads   dx_tilde (rows, in), x (rows, in), U (in, rank), V (rank, g), alpha, eps
 *   writes  dx (rows, in) unless dx is NULL; dU (in, rank); dV (rank, g); dalpha (1)
 * Per row: dgate[j] = sum_t dx_tilde * x over block j; ds = alpha dgate;
 *   dalpha += dgate . s;  dV += outer(zU, ds);  dzU = V ds;  dU += outer(z, dzU);
 *   dx = gate * dx_tilde + rstd * (dz - z * mean(dz z)), dz = U dzU, and
 *   mean(dz z) = (dzU . zU) / in, so dz is never stored.
 * Scratch: one dU and dV accumulator per thread (in*rank + rank*g floats each),
 * summed in thread order at the end; O(rank + g) floats per thread for a row. */
int minilars_lars_backward(const float *dx_tilde, const float *x,
                           const float *U, const float *V, float alpha, float eps,
                           int64_t rows, int64_t in_features, int64_t rank, int64_t block,
                           float *dx, float *dU, float *dV, float *dalpha);

/* y = x W^T with a half-precision frozen weight, float32 accumulation.
 *   reads   x (rows, in) float32, W (out, in) uint16 bits (weight_format F16 or BF16)
 *   writes  y (rows, out) float32
 * W is converted to float32 one packed tile (at most 256 x 256) at a time per thread;
 * no float32 copy of W is made. Output column panels are split over threads. With fewer
 * rows than a register tile (6 or 8; e.g. generation, one token), W is streamed once,
 * one converted row per thread at a time, and output columns are split over threads. */
int minilars_matmul_xwT(const float *x, const uint16_t *W, int weight_format,
                        int64_t rows, int64_t in_features, int64_t out_features,
                        float *y);

/* dx = dy W with a half-precision frozen weight, float32 accumulation.
 *   reads   dy (rows, out) float32, W (out, in) uint16 bits (weight_format F16 or BF16)
 *   writes  dx (rows, in) float32
 * Same tiling as minilars_matmul_xwT; the few-rows path splits dx's columns over threads. */
int minilars_matmul_dyW(const float *dy, const uint16_t *W, int weight_format,
                        int64_t rows, int64_t out_features, int64_t in_features,
                        float *dx);

/* Half-precision bits to float32, elementwise (n values); used by tests as the
 * reference for the conversion the matmuls do inside their tiles. */
int minilars_half_to_f32(const uint16_t *src, int weight_format, int64_t n, float *dst);
/* CDEF END */

#endif
