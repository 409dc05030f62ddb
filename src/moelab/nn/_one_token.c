/* One token through K experts' slices: the kernels of moelab.nn._native (see its docstring).
 *
 * Shapes: K slots, H hidden, I expert inner dim. A weight is addressed as w + e*sE + o*sO + j
 * (expert e, output row o, reduction index j contiguous); strides are in elements.
 *
 * in_proj:  h0[k*I + i] = dot(w0 row (ids[k], i), x),  h1 likewise with w1 (may be NULL)
 * out_proj: y[h] = sum_k dot(down row (ids[k], h), a[k*I ..])           (summed in k order)
 * swiglu:   a[k*I + i] = silu(dot(gate row, x)) * dot(up row, x) * w[k], then out_proj, in one
 *           parallel region with one barrier between the two phases.
 *
 * Each thread owns one static block of rows in each phase (the same block for every k of
 * out_proj, so y needs no atomics), and each output element is one thread's sum in a fixed
 * order: the result does not depend on the number of threads. Plain C, no Python or torch
 * headers: it builds in well under a second with `cc -shared`.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE(T, SUFFIX, EXP)                                                                  \
static inline T dot_##SUFFIX(const T* restrict a, const T* restrict b, int64_t n) {            \
  T acc = 0;                                                                                    \
  /* the same offset one page on (the next row, or rows): the hardware streamer stops at page */ \
  /* boundaries and rows start cold; ~7 % of a flushed call (bench/decode_gemv.py, 17:15 UTC) */ \
  for (int64_t j = 0; j < n; j += 64 / (int64_t)sizeof(T))                                      \
    __builtin_prefetch((const char*)(a + j) + 4096);                                            \
  _Pragma("omp simd reduction(+:acc)")                                                          \
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];                                           \
  return acc;                                                                                   \
}                                                                                               \
                                                                                                \
/* Called inside a parallel region: this thread's block of y, every k in order. */              \
static void out_rows_##SUFFIX(const T* w, int64_t sE, int64_t sO, const int64_t* ids, int64_t K, \
                              int64_t H, int64_t I, const T* a, T* y) {                         \
  _Pragma("omp for schedule(static) nowait")                                                    \
  for (int64_t h = 0; h < H; ++h) y[h] = 0;                                                     \
  for (int64_t k = 0; k < K; ++k) {                                                             \
    const T* wk = w + ids[k] * sE;                                                              \
    _Pragma("omp for schedule(static) nowait")                                                  \
    for (int64_t h = 0; h < H; ++h) y[h] += dot_##SUFFIX(wk + h * sO, a + k * I, I);            \
  }                                                                                             \
}                                                                                               \
                                                                                                \
void moelab_in_proj_##SUFFIX(const T* w0, const T* w1, int64_t sE, int64_t sO, const int64_t* ids, \
                             int64_t K, int64_t I, int64_t H, const T* x, T* h0, T* h1,         \
                             int nthreads) {                                                    \
  _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
  for (int64_t r = 0; r < K * I; ++r) {                                                         \
    const int64_t off = ids[r / I] * sE + (r % I) * sO;                                         \
    h0[r] = dot_##SUFFIX(w0 + off, x, H);                                                       \
    if (w1) h1[r] = dot_##SUFFIX(w1 + off, x, H);                                               \
  }                                                                                             \
}                                                                                               \
                                                                                                \
void moelab_out_proj_##SUFFIX(const T* w, int64_t sE, int64_t sO, const int64_t* ids, int64_t K, \
                              int64_t H, int64_t I, const T* a, T* y, int nthreads) {           \
  _Pragma("omp parallel num_threads(nthreads)")                                                 \
  out_rows_##SUFFIX(w, sE, sO, ids, K, H, I, a, y);                                             \
}                                                                                               \
                                                                                                \
/* The order of the products is torch's: (silu(g) * u) * w. Returns 0, or -1 where the K*I   \
 * scratch cannot be allocated. */                                                              \
int moelab_swiglu_##SUFFIX(const T* gate, const T* up, int64_t sE, int64_t sO, const T* down,   \
                           int64_t dE, int64_t dO, const int64_t* ids, const T* w, int64_t K,   \
                           int64_t H, int64_t I, const T* x, T* y, int nthreads) {              \
  T* a = malloc(sizeof(T) * K * I);                                                             \
  if (!a) return -1;                                                                            \
  _Pragma("omp parallel num_threads(nthreads)")                                                 \
  {                                                                                             \
    _Pragma("omp for schedule(static)") /* its implicit barrier: a is complete after it */      \
    for (int64_t r = 0; r < K * I; ++r) {                                                       \
      const int64_t k = r / I, off = ids[k] * sE + (r % I) * sO;                                \
      const T g = dot_##SUFFIX(gate + off, x, H), u = dot_##SUFFIX(up + off, x, H);             \
      a[r] = g / (1 + EXP(-g)) * u * w[k];                                                      \
    }                                                                                           \
    out_rows_##SUFFIX(down, dE, dO, ids, K, H, I, a, y);                                        \
  }                                                                                             \
  free(a);                                                                                      \
  return 0;                                                                                     \
}

DEFINE(float, f32, expf)
DEFINE(double, f64, exp)
