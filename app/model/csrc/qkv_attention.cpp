// Self-attention on CPU for the small token counts and head dims of the demo DiTs (app/model/cpu_attention.py).
//
// At 64 tokens and head dim 16 the CPU flash kernel spends its time on per-tile overhead, not arithmetic
// (bench/README.md, session 20). This kernel does one batch row at a time, all heads, in fp32 whatever the storage
// dtype: the row's q, k, v converted once, S^T = K Q^T held whole (N x N floats), so that lanes run over queries and
// the softmax needs no horizontal reductions, then O = P V written as rows. Built with ATen's Vectorized<float>
// (AVX-512 or AVX2, whichever torch itself dispatches to).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
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
        // softmax(scale * s) = exp(scale * (s - max s)) / sum: two partial sums halve the add chain
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

at::Tensor qkv_attention(const at::Tensor& qkv) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 5 && qkv.size(2) == 3,
              "qkv_attention: qkv must be a CPU tensor (B, N, 3, H, Dh)");
  const at::Tensor x = qkv.contiguous();
  const int64_t B = x.size(0), N = x.size(1), H = x.size(3), Dh = x.size(4);
  TORCH_CHECK(N > 0 && N % kTokenMultiple == 0 && Dh > 0 && Dh % kLanes == 0,
              "qkv_attention: tokens must be a multiple of ", kTokenMultiple, " and the head dim of ", kLanes);
  at::Tensor out = at::empty({B, N, H * Dh}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
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
}

TORCH_LIBRARY_IMPL(dmp, CPU, m) { m.impl("qkv_attention", &qkv_attention); }
