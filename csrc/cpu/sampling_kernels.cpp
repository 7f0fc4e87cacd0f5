// Token sampling for the batched decoder, CPU SIMD kernels (compiled once per ISA).
//
// One row (one trace's logits over the vocabulary) is sampled in a few streaming passes that stay in the
// core's cache, with no sort of the vocabulary:
//   1. widen to fp32 (16-bit logits); max, min and the top-k (k = max(k, 1), value descending, ties lowest
//      id first) in one pass: a block of 64 logits is only looked at when its max beats the current k-th value
//      (after the first blocks, rarely), and then only at its lanes above that value;
//   2. p_i = exp((x_i - max) / T) (the unnormalized tempered distribution), the sum of exp(x_i - max) (the
//      raw normalizer, for the log-probs only: ATen's faster exp_u20 serves it), and a histogram of p over
//      NB equal-width buckets of (max - x) (bucket 0 holds the largest logits; the width spans at most 40
//      nats of p, lower logits share the last bucket): the key is monotone in the logit, so the buckets
//      are ordered by value;
//   3. the nucleus: buckets whose cumulative mass (from the top) stays below top_p of the total are kept
//      whole, those after the crossing bucket dropped whole; the crossing bucket's few tokens are sorted
//      (value descending, id ascending) and kept while the mass ranked above each is below top_p;
//   4. the draw: the first token in vocabulary order whose cumulative kept mass reaches u times the kept
//      total (blocks of kept mass are skipped whole until the one that holds the crossing).
// Rows are independent (OpenMP over rows), so a row's token does not depend on the batch.
#define H1R_SILENCE_UNINITIALIZED
#include "cpu/vec_diagnostics.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/float_io.h"
#include "cpu/sampling_params.h"

namespace h1r::cpu::H1R_ISA {

using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;
constexpr int64_t VL = Vec::size();
constexpr int64_t kBuckets = 1024;  // histogram buckets of the nucleus search
constexpr int64_t kBlock = 64;      // logits per block of the top-k scan
// The histogram is accumulated into kHists interleaved copies (element i into copy i % kHists), so that
// neighbouring tokens falling in the same bucket do not wait on each other's read-modify-write.
constexpr int64_t kHists = 4;

inline float vmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}
inline float vmin(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, v);
}
inline float vsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// The k best (value, id) of a row, kept sorted: value descending, ties lowest id first (ids arrive in
// increasing order, so an equal value never displaces an earlier one).
struct TopK {
  int64_t k, n = 0;
  float* v;
  int64_t* id;
  float thresh() const { return n < k ? -std::numeric_limits<float>::infinity() : v[k - 1]; }
  void push(float x, int64_t i) {
    if (n == k && !(x > v[k - 1])) return;
    int64_t j = n < k ? n++ : k - 1;
    while (j > 0 && v[j - 1] < x) {
      v[j] = v[j - 1];
      id[j] = id[j - 1];
      --j;
    }
    v[j] = x;
    id[j] = i;
  }
};

// Per-thread scratch of one row.
struct RowScratch {
  std::vector<float> x, p;
  std::vector<int32_t> key;
  std::vector<float> mass;
  std::vector<float> tv;
  std::vector<int64_t> ti;
  std::vector<std::pair<float, int32_t>> cand;
  RowScratch(int64_t V, int64_t k) : x(V), p(V), key(V), mass(kHists * kBuckets), tv(k), ti(k) {}
};

// Lanes of v above t, as a bit mask (bit l: lane l).
inline uint32_t lanes_above(const Vec& v, const Vec& t) {
  return ~static_cast<uint32_t>((v > t).zero_mask()) & ((uint32_t(1) << VL) - 1);
}

template <typename T>
void sample_row(const SampleTopPParams& prm, int64_t r, RowScratch& s) {
  const int64_t V = prm.vocab, kk = std::max<int64_t>(prm.k, 1);
  const T* src = static_cast<const T*>(prm.logits) + r * prm.row_stride;
  // fp32 logits: read in place; 16-bit ones are widened into s.x by the first pass as it reads them
  float* const xw = std::is_same_v<T, float> ? nullptr : s.x.data();
  const float* x = xw ? xw : reinterpret_cast<const float*>(src);
  // 1. max, min, top-k
  // fewer than k finite logits leave -inf entries (id 0) at the end
  std::fill(s.tv.begin(), s.tv.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.ti.begin(), s.ti.end(), int64_t(0));
  TopK top{kk, 0, s.tv.data(), s.ti.data()};
  Vec mx(-std::numeric_limits<float>::infinity()), mn(std::numeric_limits<float>::infinity());
  int64_t i = 0;
  constexpr int64_t kVecs = kBlock / VL;
  for (; i + kBlock <= V; i += kBlock) {
    Vec bm(-std::numeric_limits<float>::infinity());
    for (int64_t u = 0; u < kVecs; ++u) {
      const Vec v = load_n(src + i + u * VL, VL);
      if (xw) v.store(xw + i + u * VL);
      bm = at::vec::maximum(bm, v);
      mn = at::vec::minimum(mn, v);
    }
    mx = at::vec::maximum(mx, bm);
    // a block is looked at lane by lane only where it beats the current k-th value (after the first
    // blocks, rarely), and then only its lanes above it, in id order
    const Vec t(top.thresh());
    if (!lanes_above(bm, t)) continue;
    for (int64_t u = 0; u < kVecs; ++u)
      for (uint32_t bits = lanes_above(Vec::loadu(x + i + u * VL), t); bits; bits &= bits - 1) {
        const int64_t j = i + u * VL + __builtin_ctz(bits);
        top.push(x[j], j);
      }
  }
  float m = vmax(mx), lo = vmin(mn);
  for (; i < V; ++i) {
    const float xi = static_cast<float>(src[i]);
    if (xw) xw[i] = xi;
    m = std::max(m, xi);
    lo = std::min(lo, xi);
    top.push(xi, i);
  }
  // 2. tempered probabilities, raw normalizer, bucket histogram
  const float temp = prm.temperature[r];
  const bool greedy = !(temp > 0.f);
  const float inv_t = greedy ? 1.f : 1.f / temp;
  const float span = std::clamp((m - lo) * inv_t, 1e-20f, 40.f);
  const float kscale = static_cast<float>(kBuckets) * inv_t / span;
  float* p = s.p.data();
  int32_t* key = s.key.data();
  float* mass = s.mass.data();
  const Vec vm(m), vit(inv_t), vks(kscale), vlast(static_cast<float>(kBuckets - 1));
  Vec raw_sum(0.f);
  i = 0;
  for (; i + VL <= V; i += VL) {
    const Vec d = vm - Vec::loadu(x + i);  // max - x >= 0
    const Vec pv = (d * Vec(-inv_t)).exp();
    // the raw normalizer only feeds the log-probs: the faster exp (within 20 ulp) serves it
    raw_sum = raw_sum + (inv_t != 1.f ? d.neg().exp_u20() : pv);
    pv.store(p + i);
    at::vec::convert_to_int_of_same_size(at::vec::minimum(d * vks, vlast)).store(key + i);
  }
  float raw = vsum(raw_sum);
  for (; i < V; ++i) {
    const float d = m - x[i];
    p[i] = std::exp(-d * inv_t);
    raw += inv_t != 1.f ? std::exp(-d) : p[i];
    key[i] = static_cast<int32_t>(std::min(d * kscale, static_cast<float>(kBuckets - 1)));
  }
  const float lse = m + std::log(raw);
  for (int64_t j = 0; j < prm.k; ++j) {
    prm.top_logprobs[r * prm.k + j] = top.v[j] - lse;
    prm.top_ids[r * prm.k + j] = top.id[j];
  }
  int64_t tok;
  if (greedy) {
    tok = top.id[0];
  } else {
    std::fill(mass, mass + kHists * kBuckets, 0.f);
    i = 0;
    for (; i + kHists <= V; i += kHists)
      for (int64_t h = 0; h < kHists; ++h) mass[h * kBuckets + key[i + h]] += p[i + h];
    for (; i < V; ++i) mass[key[i]] += p[i];
    for (int64_t h = 1; h < kHists; ++h)
      for (int64_t b = 0; b < kBuckets; ++b) mass[b] += mass[h * kBuckets + b];
    // 3. the nucleus: the crossing bucket c, and the sorted cut inside it
    double total = 0.0;
    for (int64_t b = 0; b < kBuckets; ++b) total += mass[b];
    const double target = static_cast<double>(prm.top_p[r]) * total;
    int32_t c = kBuckets;  // buckets below c kept whole, above c dropped (top_p = 1: everything kept)
    double before = 0.0, kept = total;
    if (prm.top_p[r] < 1.f) {
      c = 0;
      while (c < kBuckets - 1 && before + mass[c] < target) before += mass[c++];
      // the crossing bucket's tokens (few): whole vectors without one are skipped by one compare
      s.cand.clear();
      const VecI vcross(c);
      constexpr int kNone = (1 << VecI::size()) - 1;  // zero_mask of a vector with no match
      static_assert(VecI::size() == VL, "int and float vectors of one width");
      for (i = 0; i + VL <= V; i += VL) {
        if (at::vec::cast<float>(VecI::loadu(key + i) == vcross).zero_mask() == kNone) continue;
        for (int64_t j = i; j < i + VL; ++j)
          if (key[j] == c) s.cand.emplace_back(x[j], static_cast<int32_t>(j));
      }
      for (; i < V; ++i)
        if (key[i] == c) s.cand.emplace_back(x[i], static_cast<int32_t>(i));
      std::sort(s.cand.begin(), s.cand.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      double acc = before;
      for (const auto& e : s.cand) {
        const float pe = p[e.second];
        if (acc >= target) p[e.second] = 0.f;  // the mass ranked above it already reaches top_p
        acc += pe;
      }
      kept = before;
      for (const auto& e : s.cand) kept += p[e.second];
    }
    // 4. the draw, in vocabulary order over the kept mass (p where key <= c)
    const double want = static_cast<double>(prm.uniform[r]) * kept;
    const VecI vc(c);
    double acc = 0.0;
    tok = -1;
    int64_t last = -1;  // the last kept token (the draw's fallback against rounding)
    i = 0;
    constexpr int64_t kDrawBlock = 16 * VL;
    for (; i + kDrawBlock <= V; i += kDrawBlock) {
      Vec bs(0.f);
      for (int64_t j = i; j < i + kDrawBlock; j += VL) {
        const Vec in = at::vec::cast<float>(VecI::loadu(key + j) <= vc);   // all-ones lanes where kept
        bs = bs + (Vec::loadu(p + j) & in);
      }
      const double b = vsum(bs);
      if (acc + b < want || b == 0.0) {
        acc += b;
        continue;
      }
      break;
    }
    for (; i < V; ++i) {
      if (key[i] > c || p[i] == 0.f) continue;
      last = i;
      acc += p[i];
      if (acc >= want) {
        tok = i;
        break;
      }
    }
    if (tok < 0) {  // rounding left the draw short of u * kept: the last kept token
      if (last < 0)
        for (int64_t j = V - 1; j >= 0 && last < 0; --j)
          if (key[j] <= c && p[j] > 0.f) last = j;
      tok = last < 0 ? top.id[0] : last;
    }
  }
  prm.tokens[r] = tok;
  prm.token_logprob[r] = x[tok] - lse;
}

template <typename T>
void sample_rows(const SampleTopPParams& prm) {
  const bool parallel = prm.rows > 1 && prm.rows * prm.vocab >= (int64_t(1) << 16);
#pragma omp parallel if (parallel)
  {
    RowScratch s(prm.vocab, std::max<int64_t>(prm.k, 1));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < prm.rows; ++r) sample_row<T>(prm, r, s);
  }
}

void sample_top_p_kernel(const SampleTopPParams& prm) {
  with_float_type(prm.dtype, [&](auto t) { sample_rows<decltype(t)>(prm); });
}

}  // namespace h1r::cpu::H1R_ISA
