// A CPU decode step's two kinds of work as XLA FFI custom calls; `llamax.model.decode_kernels`
// builds and registers them:
//
// * llamax_thin_matmul(_bf16, _s8): y[M, N] = x[M, K] @ w[K, N] in float32 for a few rows x (the
//   projections), with w float32, bfloat16 or int8 (weight-only decode: read narrow, widened in
//   registers; an int8 kernel's per-column scales stay outside, on y).
// * llamax_step_attention: one new query per head over the KV cache as it was before the step,
//   plus the step's own key/value (`llamax.model.attention.attend_step`).
//
// Projections. XLA:CPU's dot libraries (Eigen, YNNPACK) and MKL pack the weight matrix for every
// product, which for 1-8 rows costs more than the arithmetic: a decode step's weights stream at
// 12 GB/s for 8 rows where the memory delivers 25-30. Here w is read once, in place: each thread
// takes a range of columns; a register tile of MB rows x NV vectors accumulates kBlock rows of w
// at a time, and the tiles walk along those rows, so w is read as kBlock sequential streams.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <memory>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llamax::AllThreads;
using llamax::ParallelFor;

namespace {

// 16 floats: one AVX-512 register; the compiler splits it where the CPU has AVX2 only.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16_unaligned __attribute__((vector_size(64), aligned(4), may_alias));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16_unaligned*>(p); }
inline void Store(float* p, v16 v) { *reinterpret_cast<v16_unaligned*>(p) = v; }

// 16 weights as float32, from float32, bfloat16 (the high half of a float32) or int8.
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16_unaligned __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline v16 LoadWeights(const float* p) { return Load(p); }
inline v16 LoadWeights(const uint16_t* p) {
  const u16x16 half = *reinterpret_cast<const u16x16_unaligned*>(p);
  return (v16)(__builtin_convertvector(half, u32x16) << 16);
}
// int8 by intrinsics: GCC turns a vector conversion from int8 into 16 scalar conversions.
inline v16 LoadWeights(const int8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
#if defined(__AVX512F__)
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
#else  // AVX2: two halves of 8
  const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
  v16 out;
  std::memcpy(&out, &low, sizeof low);
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof low, &high, sizeof high);
  return out;
#endif
}
inline float Weight(float w) { return w; }
inline float Weight(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline float Weight(int8_t w) { return float(w); }

constexpr int64_t kBlock = 16;    // rows of w per pass of a tile (sequential streams)
constexpr int kMaxRows = 8;       // rows of x per pass over w
constexpr int64_t kColumnGrain = 128;  // a thread's columns: a multiple of the widest tile

// y[:MB, n:n + 16 NV] (+)= x[:MB, k0:k1] @ w[k0:k1, n:n + 16 NV]; the first block starts from 0.
template <int MB, int NV, typename W>
inline void Tile(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n,
                 int64_t k0, int64_t k1) {
  v16 acc[MB][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[m][j] = k0 == 0 ? v16{} : Load(y + m * N + n + 16 * j);
  for (int64_t k = k0; k < k1; ++k) {
    const W* w_row = w + k * N + n;
    v16 w_vectors[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) w_vectors[j] = LoadWeights(w_row + 16 * j);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const float x_mk = x[m * K + k];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[m][j] += x_mk * w_vectors[j];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) Store(y + m * N + n + 16 * j, acc[m][j]);
}

// Columns [n0, n1) of y for MB rows. Tiles hold 16 accumulators: 8 vectors wide for 1-2 rows,
// 4 for 3-4 rows, 2 for 5-8 rows.
template <int MB, typename W>
void Columns(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int NV = MB <= 2 ? 8 : MB <= 4 ? 4 : 2;
  const int64_t vector_end = n0 + (n1 - n0) / 16 * 16;
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = std::min(K, k0 + kBlock);
    int64_t n = n0;
    for (; n + 16 * NV <= vector_end; n += 16 * NV) Tile<MB, NV, W>(x, w, y, K, N, n, k0, k1);
    for (; n < vector_end; n += 16) Tile<MB, 1, W>(x, w, y, K, N, n, k0, k1);
  }
  for (int64_t n = vector_end; n < n1; ++n)  // fewer than 16 columns left
    for (int m = 0; m < MB; ++m) {
      float sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * Weight(w[k * N + n]);
      y[m * N + n] = sum;
    }
}

template <typename W>
using ColumnsFn = void (*)(const float*, const W*, float*, int64_t, int64_t, int64_t, int64_t);
template <typename W>
constexpr ColumnsFn<W> kColumnsByRows[kMaxRows + 1] = {
    nullptr,        Columns<1, W>, Columns<2, W>, Columns<3, W>, Columns<4, W>,
    Columns<5, W>, Columns<6, W>, Columns<7, W>, Columns<8, W>};

template <ffi::DataType WeightType>
ffi::Error ThinMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WeightType> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  using W = ffi::NativeType<WeightType>;
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[0])
    return ffi::Error::InvalidArgument("llamax_thin_matmul expects x [rows, K] and w [K, N]");
  const int64_t rows = x_dims[0], K = x_dims[1], N = w_dims[1];
  const float* x_data = x.typed_data();
  const W* w_data = w.typed_data();
  float* y_data = y->typed_data();
  if (K == 0) std::fill(y_data, y_data + rows * N, 0.0f);  // an empty sum
  if (rows == 0 || N == 0 || K == 0) return ffi::Error::Success();
  // Small products stay on the calling thread: waking another costs more than it saves.
  const int64_t threads = K * N < (1 << 16) ? 1 : AllThreads(pool);
  // One range of columns per thread, a multiple of the widest tile.
  const int64_t per_thread = (N + threads - 1) / threads;
  const int64_t chunk = (per_thread + kColumnGrain - 1) / kColumnGrain * kColumnGrain;
  ParallelFor(pool, threads, (N + chunk - 1) / chunk, [=](int64_t c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
      const int64_t block_rows = std::min<int64_t>(kMaxRows, rows - m0);
      kColumnsByRows<W>[block_rows](x_data + m0 * K, w_data, y_data + m0 * N, K, N, n0, n1);
    }
  });
  return ffi::Error::Success();
}

// ---- step attention -----------------------------------------------------------------------
// Per (row, kv head): the group's G queries score the filled cache slots (a masked slot is
// neither read nor weighted: exp(-inf) is what softmax gives it) and the step's own key, then
// average the values. The cache is read once per kv head, not once per query head.

inline float Dot(const float* a, const float* b, int64_t n) {
  v16 sum{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) sum += Load(a + i) * Load(b + i);
  float total = 0;
  for (int j = 0; j < 16; ++j) total += sum[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

inline void AddScaled(float* out, const float* v, float scale, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) Store(out + i, Load(out + i) + scale * Load(v + i));
  for (; i < n; ++i) out[i] += scale * v[i];
}

ffi::Error StepAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                         ffi::Buffer<ffi::F32> own_k, ffi::Buffer<ffi::F32> own_v,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 4 || v.element_count() != k.element_count() ||
      q_dims[0] != k_dims[0] || q_dims[1] != k_dims[1] || q_dims[3] != k_dims[3] ||
      mask.element_count() != k_dims[0] * k_dims[2] ||
      own_k.element_count() != k_dims[0] * k_dims[1] * k_dims[3] ||
      own_v.element_count() != own_k.element_count())
    return ffi::Error::InvalidArgument(
        "llamax_step_attention expects q [B, K, G, D], k and v [B, K, S, D], mask [B, S], "
        "own key and value [B, K, D]");
  const int64_t batch = k_dims[0], kv_heads = k_dims[1], length = k_dims[2], dim = k_dims[3];
  const int64_t groups = q_dims[2];
  const float* q_data = q.typed_data();  // pre-scaled by 1/sqrt(D)
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const bool* mask_data = mask.typed_data();
  const float* own_k_data = own_k.typed_data();
  const float* own_v_data = own_v.typed_data();
  float* out_data = out->typed_data();
  const int64_t threads = batch * kv_heads * length * dim < (1 << 14) ? 1 : AllThreads(pool);
  ParallelFor(pool, threads, batch * kv_heads, [=](int64_t pair) {
    const int64_t row = pair / kv_heads;
    const float* keys = k_data + pair * length * dim;    // [S, D]
    const float* values = v_data + pair * length * dim;  // [S, D]
    const bool* filled = mask_data + row * length;       // [S]
    const float* own_key = own_k_data + pair * dim;
    const float* own_value = own_v_data + pair * dim;
    std::vector<float> scores((length + 1) * groups);  // [S + 1, G]: the last slot is the own key
    for (int64_t g = 0; g < groups; ++g) {
      const float* query = q_data + (pair * groups + g) * dim;
      float best = scores[length * groups + g] = Dot(query, own_key, dim);
      for (int64_t s = 0; s < length; ++s) {
        if (!filled[s]) continue;
        const float score = Dot(query, keys + s * dim, dim);
        scores[s * groups + g] = score;
        best = std::max(best, score);
      }
      float sum = 0;
      for (int64_t s = 0; s <= length; ++s) {
        if (s < length && !filled[s]) continue;
        sum += scores[s * groups + g] = std::exp(scores[s * groups + g] - best);
      }
      float* result = out_data + (pair * groups + g) * dim;
      std::fill(result, result + dim, 0.0f);
      const float inverse = 1.0f / sum;
      for (int64_t s = 0; s < length; ++s)
        if (filled[s]) AddScaled(result, values + s * dim, scores[s * groups + g] * inverse, dim);
      AddScaled(result, own_value, scores[length * groups + g] * inverse, dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define LLAMAX_THIN_MATMUL(name, weight_type)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, ThinMatmul<weight_type>,                                  \
                                ffi::Ffi::Bind()                                                \
                                    .Ctx<ffi::ThreadPool>()                                     \
                                    .Arg<ffi::Buffer<ffi::F32>>()                               \
                                    .Arg<ffi::Buffer<weight_type>>()                            \
                                    .Ret<ffi::Buffer<ffi::F32>>());
LLAMAX_THIN_MATMUL(LlamaxThinMatmul, ffi::F32)
LLAMAX_THIN_MATMUL(LlamaxThinMatmulBf16, ffi::BF16)
LLAMAX_THIN_MATMUL(LlamaxThinMatmulS8, ffi::S8)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaxStepAttention, StepAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
