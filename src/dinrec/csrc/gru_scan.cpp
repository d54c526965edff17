// dinrec_cpp::gru_scan_forward / gru_scan_backward: the GRU recurrence of DIEN's layers on CPU.
//
// The input projections of all steps come precomputed (one matrix product outside); what
// is left is sequential: per step one small matrix product (the hidden projections) and one
// pass over the step's values while they are in cache. Rows of the batch never interact,
// so the batch is split over ATen's threads once, for the whole time loop (no per-step
// synchronisation). The per-step products are small ((rows, H) x (H, 3H), H ~ 36): a
// short loop kept in L1 does them, with no call overhead and no BLAS threads to wake.
//
// Layout: time-major, row-major, gate order (r, z, n) as in nn.GRU.
//   xi (T, B, 3H)   W_ih x_t + b_ih
//   c0, c1 (T, B)   the candidate fraction f = c0 + c1 z of each row and step (the variant,
//                   the attention score and the mask folded in; f = 0 keeps the state)
//   w_hh (3H, H), b_hh (3H,), h0 (B, H)
// Forward:  h' = h + f (n - h), r = sigmoid(x_r + gh_r), z = sigmoid(x_z + gh_z),
//           n = tanh(x_n + r gh_n), gh = W_hh h + b_hh;  tanh(p) = 2 sigmoid(2p) - 1.
//   returns hs (T, B, H) the state after each step, gates (T, B, 4H) = [r, z, n, gh_n].
// Backward: for dL/dhs (T, B, H), returns d (T, B, 4H) = [d gh_r, d gh_z, d gh_n, d x_n]
//   (d x_r = d gh_r, d x_z = d gh_z), d_c0, d_c1 (T, B) and dL/dh0 (B, H); the weight
//   gradients are one matrix product over all steps, done by the caller.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "math.h"

namespace dinrec {
namespace {

// Rows per thread below which the batch is not split.
constexpr int64_t kGrainRows = 16;

// y[b, o] += sum_k x[b, k] wt[k, o] for b < rows, o < n, k < depth (row-major; x and y
// with row strides ldx, ldy; wt (depth, n) contiguous). Four rows share each load of wt.
template <typename T>
void gemm_acc(int64_t rows, int64_t n, int64_t depth, const T* x, int64_t ldx, const T* wt, T* y,
              int64_t ldy) {
  int64_t b = 0;
  for (; b + 4 <= rows; b += 4) {
    const T *x0 = x + b * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    T *y0 = y + b * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
    for (int64_t k = 0; k < depth; ++k) {
      const T a0 = x0[k], a1 = x1[k], a2 = x2[k], a3 = x3[k];
      const T* w = wt + k * n;
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) {
        y0[o] += a0 * w[o];
        y1[o] += a1 * w[o];
        y2[o] += a2 * w[o];
        y3[o] += a3 * w[o];
      }
    }
  }
  for (; b < rows; ++b) {
    const T* xb = x + b * ldx;
    T* yb = y + b * ldy;
    for (int64_t k = 0; k < depth; ++k) {
      const T a = xb[k];
      const T* w = wt + k * n;
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) yb[o] += a * w[o];
    }
  }
}

// wt (H, 3H) = w^T for the forward product; w (3H, H) as is for the backward one.
template <typename T>
void forward_rows(int64_t b0, int64_t b1, int64_t steps, int64_t batch, int64_t hid, const T* xi,
                  const T* c0, const T* c1, const T* wt, const T* bias, const T* h0, T* hs, T* gates) {
  const int64_t rows = b1 - b0, h3 = 3 * hid, h4 = 4 * hid;
  for (int64_t t = 0; t < steps; ++t) {
    const T* hp = t == 0 ? h0 + b0 * hid : hs + ((t - 1) * batch + b0) * hid;  // (rows, H)
    T* g = gates + (t * batch + b0) * h4;                                        // (rows, 4H)
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t j = 0; j < h3; ++j) g[b * h4 + j] = bias[j];
    gemm_acc(rows, h3, hid, hp, hid, wt, g, h4);  // g[:, :3H] += hp W^T
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t row = t * batch + b0 + b;
      const T* x = xi + row * h3;
      T* gr = g + b * h4;
      const T* h = hp + b * hid;
      T* hn = hs + row * hid;
      const T a0 = c0[row], a1 = c1[row];
#pragma omp simd
      for (int64_t j = 0; j < hid; ++j) {
        const T r = sigmoid(x[j] + gr[j]);
        const T z = sigmoid(x[hid + j] + gr[hid + j]);
        const T ghn = gr[2 * hid + j];
        const T n = T(2) * sigmoid(T(2) * (x[2 * hid + j] + r * ghn)) - T(1);
        const T f = a0 + a1 * z;
        hn[j] = h[j] + f * (n - h[j]);
        gr[j] = r;
        gr[hid + j] = z;
        gr[2 * hid + j] = n;
        gr[3 * hid + j] = ghn;
      }
    }
  }
}

template <typename T>
void backward_rows(int64_t b0, int64_t b1, int64_t steps, int64_t batch, int64_t hid, const T* g_hs,
                   const T* hs, const T* gates, const T* c0, const T* c1, const T* w, const T* h0,
                   T* d, T* d_c0, T* d_c1, T* d_h0) {
  const int64_t rows = b1 - b0, h4 = 4 * hid;
  std::vector<T> carry(rows * hid), next(rows * hid);  // dL/dh_t and dL/dh_{t-1}, (rows, H)
  for (int64_t i = 0; i < rows * hid; ++i) carry[i] = g_hs[((steps - 1) * batch + b0) * hid + i];
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* hp = t == 0 ? h0 + b0 * hid : hs + ((t - 1) * batch + b0) * hid;
    const T* gt = gates + (t * batch + b0) * h4;
    T* dt = d + (t * batch + b0) * h4;
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t row = t * batch + b0 + b;
      const T* gr = gt + b * h4;
      const T* h = hp + b * hid;
      const T* dh = carry.data() + b * hid;
      const T* go = t > 0 ? g_hs + ((t - 1) * batch + b0 + b) * hid : nullptr;
      T* nx = next.data() + b * hid;
      T* dr = dt + b * h4;
      const T a0 = c0[row], a1 = c1[row];
      T acc0 = 0, acc1 = 0;
#pragma omp simd reduction(+ : acc0, acc1)
      for (int64_t j = 0; j < hid; ++j) {
        const T r = gr[j], z = gr[hid + j], n = gr[2 * hid + j], ghn = gr[3 * hid + j];
        const T f = a0 + a1 * z;
        const T dn = dh[j] * f * (T(1) - n * n);  // dL/d(x_n + r gh_n)
        const T df = dh[j] * (n - h[j]);
        dr[j] = dn * ghn * r * (T(1) - r);
        dr[hid + j] = a1 * df * z * (T(1) - z);
        dr[2 * hid + j] = dn * r;
        dr[3 * hid + j] = dn;
        nx[j] = (go ? go[j] : T(0)) + dh[j] * (T(1) - f);
        acc0 += df;
        acc1 += df * z;
      }
      d_c0[row] = acc0;
      d_c1[row] = acc1;
    }
    gemm_acc(rows, hid, 3 * hid, dt, h4, w, next.data(), hid);  // next += d[:, :3H] W
    carry.swap(next);
  }
  for (int64_t i = 0; i < rows * hid; ++i) d_h0[b0 * hid + i] = carry[i];
}

void check_inputs(const at::Tensor& xi, const std::vector<at::Tensor>& others) {
  TORCH_CHECK(xi.device().is_cpu(), "gru_scan: CPU tensors only");
  TORCH_CHECK(xi.scalar_type() == at::kFloat || xi.scalar_type() == at::kDouble,
              "gru_scan: float32 or float64 only");
  for (const auto& t : others)
    TORCH_CHECK(t.scalar_type() == xi.scalar_type() && t.device().is_cpu(),
                "gru_scan: all tensors must share one dtype on the CPU");
}

std::tuple<at::Tensor, at::Tensor> gru_scan_forward(const at::Tensor& xi_, const at::Tensor& c0_,
                                                    const at::Tensor& c1_, const at::Tensor& w_,
                                                    const at::Tensor& b_, const at::Tensor& h0_) {
  check_inputs(xi_, {c0_, c1_, w_, b_, h0_});
  auto xi = xi_.contiguous(), c0 = c0_.contiguous(), c1 = c1_.contiguous();
  auto wt = w_.t().contiguous(), bias = b_.contiguous(), h0 = h0_.contiguous();
  const int64_t steps = xi.size(0), batch = xi.size(1), hid = w_.size(1);
  TORCH_CHECK(xi.size(2) == 3 * hid && w_.size(0) == 3 * hid, "gru_scan: expected xi (T, B, 3H), w_hh (3H, H)");
  auto hs = at::empty({steps, batch, hid}, xi.options());
  auto gates = at::empty({steps, batch, 4 * hid}, xi.options());
  if (steps == 0 || batch == 0) return {hs, gates};
  AT_DISPATCH_FLOATING_TYPES(xi.scalar_type(), "gru_scan_forward", [&] {
    at::parallel_for(0, batch, kGrainRows, [&](int64_t b0, int64_t b1) {
      forward_rows<scalar_t>(b0, b1, steps, batch, hid, xi.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                             c1.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                             h0.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>());
    });
  });
  return {hs, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_scan_backward(
    const at::Tensor& g_hs_, const at::Tensor& hs_, const at::Tensor& gates_, const at::Tensor& c0_,
    const at::Tensor& c1_, const at::Tensor& w_, const at::Tensor& h0_) {
  check_inputs(hs_, {g_hs_, gates_, c0_, c1_, w_, h0_});
  auto g_hs = g_hs_.contiguous(), hs = hs_.contiguous(), gates = gates_.contiguous();
  auto c0 = c0_.contiguous(), c1 = c1_.contiguous(), w = w_.contiguous(), h0 = h0_.contiguous();
  const int64_t steps = hs.size(0), batch = hs.size(1), hid = hs.size(2);
  auto d = at::empty({steps, batch, 4 * hid}, hs.options());
  auto d_c0 = at::empty({steps, batch}, hs.options());
  auto d_c1 = at::empty({steps, batch}, hs.options());
  auto d_h0 = steps == 0 ? g_hs.new_zeros({batch, hid}) : at::empty({batch, hid}, hs.options());
  if (steps == 0 || batch == 0) return {d, d_c0, d_c1, d_h0};
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "gru_scan_backward", [&] {
    at::parallel_for(0, batch, kGrainRows, [&](int64_t b0, int64_t b1) {
      backward_rows<scalar_t>(b0, b1, steps, batch, hid, g_hs.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                              gates.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c1.data_ptr<scalar_t>(),
                              w.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                              d_c0.data_ptr<scalar_t>(), d_c1.data_ptr<scalar_t>(), d_h0.data_ptr<scalar_t>());
    });
  });
  return {d, d_c0, d_c1, d_h0};
}

}  // namespace
}  // namespace dinrec

TORCH_LIBRARY_FRAGMENT(dinrec_cpp, m) {
  m.def("gru_scan_forward(Tensor xi, Tensor c0, Tensor c1, Tensor w_hh, Tensor b_hh, Tensor h0) -> (Tensor, Tensor)");
  m.def("gru_scan_backward(Tensor g_hs, Tensor hs, Tensor gates, Tensor c0, Tensor c1, Tensor w_hh, Tensor h0) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dinrec_cpp, CPU, m) {
  m.impl("gru_scan_forward", &dinrec::gru_scan_forward);
  m.impl("gru_scan_backward", &dinrec::gru_scan_backward);
}
