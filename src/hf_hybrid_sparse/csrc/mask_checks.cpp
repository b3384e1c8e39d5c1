// The load-time checks of a pruned checkpoint's keep-mask (see checkpoint/reader.py), in one pass:
//
//   hf_hybrid_sparse::check_mask(Tensor? weight, Tensor bits, int[] shape, Tensor? tiers, int topk) -> int[]
//
// `bits` is the mask packed row-major, 8 entries per byte, LSB first. Returns
// [kept, revived, dense_bad, topk_bad, nm_bad]: the set bits, the nonzero weights the mask prunes (-0.0 is
// zero, NaN is not), and with a tier map (2-D, 16x16 blocks, 2:4) the DENSE blocks that do not keep all 256
// weights, the TOPK blocks keeping more than `topk`, the NM block-row groups of 4 keeping more than 2.
// The NumPy path in reader.py computes the same numbers in four passes over the data, each its own
// Python call holding the GIL between them; this op reads each weight and mask byte once, with the GIL
// released, so the loader's threads overlap.

#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HS_CHECK_AVX512 1
#else
#define HS_CHECK_AVX512 0
#endif

namespace {

constexpr int64_t SEG = 16;  // entries per 16-bit mask segment (a block row's width)

// The nonzero flags of 16 consecutive weights as 16 bits, the first in bit 0.
inline uint32_t nonzero16(const float* w) {
#if HS_CHECK_AVX512
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(w), _mm512_setzero_ps(), _CMP_NEQ_UQ);
#else
  uint32_t m = 0;
  for (int i = 0; i < SEG; ++i) m |= uint32_t(w[i] != 0.0f) << i;
  return m;
#endif
}

// 16-bit floats (bf16, fp16): nonzero unless every bit but the sign is clear.
inline uint32_t nonzero16(const uint16_t* w) {
#if HS_CHECK_AVX512
  return _mm256_test_epi16_mask(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), _mm256_set1_epi16(0x7FFF));
#else
  uint32_t m = 0;
  for (int i = 0; i < SEG; ++i) m |= uint32_t((w[i] & 0x7FFF) != 0) << i;
  return m;
#endif
}

inline bool nonzero1(float v) { return v != 0.0f; }
inline bool nonzero1(uint16_t v) { return (v & 0x7FFF) != 0; }

inline int popcount16(uint32_t x) { return __builtin_popcount(x & 0xFFFF); }

// Nonzero where some 4-bit group of a 16-bit segment has 3 or 4 bits set (the same rule as reader.py's
// _over_2_of_4: each group's count lands in its nibble; adding 1 reaches bit 2 exactly for 3 and 4).
inline uint32_t over_2_of_4(uint32_t s) {
  uint32_t x = s - ((s >> 1) & 0x5555);
  x = (x & 0x3333) + ((x >> 2) & 0x3333);
  return (x + 0x1111) & 0x4444;
}

inline uint32_t segment(const uint8_t* bits, int64_t k) {
  uint16_t s;
  std::memcpy(&s, bits + 2 * k, 2);
  return s;
}

struct Counts {
  int64_t kept = 0, revived = 0, dense_bad = 0, topk_bad = 0, nm_bad = 0;
};

// No tier map: kept and revived over the flat entries.
template <typename T>
void count_flat(const T* w, const uint8_t* bits, int64_t n, Counts& c) {
  const int64_t chunks = n / SEG;
  for (int64_t k = 0; k < chunks; ++k) {
    const uint32_t s = segment(bits, k);
    c.kept += popcount16(s);
    if (w) c.revived += popcount16(nonzero16(w + k * SEG) & ~s);
  }
  for (int64_t i = chunks * SEG; i < n; ++i) {
    const bool keep = (bits[i >> 3] >> (i & 7)) & 1;
    c.kept += keep;
    if (w && !keep) c.revived += nonzero1(w[i]);
  }
}

// A 2-D [out, in] weight of 16x16 blocks with its int8 tier map [out/16, in/16] (0 DENSE, 1 NM, 2 TOPK).
template <typename T>
void count_tiled(const T* w, const uint8_t* bits, int64_t out, int64_t in, const int8_t* tiers, int64_t topk,
                 Counts& c) {
  const int64_t cols = in / SEG;
  std::vector<int32_t> per_block(cols, 0);
  for (int64_t r = 0; r < out; ++r) {
    const int8_t* tier_row = tiers + (r / SEG) * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = r * cols + j;
      const uint32_t s = segment(bits, k);
      const int kept = popcount16(s);
      per_block[j] += kept;
      c.kept += kept;
      if (w) c.revived += popcount16(nonzero16(w + k * SEG) & ~s);
      if (tier_row[j] == 1 && over_2_of_4(s)) ++c.nm_bad;
    }
    if (r % SEG == SEG - 1) {
      for (int64_t j = 0; j < cols; ++j) {
        if (tier_row[j] == 0 && per_block[j] != SEG * SEG) ++c.dense_bad;
        if (tier_row[j] == 2 && per_block[j] > topk) ++c.topk_bad;
        per_block[j] = 0;
      }
    }
  }
}

std::vector<int64_t> check_mask(const c10::optional<at::Tensor>& weight, const at::Tensor& bits,
                                 std::vector<int64_t> shape, const c10::optional<at::Tensor>& tiers, int64_t topk) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kByte && bits.is_contiguous() && bits.dim() == 1 &&
                  bits.numel() == (n + 7) / 8,
              "check_mask: bits must be a contiguous CPU uint8 tensor of ", (n + 7) / 8, " bytes");
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w) {
    TORCH_CHECK(weight->device().is_cpu() && weight->is_contiguous() && weight->numel() == n,
                "check_mask: weight must be a contiguous CPU tensor of ", n, " entries");
    const auto dt = weight->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "check_mask: no check for weight dtype ", dt);
  }
  const bool tiled = tiers.has_value() && tiers->defined();
  if (tiled) {
    TORCH_CHECK(shape.size() == 2 && shape[0] % SEG == 0 && shape[1] % SEG == 0,
                "check_mask: a tier map needs a 2-D shape of whole 16x16 blocks");
    TORCH_CHECK(tiers->device().is_cpu() && tiers->scalar_type() == at::kChar && tiers->is_contiguous() &&
                    tiers->numel() == (shape[0] / SEG) * (shape[1] / SEG),
                "check_mask: the tier map must be a contiguous CPU int8 tensor of one code per block");
  }
  const uint8_t* b = bits.data_ptr<uint8_t>();
  Counts c;
  auto run = [&](auto* w) {
    if (tiled)
      count_tiled(w, b, shape[0], shape[1], tiers->data_ptr<int8_t>(), topk, c);
    else
      count_flat(w, b, n, c);
  };
  if (!has_w)
    run(static_cast<const float*>(nullptr));
  else if (weight->scalar_type() == at::kFloat)
    run(static_cast<const float*>(weight->data_ptr()));
  else
    run(static_cast<const uint16_t*>(weight->data_ptr()));
  return {c.kept, c.revived, c.dense_bad, c.topk_bad, c.nm_bad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_hybrid_sparse, m) {
  m.def("check_mask(Tensor? weight, Tensor bits, int[] shape, Tensor? tiers, int topk) -> int[]", check_mask);
}
