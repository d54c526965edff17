// dinrec_cpp::offset_mlp_forward / offset_mlp_backward: a two-hidden-layer sigmoid MLP
// whose first layer has a per-row offset, fused per tile of rows (see dinrec/nn/_ops.py).
//
//   h1 = sigmoid(offset[idx] + x w1^T)   x (N, K), offset (R, A), idx (N,), w1 (A, K)
//   h2 = sigmoid(h1 w2^T + b2)           w2 (A2, A), b2 (A2,)
//   s  = h2 w3^T + b3                    w3 (1, A2), b3 (1,)  -> s (N,)
//
// Both hot MLPs of the default models have this shape: DIN's attention MLP on the packed
// events (x = [f, f * q[row]], offset = the query part of the first layer, one row per
// batch row) and DIEN's auxiliary MLP (x = the items, offset = the state part, one row per
// pair). Given q (R, D), x is not passed but built per tile from the facts f (N, D):
// x = [f, f * q[idx]] (K = 2D), and the backward returns g_f (N, D) and g_q (R, D).
//
// The rows run in tiles of kTile: per tile the matrix products go through ATen's
// CPU kernels directly (at::cpu::mm_out / addmm_out: no dispatcher, no autograd), and all
// elementwise work (the offset gather-add, the sigmoids, the score layer's dot product,
// the sigmoid backward, the row sums into g_offset, the bias and score-layer gradients)
// runs in loops on the tile while it is in cache. Weight gradients accumulate across tiles.
// Tiles are split into contiguous chunks over ATen's threads; each chunk accumulates its
// own gradients, summed at the end.
//
// products = "bfloat16" (float32 tensors only): every matrix product takes bfloat16 operands
// and accumulates in float32 (at::native::cpublas::brgemm, oneDNN's micro-kernel; its B
// operand in the VNNI layout, row pairs interleaved). The operands are converted inside the
// tile loops (the weights once per call); every tile is a full kTile rows, the last one
// padded with zero rows, so the micro-kernels have one shape per call (created once,
// then cached). Elementwise work, the offset and the gradient sums stay float32.
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "math.h"
#include "scratch.h"

namespace dinrec {
namespace {

// Rows per tile: x, h1, h2 and the backward's g_h1, g_h2 of one tile (~0.5 MB at K = 72,
// A = 80, A2 = 40, float32) stay in L2.
constexpr int64_t kTile = 512;


struct Shapes {
  int64_t n, k, a, a2, r;
  int64_t d;  // the facts' width where x = [f, f * q[idx]] (K = 2D); 0 where x is given
};

// The first layer's input: x (N, K) itself, or the facts f (N, D) and q (R, D).
template <typename T>
struct Input {
  const T* x;  // x or f
  const T* q;  // nullptr where x is given
  const int64_t* idx;
};

// Rows [n0, n0 + len) of the first layer's input, (len, K) row-major: x's own rows, or
// [f, f * q[idx]] built in buf.
template <typename T>
const T* input_rows(const Input<T>& in, const Shapes& sh, int64_t n0, int64_t len, T* buf) {
  if (in.q == nullptr) return in.x + n0 * sh.k;
  for (int64_t r = 0; r < len; ++r) {
    const T* f = in.x + (n0 + r) * sh.d;
    const T* q = in.q + in.idx[n0 + r] * sh.d;
    T* out = buf + r * sh.k;
#pragma omp simd
    for (int64_t j = 0; j < sh.d; ++j) {
      out[j] = f[j];
      out[sh.d + j] = f[j] * q[j];
    }
  }
  return buf;
}

// g_x (len, K) of rows [n0, n0 + len) -> g_f rows (at g_f) and g_q += (R, D), where x = [f, f * q[idx]]:
// g_f = g_x[:, :D] + g_x[:, D:] * q[idx], g_q[idx] += g_x[:, D:] * f.
template <typename T>
void input_grads(const T* g_x, const Input<T>& in, const Shapes& sh, int64_t n0, int64_t len, T* g_f, T* g_q) {
  for (int64_t r = 0; r < len; ++r) {
    const T* gk = g_x + r * sh.k;
    const T* gp = gk + sh.d;
    const T* f = in.x + (n0 + r) * sh.d;
    const int64_t row = in.idx[n0 + r];
    const T* q = in.q + row * sh.d;
    T* gq = g_q + row * sh.d;
    T* out = g_f + r * sh.d;
#pragma omp simd
    for (int64_t j = 0; j < sh.d; ++j) {
      out[j] = gk[j] + gp[j] * q[j];
      gq[j] += gp[j] * f[j];
    }
  }
}

Shapes check_forward(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& idx,
                     const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b2,
                     const at::Tensor& w3, const at::Tensor& b3, const at::Tensor* q) {
  TORCH_CHECK(x.device().is_cpu(), "offset_mlp: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "offset_mlp: float32 or float64 only");
  for (const auto& t : {offset, w1, w2, b2, w3, b3})
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(),
                "offset_mlp: all tensors must share one dtype on the CPU");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.device().is_cpu(),
              "offset_mlp: idx must be a 1-d int64 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && offset.dim() == 2 && w1.dim() == 2 && w2.dim() == 2,
              "offset_mlp: expected x (N, K), offset (R, A), w1 (A, K), w2 (A2, A)");
  const int64_t d = q ? x.size(1) : 0;
  const Shapes s{x.size(0), q ? 2 * d : x.size(1), w1.size(0), w2.size(0), offset.size(0), d};
  if (q != nullptr)
    TORCH_CHECK(q->scalar_type() == x.scalar_type() && q->device().is_cpu() && q->dim() == 2 &&
                    q->size(0) == s.r && q->size(1) == d,
                "offset_mlp: q must be (R, D) for facts (N, D) and offset (R, A), of their dtype");
  TORCH_CHECK(idx.size(0) == s.n && w1.size(1) == s.k && offset.size(1) == s.a && w2.size(1) == s.a &&
                  b2.numel() == s.a2 && w3.numel() == s.a2 && b3.numel() == 1,
              "offset_mlp: shapes disagree (x (N, K), offset (R, A), idx (N,), w1 (A, K), "
              "w2 (A2, A), b2 (A2,), w3 (1, A2), b3 (1,))");
  const int64_t* ix = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.n; ++i)
    TORCH_CHECK(ix[i] >= 0 && ix[i] < s.r, "offset_mlp: idx out of range [0, ", s.r, ")");
  return s;
}

// The tiles [0, tiles) of N rows in `parts` contiguous chunks: chunk p holds [cuts[p], cuts[p + 1]).
std::vector<int64_t> chunk_tiles(int64_t n) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  std::vector<int64_t> cuts(parts + 1);
  for (int64_t p = 0; p <= parts; ++p) cuts[p] = tiles * p / parts;
  return cuts;
}

// Run body(p, tile0, tile1) for every chunk: inline for one chunk, else over ATen's threads
// (each chunk on one thread, whose matrix products then run on that thread).
template <typename F>
void for_chunks(const std::vector<int64_t>& cuts, const F& body) {
  const int64_t parts = static_cast<int64_t>(cuts.size()) - 1;
  if (parts == 1) {
    body(0, cuts[0], cuts[1]);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) body(p, cuts[p], cuts[p + 1]);
  });
}

// Forward of rows [n0, n1): h1, h2 and s of those rows.
template <typename T>
void forward_tile(int64_t n0, int64_t n1, const Shapes& sh, const Input<T>& in, const T* offset,
                  const at::Tensor& w1t, const at::Tensor& w2t, const T* b2, const T* w3, T b3,
                  at::Tensor& h1, at::Tensor& h2, T* s) {
  const int64_t len = n1 - n0;
  const T* xr = input_rows(in, sh, n0, len, scratch<T, 1>(kTile * sh.k));
  const auto x_t = at::from_blob(const_cast<T*>(xr), {len, sh.k}, h1.options());  // (len, K)
  auto h1_t = h1.narrow(0, n0, len);  // (len, A)
  at::cpu::mm_out(h1_t, x_t, w1t);
  T* p1 = h1.data_ptr<T>() + n0 * sh.a;
  for (int64_t r = 0; r < len; ++r) {
    const T* off = offset + in.idx[n0 + r] * sh.a;
    T* row = p1 + r * sh.a;
#pragma omp simd
    for (int64_t j = 0; j < sh.a; ++j) row[j] += off[j];
  }
  sigmoid_inplace(p1, len * sh.a);
  auto h2_t = h2.narrow(0, n0, len);  // (len, A2)
  at::cpu::mm_out(h2_t, h1_t, w2t);
  T* p2 = h2.data_ptr<T>() + n0 * sh.a2;
  for (int64_t r = 0; r < len; ++r) {
    T* row = p2 + r * sh.a2;
#pragma omp simd
    for (int64_t j = 0; j < sh.a2; ++j) row[j] += b2[j];
  }
  sigmoid_inplace(p2, len * sh.a2);
  for (int64_t r = 0; r < len; ++r) {
    const T* row = p2 + r * sh.a2;
    T acc = b3;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < sh.a2; ++j) acc += row[j] * w3[j];
    s[n0 + r] = acc;
  }
}


// ----------------------------------------------------------------- bfloat16 products
using bf16 = at::BFloat16;

// Whether `products` asks for bfloat16 products (checked: "float32" or "bfloat16").
bool bf16_products(std::string_view products, const at::Tensor& x, const Shapes& sh) {
  TORCH_CHECK(products == "float32" || products == "bfloat16",
              "offset_mlp: products must be 'float32' or 'bfloat16', got '", products, "'");
  if (products == "float32") return false;
  TORCH_CHECK(x.scalar_type() == at::kFloat, "offset_mlp: bfloat16 products need float32 tensors");
  TORCH_CHECK(sh.k % 2 == 0 && sh.a % 2 == 0 && sh.a2 % 2 == 0,
              "offset_mlp: bfloat16 products need even K, A and A2 (the VNNI layout pairs them)");
  return true;
}

// dst[i] = bf16(src[i]) for i < n (round to nearest even), zero for n <= i < padded.
inline void to_bf16(const float* src, bf16* dst, int64_t n, int64_t padded) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = bf16(src[i]);
  std::fill(dst + n, dst + padded, bf16(0.0f));
}

// A matrix product's B operand (kdim, n) in the VNNI layout, rows k and k + 1 interleaved:
// dst[k n + 2 j + (k % 2)] = src[k sk + j sj] for k < rows, zero for rows <= k < kdim (even).
inline void to_vnni(const float* src, int64_t sk, int64_t sj, int64_t rows, int64_t kdim, int64_t n, bf16* dst) {
  for (int64_t k = 0; k < kdim; k += 2) {
    bf16* out = dst + k * n;
    for (int64_t h = 0; h < 2; ++h) {
      const float* in = src + (k + h) * sk;
      if (k + h < rows) {
        for (int64_t j = 0; j < n; ++j) out[2 * j + h] = bf16(in[j * sj]);
      } else {
        for (int64_t j = 0; j < n; ++j) out[2 * j + h] = bf16(0.0f);
      }
    }
  }
}

// dst (m, kTile) = src (rows, m)^T in bfloat16, zero in the columns rows <= r < kTile.
inline void to_bf16_t(const float* src, int64_t rows, int64_t m, bf16* dst) {
  for (int64_t i = 0; i < m; ++i) {
    bf16* out = dst + i * kTile;
    for (int64_t r = 0; r < rows; ++r) out[r] = bf16(src[r * m + i]);
    std::fill(out + rows, out + kTile, bf16(0.0f));
  }
}

// C (m, n; row stride ldc) (+)= A (m, k) B (k, n): A row-major bfloat16, B in VNNI layout.
inline void brgemm(int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* b, float* c, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(m, n, k, k, n, ldc, add, a, b, c, /*is_vnni=*/true);
}

// The weights as B operands, once per call: w1^T (K, A), w2^T (A, A2) for the forward;
// w2 (A2, A), w1 (A, K) for the backward.
struct PackedWeights {
  at::Tensor w1t, w2t, w2, w1;
  PackedWeights(const at::Tensor& w1_, const at::Tensor& w2_, const Shapes& sh, bool forward, bool need_x) {
    const auto opts = w1_.options().dtype(at::kBFloat16);
    const auto w1c = w1_.contiguous(), w2c = w2_.contiguous();
    const float* p1 = w1c.data_ptr<float>();
    const float* p2 = w2c.data_ptr<float>();
    auto make = [&](const float* src, int64_t sk, int64_t sj, int64_t rows, int64_t n) {
      auto t = at::empty({rows * n}, opts);
      to_vnni(src, sk, sj, rows, rows, n, t.data_ptr<bf16>());
      return t;
    };
    if (forward) {
      w1t = make(p1, 1, sh.k, sh.k, sh.a);
      w2t = make(p2, 1, sh.a, sh.a, sh.a2);
    } else {
      w2 = make(p2, sh.a, 1, sh.a2, sh.a);
      if (need_x) w1 = make(p1, sh.k, 1, sh.a, sh.k);
    }
  }
};

// forward_tile with bfloat16 products for rows [n0, n0 + len); h1, h2, s at the tile's first row.
void forward_tile_bf16(int64_t n0, int64_t len, const Shapes& sh, const Input<float>& in, const float* offset,
                       const PackedWeights& w, const float* b2, const float* w3, float b3, float* h1, float* h2,
                       float* s) {
  const int64_t* idx = in.idx + n0;
  bf16* xb = scratch<bf16>(kTile * (sh.k + sh.a));  // (kTile, K), then h1 (kTile, A)
  bf16* h1b = xb + kTile * sh.k;
  float* tail = len < kTile ? scratch<float>(kTile * (sh.a + sh.a2)) : nullptr;  // the short tile's outputs
  float* c1 = tail ? tail : h1;
  float* c2 = tail ? tail + kTile * sh.a : h2;
  to_bf16(input_rows(in, sh, n0, len, scratch<float, 1>(kTile * sh.k)), xb, len * sh.k, kTile * sh.k);
  brgemm(kTile, sh.a, sh.k, xb, w.w1t.data_ptr<bf16>(), c1, sh.a, false);
  for (int64_t r = 0; r < len; ++r) {
    const float* off = offset + idx[r] * sh.a;
#pragma omp simd
    for (int64_t j = 0; j < sh.a; ++j) h1[r * sh.a + j] = c1[r * sh.a + j] + off[j];
  }
  sigmoid_inplace(h1, len * sh.a);
  to_bf16(h1, h1b, len * sh.a, kTile * sh.a);
  brgemm(kTile, sh.a2, sh.a, h1b, w.w2t.data_ptr<bf16>(), c2, sh.a2, false);
  for (int64_t r = 0; r < len; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < sh.a2; ++j) h2[r * sh.a2 + j] = c2[r * sh.a2 + j] + b2[j];
  }
  sigmoid_inplace(h2, len * sh.a2);
  for (int64_t r = 0; r < len; ++r) {
    float acc = b3;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < sh.a2; ++j) acc += h2[r * sh.a2 + j] * w3[j];
    s[r] = acc;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> offset_mlp_forward(
    const at::Tensor& x_, const at::Tensor& offset_, const at::Tensor& idx_, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& b2_, const at::Tensor& w3_, const at::Tensor& b3_,
    c10::string_view products, const std::optional<at::Tensor>& q_) {
  auto x = x_.contiguous(), offset = offset_.contiguous(), idx = idx_.contiguous();
  auto b2 = b2_.contiguous(), w3 = w3_.contiguous(), b3 = b3_.contiguous();
  const at::Tensor q = q_.has_value() ? q_->contiguous() : at::Tensor();
  const Shapes sh = check_forward(x, offset, idx, w1, w2, b2, w3, b3, q.defined() ? &q : nullptr);
  const bool low = bf16_products(std::string_view(products.data(), products.size()), x, sh);
  auto h1 = at::empty({sh.n, sh.a}, x.options());
  auto h2 = at::empty({sh.n, sh.a2}, x.options());
  auto s = at::empty({sh.n}, x.options());
  if (sh.n == 0) return {s, h1, h2};
  const auto cuts = chunk_tiles(sh.n);
  if (low) {
    const PackedWeights w(w1, w2, sh, true, false);
    const float b3v = b3.data_ptr<float>()[0];
    const Input<float> in{x.data_ptr<float>(), q.defined() ? q.data_ptr<float>() : nullptr, idx.data_ptr<int64_t>()};
    for_chunks(cuts, [&](int64_t, int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTile, len = std::min(sh.n, n0 + kTile) - n0;
        forward_tile_bf16(n0, len, sh, in, offset.data_ptr<float>(), w, b2.data_ptr<float>(), w3.data_ptr<float>(), b3v,
                          h1.data_ptr<float>() + n0 * sh.a, h2.data_ptr<float>() + n0 * sh.a2,
                          s.data_ptr<float>() + n0);
      }
      at::native::cpublas::brgemm_release();
    });
    return {s, h1, h2};
  }
  const auto w1t = w1.t(), w2t = w2.t();  // (K, A), (A, A2)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "offset_mlp_forward", [&] {
    const scalar_t b3v = b3.data_ptr<scalar_t>()[0];
    const Input<scalar_t> in{x.data_ptr<scalar_t>(), q.defined() ? q.data_ptr<scalar_t>() : nullptr,
                             idx.data_ptr<int64_t>()};
    for_chunks(cuts, [&](int64_t, int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        forward_tile<scalar_t>(t * kTile, std::min(sh.n, (t + 1) * kTile), sh, in, offset.data_ptr<scalar_t>(),
                               w1t, w2t, b2.data_ptr<scalar_t>(), w3.data_ptr<scalar_t>(), b3v, h1, h2,
                               s.data_ptr<scalar_t>());
    });
  });
  return {s, h1, h2};
}

// One chunk's gradient accumulators (zero at the start).
struct Grads {
  at::Tensor offset, w1, w2, b2, w3, b3, q;  // q: (R, D) where x = [f, f * q[idx]] and g_x is asked for
  Grads(const Shapes& sh, const at::TensorOptions& o, bool need_q)
      : offset(at::zeros({sh.r, sh.a}, o)), w1(at::zeros({sh.a, sh.k}, o)), w2(at::zeros({sh.a2, sh.a}, o)),
        b2(at::zeros({sh.a2}, o)), w3(at::zeros({1, sh.a2}, o)), b3(at::zeros({1}, o)),
        q(need_q ? at::zeros({sh.r, sh.d}, o) : at::empty({0, sh.d}, o)) {}
  void add(const Grads& o) {
    offset.add_(o.offset), w1.add_(o.w1), w2.add_(o.w2), b2.add_(o.b2), w3.add_(o.w3), b3.add_(o.b3), q.add_(o.q);
  }
};

// g_h2 (len, A2) of rows [n0, n1) from the score gradient g, and the score layer's and
// b2's gradients of those rows.
template <typename T>
void score_backward(int64_t n0, int64_t len, int64_t a2, const T* g, const T* h2, const T* w3, T* g_h2,
                    Grads& acc) {
  T* gw3 = acc.w3.data_ptr<T>();
  T* gb2 = acc.b2.data_ptr<T>();
  T gb3 = 0;
  for (int64_t r = 0; r < len; ++r) {
    const T gr = g[n0 + r];
    const T* hr = h2 + (n0 + r) * a2;
    T* out = g_h2 + r * a2;
    gb3 += gr;
#pragma omp simd
    for (int64_t j = 0; j < a2; ++j) {
      gw3[j] += gr * hr[j];
      out[j] = gr * w3[j] * (T(1) - hr[j]) * hr[j];
      gb2[j] += out[j];
    }
  }
  acc.b3.data_ptr<T>()[0] += gb3;
}

// Backward of rows [n0, n1) (see offset_mlp_backward); g_h1 / g_h2 are the chunk's tile buffers.
template <typename T>
void backward_tile(int64_t n0, int64_t n1, const Shapes& sh, const T* g, const Input<T>& in,
                   const at::Tensor& w1, const at::Tensor& w2, const T* w3, const at::Tensor& h1,
                   const at::Tensor& h2, T* g_h1, T* g_h2, at::Tensor* g_x, Grads& acc) {
  const int64_t len = n1 - n0;
  const auto opts = h1.options();
  const int64_t* idx = in.idx;
  score_backward<T>(n0, len, sh.a2, g, h2.data_ptr<T>(), w3, g_h2, acc);
  auto g_h2_t = at::from_blob(g_h2, {len, sh.a2}, opts);  // (len, A2)
  auto h1_t = h1.narrow(0, n0, len);  // (len, A)
  at::cpu::addmm_out(acc.w2, acc.w2, g_h2_t.t(), h1_t);  // (A2, A) += g_h2^T h1
  auto g_h1_t = at::from_blob(g_h1, {len, sh.a}, opts);  // (len, A)
  at::cpu::mm_out(g_h1_t, g_h2_t, w2);
  const T* p1 = h1.data_ptr<T>() + n0 * sh.a;
  T* g_off = acc.offset.data_ptr<T>();
  for (int64_t r = 0; r < len; ++r) {
    T* gr = g_h1 + r * sh.a;
    const T* hr = p1 + r * sh.a;
    T* go = g_off + idx[n0 + r] * sh.a;
#pragma omp simd
    for (int64_t j = 0; j < sh.a; ++j) {
      gr[j] *= (T(1) - hr[j]) * hr[j];
      go[j] += gr[j];
    }
  }
  const T* xr = input_rows(in, sh, n0, len, scratch<T, 1>(kTile * sh.k));
  const auto x_t = at::from_blob(const_cast<T*>(xr), {len, sh.k}, opts);  // (len, K)
  at::cpu::addmm_out(acc.w1, acc.w1, g_h1_t.t(), x_t);  // (A, K) += g_h1^T x
  if (g_x == nullptr) return;
  if (in.q == nullptr) {
    auto g_x_t = g_x->narrow(0, n0, len);
    at::cpu::mm_out(g_x_t, g_h1_t, w1);  // (len, K)
    return;
  }
  T* gx = scratch<T, 2>(kTile * sh.k);
  auto g_x_t = at::from_blob(gx, {len, sh.k}, opts);
  at::cpu::mm_out(g_x_t, g_h1_t, w1);  // (len, K), then g_f (len, D) and g_q
  input_grads(gx, in, sh, n0, len, g_x->data_ptr<T>() + n0 * sh.d, acc.q.data_ptr<T>());
}


// backward_tile with bfloat16 products for rows [n0, n0 + len); g, h1, h2, g_x at the tile's
// first row (g_x: g_f (len, D) where x = [f, f * q[idx]]).
void backward_tile_bf16(int64_t n0, int64_t len, const Shapes& sh, const float* g, const Input<float>& in,
                        const PackedWeights& w, const float* w3, const float* h1, const float* h2, float* g_x,
                        Grads& acc) {
  const int64_t t = kTile;
  const int64_t* idx = in.idx + n0;
  float* g_h2 = scratch<float>(t * (sh.a2 + sh.a + sh.k));  // (T, A2), then g_h1 (T, A), g_x (T, K)
  float* g_h1 = g_h2 + t * sh.a2;
  bf16* b = scratch<bf16>(t * (2 * sh.a2 + 3 * sh.a + sh.k));
  bf16* g_h2b = b;                   // (T, A2)
  bf16* g_h2t = g_h2b + t * sh.a2;   // (A2, T)
  bf16* h1v = g_h2t + t * sh.a2;     // (T, A) VNNI
  bf16* g_h1b = h1v + t * sh.a;      // (T, A)
  bf16* g_h1t = g_h1b + t * sh.a;    // (A, T)
  bf16* xv = g_h1t + t * sh.a;       // (T, K) VNNI
  score_backward<float>(0, len, sh.a2, g, h2, w3, g_h2, acc);
  to_bf16(g_h2, g_h2b, len * sh.a2, t * sh.a2);
  to_bf16_t(g_h2, len, sh.a2, g_h2t);
  to_vnni(h1, sh.a, 1, len, t, sh.a, h1v);
  brgemm(sh.a2, sh.a, t, g_h2t, h1v, acc.w2.data_ptr<float>(), sh.a, true);  // (A2, A) += g_h2^T h1
  brgemm(t, sh.a, sh.a2, g_h2b, w.w2.data_ptr<bf16>(), g_h1, sh.a, false);
  float* g_off = acc.offset.data_ptr<float>();
  for (int64_t r = 0; r < len; ++r) {
    float* gr = g_h1 + r * sh.a;
    const float* hr = h1 + r * sh.a;
    float* go = g_off + idx[r] * sh.a;
#pragma omp simd
    for (int64_t j = 0; j < sh.a; ++j) {
      gr[j] *= (1.0f - hr[j]) * hr[j];
      go[j] += gr[j];
    }
  }
  to_bf16_t(g_h1, len, sh.a, g_h1t);
  to_vnni(input_rows(in, sh, n0, len, scratch<float, 1>(t * sh.k)), sh.k, 1, len, t, sh.k, xv);
  brgemm(sh.a, sh.k, t, g_h1t, xv, acc.w1.data_ptr<float>(), sh.k, true);  // (A, K) += g_h1^T x
  if (g_x != nullptr) {
    to_bf16(g_h1, g_h1b, len * sh.a, t * sh.a);
    float* c = len == t && in.q == nullptr ? g_x : g_h2 + t * (sh.a2 + sh.a);
    brgemm(t, sh.k, sh.a, g_h1b, w.w1.data_ptr<bf16>(), c, sh.k, false);  // (T, K)
    if (in.q != nullptr) {
      input_grads(c, in, sh, n0, len, g_x, acc.q.data_ptr<float>());
    } else if (c != g_x) {
      std::copy(c, c + len * sh.k, g_x);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
offset_mlp_backward(const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& idx_, const at::Tensor& w1_,
                    const at::Tensor& w2_, const at::Tensor& w3_, const at::Tensor& h1_, const at::Tensor& h2_,
                    int64_t rows, bool need_x, c10::string_view products, const std::optional<at::Tensor>& q_) {
  auto g = g_.contiguous(), x = x_.contiguous(), idx = idx_.contiguous(), w1 = w1_.contiguous();
  auto w2 = w2_.contiguous(), w3 = w3_.contiguous(), h1 = h1_.contiguous(), h2 = h2_.contiguous();
  const at::Tensor q = q_.has_value() ? q_->contiguous() : at::Tensor();
  const int64_t d = q.defined() ? x.size(1) : 0;
  const Shapes sh{x.size(0), q.defined() ? 2 * d : x.size(1), w1.size(0), w2.size(0), rows, d};
  TORCH_CHECK(g.dim() == 1 && g.size(0) == sh.n && idx.size(0) == sh.n && h1.size(0) == sh.n &&
                  h1.size(1) == sh.a && h2.size(0) == sh.n && h2.size(1) == sh.a2 && w1.size(1) == sh.k &&
                  (!q.defined() || (q.dim() == 2 && q.size(0) == rows && q.size(1) == d &&
                                    q.scalar_type() == g.scalar_type())),
              "offset_mlp_backward: shapes disagree");
  for (const auto& t : {x, w1, w2, w3, h1, h2})
    TORCH_CHECK(t.scalar_type() == g.scalar_type() && t.device().is_cpu(),
                "offset_mlp_backward: all tensors must share one dtype on the CPU");
  const bool low = bf16_products(std::string_view(products.data(), products.size()), x, sh);
  const auto opts = x.options();
  const int64_t width = x.size(1);  // K, or D where x = [f, f * q[idx]]
  auto g_x = need_x ? at::empty({sh.n, width}, opts) : at::empty({0, width}, opts);
  const auto cuts = chunk_tiles(sh.n);
  std::vector<Grads> acc;
  for (size_t p = 0; p + 1 < cuts.size(); ++p) acc.emplace_back(sh, opts, need_x && q.defined());
  if (sh.n > 0 && low) {
    const PackedWeights w(w1, w2, sh, false, need_x);
    const Input<float> in{x.data_ptr<float>(), q.defined() ? q.data_ptr<float>() : nullptr, idx.data_ptr<int64_t>()};
    for_chunks(cuts, [&](int64_t p, int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTile, len = std::min(sh.n, n0 + kTile) - n0;
        backward_tile_bf16(n0, len, sh, g.data_ptr<float>() + n0, in, w, w3.data_ptr<float>(),
                           h1.data_ptr<float>() + n0 * sh.a, h2.data_ptr<float>() + n0 * sh.a2,
                           need_x ? g_x.data_ptr<float>() + n0 * width : nullptr, acc[p]);
      }
      at::native::cpublas::brgemm_release();
    });
  } else if (sh.n > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "offset_mlp_backward", [&] {
      const Input<scalar_t> in{x.data_ptr<scalar_t>(), q.defined() ? q.data_ptr<scalar_t>() : nullptr,
                               idx.data_ptr<int64_t>()};
      for_chunks(cuts, [&](int64_t p, int64_t t0, int64_t t1) {
        scalar_t* buf = scratch<scalar_t>(kTile * (sh.a + sh.a2));
        for (int64_t t = t0; t < t1; ++t)
          backward_tile<scalar_t>(t * kTile, std::min(sh.n, (t + 1) * kTile), sh, g.data_ptr<scalar_t>(), in,
                                  w1, w2, w3.data_ptr<scalar_t>(), h1, h2, buf, buf + kTile * sh.a,
                                  need_x ? &g_x : nullptr, acc[p]);
      });
    });
  }
  for (size_t p = 1; p < acc.size(); ++p) acc[0].add(acc[p]);
  const Grads& out = acc[0];
  return {g_x, out.q, out.offset, out.w1, out.w2, out.b2, out.w3, out.b3};
}

}  // namespace
}  // namespace dinrec

TORCH_LIBRARY_FRAGMENT(dinrec_cpp, m) {
  m.def("offset_mlp_forward(Tensor x, Tensor offset, Tensor idx, Tensor w1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, str products, Tensor? q) -> (Tensor, Tensor, Tensor)");
  m.def("offset_mlp_backward(Tensor g, Tensor x, Tensor idx, Tensor w1, Tensor w2, Tensor w3, Tensor h1, Tensor h2, int rows, bool need_x, str products, Tensor? q) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dinrec_cpp, CPU, m) {
  m.impl("offset_mlp_forward", &dinrec::offset_mlp_forward);
  m.impl("offset_mlp_backward", &dinrec::offset_mlp_backward);
}
