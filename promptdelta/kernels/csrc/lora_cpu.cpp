// Native CPU kernels for the fused LoRA layer (fp32, rank R in 1/2/4/8/16). One translation unit: it includes
// lora_simd.h (vectors, lane sums, prefetch), lora_rank16.h (rank 16's layouts) and lora_gemm.h (the base GEMM
// with the low-rank product as R more inner steps, AVX-512 builds); native.py keys the build on every
// csrc/lora_*.cpp and *.h.
//
// With the native GEMM (the default where it is built; set_own_gemm(false) gives MKL's back): forward = the
// shrink pass xa = x_l A^T over row blocks, then one GEMM out = b + x W^T + xa (s Bt); backward = the blocked
// pass (gb = g B, dBt, dA; s gb A only when x_l is separate), then one GEMM dx = g W + gb (s A). Without it,
// the two layouts below.
// Built on first use by promptdelta/kernels/native.py (torch.utils.cpp_extension, -O3 -march=native
// -fopenmp); rows are split over torch's intra-op threads with at::parallel_for.
//
// The layer, one thread per contiguous range of rows (each thread calls the base GEMM on its own rows,
// single-threaded inside the parallel region, so its rows stay on its core from the skinny products to the
// GEMM, and the layer pays one parallel region per direction instead of one per op):
//
//   forward(x, x_l, W, b, A, Bt, s, gemm)  out = b + s (x_l A^T) Bt (+ x W^T with gemm), xa = x_l A^T;
//                                           without gemm no GEMM (the few-rows path runs torch's)
//   backward(g, x_l, W, A, Bt, xa, s, ..)  gb = g B, dBt = xa^T g, dA = gb^T x_l, and either
//                                           dx = s gb A + g W (x_l is x) or dx = g W, dx_l = s gb A;
//                                           without need_dx no GEMM (the few-rows path runs torch's)
//   lora_linear(x, x_l, W, b, A, B, s, ..) the layer as a C++ autograd function over the above
//
// MKL runs each skinny product as its own pass over an (M, K) or (M, N) matrix at a fraction of peak
// (x A^T at M=2048, K=768, R=8 took 0.28-0.45 ms; a read of x takes 0.15-0.19 ms). Here the backward
// touches each 16-row block of g and x once and keeps it in L1/L2 for its second product, the rank-R
// accumulators (dBt, dA) are summed per thread in registers over a block before they touch memory, and
// lane sums use a shuffle tree. Vectors are GCC/Clang vector extensions (16 floats: one AVX-512 register,
// two AVX2 ones). Measured and dropped (2026-12-06): folding B A into W for dx (the N x K merge costs what
// the skinny write saves), 64- and 32-row blocks (16 and 8 were ~10% faster on the skinny backward).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lora_simd.h"
#include "lora_rank16.h"
#include "lora_gemm.h"

namespace {

template <int R> constexpr int dot_rows_at_once() { return R <= 8 ? 4 : 1; }   // R = 8: 2 -> 4 rows, -10%

// out[m, j] = sum_k x[m, k] a[j, k] for m in [m0, m1): MR rows at a time, MR x R vector accumulators.
template <int R, int MR>
void dot_rows(const float* x, const float* a, float* out, int64_t m0, int64_t m1, int64_t K) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) {
    v16 acc[MR][R];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < R; ++j) acc[i][j] = v16{};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      v16 xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = load(x + (m + i) * K + k);
      for (int i = 0; i < MR; ++i) prefetch_read(x, (m + i + kPrefetch) * K + k);
      for (int j = 0; j < R; ++j) {
        v16 av = load(a + j * K + k);
        for (int i = 0; i < MR; ++i) acc[i][j] += xv[i] * av;
      }
    }
    for (int i = 0; i < MR; ++i) {
      float* o = out + (m + i) * R;
      lane_sums<R>(acc[i], o);
      for (int j = 0; j < R; ++j)
        for (int64_t kk = k; kk < K; ++kk) o[j] += x[(m + i) * K + kk] * a[j * K + kk];
    }
  }
  if constexpr (MR > 1) {
    if (m < m1) dot_rows<R, 1>(x, a, out, m, m1, K);
  }
}

// out[m, n] = bias[n] + s sum_j c[m, j] bt[j, n] for m in [m0, m1) (bias may be null): a write-only pass.
template <int R, int MR>
void expand_rows(const float* c, const float* bt, const float* bias, float s, float* out,
                 int64_t m0, int64_t m1, int64_t N) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) {
    float cs[MR][R];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < R; ++j) cs[i][j] = s * c[(m + i) * R + j];
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      v16 b0 = bias ? load(bias + n) : v16{};
      v16 acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = b0;
      for (int j = 0; j < R; ++j) {
        v16 bv = load(bt + j * N + n);
        for (int i = 0; i < MR; ++i) acc[i] += splat(cs[i][j]) * bv;
      }
      for (int i = 0; i < MR; ++i) store(out + (m + i) * N + n, acc[i]);
      for (int i = 0; i < MR; ++i) prefetch_write(out, (m + i + kPrefetch) * N + n);
    }
    for (; n < N; ++n)
      for (int i = 0; i < MR; ++i) {
        float v = bias ? bias[n] : 0.f;
        for (int j = 0; j < R; ++j) v += cs[i][j] * bt[j * N + n];
        out[(m + i) * N + n] = v;
      }
  }
  if constexpr (MR > 1) {
    if (m < m1) expand_rows<R, 1>(c, bt, bias, s, out, m, m1, N);
  }
}

// acc[j, n] += sum_{m in [m0, m1)} c[m, j] y[m, n]: columns outer, rows inner, so the R partial sums of a
// strip of 16 * NV columns stay in registers for the whole block and acc is read and written once per block.
template <int R, int NV>
int64_t accumulate_strips(const float* c, const float* y, float* acc, int64_t m0, int64_t m1, int64_t N,
                          int64_t n) {
  for (; n + 16 * NV <= N; n += 16 * NV) {
    v16 d[NV][R];
    for (int q = 0; q < NV; ++q)
      for (int j = 0; j < R; ++j) d[q][j] = v16{};
    for (int64_t m = m0; m < m1; ++m)
      for (int q = 0; q < NV; ++q) {
        v16 yv = load(y + m * N + n + 16 * q);
        prefetch_read(y, (m + kPrefetch) * N + n + 16 * q);
        for (int j = 0; j < R; ++j) d[q][j] += splat(c[m * R + j]) * yv;
      }
    for (int q = 0; q < NV; ++q)
      for (int j = 0; j < R; ++j) store(acc + j * N + n + 16 * q, load(acc + j * N + n + 16 * q) + d[q][j]);
  }
  return n;
}

template <int R>
void accumulate_rows(const float* c, const float* y, float* acc, int64_t m0, int64_t m1, int64_t N) {
  int64_t n = accumulate_strips<R, R <= 8 ? 2 : 1>(c, y, acc, m0, m1, N, 0);   // 32 columns a strip: -20%
  n = accumulate_strips<R, 1>(c, y, acc, m0, m1, N, n);
  for (; n < N; ++n)
    for (int j = 0; j < R; ++j) {
      float v = 0.f;
      for (int64_t m = m0; m < m1; ++m) v += c[m * R + j] * y[m * N + n];
      acc[j * N + n] += v;
    }
}

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
              name, " must be a contiguous ", dim, "-D float32 CPU tensor");
}

// Bt (R, N): contiguous, except at rank 16, whose kernels read it through its strides (the layer passes B^T
// as a view of B (N, 16), saving a transposed copy whose writes 4 KiB apart took 64-70 us at N = 1024).
void check_bt(const torch::Tensor& bt, int64_t r) {
  if (r != 16) return check(bt, 2, "Bt");
  TORCH_CHECK(bt.device().is_cpu() && bt.scalar_type() == at::kFloat && bt.dim() == 2,
              "Bt must be a 2-D float32 CPU tensor");
}

// Rank 16 keeps its accumulators as (N, R) (see shrink16); the other ranks as (R, N).
constexpr bool ranks_last(int64_t R) { return R == 16; }

// Per-thread partial sums of an (R, N) accumulator ((N, R) when ranks_last), then one reduction over threads.
// Left unset here: each thread zeroes its own slice inside the parallel region (in parallel, and into the L2
// that accumulates it next; zeroing both here took 34-38 us at K = N = 1024, R = 16), then zero_idle.
torch::Tensor partials(int64_t R, int64_t N, const torch::Tensor& like) {
  const int64_t T = at::get_num_threads();
  return ranks_last(R) ? torch::empty({T, N, R}, like.options()) : torch::empty({T, R, N}, like.options());
}

// Zeroes the slices of the threads that got no rows (ran[t] == 0) after the region, so finish sums zeros.
void zero_idle(torch::Tensor& part, const std::vector<char>& ran) {
  for (int64_t t = 0; t < part.size(0); ++t)
    if (!ran[t]) part[t].zero_();
}

// s * sum_t part[t] as (P, Q), or as its transpose (Q, P) when transpose: plain loops on this thread. The
// torch ops it replaces (sum, mul_, t().contiguous()) each cost a parallel region or a dispatch, ~0.1 ms
// in all per forward+backward at M=2048 (0.5% of the layer). A tall part (rank 16's (K, 16)) is summed in
// tiles of 16 rows and written 16 floats at a time: element by element, its transposed writes 4 KiB apart
// took 46 us at T = 2, K = 1024 against 7 us tiled (2026-12-06).
torch::Tensor finish(const torch::Tensor& part, double s, bool transpose) {
  const int64_t T = part.size(0), P = part.size(1), Q = part.size(2);
  auto out = transpose ? torch::empty({Q, P}, part.options()) : torch::empty({P, Q}, part.options());
  const float* p = part.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float sf = static_cast<float>(s);
  if (P <= Q) {
    for (int64_t j = 0; j < P; ++j)
      for (int64_t n = 0; n < Q; ++n) {
        float v = 0.f;
        for (int64_t t = 0; t < T; ++t) v += p[(t * P + j) * Q + n];
        o[transpose ? n * P + j : j * Q + n] = sf * v;
      }
    return out;
  }
  constexpr int64_t JB = 16;
  std::vector<float> tile(JB * Q);                                      // rows j0 .. j0 + 16 of the sum
  for (int64_t j0 = 0; j0 < P; j0 += JB) {
    const int64_t jn = std::min(JB, P - j0);
    std::fill(tile.begin(), tile.begin() + jn * Q, 0.f);
    for (int64_t t = 0; t < T; ++t) {
      const float* pt = p + (t * P + j0) * Q;
      for (int64_t i = 0; i < jn * Q; ++i) tile[i] += pt[i];
    }
    if (transpose) {
      for (int64_t n = 0; n < Q; ++n)
        for (int64_t jj = 0; jj < jn; ++jj) o[n * P + j0 + jj] = sf * tile[jj * Q + n];
    } else {
      for (int64_t i = 0; i < jn * Q; ++i) o[j0 * Q + i] = sf * tile[i];
    }
  }
  return out;
}

// (P, Q) -> (Q, P), contiguous, in plain loops (t().contiguous() is a dispatched copy). A wide input (rank 16's
// (16, K) A) goes through 16 x 16 tiles: element by element, its writes 64 B apart came back to each line 16
// times and took 11 us at K = 1024 against 4 us tiled; a tall input (B (N, R)) is faster element by element.
torch::Tensor transposed(const torch::Tensor& t) {
  const auto tc = t.detach().contiguous();
  const int64_t P = tc.size(0), Q = tc.size(1);
  auto out = torch::empty({Q, P}, tc.options());
  const float* p = tc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (P >= Q) {
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = 0; j < Q; ++j) o[j * P + i] = p[i * Q + j];
    return out;
  }
  float tile[16][16];
  for (int64_t p0 = 0; p0 < P; p0 += 16)
    for (int64_t q0 = 0; q0 < Q; q0 += 16) {
      const int64_t pn = std::min<int64_t>(16, P - p0), qn = std::min<int64_t>(16, Q - q0);
      for (int64_t i = 0; i < pn; ++i)
        for (int64_t j = 0; j < qn; ++j) tile[i][j] = p[(p0 + i) * Q + q0 + j];
      for (int64_t j = 0; j < qn; ++j)
        for (int64_t i = 0; i < pn; ++i) o[(q0 + j) * P + p0 + i] = tile[i][j];
    }
  return out;
}

#define PD_DISPATCH_RANK(r, FN, ...)                                                       \
  switch (r) {                                                                             \
    case 1: return FN<1>(__VA_ARGS__);                                                     \
    case 2: return FN<2>(__VA_ARGS__);                                                     \
    case 4: return FN<4>(__VA_ARGS__);                                                     \
    case 8: return FN<8>(__VA_ARGS__);                                                     \
    case 16: return FN<16>(__VA_ARGS__);                                                   \
    default: TORCH_CHECK(false, "native LoRA kernels support rank 1, 2, 4, 8 or 16, got ", r); \
  }

// Rows [b, e) of the forward: xa = x_l A^T, out = bias + s xa Bt, then (if gemm) out += x W^T (MKL, this
// thread).
// Rank 16 also gets a_t = A^T (K, 16) and bt_p = s Bt in panels (see shrink16); null for the other ranks.
template <int R>
void forward_rows(const torch::Tensor& x, const torch::Tensor& x_l, const torch::Tensor& w_t, const float* bias,
                  const float* a, const float* bt, int64_t bt_sj, int64_t bt_sn, const float* a_t, const float* bt_p,
                  float s, torch::Tensor& xa, torch::Tensor& out, bool gemm, bool expand, int64_t b, int64_t e) {
  const int64_t K = x.size(1), N = out.size(1);
  if constexpr (R == 16) {
    shrink16<8>(x_l.data_ptr<float>(), a_t, xa.data_ptr<float>(), b, e, K);
    if (expand) expand16<8>(xa.data_ptr<float>(), bt_p, bt, bt_sj, bt_sn, bias, s, out.data_ptr<float>(), b, e, N);
  } else {
    dot_rows<R, dot_rows_at_once<R>()>(x_l.data_ptr<float>(), a, xa.data_ptr<float>(), b, e, K);
    if (expand) expand_rows<R, 4>(xa.data_ptr<float>(), bt, bias, s, out.data_ptr<float>(), b, e, N);
  }
  if (gemm) {
    auto out_rows = out.narrow(0, b, e - b);
    out_rows.addmm_(x.narrow(0, b, e - b), w_t);
  }
}

template <int R>
std::vector<torch::Tensor> forward_r(const torch::Tensor& x, const torch::Tensor& x_l, const torch::Tensor& w,
                                     const float* bias, const torch::Tensor& a, const torch::Tensor& bt, double s,
                                     bool gemm, int64_t min_rows) {
  const int64_t M = x.size(0), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  auto xa = torch::empty({M, R}, x.options());
  const auto w_t = w.t();
  const bool own = use_own_gemm(M) && gemm;                           // lora_gemm.h: s xa Bt as R more GEMM steps
  torch::Tensor a_t, bt_p;                                     // rank 16's layouts, made once per call
  if constexpr (R == 16) {
    a_t = transposed(a);                                       // (K, 16)
    if (!own) bt_p = pack_panels(bt, s);
  }
  const bool inference = c10::InferenceMode::is_enabled();   // out is an inference tensor under it
  at::parallel_for(0, M, min_rows, [&](int64_t b, int64_t e) {
    // OpenMP worker threads start with the default thread-local state (grad mode on, inference mode off):
    // without the caller's inference mode, the in-place GEMM into rows of an inference tensor throws
    c10::InferenceMode infer(inference);
    at::NoGradGuard no_grad;
    forward_rows<R>(x, x_l, w_t, bias, a.data_ptr<float>(), bt.data_ptr<float>(), bt.stride(0), bt.stride(1),
                    R == 16 ? a_t.data_ptr<float>() : nullptr, R == 16 && !own ? bt_p.data_ptr<float>() : nullptr,
                    static_cast<float>(s), xa, out, gemm && !own, !own, b, e);
  });
  if (own)                                                     // out = bias + x W^T + xa (s Bt)
    fused_gemm(M, N, x.size(1), {x.data_ptr<float>(), x.stride(0), 1}, {w.data_ptr<float>(), w.stride(1), w.stride(0)},
               R, {xa.data_ptr<float>(), R, 1}, {bt.data_ptr<float>(), bt.stride(0), bt.stride(1)},
               static_cast<float>(s), bias, out.data_ptr<float>(), N);
  return {out, xa};
}

// Rows [b, e) of the backward, in blocks that stay in cache between their two skinny products, then the
// base GEMM on the same rows. lora_out is dx (separate == false: the GEMM accumulates into it) or dx_l.
// Rank 16 also gets b_nr = B (N, 16) and a_p = s A in panels, and accumulates dA^T and dB (ranks last).
template <int R>
void backward_rows(const torch::Tensor& g, const torch::Tensor& x_l, const torch::Tensor& w, const float* a,
                   const float* bt, const float* b_nr, const float* a_p, const float* xa, float s, float* gb,
                   float* acc_a, float* acc_b, torch::Tensor& dx, torch::Tensor& lora_out, bool separate,
                   int64_t b, int64_t e) {
  const int64_t K = x_l.size(1), N = g.size(1);
  const float* gp = g.data_ptr<float>();
  const float* xp = x_l.data_ptr<float>();
  float* lp = lora_out.defined() ? lora_out.data_ptr<float>() : nullptr;
  for (int64_t m = b; m < e; m += kBlock) {
    const int64_t me = std::min(e, m + kBlock);
    if constexpr (R == 16) {
      shrink16<8>(gp, b_nr, gb, m, me, N);                              // gb = g B
      accumulate16(xa, gp, acc_b, m, me, N);                            // dB += g^T xa
      if (lp) expand16<8, true>(gb, a_p, a, K, 1, nullptr, s, lp, m, me, K);   // s gb A
      accumulate16(gb, xp, acc_a, m, me, K);                            // dA^T += x_l^T gb
    } else {
      dot_rows<R, dot_rows_at_once<R>()>(gp, bt, gb, m, me, N);     // gb = g B
      accumulate_rows<R>(xa, gp, acc_b, m, me, N);                     // dBt += xa^T g
      if (lp) expand_rows<R, 4>(gb, a, nullptr, s, lp, m, me, K);       // s gb A
      accumulate_rows<R>(gb, xp, acc_a, m, me, K);                     // dA += gb^T x_l
    }
  }
  if (dx.defined()) {
    auto dx_rows = dx.narrow(0, b, e - b);
    if (separate) {
      at::mm_out(dx_rows, g.narrow(0, b, e - b), w);                  // dx = g W
    } else {
      dx_rows.addmm_(g.narrow(0, b, e - b), w);                         // dx = s gb A + g W
    }
  }
}

template <int R>
std::vector<torch::Tensor> backward_r(const torch::Tensor& g, const torch::Tensor& x_l, const torch::Tensor& w,
                                      const torch::Tensor& a, const torch::Tensor& bt, const torch::Tensor& xa,
                                      double s, bool need_dx, bool separate, bool need_dx_l, int64_t min_rows,
                                      const torch::Tensor& b) {
  const int64_t M = g.size(0), K = x_l.size(1), N = g.size(1);
  torch::Tensor dx, dx_l;
  if (need_dx) dx = torch::empty({M, K}, g.options());
  if (separate && need_dx_l) dx_l = torch::empty({M, K}, g.options());
  const bool own = use_own_gemm(M) && need_dx;                       // dx = g W + gb (s A) in one GEMM (lora_gemm.h)
  torch::Tensor lora_out = separate ? dx_l : own ? torch::Tensor() : dx;
  torch::Tensor dx_rows = own ? torch::Tensor() : dx;          // the per-thread MKL GEMM's output, if any
  auto gb = torch::empty({M, R}, g.options());
  auto part_a = partials(R, K, g);
  auto part_b = partials(R, N, g);
  torch::Tensor b_nr, a_p;                                     // rank 16's layouts, made once per call
  if constexpr (R == 16) {
    b_nr = b.defined() ? b : transposed(bt);                  // B (N, 16): the layer passes it
    if (lora_out.defined()) a_p = pack_panels(a, s);          // s gb A's panels: only when it is written
  }
  const bool inference = c10::InferenceMode::is_enabled();
  std::vector<char> ran(part_a.size(0), 0);
  at::parallel_for(0, M, min_rows, [&](int64_t b, int64_t e) {
    c10::InferenceMode infer(inference);                      // as in forward_r: the caller's mode
    at::NoGradGuard no_grad;
    const int64_t t = at::get_thread_num();
    ran[t] = 1;
    float* acc_a = part_a.data_ptr<float>() + t * R * K;
    float* acc_b = part_b.data_ptr<float>() + t * R * N;
    std::fill(acc_a, acc_a + R * K, 0.f);
    std::fill(acc_b, acc_b + R * N, 0.f);
    backward_rows<R>(g, x_l, w, a.data_ptr<float>(), bt.data_ptr<float>(),
                     R == 16 ? b_nr.data_ptr<float>() : nullptr, a_p.defined() ? a_p.data_ptr<float>() : nullptr,
                     xa.data_ptr<float>(), static_cast<float>(s), gb.data_ptr<float>(), acc_a, acc_b, dx_rows,
                     lora_out, separate, b, e);
  });
  if (own)                                                     // dx = g W (+ gb (s A) when x_l is x)
    fused_gemm(M, K, N, {g.data_ptr<float>(), N, 1}, {w.data_ptr<float>(), w.stride(0), w.stride(1)},
               separate ? 0 : R, {gb.data_ptr<float>(), R, 1}, {a.data_ptr<float>(), K, 1}, static_cast<float>(s),
               nullptr, dx.data_ptr<float>(), K);
  zero_idle(part_a, ran);
  zero_idle(part_b, ran);
  return {dx, dx_l, part_a, part_b};                                   // partial sums: see finish
}

// (out, xa); without gemm, out lacks x W^T (the few-rows path adds it with torch's multi-threaded GEMM)
std::vector<torch::Tensor> forward_impl(const torch::Tensor& x_in, const torch::Tensor& x_l_in, const torch::Tensor& w_in,
                                        const c10::optional<torch::Tensor>& bias, const torch::Tensor& a,
                                        const torch::Tensor& bt, double s, bool gemm, int64_t min_rows) {
  const auto x = x_in.detach(), x_l = x_l_in.detach(), w = w_in.detach();
  check(x, 2, "x");
  check(x_l, 2, "x_l");
  check(a, 2, "A");
  check_bt(bt, a.size(0));
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(1) == x.size(1), "W must be (N, K) float32");
  TORCH_CHECK(x_l.sizes() == x.sizes() && a.size(1) == x.size(1) && bt.size(0) == a.size(0) &&
              bt.size(1) == w.size(0), "forward wants x, x_l (M, K), W (N, K), A (R, K), Bt (R, N)");
  const float* bp = nullptr;
  if (bias.has_value()) {
    check(*bias, 1, "bias");
    TORCH_CHECK(bias->size(0) == w.size(0), "bias must be (N,)");
    bp = bias->data_ptr<float>();
  }
  PD_DISPATCH_RANK(a.size(0), forward_r, x, x_l, w, bp, a, bt, s, gemm, min_rows)
}


// (dx, dx_l, per-thread partial sums of dA and dBt; of dA^T and dB when ranks_last)
std::vector<torch::Tensor> backward_partials(const torch::Tensor& g, const torch::Tensor& x_l_in, const torch::Tensor& w_in,
                                             const torch::Tensor& a, const torch::Tensor& bt, const torch::Tensor& xa,
                                             double s, bool need_dx, bool separate, bool need_dx_l, int64_t min_rows,
                                             const torch::Tensor& b = torch::Tensor()) {
  const auto x_l = x_l_in.detach(), w = w_in.detach();
  check(g, 2, "g");
  check(x_l, 2, "x_l");
  check(a, 2, "A");
  check_bt(bt, a.size(0));
  check(xa, 2, "xa");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(0) == g.size(1) && w.size(1) == x_l.size(1),
              "W must be (N, K) float32");
  TORCH_CHECK(g.size(0) == x_l.size(0) && xa.size(0) == g.size(0) && xa.size(1) == a.size(0) &&
              a.size(1) == x_l.size(1) && bt.size(0) == a.size(0) && bt.size(1) == g.size(1),
              "backward wants g (M, N), x_l (M, K), A (R, K), Bt (R, N), xa (M, R)");
  TORCH_CHECK(!b.defined() || (b.is_contiguous() && b.size(0) == bt.size(1) && b.size(1) == bt.size(0)),
              "B must be a contiguous (N, R) tensor");
  PD_DISPATCH_RANK(a.size(0), backward_r, g, x_l, w, a, bt, xa, s, need_dx, separate, need_dx_l, min_rows, b)
}

std::vector<torch::Tensor> pipeline_backward(const torch::Tensor& g, const torch::Tensor& x_l, const torch::Tensor& w,
                                    const torch::Tensor& a, const torch::Tensor& bt, const torch::Tensor& xa,
                                    double s, bool need_dx, bool separate, bool need_dx_l, int64_t min_rows) {
  auto res = backward_partials(g, x_l, w, a, bt, xa, s, need_dx, separate, need_dx_l, min_rows);
  const bool last = ranks_last(a.size(0));                             // (dA, dBt) as (R, K), (R, N)
  return {res[0], res[1], finish(res[2], 1.0, last), finish(res[3], 1.0, last)};
}


// The layer as a C++ autograd function: y = x W^T + b + s (x_l A^T) B^T, gradients for x, x_l, W, b, A, B
// as required. A Python torch.autograd.Function around the same kernels measured ~0.25 ms slower per
// forward+backward at M=2048 (its node in the autograd graph is a Python call), ~1% of the layer.
// pipeline_rows > 0: the per-thread pipeline (the caller picks it for >= pipeline_rows rows per thread);
// 0: for few rows, one blocked pass each way without the GEMM (xa and b + s xa Bt; gb, dBt, dA, s gb A),
// then torch's multi-threaded GEMM. Fixed costs matter there: at M=64, K=N=768, r=8 this function took
// 1.23x the frozen layer's forward+backward when dA and dB were finished with torch ops and the forward
// ran shrink and expand as two parallel regions, 1.16x with finish() and one region (2026-12-06).
struct LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const c10::optional<torch::Tensor>& x_lora, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& bias, const torch::Tensor& a,
                               const torch::Tensor& b, double s, int64_t pipeline_rows) {
    const auto xc = x.contiguous();
    const auto x_l = x_lora.has_value() ? x_lora->contiguous() : xc;
    const auto ac = a.contiguous();
    const auto bt = a.size(0) == 16 ? b.detach().t() : transposed(b);                 // (R, N); see check_bt
    c10::optional<torch::Tensor> bias_c;
    if (bias.has_value()) bias_c = bias->contiguous();
    const bool pipeline = pipeline_rows > 0;
    // own GEMM (any rows): xa, then bias + x W^T + xa (s Bt) in one GEMM (lora_gemm.h). MKL: few rows: xa and
    // b + s xa Bt in one blocked pass, then torch's multi-threaded GEMM adds into it; many: the pipeline
    const bool gemm = pipeline || use_own_gemm(xc.size(0));
    auto res = forward_impl(xc, x_l, w, bias_c, ac, bt, s, gemm, pipeline ? pipeline_rows : kBlock);
    torch::Tensor out = res[0], xa = res[1];                                           // (M, N), (M, R)
    if (!gemm) out.addmm_(xc.detach(), w.detach().t());
    ctx->saved_data["s"] = s;
    ctx->saved_data["pipeline"] = pipeline;
    ctx->saved_data["pipeline_rows"] = pipeline_rows;
    ctx->saved_data["separate"] = x_lora.has_value();
    // needs_input_grad counts tensor inputs only (an absent optional is not one): edge index per argument
    std::vector<int64_t> edge;
    int64_t next = 0;
    for (bool present : {true, x_lora.has_value(), true, bias.has_value(), true, true})
      edge.push_back(present ? next++ : -1);
    ctx->saved_data["edge"] = edge;
    ctx->save_for_backward({xc, x_l, xa, w, ac, bt, b.detach().contiguous()});   // B too: rank 16's gb = g B
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &x_l = saved[1], &xa = saved[2], &w = saved[3], &a = saved[4], &bt = saved[5],
               &b = saved[6];
    const double s = ctx->saved_data["s"].toDouble();
    const bool separate = ctx->saved_data["separate"].toBool();
    const auto edge = ctx->saved_data["edge"].toIntVector();
    auto needs = [&](int arg) { return edge[arg] >= 0 && ctx->needs_input_grad(edge[arg]); };
    const bool need_dx = needs(0), need_dx_l = separate && needs(1);
    const auto g = grads[0].contiguous();                                              // (M, N)
    torch::Tensor dx, dx_l, d_a, d_bt;
    const bool pipeline = ctx->saved_data["pipeline"].toBool();
    if (pipeline || use_own_gemm(g.size(0))) {
      auto res = backward_partials(g, x_l, w, a, bt, xa, s, need_dx, separate, need_dx_l,
                                   pipeline ? ctx->saved_data["pipeline_rows"].toInt() : kBlock, b);
      dx = res[0];
      dx_l = res[1];
      d_a = res[2];
      d_bt = res[3];
    } else {
      // the same blocked pass without the per-thread GEMM: s gb A (into dx_l's slot), dA, dBt; then
      // torch's multi-threaded GEMM, accumulating into s gb A when x_l is x
      auto res = backward_partials(g, x_l, w, a, bt, xa, s, false, true, need_dx || need_dx_l, kBlock, b);
      d_a = res[2];
      d_bt = res[3];
      if (need_dx) dx = separate ? at::mm(g, w.detach()) : res[1].addmm_(g, w.detach());   // dx = s gb A + g W
      if (need_dx_l) dx_l = res[1];
    }
    torch::autograd::variable_list out(8);
    out[0] = dx;
    out[1] = dx_l;
    if (needs(2)) out[2] = at::mm(g.t(), x.detach());                                 // dW (N, K)
    if (needs(3)) out[3] = g.sum(0);                                                  // db (N,)
    const bool last = ranks_last(a.size(0));                     // partials as (K, R), (N, R)
    if (needs(4)) out[4] = finish(d_a, s, last);                                      // dA (R, K)
    if (needs(5)) out[5] = finish(d_bt, s, !last);                                    // dB (N, R)
    return out;
  }
};

// c = bias + a1 b1 + a2 (s2 b2) on lora_gemm.h's GEMM, the operands read through their strides (for tests
// and benchmarks: the layer calls fused_gemm directly)
torch::Tensor gemm(const torch::Tensor& a1, const torch::Tensor& b1, const c10::optional<torch::Tensor>& a2,
                   const c10::optional<torch::Tensor>& b2, double s2, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(kOwnGemm, "the native GEMM is built only for AVX-512 CPUs");
  auto fp32_2d = [](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, name,
                " must be a 2-D float32 CPU tensor");
  };
  fp32_2d(a1, "a1");
  fp32_2d(b1, "b1");
  TORCH_CHECK(a1.size(1) == b1.size(0), "a1 (M, K1) and b1 (K1, N) do not chain");
  const int64_t M = a1.size(0), N = b1.size(1);
  TORCH_CHECK(a2.has_value() == b2.has_value(), "a2 and b2 come together");
  int64_t k2 = 0;
  Strided sa2{nullptr, 0, 0}, sb2{nullptr, 0, 0};
  if (a2.has_value()) {
    fp32_2d(*a2, "a2");
    fp32_2d(*b2, "b2");
    TORCH_CHECK(a2->size(0) == M && b2->size(1) == N && a2->size(1) == b2->size(0), "a2 (M, K2) b2 (K2, N)");
    k2 = a2->size(1);
    sa2 = {a2->data_ptr<float>(), a2->stride(0), a2->stride(1)};
    sb2 = {b2->data_ptr<float>(), b2->stride(0), b2->stride(1)};
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    check(*bias, 1, "bias");
    TORCH_CHECK(bias->size(0) == N, "bias must be (N,)");
    bp = bias->data_ptr<float>();
  }
  auto c = torch::empty({M, N}, a1.options());
  fused_gemm(M, N, a1.size(1), {a1.data_ptr<float>(), a1.stride(0), a1.stride(1)},
             {b1.data_ptr<float>(), b1.stride(0), b1.stride(1)}, k2, sa2, sb2, static_cast<float>(s2), bp,
             c.data_ptr<float>(), N);
  return c;
}

torch::Tensor lora_linear(const torch::Tensor& x, const c10::optional<torch::Tensor>& x_lora, const torch::Tensor& w,
                          const c10::optional<torch::Tensor>& bias, const torch::Tensor& a, const torch::Tensor& b,
                          double s, int64_t pipeline_rows) {
  return LoRALinearFunction::apply(x, x_lora, w, bias, a, b, s, pipeline_rows);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "promptdelta native CPU LoRA kernels (fp32, rank 1/2/4/8/16)";
  m.def("forward", &forward_impl, "the fused layer's forward, rows split over threads: (out, xa)");
  m.def("backward", &pipeline_backward, "the fused layer's backward, rows split over threads: (dx, dx_l, dA, dBt)");
  m.def("set_own_gemm", [](bool on) { const bool before = g_own_gemm; g_own_gemm = on && kOwnGemm; return before; },
        "use lora_gemm.h's GEMM (where built for AVX-512) or MKL's; returns the previous setting");
  m.def("gemm", &gemm, "bias + a1 b1 + a2 (s2 b2) on the native GEMM (AVX-512 builds)");
  m.def("own_gemm", []() { return kOwnGemm; }, "whether this build has the native GEMM");
  m.def("use_own_gemm", &use_own_gemm, "whether the native GEMM serves a call on this many rows now");
  m.def("lora_linear", &lora_linear, "the fused layer as a C++ autograd function (x, x_lora, W, b, A, B, s, rows)");
}
