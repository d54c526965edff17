// dinrec_cpp::gru_scan_forward / gru_scan_backward: the GRU recurrence of DIEN's layers on CPU.
//
// The input projections of all steps come precomputed (one matrix product outside); what
// is left is sequential: per step one small matrix product (the hidden projections) and one
// pass over the step's values while they are in cache. Rows of the batch never interact,
// so the batch is split over ATen's threads once, for the whole time loop (no per-step
// synchronisation); each thread's per-step matrix product runs on that thread.
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
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "math.h"

namespace dinrec {
namespace {

// Rows per thread below which the batch is not split.
constexpr int64_t kGrainRows = 16;
// Forward: a row's last (H % kLanes) columns are gathered over many rows into short
// contiguous lanes (kPack at a time) and run through the same vector loop: GCC 12 would
// otherwise leave them to a scalar epilogue of three exp each (H = 36 = 2 x 16 + 4).
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);
constexpr int64_t kPack = 256;

// y (rows, n) = bias + x (rows, k; row stride ldx) w^T, or y += x w with accumulate: ATen's
// CPU kernel called directly (no dispatcher, no autograd); inside a parallel region its BLAS
// runs on the calling thread.
template <typename T>
void matmul(const at::Tensor& y, const at::Tensor& bias, const T* x, int64_t rows, int64_t k,
            int64_t ldx, const at::Tensor& w) {
  auto xt = at::from_blob(const_cast<T*>(x), {rows, k}, {ldx, 1}, w.options());
  auto out = y;
  at::cpu::addmm_out(out, bias, xt, w);
}

// The forward step of `len` elements. x: x_r, x_z, x_n at x, x + sx, x + 2 sx; gh: gh_r,
// gh_z, gh_n likewise (stride sg); a0 / a1: one value (kPerElem false) or one per element;
// out: r, z, n, gh_n at stride so.
template <bool kPerElem, typename T>
__attribute__((always_inline)) inline void forward_elems(int64_t len, const T* x, int64_t sx, const T* gh,
                                                         int64_t sg, const T* h, const T* a0, const T* a1,
                                                         T* out, int64_t so, T* h_next) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const T r = sigmoid(x[j] + gh[j]);
    const T z = sigmoid(x[sx + j] + gh[sg + j]);
    const T ghn = gh[2 * sg + j];
    const T n = T(2) * sigmoid(T(2) * (x[2 * sx + j] + r * ghn)) - T(1);  // tanh
    const T f = (kPerElem ? a0[j] : *a0) + (kPerElem ? a1[j] : *a1) * z;
    h_next[j] = h[j] + f * (n - h[j]);
    out[j] = r;
    out[so + j] = z;
    out[2 * so + j] = n;
    out[3 * so + j] = ghn;
  }
}

// Rows [0, rows) of one step; gh (rows, 3H) holds W_hh h + b_hh. Pointers at the block's
// first row: x (rows, 3H), h (rows, H), c0 / c1 (rows,), out (rows, >= 4H; row stride h4),
// h_next (rows, H).
template <typename T>
void forward_step(int64_t rows, int64_t hid, const T* x, const T* gh, const T* h, const T* c0,
                  const T* c1, T* out, T* h_next, int64_t h4) {
  const int64_t main = hid - hid % kLanes<T>, tail = hid - main, h3 = 3 * hid;
  for (int64_t b = 0; b < rows; ++b)
    forward_elems<false>(main, x + b * h3, hid, gh + b * h3, hid, h + b * hid, c0 + b, c1 + b,
                         out + b * h4, hid, h_next + b * hid);
  if (tail == 0) return;
  T px[3 * kPack], pg[3 * kPack], ph[kPack], pa0[kPack], pa1[kPack], po[4 * kPack], pn[kPack];
  const int64_t per = kPack / tail;  // rows per pack
  for (int64_t b0 = 0; b0 < rows; b0 += per) {
    const int64_t b1 = std::min(rows, b0 + per);
    int64_t n = 0;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = main; j < hid; ++j, ++n) {
        for (int64_t g = 0; g < 3; ++g) {
          px[g * kPack + n] = x[b * h3 + g * hid + j];
          pg[g * kPack + n] = gh[b * h3 + g * hid + j];
        }
        ph[n] = h[b * hid + j];
        pa0[n] = c0[b];
        pa1[n] = c1[b];
      }
    forward_elems<true>(n, px, kPack, pg, kPack, ph, pa0, pa1, po, kPack, pn);
    n = 0;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = main; j < hid; ++j, ++n) {
        for (int64_t g = 0; g < 4; ++g) out[b * h4 + g * hid + j] = po[g * kPack + n];
        h_next[b * hid + j] = pn[n];
      }
  }
}

template <typename T>
void forward_rows(int64_t b0, int64_t b1, int64_t steps, int64_t batch, int64_t hid, const T* xi,
                  const T* c0, const T* c1, const at::Tensor& wt, const at::Tensor& bias, const T* h0,
                  T* hs, T* gates) {
  const int64_t rows = b1 - b0, h3 = 3 * hid, h4 = 4 * hid;
  auto gh = at::empty({rows, h3}, wt.options());  // W_hh h + b_hh of the step
  for (int64_t t = 0; t < steps; ++t) {
    const T* hp = t == 0 ? h0 + b0 * hid : hs + ((t - 1) * batch + b0) * hid;  // (rows, H)
    matmul<T>(gh, bias, hp, rows, hid, hid, wt);
    const int64_t row = t * batch + b0;
    forward_step(rows, hid, xi + row * h3, gh.data_ptr<T>(), hp, c0 + row, c1 + row, gates + row * h4,
                 hs + row * hid, h4);
  }
}

// d, nx and the row sums of d_f, d_f z for one row (see the file's header).
template <typename T>
inline void backward_row(int64_t hid, const T* g, const T* h, const T* dh, const T* go, T a0, T a1, T* d,
                         T* nx, T& acc0, T& acc1) {
  T s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t j = 0; j < hid; ++j) {  // no transcendental: a scalar epilogue is cheap
    const T r = g[j], z = g[hid + j], n = g[2 * hid + j], ghn = g[3 * hid + j];
    const T f = a0 + a1 * z;
    const T dn = dh[j] * f * (T(1) - n * n);  // dL/d(x_n + r gh_n)
    const T df = dh[j] * (n - h[j]);
    d[j] = dn * ghn * r * (T(1) - r);
    d[hid + j] = a1 * df * z * (T(1) - z);
    d[2 * hid + j] = dn * r;
    d[3 * hid + j] = dn;
    nx[j] = go[j] + dh[j] * (T(1) - f);
    s0 += df;
    s1 += df * z;
  }
  acc0 = s0;
  acc1 = s1;
}

template <typename T>
void backward_rows(int64_t b0, int64_t b1, int64_t steps, int64_t batch, int64_t hid, const T* g_hs,
                   const T* hs, const T* gates, const T* c0, const T* c1, const at::Tensor& w,
                   const T* h0, T* d, T* d_c0, T* d_c1, T* d_h0) {
  const int64_t rows = b1 - b0, h4 = 4 * hid;
  auto carry = at::empty({rows, hid}, w.options()), next = at::empty({rows, hid}, w.options());
  std::vector<T> zeros(hid, T(0));
  std::copy_n(g_hs + ((steps - 1) * batch + b0) * hid, rows * hid, carry.data_ptr<T>());
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* hp = t == 0 ? h0 + b0 * hid : hs + ((t - 1) * batch + b0) * hid;
    T* dt = d + (t * batch + b0) * h4;
    const T* dh = carry.data_ptr<T>();
    T* nx = next.data_ptr<T>();
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t row = t * batch + b0 + b;
      const T* go = t > 0 ? g_hs + ((t - 1) * batch + b0 + b) * hid : zeros.data();
      backward_row(hid, gates + row * h4, hp + b * hid, dh + b * hid, go, c0[row], c1[row], dt + b * h4,
                   nx + b * hid, d_c0[row], d_c1[row]);
    }
    matmul<T>(next, next, dt, rows, 3 * hid, h4, w);  // next += d[:, :3H] W
    std::swap(carry, next);
  }
  std::copy_n(carry.data_ptr<T>(), rows * hid, d_h0 + b0 * hid);
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
  auto bias = b_.contiguous(), h0 = h0_.contiguous();
  const int64_t steps = xi.size(0), batch = xi.size(1), hid = w_.size(1);
  auto wt = w_.t();  // (H, 3H)
  TORCH_CHECK(xi.size(2) == 3 * hid && w_.size(0) == 3 * hid, "gru_scan: expected xi (T, B, 3H), w_hh (3H, H)");
  auto hs = at::empty({steps, batch, hid}, xi.options());
  auto gates = at::empty({steps, batch, 4 * hid}, xi.options());
  if (steps == 0 || batch == 0) return {hs, gates};
  AT_DISPATCH_FLOATING_TYPES(xi.scalar_type(), "gru_scan_forward", [&] {
    at::parallel_for(0, batch, kGrainRows, [&](int64_t b0, int64_t b1) {
      forward_rows<scalar_t>(b0, b1, steps, batch, hid, xi.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                             c1.data_ptr<scalar_t>(), wt, bias,
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
  auto c0 = c0_.contiguous(), c1 = c1_.contiguous(), h0 = h0_.contiguous();
  const int64_t steps = hs.size(0), batch = hs.size(1), hid = hs.size(2);
  auto w = w_.contiguous();
  auto d = at::empty({steps, batch, 4 * hid}, hs.options());
  auto d_c0 = at::empty({steps, batch}, hs.options());
  auto d_c1 = at::empty({steps, batch}, hs.options());
  auto d_h0 = steps == 0 ? g_hs.new_zeros({batch, hid}) : at::empty({batch, hid}, hs.options());
  if (steps == 0 || batch == 0) return {d, d_c0, d_c1, d_h0};
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "gru_scan_backward", [&] {
    at::parallel_for(0, batch, kGrainRows, [&](int64_t b0, int64_t b1) {
      backward_rows<scalar_t>(b0, b1, steps, batch, hid, g_hs.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                              gates.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c1.data_ptr<scalar_t>(),
                              w, h0.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                              d_c0.data_ptr<scalar_t>(), d_c1.data_ptr<scalar_t>(), d_h0.data_ptr<scalar_t>());
    });
  });
  return {d, d_c0, d_c1, d_h0};
}

// ---------------------------------------------------------------------------------- packed
// The same recurrence over the valid steps only, in PyTorch's PackedSequence layout: rows
// sorted by length (longest first), step t holds the sizes[t] rows still running (a prefix,
// sizes non-increasing) at rows [offs[t], offs[t] + sizes[t]) of xi (N, 3H), c0, c1 (N,),
// hs (N, H); h0 (sizes[0], H). gates (N, 5H) = [r, z, n, gh_n, h_prev] (the state before
// the step, for the caller's weight gradient). The backward's d (N, 4H) is
// [d gh_r, d gh_z, d x_n, d gh_n]: its first 3H columns are dL/dxi, (r, z, n).
template <typename T>
void packed_forward_rows(int64_t b0, int64_t b1, const int64_t* sizes, const int64_t* offs, int64_t steps,
                         int64_t hid, const T* xi, const T* c0, const T* c1, const at::Tensor& wt,
                         const at::Tensor& bias, const T* h0, T* hs, T* gates) {
  const int64_t h3 = 3 * hid, h5 = 5 * hid;
  auto gh = at::empty({b1 - b0, h3}, wt.options());
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t rows = std::min(b1, sizes[t]) - b0;
    if (rows <= 0) break;
    const T* hp = t == 0 ? h0 + b0 * hid : hs + (offs[t - 1] + b0) * hid;  // (rows, H)
    auto y = gh.narrow(0, 0, rows);
    matmul<T>(y, bias, hp, rows, hid, hid, wt);
    const int64_t row = offs[t] + b0;
    forward_step(rows, hid, xi + row * h3, gh.data_ptr<T>(), hp, c0 + row, c1 + row, gates + row * h5,
                 hs + row * hid, h5);
    for (int64_t b = 0; b < rows; ++b) std::copy_n(hp + b * hid, hid, gates + (row + b) * h5 + 4 * hid);
  }
}

// One row of the packed backward: d = [d gh_r, d gh_z, d x_n, d gh_n], dg = [d gh_r, d gh_z,
// d gh_n] (for the hidden product), nx = dL/dh_prev before the product, the row sums of d_f
// and d_f z. g = [r, z, n, gh_n, h_prev] of the step.
template <typename T>
inline void packed_backward_row(int64_t hid, const T* g, const T* dh, const T* go, T a0, T a1, T* d, T* dg,
                                T* nx, T& acc0, T& acc1) {
  T s0 = 0, s1 = 0;
  const T* h = g + 4 * hid;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t j = 0; j < hid; ++j) {
    const T r = g[j], z = g[hid + j], n = g[2 * hid + j], ghn = g[3 * hid + j];
    const T f = a0 + a1 * z;
    const T dn = dh[j] * f * (T(1) - n * n);  // dL/d(x_n + r gh_n)
    const T df = dh[j] * (n - h[j]);
    const T dr = dn * ghn * r * (T(1) - r), dz = a1 * df * z * (T(1) - z), dgn = dn * r;
    d[j] = dr;
    d[hid + j] = dz;
    d[2 * hid + j] = dn;
    d[3 * hid + j] = dgn;
    dg[j] = dr;
    dg[hid + j] = dz;
    dg[2 * hid + j] = dgn;
    nx[j] = go[j] + dh[j] * (T(1) - f);
    s0 += df;
    s1 += df * z;
  }
  acc0 = s0;
  acc1 = s1;
}

template <typename T>
void packed_backward_rows(int64_t b0, int64_t b1, const int64_t* sizes, const int64_t* offs, int64_t steps,
                          int64_t hid, const T* g_hs, const T* gates, const T* c0, const T* c1,
                          const at::Tensor& w, T* d, T* d_c0, T* d_c1, T* d_h0) {
  const int64_t rows0 = b1 - b0, h3 = 3 * hid, h4 = 4 * hid, h5 = 5 * hid;
  auto carry = at::empty({rows0, hid}, w.options()), next = at::empty({rows0, hid}, w.options());
  auto dg = at::empty({rows0, h3}, w.options());
  std::vector<T> zeros(hid, T(0));
  int64_t last = steps - 1;  // the block's last step
  while (last > 0 && sizes[last] <= b0) --last;
  const int64_t r_last = std::min(b1, sizes[last]) - b0;
  std::copy_n(g_hs + (offs[last] + b0) * hid, r_last * hid, carry.data_ptr<T>());
  for (int64_t t = last; t >= 0; --t) {
    const int64_t rows = std::min(b1, sizes[t]) - b0;
    const T* dh = carry.data_ptr<T>();
    T* nx = next.data_ptr<T>();
    T* dgp = dg.data_ptr<T>();
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t row = offs[t] + b0 + b;
      const T* go = t > 0 ? g_hs + (offs[t - 1] + b0 + b) * hid : zeros.data();
      packed_backward_row(hid, gates + row * h5, dh + b * hid, go, c0[row], c1[row], d + row * h4,
                          dgp + b * h3, nx + b * hid, d_c0[row], d_c1[row]);
    }
    auto y = next.narrow(0, 0, rows);
    matmul<T>(y, y, dgp, rows, h3, h3, w);  // next += dg W
    if (t > 0) {  // rows whose last step is t - 1 start their carry there
      const int64_t prev = std::min(b1, sizes[t - 1]) - b0;
      std::copy_n(g_hs + (offs[t - 1] + b0 + rows) * hid, (prev - rows) * hid, nx + rows * hid);
    }
    std::swap(carry, next);
  }
  std::copy_n(carry.data_ptr<T>(), rows0 * hid, d_h0 + b0 * hid);
}

// Blocks of sorted rows with about equal work (steps x rows) for the threads: (cuts).
std::vector<int64_t> packed_blocks(const int64_t* sizes, int64_t steps) {
  const int64_t batch = sizes[0], threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> cuts{0};
  if (threads == 1 || batch < 2 * kGrainRows) {
    cuts.push_back(batch);
    return cuts;
  }
  std::vector<int64_t> len(batch, 0);  // len[i]: steps of sorted row i
  for (int64_t t = 0; t < steps; ++t)
    for (int64_t i = 0; i < sizes[t]; ++i) ++len[i];
  int64_t total = 0;
  for (auto l : len) total += l;
  int64_t acc = 0;
  for (int64_t i = 0; i < batch; ++i) {
    acc += len[i];
    const int64_t k = static_cast<int64_t>(cuts.size());
    if (k < threads && acc * threads >= total * k && i + 1 - cuts.back() >= kGrainRows &&
        batch - (i + 1) >= kGrainRows)
      cuts.push_back(i + 1);
  }
  cuts.push_back(batch);
  return cuts;
}

std::vector<int64_t> packed_layout(const at::Tensor& sizes_, int64_t n, int64_t h0_rows) {
  TORCH_CHECK(sizes_.device().is_cpu() && sizes_.scalar_type() == at::kLong && sizes_.dim() == 1,
              "gru_scan_packed: batch_sizes must be a 1-d int64 CPU tensor");
  const int64_t steps = sizes_.size(0);
  const int64_t* sizes = sizes_.data_ptr<int64_t>();
  std::vector<int64_t> offs(steps + 1, 0);
  for (int64_t t = 0; t < steps; ++t) {
    TORCH_CHECK(sizes[t] > 0 && (t == 0 || sizes[t] <= sizes[t - 1]),
                "gru_scan_packed: batch_sizes must be positive and non-increasing");
    offs[t + 1] = offs[t] + sizes[t];
  }
  TORCH_CHECK(offs[steps] == n, "gru_scan_packed: batch_sizes must sum to the packed rows");
  TORCH_CHECK(steps == 0 || h0_rows == sizes[0], "gru_scan_packed: h0 must have batch_sizes[0] rows");
  return offs;
}

std::tuple<at::Tensor, at::Tensor> gru_scan_packed_forward(const at::Tensor& xi_, const at::Tensor& c0_,
                                                           const at::Tensor& c1_, const at::Tensor& w_,
                                                           const at::Tensor& b_, const at::Tensor& h0_,
                                                           const at::Tensor& sizes_) {
  check_inputs(xi_, {c0_, c1_, w_, b_, h0_});
  auto xi = xi_.contiguous(), c0 = c0_.contiguous(), c1 = c1_.contiguous();
  auto bias = b_.contiguous(), h0 = h0_.contiguous();
  const int64_t n = xi.size(0), hid = w_.size(1), steps = sizes_.size(0);
  TORCH_CHECK(xi.dim() == 2 && xi.size(1) == 3 * hid && w_.size(0) == 3 * hid,
              "gru_scan_packed: expected xi (N, 3H), w_hh (3H, H)");
  const auto offs = packed_layout(sizes_, n, h0.size(0));
  auto hs = at::empty({n, hid}, xi.options());
  auto gates = at::empty({n, 5 * hid}, xi.options());
  if (n == 0) return {hs, gates};
  const int64_t* sizes = sizes_.data_ptr<int64_t>();
  const auto cuts = packed_blocks(sizes, steps);
  auto wt = w_.t();
  AT_DISPATCH_FLOATING_TYPES(xi.scalar_type(), "gru_scan_packed_forward", [&] {
    at::parallel_for(0, static_cast<int64_t>(cuts.size()) - 1, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        packed_forward_rows<scalar_t>(cuts[k], cuts[k + 1], sizes, offs.data(), steps, hid,
                                      xi.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c1.data_ptr<scalar_t>(),
                                      wt, bias, h0.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                                      gates.data_ptr<scalar_t>());
    });
  });
  return {hs, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_scan_packed_backward(
    const at::Tensor& g_hs_, const at::Tensor& gates_, const at::Tensor& c0_, const at::Tensor& c1_,
    const at::Tensor& w_, const at::Tensor& h0_, const at::Tensor& sizes_) {
  check_inputs(gates_, {g_hs_, c0_, c1_, w_, h0_});
  auto g_hs = g_hs_.contiguous(), gates = gates_.contiguous(), c0 = c0_.contiguous(), c1 = c1_.contiguous();
  auto w = w_.contiguous();
  const int64_t n = gates.size(0), hid = w.size(1), steps = sizes_.size(0);
  const int64_t rows0 = h0_.size(0);
  const auto offs = packed_layout(sizes_, n, rows0);
  auto d = at::empty({n, 4 * hid}, gates.options());
  auto d_c0 = at::empty({n}, gates.options()), d_c1 = at::empty({n}, gates.options());
  auto d_h0 = n == 0 ? at::zeros({rows0, hid}, gates.options()) : at::empty({rows0, hid}, gates.options());
  if (n == 0) return {d, d_c0, d_c1, d_h0};
  const int64_t* sizes = sizes_.data_ptr<int64_t>();
  const auto cuts = packed_blocks(sizes, steps);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_scan_packed_backward", [&] {
    at::parallel_for(0, static_cast<int64_t>(cuts.size()) - 1, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        packed_backward_rows<scalar_t>(cuts[k], cuts[k + 1], sizes, offs.data(), steps, hid,
                                       g_hs.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                       c0.data_ptr<scalar_t>(), c1.data_ptr<scalar_t>(), w,
                                       d.data_ptr<scalar_t>(), d_c0.data_ptr<scalar_t>(),
                                       d_c1.data_ptr<scalar_t>(), d_h0.data_ptr<scalar_t>());
    });
  });
  return {d, d_c0, d_c1, d_h0};
}

}  // namespace
}  // namespace dinrec

TORCH_LIBRARY_FRAGMENT(dinrec_cpp, m) {
  m.def("gru_scan_forward(Tensor xi, Tensor c0, Tensor c1, Tensor w_hh, Tensor b_hh, Tensor h0) -> (Tensor, Tensor)");
  m.def("gru_scan_backward(Tensor g_hs, Tensor hs, Tensor gates, Tensor c0, Tensor c1, Tensor w_hh, Tensor h0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_scan_packed_forward(Tensor xi, Tensor c0, Tensor c1, Tensor w_hh, Tensor b_hh, Tensor h0, Tensor batch_sizes) -> (Tensor, Tensor)");
  m.def("gru_scan_packed_backward(Tensor g_hs, Tensor gates, Tensor c0, Tensor c1, Tensor w_hh, Tensor h0, Tensor batch_sizes) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dinrec_cpp, CPU, m) {
  m.impl("gru_scan_forward", &dinrec::gru_scan_forward);
  m.impl("gru_scan_backward", &dinrec::gru_scan_backward);
  m.impl("gru_scan_packed_forward", &dinrec::gru_scan_packed_forward);
  m.impl("gru_scan_packed_backward", &dinrec::gru_scan_packed_backward);
}
