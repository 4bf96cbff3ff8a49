// GELU with the tanh approximation for compiled CPU inference (app/model/cpu_attention.py, app/model/dit.py):
// x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) written as x / (1 + exp(-2z)), with ATen's exp_u20 (a short
// polynomial, within 20 ulp in fp32) where Inductor's own kernel calls Sleef's expf (1 ulp) and multiplies by a
// reciprocal: on a Zen 4 core a (1024, 256) bf16 tensor takes ~136-142 us against Inductor's ~186
// (bench/results/2026-12-06-cpu-gelu-form-adhoc.log). Reduced-precision inputs are computed in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace {

using Vec = at::vec::Vectorized<float>;

at::Tensor gelu_tanh(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "gelu_tanh: a CPU tensor");
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  const auto gelu = [](Vec v) {
    const Vec z = (v + Vec(0.044715f) * v * v * v) * Vec(1.5957691216057308f);  // 2 sqrt(2/pi) (x + 0.044715 x^3)
    return v / (Vec(1.f) + z.neg().exp_u20());
  };
  const int64_t grain = 1 << 14;
  if (x.scalar_type() == at::kBFloat16) {
    const at::BFloat16* in = x.const_data_ptr<at::BFloat16>();
    at::BFloat16* o = out.mutable_data_ptr<at::BFloat16>();
    at::parallel_for(0, x.numel(), grain, [&](int64_t b, int64_t e) { at::vec::map(gelu, o + b, in + b, e - b); });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "gelu_tanh: float32 or bfloat16");
    const float* in = x.const_data_ptr<float>();
    float* o = out.mutable_data_ptr<float>();
    at::parallel_for(0, x.numel(), grain, [&](int64_t b, int64_t e) { at::vec::map(gelu, o + b, in + b, e - b); });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dmp, m) { m.def("gelu_tanh(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(dmp, CPU, m) { m.impl("gelu_tanh", &gelu_tanh); }
