// Mamba2 selective scan backward (chunked SSD), for the forward of selective_scan.cu.
//
// Notation of the forward, per head, for a chunk of kChunk tokens with S_prev the state entering it:
//   dt'_t = clamp?(softplus?(dt_t + dt_bias)),  a_t = dt'_t A,  cs_t = sum_{s <= t} a_s (within the chunk)
//   Xs[s][r] = dt'_s x_s[r]
//   Dm[t][s] = [s <= t, doc_s == doc_t] exp(cs_t - cs_s),   Lm = (C B^T) o Dm
//   e_t      = [doc_t == doc(S_prev)] exp(cs_t)               (decay of the entering state to t)
//   w_s      = [doc_s == doc_last] exp(cs_last - cs_s)         (decay of token s to the chunk's end)
//   y_t[r]   = e_t C_t . S_prev[r] + sum_s Lm[t][s] Xs[s][r] + D[r] x_t[r];   out = y silu(z)
//   S[r]     = e_last S_prev[r] + sum_s w_s Xs[s][r] B_s
//
// Three kernels:
//  * chunk kernel, grid (ceil(p / kRows), h, b), launched once for pass 1 and then once per window:
//    pass 1 re-runs the state recurrence forwards and stores the state entering every K-th chunk
//    (checkpoints, K ~ sqrt(nchunks), scratch chunk_states); pass 2 walks the segments of K chunks
//    backwards: it recomputes the states entering the segment's chunks from its checkpoint, then walks
//    those chunks backwards carrying dS, the gradient of the state leaving the chunk (dfinal_states at
//    first), and differentiates the chunk:
//      dY        = dout silu(z);   dz = dout y silu'(z);   dD[r] += sum_t x_t[r] dY_t[r]
//      dS_prev   = e_last dS + sum_t e_t dY_t C_t^T
//      dC_t      = e_t sum_r dY_t[r] S_prev[r] + sum_s dG[t][s] B_s          dG = (dY Xs^T) o Dm
//      dB_s      = w_s sum_r Xs[s][r] dS[r] + sum_t dG[t][s] C_t
//      dXs[s][r] = w_s B_s . dS[r] + sum_{t >= s} Lm[t][s] dY_t[r];          dx = dt' dXs + D dY
//      dcs       from the decays e, w, Dm: with TL = (dY Xs^T) o Lm, dw_s = sum_r Xs[s][r] (B_s . dS[r]),
//                de_t = sum_r dY_t[r] (C_t . S_prev[r]):
//                dcs_t = e_t de_t + sum_s TL[t][s] - sum_u TL[u][t] - w_t dw_t
//                        + [t = last] (sum_s w_s dw_s + e_last <dS, S_prev>)
//      da        = reverse cumsum of dcs;   ddt' = A da + sum_r x[r] dXs[r];   dA += sum_t dt'_t da_t
//    The block owns kRows channels r of one head, so dx, dz, dD, dinitial_states are its own; dB, dC,
//    ddt' and dA sum over all channels of the head (and dB, dC over the heads of a group): the block writes
//    its partial sums to its own slots (no atomics).
//  * two reduce kernels: dB, dC = the slots summed over row tiles and the heads of a group (in a fixed
//    order: deterministic); ddt = ddt' (summed over row tiles) through the clamp and the softplus.
// Windows: the dB, dC slots take 2 ntiles h n floats per token, far more than the gradients themselves
// (g n per token), so pass 2 runs over a window of whole segments at a time (the latest first), each
// launch followed by the dB, dC reduction of its tokens: the slots hold one window (at most
// selective_scan_bwd_partial_budget() floats, or one segment if that is larger). Between windows dS waits
// in a scratch slot, and dD, dA are added to their outputs in the launch order: still deterministic.
// Layout of the chunk kernel: 256 threads = kChunk x kRows; a thread takes one (token, channel) or one
// (token, token) pair of the chunk, and loops over d_state for the (token, state) and (channel, state)
// products. B, C of the chunk, S_prev and dS live in (dynamic) shared memory, 4 x 16 x (n + 1) floats.
#include "common.cuh"
#include "selective_scan.h"

namespace h1r::cuda {
namespace {

constexpr int kChunk = 16, kRows = 16, kThreads = kChunk * kRows;
static_assert(kThreads == 256 && kChunk <= 32, "thread layout");

// Per-chunk decay quantities, in shared memory.
struct ChunkDecay {
  float dt[kChunk];  // dt'
  float cs[kChunk];  // cumulative log-decay
  float e[kChunk];   // decay of the entering state to t (zero in a new document)
  float w[kChunk];   // decay of token t to the end of the chunk (zero unless in the last document)
  int doc[kChunk];
};

// Fills `d` for the chunk starting at t0 (prev_doc: document of the entering state). Called by every
// thread; warp 0 does the work (dt' per lane, cs by a shuffle scan); the caller synchronizes afterwards.
// Tokens past the end: dt' = 0 (no decay) and the last document, as in the forward.
__device__ void chunk_decay(const SelectiveScanBwdParams& p, int64_t b, int64_t h, int64_t t0, int prev_doc,
                            ChunkDecay& d) {
  const int lane = threadIdx.x;
  if (lane >= 32) return;
  const int64_t t = t0 + lane;
  float dtp = 0.0f;
  int doc = 0;
  if (lane < kChunk) {
    if (t < p.seqlen) {
      dtp = p.dt[(b * p.seqlen + t) * p.nheads + h] + (p.dt_bias ? p.dt_bias[h] : 0.0f);
      if (p.dt_softplus) dtp = softplus(dtp);
      if (p.dt_clamp) dtp = fminf(fmaxf(dtp, p.dt_min), p.dt_max);
    }
    doc = p.seq_idx ? p.seq_idx[b * p.seqlen + (t < p.seqlen ? t : p.seqlen - 1)] : 0;
  }
  float cs = lane < kChunk ? dtp * p.A[h] : 0.0f;
  for (int o = 1; o < kChunk; o <<= 1) {
    const float u = __shfl_up_sync(kFullMask, cs, o, kChunk);
    if ((lane % kChunk) >= o) cs += u;
  }
  const float cs_last = __shfl_sync(kFullMask, cs, kChunk - 1, kChunk);
  const int doc_last = __shfl_sync(kFullMask, doc, kChunk - 1, kChunk);
  if (lane < kChunk) {
    d.dt[lane] = dtp;
    d.cs[lane] = cs;
    d.doc[lane] = doc;
    d.e[lane] = doc == prev_doc ? __expf(cs) : 0.0f;
    d.w[lane] = doc == doc_last ? __expf(cs_last - cs) : 0.0f;
  }
}

// Chunks per checkpoint segment: about sqrt(nchunks), so that the scratch holds ~2 sqrt(nchunks) states
// per (batch, head) instead of one per chunk, for one extra run of the state recurrence.
__host__ __device__ __forceinline__ int64_t segment_chunks(int64_t nchunks) {
  int64_t k = 1;
  while (k * k < nchunks) ++k;
  return k;
}

// Document of the state entering chunk c: that of the last token before it (the first document for c = 0).
__device__ __forceinline__ int entering_doc(const SelectiveScanBwdParams& p, int64_t b, int64_t t0) {
  return p.seq_idx ? p.seq_idx[b * p.seqlen + (t0 > 0 ? t0 - 1 : 0)] : 0;
}

// Segments [seg_lo, seg_hi) of pass 2; seg_hi = 0 runs pass 1 (the checkpoints) instead.
struct Window {
  int64_t seg_lo, seg_hi;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_chunk_kernel(SelectiveScanBwdParams p, Window win) {
  const int64_t n = p.dstate;
  H1R_DYNAMIC_SHARED(float, smem);
  // Rows of n floats, ld = n + 1 apart: the (row, row) products read one column of 16 rows per warp,
  // conflict-free with an odd row stride. sm(i): the place of entry i of a dense [rows][n] array.
  const int64_t ld = n + 1;
  auto sm = [&](int64_t i) { return (i / n) * ld + i % n; };
  float* Bs = smem;              // [kChunk][ld]
  float* Cs = Bs + kChunk * ld;  // [kChunk][ld]
  float* Sp = Cs + kChunk * ld;  // [kRows][ld]: the state entering the chunk (pass 1: the running state)
  float* dS = Sp + kRows * ld;   // [kRows][ld]: gradient of the state leaving the chunk
  __shared__ ChunkDecay dc;
  __shared__ float X[kChunk][kRows], Xs[kChunk][kRows], dY[kChunk][kRows], CS[kChunk][kRows];
  __shared__ float BdS[kChunk][kRows], dXs[kChunk][kRows];
  __shared__ float Dm[kChunk][kChunk], Lm[kChunk][kChunk], dG[kChunk][kChunk], TL[kChunk][kChunk];
  __shared__ float scratch[kThreads / 32];

  const int64_t b = blockIdx.z, h = blockIdx.y, tile = blockIdx.x, p0 = tile * kRows;
  const int64_t g = h / (p.nheads / p.ngroups), l = p.seqlen, P = p.dim, ntiles = gridDim.x;
  const int64_t nchunks = ceil_div(l, kChunk);
  const int tid = threadIdx.x, ti = tid / kRows, tj = tid % kRows;  // (token, channel) or (token, token)
  const bool tj_ok = p0 + tj < P;
  const float A = p.A[h];
  const int64_t xstride_t = p.nheads * P, bstride_t = p.ngroups * n;
  const int64_t xoff = b * l * xstride_t + h * P + p0;  // token 0, channel p0
  const T* x = static_cast<const T*>(p.x) + xoff;
  const T* z = p.z ? static_cast<const T*>(p.z) + xoff : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + xoff;
  T* dx = static_cast<T*>(p.dx) + xoff;
  T* dz = p.z ? static_cast<T*>(p.dz) + xoff : nullptr;
  const T* Bg = static_cast<const T*>(p.B) + b * l * bstride_t + g * n;
  const T* Cg = static_cast<const T*>(p.C) + b * l * bstride_t + g * n;
  const int64_t bh = b * p.nheads + h;
  const int64_t rows_n = kRows * n;
  // Scratch slots of P x n floats (this block: rows p0 ..): [0, ncheck) checkpoints, the states entering
  // chunks 0, K, 2K, ...; [ncheck, ncheck + K) the states entering the chunks of the segment being
  // differentiated, recomputed from its checkpoint; ncheck + K: dS between two windows.
  const int64_t K = segment_chunks(nchunks), ncheck = ceil_div(nchunks, K), dS_slot = ncheck + K;
  float* states = p.chunk_states + (bh * (ncheck + K + 1) * P + p0) * n;  // slot j, row r: states[(j P + r) n + k]
  // The window's first token: its dB, dC slots are indexed by the token's offset from it.
  const int64_t tw0 = win.seg_lo * K * kChunk, lw = p.window_tokens;

  // Stages token rows [t0, t0 + kChunk) of B (and C) in fp32, zero past the end.
  auto stage_bc = [&](int64_t t0, bool with_c) {
    for (int64_t i = tid; i < kChunk * n; i += kThreads) {
      const int64_t s = i / n, k = i % n, t = t0 + s;
      Bs[s * ld + k] = t < l ? to_float(Bg[t * bstride_t + k]) : 0.0f;
      if (with_c) Cs[s * ld + k] = t < l ? to_float(Cg[t * bstride_t + k]) : 0.0f;
    }
  };
  // X[t][r] = x (zero past the end or past the last channel).
  auto stage_x = [&](int64_t t0) {
    const int64_t t = t0 + ti;
    X[ti][tj] = (t < l && tj_ok) ? to_float(x[t * xstride_t + tj]) : 0.0f;
  };
  auto row_ok = [&](int64_t i) { return p0 + i / n < P; };
  // Sp (or dS) <-> scratch slot j (thread i always handles entry i: no barrier needed between the two).
  auto save_state = [&](int64_t j, const float* S = nullptr) {
    for (int64_t i = tid; i < rows_n; i += kThreads)
      if (row_ok(i)) states[j * P * n + i] = (S ? S : Sp)[sm(i)];
  };
  auto load_state = [&](int64_t j, float* S = nullptr) {
    for (int64_t i = tid; i < rows_n; i += kThreads) (S ? S : Sp)[sm(i)] = row_ok(i) ? states[j * P * n + i] : 0.0f;
  };
  // Sp: the state entering chunk c -> the state leaving it (the forward's chunk state update).
  auto advance_state = [&](int64_t c) {
    const int64_t t0 = c * kChunk;
    chunk_decay(p, b, h, t0, entering_doc(p, b, t0), dc);
    stage_bc(t0, false);
    stage_x(t0);
    __syncthreads();
    Xs[ti][tj] = dc.dt[ti] * X[ti][tj] * dc.w[ti];  // (here: the decayed input of the chunk state)
    __syncthreads();
    const float e_last = dc.e[kChunk - 1];
    for (int64_t i = tid; i < rows_n; i += kThreads) {
      const int64_t r = i / n, k = i % n;
      float v = e_last * Sp[r * ld + k];
      for (int s = 0; s < kChunk; ++s) v += Xs[s][r] * Bs[s * ld + k];
      Sp[r * ld + k] = v;
    }
    __syncthreads();
  };

  // ---- pass 1: the checkpoints ----
  if (win.seg_hi == 0) {
    for (int64_t i = tid; i < rows_n; i += kThreads)
      Sp[sm(i)] = (p.initial_states && row_ok(i)) ? p.initial_states[(bh * P + p0) * n + i] : 0.0f;
    for (int64_t c = 0; c <= (ncheck - 1) * K; ++c) {
      if (c % K == 0) save_state(c / K);
      if (c < (ncheck - 1) * K) advance_state(c);
    }
    return;
  }

  // ---- pass 2: backwards over the window's segments, and over the chunks of each ----
  if (win.seg_hi < ncheck) load_state(dS_slot, dS);  // dS left by the window after this one
  else
    for (int64_t i = tid; i < rows_n; i += kThreads)
      dS[sm(i)] = (p.dfinal_states && row_ok(i)) ? p.dfinal_states[(bh * P + p0) * n + i] : 0.0f;
  float dD_acc = 0.0f, dA_acc = 0.0f;  // (token ti, channel tj) share of dD; lane share of dA (warp 0)
  for (int64_t seg = win.seg_hi - 1; seg >= win.seg_lo; --seg) {
    const int64_t c0 = seg * K, c1 = c0 + K < nchunks ? c0 + K : nchunks;
    load_state(seg);
    for (int64_t c = c0; c < c1; ++c) {
      save_state(ncheck + c - c0);
      if (c + 1 < c1) advance_state(c);
    }
    for (int64_t c = c1 - 1; c >= c0; --c) {
      const int64_t t0 = c * kChunk;
      // 1. Stage the chunk: S_prev, B, C, x, the decays.
      load_state(ncheck + c - c0);
      chunk_decay(p, b, h, t0, entering_doc(p, b, t0), dc);
      stage_bc(t0, true);
      stage_x(t0);
      __syncthreads();

      // 2. (t, s): the decay matrix and Lm = (C_t . B_s) Dm; (t, r): Xs, CS = C_t . S_prev[r].
      {
        const int t = ti, s = tj;
        float cb = 0.0f, dm = 0.0f;
        if (s <= t && dc.doc[s] == dc.doc[t]) {
          dm = __expf(dc.cs[t] - dc.cs[s]);
          for (int64_t k = 0; k < n; ++k) cb += Cs[t * ld + k] * Bs[s * ld + k];
        }
        Dm[t][s] = dm;
        Lm[t][s] = cb * dm;
        float v = 0.0f;
        for (int64_t k = 0; k < n; ++k) v += Cs[ti * ld + k] * Sp[tj * ld + k];
        CS[ti][tj] = v;
        Xs[ti][tj] = dc.dt[ti] * X[ti][tj];
      }
      __syncthreads();

      // 3. (t, r): y (for the gate), dz, dY, dD.
      {
        const int64_t t = t0 + ti;
        float go = 0.0f;
        if (t < l && tj_ok) {
          go = to_float(dout[t * xstride_t + tj]);
          if (z) {
            float y = dc.e[ti] * CS[ti][tj];
            for (int s = 0; s <= ti; ++s) y += Lm[ti][s] * Xs[s][tj];
            if (p.D) y += p.D[h * P + p0 + tj] * X[ti][tj];
            const float zv = to_float(z[t * xstride_t + tj]);
            dz[t * xstride_t + tj] = from_float<T>(go * y * silu_grad(zv));
            go *= silu(zv);
          }
        }
        dY[ti][tj] = go;
        dD_acc += X[ti][tj] * go;
      }
      __syncthreads();

      // 4. (s, r): BdS = B_s . dS[r];  (t, s): dG = (dY Xs^T) o Dm and TL = (dY Xs^T) o Lm.
      {
        float v = 0.0f;
        for (int64_t k = 0; k < n; ++k) v += Bs[ti * ld + k] * dS[tj * ld + k];
        BdS[ti][tj] = v;
        float gl = 0.0f;
        for (int r = 0; r < kRows; ++r) gl += dY[ti][r] * Xs[tj][r];
        dG[ti][tj] = gl * Dm[ti][tj];
        TL[ti][tj] = gl * Lm[ti][tj];
      }
      __syncthreads();

      // 5. dC, dB (token, state) partial sums over this block's channels; dXs and dx; <dS, S_prev>.
      {
        const int64_t slot = ((tile * p.batch + b) * lw - tw0) * p.nheads;  // + (t * nheads + h) * n + k
        for (int64_t i = tid; i < kChunk * n; i += kThreads) {
          const int s = int(i / n);
          const int64_t k = i % n, t = t0 + s;
          if (t >= l) continue;
          float dc_v = 0.0f, dsp = 0.0f, db_v = 0.0f, dsn = 0.0f;
          for (int r = 0; r < kRows; ++r) {
            dsp += dY[s][r] * Sp[r * ld + k];
            dsn += Xs[s][r] * dS[r * ld + k];
          }
          for (int u = 0; u < kChunk; ++u) {
            dc_v += dG[s][u] * Bs[u * ld + k];
            db_v += dG[u][s] * Cs[u * ld + k];
          }
          const int64_t o = (slot + t * p.nheads + h) * n + k;
          p.dC_partial[o] = dc.e[s] * dsp + dc_v;
          p.dB_partial[o] = dc.w[s] * dsn + db_v;
        }
        const int s = ti, r = tj;
        float v = dc.w[s] * BdS[s][r];
        for (int t = s; t < kChunk; ++t) v += Lm[t][s] * dY[t][r];
        dXs[s][r] = v;
        if (t0 + s < l && tj_ok)
          dx[(t0 + s) * xstride_t + r] = from_float<T>(dc.dt[s] * v + (p.D ? p.D[h * P + p0 + r] * dY[s][r] : 0.0f));
      }
      float de_last = 0.0f;
      for (int64_t i = tid; i < rows_n; i += kThreads) de_last += dS[sm(i)] * Sp[sm(i)];
      de_last = block_reduce<false>(de_last, scratch);  // (its barriers also publish dXs)

      // 6. Warp 0, lane t: dcs, da (reverse cumsum), ddt' and dA shares. Everyone: dS <- dS_prev.
      if (tid < 32) {
        const int t = tid;
        float dcs = 0.0f, wdw = 0.0f;
        if (t < kChunk) {
          float de = 0.0f, dw = 0.0f;
          for (int r = 0; r < kRows; ++r) {
            de += dY[t][r] * CS[t][r];
            dw += Xs[t][r] * BdS[t][r];
          }
          for (int u = 0; u < kChunk; ++u) dcs += TL[t][u] - TL[u][t];
          wdw = dc.w[t] * dw;
          dcs += dc.e[t] * de - wdw;
        }
        wdw = warp_sum(wdw);
        if (t == kChunk - 1) dcs += wdw + dc.e[kChunk - 1] * de_last;
        float da = dcs;  // da_t = sum_{u >= t} dcs_u
        for (int o = 1; o < kChunk; o <<= 1) {
          const float v = __shfl_down_sync(kFullMask, da, o, kChunk);
          if ((t % kChunk) + o < kChunk) da += v;
        }
        if (t < kChunk && t0 + t < l) {
          float ddtp = A * da;
          for (int r = 0; r < kRows; ++r) ddtp += X[t][r] * dXs[t][r];
          p.ddt_partial[((tile * p.batch + b) * l + t0 + t) * p.nheads + h] = ddtp;
          dA_acc += dc.dt[t] * da;
        }
      }
      const float e_last = dc.e[kChunk - 1];
      for (int64_t i = tid; i < rows_n; i += kThreads) {
        const int64_t r = i / n, k = i % n;
        float v = e_last * dS[r * ld + k];
        for (int t = 0; t < kChunk; ++t) v += dc.e[t] * dY[t][r] * Cs[t * ld + k];
        dS[r * ld + k] = v;
      }
      __syncthreads();  // the next chunk overwrites the staged tiles
    }
  }

  // dS entering the window: to the next window, or dinitial_states at chunk 0. dD and dA partial sums,
  // added to those of the windows before (this block's own slots; zeroed by the caller).
  if (win.seg_lo > 0) save_state(dS_slot, dS);
  else if (p.dinitial_states)
    for (int64_t i = tid; i < rows_n; i += kThreads)
      if (row_ok(i)) p.dinitial_states[(bh * P + p0) * n + i] = dS[sm(i)];
  dY[ti][tj] = dD_acc;
  if (tid < 32) {
    dA_acc = warp_sum(dA_acc);
    if (tid == 0) p.dA_partial[bh * ntiles + tile] += dA_acc;
  }
  __syncthreads();
  if (p.dD_partial && tid < kRows && p0 + tid < P) {
    float v = 0.0f;
    for (int t = 0; t < kChunk; ++t) v += dY[t][tid];
    p.dD_partial[bh * P + p0 + tid] += v;
  }
}

// dB, dC (b, l, g, n) of tokens [t0, t0 + len) = the chunk kernel's slots (of the window starting at t0)
// summed over row tiles and the heads of each group.
__global__ void __launch_bounds__(256)
    selective_scan_bwd_reduce_bc_kernel(SelectiveScanBwdParams p, int64_t ntiles, int64_t t0, int64_t len) {
  const int64_t n = p.dstate, hpg = p.nheads / p.ngroups, total = p.batch * len * p.ngroups * n;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % n, g = (i / n) % p.ngroups, t = (i / (n * p.ngroups)) % len, b = i / (n * p.ngroups * len);
    float db = 0.0f, dcv = 0.0f;
    for (int64_t tile = 0; tile < ntiles; ++tile)
      for (int64_t hh = g * hpg; hh < (g + 1) * hpg; ++hh) {
        const int64_t o = (((tile * p.batch + b) * p.window_tokens + t) * p.nheads + hh) * n + k;
        db += p.dB_partial[o];
        dcv += p.dC_partial[o];
      }
    const int64_t out = ((b * p.seqlen + t0 + t) * p.ngroups + g) * n + k;
    p.dB[out] = db;
    p.dC[out] = dcv;
  }
}

// ddt (b, l, h): ddt' summed over row tiles, back through the clamp and the softplus.
__global__ void __launch_bounds__(256) selective_scan_bwd_reduce_dt_kernel(SelectiveScanBwdParams p, int64_t ntiles) {
  const int64_t total = p.batch * p.seqlen * p.nheads;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = i % p.nheads;
    float g = 0.0f;
    for (int64_t tile = 0; tile < ntiles; ++tile) g += p.ddt_partial[tile * total + i];
    const float raw = p.dt[i] + (p.dt_bias ? p.dt_bias[h] : 0.0f);
    if (p.dt_clamp) {
      const float v = p.dt_softplus ? softplus(raw) : raw;
      if (v < p.dt_min || v > p.dt_max) g = 0.0f;
    }
    if (p.dt_softplus && raw <= 20.0f) g *= 1.0f / (1.0f + __expf(-raw));
    p.ddt[i] = g;
  }
}

}  // namespace

int64_t& selective_scan_bwd_partial_budget() {
  static int64_t floats = int64_t(1) << 25;  // 128 MiB of dB, dC slots
  return floats;
}

int64_t selective_scan_bwd_row_tiles(const SelectiveScanBwdParams& p) { return ceil_div(p.dim, kRows); }
int64_t selective_scan_bwd_state_slots(const SelectiveScanBwdParams& p) {
  const int64_t nchunks = ceil_div(p.seqlen, kChunk), k = segment_chunks(nchunks);
  return ceil_div(nchunks, k) + k + 1;
}
int64_t selective_scan_bwd_window_tokens(const SelectiveScanBwdParams& p) {
  const int64_t nchunks = ceil_div(p.seqlen, kChunk), k = segment_chunks(nchunks);
  const int64_t per_segment = 2 * selective_scan_bwd_row_tiles(p) * p.batch * k * kChunk * p.nheads * p.dstate;
  const int64_t segments = per_segment > 0 ? selective_scan_bwd_partial_budget() / per_segment : 1;
  const int64_t tokens = (segments > 1 ? segments : 1) * k * kChunk;
  return tokens < p.seqlen ? tokens : p.seqlen;
}

const char* launch_selective_scan_bwd(const SelectiveScanBwdParams& p, void* stream) {
  if (p.dstate > kScanMaxDState) return "selective_scan_bwd: d_state above 256";
  if (p.window_tokens != selective_scan_bwd_window_tokens(p)) return "selective_scan_bwd: bad window_tokens";
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t ntiles = selective_scan_bwd_row_tiles(p);
  const int64_t nchunks = ceil_div(p.seqlen, kChunk), K = segment_chunks(nchunks), ncheck = ceil_div(nchunks, K);
  const int64_t window_segments = ceil_div(p.window_tokens, K * kChunk);
  const dim3 grid(unsigned(ntiles), unsigned(p.nheads), unsigned(p.batch));
  const size_t smem = sizeof(float) * size_t(2 * kChunk + 2 * kRows) * size_t(p.dstate + 1);
  auto chunk_kernel = [&](Window win) {
    return dispatch_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      return launch(selective_scan_bwd_chunk_kernel<T>, grid, dim3(kThreads), smem, s, p, win);
    });
  };
  auto blocks = [](int64_t total) {  // grid-stride loops over total elements
    const int64_t n = ceil_div(total, 256);
    return dim3(unsigned(n < 65535 ? n : 65535));
  };
  const char* err = chunk_kernel(Window{0, 0});  // pass 1
  // Pass 2, window by window from the last (aligned to window_segments from the first segment).
  for (int64_t lo = (ncheck - 1) / window_segments * window_segments; !err && lo >= 0; lo -= window_segments) {
    const int64_t hi = lo + window_segments < ncheck ? lo + window_segments : ncheck;
    const int64_t t0 = lo * K * kChunk, t1 = hi * K * kChunk < p.seqlen ? hi * K * kChunk : p.seqlen;
    err = chunk_kernel(Window{lo, hi});
    if (!err)
      err = launch(selective_scan_bwd_reduce_bc_kernel, blocks(p.batch * (t1 - t0) * p.ngroups * p.dstate), dim3(256),
                   0, s, p, ntiles, t0, t1 - t0);
  }
  if (err) return err;
  return launch(selective_scan_bwd_reduce_dt_kernel, blocks(p.batch * p.seqlen * p.nheads), dim3(256), 0, s, p,
                ntiles);
}

}  // namespace h1r::cuda
