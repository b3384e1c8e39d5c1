// A probe, not the shipped kernel: a bf16 prefill (many tokens) micro-kernel for the packed hybrid format,
// written to find out whether the (0.35, 0.45, 0.20) recipe can beat oneDNN's dense bf16 GEMM on this CPU.
// Driven by benchmarks/bf16_prefill_probe.py (built with torch.utils.cpp_extension, -march=native).
//
// prefill(x, packed, out, K, panel, mode, CB, super_tokens): tokens in the lanes (tiles of 32 tokens, two
// zmm vectors), x laid out once per call as x6 [in/4][6][32] bf16 pairs (the 6 possible kept pairs of each
// group of 4 inputs); DENSE blocks read its (0,1)/(2,3) pairs, NM blocks the pair each row keeps (one
// vdpbf16ps per kept pair: half the dot products of a DENSE block), TOPK entries the pair holding their input
// with the other half of the weight pair zero. Panels of `panel` block-rows per thread; `CB` blocks per
// column chunk (the tile's accumulators are stored and reloaded between chunks); `super_tokens` tokens per
// pass (x6 rebuilt per pass). `mode` bits: 1 DENSE, 2 NM, 4 TOPK, 8 run the row tiles (0: layouts only).
//
// dot_rates(iters): nanoseconds per zmm vdpbf16ps of the inner loops on L1-resident data.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>
#include <cstring>
#include <vector>
#include <algorithm>
#include <chrono>
#include <string>
#include <utility>

namespace {
constexpr int BS = 16;
constexpr int TT = 32;  // tokens per tile: two vectors
constexpr int NM_PAIR_COLS[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

struct Packed {
  const uint32_t* dv; const int32_t* dptr; const int32_t* dcols;
  const uint32_t* nv; const uint8_t* nidx; const int32_t* nptr; const int32_t* ncols;
  const uint16_t* tv; const uint8_t* tpos; const int32_t* tptr; const int32_t* tcols;
  int64_t out, in, K;
};

template <typename E>
struct Buf {
  E* p = nullptr; size_t cap = 0;
  ~Buf() { std::free(p); }
  E* get(size_t n) { size_t b = (n * sizeof(E) + 63) / 64 * 64; if (b > cap) { std::free(p); p = (E*)std::aligned_alloc(64, b); cap = b; } return p; }
};

struct TopkHalf { const int32_t* off; const uint32_t* w; int len; };  // [len][8]

// x6: [in/4][6][TT] u32 pairs of the tile; C out [16][TT] fp32
void row_tile(int mode, const Packed& p, int64_t r, const uint32_t* x6, const TopkHalf* th, const uint8_t* nmoff, int32_t nb0, float* C,
              int32_t d0, int32_t d1, int32_t m0, int32_t m1, bool first, bool last) {
  for (int h = 0; h < 2; ++h) {
    __m512 acc[8][2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      acc[i][0] = first ? _mm512_setzero_ps() : _mm512_load_ps(C + (h * 8 + i) * TT);
      acc[i][1] = first ? _mm512_setzero_ps() : _mm512_load_ps(C + (h * 8 + i) * TT + 16);
    }
    if (mode & 1)
    for (int32_t b = d0; b < d1; ++b) {
      const uint32_t* w = p.dv + int64_t(b) * 128 + h * 64;
      const uint32_t* xc = x6 + int64_t(p.dcols[b]) * 4 * 6 * TT;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const uint32_t* xk = xc + (k >> 1) * 6 * TT + ((k & 1) ? 5 : 0) * TT;
        const __m512bh xa = (__m512bh)_mm512_load_si512(xk), xb = (__m512bh)_mm512_load_si512(xk + 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(w[i * 8 + k]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wb, xa);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], wb, xb);
        }
      }
    }
    if (mode & 2)
    for (int32_t b = m0; b < m1; ++b) {
      const uint32_t* v = p.nv + int64_t(b) * 64 + h * 32;  // [row][group]
      const uint8_t* qoff = nmoff + int64_t(b - nb0) * 64 + h * 32;
      asm volatile("" ::: "memory");
      const uint32_t* xc = x6 + int64_t(p.ncols[b]) * 4 * 6 * TT;
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const uint32_t* xo = xc + int64_t(qoff[i * 4 + g]) * TT;
          const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(v[i * 4 + g]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wb, (__m512bh)_mm512_load_si512(xo));
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], wb, (__m512bh)_mm512_load_si512(xo + 16));
        }
      }
    }
    if ((mode & 4) && last) {
      const TopkHalf& t = th[h];
      for (int e = 0; e < t.len; ++e) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const uint32_t* xo = x6 + t.off[e * 8 + i];
          const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(t.w[e * 8 + i]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wb, (__m512bh)_mm512_load_si512(xo));
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], wb, (__m512bh)_mm512_load_si512(xo + 16));
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) { _mm512_store_ps(C + (h * 8 + i) * TT, acc[i][0]); _mm512_store_ps(C + (h * 8 + i) * TT + 16, acc[i][1]); }
  }
}

}  // namespace

at::Tensor prefill(const at::Tensor& x, std::vector<at::Tensor> t, int64_t out, int64_t K, int64_t panel, int64_t mode, int64_t CB, int64_t super_tokens) {
  const int64_t n_all = x.size(0), in = x.size(1), R = out / BS;
  Packed p{(const uint32_t*)t[0].data_ptr(), t[1].data_ptr<int32_t>(), t[2].data_ptr<int32_t>(),
           (const uint32_t*)t[3].data_ptr(), t[4].data_ptr<uint8_t>(), t[5].data_ptr<int32_t>(), t[6].data_ptr<int32_t>(),
           (const uint16_t*)t[7].data_ptr(), t[8].data_ptr<uint8_t>(), t[9].data_ptr<int32_t>(), t[10].data_ptr<int32_t>(), out, in, K};
  const uint16_t* xs_all = (const uint16_t*)x.data_ptr();
  at::Tensor y = at::empty({n_all, out}, x.options());
  uint16_t* ys_all = (uint16_t*)y.data_ptr();
  const int64_t S = super_tokens;
  for (int64_t s0 = 0; s0 < n_all; s0 += S) {
  const int64_t n = std::min<int64_t>(S, n_all - s0);
  const uint16_t* xs = xs_all + s0 * in;
  uint16_t* ys = ys_all + s0 * out;
  [&]() {
  const int64_t tiles = (n + TT - 1) / TT;
  static Buf<uint32_t> x6b;
  const int64_t tile_elems = in / 4 * 6 * TT;
  uint32_t* x6 = x6b.get(tiles * tile_elems);
  at::parallel_for(0, tiles * 2 * (in / 4), 256, [&](int64_t a, int64_t b) {
    const int* base = reinterpret_cast<const int*>(xs);
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15), _mm512_set1_epi32(int(in / 2)));
    for (int64_t k = a; k < b; ++k) {
      const int64_t th = k / (in / 4), g = k % (in / 4), ti = th / 2, hh = th % 2;
      const int64_t t0 = ti * TT + hh * 16;
      const int64_t live_n = std::max<int64_t>(0, std::min<int64_t>(16, n - t0));
      const __mmask16 live = __mmask16((1u << live_n) - 1);
      const __m512i rows = _mm512_add_epi32(lane, _mm512_set1_epi32(int(t0 * (in / 2) + 2 * g)));
      const __m512i av = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, base, 4);
      const __m512i bv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, _mm512_add_epi32(rows, _mm512_set1_epi32(1)), base, 4);
      const __m512i a1 = _mm512_srli_epi32(av, 16), b2 = _mm512_slli_epi32(bv, 16);
      const __mmask32 hi = __mmask32(0xAAAAAAAAu);
      uint32_t* q = x6 + ti * tile_elems + g * 6 * TT + hh * 16;
      _mm512_store_si512(q, av);
      _mm512_store_si512(q + TT, _mm512_mask_blend_epi16(hi, av, b2));
      _mm512_store_si512(q + 2 * TT, _mm512_mask_blend_epi16(hi, av, bv));
      _mm512_store_si512(q + 3 * TT, _mm512_mask_blend_epi16(hi, a1, b2));
      _mm512_store_si512(q + 4 * TT, _mm512_mask_blend_epi16(hi, a1, bv));
      _mm512_store_si512(q + 5 * TT, bv);
    }
  });
  if (!(mode & 8)) return;
  const int64_t panels = (R + panel - 1) / panel;
  at::parallel_for(0, panels, 1, [&](int64_t pa, int64_t pb) {
    static thread_local Buf<int32_t> ob; static thread_local Buf<uint32_t> wb; static thread_local Buf<uint8_t> qb;
    static thread_local Buf<float> cb;
    for (int64_t pi = pa; pi < pb; ++pi) {
      const int64_t r0 = pi * panel, r1 = std::min(R, r0 + panel);
      // TOPK lists per (block-row, half): [len][8] padded
      std::vector<TopkHalf> th(size_t(r1 - r0) * 2);
      const int64_t ntk = (p.tptr[r1] - p.tptr[r0]) * K;
      int32_t* offs = ob.get(ntk * 8 + 64 * (r1 - r0));
      uint32_t* ws = wb.get(ntk * 8 + 64 * (r1 - r0));
      int64_t used = 0;
      for (int64_t r = r0; r < r1; ++r) {
        int cnt[BS] = {};
        for (int32_t b = p.tptr[r]; b < p.tptr[r + 1]; ++b)
          for (int64_t k = 0; k < K; ++k) if (p.tv[int64_t(b) * K + k]) ++cnt[p.tpos[int64_t(b) * K + k] >> 4];
        for (int h = 0; h < 2; ++h) {
          int len = 0;
          for (int i = 0; i < 8; ++i) len = std::max(len, cnt[h * 8 + i]);
          TopkHalf& t = th[(r - r0) * 2 + h];
          t.off = offs + used; t.w = ws + used; t.len = len;
          std::memset(offs + used, 0, sizeof(int32_t) * len * 8);
          std::memset(ws + used, 0, sizeof(uint32_t) * len * 8);
          used += int64_t(len) * 8;
        }
        int fill[BS] = {};
        for (int32_t b = p.tptr[r]; b < p.tptr[r + 1]; ++b)
          for (int64_t k = 0; k < K; ++k) {
            const uint16_t v = p.tv[int64_t(b) * K + k];
            if (!v) continue;
            const int ps = p.tpos[int64_t(b) * K + k], i = ps >> 4;
            const int64_t c = int64_t(p.tcols[b]) * 16 + (ps & 15);
            const int64_t g = c / 4; const int pp = int(c % 4);
            TopkHalf& t = th[(r - r0) * 2 + i / 8];
            const int e = fill[i]++;
            const_cast<int32_t*>(t.off)[e * 8 + i % 8] = int32_t((g * 6 + (pp < 2 ? 0 : 5)) * TT);
            const_cast<uint32_t*>(t.w)[e * 8 + i % 8] = (pp & 1) ? uint32_t(v) << 16 : uint32_t(v);
          }
      }
      const int32_t nb0 = p.nptr[r0], nb1 = p.nptr[r1];
      uint8_t* nmoff = qb.get(int64_t(nb1 - nb0) * 64);
      {
        alignas(16) int8_t lut[16];
        for (int c = 0; c < 16; ++c) {
          lut[c] = 0;
          for (int s = 0; s < 6; ++s) if ((NM_PAIR_COLS[s][0] | (NM_PAIR_COLS[s][1] << 2)) == c) lut[c] = int8_t(s);
        }
        const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lut)));
        alignas(64) uint8_t gadd[64];
        for (int j = 0; j < 64; ++j) gadd[j] = uint8_t((j % 4) * 6);
        const __m512i ga = _mm512_load_si512(gadd);
        for (int32_t b = nb0; b < nb1; ++b) {
          const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.nidx + int64_t(b) * 32)));
          const __m512i codes = _mm512_or_si512(_mm512_and_si512(z, _mm512_set1_epi16(0x000F)),
                                                _mm512_and_si512(_mm512_slli_epi16(z, 4), _mm512_set1_epi16(0x0F00)));
          _mm512_store_si512(nmoff + int64_t(b - nb0) * 64, _mm512_add_epi8(_mm512_shuffle_epi8(table, codes), ga));
        }
      }
      const int64_t nch = (in / BS + CB - 1) / CB;
      std::vector<int32_t> dbound((r1 - r0) * (nch + 1)), mbound((r1 - r0) * (nch + 1));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c <= nch; ++c) {
          const int32_t lim = int32_t(std::min<int64_t>(c * CB, in / BS));
          dbound[(r - r0) * (nch + 1) + c] = int32_t(std::lower_bound(p.dcols + p.dptr[r], p.dcols + p.dptr[r + 1], lim) - p.dcols);
          mbound[(r - r0) * (nch + 1) + c] = int32_t(std::lower_bound(p.ncols + p.nptr[r], p.ncols + p.nptr[r + 1], lim) - p.ncols);
        }
      float* Cs = cb.get((r1 - r0) * BS * TT);
      for (int64_t ti = 0; ti < tiles; ++ti) {
        const int nt = int(std::min<int64_t>(TT, n - ti * TT));
        for (int64_t c = 0; c < nch; ++c)
        for (int64_t r = r0; r < r1; ++r) {
          const int32_t* db = dbound.data() + (r - r0) * (nch + 1);
          const int32_t* mb = mbound.data() + (r - r0) * (nch + 1);
          float* Cr = Cs + (r - r0) * BS * TT;
          row_tile(int(mode), p, r, x6 + ti * tile_elems, th.data() + (r - r0) * 2, nmoff, nb0, Cr, db[c], db[c + 1], mb[c], mb[c + 1], c == 0, c == nch - 1);
          if (c != nch - 1) continue;
          const float* C = Cr;
          const __m512i rowsidx = _mm512_mullo_epi32(_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15), _mm512_set1_epi32(TT));
          for (int tt = 0; tt < nt; ++tt) {
            const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(rowsidx, _mm512_set1_epi32(tt)), C, 4);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(ys + (ti * TT + tt) * out + r * BS), (__m256i)_mm512_cvtneps_pbh(v));
          }
        }
      }
    }
  });
  }();
  }
  return y;
}



namespace {
alignas(64) static uint32_t X[24 * 32 * 16];  // the loops read its first 3 KB: L1-resident
alignas(64) static uint32_t W[4096];
alignas(64) static uint8_t OFF[4096];
alignas(64) static int32_t OFF32[4096];
// the sum of the 8 rows x 2 token vectors of accumulators (returned, so the loops are not optimised away)
inline float total(const __m512 (&acc)[8][2]) {
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) s = _mm512_add_ps(s, _mm512_add_ps(acc[i][0], acc[i][1]));
  return _mm512_reduce_add_ps(s);
}
template <int MODE>
__attribute__((noinline)) float run(int iters) {
  __m512 acc[8][2];
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int it = 0; it < iters; ++it) {
    const uint32_t* w = W + (it & 63) * 32;
    const uint8_t* o = OFF + (it & 63) * 32;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const uint32_t* xo;
        if (MODE == 0) xo = X + int(o[i * 4 + g]) * 32;      // data-dependent
        else if (MODE == 3) xo = reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(X) + OFF32[(it & 63) * 32 + i * 4 + g]);
        else xo = X + ((i * 4 + g) % 24) * 32;  // MODE 1: fixed
        const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(w[i * 4 + g]));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wb, (__m512bh)_mm512_load_si512(xo));
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], wb, (__m512bh)_mm512_load_si512(xo + 16));
      }
    }
  }
  return total(acc);
}
// dense-like: x vectors in registers, shared
__attribute__((noinline)) float run_dense(int iters) {
  __m512 acc[8][2];
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int it = 0; it < iters; ++it) {
    const uint32_t* w = W + (it & 63) * 32;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512bh xa = (__m512bh)_mm512_load_si512(X + g * 32), xb = (__m512bh)_mm512_load_si512(X + g * 32 + 16);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(w[i * 4 + g]));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wb, xa);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], wb, xb);
      }
    }
  }
  return total(acc);
}
// ymm version of MODE 0 with 4 token vectors of 8
__attribute__((noinline)) float run_ymm(int iters) {
  __m256 acc[8][4];
  for (int i = 0; i < 8; ++i) for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int it = 0; it < iters; ++it) {
    const uint32_t* w = W + (it & 63) * 32;
    const uint8_t* o = OFF + (it & 63) * 32;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const uint32_t* xo = X + int(o[i * 4 + g]) * 32;
        const __m256bh wb = (__m256bh)_mm256_set1_epi32(int(w[i * 4 + g]));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_dpbf16_ps(acc[i][j], wb, (__m256bh)_mm256_load_si256((const __m256i*)(xo + 8 * j)));
      }
    }
  }
  __m256 s = _mm256_setzero_ps();
  for (int i = 0; i < 8; ++i) for (int j = 0; j < 4; ++j) s = _mm256_add_ps(s, acc[i][j]);
  float r[8]; _mm256_storeu_ps(r, s); return r[0];
}
__attribute__((noinline)) float run_shuf(int iters) {
  __m512 acc[24];
  for (int t = 0; t < 24; ++t) acc[t] = _mm512_setzero_ps();
  for (int it = 0; it < iters; ++it) {
    const __m512i* w = reinterpret_cast<const __m512i*>(W) + (it & 15) * 8;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512i w0 = _mm512_load_si512(w + 4 * h), i0 = _mm512_load_si512(w + 4 * h + 1);
      const __m512i w1 = _mm512_load_si512(w + 4 * h + 2), i1 = _mm512_load_si512(w + 4 * h + 3);
      const char* xh = reinterpret_cast<const char*>(X) + h * 24 * 16;
#pragma GCC unroll 24
      for (int t = 0; t < 24; ++t) {
        const __m512i xv = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(xh + t * 16)));
        acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)w0, (__m512bh)_mm512_shuffle_epi8(xv, i0));
        acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)w1, (__m512bh)_mm512_shuffle_epi8(xv, i1));
      }
    }
  }
  __m512 s = _mm512_setzero_ps();
  for (int t = 0; t < 24; ++t) s = _mm512_add_ps(s, acc[t]);
  return _mm512_reduce_add_ps(s);
}
__attribute__((noinline)) float run_rowsdense(int iters) {
  __m512 acc[24];
  for (int t = 0; t < 24; ++t) acc[t] = _mm512_setzero_ps();
  for (int it = 0; it < iters; ++it) {
    const __m512i* w = reinterpret_cast<const __m512i*>(W) + (it & 15) * 8;
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512i wk = _mm512_load_si512(w + k);
      const char* xk = reinterpret_cast<const char*>(X) + k * 4;
#pragma GCC unroll 24
      for (int t = 0; t < 24; ++t) acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)wk, (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int*>(xk + t * 16)));
    }
  }
  __m512 s = _mm512_setzero_ps();
  for (int t = 0; t < 24; ++t) s = _mm512_add_ps(s, acc[t]);
  return _mm512_reduce_add_ps(s);
}

template <typename F>
double ns_per_dp(F f, int iters, int dps_per_iter) {
  f(1000);
  auto t0 = std::chrono::steady_clock::now();
  volatile float r = f(iters);
  auto t1 = std::chrono::steady_clock::now();
  (void)r;
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(iters) * dps_per_iter);
}
}  // namespace

std::vector<std::pair<std::string, double>> dot_rates(int64_t iters) {
  for (int i = 0; i < 4096; ++i) { OFF[i] = uint8_t((i * 7) % 24); OFF32[i] = OFF[i] * 128; W[i] = 0x3f803f80u; }
  for (auto& v : X) v = 0x3f803f80u;
  const int it = int(iters);
  return {
      {"tokens-dense (x pair vectors in registers, weight broadcast)", ns_per_dp(run_dense, it, 64)},
      {"tokens-nm (x6 vector at a per-row offset read from a table)", ns_per_dp(run<0>, it, 64)},
      {"tokens-nm, 32-bit byte offsets", ns_per_dp(run<3>, it, 64)},
      {"tokens-nm, offsets known at compile time", ns_per_dp(run<1>, it, 64)},
      {"tokens-nm ymm (4 vectors of 8 tokens)", ns_per_dp(run_ymm, it, 64)},
      {"rows-dense (rows in the lanes, x pair broadcast)", ns_per_dp(run_rowsdense, it, 96)},
      {"rows-nm (rows in the lanes, vpshufb of 8 broadcast inputs)", ns_per_dp(run_shuf, it, 96)},
  };
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefill", &prefill);
  m.def("dot_rates", &dot_rates);
}
