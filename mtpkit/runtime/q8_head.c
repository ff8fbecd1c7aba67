/* The target's Q8_0 output head for a few rows at once, bit for bit what ggml's x86 CPU kernel gives each row alone
   (ggml_vec_dot_q8_0_q8_0, its AVX2 path, in llama-cpp-python 0.3.36's ggml): the activation row is quantized by
   ggml's own quantize_row_q8_0; per 32-wide block, 8 lanes each hold the exact integer sum of 4 products; the lane
   sums, as floats, times the block scale fp16(w.d) * fp16(x.d) (a float product), are fused-multiply-added into 8
   float accumulators block after block; the row's value is ggml's hsum_float_8 of them. Integer sums are exact
   however they are formed, so here x + 128 (unsigned) meets w (signed) in one VNNI dot with -128 * sum(w) as its
   starting value, and each weight block is loaded once for every row: ggml computes one row per pass over the
   weights, ~55 ns a 640-wide dot on this repo's CPU, and its tiled kernels for several rows round otherwise.
   Used by runtime/ggml_head.py (RowHead) where every row it gives equals ggml's, checked when the backend loads. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "needs AVX2, FMA and F16C"
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT4(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DOT4(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else
#error "needs AVX512-VNNI (with AVX512VL) or AVX-VNNI"
#endif

#define MAX_ROWS 8
#define MAX_BLOCKS 256
typedef struct { uint16_t d; int8_t qs[32]; } __attribute__((packed)) blk;  /* ggml's block_q8_0 */
extern void quantize_row_q8_0(const float *x, void *y, int64_t k);  /* ggml-cpu: a mul_mat's activation rows */

static inline float hsum8(__m256 x) {  /* ggml's hsum_float_8 */
  __m128 r = _mm256_extractf128_ps(x, 1);
  r = _mm_add_ps(r, _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

static inline void rows_r(const blk *W, int64_t i0, int64_t i1, int nb, const uint8_t *xu, const float *dx,
                          const int R, float *out, int64_t V) {
  const __m256i u128 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
  for (int64_t i = i0; i < i1; i++) {
    const blk *w = W + i * nb;
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
      const __m256 dw = _mm256_set1_ps(_cvtsh_ss(w[b].d));
      const __m256i qw = _mm256_loadu_si256((const __m256i *)w[b].qs);
      const __m256i start = _mm256_sub_epi32(zero, DOT4(zero, u128, qw));  /* -128 * (sum of each lane's 4 w) */
      for (int r = 0; r < R; r++) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(xu + (r * nb + b) * 32));
        const __m256 q = _mm256_cvtepi32_ps(DOT4(start, u, qw));
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(dx[r * nb + b])), q, acc[r]);
      }
    }
    for (int r = 0; r < R; r++) out[r * V + i] = hsum8(acc[r]);
  }
}

static void rows(const blk *W, int64_t i0, int64_t i1, int nb, const uint8_t *xu, const float *dx, int R, float *out,
                 int64_t V) {
  switch (R) {  /* R a constant in each case: the accumulators stay in registers */
#define ROWS(n) case n: rows_r(W, i0, i1, nb, xu, dx, n, out, V); break;
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
#undef ROWS
  }
}

/* out [R, V] = x [R, n] (float32) . W [V, n] (Q8_0 rows, contiguous)^T on `threads` OpenMP threads. 0 = done. */
int mtpkit_q8_head(const void *W, int64_t V, int n, const float *x, int R, float *out, int threads) {
  static __thread blk q[MAX_ROWS * MAX_BLOCKS];
  static __thread uint8_t xu[MAX_ROWS * MAX_BLOCKS * 32];
  static __thread float dx[MAX_ROWS * MAX_BLOCKS];
  if (R < 1 || R > MAX_ROWS || n <= 0 || n % 32 || n / 32 > MAX_BLOCKS || threads < 1) return 1;
  const int nb = n / 32;
  for (int r = 0; r < R; r++) {
    quantize_row_q8_0(x + (int64_t)r * n, q + r * nb, n);
    for (int b = 0; b < nb; b++) {
      dx[r * nb + b] = _cvtsh_ss(q[r * nb + b].d);
      for (int e = 0; e < 32; e++) xu[(r * nb + b) * 32 + e] = (uint8_t)(q[r * nb + b].qs[e] + 128);
    }
  }
  /* OpenMP, as ggml's CPU backend in llama-cpp-python: the same thread pool, whose threads still spin for a few ms
     after llama.cpp's last decode (threads of our own would share the cores with them: 10.2 vs 5.8 ms for 2 rows) */
  const uint8_t *xs = xu;  /* this thread's buffers: inside the region `xu` would name each thread's own */
  const float *ds = dx;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = (V + nt - 1) / nt, a = t * per < V ? t * per : V, z = (t + 1) * per < V ? (t + 1) * per : V;
    rows((const blk *)W, a, z, nb, xs, ds, R, out, V);
  }
  return 0;
}
