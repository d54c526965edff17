// dinrec_cpp::candidate_scores: the attention scores of N candidate queries against one
// history, the inference path of din_fcn_attention for ranking (see
// dinrec/nn/candidate_scores.py for the algebra).
//
// With q the projected candidates (N, D), keys the history's valid positions (Tv, D) and
//   M[d, t, a] = keys[t, d] W_p[a, d] + (W_q + W_d)[a, d]   (d < D)
//   M[D, t, a] = ((W_k - W_d) keys[t] + b1)[a]
// the first layer of every (candidate, position) pair is [q, 1] (N, D+1) @ M (D+1, Tv*A).
// Per chunk of candidates (about kChunkRows pairs, so the intermediates stay in L2): one
// matrix product per layer, one vectorised sigmoid pass, and one fused pass from the second
// layer's pre-activations to the scores, b3 + sum_j w3[j] sigmoid(h2[j] + b2[j]), straight
// into the output. From kSplitRows pairs on, the candidates are shared equally over ATen's threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/CPUFunctions.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#include "math.h"
#include "scratch.h"

namespace dinrec {
namespace {

// Pairs per chunk: ~2.6 MB of float32 intermediates at A = 80, H2 = 40 (measured on Zen4
// with 1 MB L2 per core: 5.8 ms at 2048 pairs, 5.5 at 4096, 5.2 at 8192 and 16384).
constexpr int64_t kChunkRows = 8192;
// Split over threads from this many pairs on (a gain from about 5,000 pairs, none at 3,000).
constexpr int64_t kSplitRows = 4096;
constexpr int64_t kBlock = 256;

// Scratch tags (scratch.h): 0, the chunks' intermediates; 1, 2: the first layer's matrix
// and queries.

template <int Tag>
at::Tensor reused(at::IntArrayRef shape, const at::TensorOptions& opts) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  void* p = opts.dtype() == at::kDouble ? static_cast<void*>(scratch<double, Tag>(n))
                                        : static_cast<void*>(scratch<float, Tag>(n));
  return at::from_blob(p, shape, opts);
}

// Scores of candidates [c0, c1): q (N, D1) row-major, m (D1, Tv*A), out (N, Tv).
// The matrix products go through ATen's CPU kernels directly (at::cpu::mm_out: no
// dispatcher, no autograd), on the calling thread's BLAS (one thread inside the region).
template <typename T>
void score_chunk(int64_t c0, int64_t c1, int64_t tv, int64_t a, int64_t hid, const at::Tensor& q,
                 const at::Tensor& m, const at::Tensor& w2t, const T* b2, const T* w3, T b3, T* out) {
  const int64_t nc = c1 - c0, rows = nc * tv;
  T* buf = scratch<T>(rows * (a + hid));
  auto opts = q.options();
  auto h1 = at::from_blob(buf, {nc, tv * a}, opts);  // (nc, Tv*A), rows (n, t), columns a
  at::cpu::mm_out(h1, q.narrow(0, c0, nc), m);
  sigmoid_inplace(buf, rows * a);
  // h2 (H2, rows): each hidden unit's pre-activations contiguous for the fused pass.
  T* h2 = buf + rows * a;
  auto h2t = at::from_blob(h2, {rows, hid}, {1, rows}, opts);  // its transpose, (rows, H2)
  at::cpu::mm_out(h2t, h1.view({rows, a}), w2t);
  T* o = out + c0 * tv;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t nb = std::min(kBlock, rows - r0);
    T acc[kBlock];
    for (int64_t r = 0; r < nb; ++r) acc[r] = T(0);
    for (int64_t j = 0; j < hid; ++j) sigmoid_axpy(acc, h2 + j * rows + r0, nb, w3[j], b2[j]);
    for (int64_t r = 0; r < nb; ++r) o[r0 + r] = acc[r] + b3;
  }
}

// m[i, t, :] = keys[t, i] wp[:, i] + wq[:, i] for i < D; m (D+1, Tv, A).
template <typename T>
void first_layer(int64_t d, int64_t tv, int64_t a, const T* keys, const T* wq, const T* wp, T* m) {
  std::vector<T> wqc(a), wpc(a);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < a; ++j) {
      wqc[j] = wq[j * d + i];
      wpc[j] = wp[j * d + i];
    }
    for (int64_t t = 0; t < tv; ++t) {
      const T k = keys[t * d + i];
      T* row = m + (i * tv + t) * a;
#pragma omp simd
      for (int64_t j = 0; j < a; ++j) row[j] = k * wpc[j] + wqc[j];
    }
  }
}

at::Tensor candidate_scores(const at::Tensor& q_, const at::Tensor& keys_, const at::Tensor& w_query_,
                            const at::Tensor& w_key, const at::Tensor& w_prod_, const at::Tensor& b1,
                            const at::Tensor& w2_, const at::Tensor& b2_, const at::Tensor& w3_,
                            const at::Tensor& b3_) {
  TORCH_CHECK(q_.device().is_cpu(), "candidate_scores: CPU tensors only");
  TORCH_CHECK(q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kDouble,
              "candidate_scores: float32 or float64 only");
  for (const auto& t : {keys_, w_query_, w_key, w_prod_, b1, w2_, b2_, w3_, b3_})
    TORCH_CHECK(t.scalar_type() == q_.scalar_type() && t.device().is_cpu(),
                "candidate_scores: all tensors must share one dtype on the CPU");
  const int64_t n = q_.size(0), d = q_.size(1), tv = keys_.size(0), a = w_query_.size(0);
  const int64_t hid = w2_.size(0), d1 = d + 1;
  auto keys = keys_.contiguous(), wq = w_query_.contiguous(), wp = w_prod_.contiguous();
  auto w2t = w2_.t(), b2 = b2_.contiguous(), w3 = w3_.contiguous();
  auto m = reused<1>({d1, tv, a}, q_.options());
  auto q = reused<2>({n, d1}, q_.options());
  q.narrow(1, 0, d).copy_(q_);
  q.select(1, d).fill_(1);
  auto history_part = m.select(0, d);  // (Tv, A): ((W_k - W_d) keys + b1)
  at::addmm_out(history_part, b1, keys, w_key.t());
  auto out = at::empty({n, tv}, q_.options());
  if (n == 0 || tv == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "candidate_scores", [&] {
    using T = scalar_t;
    first_layer<T>(d, tv, a, keys.data_ptr<T>(), wq.data_ptr<T>(), wp.data_ptr<T>(), m.data_ptr<T>());
    const int64_t threads = n * tv >= kSplitRows ? std::min<int64_t>(at::get_num_threads(), n) : 1;
    // An equal share of the candidates per thread, each share in chunks: ATen's split of a
    // range of chunks gave one thread 7 of 13 chunks (567 of 1,000 candidates on 2 threads).
    const int64_t share = (n + threads - 1) / threads;
    const int64_t chunk = std::max<int64_t>(1, std::min(share, kChunkRows / tv));
    const T b3v = b3_.item<T>();
    const auto m2 = m.view({d1, tv * a});
    at::parallel_for(0, threads, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t end = std::min(n, (p + 1) * share);
        for (int64_t c0 = p * share; c0 < end; c0 += chunk)
          score_chunk<T>(c0, std::min(end, c0 + chunk), tv, a, hid, q, m2, w2t, b2.data_ptr<T>(),
                         w3.data_ptr<T>(), b3v, out.data_ptr<T>());
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace dinrec

TORCH_LIBRARY_FRAGMENT(dinrec_cpp, m) {
  m.def("candidate_scores(Tensor q, Tensor keys, Tensor w_query, Tensor w_key, Tensor w_prod, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3) -> Tensor");
}

TORCH_LIBRARY_IMPL(dinrec_cpp, CPU, m) {
  m.impl("candidate_scores", &dinrec::candidate_scores);
}
