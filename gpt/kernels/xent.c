/* Softmax cross-entropy over bf16 logits, with its gradient, in one pass per row: the CPU training step's LM head.
 *
 * gpt.model.loss's fused head + loss computes, per chunk of rows, logits = hidden @ Wᵀ (bf16 under autocast), then
 * the negative log-likelihood of each row's target and the logits' gradient softmax − one-hot. In ATen that is a
 * softmax into a float32 tensor (rows × vocabulary), a gather, a scatter and a cast back to bf16: four passes over
 * 4-byte elements, ~40% of a tiny-preset training step on the 2-core Xeon of bench/README.md. Here each thread
 * takes whole rows: the max, then exp(x − max) into a float32 row buffer (cache-resident) with its sum, then the
 * probabilities rounded once to bf16 written over the logits, then the target's entry (p − 1, from the float32
 * value) and nll = log Σ exp(x − max) + max − x[target]. exp is a degree-6 polynomial after range reduction
 * (relative error ~2e-7, below the bf16 rounding every output gets). A target < 0 (ignored) gets no one-hot and an
 * nll of 0; the caller masks such rows. A NaN logit makes its row's nll and gradient NaN, as in ATen (max and the
 * polynomial's clamp would otherwise drop it silently). gpt/kernels/__init__.py compiles this file with gemv.c. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "xent.c needs AVX-512 BF16 (compile with -march=native on a CPU that has it)"
#endif

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* exp(x) for x ≤ 0 (x − max), flushed to 0 below −87.3: 2^n · p(r), x = n·ln2 + r, |r| ≤ ln2/2 */
static inline __m512 exp_nonpositive(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1u); }

static void row(uint16_t *x, int64_t v, int64_t target, float *buf, float *nll) {
    const int scored = target >= 0 && target < v;
    const float x_target = scored ? bf16_to_f32(x[target]) : 0.0f;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t k = 0; k < v; k += 16) {
        __mmask16 t = tail_mask(v - k);
        __m512 e = load_bf16(x + k, t);
        nan |= _mm512_mask_cmp_ps_mask(t, e, e, _CMP_UNORD_Q);
        mx = _mm512_mask_max_ps(mx, t, mx, e);
    }
    if (nan) { /* as ATen's softmax: a NaN logit makes the row's loss and gradient NaN (the step's finite check) */
        for (int64_t k = 0; k < v; k++) x[k] = f32_to_bf16(NAN);
        *nll = NAN;
        return;
    }
    const float m = _mm512_reduce_max_ps(mx);
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < v; k += 16) {
        __mmask16 t = tail_mask(v - k);
        __m512 e = exp_nonpositive(_mm512_sub_ps(load_bf16(x + k, t), vm));
        sum = _mm512_mask_add_ps(sum, t, sum, e);
        _mm512_mask_storeu_ps(buf + k, t, e);
    }
    const float s = _mm512_reduce_add_ps(sum);
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    for (int64_t k = 0; k < v; k += 16) {
        __mmask16 t = tail_mask(v - k);
        __m256bh p = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, buf + k), inv));
        _mm256_mask_storeu_epi16(x + k, t, (__m256i)p);
    }
    *nll = scored ? m + logf(s) - x_target : 0.0f;
    if (scored) x[target] = f32_to_bf16(buf[target] / s - 1.0f);
}

/* logits (rows, v) bf16, overwritten with softmax − one-hot(targets); nll (rows) float32; buf: threads × v floats
 * of scratch (one row each) */
void softmax_xent_bf16(uint16_t *logits, const int64_t *targets, float *nll, float *buf, int64_t rows, int64_t v,
                       int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *mine = buf + (int64_t)omp_get_thread_num() * v;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) row(logits + r * v, v, targets[r], mine, nll + r);
    }
}
