// Paged attention on the CPU: decode (flash-decoding style, split over pages when the batch is small),
// chunked-causal prefill, and the cache write. Compiled once per ISA (see csrc/cpu/isa.h).
//
// Both attention kernels are built on one step, `attend_pages`: a tile of R query rows that share one kv
// head walks a range of that head's pages and keeps, per row, the online-softmax state
//     m = running max of the scores,  l = sum exp(s - m),  acc = sum exp(s - m) v   (fp32)
// For each page it computes the scores S = Q K^T of the tile (rows x page tokens), rescales the state
// to the new max, and adds P V. The K and V rows of a page are read from memory once for all R rows:
// in decode the rows are the G = hq / hk query heads of one kv head (grouped-query attention), in
// prefill they are (query tile x G). The inner loops keep up to kRowBlock rows in vector registers and
// stream head_dim in vector chunks, converting bf16 / fp16 cache entries to fp32 on load.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/paged_attention_params.h"

namespace h1r::cpu::H1R_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int W = Vec::size();
constexpr int kRowBlock = 8;  // query rows held in registers by the inner loops
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline Vec load_f(const c10::BFloat16* p) {
  Vec o;
  at::vec::load_to_float(p, o);
  return o;
}
inline Vec load_f(const c10::Half* p) {
  Vec o;
  at::vec::load_to_float(p, o);
  return o;
}

// One sequence's view of one kv head of the cache: token t of logical page j is the row
// cache[table[j], t, head, :], rows `token_stride` elements apart.
template <typename T>
struct HeadPages {
  const T* k;
  const T* v;
  const int32_t* table;
  int64_t block_size, token_stride, page_stride;
  const T* key_page(int64_t j) const { return k + table[j] * page_stride; }
  const T* value_page(int64_t j) const { return v + table[j] * page_stride; }
};

// A tile of R query rows of one kv head and their online-softmax state; scratch owned by the caller.
struct Tile {
  int R = 0, hd = 0, bs = 0;
  float* q;       // (R, hd), already multiplied by the softmax scale
  float* acc;     // (R, hd): sum_t exp(s_t - m) v_t
  float* m;       // (R,): running max
  float* l;       // (R,): running sum of exp(s_t - m)
  int64_t* limit; // (R,): keys visible to the row (causal): it sees tokens [0, limit)
  float* s;       // (R, bs): scores, then probabilities, of the current page
  float* alpha;   // (R,): rescale factor exp(m_old - m_new) of the current page
  int64_t max_limit = 0;
};

struct TileBuffers {
  std::vector<float> q, acc, m, l, s, alpha;
  std::vector<int64_t> limit;
  Tile make(int R, int hd, int bs) {
    q.resize((size_t)R * hd);
    acc.assign((size_t)R * hd, 0.f);
    m.assign(R, kNegInf);
    l.assign(R, 0.f);
    s.resize((size_t)R * bs);
    alpha.resize(R);
    limit.resize(R);
    Tile t;
    t.R = R, t.hd = hd, t.bs = bs;
    t.q = q.data(), t.acc = acc.data(), t.m = m.data(), t.l = l.data(), t.s = s.data();
    t.alpha = alpha.data(), t.limit = limit.data();
    return t;
  }
};

// s[r, t] = q_r . k_t for NR rows and the first nt tokens of a page (k rows `kstride` apart).
template <int NR, typename T>
void score_rows(const float* q, int hd, const T* k, int64_t kstride, int nt, float* s, int sstride) {
  for (int t = 0; t < nt; ++t) {
    const T* kt = k + t * kstride;
    Vec a[NR];
    for (int r = 0; r < NR; ++r) a[r] = Vec(0.f);
    int c = 0;
    for (; c + W <= hd; c += W) {
      const Vec kv = load_f(kt + c);
      for (int r = 0; r < NR; ++r) a[r] = at::vec::fmadd(Vec::loadu(q + r * hd + c), kv, a[r]);
    }
    float tail[NR] = {};
    for (; c < hd; ++c) {
      const float kv = static_cast<float>(kt[c]);
      for (int r = 0; r < NR; ++r) tail[r] += q[r * hd + c] * kv;
    }
    for (int r = 0; r < NR; ++r)
      s[r * sstride + t] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), a[r]) + tail[r];
  }
}

// acc_r = alpha_r acc_r + sum_t p[r, t] v_t for NR rows: head_dim chunk by chunk, the NR accumulators of
// a chunk stay in registers while the page's V rows stream past.
template <int NR, typename T>
void pv_rows(float* acc, int hd, const float* alpha, const float* p, int pstride, const T* v, int64_t vstride,
             int nt) {
  int c = 0;
  for (; c + W <= hd; c += W) {
    Vec a[NR];
    for (int r = 0; r < NR; ++r) a[r] = Vec::loadu(acc + r * hd + c) * Vec(alpha[r]);
    for (int t = 0; t < nt; ++t) {
      const Vec vv = load_f(v + t * vstride + c);
      for (int r = 0; r < NR; ++r) a[r] = at::vec::fmadd(Vec(p[r * pstride + t]), vv, a[r]);
    }
    for (int r = 0; r < NR; ++r) a[r].store(acc + r * hd + c);
  }
  for (; c < hd; ++c) {
    for (int r = 0; r < NR; ++r) {
      float x = acc[r * hd + c] * alpha[r];
      for (int t = 0; t < nt; ++t) x += p[r * pstride + t] * static_cast<float>(v[t * vstride + c]);
      acc[r * hd + c] = x;
    }
  }
}

// Run `f.template operator()<NR>()` for NR = nr in 1..kRowBlock (the register-blocked row count).
template <typename F>
void with_rows(int nr, F&& f) {
  switch (nr) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: f.template operator()<8>(); break;
  }
}

// Online-softmax update of one row for a page: s[0, n) are its visible scores, s[n, nt) are masked.
// Turns s into probabilities exp(s - m_new) (0 where masked) and returns alpha = exp(m_old - m_new).
inline float softmax_update(float* s, int n, int nt, float& m, float& l) {
  if (n <= 0) {
    std::fill(s, s + nt, 0.f);
    return 1.f;
  }
  float mx = *std::max_element(s, s + n);
  const float m_new = std::max(m, mx);
  const float alpha = std::exp(m - m_new);  // 0 on the first page (m = -inf)
  const Vec vm(m_new);
  Vec sum(0.f);
  int t = 0;
  for (; t + W <= n; t += W) {
    const Vec e = (Vec::loadu(s + t) - vm).exp_u20();
    e.store(s + t);
    sum = sum + e;
  }
  float tail = 0.f;
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - m_new);
    tail += s[t];
  }
  std::fill(s + n, s + nt, 0.f);
  l = l * alpha + at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum) + tail;
  m = m_new;
  return alpha;
}

// The tile attends to logical pages [page_begin, page_end) of one sequence's kv head.
template <typename T>
void attend_pages(Tile& tile, const HeadPages<T>& kv, int64_t page_begin, int64_t page_end) {
  const int R = tile.R, hd = tile.hd, bs = tile.bs;
  for (int64_t j = page_begin; j < page_end; ++j) {
    const int64_t start = j * bs;
    const int nt = (int)std::min<int64_t>(bs, tile.max_limit - start);  // tokens any row sees
    if (nt <= 0) break;
    const T* kp = kv.key_page(j);
    const T* vp = kv.value_page(j);
    // 1. scores S = (scale Q) K^T of this page
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
      const int nr = std::min(kRowBlock, R - r0);
      with_rows(nr, [&]<int NR>() { score_rows<NR>(tile.q + r0 * hd, hd, kp, kv.token_stride, nt, tile.s + r0 * bs, bs); });
    }
    // 2. online softmax, row by row (causal: row r sees tokens < limit[r])
    for (int r = 0; r < R; ++r) {
      const int n = (int)std::clamp<int64_t>(tile.limit[r] - start, 0, nt);
      tile.alpha[r] = softmax_update(tile.s + r * bs, n, nt, tile.m[r], tile.l[r]);
    }
    // 3. acc = alpha acc + P V
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
      const int nr = std::min(kRowBlock, R - r0);
      with_rows(nr, [&]<int NR>() {
        pv_rows<NR>(tile.acc + r0 * hd, hd, tile.alpha + r0, tile.s + r0 * bs, bs, vp, kv.token_stride, nt);
      });
    }
  }
}

// out_r = acc_r / l_r (rows that saw no key, l = 0, give 0).
inline void write_normalized(const float* acc, float l, int hd, float* out) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  at::vec::map([inv](Vec x) { return x * Vec(inv); }, out, acc, hd);
}

template <typename T>
HeadPages<T> head_pages(const PagedAttentionParams& p, int64_t seq, int64_t head) {
  const int64_t token_stride = p.hk * p.hd;
  HeadPages<T> kv;
  kv.k = static_cast<const T*>(p.key_cache) + head * p.hd;
  kv.v = static_cast<const T*>(p.value_cache) + head * p.hd;
  kv.table = p.block_tables + seq * p.max_blocks;
  kv.block_size = p.block_size;
  kv.token_stride = token_stride;
  kv.page_stride = p.block_size * token_stride;
  return kv;
}

// Partitions of a sequence's pages for decode: one when the batch alone fills the threads, else
// pieces of at least kMinPartitionPages pages so that there are about 4 work items per thread.
constexpr int64_t kMinPartitionPages = 8;

template <typename T>
void decode_impl(const PagedAttentionParams& p) {
  const int64_t B = p.batch, hk = p.hk, hd = p.hd, bs = p.block_size;
  const int G = (int)(p.hq / hk);
  const int64_t threads = omp_get_max_threads();
  const int64_t target_items = 4 * threads;

  std::vector<int64_t> pages(B);
  int64_t total_pages = 0;
  for (int64_t i = 0; i < B; ++i) total_pages += pages[i] = (p.seq_lens[i] + bs - 1) / bs;
  int64_t part_pages = std::max<int64_t>(p.max_blocks, 1);
  if (B * hk < target_items)
    part_pages = std::max(kMinPartitionPages, (total_pages * hk + target_items - 1) / target_items);
  // parts of sequence i: part_off[i] .. part_off[i + 1]
  std::vector<int64_t> part_off(B + 1, 0);
  for (int64_t i = 0; i < B; ++i)
    part_off[i + 1] = part_off[i] + std::max<int64_t>(1, (pages[i] + part_pages - 1) / part_pages);
  const int64_t total_parts = part_off[B];
  const bool split = total_parts > B;
  // partial states of split sequences: (part, head, G) rows of (acc[hd], m, l)
  std::vector<float> part_acc, part_m, part_l;
  if (split) {
    part_acc.resize((size_t)total_parts * hk * G * hd);
    part_m.resize((size_t)total_parts * hk * G);
    part_l.resize((size_t)total_parts * hk * G);
  }

#pragma omp parallel
  {
    TileBuffers buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < total_parts * hk; ++item) {
      const int64_t part = item / hk, head = item % hk;
      const int64_t i = std::upper_bound(part_off.begin(), part_off.end(), part) - part_off.begin() - 1;
      const int64_t nparts = part_off[i + 1] - part_off[i];
      const int64_t first = (part - part_off[i]) * part_pages;
      const int64_t last = std::min(pages[i], first + part_pages);

      Tile tile = buf.make(G, (int)hd, (int)bs);
      tile.max_limit = p.seq_lens[i];
      const float* q = p.q + (i * p.hq + head * G) * hd;
      for (int64_t x = 0; x < G * hd; ++x) tile.q[x] = q[x] * p.scale;
      for (int g = 0; g < G; ++g) tile.limit[g] = p.seq_lens[i];
      attend_pages(tile, head_pages<T>(p, i, head), first, last);

      if (nparts == 1) {
        for (int g = 0; g < G; ++g)
          write_normalized(tile.acc + g * hd, tile.l[g], (int)hd, p.out + (i * p.hq + head * G + g) * hd);
      } else {
        const int64_t row = (part * hk + head) * G;
        std::memcpy(part_acc.data() + row * hd, tile.acc, sizeof(float) * G * hd);
        std::memcpy(part_m.data() + row, tile.m, sizeof(float) * G);
        std::memcpy(part_l.data() + row, tile.l, sizeof(float) * G);
      }
    }
  }
  if (!split) return;

  // Reduce the partitions: with M = max_p m_p, out = sum_p e^{m_p - M} acc_p / sum_p e^{m_p - M} l_p.
#pragma omp parallel for schedule(static)
  for (int64_t x = 0; x < B * hk * G; ++x) {
    const int64_t i = x / (hk * G), hg = x % (hk * G);
    const int64_t p0 = part_off[i], p1 = part_off[i + 1];
    if (p1 - p0 == 1) continue;
    float M = kNegInf;
    for (int64_t q = p0; q < p1; ++q) M = std::max(M, part_m[q * hk * G + hg]);
    float* out = p.out + (i * p.hq + hg) * hd;
    std::fill(out, out + hd, 0.f);
    float L = 0.f;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t row = q * hk * G + hg;
      if (part_l[row] == 0.f) continue;  // an empty part (m = -inf)
      const float w = std::exp(part_m[row] - M);
      L += w * part_l[row];
      at::vec::map2([w](Vec o, Vec a) { return at::vec::fmadd(Vec(w), a, o); }, out, out,
                    part_acc.data() + row * hd, hd);
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    at::vec::map([inv](Vec o) { return o * Vec(inv); }, out, out, hd);
  }
}

// Prefill: work items are (sequence, kv head, query tile); a tile holds kQueryTileRows / G queries of
// the sequence times its G query heads, so each K/V page is read once for all of them.
constexpr int kQueryTileRows = 64;

template <typename T>
void prefill_impl(const PagedAttentionParams& p) {
  const int64_t B = p.batch, hk = p.hk, hd = p.hd, bs = p.block_size;
  const int G = (int)(p.hq / hk);
  const int64_t QT = std::max<int64_t>(1, kQueryTileRows / G);
  std::vector<int64_t> tile_off(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t q_len = p.cu_seqlens_q[i + 1] - p.cu_seqlens_q[i];
    tile_off[i + 1] = tile_off[i] + (q_len + QT - 1) / QT;
  }
  const int64_t total_tiles = tile_off[B];

#pragma omp parallel
  {
    TileBuffers buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < total_tiles * hk; ++item) {
      // largest tiles (latest queries, longest causal range) of each sequence tend to come last; dynamic
      // scheduling evens them out
      const int64_t tile_id = item / hk, head = item % hk;
      const int64_t i = std::upper_bound(tile_off.begin(), tile_off.end(), tile_id) - tile_off.begin() - 1;
      const int64_t q0 = p.cu_seqlens_q[i], q_len = p.cu_seqlens_q[i + 1] - q0;
      const int64_t seq_len = p.seq_lens[i];
      const int64_t j0 = (tile_id - tile_off[i]) * QT, j1 = std::min(q_len, j0 + QT);
      const int R = (int)((j1 - j0) * G);

      Tile tile = buf.make(R, (int)hd, (int)bs);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t visible = seq_len - q_len + j + 1;  // query j sits at position seq_len - q_len + j
        const float* q = p.q + ((q0 + j) * p.hq + head * G) * hd;
        float* tq = tile.q + (j - j0) * G * hd;
        for (int64_t x = 0; x < G * hd; ++x) tq[x] = q[x] * p.scale;
        for (int g = 0; g < G; ++g) tile.limit[(j - j0) * G + g] = visible;
      }
      tile.max_limit = seq_len - q_len + j1;
      attend_pages(tile, head_pages<T>(p, i, head), 0, (tile.max_limit + bs - 1) / bs);
      for (int64_t j = j0; j < j1; ++j)
        for (int g = 0; g < G; ++g) {
          const int64_t r = (j - j0) * G + g;
          write_normalized(tile.acc + r * hd, tile.l[r], (int)hd, p.out + ((q0 + j) * p.hq + head * G + g) * hd);
        }
    }
  }
}

template <template <typename> class Impl>
void by_cache_dtype(const PagedAttentionParams& p) {
  switch (p.cache_dtype) {
    case CacheDtype::f32: Impl<float>::run(p); break;
    case CacheDtype::bf16: Impl<c10::BFloat16>::run(p); break;
    case CacheDtype::f16: Impl<c10::Half>::run(p); break;
  }
}
template <typename T>
struct Decode {
  static void run(const PagedAttentionParams& p) { decode_impl<T>(p); }
};
template <typename T>
struct Prefill {
  static void run(const PagedAttentionParams& p) { prefill_impl<T>(p); }
};

}  // namespace

void paged_attention_decode_kernel(const PagedAttentionParams& p) { by_cache_dtype<Decode>(p); }

void paged_attention_prefill_kernel(const PagedAttentionParams& p) { by_cache_dtype<Prefill>(p); }

// Scatter token rows (row_bytes each) into the caches: row t goes to flat cache row slots[t]
// (= block * block_size + offset); negative slots are padding and are skipped.
void reshape_and_cache_kernel(const void* key, const void* value, void* key_cache, void* value_cache,
                              const int64_t* slots, int64_t tokens, int64_t row_bytes) {
  const char* k = static_cast<const char*>(key);
  const char* v = static_cast<const char*>(value);
  char* kc = static_cast<char*>(key_cache);
  char* vc = static_cast<char*>(value_cache);
#pragma omp parallel for schedule(static) if (tokens * row_bytes > (1 << 18))
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    std::memcpy(kc + s * row_bytes, k + t * row_bytes, row_bytes);
    std::memcpy(vc + s * row_bytes, v + t * row_bytes, row_bytes);
  }
}

}  // namespace h1r::cpu::H1R_ISA
