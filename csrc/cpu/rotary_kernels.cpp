// Rotary position embedding on CPU (NeoX / rotate_half layout), forward, inverse (= backward) and in place.
//
// Work is split over (batch, block of kTokens positions). A block first widens the cos / sin rows of its
// positions to fp32 once (gathering them through position_ids when given), then rotates the rows of
// every q head and every k head at those positions: the cos / sin block stays in L1 while q and k stream
// through, whatever their strides.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/float_io.h"
#include "cpu/rotary.h"

namespace h1r::cpu::H1R_ISA {
namespace {

constexpr int64_t kTokens = 16;

// Rotate one row x -> y (head_dim channels); cs = [cos row | sin row], each rd fp32 values.
template <typename T>
inline void rotate_row(const T* x, T* y, const float* cs, int64_t rd, int64_t head_dim, bool inverse) {
  const int64_t half = rd / 2;
  const float* c = cs;
  const float* s = cs + rd;
  for_lanes(half, [&](int64_t i, int64_t n) {
    const VF x1 = load_n(x + i, n), x2 = load_n(x + half + i, n);
    const VF c1 = load_n(c + i, n), c2 = load_n(c + half + i, n);
    const VF s1 = load_n(s + i, n), s2 = load_n(s + half + i, n);
    VF y1, y2;
    if (!inverse) {
      y1 = x1 * c1 - x2 * s1;
      y2 = x2 * c2 + x1 * s2;
    } else {
      y1 = x1 * c1 + x2 * s2;
      y2 = x2 * c2 - x1 * s1;
    }
    store_n(y + i, y1, n);
    store_n(y + half + i, y2, n);
  });
  if (y != x && rd < head_dim) std::memcpy(y + rd, x + rd, (head_dim - rd) * sizeof(T));
}

template <typename T, typename C>
void rotary_impl(const RotaryParams& p) {
  const int64_t rd = p.rot_dim, nblocks = (p.seqlen + kTokens - 1) / kTokens;
  const C* cos = static_cast<const C*>(p.cos);
  const C* sin = static_cast<const C*>(p.sin);
#pragma omp parallel
  {
    std::vector<float> cs(kTokens * 2 * rd);  // per token: [cos row | sin row] in fp32
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * kTokens, nt = std::min(kTokens, p.seqlen - t0);
        // 1. cos / sin rows of the block's positions, widened to fp32.
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t row = p.position_ids ? p.position_ids[b * p.seqlen + t0 + t] * rd
                                             : b * p.cos_batch_stride + (t0 + t) * rd;
          float* dst = cs.data() + t * 2 * rd;
          for_lanes(rd, [&](int64_t i, int64_t n) {
            store_n(dst + i, load_n(cos + row + i, n), n);
            store_n(dst + rd + i, load_n(sin + row + i, n), n);
          });
        }
        // 2. Rotate every head's rows at these positions, q then k.
        for (const RotaryTensor* qk : {&p.q, &p.k}) {
          const T* in = static_cast<const T*>(qk->in);
          T* out = static_cast<T*>(qk->out);
          for (int64_t h = 0; h < qk->heads; ++h) {
            for (int64_t t = 0; t < nt; ++t) {
              const int64_t tok = t0 + t;
              rotate_row(in + b * qk->in_stride[0] + h * qk->in_stride[1] + tok * qk->in_stride[2],
                         out + b * qk->out_stride[0] + h * qk->out_stride[1] + tok * qk->out_stride[2],
                         cs.data() + t * 2 * rd, rd, p.head_dim, p.inverse);
            }
          }
        }
      }
    }
  }
}

}  // namespace

void rotary_kernel(const RotaryParams& p) {
  with_float_type(p.dtype, [&](auto t) {
    with_float_type(p.cos_dtype, [&](auto c) { rotary_impl<decltype(t), decltype(c)>(p); });
  });
}

}  // namespace h1r::cpu::H1R_ISA
