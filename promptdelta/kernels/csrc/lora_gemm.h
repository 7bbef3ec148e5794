// The base GEMM of the fused LoRA layer, with the low-rank product folded in as R more steps of its inner
// dimension: C (M, N) = [bias] + A1 B1 + A2 (s B2), A1 (M, K1), B1 (K1, N), A2 (M, R), B2 (R, N). Included
// once, by lora_cpu.cpp. Built only where the compiler targets AVX-512 (kOwnGemm); elsewhere the layer keeps
// MKL's GEMM and its separate expand pass.
//
// Why our own: on the 2-core AMD EPYC (Zen 4) we measure on, MKL's sgemm runs 512x1024x1024 at ~180 GFLOP/s,
// ~78% of the cores' FMA peak (~230 GFLOP/s, from a register-only FMA loop), and the rank-16 products, as
// passes of their own, cost ~4.5% of the frozen layer at best (docs/results/kernels.md). Here the forward's
// s xa B^T and the backward's s gb A are R more k steps of the GEMM (at rank 16 and K = 1024, +1.6% of its
// work, at its rate) instead of a write pass each, and the GEMM itself, blocked for these caches, runs faster
// than MKL's (0.89-0.90x its time at 512x1024x1024 and 2048x768x768, 2026-12-07).
//
// The classic blocked design (Goto and van de Geijn, "Anatomy of high-performance matrix multiplication",
// TOMS 2008; the BLIS loop nest): threads split C into row or column ranges (fused_gemm); per range, for
// each block of KC inner steps, a KC x NC block of B is packed into NR-column panels (L2), then for each MC-row
// block of A an MC x KC block is packed into MR-row panels, and an MR x NR micro-kernel keeps its tile of C in
// 16 vector registers while it walks the inner dimension. Edge tiles (rows past M, columns past N) run on zero-padded panels into
// a local tile, of which the valid part is written. The R low-rank steps ride on the inner dimension's last
// block, read from A2 and B2 (B2 scaled by s while packed).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lora_simd.h"

namespace {

#ifdef __AVX512F__
constexpr bool kOwnGemm = true;
#else
constexpr bool kOwnGemm = false;
#endif
bool g_own_gemm = kOwnGemm;              // set_own_gemm(False): MKL's GEMM and the expand passes (benchmarks)
// At 1 row MKL's GEMV reads W once where this GEMM packs it (K=N=1024, r=16, no grad: 118 us against 299 us),
// at 2 rows they tie, from 4 this one is ahead (304 us against 386 us; 2026-12-07)
constexpr int64_t kOwnGemmMinRows = 4;
inline bool use_own_gemm(int64_t rows) { return g_own_gemm && rows >= kOwnGemmMinRows; }

constexpr int kMR = 8, kNR = 32;         // micro-tile: 8 rows x 2 vectors = 16 accumulators
constexpr int64_t kKC = 256, kMC = 96, kNC = 512;   // B block 512 KiB (L2), A block 96 KiB, B panel 32 KiB

// A matrix read through strides: element (i, k) at p[i * rs + k * cs].
struct Strided {
  const float* p;
  int64_t rs, cs;
  float at(int64_t i, int64_t k) const { return p[i * rs + k * cs]; }
};

// r[i][j] -> r[j][i] for a 16 x 16 tile, in four rounds of shuffles over lane pairs, quads, octets and halves.
inline void transpose16(v16 r[16]) {
  v16 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int g = 0; g < 16; g += 4)
    for (int i = g; i < g + 2; ++i) {
      r[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      r[i + 2] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
  for (int g = 0; g < 16; g += 8)
    for (int i = g; i < g + 4; ++i) {
      t[i] = __builtin_shufflevector(r[i], r[i + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
      t[i + 4] = __builtin_shufflevector(r[i], r[i + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = __builtin_shufflevector(t[i], t[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    r[i + 8] = __builtin_shufflevector(t[i], t[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
}

// ap[panel][koff + k][MR] (panels kc_all steps long) for rows [m0, m0 + mc) and inner steps [k0, k0 + kc) of a;
// rows past m_end are zeros.
void pack_a(Strided a, int64_t m0, int64_t mc, int64_t m_end, int64_t k0, int64_t kc, int64_t kc_all, int64_t koff,
            float* ap) {
  int64_t p = 0;
  if (a.cs == 1) {                                                     // two panels (16 rows) at a time: 16 x 16
    for (; p + 2 * kMR <= mc && m0 + p + 2 * kMR <= m_end; p += 2 * kMR) {   // tiles transposed in registers
      float* d0 = ap + p * kc_all + koff * kMR;
      float* d1 = d0 + kMR * kc_all;
      int64_t k = 0;
      for (; k + 16 <= kc; k += 16) {
        v16 r[16];
        for (int i = 0; i < 16; ++i) r[i] = load(a.p + (m0 + p + i) * a.rs + k0 + k);
        transpose16(r);                                                // r[j]: step k + j of the 16 rows
        for (int j = 0; j < 16; j += 2) {
          store(d0 + (k + j) * kMR, __builtin_shufflevector(r[j], r[j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                                            19, 20, 21, 22, 23));
          store(d1 + (k + j) * kMR, __builtin_shufflevector(r[j], r[j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                                            26, 27, 28, 29, 30, 31));
        }
      }
      for (; k < kc; ++k)
        for (int i = 0; i < kMR; ++i) {
          d0[k * kMR + i] = a.p[(m0 + p + i) * a.rs + k0 + k];
          d1[k * kMR + i] = a.p[(m0 + p + kMR + i) * a.rs + k0 + k];
        }
    }
  }
  for (; p < mc; p += kMR) {
    float* d = ap + p * kc_all + koff * kMR;
    for (int i = 0; i < kMR; ++i) {
      const int64_t m = m0 + p + i;
      if (m >= m_end) {
        for (int64_t k = 0; k < kc; ++k) d[k * kMR + i] = 0.f;
      } else if (a.cs == 1) {
        const float* src = a.p + m * a.rs + k0;
        for (int64_t k = 0; k < kc; ++k) d[k * kMR + i] = src[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) d[k * kMR + i] = a.at(m, k0 + k);
      }
    }
  }
}

// bp[panel][koff + k][NR] = scale * b(k0 + k, n) (panels kc_all steps long) for columns [n0, n0 + nc);
// columns past n_end are zeros.
void pack_b(Strided b, int64_t k0, int64_t kc, int64_t kc_all, int64_t koff, int64_t n0, int64_t nc, int64_t n_end,
            float scale, float* bp) {
  for (int64_t q = 0; q < nc; q += kNR) {
    float* d = bp + q * kc_all + koff * kNR;
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kNR, n_end - n0 - q));
    if (b.cs == 1 && valid == kNR) {                                   // rows of b: 32 floats each
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = b.p + (k0 + k) * b.rs + n0 + q;
        store(d + k * kNR, splat(scale) * load(src));
        store(d + k * kNR + 16, splat(scale) * load(src + 16));
      }
      continue;
    }
    int64_t k_done = 0;
    if (b.rs == 1 && valid == kNR) {                                   // columns of b (W^T: rows of W), 16 x 16
      for (; k_done + 16 <= kc; k_done += 16)                          // tiles transposed in registers (8 x 1024
        for (int h = 0; h < kNR; h += 16) {                            // x 1024, packing-bound: 0.28 ms a call,
                                                                       // 0.43 ms element by element)
          v16 r[16];
          for (int i = 0; i < 16; ++i) r[i] = splat(scale) * load(b.p + (n0 + q + h + i) * b.cs + k0 + k_done);
          transpose16(r);
          for (int i = 0; i < 16; ++i) store(d + (k_done + i) * kNR + h, r[i]);
        }
    }
    for (int j = 0; j < kNR; ++j) {                                    // the rest, element by element
      if (j >= valid) {
        for (int64_t k = 0; k < kc; ++k) d[k * kNR + j] = 0.f;
        continue;
      }
      const int64_t n = n0 + q + j;
      for (int64_t k = k_done; k < kc; ++k) d[k * kNR + j] = scale * b.at(k0 + k, n);
    }
  }
}

// c (MR x NR, row stride ldc) = [c +] ap^T bp [+ bias]: one micro-tile over kc inner steps.
inline void micro_tile(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, bool accumulate,
                       const float* bias) {
  v16 c0[kMR], c1[kMR];
  for (int i = 0; i < kMR; ++i) {
    c0[i] = c1[i] = v16{};
    prefetch_write(c, i * ldc);                                       // the tile's lines, for the update
    prefetch_write(c, i * ldc + 16);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const v16 b0 = load(bp + k * kNR), b1 = load(bp + k * kNR + 16);
    prefetch_read(bp, (k + 8) * kNR);
    prefetch_read(bp, (k + 8) * kNR + 16);
    if ((k & 1) == 0) prefetch_read(ap, (k + 16) * kMR);           // A's panel streams from L2
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      const v16 a = splat(ap[k * kMR + i]);
      c0[i] += a * b0;
      c1[i] += a * b1;
    }
  }
  const v16 bias0 = bias ? load(bias) : v16{}, bias1 = bias ? load(bias + 16) : v16{};
  for (int i = 0; i < kMR; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      store(ci, load(ci) + c0[i]);
      store(ci + 16, load(ci + 16) + c1[i]);
    } else {
      store(ci, c0[i] + bias0);
      store(ci + 16, c1[i] + bias1);
    }
  }
}

// Columns [n_begin, n_end) of c = bias + a1 b1 + a2 (s2 b2), all M rows, on this thread. The K2 low-rank
// steps ride on the last block of a1 b1's inner dimension (a block of their own would cost one more
// read-modify-write pass over this thread's part of c, as the separate expand pass did).
void gemm_columns(int64_t M, int64_t n_begin, int64_t n_end, int64_t K1, Strided a1, Strided b1, int64_t K2,
                  Strided a2, Strided b2, float s2, const float* bias, float* c, int64_t ldc) {
  thread_local std::vector<float> a_pack, b_pack;
  const int64_t kc_max = kKC + K2;
  a_pack.resize(kMC * kc_max);
  b_pack.resize(kNC * kc_max);
  float* ap = a_pack.data();
  float* bp = b_pack.data();
  float tile[kMR * kNR];
  float bias_edge[kNR];
  const int64_t blocks = std::max<int64_t>(1, (K1 + kKC - 1) / kKC);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNC) {
    const int64_t nc = std::min(kNC, n_end - n0);
    const int64_t nc_pad = (nc + kNR - 1) / kNR * kNR;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t k0 = blk * kKC, kc1 = std::min(kKC, K1 - k0);
      const bool first = blk == 0, last = blk == blocks - 1;
      const int64_t kc = kc1 + (last ? K2 : 0);                        // the low-rank steps: after the last block
      pack_b(b1, k0, kc1, kc, 0, n0, nc_pad, n0 + nc, 1.f, bp);
      if (last && K2 > 0) pack_b(b2, 0, K2, kc, kc1, n0, nc_pad, n0 + nc, s2, bp);
      for (int64_t m0 = 0; m0 < M; m0 += kMC) {
        const int64_t mc = std::min(kMC, M - m0);
        const int64_t mc_pad = (mc + kMR - 1) / kMR * kMR;
        pack_a(a1, m0, mc_pad, M, k0, kc1, kc, 0, ap);
        if (last && K2 > 0) pack_a(a2, m0, mc_pad, M, 0, K2, kc, kc1, ap);
        for (int64_t q = 0; q < nc_pad; q += kNR) {
          const int64_t cols = std::min<int64_t>(kNR, nc - q);
          const float* bias_q = first && bias ? bias + n0 + q : nullptr;
          if (bias_q && cols < kNR) {                                   // the bias past N is never read
            std::fill(bias_edge, bias_edge + kNR, 0.f);
            std::copy(bias_q, bias_q + cols, bias_edge);
            bias_q = bias_edge;
          }
          for (int64_t p = 0; p < mc_pad; p += kMR) {
            const int64_t rows = std::min<int64_t>(kMR, mc - p);
            float* cp = c + (m0 + p) * ldc + n0 + q;
            if (rows == kMR && cols == kNR) {
              micro_tile(kc, ap + p * kc, bp + q * kc, cp, ldc, !first, bias_q);
              continue;
            }
            micro_tile(kc, ap + p * kc, bp + q * kc, tile, kNR, false, bias_q);
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t j = 0; j < cols; ++j)
                cp[i * ldc + j] = first ? tile[i * kNR + j] : cp[i * ldc + j] + tile[i * kNR + j];
          }
        }
      }
    }
  }
}

// c (M, N, row stride ldc) = bias + a1 b1 + a2 (s2 b2) (bias may be null, K2 may be 0), on torch's intra-op
// threads. Each thread packs the a rows and b columns its part of c needs, so the split goes along the longer
// side: columns (every thread packs all of a) when N >= M, rows (every thread packs all of b) otherwise. At
// M=2048, K=N=768 the column split packed 1.36x more per thread and ran slower than MKL (2026-12-07).
void fused_gemm(int64_t M, int64_t N, int64_t K1, Strided a1, Strided b1, int64_t K2, Strided a2, Strided b2,
                float s2, const float* bias, float* c, int64_t ldc) {
  const bool by_rows = M > N;
  const int64_t unit = by_rows ? kMR : kNR, units = ((by_rows ? M : N) + unit - 1) / unit;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t ub = units * t / T, ue = units * (t + 1) / T;
      if (!by_rows) {
        gemm_columns(M, ub * kNR, std::min(N, ue * kNR), K1, a1, b1, K2, a2, b2, s2, bias, c, ldc);
        continue;
      }
      const int64_t m0 = ub * kMR, m1 = std::min(M, ue * kMR);
      const Strided a1_t{a1.p + m0 * a1.rs, a1.rs, a1.cs}, a2_t{K2 ? a2.p + m0 * a2.rs : a2.p, a2.rs, a2.cs};
      gemm_columns(m1 - m0, 0, N, K1, a1_t, b1, K2, a2_t, b2, s2, bias, c + m0 * ldc, ldc);
    }
  });
}

}  // namespace
