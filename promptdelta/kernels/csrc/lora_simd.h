// SIMD helpers of the native LoRA kernels (lora_cpu.cpp, lora_rank16.h): 16-float vectors, lane sums,
// software prefetch. Included once, by lora_cpu.cpp (one translation unit, so an anonymous namespace).
#pragma once

#include <cstdint>

namespace {


typedef float v16 __attribute__((vector_size(64), aligned(4)));   // unaligned loads and stores are fine
inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
inline v16 splat(float a) { return v16{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }   // not 0 + a: -0.0 rules
                                                                                  // that out of a plain broadcast
inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Lane sums of R vectors at once, by a shuffle-and-add tree (7 shuffle pairs for R = 8 instead of 8 x 15
// scalar adds): fold2 puts a's two halves summed in lanes 0-7 and b's in lanes 8-15; fold4 does the same
// to groups of 8 lanes, fold8 to groups of 4.
inline v16 fold2(v16 a, v16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline v16 fold4(v16 a, v16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline v16 fold8(v16 a, v16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}

template <int R>
void lane_sums(const v16* t, float* out) {
  if constexpr (R == 8) {
    v16 w = fold8(fold4(fold2(t[0], t[1]), fold2(t[2], t[3])), fold4(fold2(t[4], t[5]), fold2(t[6], t[7])));
    w += __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    for (int j = 0; j < 8; ++j) out[j] = w[2 * j];                   // lane pair (2j, 2j + 1) held t[j]
  } else if constexpr (R == 4) {
    v16 w = fold4(fold2(t[0], t[1]), fold2(t[2], t[3]));
    w += __builtin_shufflevector(w, w, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    w += __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    for (int j = 0; j < 4; ++j) out[j] = w[4 * j];                   // lanes 4j..4j+3 held t[j]
  } else if constexpr (R == 16) {
    lane_sums<8>(t, out);
    lane_sums<8>(t + 8, out + 8);
  } else {
    for (int j = 0; j < R; ++j) out[j] = hsum(t[j]);
  }
}

constexpr int64_t kBlock = 16;   // rows per block: 16 rows of g or x (48 KiB at 768 features) stay in L1/L2

// Software prefetch of the row kPrefetch rows ahead of the one being read (into L2) or written (for
// ownership), one cache line per vector step. The hardware prefetchers do not keep up with the skinny
// passes, which read g and x from L3 and do little work per line: at M=2048, K=N=768, r=8, 2 threads,
// prefetching 16 rows ahead took the layer's forward+backward from 1.057 to 1.023 times the frozen layer's
// (8 and 32 rows ahead, or into L1, measured within 0.5%; 151 interleaved rounds, 2026-12-06). Prefetch
// instructions never fault, so rows past the end cost a wasted line at most; the address is formed as an
// integer, since a pointer past the end of its array is undefined.
constexpr int64_t kPrefetch = 16;
inline void prefetch_read(const float* base, int64_t offset) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + offset * sizeof(float)), 0, 2);
}
inline void prefetch_write(float* base, int64_t offset) {
  __builtin_prefetch(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(base) + offset * sizeof(float)), 1, 2);
}

}  // namespace
