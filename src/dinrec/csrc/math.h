// Vectorisable exp / sigmoid for the dinrec CPU kernels (float and double).
//
// exp: Cody-Waite range reduction and the Cephes polynomials (about 1 ulp), 2^n built in
// the exponent bits, written without libm calls or branches so that `#pragma omp simd`
// loops vectorise. sigmoid(x) = 1 / (1 + exp(-x)); tanh(p) = 2 sigmoid(2 p) - 1.
#pragma once

#include <bit>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dinrec {

#pragma omp declare simd notinbranch
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 87.0f ? 87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + magic;
  const int32_t n = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(magic);
  const float nf = t - magic;
  float r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((n + 127) << 23);
}

#pragma omp declare simd notinbranch
inline double exp_approx(double x) {
  x = x < -700.0 ? -700.0 : x;
  x = x > 700.0 ? 700.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634073599 + magic;
  const int64_t n = std::bit_cast<int64_t>(t) - std::bit_cast<int64_t>(magic);
  const double nf = t - magic;
  double r = x - nf * 6.93145751953125e-1;
  r = r - nf * 1.42860682030941723212e-6;
  const double rr = r * r;
  double p = 1.26177193074810590878e-4;
  p = p * rr + 3.02994407707441961300e-2;
  p = p * rr + 9.99999999999999999910e-1;
  p = p * r;
  double q = 3.00198505138664455042e-6;
  q = q * rr + 2.52448340349684104192e-3;
  q = q * rr + 2.27265548208155028766e-1;
  q = q * rr + 2.00000000000000000009e0;
  const double e = 1.0 + 2.0 * (p / (q - p));
  return e * std::bit_cast<double>((n + 1023) << 52);
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

#if defined(__AVX512F__)
// sigmoid on 16 float lanes: 2^n applied by vscalefps, 1 / d by a reciprocal estimate and
// one Newton step (2^-28 relative). About 2e-7 relative overall.
inline __m512 sigmoid16(__m512 x) {
  const __m512 lhi = _mm512_set1_ps(-1.44269502162933349609375f);
  // the constant first: max / min return their second operand where one is NaN
  x = _mm512_min_ps(_mm512_set1_ps(87.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 y = _mm512_mul_ps(x, lhi);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(x, lhi, n);
  f = _mm512_fmadd_ps(x, _mm512_set1_ps(-1.925963033500011e-08f), f);
  __m512 p = _mm512_set1_ps(1.3276470e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755419e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507135e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), one);
  const __m512 z = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, z, one), z, z);
}
#endif

// h[i] = sigmoid(h[i]) for i < len.
template <typename T>
inline void sigmoid_inplace(T* h, int64_t len) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 16 <= len; i += 16) _mm512_storeu_ps(h + i, sigmoid16(_mm512_loadu_ps(h + i)));
  }
#endif
#pragma omp simd
  for (int64_t k = i; k < len; ++k) h[k] = sigmoid(h[k]);
}

// acc[r] += w sigmoid(h[r] + b) for r < n.
template <typename T>
inline void sigmoid_axpy(T* acc, const T* h, int64_t n, T w, T b) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 wv = _mm512_set1_ps(w), bv = _mm512_set1_ps(b);
    for (; r + 16 <= n; r += 16) {
      const __m512 s = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(h + r), bv));
      _mm512_storeu_ps(acc + r, _mm512_fmadd_ps(wv, s, _mm512_loadu_ps(acc + r)));
    }
  }
#endif
#pragma omp simd
  for (int64_t k = r; k < n; ++k) acc[k] += w * sigmoid(h[k] + b);
}

}  // namespace dinrec
