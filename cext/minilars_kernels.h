/* minilars C core: the few kernels where NumPy spends time or memory it need not.
 *
 * Every kernel has a NumPy twin that is its specification:
 *   LARS gate        minilars/ops/lars_gate.py   lars_gate_forward / lars_gate_backward
 *   matmuls          minilars/kernels.py         matmul_xwT_numpy / matmul_dyW_numpy
 *
 * Conventions, for every function below:
 *   - arrays are C-contiguous (row-major), float32 unless stated; shapes in comments;
 *   - nothing is checked here beyond sizes being positive: minilars/kernels.py checks
 *     dtype, contiguity and shapes, and names the bad argument, BEFORE calling C;
 *   - outputs are overwritten, never accumulated into; inputs are never written;
 *   - the kernels allocate nothing: the caller passes `workspace` (float32, at least the
 *     number of floats the matching *_workspace function returns for the same sizes and
 *     `threads`), so every byte is a NumPy allocation that tracemalloc and the ledger see;
 *   - `threads` is the number of OpenMP threads to use (1 without OpenMP); results are
 *     deterministic for a given thread count (reductions are summed in thread order);
 *   - return value: 0 ok, MINILARS_ERR_ARGS for sizes, threads or a workspace that do
 *     not fit (nothing is written then); *_workspace return -1 for such sizes.
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
 * Workspace: U^T (in x rank rounded up to 4) plus O(rank + in/block) floats per thread,
 * independent of rows. Rows are split over threads. */
int64_t minilars_lars_forward_workspace(int64_t in_features, int64_t rank, int64_t block,
                                        int threads);
int minilars_lars_forward(const float *x, const float *U, const float *V,
                          float alpha, float eps,
                          int64_t rows, int64_t in_features, int64_t rank, int64_t block,
                          float *x_tilde, int threads, float *workspace, int64_t workspace_floats);

/* LARS gate, backward, fused: everything is recomputed from x, row by row.
 *   reads   dx_tilde (rows, in), x (rows, in), U (in, rank), V (rank, g), alpha, eps
 *   writes  dx (rows, in) unless dx is NULL; dU (in, rank); dV (rank, g); dalpha (1)
 * Per row: dgate[j] = sum_t dx_tilde * x over block j; ds = alpha dgate;
 *   dalpha += dgate . s;  dV += outer(zU, ds);  dzU = V ds;  dU += outer(z, dzU);
 *   dx = gate * dx_tilde + rstd * (dz - z * mean(dz z)), dz = U dzU, and
 *   mean(dz z) = (dzU . zU) / in, so dz is never stored.
 * Workspace: U^T, and per thread one dU^T and dV accumulator (in*rank + rank*g floats,
 * summed in thread order at the end) and the scratch of a tile of 4 rows (4 in + O(rank
 * + g) floats): independent of rows. Tiles of 4 rows are split over threads. */
int64_t minilars_lars_backward_workspace(int64_t in_features, int64_t rank, int64_t block,
                                         int threads);
int minilars_lars_backward(const float *dx_tilde, const float *x,
                           const float *U, const float *V, float alpha, float eps,
                           int64_t rows, int64_t in_features, int64_t rank, int64_t block,
                           float *dx, float *dU, float *dV, float *dalpha,
                           int threads, float *workspace, int64_t workspace_floats);

/* y = x W^T with a half-precision frozen weight, float32 accumulation.
 *   reads   x (rows, in) float32, W (out, in) uint16 bits (weight_format F16 or BF16)
 *   writes  y (rows, out) float32
 * W is converted to float32 one packed tile (at most 256 x 256) at a time per thread;
 * no float32 copy of W is made. Output column panels are split over threads. With fewer
 * rows than a register tile (6 or 8; e.g. generation, one token), W is streamed once,
 * one converted row per thread at a time, and output columns are split over threads.
 * Workspace per thread: the packed tile (256 x panel) + 256 x 8 + 256 floats, or one
 * W row with few rows; at most about 0.3 MB per thread, independent of W's size. */
int64_t minilars_matmul_xwT_workspace(int64_t rows, int64_t in_features, int64_t out_features,
                                      int threads);
int minilars_matmul_xwT(const float *x, const uint16_t *W, int weight_format,
                        int64_t rows, int64_t in_features, int64_t out_features, float *y,
                        int threads, float *workspace, int64_t workspace_floats);

/* dx = dy W with a half-precision frozen weight, float32 accumulation.
 *   reads   dy (rows, out) float32, W (out, in) uint16 bits (weight_format F16 or BF16)
 *   writes  dx (rows, in) float32
 * Same tiling as minilars_matmul_xwT; the few-rows path splits dx's columns over threads. */
int64_t minilars_matmul_dyW_workspace(int64_t rows, int64_t out_features, int64_t in_features,
                                      int threads);
int minilars_matmul_dyW(const float *dy, const uint16_t *W, int weight_format,
                        int64_t rows, int64_t out_features, int64_t in_features, float *dx,
                        int threads, float *workspace, int64_t workspace_floats);

/* Half-precision bits to float32, elementwise (n values); used by tests as the
 * reference for the conversion the matmuls do inside their tiles. */
int minilars_half_to_f32(const uint16_t *src, int weight_format, int64_t n, float *dst);
/* CDEF END */

#endif
