// The AdamW update of `llamax.train.optim.make_optimizer` (global-norm clipping, Adam moments,
// decoupled weight decay, learning rate) as one XLA FFI custom call per parameter array, in
// place: llamax_adamw reads p, g, mu, nu once and writes p, mu, nu once. XLA's program of the same
// update (optax's transformations and apply_updates) has no multi-output fusion on CPU, so it
// runs one pass per output, each re-reading the inputs it needs: 11 array passes instead of 7.
// `llamax.train.optim.cpu_adamw_update` calls it; `llamax.model.cpu_kernels` builds it.
//
// Per element, as optax computes it: g = clip && norm >= clip ? g / norm * clip : g;
// mu = (1 - b1) g + b1 mu; nu = (1 - b2) g^2 + b2 nu;
// p += step * ((mu / bias1) / (sqrt(nu / bias2) + eps) + decay p), step = -learning rate.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llamax::AllThreads;
using llamax::ParallelFor;

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per task

// scalars: [step (= -learning rate), 1 - b1^count, 1 - b2^count, global norm of the gradients]
ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> param, ffi::Buffer<ffi::F32> grad,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> scalars, float b1,
                 float b2, float eps, float decay, float clip, ffi::ResultBuffer<ffi::F32> param_out,
                 ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out) {
  const int64_t n = param.element_count();
  if (grad.element_count() != n || mu.element_count() != n || nu.element_count() != n ||
      scalars.element_count() != 4)
    return ffi::Error::InvalidArgument("llamax_adamw expects param, grad, mu, nu of one size and 4 scalars");
  const float* s = scalars.typed_data();
  const float step = s[0], bias1 = s[1], bias2 = s[2], norm = s[3];
  const bool clipped = clip > 0 && !(norm < clip);
  const float *p_in = param.typed_data(), *g_in = grad.typed_data(), *m_in = mu.typed_data(), *v_in = nu.typed_data();
  float *p_out = param_out->typed_data(), *m_out = mu_out->typed_data(), *v_out = nu_out->typed_data();
  ParallelFor(pool, AllThreads(pool), (n + kChunk - 1) / kChunk, [=](int64_t chunk) {
    const int64_t end = std::min(n, (chunk + 1) * kChunk);
#pragma GCC ivdep
    for (int64_t i = chunk * kChunk; i < end; ++i) {
      const float g = clipped ? g_in[i] / norm * clip : g_in[i];
      const float m = (1 - b1) * g + b1 * m_in[i];
      const float v = (1 - b2) * (g * g) + b2 * v_in[i];
      const float p = p_in[i];
      float update = (m / bias1) / (std::sqrt(v / bias2) + eps);
      if (decay != 0) update += decay * p;
      p_out[i] = p + step * update;
      m_out[i] = m;
      v_out[i] = v;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaxAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("decay")
                                  .Attr<float>("clip")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
