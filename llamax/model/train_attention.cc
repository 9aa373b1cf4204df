// Causal attention of a CPU train step, forward and backward, as XLA FFI custom calls
// (`llamax.model.cpu_attention` calls them; `llamax.model.cpu_kernels` builds and registers them):
//
// * llamax_train_attention_fwd: out = softmax(q k^T + mask) v per query head, and each query's
//   row max and row sum of the exponentials (what the backward pass needs instead of the
//   probabilities).
// * llamax_train_attention_bwd: dq, dk, dv from the forward's inputs, out, its row statistics
//   and dout, the probabilities recomputed (flash attention's backward, Dao et al., 2022).
//
// The same blocks as `llamax.model.attention.attend`: the queries of block j (positions
// [j * block, (j + 1) * block)) score the keys [0, end_j), masked by `mask`. A kv head's query
// heads are rows of one matrix, so each (row, kv head, block) is a few small matrix products
// of [block * groups, head_dim] queries with [end_j, head_dim] keys and values. XLA's form of the
// same math copies q, k, v and every gradient between [batch, seq, heads, head_dim] and a
// heads-major layout, and runs softmax and its backward as separate passes over the scores;
// here q, k, v are read and the gradients written in place, and a block's scores stay in the
// cache between the products and the softmax.
//
// Inputs: q [B, T, H, D] float32, pre-scaled by 1/sqrt(D); k, v [B, T, KV, D]; mask [B, T, T]
// (true: the query sees the key); D a multiple of 16. Row statistics: [B, T, H].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llamax::AllThreads;
using llamax::ParallelFor;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_unaligned __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16_unaligned __attribute__((vector_size(16), aligned(1), may_alias));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16_unaligned*>(p); }
inline void Store(float* p, v16 v) { *reinterpret_cast<v16_unaligned*>(p) = v; }
inline v16 Splat(float x) {  // one broadcast (v16{} + x would add a zero first: -0.0 + 0 is +0)
  v16 result;
  for (int i = 0; i < 16; ++i) result[i] = x;
  return result;
}

// A masked score: what `jnp.where(mask, scores, finfo(float32).min)` gives it.
constexpr float kMasked = -std::numeric_limits<float>::max();

// exp of 16 floats: Cephes' expf (reduction by ln 2 in two parts, degree-5 polynomial), within
// 2 ulp of std::exp; 0 below -87.34 and clamped above 88.38, as float32 exp under- and overflows.
inline v16 Exp(v16 x) {
  const v16 high = Splat(88.3762626647949f), low = Splat(-87.3365447505531f);
  v16 clamped = x > high ? high : x;
  clamped = clamped < low ? low : clamped;
  // round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22)
  const v16 n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v16 r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  v16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x16 power = (__builtin_convertvector(n, i32x16) + 127) << 23;  // 2^n
  const v16 result = p * reinterpret_cast<const v16&>(power);
  return x < low ? v16{} : result;
}

// ---- matrix products: C[M, N] (+)= A(i, k) B[k, :], N a multiple of 16 ------------------------
// A(i, k) = a[i * a_row + k * a_col], so A can be read transposed (the key and value gradients
// multiply the transposed probabilities). A register tile of MR rows x NV vectors walks k.

template <int MR, int NV>
inline void Tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c,
                 int64_t ldc, int64_t K, bool accumulate) {
  v16 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? Load(c + i * ldc + 16 * v) : v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 row[NV];
    for (int v = 0; v < NV; ++v) row[v] = Load(b + k * ldb + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const float scale = a[i * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[i][v] += scale * row[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) Store(c + i * ldc + 16 * v, acc[i][v]);
}

template <int MR, int NV>
void Columns(int64_t M, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c,
             int64_t ldc, int64_t K, bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    Tile<MR, NV>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, K, accumulate);
  for (; i < M; ++i) Tile<1, NV>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, K, accumulate);
}

// Tiles of 6 x 64 columns where they fit (24 accumulators, 10 loads per 24 multiply-adds), then
// 8 x 32, then 8 x 16.
void Product(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) Columns<6, 4>(M, a, a_row, a_col, b + j, ldb, c + j, ldc, K, accumulate);
  for (; j + 32 <= N; j += 32) Columns<8, 2>(M, a, a_row, a_col, b + j, ldb, c + j, ldc, K, accumulate);
  for (; j < N; j += 16) Columns<8, 1>(M, a, a_row, a_col, b + j, ldb, c + j, ldc, K, accumulate);
}

// ---- shapes ---------------------------------------------------------------------------------------

struct Shape {
  int64_t batch, seq, heads, kv_heads, dim, groups, block;
  int64_t Blocks() const { return (seq + block - 1) / block; }
  // q, out, dq: [B, T, H, D]; row statistics [B, T, H]; k, v: [B, T, KV, D]
  int64_t QueryRow(int64_t b, int64_t t, int64_t head) const { return (b * seq + t) * heads + head; }
  int64_t KeyRow(int64_t b, int64_t s, int64_t kv) const { return (b * seq + s) * kv_heads + kv; }
};

inline int64_t Padded(int64_t n) { return (n + 31) / 32 * 32; }

// n floats, not zeroed (a block's scores are written before they are read)
inline std::unique_ptr<float[]> Scratch(int64_t n) { return std::unique_ptr<float[]>(new float[n]); }

ffi::Error CheckShapes(const char* name, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& mask, int64_t block, Shape* shape) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions(), mask_dims = mask.dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 4 || mask_dims.size() != 3 || v.element_count() != k.element_count() ||
      q_dims[0] != k_dims[0] || q_dims[1] != k_dims[1] || q_dims[3] != k_dims[3] || k_dims[2] == 0 ||
      q_dims[2] % k_dims[2] != 0 || q_dims[3] % 16 != 0 || mask_dims[0] != q_dims[0] ||
      mask_dims[1] != q_dims[1] || mask_dims[2] != q_dims[1] || block < 1)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       " expects q [B, T, H, D], k and v [B, T, KV, D] with KV dividing H "
                                       "and D a multiple of 16, mask [B, T, T], block >= 1");
  *shape = Shape{q_dims[0], q_dims[1], q_dims[2], k_dims[2], q_dims[3], q_dims[2] / k_dims[2], block};
  return ffi::Error::Success();
}

// keys [end, D] of (b, kv) as columns: dst [D, ld]
void GatherTransposed(const Shape& s, const float* src, int64_t b, int64_t kv, int64_t end, float* dst, int64_t ld) {
  constexpr int64_t kKeys = 16;  // a tile of keys x all of D: its rows stay in L1 while read across
  for (int64_t key0 = 0; key0 < end; key0 += kKeys)
    for (int64_t d = 0; d < s.dim; ++d)
      for (int64_t key = key0; key < std::min(end, key0 + kKeys); ++key)
        dst[d * ld + key] = src[s.KeyRow(b, key, kv) * s.dim + d];
  for (int64_t d = 0; d < s.dim; ++d) std::fill(dst + d * ld + end, dst + d * ld + ld, 0.0f);
}

void GatherKeys(const Shape& s, const float* src, int64_t b, int64_t kv, int64_t end, float* dst) {
  for (int64_t key = 0; key < end; ++key)
    std::memcpy(dst + key * s.dim, src + s.KeyRow(b, key, kv) * s.dim, s.dim * sizeof(float));
}

// The block's query rows of (b, kv) in order (position, group): dst [rows, D]
void GatherQueries(const Shape& s, const float* src, int64_t b, int64_t kv, int64_t t0, int64_t t1, float* dst) {
  for (int64_t t = t0; t < t1; ++t)
    std::memcpy(dst + (t - t0) * s.groups * s.dim, src + s.QueryRow(b, t, kv * s.groups) * s.dim,
                s.groups * s.dim * sizeof(float));
}

void ScatterQueries(const Shape& s, const float* src, int64_t b, int64_t kv, int64_t t0, int64_t t1, float* dst) {
  for (int64_t t = t0; t < t1; ++t)
    std::memcpy(dst + s.QueryRow(b, t, kv * s.groups) * s.dim, src + (t - t0) * s.groups * s.dim,
                s.groups * s.dim * sizeof(float));
}

// scores[key] for key < end where mask[key], kMasked elsewhere; returns the row max.
inline float MaskRow(float* scores, const bool* mask, int64_t end) {
  v16 best = Splat(kMasked);
  int64_t key = 0;
  for (; key + 16 <= end; key += 16) {
    const u8x16 seen = *reinterpret_cast<const u8x16_unaligned*>(mask + key);
    const v16 row = __builtin_convertvector(seen, i32x16) != 0 ? Load(scores + key) : Splat(kMasked);
    Store(scores + key, row);
    best = best > row ? best : row;
  }
  float result = kMasked;
  for (int i = 0; i < 16; ++i) result = std::max(result, best[i]);
  for (; key < end; ++key) {
    if (!mask[key]) scores[key] = kMasked;
    result = std::max(result, scores[key]);
  }
  return result;
}

// scores[key] = exp(scores[key] - max) * scale for key < end; returns the sum of the exponentials.
inline float ExpRow(float* scores, float max, float scale, int64_t end) {
  v16 sum{};
  int64_t key = 0;
  for (; key + 16 <= end; key += 16) {
    const v16 e = Exp(Load(scores + key) - max);
    sum += e;
    Store(scores + key, e * scale);
  }
  float total = 0;
  for (int i = 0; i < 16; ++i) total += sum[i];
  for (; key < end; ++key) {
    const float e = std::exp(scores[key] - max);
    total += e;
    scores[key] = e * scale;
  }
  return total;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, int64_t block, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> row_sum) {
  Shape s;
  if (ffi::Error error = CheckShapes("llamax_train_attention_fwd", q, k, v, mask, block, &s); error.failure())
    return error;
  const float *q_data = q.typed_data(), *k_data = k.typed_data(), *v_data = v.typed_data();
  const bool* mask_data = mask.typed_data();
  float *out_data = out->typed_data(), *max_data = row_max->typed_data(), *sum_data = row_sum->typed_data();
  // One task per (row, kv head): its keys are transposed once for all its blocks.
  ParallelFor(pool, AllThreads(pool), s.batch * s.kv_heads, [=](int64_t pair) {
    const int64_t b = pair / s.kv_heads, kv = pair % s.kv_heads, D = s.dim, T = s.seq, ld_all = Padded(T);
    const int64_t max_rows = std::min(s.block, T) * s.groups;
    auto keys_t = Scratch(D * ld_all), values = Scratch(T * D), queries = Scratch(max_rows * D);
    auto scores = Scratch(max_rows * ld_all), result = Scratch(max_rows * D), inverse = Scratch(max_rows);
    GatherTransposed(s, k_data, b, kv, T, keys_t.get(), ld_all);
    GatherKeys(s, v_data, b, kv, T, values.get());
    for (int64_t j = 0; j < s.Blocks(); ++j) {
      const int64_t t0 = j * s.block, t1 = std::min(T, t0 + s.block), end = t1, ld = Padded(end);
      const int64_t rows = (t1 - t0) * s.groups;
      GatherQueries(s, q_data, b, kv, t0, t1, queries.get());
      Product(rows, ld, D, queries.get(), D, 1, keys_t.get(), ld_all, scores.get(), ld, false);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / s.groups, index = s.QueryRow(b, t, kv * s.groups + r % s.groups);
        float* row = scores.get() + r * ld;
        const float best = MaskRow(row, mask_data + (b * T + t) * T, end);
        const float total = ExpRow(row, best, 1.0f, end);
        max_data[index] = best;
        sum_data[index] = total;
        inverse[r] = 1.0f / total;
      }
      Product(rows, D, end, scores.get(), ld, 1, values.get(), D, result.get(), D, false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) result[r * D + d] *= inverse[r];
      ScatterQueries(s, result.get(), b, kv, t0, t1, out_data);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> row_max,
                    ffi::Buffer<ffi::F32> row_sum, ffi::Buffer<ffi::F32> out_grad, int64_t block,
                    ffi::ResultBuffer<ffi::F32> q_grad, ffi::ResultBuffer<ffi::F32> k_grad,
                    ffi::ResultBuffer<ffi::F32> v_grad) {
  Shape s;
  if (ffi::Error error = CheckShapes("llamax_train_attention_bwd", q, k, v, mask, block, &s); error.failure())
    return error;
  const float *q_data = q.typed_data(), *k_data = k.typed_data(), *v_data = v.typed_data();
  const float *out_data = out.typed_data(), *max_data = row_max.typed_data(), *sum_data = row_sum.typed_data();
  const float* dout_data = out_grad.typed_data();
  const bool* mask_data = mask.typed_data();
  float *dq_data = q_grad->typed_data(), *dk_data = k_grad->typed_data(), *dv_data = v_grad->typed_data();
  ParallelFor(pool, AllThreads(pool), s.batch * s.kv_heads, [=](int64_t pair) {
    const int64_t b = pair / s.kv_heads, kv = pair % s.kv_heads, D = s.dim, T = s.seq, ld_all = Padded(T);
    auto keys_t = Scratch(D * ld_all), values_t = Scratch(D * ld_all), keys = Scratch(T * D);
    std::vector<float> key_grads(T * D), value_grads(T * D);  // zeroed: the blocks add to them
    GatherTransposed(s, k_data, b, kv, T, keys_t.get(), ld_all);
    GatherTransposed(s, v_data, b, kv, T, values_t.get(), ld_all);
    GatherKeys(s, k_data, b, kv, T, keys.get());
    const int64_t max_rows = std::min(s.block, T) * s.groups;
    auto queries = Scratch(max_rows * D), outs = Scratch(max_rows * D), douts = Scratch(max_rows * D);
    auto dqueries = Scratch(max_rows * D), probs = Scratch(max_rows * ld_all), probs_grad = Scratch(max_rows * ld_all);
    for (int64_t j = 0; j < s.Blocks(); ++j) {
      const int64_t t0 = j * s.block, t1 = std::min(T, t0 + s.block), end = t1, ld = Padded(end);
      const int64_t rows = (t1 - t0) * s.groups;
      GatherQueries(s, q_data, b, kv, t0, t1, queries.get());
      GatherQueries(s, out_data, b, kv, t0, t1, outs.get());
      GatherQueries(s, dout_data, b, kv, t0, t1, douts.get());
      // probabilities, recomputed: [rows, end] (row stride ld)
      Product(rows, ld, D, queries.get(), D, 1, keys_t.get(), ld_all, probs.get(), ld, false);
      // d probabilities = dout v^T
      Product(rows, ld, D, douts.get(), D, 1, values_t.get(), ld_all, probs_grad.get(), ld, false);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / s.groups, index = s.QueryRow(b, t, kv * s.groups + r % s.groups);
        float* p = probs.get() + r * ld;
        MaskRow(p, mask_data + (b * T + t) * T, end);
        ExpRow(p, max_data[index], 1.0f / sum_data[index], end);
        float dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += douts[r * D + d] * outs[r * D + d];
        // d scores = p * (dp - rowsum(dout * out)), in place of dp
        float* dp = probs_grad.get() + r * ld;
        int64_t key = 0;
        for (; key + 16 <= end; key += 16) Store(dp + key, Load(p + key) * (Load(dp + key) - dot));
        for (; key < end; ++key) dp[key] = p[key] * (dp[key] - dot);
      }
      const float* scores_grad = probs_grad.get();
      Product(rows, D, end, scores_grad, ld, 1, keys.get(), D, dqueries.get(), D, false);
      ScatterQueries(s, dqueries.get(), b, kv, t0, t1, dq_data);
      // dk[:end] += d scores^T q, dv[:end] += p^T dout
      Product(end, D, rows, scores_grad, 1, ld, queries.get(), D, key_grads.data(), D, true);
      Product(end, D, rows, probs.get(), 1, ld, douts.get(), D, value_grads.data(), D, true);
    }
    for (int64_t key = 0; key < T; ++key) {
      std::memcpy(dk_data + s.KeyRow(b, key, kv) * D, key_grads.data() + key * D, D * sizeof(float));
      std::memcpy(dv_data + s.KeyRow(b, key, kv) * D, value_grads.data() + key * D, D * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaxTrainAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaxTrainAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
