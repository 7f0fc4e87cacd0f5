// Rotary position embedding on CPU (NeoX / rotate_half layout), forward, inverse (= backward) and in place.
//
// Work is split over (batch, block of kTokens positions). A block first widens the cos / sin rows of its
// positions to fp32 once (gathering them through position_ids when given), then rotates the rows of
// every q head and every k head at those positions: the cos / sin block stays in L1 while q and k stream
// through, whatever their strides. bf16 results are rounded by AVX512-BF16 where the CPU has it, and large
// out-of-place results are written with non-temporal stores (narrow_store.h).
#define H1R_SILENCE_UNINITIALIZED
#include "cpu/vec_diagnostics.h"
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/float_io.h"
#include "cpu/narrow_store.h"
#include "cpu/rotary.h"

namespace h1r::cpu::H1R_ISA {
namespace {

constexpr int64_t kTokens = 16;

// Rotate one row x -> y (head_dim channels); cs = [cos row | sin row], each rd fp32 values. Cvt narrows to
// T (narrow_store.h); y is written with non-temporal stores when kStream.
template <typename Cvt, bool kStream, typename T>
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
    put<kStream, Cvt>(y + i, y1, n);
    put<kStream, Cvt>(y + half + i, y2, n);
  });
  if (y != x && rd < head_dim) std::memcpy(y + rd, x + rd, (head_dim - rd) * sizeof(T));
}

// Whether the rows of q_out or k_out (t) may be written with non-temporal stores: out of place (in place, the
// lines were just read and are owned already), large enough (stream_rows), and every half row of the
// rotated part starting on a 64-byte line.
template <typename T>
bool stream_output(const RotaryParams& p, const RotaryTensor& t) {
  const int64_t rows = p.batch * t.heads * p.seqlen, half_bytes = p.rot_dim / 2 * sizeof(T);
  bool aligned = half_bytes % 64 == 0;
  for (int j = 0; j < 3; ++j) aligned = aligned && (t.out_stride[j] * sizeof(T)) % 64 == 0;
  return t.out != t.in && aligned && stream_rows(t.out, rows, p.head_dim * sizeof(T));
}

// Hint the cache lines of one row into the cache. The loop below reads each head's kTokens rows (4 KiB
// of bf16 at head_dim 128) and then jumps to the next head, 1 MiB away at the Falcon-H1 sizes: a new
// stream that the hardware prefetcher only picks up after a few misses, so the rows of the next head are
// hinted while the current head is rotated (1 thread, q (1,12,4096,128) bf16: forward -8%).
template <typename T>
inline void prefetch_row(const T* x, int64_t n) {
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, 3);
}

template <typename T, typename C>
void rotary_impl(const RotaryParams& p) {
  const int64_t rd = p.rot_dim, nblocks = (p.seqlen + kTokens - 1) / kTokens;
  const bool stream_q = stream_output<T>(p, p.q), stream_k = stream_output<T>(p, p.k);
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
        with_cvt<T>(p.hw_bf16, [&](auto cvt) {
          for (const RotaryTensor* qk : {&p.q, &p.k}) {
            const T* in = static_cast<const T*>(qk->in);
            T* out = static_cast<T*>(qk->out);
            const bool stream = qk == &p.q ? stream_q : stream_k;
            for (int64_t h = 0; h < qk->heads; ++h) {
              for (int64_t t = 0; t < nt; ++t) {
                const int64_t tok = t0 + t;
                const T* x = in + b * qk->in_stride[0] + h * qk->in_stride[1] + tok * qk->in_stride[2];
                T* y = out + b * qk->out_stride[0] + h * qk->out_stride[1] + tok * qk->out_stride[2];
                const float* cst = cs.data() + t * 2 * rd;
                // The same token's row of the next head (of k after q's last head), a block of kTokens
                // rows ahead in this loop's order: see prefetch_row.
                if (h + 1 < qk->heads) {
                  prefetch_row(x + qk->in_stride[1], p.head_dim);
                } else if (qk == &p.q) {
                  prefetch_row(static_cast<const T*>(p.k.in) + b * p.k.in_stride[0] + tok * p.k.in_stride[2],
                               p.head_dim);
                }
                if (stream) rotate_row<decltype(cvt), true>(x, y, cst, rd, p.head_dim, p.inverse);
                else rotate_row<decltype(cvt), false>(x, y, cst, rd, p.head_dim, p.inverse);
              }
            }
          }
        });
      }
    }
    stream_fence();
  }
}

}  // namespace

void rotary_kernel(const RotaryParams& p) {
  with_float_type(p.dtype, [&](auto t) {
    with_float_type(p.cos_dtype, [&](auto c) { rotary_impl<decltype(t), decltype(c)>(p); });
  });
}

}  // namespace h1r::cpu::H1R_ISA
