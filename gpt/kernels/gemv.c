/* Batch-1 bf16 matrix-vector product (GEMV) for CPU decoding: y = W x (+ bias), W row-major (out, in).
 *
 * Decoding one token reads every weight once, so a step is as fast as its GEMVs stream the weights from memory.
 * ATen's bf16 GEMV also pays ~20 us of fixed cost per call (25 calls per token of the seed model). Here OpenMP
 * threads take chunks of CHUNK_ROWS rows (dynamic: a thread delayed by the OS does not hold up the others), walk
 * each row as one sequential stream and prefetch PREFETCH_BYTES ahead of it into L2; products are exact
 * bf16 x bf16 in the AVX-512 BF16 dot-product instruction, summed in float32, rounded to bf16 once at the end.
 * Measured on the 2-core Xeon of bench/README.md, seed-model decode tokens/s (interleaved runs): prefetch into
 * L2 (T1) 114-116 vs into L1 (T0) 95-98 vs non-temporal 53; distance 8-16 KB best, 2 KB 110.
 * gpt/kernels/__init__.py compiles this file on first use on CPUs with AVX-512 BF16 and calls it through
 * ctypes; elsewhere ATen's kernel is used. */
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "gemv.c needs AVX-512 BF16 (compile with -march=native on a CPU that has it)"
#endif

#define PREFETCH_BYTES 8192
#define CHUNK_ROWS 64

static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t in) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= in; k += 64) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T1);
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES + 64, _MM_HINT_T1);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < in; k += 32) { /* the tail: masked loads read nothing past the row */
        __mmask32 m = in - k >= 32 ? 0xffffffffu : ((1u << (in - k)) - 1u);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* y (out) = W (out, in) @ x (in) + bias (out, or NULL) */
void gemv_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t out, int64_t in,
               int threads) {
#pragma omp parallel for schedule(dynamic, CHUNK_ROWS) num_threads(threads)
    for (int64_t r = 0; r < out; r++) {
        float v = dot_bf16(W + r * in, x, in);
        if (bias) v += bf16_to_f32(bias[r]);
        y[r] = f32_to_bf16(v);
    }
}
