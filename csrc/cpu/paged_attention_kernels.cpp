// Paged attention on the CPU: decode (flash-decoding style, split over pages when the batch is small),
// chunked-causal prefill, and the cache write. Compiled once per ISA (see csrc/cpu/isa.h).
//
// Both attention kernels are built on one routine, `attend_pages`: a tile of R query rows that share one
// kv head walks a range of that head's pages and keeps, per row, the online-softmax state
//     m = running max of the scores,  l = sum exp(s - m),  acc = sum exp(s - m) v   (fp32)
// A step covers up to kStepTokens tokens (one or more pages): it computes the scores S = Q K^T of the
// tile (rows x step tokens), rescales the state to the new max, and adds P V. The K and V rows of a page
// are read from memory once for all R rows: in decode the rows are the G = hq / hk query heads of one kv
// head (grouped-query attention), in prefill they are (query tile x G). The inner loops keep up to
// kRowBlock rows (x a few tokens or head_dim chunks) in vector registers and stream head_dim in vector
// chunks, converting bf16 / fp16 cache entries to fp32 on load.
//
// Decode splits long sequences into partitions of pages (flash-decoding) when the batch alone cannot
// keep the threads busy, and merges the partial states afterwards.
#define H1R_SILENCE_UNINITIALIZED
#include "cpu/vec_diagnostics.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/narrow_store.h"
#include "cpu/paged_attention_params.h"

namespace h1r::cpu::H1R_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int W = Vec::size();
constexpr int kRowBlock = 8;  // query rows held in registers by the inner loops
// Tokens per online-softmax step: a step spans several pages when they are small, so the per-step
// softmax bookkeeping and the accumulator loads/stores are amortized even for block_size 1.
constexpr int kStepTokens = 32;
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
  int R = 0, hd = 0, bs = 0, step = 0;  // step: tokens of one softmax step (stride of s)
  float* q;       // (R, hd), already multiplied by the softmax scale
  float* acc;     // (R, hd): sum_t exp(s_t - m) v_t
  float* m;       // (R,): running max
  float* l;       // (R,): running sum of exp(s_t - m)
  int64_t* limit; // (R,): keys visible to the row (causal): it sees tokens [0, limit)
  float* s;       // (R, step): scores, then probabilities, of the current step
  float* alpha;   // (R,): rescale factor exp(m_old - m_new) of the current step
  Vec* partial;   // (kRowBlock, step) vectors: per-token partial dot products
  int64_t max_limit = 0;
};

struct TileBuffers {
  std::vector<float> q, acc, m, l, s, alpha;
  std::vector<int64_t> limit;
  std::vector<Vec> partial;
  Tile make(int R, int hd, int bs) {
    q.resize((size_t)R * hd);
    acc.assign((size_t)R * hd, 0.f);
    m.assign(R, kNegInf);
    l.assign(R, 0.f);
    const int step = std::max(1, kStepTokens / bs) * bs;
    s.resize((size_t)R * step);
    alpha.resize(R);
    limit.resize(R);
    partial.resize((size_t)kRowBlock * step);
    Tile t;
    t.R = R, t.hd = hd, t.bs = bs, t.step = step;
    t.q = q.data(), t.acc = acc.data(), t.m = m.data(), t.l = l.data(), t.s = s.data();
    t.alpha = alpha.data(), t.limit = limit.data(), t.partial = partial.data();
    return t;
  }
};

// Horizontal sums of W vectors at once: lane t of the result is the sum of the lanes of v[t]. A
// transpose-and-add tree costs about a third of W separate reductions, and every score of a step needs
// one (the dot products run along head_dim, inside the vector).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline __m256 hsum8(const __m256* v) {  // lane t = sum of v[t]'s 8 lanes
  const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  // h0123 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low / high 128-bit halves), likewise h4567 for 4..7
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}
#endif

inline Vec hsum_lanes(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m256 half[16];
  for (int t = 0; t < 16; ++t) {
    const __m512 x = v[t];
    half[t] = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  }
  return _mm512_insertf32x8(_mm512_castps256_ps512(hsum8(half)), hsum8(half + 8), 1);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 x[8];
  for (int t = 0; t < 8; ++t) x[t] = v[t];
  return hsum8(x);
#else
  float out[W];
  for (int t = 0; t < W; ++t) out[t] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), v[t]);
  return Vec::loadu(out);
#endif
}

// Register blocking of the two inner loops. Loads, not FMAs, bound them: in the score loop every
// query chunk loaded is used by TB tokens, in the P V loop every broadcast probability by CB chunks
// of head_dim. NR x TB (resp. NR x CB) accumulators stay in the 32 (16 on AVX2) vector registers.
template <int NR>
constexpr int score_token_block() { return NR <= 2 ? 4 : NR <= 4 ? 3 : 2; }
template <int NR>
constexpr int pv_chunk_block() { return NR <= 3 ? 4 : 2; }

// Partial dot products of NR query rows with TB key rows: partial[r * bs + t] = sum over head_dim
// chunks of q_r * k_t (a vector; lanes are summed later).
template <int NR, int TB, typename T>
inline void score_tokens(const float* q, int hd_vec, int hd, const T* k, int64_t kstride, Vec* partial, int pstride) {
  Vec a[NR][TB];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < TB; ++u) a[r][u] = Vec(0.f);
  for (int c = 0; c < hd_vec; c += W) {
    Vec kv[TB];
    for (int u = 0; u < TB; ++u) kv[u] = load_f(k + u * kstride + c);
    for (int r = 0; r < NR; ++r) {
      const Vec qv = Vec::loadu(q + r * hd + c);
      for (int u = 0; u < TB; ++u) a[r][u] = at::vec::fmadd(qv, kv[u], a[r][u]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < TB; ++u) partial[r * pstride + u] = a[r][u];
}

// The tokens one online-softmax step covers: up to kStepTokens consecutive tokens of a sequence, in
// one or more of its pages (kStepTokens, defined above).

template <typename T>
struct Step {
  const T* k[kStepTokens];  // page bases (already offset to the kv head)
  const T* v[kStepTokens];
  int pages = 0, n = 0, bs = 0;  // n tokens: page i holds tokens [i bs, min((i + 1) bs, n))
  int64_t stride = 0;            // elements between the rows of a page
  int page_tokens(int i) const { return std::min(bs, n - i * bs); }
};

// s[r, t] = q_r . k_t for NR rows and the n tokens of a step. The per-token partial sums (vectors along
// head_dim) go to `partial` (NR x sstride vectors) and are reduced W tokens at a time by hsum_lanes.
template <int NR, typename T>
void score_rows(const float* q, int hd, const Step<T>& st, float* s, int sstride, Vec* partial) {
  constexpr int TB = score_token_block<NR>();
  const int hd_vec = hd - hd % W;
  for (int i = 0; i < st.pages; ++i) {
    const int nt = st.page_tokens(i);
    Vec* part = partial + i * st.bs;
    int t = 0;
    for (; t + TB <= nt; t += TB) score_tokens<NR, TB>(q, hd_vec, hd, st.k[i] + t * st.stride, st.stride, part + t, sstride);
    for (; t < nt; ++t) score_tokens<NR, 1>(q, hd_vec, hd, st.k[i] + t * st.stride, st.stride, part + t, sstride);
  }
  for (int r = 0; r < NR; ++r) {
    int u = 0;
    for (; u + W <= st.n; u += W) hsum_lanes(partial + r * sstride + u).store(s + r * sstride + u);
    for (; u < st.n; ++u) s[r * sstride + u] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), partial[r * sstride + u]);
  }
  if (hd_vec < hd) {  // head_dim tail, not a multiple of the vector width
    for (int u = 0; u < st.n; ++u) {
      const T* k = st.k[u / st.bs] + (u % st.bs) * st.stride;
      for (int r = 0; r < NR; ++r) {
        float x = 0.f;
        for (int c = hd_vec; c < hd; ++c) x += q[r * hd + c] * static_cast<float>(k[c]);
        s[r * sstride + u] += x;
      }
    }
  }
}

// acc_r[c .. c + CB W) = alpha_r acc_r + sum_t p[r, t] v_t over the same chunks, for NR rows and the
// tokens of a step; `c` is folded into acc and the step's page pointers by the caller (offset).
template <int NR, int CB, typename T>
inline void pv_chunks(float* acc, int hd, const float* alpha, const float* p, int pstride, const Step<T>& st,
                      int offset) {
  Vec a[NR][CB];
  for (int r = 0; r < NR; ++r) {
    const Vec al(alpha[r]);
    for (int u = 0; u < CB; ++u) a[r][u] = Vec::loadu(acc + r * hd + u * W) * al;
  }
  for (int i = 0; i < st.pages; ++i) {
    const T* v = st.v[i] + offset;
    const float* pi = p + i * st.bs;
    const int nt = st.page_tokens(i);
    for (int t = 0; t < nt; ++t) {
      Vec vv[CB];
      for (int u = 0; u < CB; ++u) vv[u] = load_f(v + t * st.stride + u * W);
      for (int r = 0; r < NR; ++r) {
        const Vec pr(pi[r * pstride + t]);
        for (int u = 0; u < CB; ++u) a[r][u] = at::vec::fmadd(pr, vv[u], a[r][u]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < CB; ++u) a[r][u].store(acc + r * hd + u * W);
}

// acc_r = alpha_r acc_r + sum_t p[r, t] v_t for NR rows: head_dim in blocks of CB chunks, whose NR x CB
// accumulators stay in registers while the step's V rows stream past.
template <int NR, typename T>
void pv_rows(float* acc, int hd, const float* alpha, const float* p, int pstride, const Step<T>& st) {
  constexpr int CB = pv_chunk_block<NR>();
  const int hd_vec = hd - hd % W;
  int c = 0;
  for (; c + CB * W <= hd_vec; c += CB * W) pv_chunks<NR, CB>(acc + c, hd, alpha, p, pstride, st, c);
  for (; c < hd_vec; c += W) pv_chunks<NR, 1>(acc + c, hd, alpha, p, pstride, st, c);
  for (; c < hd; ++c) {
    for (int r = 0; r < NR; ++r) {
      float x = acc[r * hd + c] * alpha[r];
      for (int t = 0; t < st.n; ++t)
        x += p[r * pstride + t] * static_cast<float>(st.v[t / st.bs][(t % st.bs) * st.stride + c]);
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

// Online-softmax update of one row for a step: s[0, n) are its visible scores, s[n, nt) are masked.
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

// The tile attends to logical pages [page_begin, page_end) of one sequence's kv head, a step of up to
// kStepTokens tokens at a time.
template <typename T>
void attend_pages(Tile& tile, const HeadPages<T>& kv, int64_t page_begin, int64_t page_end) {
  const int R = tile.R, hd = tile.hd, bs = tile.bs;
  const int step_pages = std::max(1, kStepTokens / bs);
  const int S = tile.step;  // row stride of the score / probability buffer
  Step<T> st;
  st.bs = bs;
  st.stride = kv.token_stride;
  for (int64_t j = page_begin; j < page_end; j += step_pages) {
    const int64_t start = j * bs;
    // tokens of this step any row sees
    st.n = (int)std::min<int64_t>({(int64_t)step_pages * bs, tile.max_limit - start, (page_end - j) * bs});
    if (st.n <= 0) break;
    st.pages = (st.n + bs - 1) / bs;
    for (int i = 0; i < st.pages; ++i) st.k[i] = kv.key_page(j + i), st.v[i] = kv.value_page(j + i);
    // 1. scores S = (scale Q) K^T of the step
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
      with_rows(std::min(kRowBlock, R - r0),
                [&]<int NR>() { score_rows<NR>(tile.q + r0 * hd, hd, st, tile.s + r0 * S, S, tile.partial); });
    }
    // 2. online softmax, row by row (causal: row r sees tokens < limit[r])
    for (int r = 0; r < R; ++r) {
      const int n = (int)std::clamp<int64_t>(tile.limit[r] - start, 0, st.n);
      tile.alpha[r] = softmax_update(tile.s + r * S, n, st.n, tile.m[r], tile.l[r]);
    }
    // 3. acc = alpha acc + P V
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
      with_rows(std::min(kRowBlock, R - r0),
                [&]<int NR>() { pv_rows<NR>(tile.acc + r0 * hd, hd, tile.alpha + r0, tile.s + r0 * S, S, st); });
    }
  }
}

// dst[0, n) = scale * src[0, n) in fp32, src of q's dtype.
template <typename Q>
inline void widen_scaled(const Q* src, float scale, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) (load_f(src + i) * Vec(scale)).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

// dst[0, n) = mul * src[0, n) narrowed to the output's dtype (round to nearest even).
template <typename Q>
inline void narrow_scaled(const float* src, float mul, Q* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<Q, float>) {
    for (; i + W <= n; i += W) (Vec::loadu(src + i) * Vec(mul)).store(dst + i);
  } else {
    for (; i + 2 * W <= n; i += 2 * W)
      at::vec::convert_from_float<Q>(Vec::loadu(src + i) * Vec(mul), Vec::loadu(src + i + W) * Vec(mul))
          .store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<Q>(src[i] * mul);
}

// Run f(Q{}) with Q the C++ type of q / out.
template <typename F>
inline void with_q_type(CacheDtype t, F&& f) {
  switch (t) {
    case CacheDtype::f32: f(float{}); break;
    case CacheDtype::bf16: f(c10::BFloat16{}); break;
    case CacheDtype::f16: f(c10::Half{}); break;
  }
}

// The n = G hd query values of query token `token`, heads [head0, head0 + G), times the softmax scale,
// widened into the tile.
inline void load_queries(const PagedAttentionParams& p, int64_t token, int64_t head0, int64_t n, float* dst) {
  with_q_type(p.q_dtype, [&](auto t) {
    using Q = decltype(t);
    widen_scaled(static_cast<const Q*>(p.q) + token * p.q_stride + head0 * p.hd, p.scale, dst, n);
  });
}

// out[token, head] = acc / l in q's dtype (a row that saw no key, l = 0, gives 0).
inline void write_normalized(const PagedAttentionParams& p, int64_t token, int64_t head, const float* acc, float l) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  with_q_type(p.q_dtype, [&](auto t) {
    using Q = decltype(t);
    narrow_scaled(acc, inv, static_cast<Q*>(p.out) + (token * p.hq + head) * p.hd, p.hd);
  });
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
// Below this many (page, kv head) pairs (about 20 us of work) one thread does it all: waking a team
// costs more than it saves, and far more on a busy machine, where a descheduled thread stalls the join.
constexpr int64_t kMinParallelPageHeads = 32;

template <typename T>
void decode_impl(const PagedAttentionParams& p) {
  const int64_t B = p.batch, hk = p.hk, hd = p.hd, bs = p.block_size;
  const int G = (int)(p.hq / hk);
  std::vector<int64_t> pages(B);
  int64_t total_pages = 0;
  for (int64_t i = 0; i < B; ++i) total_pages += pages[i] = (p.seq_lens[i] + bs - 1) / bs;
  const int threads = total_pages * hk < kMinParallelPageHeads ? 1 : omp_get_max_threads();
  const int64_t target_items = 4 * threads;
  int64_t part_pages = std::max<int64_t>(p.max_blocks, 1);
  if (threads > 1 && B * hk < target_items)
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

#pragma omp parallel num_threads(threads)
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
      load_queries(p, i, head * G, G * hd, tile.q);
      for (int g = 0; g < G; ++g) tile.limit[g] = p.seq_lens[i];
      attend_pages(tile, head_pages<T>(p, i, head), first, last);

      if (nparts == 1) {
        for (int g = 0; g < G; ++g) write_normalized(p, i, head * G + g, tile.acc + g * hd, tile.l[g]);
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
#pragma omp parallel num_threads(threads)
  {
  std::vector<float> sum(hd);
#pragma omp for schedule(static)
  for (int64_t x = 0; x < B * hk * G; ++x) {
    const int64_t i = x / (hk * G), hg = x % (hk * G);
    const int64_t p0 = part_off[i], p1 = part_off[i + 1];
    if (p1 - p0 == 1) continue;
    float M = kNegInf;
    for (int64_t q = p0; q < p1; ++q) M = std::max(M, part_m[q * hk * G + hg]);
    float* out = sum.data();
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
    write_normalized(p, i, hg, out, L);
  }
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

#pragma omp parallel if (total_tiles * hk > 1)
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
        load_queries(p, q0 + j, head * G, G * hd, tile.q + (j - j0) * G * hd);
        for (int g = 0; g < G; ++g) tile.limit[(j - j0) * G + g] = visible;
      }
      tile.max_limit = seq_len - q_len + j1;
      attend_pages(tile, head_pages<T>(p, i, head), 0, (tile.max_limit + bs - 1) / bs);
      for (int64_t j = j0; j < j1; ++j)
        for (int g = 0; g < G; ++g) {
          const int64_t r = (j - j0) * G + g;
          write_normalized(p, q0 + j, head * G + g, tile.acc + r * hd, tile.l[r]);
        }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// ---------------------------------------------------------------------------------------------------
// bf16 prefill on AMX tiles (flash-attention 2 on the CPU's matrix unit).
//
// 1. Pack: every (sequence, kv head) K and V, gathered through the block table once per call, in steps of
//    32 tokens laid out as the B operands of the two products (tokens past seq_len are zeros):
//      K^T tiles  (step, half, kb): B[kk][j] = (K[32 step + 16 half + j][32 kb + 2 kk], .. + 1)   (S = Q K^T)
//      V tiles    (step, cg):       B[kk][c] = (V[32 step + 2 kk][16 cg + c], V[32 step + 2 kk + 1][..]) (P V)
//    Each (query tile, step) pair reuses them, so no K or V row is transposed more than once.
// 2. Attend: a work item is a pair of row blocks of one kv head; a row block is 16 consecutive queries of
//    one query head g (its rows are q rows at one stride), blocks numbered (chunk of 16 queries) x G + g, so
//    a pair holds two heads of the same queries (G >= 2) or 32 consecutive queries (G = 1). Per chunk of
//    up to kAmxChunk tokens (steps of 32): the 2 x 2 score tiles S = Q K^T of each step accumulate over
//    head_dim on the tiles (the next chunk's are issued before this chunk's softmax, so the matrix unit runs
//    beside the vector units); the online softmax runs in fp32 vectors, row by row (scale, causal mask,
//    running max m and sum l, in log2 units), and writes P = 2^(x - m) rounded to bf16 as the A operand of
//    P V; the output accumulator O (fp32, 2 x 16 x hd, in memory) is rescaled by 2^(m_old - m_new) only
//    when a row's max grew, then O += P V on the tiles over the chunk's steps, two 16-column groups at a
//    time (8 tiles: 4 O, 2 P, 2 V; O loaded and stored once per chunk, zeroed tiles in the first). The
//    statistics and O stay fp32; P is bf16 (as flash-attention does for bf16 inputs: 2^-9 relative per
//    weight). Q's A tiles are read straight from q's rows (a partial block from a zero-padded copy).
// ---------------------------------------------------------------------------------------------------
constexpr int kAmxStep = 32;    // tokens per step: the k extent of one P V tile product
// tokens per online-softmax update: O is loaded and stored once per chunk (1 thread, b1 x 512 / b16 x 128
// tokens, 8 / 2 heads, hd 128: 64 -> 1.00 / 1.61 ms, 128 -> 0.88 / 1.57, 256 -> 0.80 / 1.48)
constexpr int kAmxChunk = 256;

struct AmxLayout {
  int64_t hd, nkb, ncg, step_elems;  // step_elems: uint32 words of one step of K (or V) tiles (= 16 hd)
};

// K rows of one (sequence, kv head) step, read through the block table; nullptr past seq_len.
inline void step_rows(const PagedAttentionParams& p, const c10::BFloat16* cache, int64_t seq, int64_t head,
                      int64_t t0, int64_t seq_len, const c10::BFloat16* rows[kAmxStep]) {
  const int32_t* table = p.block_tables + seq * p.max_blocks;
  const int64_t bs = p.block_size, token_stride = p.hk * p.hd;
  for (int j = 0; j < kAmxStep; ++j) {
    const int64_t t = t0 + j;
    rows[j] = t < seq_len ? cache + ((int64_t)table[t / bs] * bs + t % bs) * token_stride + head * p.hd : nullptr;
  }
}

void amx_pack_step(const PagedAttentionParams& p, const AmxLayout& L, int64_t seq, int64_t head, int64_t step,
                   int64_t seq_len, uint32_t* kp, uint32_t* vp) {
  using T = c10::BFloat16;
  const T* rows[kAmxStep];
  // K^T: a 16 x 16 transpose of 32-bit words (bf16 pairs of head_dim) of 16 token rows
  step_rows(p, static_cast<const T*>(p.key_cache), seq, head, step * kAmxStep, seq_len, rows);
  for (int half = 0; half < 2; ++half)
    for (int64_t kb = 0; kb < L.nkb; ++kb) {
      __m512 r[16], t[16];
      for (int j = 0; j < 16; ++j) {
        const T* k = rows[16 * half + j];
        r[j] = k ? _mm512_castsi512_ps(_mm512_loadu_si512(k + 32 * kb)) : _mm512_setzero_ps();
      }
      transpose16(r, t);
      uint32_t* dst = kp + (half * L.nkb + kb) * 256;
      for (int kk = 0; kk < 16; ++kk) _mm512_store_si512(dst + 16 * kk, _mm512_castps_si512(t[kk]));
    }
  // V: rows 2 kk and 2 kk + 1 interleaved element by element
  step_rows(p, static_cast<const T*>(p.value_cache), seq, head, step * kAmxStep, seq_len, rows);
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int kk = 0; kk < 16; ++kk) {
    const T *a = rows[2 * kk], *b = rows[2 * kk + 1];
    for (int64_t cg = 0; cg < L.ncg; ++cg) {
      const __m256i va = a ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * cg)) : _mm256_setzero_si256();
      const __m256i vb = b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * cg)) : _mm256_setzero_si256();
      const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(va), vb, 1);
      _mm512_store_si512(vp + cg * 256 + 16 * kk, _mm512_permutexvar_epi16(inter, ab));
    }
  }
}

// One row block's state: 16 rows of q (bf16, zero rows past the sequence's queries), O (fp32), the
// softmax statistics and each row's causal limit (it sees tokens [0, limit); 0 for absent rows).
struct alignas(64) AmxBlock {
  const c10::BFloat16* qa;  // the A operand rows of Q: q itself (a full block: rows q_stride apart) or `q`
  int64_t qa_bytes;         // their stride
  alignas(64) c10::BFloat16 q[16 * kAmxMaxHeadDim];  // a partial block's rows, zero-padded to 16
  alignas(64) float o[16 * kAmxMaxHeadDim];
  alignas(64) c10::BFloat16 p[16 * kAmxChunk];  // probabilities of the current chunk: the A operands of P V
  float m[16], l[16];
  int32_t limit[16];
};

// 2^x in fp32 for x <= 0 (to ~3e-6 relative; x = -inf is the caller's to mask): 2^x = 2^n 2^f with
// n = round(x), f in [-1/2, 1/2], 2^f by its degree-5 Taylor polynomial (P is rounded to bf16 right after).
inline __m512 exp2_neg(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_fmadd_ps(f, _mm512_set1_ps(1.3333558e-3f), _mm512_set1_ps(9.6181291e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.24022651f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.69314718f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// Online softmax of one block for the chunk of `subs` steps (32 tokens each) at token t0: s holds the
// chunk's score tiles, (step u, block b, half) at s + 256 (4 u + 2 b + half), row r at + 16 r. Writes P
// (rows of kAmxChunk bf16), updates m and l (m in units of log2: scores times scale log2(e), so that
// P = 2^(x - m)); returns whether O must be rescaled (a row that had seen keys
// got a larger max), with the factors in alpha.
__attribute__((target("avx512bf16"))) bool amx_softmax(AmxBlock& blk, const float* s, int b, int subs, int64_t t0,
                                                        float scale, float* alpha) {
  constexpr int kVecs = kAmxChunk / 16;
  alignas(64) float m_new[16], rowsum[16];
  const __m512 neg_inf = _mm512_set1_ps(kNegInf), vscale = _mm512_set1_ps(scale * 1.44269504f);
  const int nv = 2 * subs;
  for (int r = 0; r < 16; ++r) {
    const int64_t n = std::clamp<int64_t>(blk.limit[r] - t0, 0, 16 * nv);  // visible tokens of the chunk
    __m512 x[kVecs];
    __mmask16 k[kVecs];
    __m512 mx = neg_inf;
    for (int u = 0; u < kVecs; ++u) {
      if (u >= nv) break;
      const int64_t c = std::clamp<int64_t>(n - 16 * u, 0, 16);
      k[u] = (__mmask16)((1u << c) - 1);
      x[u] = _mm512_mask_mul_ps(neg_inf, k[u], _mm512_load_ps(s + 256 * (4 * (u / 2) + 2 * b + u % 2) + 16 * r), vscale);
      mx = _mm512_max_ps(mx, x[u]);
    }
    const float m = std::max(blk.m[r], _mm512_reduce_max_ps(mx));
    m_new[r] = m;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    c10::BFloat16* p = blk.p + kAmxChunk * r;
    for (int u = 0; u < kVecs; u += 2) {
      if (u >= nv) break;
      // masked lanes (and whole rows that saw nothing yet, m = -inf) give exactly 0
      const __m512 ea = _mm512_maskz_mov_ps(k[u], exp2_neg(_mm512_sub_ps(x[u], vm)));
      const __m512 eb = _mm512_maskz_mov_ps(k[u + 1], exp2_neg(_mm512_sub_ps(x[u + 1], vm)));
      sum = _mm512_add_ps(sum, _mm512_add_ps(ea, eb));
      _mm512_store_si512(p + 16 * u, (__m512i)_mm512_cvtne2ps_pbh(eb, ea));
    }
    rowsum[r] = _mm512_reduce_add_ps(sum);
  }
  // alpha = 2^(m_old - m_new) for the 16 rows at once; 1 where m_old = -inf (l and O are still 0 there)
  const __m512 mo = _mm512_loadu_ps(blk.m), mn = _mm512_load_ps(m_new);
  const __mmask16 seen = _mm512_cmp_ps_mask(mo, neg_inf, _CMP_NEQ_OQ);
  const __m512 al = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), seen, exp2_neg(_mm512_sub_ps(mo, mn)));
  _mm512_storeu_ps(blk.l, _mm512_fmadd_ps(_mm512_loadu_ps(blk.l), al, _mm512_load_ps(rowsum)));
  _mm512_storeu_ps(blk.m, mn);
  _mm512_storeu_ps(alpha, al);
  // only rows with a finite old max that grew need O rescaled
  return _mm512_mask_cmp_ps_mask(seen, mn, mo, _CMP_GT_OQ) != 0;
}

// S = Q K^T of NB row blocks for `subs` steps of 32 tokens from step st0: tiles 0, 1 (block 0, token
// halves 0 / 1), 2, 3 (block 1), stored as the layout amx_softmax reads.
template <int NB>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_scores(const AmxBlock* blk, const AmxLayout& L,
                                                                    const uint32_t* kp, int64_t st0, int subs,
                                                                    float* s) {
  for (int u = 0; u < subs; ++u) {
    const uint32_t* k = kp + (st0 + u) * L.step_elems;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (NB == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kb = 0; kb < L.nkb; ++kb) {
      _tile_loadd(6, k + kb * 256, 64);
      _tile_loadd(7, k + (L.nkb + kb) * 256, 64);
      _tile_loadd(4, blk[0].qa + 32 * kb, blk[0].qa_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NB == 2) {
        _tile_loadd(5, blk[1].qa + 32 * kb, blk[1].qa_bytes);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* su = s + 1024 * u;
    _tile_stored(0, su, 64);
    _tile_stored(1, su + 256, 64);
    if constexpr (NB == 2) {
      _tile_stored(2, su + 512, 64);
      _tile_stored(3, su + 768, 64);
    }
  }
}

// O += P V of NB row blocks for `subs` steps from step st0, two 16-column groups of head_dim at a time
// (tiles 0-3: O, 4-5: P, 6-7: V); `first`: O starts at zero (it is never read before the first chunk).
template <int NB>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_pv(AmxBlock* blk, const AmxLayout& L,
                                                                const uint32_t* vp, int64_t st0, int subs,
                                                                bool first) {
  const int64_t obytes = L.hd * 4, pbytes = kAmxChunk * 2;
  for (int64_t cg = 0; cg < L.ncg; cg += 2) {
    float* o0 = blk[0].o + 16 * cg;
    float* o1 = blk[NB - 1].o + 16 * cg;
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (NB == 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
    } else {
      _tile_loadd(0, o0, obytes);
      _tile_loadd(1, o0 + 16, obytes);
      if constexpr (NB == 2) {
        _tile_loadd(2, o1, obytes);
        _tile_loadd(3, o1 + 16, obytes);
      }
    }
    for (int u = 0; u < subs; ++u) {
      const uint32_t* v = vp + (st0 + u) * L.step_elems + cg * 256;
      _tile_loadd(6, v, 64);
      _tile_loadd(7, v + 256, 64);
      _tile_loadd(4, blk[0].p + kAmxStep * u, pbytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NB == 2) {
        _tile_loadd(5, blk[1].p + kAmxStep * u, pbytes);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, o0, obytes);
    _tile_stored(1, o0 + 16, obytes);
    if constexpr (NB == 2) {
      _tile_stored(2, o1, obytes);
      _tile_stored(3, o1 + 16, obytes);
    }
  }
}

// Attention of NB (1 or 2) row blocks over the packed K / V of their (sequence, kv head): tokens [0, n),
// in chunks of kAmxChunk tokens (steps of 32: one k block of P V). The scores of the next chunk are
// issued before the softmax of the current one (two score buffers), so that the matrix unit works on
// them while the vector units run the softmax.
template <int NB>
__attribute__((target("amx-tile,amx-bf16,avx512bf16"))) void amx_attend(AmxBlock* blk, const AmxLayout& L,
                                                                       const uint32_t* kp, const uint32_t* vp,
                                                                       int64_t n, float scale) {
  alignas(64) float s[2][kAmxChunk / kAmxStep * 4 * 256];
  alignas(64) float alpha[16];
  const int64_t hd = L.hd;
  auto subs_at = [&](int64_t t0) { return (int)(std::min<int64_t>(kAmxChunk, n - t0 + kAmxStep - 1) / kAmxStep); };
  amx_scores<NB>(blk, L, kp, 0, subs_at(0), s[0]);
  for (int64_t t0 = 0, c = 0; t0 < n; t0 += kAmxChunk, ++c) {
    const int subs = subs_at(t0);
    const int64_t st0 = t0 / kAmxStep;
    if (t0 + kAmxChunk < n) amx_scores<NB>(blk, L, kp, st0 + kAmxChunk / kAmxStep, subs_at(t0 + kAmxChunk), s[(c + 1) % 2]);
    // online softmax; rescale O where a row's max grew
    for (int b = 0; b < NB; ++b) {
      if (amx_softmax(blk[b], s[c % 2], b, subs, t0, scale, alpha)) {
        for (int r = 0; r < 16; ++r) {
          if (alpha[r] == 1.f) continue;
          const __m512 a = _mm512_set1_ps(alpha[r]);
          float* o = blk[b].o + r * hd;
          for (int64_t j = 0; j < hd; j += 16) _mm512_store_ps(o + j, _mm512_mul_ps(a, _mm512_load_ps(o + j)));
        }
      }
    }
    amx_pv<NB>(blk, L, vp, st0, subs, t0 == 0);
  }
}

// out[token0 + r, head] = O_r / l_r in bf16 for the block's first `rows` rows (vcvtneps2bf16 through
// narrow_store.h's policy: the software rounding's bits); a row that saw no key (l = 0) gives 0.
__attribute__((target("avx512bf16"))) void amx_write_rows(const PagedAttentionParams& p, const AmxBlock& blk,
                                                          int64_t token0, int64_t rows, int64_t head) {
  const int64_t hd = p.hd;
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(blk.l[r] > 0.f ? 1.f / blk.l[r] : 0.f);
    auto* out = static_cast<c10::BFloat16*>(p.out) + ((token0 + r) * p.hq + head) * hd;
    for (int64_t c = 0; c < hd; c += 16)
      HwBf16Cvt::store(out + c, VF(_mm512_mul_ps(inv, _mm512_load_ps(blk.o + r * hd + c))), 16);
  }
}

// Packed K / V of the whole call, kept by the calling thread between calls (ThreadScratch: no page faults per
// call) up to kAmxKeepBytes.
struct AmxKVTag;
constexpr size_t kAmxKeepBytes = size_t(64) << 20;

void prefill_amx(const PagedAttentionParams& p) {
  using T = c10::BFloat16;
  const int64_t B = p.batch, hk = p.hk, hd = p.hd;
  const int G = (int)(p.hq / hk);
  AmxLayout L{hd, hd / 32, hd / 16, 16 * hd};
  // steps of 32 tokens per sequence, and the row-block pairs (work items per kv head)
  std::vector<int64_t> step_off(B + 1, 0), pair_off(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t q_len = p.cu_seqlens_q[i + 1] - p.cu_seqlens_q[i];
    step_off[i + 1] = step_off[i] + (q_len > 0 ? (p.seq_lens[i] + kAmxStep - 1) / kAmxStep : 0);
    pair_off[i + 1] = pair_off[i] + ((q_len + 15) / 16 * G + 1) / 2;
  }
  const int64_t total_steps = step_off[B] * hk, total_items = pair_off[B] * hk;
  if (total_items == 0) return;
  const size_t words = (size_t)total_steps * L.step_elems;
  const ThreadScratch<uint32_t, AmxKVTag> packed(2 * words, kAmxKeepBytes);  // K steps, then V steps
  uint32_t* kp = packed.data();
  uint32_t* vp = kp + words;
  // packed (sequence i, head h) starts at step (step_off[i] hk + h steps_i)
  auto base = [&](int64_t i, int64_t h) { return (step_off[i] * hk + h * (step_off[i + 1] - step_off[i])) * L.step_elems; };

#pragma omp parallel if (total_items > 1)
  {
#pragma omp for schedule(static)
    for (int64_t x = 0; x < total_steps; ++x) {
      const int64_t i = std::upper_bound(step_off.begin(), step_off.end(), x / hk) - step_off.begin() - 1;
      const int64_t steps = step_off[i + 1] - step_off[i];
      const int64_t h = (x - step_off[i] * hk) / steps, st = (x - step_off[i] * hk) % steps;
      const int64_t off = base(i, h) + st * L.step_elems;
      amx_pack_step(p, L, i, h, st, p.seq_lens[i], kp + off, vp + off);
    }
    amx_configure();
    AmxBlock* blk = static_cast<AmxBlock*>(std::aligned_alloc(64, 2 * sizeof(AmxBlock)));
#pragma omp for schedule(dynamic, 1)
    for (int64_t x = 0; x < total_items; ++x) {
      // the latest queries (longest causal range) first: dynamic scheduling evens out the tail
      const int64_t item = total_items - 1 - x;
      const int64_t i = std::upper_bound(pair_off.begin(), pair_off.end(), item / hk) - pair_off.begin() - 1;
      const int64_t pairs = pair_off[i + 1] - pair_off[i];
      const int64_t h = (item - pair_off[i] * hk) / pairs, pair = (item - pair_off[i] * hk) % pairs;
      const int64_t q0 = p.cu_seqlens_q[i], q_len = p.cu_seqlens_q[i + 1] - q0, seq_len = p.seq_lens[i];
      const int64_t nblocks = (q_len + 15) / 16 * G;
      const int NB = 2 * pair + 1 < nblocks ? 2 : 1;
      int64_t max_limit = 0;
      for (int b = 0; b < NB; ++b) {
        const int64_t bi = 2 * pair + b, chunk = bi / G, g = bi % G, head = h * G + g;
        AmxBlock& k = blk[b];
        const T* qrow = static_cast<const T*>(p.q) + (q0 + 16 * chunk) * p.q_stride + head * hd;
        const bool full = 16 * chunk + 16 <= q_len && p.q_stride > 0;
        k.qa = full ? qrow : k.q;
        k.qa_bytes = full ? p.q_stride * 2 : hd * 2;
        for (int r = 0; r < 16; ++r) {
          const int64_t j = 16 * chunk + r;  // query j of the sequence, at position seq_len - q_len + j
          k.m[r] = kNegInf;
          k.l[r] = 0.f;
          k.limit[r] = j < q_len ? (int32_t)(seq_len - q_len + j + 1) : 0;
          max_limit = std::max<int64_t>(max_limit, k.limit[r]);
          if (full) continue;
          if (j < q_len) std::memcpy(k.q + r * hd, qrow + r * p.q_stride, hd * 2);
          else std::memset(k.q + r * hd, 0, hd * 2);
        }
      }
      if (NB == 2) amx_attend<2>(blk, L, kp + base(i, h), vp + base(i, h), max_limit, p.scale);
      else amx_attend<1>(blk, L, kp + base(i, h), vp + base(i, h), max_limit, p.scale);
      for (int b = 0; b < NB; ++b) {
        const int64_t bi = 2 * pair + b, chunk = bi / G, g = bi % G, head = h * G + g;
        amx_write_rows(p, blk[b], q0 + 16 * chunk, std::min<int64_t>(16, q_len - 16 * chunk), head);
      }
    }
    std::free(blk);
    amx_release();
  }
}
#endif

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

void paged_attention_prefill_kernel(const PagedAttentionParams& p) {
#if defined(CPU_CAPABILITY_AVX512)
  if (p.amx) return prefill_amx(p);
#endif
  by_cache_dtype<Prefill>(p);
}

// Scatter token rows (row_bytes each; token t's key row at key + t * key_stride bytes, likewise value)
// into the caches: row t goes to flat cache row slots[t] (= block * block_size + offset); negative slots
// are padding and are skipped.
void reshape_and_cache_kernel(const void* key, const void* value, void* key_cache, void* value_cache,
                              const int64_t* slots, int64_t tokens, int64_t row_bytes, int64_t key_stride,
                              int64_t value_stride) {
  const char* k = static_cast<const char*>(key);
  const char* v = static_cast<const char*>(value);
  char* kc = static_cast<char*>(key_cache);
  char* vc = static_cast<char*>(value_cache);
#pragma omp parallel for schedule(static) if (tokens * row_bytes > (1 << 18))
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    std::memcpy(kc + s * row_bytes, k + t * key_stride, row_bytes);
    std::memcpy(vc + s * row_bytes, v + t * value_stride, row_bytes);
  }
}

}  // namespace h1r::cpu::H1R_ISA
