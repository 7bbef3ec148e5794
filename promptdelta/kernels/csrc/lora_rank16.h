// Rank-16 kernels of the native LoRA layer (included once, by lora_cpu.cpp, after lora_simd.h).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "lora_simd.h"

namespace {

// ---- Rank 16: a row's 16 ranks are one vector ----
// The rank-R kernels above read the (R, K) factor as R streams K floats apart; at R = 16 and K = 1024 that is
// 16 lines 4 KiB apart, which all fall in one set of a 32 KiB 8-way L1, so every step missed (r=16 ran at
// 1/3 of r=8's speed per FMA at K = N = 1024). Rank 16 uses layouts with no stride over the ranks: the
// factors as (K, 16) for the shrink (one vector load per k, shared by MR rows), the accumulators of dA and
// dB as (K, 16) and (N, 16), and the expand's factor packed into 32-column panels (2 KiB, held in L1).
// The expand's register tile is 8 rows x 32 columns: in isolation (1 thread, 256 x 1024 outputs) 85 us against
// 140 us for 4 x 64 or 2 x 64 and 81-92 us for 6 x 64, 12 x 32 or 16 x 16 (2026-12-06).
constexpr int64_t kPanel = 32;   // columns per expand panel: 2 vectors a row

// out[m, :] = sum_k x[m, k] f[k, :] for m in [m0, m1); x (M, K), f (K, 16), out (M, 16).
template <int MR>
void shrink16(const float* x, const float* f, float* out, int64_t m0, int64_t m1, int64_t K) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) {
    v16 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = v16{};
    const float* xm = x + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      for (int i = 0; i < MR; ++i) prefetch_read(x, (m + i + kPrefetch) * K + k);
      for (int kk = 0; kk < 16; ++kk) {
        const v16 fv = load(f + (k + kk) * 16);
        for (int i = 0; i < MR; ++i) acc[i] += splat(xm[i * K + k + kk]) * fv;
      }
    }
    for (; k < K; ++k) {
      const v16 fv = load(f + k * 16);
      for (int i = 0; i < MR; ++i) acc[i] += splat(xm[i * K + k]) * fv;
    }
    for (int i = 0; i < MR; ++i) store(out + (m + i) * 16, acc[i]);
  }
  if constexpr (MR > 1) {
    if (m < m1) shrink16<1>(x, f, out, m, m1, K);
  }
}

// f (16, N), any strides (the layer passes B^T as a view of B (N, 16): no transposed copy) -> s f in panels:
// p[(q * 16 + j) * kPanel + c] = s f[j, q kPanel + c] for the full panels q.
torch::Tensor pack_panels(const torch::Tensor& f, double s) {
  const int64_t N = f.size(1), panels = N / kPanel, sj = f.stride(0), sn = f.stride(1);
  auto out = torch::empty({std::max<int64_t>(panels, 1) * 16 * kPanel}, f.options());
  const float* p = f.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float sf = static_cast<float>(s);
  for (int64_t q = 0; q < panels; ++q)
    for (int64_t j = 0; j < 16; ++j)
      for (int64_t c = 0; c < kPanel; ++c) o[(q * 16 + j) * kPanel + c] = sf * p[j * sj + (q * kPanel + c) * sn];
  return out;
}

// One MR x kPanel register tile of expand16: out[m + i, n + c] = bias[n + c] + sum_j c[m + i, j] pq[j, c] for
// i < rows (a short tile repeats its last row in registers and stores only the real ones).
template <int MR>
inline void expand_tile16(const float* c, const float* pq, const float* bias, float* out, int64_t m, int rows,
                          int64_t n, int64_t N) {
  constexpr int NV = kPanel / 16;
  const float* cr[MR];
  for (int i = 0; i < MR; ++i) cr[i] = c + (m + std::min(i, rows - 1)) * 16;
  v16 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const v16 b0 = bias ? load(bias + n + 16 * v) : v16{};
    for (int i = 0; i < MR; ++i) acc[i][v] = b0;
  }
  for (int j = 0; j < 16; ++j) {
    v16 fv[NV];
    for (int v = 0; v < NV; ++v) fv[v] = load(pq + j * kPanel + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const v16 ci = splat(cr[i][j]);
      for (int v = 0; v < NV; ++v) acc[i][v] += ci * fv[v];
    }
  }
  for (int i = 0; i < rows; ++i) {
    for (int v = 0; v < NV; ++v) store(out + (m + i) * N + n + 16 * v, acc[i][v]);
    for (int v = 0; v < NV; v += 4) prefetch_write(out, (m + i + kPrefetch) * N + n + 16 * v);   // a line
  }
}

// out[m, n] = bias[n] + s sum_j c[m, j] f[j, n] for m in [m0, m1) (bias may be null): an MR x kPanel
// register tile per panel of fp (= s f, packed); columns past the last full panel read f (16, N) through its
// strides (sj, sn) and scale by s. ROWS_OUTER false: panels outer, rows inner, so a panel stays in L1 (the
// forward, all of a thread's rows at once); true: each row tile sweeps all panels, writing its rows in order
// (the backward's 16-row blocks).
template <int MR, bool ROWS_OUTER = false>
void expand16(const float* c, const float* fp, const float* f, int64_t sj, int64_t sn, const float* bias, float s,
              float* out, int64_t m0, int64_t m1, int64_t N) {
  const int64_t panels = N / kPanel;
  if constexpr (ROWS_OUTER) {
    for (int64_t m = m0; m < m1; m += MR)
      for (int64_t q = 0; q < panels; ++q)
        expand_tile16<MR>(c, fp + q * 16 * kPanel, bias, out, m, static_cast<int>(std::min<int64_t>(MR, m1 - m)),
                          q * kPanel, N);
  } else {
    for (int64_t q = 0; q < panels; ++q)
      for (int64_t m = m0; m < m1; m += MR)
        expand_tile16<MR>(c, fp + q * 16 * kPanel, bias, out, m, static_cast<int>(std::min<int64_t>(MR, m1 - m)),
                          q * kPanel, N);
  }
  for (int64_t m = m0; m < m1; ++m)                                        // the last N mod kPanel columns
    for (int64_t n = panels * kPanel; n < N; ++n) {
      float v = bias ? bias[n] : 0.f;
      for (int j = 0; j < 16; ++j) v += s * c[m * 16 + j] * f[j * sj + n * sn];
      out[m * N + n] = v;
    }
}

// acc[n, :] += sum_{m in [m0, m1)} y[m, n] c[m, :]; y (M, N), c (M, 16), acc (N, 16): 16 columns a strip,
// their 16 accumulators in registers over the block's rows, then one contiguous 1 KiB update of acc.
void accumulate16(const float* c, const float* y, float* acc, int64_t m0, int64_t m1, int64_t N) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    v16 d[16];
    for (int i = 0; i < 16; ++i) d[i] = v16{};
    for (int64_t m = m0; m < m1; ++m) {
      const v16 cv = load(c + m * 16);
      const float* ym = y + m * N + n;
      prefetch_read(y, (m + kPrefetch) * N + n);
      for (int i = 0; i < 16; ++i) d[i] += splat(ym[i]) * cv;
    }
    for (int i = 0; i < 16; ++i) store(acc + (n + i) * 16, load(acc + (n + i) * 16) + d[i]);
  }
  for (; n < N; ++n) {
    v16 d{};
    for (int64_t m = m0; m < m1; ++m) d += splat(y[m * N + n]) * load(c + m * 16);
    store(acc + n * 16, load(acc + n * 16) + d);
  }
}
}  // namespace
