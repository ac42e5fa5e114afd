/* minilars C core: the few kernels where NumPy spends time or memory it need not.
 *
 * Every kernel has a NumPy twin that is its specification:
 *   LARS gate        minilars/ops/lars_gate.py   lars_gate_forward / lars_gate_backward
 *   dequantize       minilars/kernels.py         dequantize_numpy (minilars.quant.dequantize,
 *                                                minilars.frozen.bf16_values)
 *   gather rows      minilars/frozen.py          rows_to_float
 *   few-rows x W^T   minilars/kernels.py         matmul_xwT_numpy
 *   SwiGLU           minilars/ops/mlp.py         swiglu_forward / swiglu_backward
 *   attention tiles  minilars/ops/attention_tiles.py  tile_softmax / tile_probs / tile_dscores
 *
 * Conventions, for every function below:
 *   - arrays are C-contiguous (row-major), float32 unless stated; shapes in comments;
 *   - nothing is checked here beyond sizes being positive: minilars/kernels.py checks
 *     dtype, contiguity and shapes, and names the bad argument, BEFORE calling C;
 *   - outputs are overwritten, never accumulated into; inputs are never written (the
 *     attention tile kernels are the exception: they update their blocks in place, and
 *     say so);
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

/* Formats of a frozen weight, held row after row (minilars_dequantize reads them). */
#define MINILARS_WEIGHT_F16 1   /* IEEE half precision, stored as uint16 bits */
#define MINILARS_WEIGHT_BF16 2  /* bfloat16: the top 16 bits of a float32     */
/* GGUF blocks of 32 consecutive weights of a row (layout: minilars/quant.py):      */
#define MINILARS_WEIGHT_Q8_0 3  /* 34 bytes: f16 d, int8 q[32];         w = d * q        */
#define MINILARS_WEIGHT_Q4_0 4  /* 18 bytes: f16 d, 16 bytes of nibbles; w = d * (q - 8) */
#define MINILARS_WEIGHT_Q4_1 5  /* 20 bytes: f16 d, f16 m, nibbles;      w = d * q + m    */

/* 1 when compiled with OpenMP, else 0. */
int minilars_has_openmp(void);

/* Threads a parallel kernel will use (omp_get_max_threads(), or 1). */
int minilars_max_threads(void);

/* What this build compiled, as space-separated key=value words (a static string):
 *   arch=x86_64|aarch64|arm|other   vector=512|256|128|0 (bits of the widest SIMD
 *   registers the compiler may use for the vector-extension loops; 0: scalar)
 *   loops=vector-ext|plain   f16=f16c|arm-fp16|bits   gguf=avx512|avx2|plain
 * The f16 and gguf words name the branch of f16_at/f16_run and of the GGUF block loops
 * that the preprocessor kept, so a build on a new machine can be checked. */
const char *minilars_build_features(void);

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

/* Dequantize a tile of a frozen weight: rows [r0, r1) and columns [c0, c1) of W (rows,
 * cols), held in weight_format row after row, into tile (r1 - r0, c1 - c0) float32,
 * row-major. Exact for F16 and BF16 (every such value is a float32); for the GGUF blocks
 * the same float32 bits as minilars.quant.dequantize (Q4_1's d * q + m rounds twice).
 *   reads   W, the rows r0 .. r1-1 only
 *   writes  tile
 * c0 and c1 must fall on the format's block boundaries (multiples of 32 for the GGUF
 * formats, any column for F16/BF16), and cols must be a whole number of blocks. This is
 * the C half of every product with a half-precision W: minilars/kernels.py dequantizes one
 * tile at a time into a reused buffer and hands it to NumPy's BLAS. One thread: it runs
 * between BLAS calls, and OpenMP threads there measured slower (BLAS's threads still
 * hold the cores for a while after each call).
 * Twin: minilars.kernels.dequantize_numpy. */
int minilars_dequantize(const void *W, int weight_format, int64_t rows, int64_t cols,
                        int64_t r0, int64_t r1, int64_t c0, int64_t c1, float *tile);

/* Rows index[0 .. n-1] of a frozen weight W (rows, cols) in weight_format, each
 * dequantized whole as minilars_dequantize does it (an embedding lookup).
 *   reads   index (n) int64, each in [0, rows) (all checked before anything is written);
 *           the rows of W they name, only those
 *   writes  out (n, cols) float32
 * One thread (n rows of `cols` floats: a few microseconds per token).
 * Twin: minilars.frozen.rows_to_float. */
int minilars_gather_rows(const void *W, int weight_format, int64_t rows, int64_t cols,
                         const int64_t *index, int64_t n, float *out);

/* y = x W^T for a few rows of x (generation: one token), float32 accumulation.
 *   reads   x (rows, in) float32, W (out, in) in weight_format (in a whole number of
 *           the format's blocks)
 *   writes  y (rows, out) float32
 * W is streamed once: each thread dequantizes one row of W at a time into its part of the
 * workspace (in floats per thread) and dots it with every row of x; W's rows are split
 * over threads. For many rows the tiles-and-BLAS path is faster (it reuses each tile).
 * Twin: minilars.kernels.matmul_xwT_numpy (equal up to the order of the sums). */
int64_t minilars_matvec_xwT_workspace(int64_t in_features, int threads);
int minilars_matvec_xwT(const float *x, const void *W, int weight_format,
                        int64_t rows, int64_t in_features, int64_t out_features, float *y,
                        int threads, float *workspace, int64_t workspace_floats);
/* SwiGLU, the MLP's element-wise middle, forward: act = silu(g) * u, n values.
 *   reads   g (n), u (n)
 *   writes  act (n)
 * silu(g) = g * sigmoid(g), and sigmoid as the twin computes it: e = exp(-|g|),
 * 1 / (1 + e), times e when g < 0 (no overflow, full precision on both sides). Inside,
 * everything is double (exp is this file's polynomial), and each result is rounded to
 * float32 once: within 1 ulp of the exact value, where the twin's float32 steps round
 * six times (within a few ulp of each other, not bit for bit). One pass, no temporaries
 * (the twin makes five passes over row blocks); blocks of values are split over threads.
 * Twin: minilars.ops.mlp.swiglu_forward. */
int minilars_swiglu_forward(const float *g, const float *u, int64_t n, float *act, int threads);

/* SwiGLU, backward: du = dact * silu(g); dg = dact * u * sigmoid(g) (1 + g (1 - sigmoid(g))).
 *   reads   dact (n), g (n), u (n)
 *   writes  dg (n), du (n); dg may be dact itself (each value is read before it is written)
 * Twin: minilars.ops.mlp.swiglu_backward. */
int minilars_swiglu_backward(const float *dact, const float *g, const float *u, int64_t n,
                             float *dg, float *du, int threads);
/* Tiled attention, forward: one key tile of the online softmax, in place.
 *   updates S (rows, cols): the tile's scores (q already scaled) become
 *           P = exp(S - m), 0 where the causal mask hides a score;
 *           row_max (rows), row_sum (rows): the running max m and sum of exp(S - m),
 *           acc (rows, acc_cols): the running output, rescaled by exp(old max - m)
 *           (the caller then adds P V)
 * diagonal: 0, or cols for the tile on the causal diagonal (row r sees c <= r % cols;
 * rows must be a multiple of it). A row's first tile comes with row_max -inf, row_sum 0.
 * exp is this file's double polynomial, each result rounded to float32 once; a row's
 * sum is accumulated in double. Rows are split over threads.
 * Twin: minilars.ops.attention_tiles.tile_softmax. */
int minilars_attention_tile_softmax(float *S, int64_t rows, int64_t cols, int64_t diagonal,
                                    float *row_max, float *row_sum, float *acc,
                                    int64_t acc_cols, int threads);

/* Tiled attention, backward: a tile's probabilities rebuilt, in place.
 *   reads   lse (rows): each row's log-sum-exp from the forward
 *   updates S (rows, cols): scores -> P = exp(S - lse), 0 where masked (diagonal as above)
 * Twin: minilars.ops.attention_tiles.tile_probs. */
int minilars_attention_tile_probs(float *S, int64_t rows, int64_t cols, int64_t diagonal,
                                  const float *lse, int threads);

/* Tiled attention, backward: the softmax's input gradient, in place.
 *   reads   P (rows, cols), D (rows): rowsum(dO * O)
 *   updates dP (rows, cols) -> dS = P * (dP - D)   (unscaled: the caller's q carries 1/sqrt(hd))
 * Twin: minilars.ops.attention_tiles.tile_dscores. */
int minilars_attention_tile_dscores(const float *P, float *dP, int64_t rows, int64_t cols,
                                    const float *D, int threads);
/* CDEF END */

#endif
