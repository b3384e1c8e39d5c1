// CPU kernels for the packed hybrid format (see src/hf_hybrid_sparse/kernels/packing.py).
//
// One op, hf_hybrid_sparse::hybrid_linear(x [N, in], packed tensors..., bias?) -> y [N, out]:
//   * 1 token: "row-vectorised" -- the 16 inputs of a block column sit in one register; DENSE blocks
//     accumulate each of their 16 rows, NM blocks gather their kept inputs with a permute driven by the
//     2-bit positions (two rows per register), TOPK blocks add their K products by position.
//   * 2..16 tokens: per tier the method measured fastest (see decode_multi): "rows" as for one token with
//     several tokens per pass, or "tokens" -- the tokens sit in the lanes (x laid out once per call), every
//     kept weight is broadcast and multiplied with the tokens of its input column. bf16 NM at 5..16 tokens
//     reads x laid out for the 6 possible kept pairs of each group of 4 (no permute).
//   * more tokens (prefill), fp32 and bf16 with AVX-512: a block-sparse GEMM over tiles of 16 tokens that
//     skips the TOPK blocks' dense work (see prefill_tiles); fp16, the portable build and the layers where the
//     tiles measured slower: panels of block-rows (at least 1024 rows, see PanelSize) unpacked into a reused
//     buffer that feeds the BLAS GEMM (at::mm). No layer keeps a dense copy.
// Each packed byte is read once (prefetched a few blocks ahead for 2..16 tokens); accumulation is in fp32 for every dtype
// (fp32, bf16, fp16 weights and activations of the same dtype). Decode work is split over threads by bytes,
// not by block-rows. Loops over an array of accumulator registers are unrolled everywhere: GCC otherwise
// keeps the array addressable and stores every accumulator after each product.
// Compiled with -march=native: AVX-512 where the CPU has it, portable loops otherwise.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define HS_AVX512 1
#else
#define HS_AVX512 0
#endif

namespace {

constexpr int BS = 16;          // block side
constexpr int NM_VALS = 8;      // kept values per NM block row (2 of every 4 of 16)
constexpr int NM_IDX_BYTES = 2; // 8 two-bit positions per NM block row

// The kept pair of a group of 4 is one of 6 (canonical packing: two distinct ascending positions).
constexpr int NM_PAIR_COLS[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
// Its index from the group's 4 bits of positions (first position in bits 0-1, second in bits 2-3); -1 for
// codes that are no such pair.
struct PairOfCode {
  int8_t of[16];
};
constexpr PairOfCode nm_pair_of_code() {
  PairOfCode t{};
  for (int c = 0; c < 16; ++c) t.of[c] = -1;
  for (int q = 0; q < 6; ++q) t.of[NM_PAIR_COLS[q][0] | (NM_PAIR_COLS[q][1] << 2)] = int8_t(q);
  return t;
}
constexpr PairOfCode NM_PAIR_OF_CODE = nm_pair_of_code();

// Software prefetch of the packed bytes PREFETCH_BLOCKS blocks ahead: with the cores busy on the products, the
// hardware prefetcher alone left memory and compute mostly serial (measured 1.1-1.25x on 4096x4096 bf16 layers
// at 8-16 tokens). The 1-token path has none: it measured no gain on large layers and a loss on small ones
// (benchmarks/kernel_ab.py). Prefetching past the end of an array is harmless.
constexpr int PREFETCH_BLOCKS = 4;
template <int BYTES>
inline void prefetch(const void* p) {
#pragma GCC unroll 8
  for (int o = 0; o < BYTES; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3);
}

// -- element types ---------------------------------------------------------------------------------
template <typename T> inline float to_f(T v);
template <> inline float to_f<float>(float v) { return v; }
template <> inline float to_f<c10::BFloat16>(c10::BFloat16 v) { return static_cast<float>(v); }
template <> inline float to_f<c10::Half>(c10::Half v) { return static_cast<float>(v); }

#if HS_AVX512
// 16 consecutive elements as fp32 lanes
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// the lanes of m only (others 0.0); a masked load does not touch the memory of lanes it leaves out
template <typename T> inline __m512 load16_masked(const T* p, __mmask16 m);
template <> inline __m512 load16_masked<float>(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <> inline __m512 load16_masked<c10::BFloat16>(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
template <> inline __m512 load16_masked<c10::Half>(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

struct Packed {
  const void* dense_vals;
  const int32_t* dense_ptr;
  const int32_t* dense_cols;
  const void* nm_vals;
  const uint8_t* nm_idx;
  const int32_t* nm_ptr;
  const int32_t* nm_cols;
  const void* topk_vals;
  const uint8_t* topk_pos;
  const int32_t* topk_ptr;
  const int32_t* topk_cols;
  int64_t out, in, topk;
};

// Byte-balanced split of the block-rows into `parts` contiguous ranges.
std::vector<int64_t> split_rows(const Packed& p, int64_t elem, int parts) {
  const int64_t R = p.out / BS;
  std::vector<double> prefix(R + 1, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t nd = p.dense_ptr[r + 1] - p.dense_ptr[r];
    const int64_t nn = p.nm_ptr[r + 1] - p.nm_ptr[r];
    const int64_t nt = p.topk_ptr[r + 1] - p.topk_ptr[r];
    prefix[r + 1] = prefix[r] + nd * (256 * elem + 4) + nn * (128 * elem + 36) + nt * (p.topk * (elem + 1) + 4) + 64;
  }
  std::vector<int64_t> bounds(parts + 1, R);
  bounds[0] = 0;
  int64_t r = 0;
  for (int k = 1; k < parts; ++k) {
    const double goal = prefix[R] * k / parts;
    while (r < R && prefix[r] < goal) ++r;
    bounds[k] = r;
  }
  return bounds;
}

// `passes`: how many times the body reads the weight (prefill: once per tile of tokens).
template <typename F>
void parallel_rows(const Packed& p, int64_t elem, F&& body, int64_t passes = 1) {
  // a thread per ~64 KiB of packed weight read at least: waking threads costs more than small layers take
  const int64_t bytes = (int64_t(p.dense_ptr[p.out / BS]) * 256 * elem + int64_t(p.nm_ptr[p.out / BS]) * 128 * elem) * passes;
  const int threads = std::max(1, at::get_num_threads());
  const int parts = static_cast<int>(std::min<int64_t>({int64_t(threads), p.out / BS, std::max<int64_t>(1, bytes >> 16)}));
  if (parts <= 1) {
    body(0, p.out / BS);
    return;
  }
  const auto bounds = split_rows(p, elem, parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) body(bounds[k], bounds[k + 1]);
  });
}

// -- 1 token ----------------------------------------------------------------------------------------
template <typename T>
void decode_one(const Packed& p, const float* x, float* y) {
  const T* dv = static_cast<const T*>(p.dense_vals);
  const T* nv = static_cast<const T*>(p.nm_vals);
  const T* tv = static_cast<const T*>(p.topk_vals);
  const int64_t K = p.topk;
  parallel_rows(p, sizeof(T), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float out[BS];
#if HS_AVX512
      {  // DENSE: one accumulator per row, lanes = the 16 inputs of a block column
        __m512 acc[BS];
        for (int i = 0; i < BS; ++i) acc[i] = _mm512_setzero_ps();
        for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
          const __m512 xv = _mm512_loadu_ps(x + int64_t(p.dense_cols[b]) * BS);
          const T* w = dv + int64_t(b) * 256;
#pragma GCC unroll 16
          for (int i = 0; i < BS; ++i) acc[i] = _mm512_fmadd_ps(load16(w + i * BS), xv, acc[i]);
        }
        // TOPK into the same accumulators, 16 kept entries per step: their products in the lanes, each
        // added to its row's accumulator under a compare mask (the scalar loop through memory measured
        // ~1 ns per entry)
        const __m512i fifteen = _mm512_set1_epi32(15);
        for (int32_t b = p.topk_ptr[r]; b < p.topk_ptr[r + 1]; ++b) {
          const __m512 xv = _mm512_loadu_ps(x + int64_t(p.topk_cols[b]) * BS);
          const T* v = tv + int64_t(b) * K;
          const uint8_t* pos = p.topk_pos + int64_t(b) * K;
          for (int64_t e = 0; e < K; e += 16) {
            const __mmask16 live = K - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - e)) - 1);
            const __m512i at = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, pos + e));
            const __m512 prod =
                _mm512_mul_ps(load16_masked(v + e, live), _mm512_permutexvar_ps(_mm512_and_si512(at, fifteen), xv));
            const __m512i row = _mm512_srli_epi32(at, 4);
#pragma GCC unroll 16
            for (int i = 0; i < BS; ++i)
              acc[i] = _mm512_mask_add_ps(acc[i], _mm512_mask_cmpeq_epi32_mask(live, row, _mm512_set1_epi32(i)),
                                          acc[i], prod);
          }
        }
        for (int i = 0; i < BS; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
      }
      {  // NM: two rows per register; lane k = row (k / 8), kept value k % 8 at column 4 * (k % 8 / 2) + code
        const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
        const __m512i three = _mm512_set1_epi32(3);
        __m512 acc[BS / 2];
        for (int i = 0; i < BS / 2; ++i) acc[i] = _mm512_setzero_ps();
        for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
          const __m512 xv = _mm512_loadu_ps(x + int64_t(p.nm_cols[b]) * BS);
          const T* v = nv + int64_t(b) * (BS * NM_VALS);
          const uint8_t* id = p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES);
#pragma GCC unroll 8
          for (int q = 0; q < BS / 2; ++q) {
            uint32_t u;
            std::memcpy(&u, id + q * 4, 4);
            const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(u)), shifts), three);
            const __m512 xg = _mm512_permutexvar_ps(_mm512_add_epi32(code, base), xv);
            acc[q] = _mm512_fmadd_ps(load16(v + q * 16), xg, acc[q]);
          }
        }
        for (int q = 0; q < BS / 2; ++q) {
          out[2 * q] += hsum256(_mm512_castps512_ps256(acc[q]));
          out[2 * q + 1] += hsum256(_mm512_extractf32x8_ps(acc[q], 1));
        }
      }
#else
      for (int i = 0; i < BS; ++i) out[i] = 0.f;
      for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
        const float* xc = x + int64_t(p.dense_cols[b]) * BS;
        const T* w = dv + int64_t(b) * 256;
        for (int i = 0; i < BS; ++i) {
          float s = 0.f;
          for (int j = 0; j < BS; ++j) s += to_f(w[i * BS + j]) * xc[j];
          out[i] += s;
        }
      }
      for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
        const float* xc = x + int64_t(p.nm_cols[b]) * BS;
        const T* v = nv + int64_t(b) * (BS * NM_VALS);
        const uint8_t* id = p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES);
        for (int i = 0; i < BS; ++i) {
          float s = 0.f;
          for (int k = 0; k < NM_VALS; ++k) {
            const int code = (id[i * 2 + k / 4] >> (2 * (k % 4))) & 3;
            s += to_f(v[i * NM_VALS + k]) * xc[(k / 2) * 4 + code];
          }
          out[i] += s;
        }
      }
      if (K > 0) {  // TOPK: K products added to their rows; 4 partial sums break the dependency chains
        float part[4][BS] = {};
        for (int32_t b = p.topk_ptr[r]; b < p.topk_ptr[r + 1]; ++b) {
          const float* xc = x + int64_t(p.topk_cols[b]) * BS;
          const T* v = tv + int64_t(b) * K;
          const uint8_t* pos = p.topk_pos + int64_t(b) * K;
          for (int64_t e = 0; e < K; ++e) part[e & 3][pos[e] >> 4] += to_f(v[e]) * xc[pos[e] & 15];
        }
        for (int i = 0; i < BS; ++i) out[i] += (part[0][i] + part[1][i]) + (part[2][i] + part[3][i]);
      }
#endif
      std::memcpy(y + r * BS, out, sizeof(out));
    }
  });
}

// -- 2..16 tokens -----------------------------------------------------------------------------------
// One pass over each block-row; every tier uses the method measured fastest for its shape:
//   * "rows": as for one token, registers hold (rows x tokens) tiles whose lanes are the 16 inputs of a
//     block column; passes over the block-row's blocks cover all rows (its bytes come from memory once,
//     later passes find them in L2). NM rows gather their inputs with a permute driven by the positions.
//   * "tokens": the tokens sit in the lanes (x transposed once per call), every kept weight is broadcast.
//   * bf16 uses the AVX512-BF16 pair dot product (vdpbf16ps): two adjacent weights times their two inputs.
// Each tier adds into res[row][token] (fp32); TOPK products go through memory (their rows are data).
#if HS_AVX512
template <int L> struct Vec;
template <> struct Vec<16> {
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(float w, V x, V acc) { return _mm512_fmadd_ps(_mm512_set1_ps(w), x, acc); }
};
template <> struct Vec<8> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(float w, V x, V acc) { return _mm256_fmadd_ps(_mm256_set1_ps(w), x, acc); }
};
#endif

using Res = float[BS][16];  // [row][token]

#if HS_AVX512
// res[row][token] += the L token lanes of each row's accumulator (W: Vec<L>, or BfDot<L> for bf16); the loop
// is unrolled, as every loop over an accumulator array must be (see the file comment)
template <typename W, int L>
inline void add_token_lanes(const typename W::V (&acc)[BS], Res& res) {
  alignas(64) float lanes[16];
#pragma GCC unroll 16
  for (int i = 0; i < BS; ++i) {
    W::store(lanes, acc[i]);
    for (int t = 0; t < L; ++t) res[i][t] += lanes[t];
  }
}
#endif

// TOPK: xt [in][L] fp32; res[row][token] += ...
// A block's entries come sorted by position, so neighbours often share a row: each adds into one of 4 copies
// of the results in turn, which breaks the load-add-store chains through memory (measured 1.5x faster).
template <typename T, int L>
inline void topk_tokens(const Packed& p, int64_t r, const float* xt, Res& res) {
  const T* tv = static_cast<const T*>(p.topk_vals);
  const int64_t K = p.topk;
  const int32_t b0 = p.topk_ptr[r], b1 = p.topk_ptr[r + 1];
  if (b0 == b1 || K == 0) return;
  alignas(64) float part[4][BS][L] = {};
  for (int32_t b = b0; b < b1; ++b) {
    const float* xc = xt + int64_t(p.topk_cols[b]) * BS * L;
    const T* v = tv + int64_t(b) * K;
    const uint8_t* pos = p.topk_pos + int64_t(b) * K;
    for (int64_t e = 0; e < K; ++e) {
      float* dst = part[e & 3][pos[e] >> 4];
      const float* src = xc + (pos[e] & 15) * L;
#if HS_AVX512
      Vec<L>::store(dst, Vec<L>::fma(to_f(v[e]), Vec<L>::load(src), Vec<L>::load(dst)));
#else
      for (int t = 0; t < L; ++t) dst[t] += to_f(v[e]) * src[t];
#endif
    }
  }
  for (int i = 0; i < BS; ++i)
    for (int t = 0; t < L; ++t) res[i][t] += (part[0][i][t] + part[1][i][t]) + (part[2][i][t] + part[3][i][t]);
}

#if HS_AVX512
// DENSE, rows: x [NT][in] fp32
template <typename T, int NT>
inline void dense_rows(const Packed& p, int64_t r, const float* x, int64_t in, Res& res) {
  constexpr int R = NT <= 2 ? 8 : 4;
  const T* dv = static_cast<const T*>(p.dense_vals);
  for (int i0 = 0; i0 < BS; i0 += R) {
    __m512 acc[R][NT];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
    for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
      const int64_t c = int64_t(p.dense_cols[b]) * BS;
      const T* w = dv + int64_t(b) * 256 + i0 * BS;
      if (i0 == 0) prefetch<256 * sizeof(T)>(w + PREFETCH_BLOCKS * 256);
      __m512 xv[NT];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * in + c);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m512 wv = load16(w + i * BS);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) res[i0 + i][t] += _mm512_reduce_add_ps(acc[i][t]);
  }
}

// DENSE, tokens: xt [in][L] fp32
template <typename T, int L>
inline void dense_tokens(const Packed& p, int64_t r, const float* xt, Res& res) {
  using W = Vec<L>;
  const T* dv = static_cast<const T*>(p.dense_vals);
  alignas(64) float wbuf[256];
  typename W::V acc[BS];
#pragma GCC unroll 16
  for (int i = 0; i < BS; ++i) acc[i] = W::zero();
  for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
    const float* xc = xt + int64_t(p.dense_cols[b]) * BS * L;
    const T* w = dv + int64_t(b) * 256;
    prefetch<256 * sizeof(T)>(w + PREFETCH_BLOCKS * 256);
    const float* wf;
    if constexpr (std::is_same_v<T, float>) {
      wf = w;
    } else {
      for (int i = 0; i < BS; ++i) _mm512_store_ps(wbuf + i * BS, load16(w + i * BS));
      wf = wbuf;
    }
    for (int j = 0; j < BS; ++j) {
      const typename W::V xv = W::load(xc + j * L);
#pragma GCC unroll 16
      for (int i = 0; i < BS; ++i) acc[i] = W::fma(wf[i * BS + j], xv, acc[i]);
    }
  }
  add_token_lanes<W, L>(acc, res);
}

// NM, rows: pair q holds rows 2q (lanes 0-7) and 2q+1 (lanes 8-15); x [groups*TG][in] fp32
template <typename T, int TG>
inline void nm_rows(const Packed& p, int64_t r, int groups, const float* x, int64_t in, Res& res) {
  constexpr int P = TG <= 2 ? 8 : TG <= 4 ? 4 : 2;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  const __m512i three = _mm512_set1_epi32(3);
  const T* nv = static_cast<const T*>(p.nm_vals);
  for (int g = 0; g < groups; ++g) {
    const float* xg = x + int64_t(g) * TG * in;
    for (int q0 = 0; q0 < BS / 2; q0 += P) {
      __m512 acc[P][TG];
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) acc[q][t] = _mm512_setzero_ps();
      for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
        const int64_t c = int64_t(p.nm_cols[b]) * BS;
        const T* v = nv + int64_t(b) * (BS * NM_VALS) + q0 * 16;
        const uint8_t* id = p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES) + q0 * 4;
        if (g == 0 && q0 == 0) {
          prefetch<128 * sizeof(T)>(v + PREFETCH_BLOCKS * 128);
          prefetch<32>(id + PREFETCH_BLOCKS * 32);
        }
        __m512 xv[TG];
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) xv[t] = _mm512_loadu_ps(xg + t * in + c);
#pragma GCC unroll 8
        for (int q = 0; q < P; ++q) {
          uint32_t u;
          std::memcpy(&u, id + q * 4, 4);
          const __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(u)), shifts), three), base);
          const __m512 vv = load16(v + q * 16);
#pragma GCC unroll 8
          for (int t = 0; t < TG; ++t) acc[q][t] = _mm512_fmadd_ps(vv, _mm512_permutexvar_ps(idx, xv[t]), acc[q][t]);
        }
      }
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) {
          res[2 * (q0 + q)][g * TG + t] += hsum256(_mm512_castps512_ps256(acc[q][t]));
          res[2 * (q0 + q) + 1][g * TG + t] += hsum256(_mm512_extractf32x8_ps(acc[q][t], 1));
        }
    }
  }
}

// NM, tokens: xt [in][L] fp32
template <typename T, int L>
inline void nm_tokens(const Packed& p, int64_t r, const float* xt, Res& res) {
  using W = Vec<L>;
  const T* nv = static_cast<const T*>(p.nm_vals);
  alignas(64) float vbuf[128];
  typename W::V acc[BS];
#pragma GCC unroll 16
  for (int i = 0; i < BS; ++i) acc[i] = W::zero();
  for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
    const float* xc = xt + int64_t(p.nm_cols[b]) * BS * L;
    const T* v = nv + int64_t(b) * (BS * NM_VALS);
    const uint8_t* id = p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES);
    prefetch<128 * sizeof(T)>(v + PREFETCH_BLOCKS * 128);
    prefetch<32>(id + PREFETCH_BLOCKS * 32);
    const float* vf;
    if constexpr (std::is_same_v<T, float>) {
      vf = v;
    } else {
      for (int q = 0; q < BS / 2; ++q) _mm512_store_ps(vbuf + q * 16, load16(v + q * 16));
      vf = vbuf;
    }
#pragma GCC unroll 16
    for (int i = 0; i < BS; ++i) {
      const uint32_t u = uint32_t(id[2 * i]) | (uint32_t(id[2 * i + 1]) << 8);
#pragma GCC unroll 8
      for (int k = 0; k < NM_VALS; ++k)
        acc[i] = W::fma(vf[i * NM_VALS + k], W::load(xc + ((k >> 1) * 4 + int((u >> (2 * k)) & 3)) * L), acc[i]);
    }
  }
  add_token_lanes<W, L>(acc, res);
}
#endif

#if HS_AVX512
// 32-bit integer lanes, one per token (16 in a zmm, 8 in a ymm): the bf16 decode layouts and the prefill tiles
template <int L> struct U32Lanes;
template <> struct U32Lanes<16> {
  using V = __m512i;
  static V tokens(int64_t stride) {  // lane t: t * stride
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32(int(stride)));
  }
  static V add(V v, int64_t k) { return _mm512_add_epi32(v, _mm512_set1_epi32(int(k))); }
  static V gather(V at, const int* base, __mmask16 live) {
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, base, 4);
  }
  static V low_up(V v) { return _mm512_slli_epi32(v, 16); }
  static V high_down(V v) { return _mm512_srli_epi32(v, 16); }
  static V high(V v) { return _mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))); }
  static V low_of_a_high_of_b(V a, V b) { return _mm512_mask_blend_epi16(__mmask32(0xAAAAAAAA), a, b); }
  static void store(void* p, V v) { _mm512_store_si512(p, v); }
};
template <> struct U32Lanes<8> {
  using V = __m256i;
  static V tokens(int64_t stride) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(stride)));
  }
  static V add(V v, int64_t k) { return _mm256_add_epi32(v, _mm256_set1_epi32(int(k))); }
  static V gather(V at, const int* base, __mmask16 live) {
    return _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), __mmask8(live), at, base, 4);
  }
  static V low_up(V v) { return _mm256_slli_epi32(v, 16); }
  static V high_down(V v) { return _mm256_srli_epi32(v, 16); }
  static V high(V v) { return _mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))); }
  static V low_of_a_high_of_b(V a, V b) { return _mm256_mask_blend_epi16(__mmask16(0xAAAA), a, b); }
  static void store(void* p, V v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
};
#endif

#if HS_AVX512 && defined(__AVX512BF16__)
#define HS_BF16DOT 1
// bf16 pair dot products with L tokens in the lanes of one register (16 in a zmm, 8 in a ymm)
template <int L> struct BfDot;
template <> struct BfDot<16> {
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V dot(V acc, uint32_t w, const uint16_t* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(int(w)), (__m512bh)_mm512_loadu_si512(x));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
template <> struct BfDot<8> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V dot(V acc, uint32_t w, const uint16_t* x) {
    return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_set1_epi32(int(w)),
                            (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

// The token layouts of n (<= L) bf16 rows x [n][in] for groups [g0, g1) of 4 inputs: xp [in/2][L] and
// x6 [in/4][6][L] pairs, xt [in][L] fp32. Two gathers per group fetch the pairs (0,1) and (2,3) of every
// token (tokens in the lanes, lanes from n on zero); the other pairs and the fp32 inputs are blends and
// shifts of those two. The scalar build this replaces was most of a small layer's call at 16 tokens.
template <int L>
inline void build_bf16_tokens(const uint16_t* x, int64_t n, int64_t in, int64_t g0, int64_t g1, uint32_t* xp,
                              uint32_t* x6, float* xt) {
  using U = U32Lanes<L>;
  const int* base = reinterpret_cast<const int*>(x);
  const __mmask16 live = __mmask16((1u << n) - 1);
  const typename U::V rows = U::tokens(in / 2);  // in 4-byte units: a pair of bf16 inputs
  for (int64_t g = g0; g < g1; ++g) {
    const typename U::V a = U::gather(U::add(rows, 2 * g), base, live);      // columns 0, 1 of the group
    const typename U::V b = U::gather(U::add(rows, 2 * g + 1), base, live);  // columns 2, 3
    const typename U::V a1 = U::high_down(a), b2 = U::low_up(b);
    U::store(xp + (2 * g) * L, a);
    U::store(xp + (2 * g + 1) * L, b);
    uint32_t* q = x6 + g * 6 * L;  // the order of NM_PAIR_COLS: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    U::store(q, a);
    U::store(q + L, U::low_of_a_high_of_b(a, b2));
    U::store(q + 2 * L, U::low_of_a_high_of_b(a, b));
    U::store(q + 3 * L, U::low_of_a_high_of_b(a1, b2));
    U::store(q + 4 * L, U::low_of_a_high_of_b(a1, b));
    U::store(q + 5 * L, b);
    float* t = xt + (4 * g) * L;  // a bf16 in the high half of 32 bits is its fp32 value
    U::store(t, U::low_up(a));
    U::store(t + L, U::high(a));
    U::store(t + 2 * L, b2);
    U::store(t + 3 * L, U::high(b));
  }
}

// DENSE bf16, tokens: xp [in/2][L][2] bf16 -- the inputs of columns (2k, 2k+1) of every token
template <int L>
inline void dense_tokens_bf16(const Packed& p, int64_t r, const uint16_t* xp, Res& res) {
  using D = BfDot<L>;
  const uint32_t* dv = static_cast<const uint32_t*>(p.dense_vals);  // bf16 pairs
  // every loop over acc is unrolled: an indexed access anywhere makes GCC keep acc in memory and store
  // each accumulator after every dot product (measured 1.8x slower)
  typename D::V acc[BS];
#pragma GCC unroll 16
  for (int i = 0; i < BS; ++i) acc[i] = D::zero();
  for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
    const uint16_t* xc = xp + int64_t(p.dense_cols[b]) * 8 * L * 2;
    const uint32_t* w = dv + int64_t(b) * 128;  // [16 rows][8 pairs]
    prefetch<512>(w + PREFETCH_BLOCKS * 128);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
#pragma GCC unroll 16
      for (int i = 0; i < BS; ++i) acc[i] = D::dot(acc[i], w[i * 8 + k], xc + k * 2 * L);
    }
  }
  add_token_lanes<D, L>(acc, res);
}

// DENSE bf16, rows: xd [groups*TG][in/16][32] bf16 -- each block column's 16 inputs twice, so that one
// register multiplies rows 2q, 2q+1 (32 consecutive weights) with both copies
template <int TG>
inline void dense_rows_bf16(const Packed& p, int64_t r, int groups, const uint16_t* xd, int64_t xstride, Res& res) {
  constexpr int PD = TG <= 2 ? 8 : 4;
  const uint16_t* dv = static_cast<const uint16_t*>(p.dense_vals);
  for (int g = 0; g < groups; ++g) {
    const uint16_t* xg = xd + int64_t(g) * TG * xstride;
    for (int q0 = 0; q0 < BS / 2; q0 += PD) {
      __m512 acc[PD][TG];
#pragma GCC unroll 8
      for (int q = 0; q < PD; ++q)
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) acc[q][t] = _mm512_setzero_ps();
      for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
        const uint16_t* xc = xg + int64_t(p.dense_cols[b]) * 32;
        const uint16_t* w = dv + int64_t(b) * 256 + q0 * 32;
        if (g == 0 && q0 == 0) prefetch<512>(w + PREFETCH_BLOCKS * 256);
        __m512i xv[TG];
#pragma GCC unroll 4
        for (int t = 0; t < TG; ++t) xv[t] = _mm512_loadu_si512(xc + t * xstride);
#pragma GCC unroll 8
        for (int q = 0; q < PD; ++q) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + q * 32);
#pragma GCC unroll 4
          for (int t = 0; t < TG; ++t) acc[q][t] = _mm512_dpbf16_ps(acc[q][t], wv, (__m512bh)xv[t]);
        }
      }
#pragma GCC unroll 8
      for (int q = 0; q < PD; ++q)
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) {
          res[2 * (q0 + q)][g * TG + t] += hsum256(_mm512_castps512_ps256(acc[q][t]));
          res[2 * (q0 + q) + 1][g * TG + t] += hsum256(_mm512_extractf32x8_ps(acc[q][t], 1));
        }
    }
  }
}

// The 16-bit lane permute of an NM row quad: 32-bit lane j = (row j/4, group j%4) takes the inputs of the
// group's two kept columns (canonical packing: ascending), from the 8 bytes of positions of the 4 rows
inline __m512i nm_quad_index(const uint8_t* id) {
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i gbase = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  uint32_t lo, hi;
  std::memcpy(&lo, id, 4);
  std::memcpy(&hi, id + 4, 4);
  const __m512i codes = _mm512_inserti64x4(_mm512_set1_epi32(int(lo)), _mm256_set1_epi32(int(hi)), 1);
  const __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(codes, shifts), _mm512_set1_epi32(15));
  const __m512i c0 = _mm512_add_epi32(_mm512_and_si512(nib, _mm512_set1_epi32(3)), gbase);
  const __m512i c1 = _mm512_add_epi32(_mm512_srli_epi32(nib, 2), gbase);
  return _mm512_or_si512(c0, _mm512_slli_epi32(c1, 16));
}

// a quad's permute as a vector element (std::vector drops the alignment attribute of a bare __m512i)
struct alignas(64) QuadIndex {
  __m512i v;
};

// NM bf16, rows: quad u = rows 4u..4u+3; qidx: the quads' permutes, precomputed once per block-row
template <int TG>
inline void nm_rows_bf16(const Packed& p, int64_t r, int groups, const uint16_t* xd, int64_t xstride,
                         const QuadIndex* qidx, Res& res) {
  constexpr int PQ = TG <= 4 ? 4 : 2;
  const uint16_t* nv = static_cast<const uint16_t*>(p.nm_vals);
  const int32_t nb0 = p.nm_ptr[r];
  for (int g = 0; g < groups; ++g) {
    const uint16_t* xg = xd + int64_t(g) * TG * xstride;
    for (int u0 = 0; u0 < BS / 4; u0 += PQ) {
      __m512 acc[PQ][TG];
#pragma GCC unroll 8
      for (int u = 0; u < PQ; ++u)
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) acc[u][t] = _mm512_setzero_ps();
      for (int32_t b = nb0; b < p.nm_ptr[r + 1]; ++b) {
        const uint16_t* xc = xg + int64_t(p.nm_cols[b]) * 32;
        const uint16_t* v = nv + int64_t(b) * (BS * NM_VALS) + u0 * 32;
        if (g == 0 && u0 == 0) prefetch<256>(v + PREFETCH_BLOCKS * 128);
        __m512i xv[TG];
#pragma GCC unroll 4
        for (int t = 0; t < TG; ++t) xv[t] = _mm512_loadu_si512(xc + t * xstride);
#pragma GCC unroll 4
        for (int u = 0; u < PQ; ++u) {
          const __m512i idx = qidx[size_t(b - nb0) * 4 + u0 + u].v;
          const __m512bh vv = (__m512bh)_mm512_loadu_si512(v + u * 32);
#pragma GCC unroll 4
          for (int t = 0; t < TG; ++t)
            acc[u][t] = _mm512_dpbf16_ps(acc[u][t], vv, (__m512bh)_mm512_permutexvar_epi16(idx, xv[t]));
        }
      }
      alignas(64) float lanes[16];
#pragma GCC unroll 8
      for (int u = 0; u < PQ; ++u)
#pragma GCC unroll 8
        for (int t = 0; t < TG; ++t) {
          _mm512_store_ps(lanes, acc[u][t]);
          for (int k = 0; k < 4; ++k)
            res[4 * (u0 + u) + k][g * TG + t] += (lanes[4 * k] + lanes[4 * k + 1]) + (lanes[4 * k + 2] + lanes[4 * k + 3]);
        }
    }
  }
}
// NM bf16, tokens: x6 [in/4][6][L][2] bf16 -- for each group of 4 columns the inputs of its 6 possible kept
// pairs, so that a row's two kept weights of a group (one bf16 pair) meet their inputs in one dot product,
// without a permute
template <int L>
inline void nm_tokens_bf16(const Packed& p, int64_t r, const uint16_t* x6, Res& res) {
  using D = BfDot<L>;
  const uint32_t* nv = static_cast<const uint32_t*>(p.nm_vals);  // [16 rows][4 groups] bf16 pairs
  typename D::V acc[BS];
#pragma GCC unroll 16
  for (int i = 0; i < BS; ++i) acc[i] = D::zero();
  // code -> pair index * 8 (the scaled-index addressing multiplies by 8 again: 64 B per pair at L = 16)
  static_assert(L * 2 * 2 % 8 == 0);
  alignas(16) int8_t lut[16];
  for (int c = 0; c < 16; ++c) lut[c] = int8_t(std::max<int>(0, NM_PAIR_OF_CODE.of[c]) * (L * 2 * 2 / 8));
  const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lut)));
  alignas(64) uint8_t off[64];  // [row][group]
  for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
    const uint16_t* xc = x6 + int64_t(p.nm_cols[b]) * 4 * 6 * L * 2;
    const uint32_t* v = nv + int64_t(b) * 64;
    prefetch<256>(v + PREFETCH_BLOCKS * 64);
    prefetch<32>(p.nm_idx + int64_t(b + PREFETCH_BLOCKS) * 32);
    // the 64 groups' 4-bit codes, one per byte in [row][group] order (byte k of idx holds groups 2k, 2k+1)
    const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.nm_idx + int64_t(b) * 32)));
    const __m512i codes = _mm512_or_si512(_mm512_and_si512(z, _mm512_set1_epi16(0x000F)),
                                          _mm512_and_si512(_mm512_slli_epi16(z, 4), _mm512_set1_epi16(0x0F00)));
    _mm512_store_si512(off, _mm512_shuffle_epi8(table, codes));
    // read the offsets back through memory (load ports): GCC otherwise extracts each byte from the
    // register with vpextrb, two uops on the vector pipes the dot products need
    asm volatile("" ::: "memory");
    const char* xb = reinterpret_cast<const char*>(xc);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 16
      for (int i = 0; i < BS; ++i)
        acc[i] = D::dot(acc[i], v[i * 4 + g], reinterpret_cast<const uint16_t*>(xb + g * 6 * L * 2 * 2 + int64_t(off[i * 4 + g]) * 8));
    }
  }
  add_token_lanes<D, L>(acc, res);
}
#else
#define HS_BF16DOT 0
#endif

// What one call of the multi-token decode reads: x in the layouts its tier methods want.
struct Tokens {
  int n;            // tokens
  int lanes;        // L of the token layouts (8 or 16)
  const float* x;   // [groups*TG][in] fp32, zero padded (rows methods)
  const float* xt;  // [in][L] fp32, zero padded (tokens methods, TOPK)
  const uint16_t* xd = nullptr;  // bf16 [groups*TG][in/16][32] (bf16 rows)
  const uint16_t* xp = nullptr;  // bf16 [in/2][L][2] (bf16 tokens)
  const uint16_t* x6 = nullptr;  // bf16 [in/4][6][L][2] (bf16 NM tokens)
  int tg;           // tokens per group of the rows methods
  int groups;
};

template <typename T>
void decode_multi(const Packed& p, const Tokens& k, float* y) {
  const int64_t in = p.in, out = p.out;
  parallel_rows(p, sizeof(T), [&](int64_t r0, int64_t r1) {
#if HS_BF16DOT
    std::vector<QuadIndex> qidx;
#endif
    for (int64_t r = r0; r < r1; ++r) {
      alignas(64) Res res = {};
#if HS_AVX512
      bool done = false;
#if HS_BF16DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const int64_t xs = (in / BS) * 32;
        if (k.n <= 4) {
          if (k.tg == 1) dense_rows_bf16<1>(p, r, k.groups, k.xd, xs, res);
          else if (k.tg == 2) dense_rows_bf16<2>(p, r, k.groups, k.xd, xs, res);
          else dense_rows_bf16<4>(p, r, k.groups, k.xd, xs, res);
        } else if (k.lanes == 8) {
          dense_tokens_bf16<8>(p, r, k.xp, res);
        } else {
          dense_tokens_bf16<16>(p, r, k.xp, res);
        }
        if (k.n > 4) {
          if (k.lanes == 8) nm_tokens_bf16<8>(p, r, k.x6, res);
          else nm_tokens_bf16<16>(p, r, k.x6, res);
        } else {
          const int32_t nb0 = p.nm_ptr[r], nb1 = p.nm_ptr[r + 1];
          qidx.resize(size_t(nb1 - nb0) * 4);
          for (int32_t b = nb0; b < nb1; ++b)
            for (int u = 0; u < 4; ++u)
              qidx[size_t(b - nb0) * 4 + u].v = nm_quad_index(p.nm_idx + int64_t(b) * 32 + u * 8);
          if (k.tg == 1) nm_rows_bf16<1>(p, r, k.groups, k.xd, xs, qidx.data(), res);
          else if (k.tg == 2) nm_rows_bf16<2>(p, r, k.groups, k.xd, xs, qidx.data(), res);
          else nm_rows_bf16<4>(p, r, k.groups, k.xd, xs, qidx.data(), res);
        }
        done = true;
      }
#endif
      if (!done) {
        if (k.n == 2) dense_rows<T, 2>(p, r, k.x, in, res);
        else if (k.n <= 4) dense_rows<T, 4>(p, r, k.x, in, res);
        else if (k.lanes == 8) dense_tokens<T, 8>(p, r, k.xt, res);
        else dense_tokens<T, 16>(p, r, k.xt, res);
        if (k.n <= 8) {
          if (k.tg == 2) nm_rows<T, 2>(p, r, k.groups, k.x, in, res);
          else if (k.tg == 4) nm_rows<T, 4>(p, r, k.groups, k.x, in, res);
          else nm_rows<T, 8>(p, r, k.groups, k.x, in, res);
        } else {
          nm_tokens<T, 16>(p, r, k.xt, res);
        }
      }
#else
      {  // portable: token-major loops
        const T* dv = static_cast<const T*>(p.dense_vals);
        const T* nv = static_cast<const T*>(p.nm_vals);
        const int L = k.lanes;
        for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
          const float* xc = k.xt + int64_t(p.dense_cols[b]) * BS * L;
          const T* w = dv + int64_t(b) * 256;
          for (int i = 0; i < BS; ++i)
            for (int j = 0; j < BS; ++j) {
              const float wv = to_f(w[i * BS + j]);
              for (int t = 0; t < L; ++t) res[i][t] += wv * xc[j * L + t];
            }
        }
        for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
          const float* xc = k.xt + int64_t(p.nm_cols[b]) * BS * L;
          const T* v = nv + int64_t(b) * (BS * NM_VALS);
          const uint8_t* id = p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES);
          for (int i = 0; i < BS; ++i)
            for (int q = 0; q < NM_VALS; ++q) {
              const int col = (q / 2) * 4 + ((id[i * 2 + q / 4] >> (2 * (q % 4))) & 3);
              const float wv = to_f(v[i * NM_VALS + q]);
              for (int t = 0; t < L; ++t) res[i][t] += wv * xc[col * L + t];
            }
        }
      }
#endif
      if (k.lanes == 8) topk_tokens<T, 8>(p, r, k.xt, res);
      else topk_tokens<T, 16>(p, r, k.xt, res);
      for (int t = 0; t < k.n; ++t)
        for (int i = 0; i < BS; ++i) y[t * out + r * BS + i] = res[i][t];
    }
  });
}

// -- unpacking (prefill panels) ----------------------------------------------------------------------
// Writes block-rows [r0, r1) of the dense logical weight into dst ([ (r1-r0)*16, in ], row-major, type T).
// Every block belongs to exactly one tier, so each 16x16 tile is written once, zeros included.
// the 16-bit lane mask of one NM row's kept columns, from its 8 two-bit positions
inline uint32_t nm_lanes(uint32_t u) {
  uint32_t m = 0;
  for (int k = 0; k < NM_VALS; ++k) m |= 1u << ((k >> 1) * 4 + ((u >> (2 * k)) & 3));
  return m;
}

template <typename T>
inline void zero_tile(T* tile, int64_t ld) {
  for (int i = 0; i < BS; ++i) std::memset(static_cast<void*>(tile + i * ld), 0, sizeof(T) * BS);
}

// One NM block (values v, positions id) as a dense 16x16 tile at dst with row stride ld, zeros included.
template <typename T>
inline void nm_tile(const T* v, const uint8_t* id, T* dst, int64_t ld) {
  for (int i = 0; i < BS; ++i) {
    const uint32_t u = uint32_t(id[2 * i]) | (uint32_t(id[2 * i + 1]) << 8);
#if HS_AVX512 && defined(__AVX512VBMI2__)
    // positions ascend within each group (canonical packing): expand the 8 values into the kept lanes
    const __mmask16 lanes = __mmask16(nm_lanes(u));
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(dst + i * ld, _mm512_maskz_expand_ps(lanes, _mm512_castps256_ps512(_mm256_loadu_ps(v + i * NM_VALS))));
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i * NM_VALS));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ld), _mm256_maskz_expand_epi16(lanes, _mm256_castsi128_si256(h)));
    }
#else
    T row[BS] = {};
    for (int k = 0; k < NM_VALS; ++k) row[(k >> 1) * 4 + ((u >> (2 * k)) & 3)] = v[i * NM_VALS + k];
    std::memcpy(dst + i * ld, row, sizeof(row));
#endif
  }
}

template <typename T>
void unpack_rows(const Packed& p, int64_t r0, int64_t r1, T* dst) {
  const T* dv = static_cast<const T*>(p.dense_vals);
  const T* nv = static_cast<const T*>(p.nm_vals);
  const T* tv = static_cast<const T*>(p.topk_vals);
  const int64_t in = p.in, K = p.topk;
  at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t b_end) {
    for (int64_t r = a; r < b_end; ++r) {
      T* rows = dst + (r - r0) * BS * in;
      for (int32_t b = p.dense_ptr[r]; b < p.dense_ptr[r + 1]; ++b) {
        const T* w = dv + int64_t(b) * 256;
        T* tile = rows + int64_t(p.dense_cols[b]) * BS;
        for (int i = 0; i < BS; ++i) std::memcpy(tile + i * in, w + i * BS, sizeof(T) * BS);
      }
      for (int32_t b = p.nm_ptr[r]; b < p.nm_ptr[r + 1]; ++b) {
        const T* v = nv + int64_t(b) * (BS * NM_VALS);
        const uint8_t* id = p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES);
        T* tile = rows + int64_t(p.nm_cols[b]) * BS;
        nm_tile(v, id, tile, in);
      }
      for (int32_t b = p.topk_ptr[r]; b < p.topk_ptr[r + 1]; ++b) {
        T* tile = rows + int64_t(p.topk_cols[b]) * BS;
        zero_tile(tile, in);
        const T* v = tv + int64_t(b) * K;
        const uint8_t* pos = p.topk_pos + int64_t(b) * K;
        for (int64_t e = 0; e < K; ++e) tile[(pos[e] >> 4) * in + (pos[e] & 15)] = v[e];
      }
    }
  });
}

// A growable buffer aligned to the cache line, reused across calls: the decode methods' 64-byte loads of x
// never straddle two lines (from a 16-byte aligned std::vector they all did; in a microbenchmark of the bf16
// NM tokens loop that cost 1.5x)
template <typename E>
class LineBuffer {
 public:
  LineBuffer() = default;
  LineBuffer(const LineBuffer&) = delete;
  LineBuffer& operator=(const LineBuffer&) = delete;
  ~LineBuffer() { std::free(data_); }
  // room for n elements; zeroed when asked (otherwise the previous call's values)
  E* get(int64_t n, bool zero = false) {
    const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(E) + 63) / 64 * 64;
    if (bytes > cap_) {
      std::free(data_);
      data_ = static_cast<E*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(data_ != nullptr, "hybrid_linear: out of memory for a ", bytes, "-byte input buffer");
      cap_ = bytes;
    }
    if (zero) std::memset(data_, 0, size_t(n) * sizeof(E));
    return data_;
  }

 private:
  E* data_ = nullptr;
  size_t cap_ = 0;
};

// A scratch buffer reused across calls and layers (no page faults per call); it is not held by any layer.
at::Tensor& scratch(int64_t numel, const at::TensorOptions& opts) {
  static thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < numel || buf.scalar_type() != opts.dtype().toScalarType())
    buf = at::empty({numel}, opts);
  return buf;
}

Packed make_packed(const std::vector<at::Tensor>& t, int64_t out, int64_t in, int64_t topk) {
  Packed p;
  p.dense_vals = t[0].data_ptr();
  p.dense_ptr = t[1].data_ptr<int32_t>();
  p.dense_cols = t[2].data_ptr<int32_t>();
  p.nm_vals = t[3].data_ptr();
  p.nm_idx = t[4].data_ptr<uint8_t>();
  p.nm_ptr = t[5].data_ptr<int32_t>();
  p.nm_cols = t[6].data_ptr<int32_t>();
  p.topk_vals = t[7].data_ptr();
  p.topk_pos = t[8].data_ptr<uint8_t>();
  p.topk_ptr = t[9].data_ptr<int32_t>();
  p.topk_cols = t[10].data_ptr<int32_t>();
  p.out = out;
  p.in = in;
  p.topk = topk;
  return p;
}

void check_inputs(const at::Tensor& x, const std::vector<at::Tensor>& t, int64_t out, int64_t in, int64_t topk) {
  TORCH_CHECK(t.size() == 11, "hybrid_linear: expected the 11 packed tensors, got ", t.size());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "hybrid_linear: x must be [tokens, ", in, "], got ", x.sizes());
  TORCH_CHECK(out % BS == 0 && in % BS == 0, "hybrid_linear: shape ", out, "x", in, " does not tile into 16x16");
  TORCH_CHECK(topk >= 0 && topk <= 256, "hybrid_linear: topk ", topk, " outside 0..256");
  const auto dtype = t[0].scalar_type();
  TORCH_CHECK(t[3].scalar_type() == dtype && t[7].scalar_type() == dtype, "hybrid_linear: value tensors differ in dtype");
  TORCH_CHECK(x.scalar_type() == dtype, "hybrid_linear: x is ", x.scalar_type(), " but the weight is ", dtype);
  for (int k : {1, 2, 5, 6, 9, 10})
    TORCH_CHECK(t[k].scalar_type() == at::kInt && t[k].is_contiguous(), "hybrid_linear: index tensor ", k, " must be contiguous int32");
  for (int k : {4, 8})
    TORCH_CHECK(t[k].scalar_type() == at::kByte && t[k].is_contiguous(), "hybrid_linear: position tensor ", k, " must be contiguous uint8");
  for (const auto& v : t) TORCH_CHECK(v.device().is_cpu() && v.is_contiguous(), "hybrid_linear: packed tensors must be contiguous CPU tensors");
  const int64_t R = out / BS;
  TORCH_CHECK(t[1].numel() == R + 1 && t[5].numel() == R + 1 && t[9].numel() == R + 1, "hybrid_linear: row pointers do not match ", R, " block-rows");
  TORCH_CHECK(t[0].numel() == t[2].numel() * 256, "hybrid_linear: DENSE values do not match their block columns");
  TORCH_CHECK(t[3].numel() == t[6].numel() * 128 && t[4].numel() == t[6].numel() * 32, "hybrid_linear: NM tensors do not match their block columns");
  TORCH_CHECK(t[7].numel() == t[10].numel() * topk && t[8].numel() == t[10].numel() * topk, "hybrid_linear: TOPK tensors do not match topk=", topk);
}

// Prefill panel height: `bytes` of unpacked weight, but at least `min_rows` rows. Each GEMM call re-reads
// (and the BLAS re-packs) all of x, so short panels of wide layers spend their time on x: measured on the
// 2-core EPYC at 512 tokens, 4096x11008 fp32 went from 0.86x to 1.03x dense with 1024-row panels.
struct PanelSize {
  int64_t bytes = int64_t(4) << 20;
  int64_t min_rows = 1024;
};
PanelSize& panel_size() {
  static PanelSize s;
  return s;
}

// returns the settings it replaces, so that a caller can put them back
std::vector<int64_t> set_panel(int64_t bytes, int64_t min_rows) {
  const std::vector<int64_t> before{panel_size().bytes, panel_size().min_rows};
  panel_size().bytes = std::max<int64_t>(bytes, 4096);
  panel_size().min_rows = std::max<int64_t>(min_rows, BS);
  return before;
}

// Prefill: which path (0: the block-sparse tiles, for fp32 with AVX-512 and bf16 with AVX512-BF16; 1: unpacked
// panels and the BLAS, as fp16 and the portable build always) and the bytes of a panel's tiles plus one tile of x (about a core's L2).
// Settable for tests and for timing both paths in one process.
struct PrefillSettings {
  int64_t mode = 0;
  int64_t l2 = int64_t(640) << 10;
};
PrefillSettings& prefill_settings() {
  static PrefillSettings s;
  return s;
}
// returns the settings it replaces; l2_bytes < 0 keeps the current budget
std::vector<int64_t> set_prefill(int64_t mode, int64_t l2_bytes) {
  TORCH_CHECK(mode == 0 || mode == 1, "set_prefill: mode is 0 (tiles) or 1 (panels and the BLAS), got ", mode);
  const std::vector<int64_t> before{prefill_settings().mode, prefill_settings().l2};
  prefill_settings().mode = mode;
  if (l2_bytes >= 0) prefill_settings().l2 = l2_bytes;
  return before;
}


// y [n][out] in T from fp32 results, plus the bias (in T)
template <typename T>
void finish(const float* yf, int64_t n, int64_t out, const T* bias, T* y) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out; ++o) {
      const float v = yf[t * out + o] + (bias ? to_f(bias[o]) : 0.f);
      y[t * out + o] = static_cast<T>(v);
    }
}

#if HS_AVX512
// -- prefill: a block-sparse GEMM that skips the TOPK blocks' dense work -----------------------------------
// The BLAS runs near the cores' peak, so unpacked panels fed to it can at best match dense, minus the unpacking.
// Here x is laid out per tile of 16 tokens with the tokens in the lanes (bf16: as pairs of columns), and each
// block-row's DENSE and NM blocks are 16x16 tiles (NM expanded once per panel): 256 fp32 FMAs or 128 bf16
// pair dot products per block and tile, one accumulator per row. TOPK blocks add their K entries alone, so
// they cost about K/256 of a tile instead of a whole one. An NM tile costs as much as a DENSE one: skipping its
// zero products needs a data-dependent load of x per kept weight or pair, which measured no cheaper in bf16
// (benchmarks/bf16_prefill_probe.py).
constexpr int PT = 16;  // tokens per tile: the lanes of one zmm

// xp [tiles][words][PT]: word k of each token (a fp32 value, or a bf16 pair), a tile's tokens in the lanes;
// padding tokens read zero
void build_prefill_x(const int32_t* xs, int64_t n, int64_t words, int32_t* xp) {
  const int64_t tiles = (n + PT - 1) / PT, chunk = 64, chunks = (words + chunk - 1) / chunk;
  at::parallel_for(0, tiles * chunks, 8, [&](int64_t a, int64_t b) {
    using U = U32Lanes<PT>;
    const U::V lane = U::tokens(words);
    for (int64_t w = a; w < b; ++w) {
      const int64_t ti = w / chunks, k0 = (w % chunks) * chunk, k1 = std::min(words, k0 + chunk);
      const int64_t t0 = ti * PT, live = std::min<int64_t>(PT, n - t0);
      const __mmask16 m = __mmask16((1u << live) - 1);
      const int32_t* tb = xs + t0 * words;
      int32_t* dst = xp + ti * words * PT;
      for (int64_t k = k0; k < k1; ++k)
        U::store(dst + k * PT, U::gather(lane, tb + k, m));
    }
  });
}

// Prefetch of the tile PREFETCH_BLOCKS ahead and of its block column of x: the blocks of one tier sit at
// scattered columns, where the hardware prefetcher does not follow x (a mixed layer took 1.15x the sum of its
// tiers' shares of whole-tier layers).
template <typename T>
inline void prefetch_tile(const T* w, int64_t off, const int32_t* cols, int32_t b, int32_t b1, const T* xt) {
  const int32_t a = std::min(b + PREFETCH_BLOCKS, b1 - 1);
  prefetch<256 * sizeof(T)>(w + (int64_t(a) - off) * 256);
  prefetch<BS * PT * sizeof(T)>(xt + int64_t(cols[a]) * BS * PT);
}

// acc[i] += the tiles [b0, b1) times x's tile; tile b is at w + (b - off) * 256 elements (16 rows of 16),
// x's block column c at xt + c * 16 * PT elements
template <typename T>
inline void tiles_dot(__m512* acc, const T* w, int64_t off, const int32_t* cols, int32_t b0, int32_t b1, const T* xt);
template <>
inline void tiles_dot<float>(__m512* acc, const float* w, int64_t off, const int32_t* cols, int32_t b0, int32_t b1,
                             const float* xt) {
  for (int32_t b = b0; b < b1; ++b) {
    const float* wb = w + (int64_t(b) - off) * 256;
    const float* xc = xt + int64_t(cols[b]) * BS * PT;
    prefetch_tile<float>(w, off, cols, b, b1, xt);
#pragma GCC unroll 4
    for (int j = 0; j < BS; ++j) {
      const __m512 xv = _mm512_load_ps(xc + j * PT);
#pragma GCC unroll 16
      for (int i = 0; i < BS; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(wb[i * BS + j]), xv, acc[i]);
    }
  }
}
#if HS_BF16DOT
template <>
inline void tiles_dot<c10::BFloat16>(__m512* acc, const c10::BFloat16* w, int64_t off, const int32_t* cols, int32_t b0,
                                     int32_t b1, const c10::BFloat16* xt) {
  for (int32_t b = b0; b < b1; ++b) {
    const uint32_t* wb = reinterpret_cast<const uint32_t*>(w + (int64_t(b) - off) * 256);  // 16 rows of 8 pairs
    const uint32_t* xc = reinterpret_cast<const uint32_t*>(xt + int64_t(cols[b]) * BS * PT);  // 8 pairs of PT
    prefetch_tile<c10::BFloat16>(w, off, cols, b, b1, xt);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const __m512bh xv = (__m512bh)_mm512_load_si512(xc + k * PT);
#pragma GCC unroll 16
      for (int i = 0; i < BS; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(int(wb[i * 8 + k])), xv);
    }
  }
}
#endif

// A block-row's TOPK entries for the tiles: step s holds one entry of each of the 16 rows (a weight of 0 where a
// row has fewer), so the 16 accumulators take one independent product each per step. Added through memory
// instead, entries of one row chained through store-to-load forwarding: a layer of TOPK blocks took 1.4x the
// whole dense GEMM.
struct TopkStep {
  int32_t off[BS];  // x's tile: the entry's column (fp32) or the pair holding it (bf16), in 32-bit words
  uint32_t w[BS];   // fp32 bits, or a bf16 pair with the weight in the column's half and 0 in the other
};

// Appends block-row r's steps to `steps`.
template <typename T>
void topk_steps(const Packed& p, int64_t r, std::vector<TopkStep>& steps) {
  const T* tv = static_cast<const T*>(p.topk_vals);
  const int64_t K = p.topk;
  int count[BS] = {};
  for (int32_t b = p.topk_ptr[r]; b < p.topk_ptr[r + 1]; ++b)
    for (int64_t q = 0; q < K; ++q) count[p.topk_pos[int64_t(b) * K + q] >> 4] += 1;
  const int64_t len = *std::max_element(count, count + BS), start = int64_t(steps.size());
  steps.resize(start + len, TopkStep{});
  int filled[BS] = {};
  for (int32_t b = p.topk_ptr[r]; b < p.topk_ptr[r + 1]; ++b) {
    const int64_t c0 = int64_t(p.topk_cols[b]) * BS;
    for (int64_t q = 0; q < K; ++q) {
      const uint8_t pos = p.topk_pos[int64_t(b) * K + q];
      const int i = pos >> 4;
      const int64_t c = c0 + (pos & 15);
      TopkStep& s = steps[start + filled[i]++];
      const T v = tv[int64_t(b) * K + q];
      if constexpr (std::is_same_v<T, float>) {
        s.off[i] = int32_t(c * PT);
        std::memcpy(&s.w[i], &v, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, &v, 2);
        s.off[i] = int32_t((c >> 1) * PT);
        s.w[i] = uint32_t(h) << (16 * (c & 1));
      }
    }
  }
}

template <typename T>
inline void topk_dot(__m512* acc, const TopkStep* s, int64_t len, const T* xt) {
  static_assert(std::is_same_v<T, float> || HS_BF16DOT, "bf16 tiles need AVX512-BF16");
  const int32_t* x = reinterpret_cast<const int32_t*>(xt);
  for (int64_t e = 0; e < len; ++e) {
#pragma GCC unroll 16
    for (int i = 0; i < BS; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        acc[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_set1_epi32(int(s[e].w[i]))),
                                 _mm512_castsi512_ps(_mm512_load_si512(x + s[e].off[i])), acc[i]);
      } else {
#if HS_BF16DOT
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(int(s[e].w[i])), (__m512bh)_mm512_load_si512(x + s[e].off[i]));
#endif
      }
    }
  }
}

template <typename T> inline void store16(T* p, __m512 v);
template <> inline void store16<float>(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <> inline void store16<c10::BFloat16>(c10::BFloat16* p, __m512 v) {
  // round to nearest even, as c10's conversion (NaN stays NaN)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i h = _mm512_srli_epi32(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
}

// y [n][out] for more than 16 tokens, T = float or bf16
template <typename T>
void prefill_tiles(const Packed& p, const T* xs, int64_t n, const T* bias, T* y) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2);
  const int64_t in = p.in, out = p.out, tiles = (n + PT - 1) / PT;
  const int64_t words = in * int64_t(sizeof(T)) / 4, tile_elems = in * PT;
  static thread_local LineBuffer<int32_t> xbuf;
  T* xp = reinterpret_cast<T*>(xbuf.get(tiles * words * PT));
  build_prefill_x(reinterpret_cast<const int32_t*>(xs), n, words, reinterpret_cast<int32_t*>(xp));
  const T* dv = static_cast<const T*>(p.dense_vals);
  const T* nv = static_cast<const T*>(p.nm_vals);
  // a panel's tiles and one tile of x stay in the core's L2 while every tile of x passes over the panel
  const int64_t budget = std::max<int64_t>(0, prefill_settings().l2 - tile_elems * int64_t(sizeof(T)));
  parallel_rows(p, sizeof(T), [&](int64_t r0, int64_t r1) {
    static thread_local LineBuffer<T> nmbuf;
    static thread_local std::vector<TopkStep> steps;
    std::vector<int64_t> step0;  // block-row r + k's steps: [step0[k], step0[k + 1])
    alignas(64) float C[BS * PT];
    const __m512i col16 = U32Lanes<PT>::tokens(PT);
    for (int64_t r = r0; r < r1;) {
      int64_t e = r, bytes = 0;
      while (e < r1) {
        // tiles, and TOPK steps of 128 bytes for about 16 entries (10 bytes an entry with the rows' spread)
        const int64_t rb = (int64_t(p.dense_ptr[e + 1] - p.dense_ptr[e]) + (p.nm_ptr[e + 1] - p.nm_ptr[e])) * 256 * int64_t(sizeof(T)) +
                           int64_t(p.topk_ptr[e + 1] - p.topk_ptr[e]) * p.topk * 10;
        if (e > r && bytes + rb > budget) break;
        bytes += rb;
        ++e;
      }
      const int32_t nb0 = p.nm_ptr[r], nb1 = p.nm_ptr[e];
      T* nmt = nmbuf.get(int64_t(nb1 - nb0) * 256);
      for (int32_t b = nb0; b < nb1; ++b)
        nm_tile(nv + int64_t(b) * (BS * NM_VALS), p.nm_idx + int64_t(b) * (BS * NM_IDX_BYTES), nmt + int64_t(b - nb0) * 256, BS);
      steps.clear();
      step0.assign(1, 0);
      for (int64_t rr = r; rr < e; ++rr) {
        topk_steps<T>(p, rr, steps);
        step0.push_back(int64_t(steps.size()));
      }
      for (int64_t ti = 0; ti < tiles; ++ti) {
        const T* xt = xp + ti * tile_elems;
        const int64_t t0 = ti * PT, live = std::min<int64_t>(PT, n - t0);
        for (int64_t rr = r; rr < e; ++rr) {
          __m512 acc[BS];
#pragma GCC unroll 16
          for (int i = 0; i < BS; ++i) acc[i] = _mm512_setzero_ps();
          tiles_dot<T>(acc, dv, 0, p.dense_cols, p.dense_ptr[rr], p.dense_ptr[rr + 1], xt);
          tiles_dot<T>(acc, nmt, nb0, p.nm_cols, p.nm_ptr[rr], p.nm_ptr[rr + 1], xt);
          topk_dot<T>(acc, steps.data() + step0[rr - r], step0[rr - r + 1] - step0[rr - r], xt);
#pragma GCC unroll 16
          for (int i = 0; i < BS; ++i) _mm512_store_ps(C + i * PT, acc[i]);
          // token t's 16 outputs are column t of C
          const __m512 bv = bias ? load16(bias + rr * BS) : _mm512_setzero_ps();
          for (int64_t t = 0; t < live; ++t)
            store16(y + (t0 + t) * out + rr * BS,
                    _mm512_add_ps(_mm512_i32gather_ps(U32Lanes<PT>::add(col16, t), C, 4), bv));
        }
      }
      r = e;
    }
  }, tiles);
}
#endif

template <typename T>
at::Tensor run(const at::Tensor& x, const Packed& p, const c10::optional<at::Tensor>& bias) {
  const int64_t n = x.size(0), in = p.in, out = p.out;
  const T* xs = reinterpret_cast<const T*>(x.data_ptr());
  const T* bs = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out, "hybrid_linear: bias has ", bias->numel(), " values for ", out, " outputs");
    bias_c = bias->to(x.scalar_type()).contiguous();
    bs = reinterpret_cast<const T*>(bias_c.data_ptr());
  }
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  T* ys = reinterpret_cast<T*>(y.data_ptr());
  if (n <= 16) {
    // the inputs in the layouts the decode methods read, in reused buffers (no per-call tensor ops)
    static thread_local LineBuffer<float> xf, xt, yf;
    static thread_local LineBuffer<uint16_t> xd, xp, x6;
    float* yb = yf.get(n * out);
    if (n == 1) {
      float* xb = xf.get(in);
      for (int64_t j = 0; j < in; ++j) xb[j] = to_f(xs[j]);
      decode_one<T>(p, xb, yb);
    } else {
      Tokens k;
      k.n = int(n);
      k.lanes = n <= 8 ? 8 : 16;
      const bool bf16 = HS_BF16DOT && std::is_same_v<T, c10::BFloat16>;
      k.tg = bf16 ? (n <= 2 ? 2 : 4) : (n <= 2 ? 2 : n <= 4 ? 4 : 8);
      k.groups = int((n + k.tg - 1) / k.tg);
      const int64_t padded = int64_t(k.groups) * k.tg, L = k.lanes;
      // only the layouts this call's methods read: xt (TOPK) always; xf (fp32 rows); bf16: xd (rows,
      // up to 4 tokens) or xp and x6 (tokens, more). Padding tokens read zeros.
      float* xtb = xt.get(in * L, n < L);
      float* xfb = bf16 ? nullptr : xf.get(padded * in, padded > n);
      const uint16_t* xb = reinterpret_cast<const uint16_t*>(xs);
      uint16_t* xdb = bf16 && n <= 4 ? xd.get(padded * in * 2, padded > n) : nullptr;  // [padded][in/16][32]
      // xp [in/2][L] pairs: the inputs of columns 2k, 2k+1 per token (adjacent in x: one 32-bit copy);
      // x6 [in/4][6][L] pairs: the 6 column pairs of each group of 4
      uint32_t* xpb = bf16 && n > 4 ? reinterpret_cast<uint32_t*>(xp.get(in * L, n < L)) : nullptr;
      uint32_t* x6b = bf16 && n > 4 ? reinterpret_cast<uint32_t*>(x6.get(in / 4 * 6 * L * 2, n < L)) : nullptr;
      // built by all threads, each over a range of inputs: on small layers a serial build measured a large
      // part of the call. Inputs (or groups of 4) outer, tokens inner: the stores run along memory.
      at::parallel_for(0, in / 4, 64, [&](int64_t g0, int64_t g1) {
#if HS_BF16DOT
        if (x6b) {  // xp, x6 and xt (bf16 at 5..16 tokens; x6b is set only in this build)
          if (L == 16) build_bf16_tokens<16>(xb, n, in, g0, g1, xpb, x6b, xtb);
          else build_bf16_tokens<8>(xb, n, in, g0, g1, xpb, x6b, xtb);
          return;
        }
#endif
        const int64_t j0 = 4 * g0, j1 = 4 * g1;
        if (xfb)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t j = j0; j < j1; ++j) xfb[t * in + j] = to_f(xs[t * in + j]);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t t = 0; t < n; ++t) xtb[j * L + t] = to_f(xs[t * in + j]);
        if (xdb)  // each block column's inputs twice
          for (int64_t t = 0; t < n; ++t)
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t c = j / BS, i = j % BS;
              xdb[(t * (in / BS) + c) * 32 + i] = xdb[(t * (in / BS) + c) * 32 + BS + i] = xb[t * in + j];
            }
      });
      k.x = xfb;
      k.xt = xtb;
      k.xd = xdb;
      k.xp = reinterpret_cast<const uint16_t*>(xpb);
      k.x6 = reinterpret_cast<const uint16_t*>(x6b);
      decode_multi<T>(p, k, yb);
    }
    finish<T>(yb, n, out, bs, ys);
    return y;
  }
#if HS_AVX512
  if constexpr (std::is_same_v<T, float> || (HS_BF16DOT && std::is_same_v<T, c10::BFloat16>)) {
    // where the tiles measured slower than the panels (benchmarks/RESULTS.md): fewer than 32 block-rows
    // (SmolLM2's 192x576 and 256x576 in bf16 at 0.65-0.73x dense; fp32 1.01-1.07x, panels 0.98x) and a tile
    // of x over 512 KB (fp32 4096x11008: 0.94x, its x tile and one block-row's tiles overflow the L2)
    if (prefill_settings().mode == 0 && p.out >= 32 * BS && p.in * PT * int64_t(sizeof(T)) <= (int64_t(512) << 10)) {
      prefill_tiles<T>(p, xs, n, bs, ys);
      return y;
    }
  }
#endif
  // prefill: panels of block-rows unpacked into a reused buffer, each feeding the BLAS GEMM that writes its
  // columns of y in place
  const int64_t R = out / BS;
  const PanelSize& ps = panel_size();
  const int64_t by_bytes = ps.bytes / (BS * in * int64_t(sizeof(T)));
  const int64_t panel = std::max<int64_t>(1, std::min<int64_t>(R, std::max(by_bytes, ps.min_rows / BS)));
  at::Tensor& buf = scratch(panel * BS * in, x.options());
  for (int64_t r0 = 0; r0 < R; r0 += panel) {
    const int64_t r1 = std::min(R, r0 + panel);
    at::Tensor w = buf.narrow(0, 0, (r1 - r0) * BS * in).view({(r1 - r0) * BS, in});
    unpack_rows<T>(p, r0, r1, reinterpret_cast<T*>(w.data_ptr()));
    at::Tensor ycols = y.narrow(1, r0 * BS, (r1 - r0) * BS);
    at::mm_out(ycols, x, w.t());
  }
  if (bs) y.add_(bias_c);
  return y;
}

at::Tensor hybrid_linear(const at::Tensor& x, std::vector<at::Tensor> t, const c10::optional<at::Tensor>& bias,
                         int64_t out, int64_t topk) {
  const int64_t in = x.size(-1);
  check_inputs(x, t, out, in, topk);
  const Packed p = make_packed(t, out, in, topk);
  at::Tensor xc = x.contiguous();
  switch (x.scalar_type()) {
    case at::kFloat: return run<float>(xc, p, bias);
    case at::kBFloat16: return run<c10::BFloat16>(xc, p, bias);
    case at::kHalf: return run<c10::Half>(xc, p, bias);
    default: TORCH_CHECK(false, "hybrid_linear: no CPU kernel for dtype ", x.scalar_type());
  }
}

at::Tensor hybrid_unpack(std::vector<at::Tensor> t, int64_t out, int64_t in, int64_t topk) {
  at::Tensor x = at::empty({0, in}, t[0].options());
  check_inputs(x, t, out, in, topk);
  const Packed p = make_packed(t, out, in, topk);
  at::Tensor w = at::empty({out, in}, t[0].options());
  switch (t[0].scalar_type()) {
    case at::kFloat: unpack_rows<float>(p, 0, out / BS, w.data_ptr<float>()); break;
    case at::kBFloat16: unpack_rows<c10::BFloat16>(p, 0, out / BS, reinterpret_cast<c10::BFloat16*>(w.data_ptr())); break;
    case at::kHalf: unpack_rows<c10::Half>(p, 0, out / BS, reinterpret_cast<c10::Half*>(w.data_ptr())); break;
    default: TORCH_CHECK(false, "hybrid_unpack: no CPU kernel for dtype ", t[0].scalar_type());
  }
  return w;
}

bool has_avx512() { return HS_AVX512 != 0; }

// -- SparseGPT: the sequential part of one column chunk -------------------------------------------------
// Rows are independent: for each row, walk the chunk's columns; at the start of every group of m columns
// (m > 0) pick the n most salient weights (w^2 / d^2 of the current, updated weights; earlier index wins
// ties; weights `old` pruned rank last) among the rows `nm_rows` allows, prune the rest; then
// err_i = w_i * prune_i / d_i and w_j -= err_i * hinv[i][j] for j >= i. Columns of pruned weights end as
// q_i = 0 up to rounding: the caller multiplies by the keep-mask.
void sparsegpt_chunk(at::Tensor w, const at::Tensor& hinv, at::Tensor prune, at::Tensor err, int64_t n, int64_t m,
                     const c10::optional<at::Tensor>& nm_rows, const c10::optional<at::Tensor>& old) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && hinv.scalar_type() == at::kFloat && err.scalar_type() == at::kFloat,
              "sparsegpt_chunk: fp32 tensors expected");
  TORCH_CHECK(prune.scalar_type() == at::kBool, "sparsegpt_chunk: prune must be bool");
  TORCH_CHECK(w.is_contiguous() && hinv.is_contiguous() && prune.is_contiguous() && err.is_contiguous(),
              "sparsegpt_chunk: contiguous tensors expected");
  const int64_t rows = w.size(0), B = w.size(1);
  TORCH_CHECK(hinv.size(0) == B && hinv.size(1) == B && prune.sizes() == w.sizes() && err.sizes() == w.sizes(),
              "sparsegpt_chunk: shapes disagree");
  TORCH_CHECK(m == 0 || (B % m == 0 && n >= 0 && n <= m), "sparsegpt_chunk: bad N:M");
  const bool* nmr = nullptr;
  const bool* oldp = nullptr;
  at::Tensor nm_c, old_c;
  if (nm_rows.has_value() && nm_rows->defined()) {
    nm_c = nm_rows->contiguous();
    nmr = nm_c.data_ptr<bool>();
  }
  if (old.has_value() && old->defined()) {
    old_c = old->contiguous();
    oldp = old_c.data_ptr<bool>();
  }
  float* W = w.data_ptr<float>();
  const float* H = hinv.data_ptr<float>();
  bool* P = prune.data_ptr<bool>();
  float* E = err.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* wr = W + r * B;
      bool* pr = P + r * B;
      for (int64_t i = 0; i < B; ++i) {
        if (m > 0 && i % m == 0) {
          float score[64];
          for (int64_t j = 0; j < m; ++j) {
            const float d = H[(i + j) * B + i + j];
            score[j] = wr[i + j] * wr[i + j] / (d * d);
            if (oldp && !oldp[r * B + i + j]) score[j] = -1.0f;
          }
          for (int64_t j = 0; j < m; ++j) {  // rank of j among the group: keep the n highest
            int64_t above = 0;
            for (int64_t k = 0; k < m; ++k)
              if (score[k] > score[j] || (score[k] == score[j] && k < j)) ++above;
            const bool allowed = nmr == nullptr || nmr[r * B + i + j];
            if (above >= n && allowed) pr[i + j] = true;
          }
        }
        const float e = pr[i] ? wr[i] / H[i * B + i] : 0.f;
        E[r * B + i] = e;
        if (e == 0.f) continue;
        const float* hi = H + i * B;
        int64_t j = i;
#if HS_AVX512
        const __m512 ev = _mm512_set1_ps(e);
        for (; j + 16 <= B; j += 16)
          _mm512_storeu_ps(wr + j, _mm512_fnmadd_ps(ev, _mm512_loadu_ps(hi + j), _mm512_loadu_ps(wr + j)));
#endif
        for (; j < B; ++j) wr[j] -= e * hi[j];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(hf_hybrid_sparse, m) {
  m.def("hybrid_linear(Tensor x, Tensor[] packed, Tensor? bias, int out_features, int topk) -> Tensor");
  m.def("hybrid_unpack(Tensor[] packed, int out_features, int in_features, int topk) -> Tensor");
  m.def("has_avx512() -> bool", has_avx512);
  m.def("sparsegpt_chunk(Tensor(a!) w, Tensor hinv, Tensor(b!) prune, Tensor(c!) err, int n, int m, Tensor? nm_rows, Tensor? old) -> ()");
  m.def("set_panel(int bytes, int min_rows) -> int[]", set_panel);
  m.def("set_prefill(int mode, int l2_bytes=-1) -> int[]", set_prefill);

}

TORCH_LIBRARY_IMPL(hf_hybrid_sparse, CPU, m) {
  m.impl("hybrid_linear", hybrid_linear);
  m.impl("hybrid_unpack", hybrid_unpack);
  m.impl("sparsegpt_chunk", sparsegpt_chunk);
}
