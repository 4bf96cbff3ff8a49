// Self-attention on CPU for the small token counts and head dims of the demo DiTs (app/model/cpu_attention.py).
//
// At 64 tokens and head dim 16 the CPU flash kernel spends its time on per-tile overhead, not arithmetic
// (bench/README.md, session 20). This kernel does one batch row at a time, all heads: S^T = K Q^T held whole
// (N x N floats), so that lanes run over queries and the softmax needs no horizontal reductions, then O = P V
// written as rows. Two forms of the products:
//  - fp32 FMAs (ATen's Vectorized<float>, AVX-512 or AVX2, whichever torch itself dispatches to): the row's q, k, v
//    converted to fp32 once; every fp32 input, and bf16 on CPUs without AVX512_BF16.
//  - bf16 inputs on a CPU with AVX512_BF16 (Zen 4, Cooper Lake and later Xeons): both products as VDPBF16PS, two
//    bf16 products summed into each fp32 lane, half the instructions of fp32 FMAs. Q, K and V are used as stored;
//    the probabilities P are rounded to bf16 for P V (as torch's own CPU flash kernel does for bf16), the softmax
//    denominators summed in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kKeysPerTile = 4;                   // S tiles: keys x query vectors
constexpr int64_t kQueryVecsPerTile = 4;
constexpr int64_t kQueriesPerTile = kLanes >= 16 ? 16 : 8;  // O tiles: queries x one vector of head dims
constexpr int64_t kTokenMultiple = kQueryVecsPerTile * kLanes;
static_assert(kTokenMultiple % kKeysPerTile == 0 && kTokenMultiple % kQueriesPerTile == 0);

// softmax(scale * s) = exp(scale * (s - max s)) / sum over keys, for each query: st (N keys, N queries) becomes the
// unnormalised exps in place, inv the reciprocal sums; mx holds each query's largest score. Two partial sums halve
// the add chain.
inline void exp_columns(float* st, const float* mx, float* inv, int64_t N, float scale) {
  const Vec sc(scale);
  for (int64_t i = 0; i < N; i += kLanes) {
    const Vec m = Vec::loadu(mx + i);
    Vec s0(0.f), s1(0.f);
    for (int64_t j = 0; j < N; j += 2) {
      const Vec e0 = ((Vec::loadu(st + j * N + i) - m) * sc).exp_u20();
      const Vec e1 = ((Vec::loadu(st + (j + 1) * N + i) - m) * sc).exp_u20();
      e0.store(st + j * N + i);
      e1.store(st + (j + 1) * N + i);
      s0 = s0 + e0;
      s1 = s1 + e1;
    }
    (Vec(1.f) / (s0 + s1)).store(inv + i);
  }
}

template <typename T>
void attention_rows(const T* qkv, T* out, int64_t rows, int64_t N, int64_t H, int64_t Dh) {
  const int64_t D = H * Dh, W = 3 * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> buf(N * W + D * N + N * N + N * D + 2 * N);
    float* x = buf.data();   // (N, 3D) the row's q, k, v
    float* qt = x + N * W;   // (D, N) queries, transposed
    float* st = qt + D * N;  // (N keys, N queries) one head's scores, then unnormalised probabilities
    float* o = st + N * N;   // (N, D)
    float* inv = o + N * D;  // (N,) 1 / softmax denominator per query
    float* mx = inv + N;     // (N,) largest score per query
    for (int64_t b = first; b < last; ++b) {
      at::vec::convert(qkv + b * N * W, x, N * W);
      at::vec::transpose_mxn<float>(x, W, qt, N, N, D);
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = qt + h * Dh * N;  // (Dh, N)
        const float* kh = x + D + h * Dh;   // (N, Dh), row stride W
        const float* vh = x + 2 * D + h * Dh;
        for (int64_t i0 = 0; i0 < N; i0 += kQueryVecsPerTile * kLanes) {
          Vec m[kQueryVecsPerTile];
          for (auto& v : m) v = Vec(-std::numeric_limits<float>::infinity());
          for (int64_t j0 = 0; j0 < N; j0 += kKeysPerTile) {
            Vec acc[kKeysPerTile][kQueryVecsPerTile];
            for (auto& r : acc) for (auto& v : r) v = Vec(0.f);
            for (int64_t d = 0; d < Dh; ++d) {
              Vec q[kQueryVecsPerTile];
              for (int c = 0; c < kQueryVecsPerTile; ++c) q[c] = Vec::loadu(qh + d * N + i0 + c * kLanes);
              for (int r = 0; r < kKeysPerTile; ++r) {
                const Vec k(kh[(j0 + r) * W + d]);
                for (int c = 0; c < kQueryVecsPerTile; ++c) acc[r][c] = at::vec::fmadd(k, q[c], acc[r][c]);
              }
            }
            for (int r = 0; r < kKeysPerTile; ++r)
              for (int c = 0; c < kQueryVecsPerTile; ++c) {
                acc[r][c].store(st + (j0 + r) * N + i0 + c * kLanes);
                m[c] = at::vec::maximum(m[c], acc[r][c]);
              }
          }
          for (int c = 0; c < kQueryVecsPerTile; ++c) m[c].store(mx + i0 + c * kLanes);
        }
        exp_columns(st, mx, inv, N, scale);
        for (int64_t i0 = 0; i0 < N; i0 += kQueriesPerTile)
          for (int64_t d0 = 0; d0 < Dh; d0 += kLanes) {
            Vec acc[kQueriesPerTile];
            for (auto& v : acc) v = Vec(0.f);
            for (int64_t j = 0; j < N; ++j) {
              const Vec v = Vec::loadu(vh + j * W + d0);
              const float* p = st + j * N + i0;
              for (int t = 0; t < kQueriesPerTile; ++t) acc[t] = at::vec::fmadd(Vec(p[t]), v, acc[t]);
            }
            for (int t = 0; t < kQueriesPerTile; ++t)
              (acc[t] * Vec(inv[i0 + t])).store(o + (i0 + t) * D + h * Dh + d0);
          }
      }
      at::vec::convert(o, out + b * N * D, N * D);
    }
  });
}

#if defined(CPU_CAPABILITY_AVX512)
#define DMP_BF16_DOT __attribute__((target("avx512bf16,avx512bw,avx512vl,avx512dq,avx512f,fma")))
#define DMP_INLINE inline __attribute__((always_inline))

// One 32-bit word of two bf16 values (the lower one first), as VDPBF16PS pairs its operands.
DMP_INLINE uint32_t pair_at(const at::BFloat16* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// 16 words, each the bf16 of lo[i] (lower half) and hi[i] (upper half): a column pair of two rows.
DMP_BF16_DOT DMP_INLINE __m512i pack_pairs(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(lo)));
  const __m512i h = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(hi)));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

DMP_BF16_DOT DMP_INLINE __m512 dot(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// One batch row, all heads; `words` and `buf` are scratch of the sizes attention_rows_bf16_dot gives them. (A lambda
// does not take its function's target attribute, so the row's work is a function of its own, not parallel_for's.)
DMP_BF16_DOT void attention_row_bf16_dot(const at::BFloat16* x, at::BFloat16* out, int64_t N, int64_t H, int64_t Dh,
                                         uint32_t* words, float* buf) {
  constexpr int64_t L = 16;  // fp32 lanes of a 512-bit vector
  const int64_t D = H * Dh, W = 3 * D, P = Dh / 2;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  uint32_t* qt = words;          // (Dh/2, N) one head's query pairs, transposed: lanes run over queries
  uint32_t* pt = qt + P * N;     // (N/2 key pairs, N queries) bf16 probability pairs
  uint32_t* vp = pt + N / 2 * N; // (N/2 key pairs, Dh) value pairs of two consecutive keys
  float* st = buf;               // (N keys, N queries) one head's scores
  float* o = st + N * N;         // (N, D)
  float* inv = o + N * D;        // (N,) 1 / softmax denominator per query
  float* mx = inv + N;           // (N,) largest score per query
  for (int64_t h = 0; h < H; ++h) {
    const at::BFloat16* qh = x + h * Dh;  // (N, Dh), row stride W
    const at::BFloat16* kh = x + D + h * Dh;
    const at::BFloat16* vh = x + 2 * D + h * Dh;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t p = 0; p < P; ++p) qt[p * N + i] = pair_at(qh + i * W + 2 * p);
    for (int64_t jp = 0; jp < N / 2; ++jp)
      for (int64_t d = 0; d < Dh; d += L) {
        const __m512i v0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(vh + 2 * jp * W + d)));
        const __m512i v1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(vh + (2 * jp + 1) * W + d)));
        _mm512_storeu_si512(vp + jp * Dh + d, _mm512_or_si512(v0, _mm512_slli_epi32(v1, 16)));
      }
    for (int64_t i0 = 0; i0 < N; i0 += kQueryVecsPerTile * L) {
      __m512 m[kQueryVecsPerTile];
      for (auto& v : m) v = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j0 = 0; j0 < N; j0 += kKeysPerTile) {
        __m512 acc[kKeysPerTile][kQueryVecsPerTile];
        for (auto& r : acc) for (auto& v : r) v = _mm512_setzero_ps();
        for (int64_t p = 0; p < P; ++p) {
          __m512i q[kQueryVecsPerTile];
          for (int c = 0; c < kQueryVecsPerTile; ++c) q[c] = _mm512_loadu_si512(qt + p * N + i0 + c * L);
          for (int r = 0; r < kKeysPerTile; ++r) {
            const __m512i k = _mm512_set1_epi32(static_cast<int>(pair_at(kh + (j0 + r) * W + 2 * p)));
            for (int c = 0; c < kQueryVecsPerTile; ++c) acc[r][c] = dot(acc[r][c], k, q[c]);
          }
        }
        for (int r = 0; r < kKeysPerTile; ++r)
          for (int c = 0; c < kQueryVecsPerTile; ++c) {
            _mm512_storeu_ps(st + (j0 + r) * N + i0 + c * L, acc[r][c]);
            m[c] = _mm512_max_ps(m[c], acc[r][c]);
          }
      }
      for (int c = 0; c < kQueryVecsPerTile; ++c) _mm512_storeu_ps(mx + i0 + c * L, m[c]);
    }
    exp_columns(st, mx, inv, N, scale);
    for (int64_t j = 0; j < N; j += 2)  // the exps of keys j and j + 1 as one bf16 pair per query
      for (int64_t i = 0; i < N; i += L)
        _mm512_storeu_si512(pt + j / 2 * N + i,
                            pack_pairs(_mm512_loadu_ps(st + j * N + i), _mm512_loadu_ps(st + (j + 1) * N + i)));
    for (int64_t i0 = 0; i0 < N; i0 += kQueriesPerTile)
      for (int64_t d0 = 0; d0 < Dh; d0 += L) {
        __m512 acc[kQueriesPerTile];
        for (auto& v : acc) v = _mm512_setzero_ps();
        for (int64_t jp = 0; jp < N / 2; ++jp) {
          const __m512i v = _mm512_loadu_si512(vp + jp * Dh + d0);
          const uint32_t* p = pt + jp * N + i0;
          for (int t = 0; t < kQueriesPerTile; ++t) acc[t] = dot(acc[t], _mm512_set1_epi32(static_cast<int>(p[t])), v);
        }
        for (int t = 0; t < kQueriesPerTile; ++t)
          _mm512_storeu_ps(o + (i0 + t) * D + h * Dh + d0, _mm512_mul_ps(acc[t], _mm512_set1_ps(inv[i0 + t])));
      }
  }
  at::vec::convert(o, out, N * D);
}

void attention_rows_bf16_dot(const at::BFloat16* qkv, at::BFloat16* out, int64_t rows, int64_t N, int64_t H,
                             int64_t Dh) {
  const int64_t D = H * Dh;
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<uint32_t> words(Dh / 2 * N + N / 2 * N + N / 2 * Dh);
    std::vector<float> buf(N * N + N * D + 2 * N);
    for (int64_t b = first; b < last; ++b)
      attention_row_bf16_dot(qkv + b * N * 3 * D, out + b * N * D, N, H, Dh, words.data(), buf.data());
  });
}

bool has_bf16_dot() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}
#else
bool has_bf16_dot() { return false; }
#endif

at::Tensor qkv_attention(const at::Tensor& qkv) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 5 && qkv.size(2) == 3,
              "qkv_attention: qkv must be a CPU tensor (B, N, 3, H, Dh)");
  const at::Tensor x = qkv.contiguous();
  const int64_t B = x.size(0), N = x.size(1), H = x.size(3), Dh = x.size(4);
  TORCH_CHECK(N > 0 && N % kTokenMultiple == 0 && Dh > 0 && Dh % kLanes == 0,
              "qkv_attention: tokens must be a multiple of ", kTokenMultiple, " and the head dim of ", kLanes);
  at::Tensor out = at::empty({B, N, H * Dh}, x.options());
  if (x.scalar_type() == at::kBFloat16 && has_bf16_dot()) {
#if defined(CPU_CAPABILITY_AVX512)
    attention_rows_bf16_dot(x.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>(), B, N, H, Dh);
#endif
  } else if (x.scalar_type() == at::kBFloat16) {
    attention_rows(x.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>(), B, N, H, Dh);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qkv_attention: float32 or bfloat16");
    attention_rows(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, N, H, Dh);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(dmp, m) {
  m.def("qkv_attention(Tensor qkv) -> Tensor");  // (B, N, 3, H, Dh) -> (B, N, H * Dh)
  // what the kernel takes: tokens and head dim multiples of these
  m.def("qkv_attention_multiples() -> int[]", [] { return std::vector<int64_t>{kTokenMultiple, kLanes}; });
  // whether bf16 inputs take the VDPBF16PS products (this build and this CPU)
  m.def("qkv_attention_bf16_dot() -> bool", [] { return has_bf16_dot(); });
}

TORCH_LIBRARY_IMPL(dmp, CPU, m) { m.impl("qkv_attention", &qkv_attention); }
