// Fused CPU dropout with a counter-based RNG: element i of a call with seed s is kept when
// hash(s, i) >= p * 2^32, so the mask is a pure function of (seed, index) and the backward REGENERATES it
// instead of saving it (no mask tensor in memory, and no sequential generator to run).
// Built on first use by promptdelta/kernels/dropout.py (torch.utils.cpp_extension, -O3 -march=native
// -fopenmp); elements are split over torch's intra-op threads with at::parallel_for.
//
//   apply(x, seed, p)                      y = x * m / (1 - p)           (forward, and backward on g)
//   softmax_backward(gd, prob, seed, p)    ds = P * (dP - sum_j dP_j P_j) with dP = gd * m / (1 - p):
//                                          attention's probability dropout and softmax backward in one
//                                          pass over each row (row = last dim), the mask regenerated
//
// The hash: two rounds of murmur3's 32-bit finalizer over the index's low and high words keyed by the
// seed's two words. 32-bit multiplies and shifts only, so the loops vectorise (16 lanes with AVX-512):
// torch's bernoulli_ draws its numbers one generator step at a time, which was ~12% of a training step.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;   // elements per task: ~128 KB of fp32, enough to hide the task cost

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// The random word of element i: a bijection of i's low word for a fixed seed and high word.
inline uint32_t element_hash(uint32_t s0, uint32_t s1, int64_t i) {
  uint32_t h = fmix32(static_cast<uint32_t>(i) * 0x9e3779b9u + s0);
  return fmix32(h ^ (s1 + static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32) * 0x27d4eb2fu));
}

struct Mask {
  uint32_t s0, s1, threshold;
  float scale;      // 1 / (1 - p)
};

Mask make_mask(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_cpu: p must be in [0, 1), got ", p);
  const uint64_t s = static_cast<uint64_t>(seed);
  // threshold = round(p 2^32): keep probability (2^32 - threshold) / 2^32 = 1 - p within 2^-33
  const double t = p * 4294967296.0 + 0.5;
  const uint32_t threshold = t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), threshold, static_cast<float>(1.0 / (1.0 - p))};
}

// y[j] = x[j] * (keep ? scale : 0) for the elements [begin, end) of the flat index.
template <typename T, typename Acc>
void apply_range(const T* __restrict x, T* __restrict y, int64_t begin, int64_t end, const Mask& m) {
  const Acc scale = static_cast<Acc>(m.scale);
  for (int64_t i = begin; i < end; ++i) {
    const Acc keep = element_hash(m.s0, m.s1, i) >= m.threshold ? scale : Acc(0);
    y[i] = static_cast<T>(static_cast<Acc>(x[i]) * keep);
  }
}

torch::Tensor apply(const torch::Tensor& x_in, int64_t seed, double p) {
  TORCH_CHECK(x_in.device().is_cpu(), "dropout_cpu.apply: a CPU tensor is needed");
  const Mask m = make_mask(seed, p);
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor y = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  AT_DISPATCH_SWITCH(x.scalar_type(), "dropout_cpu.apply",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      const float* xp = x.data_ptr<float>(); float* yp = y.data_ptr<float>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { apply_range<float, float>(xp, yp, b, e, m); });
    })
    AT_DISPATCH_CASE(at::kDouble, [&] {
      const double* xp = x.data_ptr<double>(); double* yp = y.data_ptr<double>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { apply_range<double, double>(xp, yp, b, e, m); });
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      const at::BFloat16* xp = x.data_ptr<at::BFloat16>(); at::BFloat16* yp = y.data_ptr<at::BFloat16>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        apply_range<at::BFloat16, float>(xp, yp, b, e, m);
      });
    }));
  return y;
}

// One row of ds = P * (dP - <dP, P>), dP = gd * mask * scale; `base` is the row's first flat index.
template <typename T, typename Acc>
void softmax_backward_row(const T* __restrict gd, const T* __restrict prob, T* __restrict ds, int64_t base,
                          int64_t n, const Mask& m, Acc* __restrict tmp) {
  const Acc scale = static_cast<Acc>(m.scale);
  constexpr int kLanes = 16;           // independent partial sums, so the reduction vectorises without -ffast-math
  Acc lanes[kLanes] = {};
  const int64_t n_vec = n - n % kLanes;
  for (int64_t j0 = 0; j0 < n_vec; j0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t j = j0 + l;
      const Acc keep = element_hash(m.s0, m.s1, base + j) >= m.threshold ? scale : Acc(0);
      const Acc dp = static_cast<Acc>(gd[j]) * keep;
      tmp[j] = dp;
      lanes[l] += dp * static_cast<Acc>(prob[j]);
    }
  }
  Acc dot = 0;
  for (int l = 0; l < kLanes; ++l) dot += lanes[l];
  for (int64_t j = n_vec; j < n; ++j) {
    const Acc keep = element_hash(m.s0, m.s1, base + j) >= m.threshold ? scale : Acc(0);
    const Acc dp = static_cast<Acc>(gd[j]) * keep;
    tmp[j] = dp;
    dot += dp * static_cast<Acc>(prob[j]);
  }
  for (int64_t j = 0; j < n; ++j) {
    const Acc pj = static_cast<Acc>(prob[j]);
    ds[j] = static_cast<T>(pj * (tmp[j] - dot));
  }
}

torch::Tensor softmax_backward(const torch::Tensor& gd_in, const torch::Tensor& prob_in, int64_t seed, double p) {
  TORCH_CHECK(gd_in.device().is_cpu() && prob_in.device().is_cpu(), "dropout_cpu.softmax_backward: CPU tensors");
  TORCH_CHECK(gd_in.sizes() == prob_in.sizes() && gd_in.scalar_type() == prob_in.scalar_type(),
              "dropout_cpu.softmax_backward: gradient and probabilities must match in shape and dtype");
  TORCH_CHECK(gd_in.dim() >= 1, "dropout_cpu.softmax_backward: at least one dimension");
  const Mask m = make_mask(seed, p);
  const torch::Tensor gd = gd_in.contiguous(), prob = prob_in.contiguous();
  torch::Tensor ds = torch::empty_like(prob, at::MemoryFormat::Contiguous);
  const int64_t n = prob.size(-1), rows = n == 0 ? 0 : prob.numel() / n;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1));
  AT_DISPATCH_SWITCH(prob.scalar_type(), "dropout_cpu.softmax_backward",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      const float* g = gd.data_ptr<float>(); const float* pr = prob.data_ptr<float>(); float* o = ds.data_ptr<float>();
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        std::vector<float> tmp(n);
        for (int64_t r = r0; r < r1; ++r)
          softmax_backward_row<float, float>(g + r * n, pr + r * n, o + r * n, r * n, n, m, tmp.data());
      });
    })
    AT_DISPATCH_CASE(at::kDouble, [&] {
      const double* g = gd.data_ptr<double>(); const double* pr = prob.data_ptr<double>();
      double* o = ds.data_ptr<double>();
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        std::vector<double> tmp(n);
        for (int64_t r = r0; r < r1; ++r)
          softmax_backward_row<double, double>(g + r * n, pr + r * n, o + r * n, r * n, n, m, tmp.data());
      });
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      const at::BFloat16* g = gd.data_ptr<at::BFloat16>(); const at::BFloat16* pr = prob.data_ptr<at::BFloat16>();
      at::BFloat16* o = ds.data_ptr<at::BFloat16>();
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        std::vector<float> tmp(n);
        for (int64_t r = r0; r < r1; ++r)
          softmax_backward_row<at::BFloat16, float>(g + r * n, pr + r * n, o + r * n, r * n, n, m, tmp.data());
      });
    }));
  return ds;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "y = x * mask / (1 - p), mask from (seed, flat index) (x: float32/bfloat16/float64)");
  m.def("softmax_backward", &softmax_backward,
        "softmax backward through probability dropout, mask regenerated: ds = P (dP - <dP, P>)");
}
