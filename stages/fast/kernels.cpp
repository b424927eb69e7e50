// Fused CPU kernels for the notebook block: its token MLP, its BatchNorm (training mode)
// followed by dropout, and the element-wise work around the Linear layers' products.
//
// torch runs BatchNorm, the dropout mask's random bits, the mask and the multiply as separate
// passes over the (rows x channels) activations, each reading and writing tens of megabytes;
// here the forward is one pass for the statistics and one for the output and the mask, the
// backward one pass for the sums and one for the input gradient.
// The token MLP (below) works on column tiles that stay in cache, and takes over the
// BatchNorm's statistics pass and input-gradient pass, and the patch stem before it.
//
// Every sum is taken over a fixed number of row chunks and added in chunk order, in double
// precision, so results do not depend on the number of threads. The dropout mask of element k
// (row-major index) keeps it if the top 16 bits of SplitMix64(seed + (k + 1) * golden) are at
// least `threshold` (p = threshold / 2^16: p rounded to a multiple of 2^-16).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <vector>

namespace {

constexpr int64_t kChunks = 64;
constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 &&
                  t.is_contiguous(),
              name, " must be a contiguous 2-D float32 CPU tensor");
}

// Column sums of f(row i, column j) over the rows, in double, chunk by chunk.
template <typename F>
std::vector<double> column_sums(int64_t rows, int64_t cols, int sums, F f) {
  std::vector<double> partial(kChunks * sums * cols, 0.0);
  const int64_t per_chunk = (rows + kChunks - 1) / kChunks;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < kChunks; ++c) {
    double* acc = partial.data() + c * sums * cols;
    for (int64_t i = c * per_chunk; i < std::min(rows, (c + 1) * per_chunk); ++i) f(i, acc);
  }
  std::vector<double> total(sums * cols, 0.0);
  for (int64_t c = 0; c < kChunks; ++c)
    for (int64_t j = 0; j < sums * cols; ++j) total[j] += partial[c * sums * cols + j];
  return total;
}

}  // namespace

// x (N, C) -> y = dropout(batch_norm(x)), keep (N, C) uint8 (empty when threshold is 0),
// the batch mean and biased variance per column, and invstd = 1 / sqrt(var + eps).
// `sums`: x's column sums and sums of squares (2, C) in float64 where the pass that wrote x
// took them (token_mlp_forward), else empty.
std::vector<torch::Tensor> batch_norm_dropout_forward(torch::Tensor x, torch::Tensor weight,
                                                      torch::Tensor bias, double eps,
                                                      int64_t threshold, double scale,
                                                      int64_t seed, torch::Tensor sums_given) {
  check_rows(x, "x");
  const int64_t N = x.size(0), C = x.size(1);
  const float* xp = x.data_ptr<float>();
  const std::vector<double> sums = sums_given.numel() ? std::vector<double>(
      sums_given.data_ptr<double>(), sums_given.data_ptr<double>() + 2 * C)
      : column_sums(N, C, 2, [&](int64_t i, double* acc) {
    const float* row = xp + i * C;
    double* sq = acc + C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const double v = row[j];
      acc[j] += v;
      sq[j] += v * v;
    }
  });

  auto opts = x.options();
  torch::Tensor mean = torch::empty({C}, opts), var = torch::empty({C}, opts),
                invstd = torch::empty({C}, opts);
  std::vector<float> a(C), b(C);  // y = (x * a + b) * keep
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  for (int64_t j = 0; j < C; ++j) {
    const double m = sums[j] / N, v = std::max(sums[C + j] / N - m * m, 0.0);
    const double is = 1.0 / std::sqrt(v + eps);
    mean.data_ptr<float>()[j] = m;
    var.data_ptr<float>()[j] = v;
    invstd.data_ptr<float>()[j] = is;
    a[j] = is * w[j] * scale;
    b[j] = (bi[j] - m * is * w[j]) * scale;
  }

  torch::Tensor y = torch::empty_like(x);
  float* yp = y.data_ptr<float>();
  const bool dropout = threshold > 0;
  torch::Tensor keep = torch::empty({dropout ? N : 0, C}, opts.dtype(torch::kUInt8));
  uint8_t* kp = keep.data_ptr<uint8_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint16_t limit = static_cast<uint16_t>(threshold);
  const float* ap = a.data();
  const float* bp = b.data();
  if (dropout) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const float* row = xp + i * C;
      float* out = yp + i * C;
      uint8_t* k = kp + i * C;
      const uint64_t first = static_cast<uint64_t>(i * C) + 1;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j)
        k[j] = static_cast<uint16_t>(splitmix64(key + (first + j) * kGolden) >> 48) >= limit;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) out[j] = (row[j] * ap[j] + bp[j]) * k[j];
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const float* row = xp + i * C;
      float* out = yp + i * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) out[j] = row[j] * ap[j] + bp[j];
    }
  }
  return {y, keep, mean, var, invstd};
}

// The gradients of batch_norm_dropout_forward. With g the gradient at the BatchNorm's output
// (grad through the mask) and xhat = (x - mean) * invstd: grad_bias = sum g, grad_weight =
// sum g xhat, grad_x = w invstd (g - mean g - xhat mean g xhat) = grad * keep * a + x * b + d
// per column. Returns grad_weight, grad_bias and the columns' a, b, d (one pass over the rows).
std::vector<torch::Tensor> batch_norm_dropout_grad_terms(torch::Tensor grad, torch::Tensor x,
                                                         torch::Tensor keep, torch::Tensor mean,
                                                         torch::Tensor invstd,
                                                         torch::Tensor weight, double scale) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  const int64_t N = x.size(0), C = x.size(1);
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const bool dropout = keep.numel() > 0;
  const uint8_t* kp = dropout ? keep.data_ptr<uint8_t>() : nullptr;
  const float* mp = mean.data_ptr<float>();
  const float s = scale;
  const std::vector<double> sums = column_sums(N, C, 2, [&](int64_t i, double* acc) {
    const float* g = gp + i * C;
    const float* row = xp + i * C;
    double* gx = acc + C;
    if (dropout) {
      const uint8_t* k = kp + i * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const double gb = g[j] * s * k[j];
        acc[j] += gb;
        gx[j] += gb * (row[j] - mp[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const double gb = g[j] * s;
        acc[j] += gb;
        gx[j] += gb * (row[j] - mp[j]);
      }
    }
  });

  auto opts = x.options();
  torch::Tensor grad_weight = torch::empty({C}, opts), grad_bias = torch::empty({C}, opts);
  torch::Tensor a = torch::empty({C}, opts), b = torch::empty({C}, opts),
                d = torch::empty({C}, opts);
  const float* w = weight.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  for (int64_t j = 0; j < C; ++j) {
    const double mean_g = sums[j] / N, mean_gxhat = sums[C + j] * is[j] / N;
    const double k1 = static_cast<double>(w[j]) * is[j];
    grad_bias.data_ptr<float>()[j] = sums[j];
    grad_weight.data_ptr<float>()[j] = sums[C + j] * is[j];
    a.data_ptr<float>()[j] = k1 * s;  // the dropout's scale folded in
    b.data_ptr<float>()[j] = -k1 * is[j] * mean_gxhat;
    d.data_ptr<float>()[j] = k1 * (mp[j] * is[j] * mean_gxhat - mean_g);
  }
  return {grad_weight, grad_bias, a, b, d};
}

// grad_x = grad * keep * a + x * b + d per column (the terms of batch_norm_dropout_grad_terms).
torch::Tensor batch_norm_dropout_grad_input(torch::Tensor grad, torch::Tensor x, torch::Tensor keep,
                                            torch::Tensor a, torch::Tensor b, torch::Tensor d) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  const int64_t N = x.size(0), C = x.size(1);
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const bool dropout = keep.numel() > 0;
  const uint8_t* kp = dropout ? keep.data_ptr<uint8_t>() : nullptr;
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *dp = d.data_ptr<float>();
  torch::Tensor grad_x = torch::empty_like(x);
  float* gxp = grad_x.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* g = gp + i * C;
    const float* row = xp + i * C;
    float* out = gxp + i * C;
    if (dropout) {
      const uint8_t* k = kp + i * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) out[j] = g[j] * k[j] * ap[j] + row[j] * bp[j] + dp[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) out[j] = g[j] * ap[j] + row[j] * bp[j] + dp[j];
    }
  }
  return grad_x;
}

// For a Linear layer's backward over rows: g = grad through the ReLU whose output is `out`
// (`out` empty: no ReLU, g = grad), the bias gradient (g's column sums), and with `transposed`
// also g^T, so that the weight gradient g^T x is a product oneDNN reads without a separate
// transposing copy (else an empty tensor: a narrow layer's mm reads g in place).
std::vector<torch::Tensor> linear_grad(torch::Tensor grad, torch::Tensor out, bool transposed) {
  check_rows(grad, "grad");
  const bool relu = out.numel() > 0;
  if (relu) check_rows(out, "out");
  const int64_t N = grad.size(0), H = grad.size(1);
  torch::Tensor g = relu ? torch::empty_like(grad) : grad;
  torch::Tensor g_t = torch::empty({transposed ? H : 0, transposed ? N : 0}, grad.options());
  const float* gp = grad.data_ptr<float>();
  const float* op = relu ? out.data_ptr<float>() : nullptr;
  float* rp = g.data_ptr<float>();
  float* tp = g_t.data_ptr<float>();
  const std::vector<double> sums = column_sums(N, H, 1, [&](int64_t i, double* acc) {
    if (relu) {
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const float v = gp[i * H + j], o = op[i * H + j];  // both loaded: no branch
        rp[i * H + j] = o > 0.0f ? v : 0.0f;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) acc[j] += rp[i * H + j];
  });
  if (transposed) {  // in tiles of 16 x 16, each read and written while in cache
    constexpr int64_t kTile = 16;
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < N; i0 += kTile) {
      const int64_t i1 = std::min(N, i0 + kTile);
      for (int64_t j0 = 0; j0 < H; j0 += kTile) {
        const int64_t j1 = std::min(H, j0 + kTile);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = i0; i < i1; ++i) tp[j * N + i] = rp[i * H + j];
      }
    }
  }
  torch::Tensor bias_grad = torch::empty({H}, grad.options());
  for (int64_t j = 0; j < H; ++j) bias_grad.data_ptr<float>()[j] = sums[j];
  return {g, g_t, bias_grad};
}

// In place, for a token-mixing layer's forward (rows are the layer's outputs): x[r, :] += bias[r],
// then the ReLU if `relu`, in one pass instead of two.
void bias_relu_rows_(torch::Tensor x, torch::Tensor bias, bool relu) {
  check_rows(x, "x");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(0) && bias.is_contiguous() &&
                  bias.scalar_type() == torch::kFloat32,
              "bias must hold one float32 per row of x");
  const int64_t H = x.size(0), K = x.size(1);
  float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < H; ++r) {
    float* row = xp + r * K;
    const float b = bp[r];
    if (relu) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) row[k] = std::max(row[k] + b, 0.0f);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) row[k] += b;
    }
  }
}

// For a token-mixing layer's backward (rows are the layer's outputs): g = grad through the
// ReLU whose output is `out`, and the bias gradient, g's row sums.
std::vector<torch::Tensor> relu_grad_row_sums(torch::Tensor grad, torch::Tensor out) {
  check_rows(grad, "grad");
  check_rows(out, "out");
  const int64_t H = grad.size(0), K = grad.size(1);
  torch::Tensor g = torch::empty_like(grad);
  torch::Tensor bias_grad = torch::empty({H}, grad.options());
  const float* gp = grad.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  float* rp = g.data_ptr<float>();
  float* bp = bias_grad.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < H; ++r) {
    double total = 0.0;
    for (int64_t k0 = 0; k0 < K; k0 += 1024) {  // float partial sums of 1024, added in double
      float part = 0.0f;
      const int64_t k1 = std::min(K, k0 + 1024);
#pragma omp simd reduction(+ : part)
      for (int64_t k = k0; k < k1; ++k) {
        const float g = gp[r * K + k], o = op[r * K + k];
        const float v = o > 0.0f ? g : 0.0f;
        rp[r * K + k] = v;
        part += v;
      }
      total += part;
    }
    bp[r] = total;
  }
  return {g, bias_grad};
}

// ---- The notebook block's token MLP, Y = W2 relu(W1 X + b1) + b2 over the token rows ----
//
// X is (tokens, columns), columns = batch x channels. Run as separate products, each layer's
// thin output (up to 80 x 76800) is written to memory and read back by the next pass, which
// makes them memory-bound. Here the columns go in tiles of kTile: a tile's
// hidden layer is computed, rectified and used by the second layer while in L1/L2, and the
// outputs that only later passes read are written with streaming stores. The hidden layer is
// saved for the backward in tile order ((tiles, hidden, kTile): each tile one contiguous block).
// The backward does the same per tile: the ReLU's gradient, both input products and the
// weight and bias gradients' sums, over a fixed number of column chunks (kTokenChunks, each
// summed in float, then added in chunk order in double: the same result for any thread count).
namespace {

typedef float vec __attribute__((vector_size(64)));                  // 16 floats
typedef float unaligned_vec __attribute__((vector_size(64), aligned(4)));
constexpr int kVecs = 4;                      // vectors per tile row
constexpr int64_t kTile = 16 * kVecs;         // columns per tile
constexpr int kRows = 5;  // output rows per register block of `product`: 80 and 60 rows in full blocks
constexpr int64_t kTokenChunks = 16;

inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<unaligned_vec*>(p) = v; }
inline vec splat(float a) { return vec{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
inline void store_streaming(float* p, vec v) {  // p 64-byte aligned
#ifdef __AVX512F__
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#else
  store(p, v);
#endif
}
inline float sum_lanes(vec v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// What `product` does with its result before storing it.
struct Epilogue {
  const float* bias = nullptr;  // one per output row
  bool relu = false;
  const float* mask = nullptr;  // (rows, kTile): keep where mask > 0 (a ReLU's backward)
  bool streaming = false;       // C is 64-byte aligned and not read again soon
  float* column_sums = nullptr; // (2, kTile): += the result's column sums and sums of squares
};

// C[R x kTile] = A[R x K] B[K x kTile], then the epilogue: R rows of A at stride lda, B's rows
// at stride kTile, C's at stride ldc. All R x kTile sums stay in registers over the K loop.
template <int R>
inline void product_rows(const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                         int64_t K, const Epilogue& e) {
  vec acc[R][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[r][v] = splat(e.bias ? e.bias[r] : 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    vec b[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) b[v] = load(B + k * kTile + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vec a = splat(A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] += a * b[v];
    }
  }
  const vec zero{};
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      vec out = acc[r][v];
      if (e.relu) out = out > zero ? out : zero;
      if (e.mask) out = load(e.mask + r * kTile + 16 * v) > zero ? out : zero;
      if (e.column_sums) {
        float* sums = e.column_sums + 16 * v;
        store(sums, load(sums) + out);
        store(sums + kTile, load(sums + kTile) + out * out);
      }
      if (e.streaming)
        store_streaming(C + r * ldc + 16 * v, out);
      else
        store(C + r * ldc + 16 * v, out);
    }
}

// C[M x kTile] = A[M x K] B[K x kTile] (B a packed tile), register block by register block.
inline void product(int64_t M, const float* A, const float* B, float* C, int64_t ldc, int64_t K,
                    Epilogue e) {
  int64_t r = 0;
  const auto at = [&](int64_t row) {
    Epilogue shifted = e;
    if (e.bias) shifted.bias = e.bias + row;
    if (e.mask) shifted.mask = e.mask + row * kTile;
    return shifted;
  };
  for (; r + kRows <= M; r += kRows) product_rows<kRows>(A + r * K, K, B, C + r * ldc, ldc, K, at(r));
  const float* a = A + r * K;
  float* c = C + r * ldc;
  switch (M - r) {
    case 4: product_rows<4>(a, K, B, c, ldc, K, at(r)); break;
    case 3: product_rows<3>(a, K, B, c, ldc, K, at(r)); break;
    case 2: product_rows<2>(a, K, B, c, ldc, K, at(r)); break;
    case 1: product_rows<1>(a, K, B, c, ldc, K, at(r)); break;
    default: break;
  }
}

// `rows` rows of `cols` <= kTile columns at stride ld -> a packed tile, zero beyond `cols`.
inline void pack_tile(const float* src, int64_t ld, int64_t rows, int64_t cols, float* tile) {
  if (cols == kTile) {
    for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {  // the same row two tiles on: the next but one to pack
        __builtin_prefetch(src + r * ld + 2 * kTile + 16 * v, 0, 0);
        store(tile + r * kTile + 16 * v, load(src + r * ld + 16 * v));
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < kTile; ++c) tile[r * kTile + c] = c < cols ? src[r * ld + c] : 0.0f;
}

// The first `cols` columns of a packed tile -> rows at stride ld.
inline void unpack_tile(const float* tile, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = tile[r * kTile + c];
}

// acc[i * ldc + j] += sum over the columns of `tiles` packed tiles of A[i, :] B[j, :], for an
// R x S block; A's and B's tiles at strides a_step and b_step.
template <int R, int S>
inline void dot_block(const float* A, int64_t a_step, const float* B, int64_t b_step, int64_t tiles,
                      float* acc, int64_t ldc) {
  vec sums[R][S] = {};
  for (int64_t t = 0; t < tiles; ++t)
    for (int v = 0; v < kVecs; ++v) {
      vec a[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) a[i] = load(A + t * a_step + i * kTile + 16 * v);
#pragma GCC unroll 5
      for (int j = 0; j < S; ++j) {
        const vec b = load(B + t * b_step + j * kTile + 16 * v);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) sums[i][j] += a[i] * b;
      }
    }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < S; ++j) acc[i * ldc + j] += sum_lanes(sums[i][j]);
}

template <int R>
inline void dot_row_block(const float* A, int64_t a_step, const float* B, int64_t b_step,
                          int64_t N, int64_t tiles, float* acc) {
  int64_t j = 0;
  for (; j + 5 <= N; j += 5)
    dot_block<R, 5>(A, a_step, B + j * kTile, b_step, tiles, acc + j, N);
  const float* b = B + j * kTile;
  switch (N - j) {
    case 4: dot_block<R, 4>(A, a_step, b, b_step, tiles, acc + j, N); break;
    case 3: dot_block<R, 3>(A, a_step, b, b_step, tiles, acc + j, N); break;
    case 2: dot_block<R, 2>(A, a_step, b, b_step, tiles, acc + j, N); break;
    case 1: dot_block<R, 1>(A, a_step, b, b_step, tiles, acc + j, N); break;
    default: break;
  }
}

// acc (M x N) += A B^T over `tiles` consecutive packed tiles: A's tiles (M, kTile) at stride
// a_step, B's (N, kTile) at stride b_step. The weight gradient of a token layer.
inline void dot_tiles(int64_t M, const float* A, int64_t a_step, int64_t N, const float* B,
                      int64_t b_step, int64_t tiles, float* acc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4)
    dot_row_block<4>(A + i * kTile, a_step, B, b_step, N, tiles, acc + i * N);
  const float* a = A + i * kTile;
  float* c = acc + i * N;
  switch (M - i) {
    case 3: dot_row_block<3>(a, a_step, B, b_step, N, tiles, c); break;
    case 2: dot_row_block<2>(a, a_step, B, b_step, N, tiles, c); break;
    case 1: dot_row_block<1>(a, a_step, B, b_step, N, tiles, c); break;
    default: break;
  }
}

// acc[i] += the sum of row i over `tiles` packed tiles of M rows (the bias gradient).
inline void row_sums_tiles(int64_t M, const float* A, int64_t a_step, int64_t tiles, float* acc) {
  for (int64_t i = 0; i < M; ++i) {
    vec s{};
    for (int64_t t = 0; t < tiles; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) s += load(A + t * a_step + i * kTile + 16 * v);
    acc[i] += sum_lanes(s);
  }
}

// The BatchNorm + dropout's input gradient grad * keep * a + x * b + d (batch_norm_dropout_grad_input)
// for `rows` rows of `cols` <= kTile columns from column j, as a packed tile (zero beyond
// `cols`); a, b, d hold the columns' terms, extended by kTile (a[i] = a[i % channels]).
struct NormGrad {
  const float* y;       // the BatchNorm's input, rows at stride N
  const uint8_t* keep;  // the dropout mask, the same layout, or nullptr
  const float *a, *b, *d;
  int64_t channels;
};

inline void pack_norm_grad_tile(const float* grad, int64_t ld, int64_t rows, int64_t j,
                                int64_t cols, const NormGrad& n, float* tile) {
  typedef uint8_t bytes __attribute__((vector_size(16)));
  const int64_t ch = j % n.channels;
  if (cols == kTile) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = r * ld + j;
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        __builtin_prefetch(grad + at + 2 * kTile + 16 * v, 0, 0);
        __builtin_prefetch(n.y + at + 2 * kTile + 16 * v, 0, 0);
        vec g = load(grad + at + 16 * v);
        if (n.keep) {
          bytes k;
          __builtin_memcpy(&k, n.keep + at + 16 * v, sizeof k);
          g *= __builtin_convertvector(k, vec);
        }
        store(tile + r * kTile + 16 * v, g * load(n.a + ch + 16 * v) +
                                             load(n.y + at + 16 * v) * load(n.b + ch + 16 * v) +
                                             load(n.d + ch + 16 * v));
      }
      if (n.keep) __builtin_prefetch(n.keep + at + 2 * kTile, 0, 0);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < kTile; ++c) {
      const int64_t at = r * ld + j + c;
      tile[r * kTile + c] =
          c < cols ? grad[at] * (n.keep ? n.keep[at] : 1) * n.a[ch + c] + n.y[at] * n.b[ch + c] +
                         n.d[ch + c]
                   : 0.0f;
    }
}

// The patch stem X = relu(Ws P + bs) inside the token kernel: column n of X is channel n % C
// of image n / C, and P (tokens, images x pixels) holds each token's patch pixels image by
// image. The stem's 15 MB output for the report model, and the gradient at it, are then never
// stored: each tile of X is computed where the token kernel would pack it (again in the
// backward), and the stem's weight gradient is summed from the tile of dL/dX.
struct Stem {
  const float* patches = nullptr;  // (tokens, images x pixels)
  int64_t pixels = 0, channels = 0, images = 0, span = 0;
  std::vector<float> weight_t;  // (pixels, span): weight_t[k * span + i] = Ws[i % C][k]
  std::vector<float> bias;      // (span): bs[i % C]
};

Stem make_stem(const torch::Tensor& patches, const torch::Tensor& weight, const torch::Tensor& bias) {
  check_rows(weight, "stem weight");
  const int64_t C = weight.size(0), S = weight.size(1);
  TORCH_CHECK(bias.numel() == C && patches.size(1) % S == 0,
              "stem: weight (channels, pixels), bias (channels), patches (tokens, images x pixels)");
  Stem s;
  s.patches = patches.data_ptr<float>();
  s.pixels = S, s.channels = C, s.images = patches.size(1) / S, s.span = C + 16;
  s.weight_t.resize(S * s.span);
  s.bias.resize(s.span);
  const float *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  for (int64_t i = 0; i < s.span; ++i) {
    for (int64_t k = 0; k < S; ++k) s.weight_t[k * s.span + i] = wp[(i % C) * S + k];
    s.bias[i] = bp[i % C];
  }
  return s;
}

// Which image each of the 16 columns from col0 belongs to: all of them one (`split` = 16), the
// first `split` one and the rest the next, or (fewer than 16 channels, or past the last
// column) each its own, in `image`, -1 past the last column.
struct Lanes {
  int64_t first;
  int split;
  bool each;
  int64_t image[16];
};

inline Lanes lanes_from(const Stem& s, int64_t col0) {
  Lanes l{col0 / s.channels, 16, false, {}};
  const int64_t c0 = col0 % s.channels;
  if (c0 + 16 <= s.channels && l.first < s.images) return l;
  if (s.channels >= 16 && l.first + 1 < s.images) {
    l.split = static_cast<int>(s.channels - c0);
    return l;
  }
  l.each = true;
  for (int i = 0; i < 16; ++i) {
    const int64_t image = (col0 + i) / s.channels;
    l.image[i] = image < s.images ? image : -1;
  }
  return l;
}

// The 16 columns' values of pixel k of token t's patches: one image's value in every lane
// (kSplit false), or the first `split` lanes' image's and the next one's.
template <bool kSplit>
inline vec patch_values(const Stem& s, const Lanes& l, int64_t t, int64_t k) {
  const float* at = s.patches + (t * s.images + l.first) * s.pixels + k;
  if (!kSplit) return splat(*at);
  const vec lane{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < splat(static_cast<float>(l.split)) ? splat(*at) : splat(at[s.pixels]);
}

// The same where each lane finds its own image (zero past the last column).
inline vec patch_values_each(const Stem& s, const Lanes& l, int64_t t, int64_t k) {
  vec p;
  for (int i = 0; i < 16; ++i)
    p[i] = l.image[i] < 0 ? 0.0f : s.patches[(t * s.images + l.image[i]) * s.pixels + k];
  return p;
}

template <bool kSplit, bool kEach>
inline vec patch_vec(const Stem& s, const Lanes& l, int64_t t, int64_t k) {
  return kEach ? patch_values_each(s, l, t, k) : patch_values<kSplit>(s, l, t, k);
}

constexpr int kStemTokens = 7;  // tokens summed side by side in stem_vec: 49 = 7 x 7
constexpr int kStemPixels = 8;  // pixels summed side by side in stem_grad_vec

// Vector v of the tile of X from column j: relu(Ws P + bs) for every token.
template <bool kSplit, bool kEach>
inline void stem_vec(const Stem& s, const Lanes& l, int64_t tokens, int64_t c0, float* out) {
  const vec zero{}, bias = load(s.bias.data() + c0);
  const float* w = s.weight_t.data() + c0;
  int64_t t = 0;
  const auto finish = [&](vec acc) {
    acc = acc > zero ? acc : zero;
    if (kEach)  // past the last column: zero, as pack_tile pads
      for (int i = 0; i < 16; ++i) acc[i] = l.image[i] < 0 ? 0.0f : acc[i];
    return acc;
  };
  for (; t + kStemTokens <= tokens; t += kStemTokens) {  // independent sums, for the FMA pipes
    vec acc[kStemTokens];
    for (int i = 0; i < kStemTokens; ++i) acc[i] = bias;
    for (int64_t k = 0; k < s.pixels; ++k) {
      const vec wk = load(w + k * s.span);
#pragma GCC unroll 7
      for (int i = 0; i < kStemTokens; ++i) acc[i] += patch_vec<kSplit, kEach>(s, l, t + i, k) * wk;
    }
    for (int i = 0; i < kStemTokens; ++i) store(out + (t + i) * kTile, finish(acc[i]));
  }
  for (; t < tokens; ++t) {
    vec acc = bias;
    for (int64_t k = 0; k < s.pixels; ++k)
      acc += patch_vec<kSplit, kEach>(s, l, t, k) * load(w + k * s.span);
    store(out + t * kTile, finish(acc));
  }
}

// The tile of X from column j: relu(Ws P + bs) for its `tokens` rows, zero past the last column.
inline void stem_tile(const Stem& s, int64_t tokens, int64_t j, float* tile) {
  for (int v = 0; v < kVecs; ++v) {
    const int64_t col0 = j + 16 * v, c0 = col0 % s.channels;
    const Lanes l = lanes_from(s, col0);
    float* out = tile + 16 * v;
    if (l.each)
      stem_vec<false, true>(s, l, tokens, c0, out);
    else if (l.split < 16)
      stem_vec<true, false>(s, l, tokens, c0, out);
    else
      stem_vec<false, false>(s, l, tokens, c0, out);
  }
}

// Vector v's part of stem_grad_tile.
template <bool kSplit, bool kEach>
inline void stem_grad_vec(const Stem& s, const Lanes& l, int64_t tokens, int64_t c0,
                          const float* grad, float* acc_w, float* acc_b) {
  vec bias[4] = {};  // four independent sums
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4)
    for (int i = 0; i < 4; ++i) bias[i] += load(grad + (t + i) * kTile);
  for (; t < tokens; ++t) bias[0] += load(grad + t * kTile);
  store(acc_b + c0, load(acc_b + c0) + ((bias[0] + bias[1]) + (bias[2] + bias[3])));
  int64_t k = 0;
  for (; k + kStemPixels <= s.pixels; k += kStemPixels) {  // independent sums
    vec sum[kStemPixels] = {};
    for (int64_t t = 0; t < tokens; ++t) {
      const vec g = load(grad + t * kTile);
#pragma GCC unroll 8
      for (int i = 0; i < kStemPixels; ++i) sum[i] += g * patch_vec<kSplit, kEach>(s, l, t, k + i);
    }
    for (int i = 0; i < kStemPixels; ++i) {
      float* at = acc_w + (k + i) * s.span + c0;
      store(at, load(at) + sum[i]);
    }
  }
  for (; k < s.pixels; ++k) {
    vec sum{};
    for (int64_t t = 0; t < tokens; ++t)
      sum += load(grad + t * kTile) * patch_vec<kSplit, kEach>(s, l, t, k);
    float* at = acc_w + k * s.span + c0;
    store(at, load(at) + sum);
  }
}

// += the stem's weight and bias gradients from the tile of dL/dZ (Z = Ws P + bs; zero past the
// last column): acc_w (pixels, span) and acc_b (span), column i standing for channel i % C.
inline void stem_grad_tile(const Stem& s, int64_t tokens, int64_t j, const float* grad,
                           float* acc_w, float* acc_b) {
  for (int v = 0; v < kVecs; ++v) {
    const int64_t col0 = j + 16 * v, c0 = col0 % s.channels;
    const Lanes l = lanes_from(s, col0);
    const float* g = grad + 16 * v;
    if (l.each)
      stem_grad_vec<false, true>(s, l, tokens, c0, g, acc_w, acc_b);
    else if (l.split < 16)
      stem_grad_vec<true, false>(s, l, tokens, c0, g, acc_w, acc_b);
    else
      stem_grad_vec<false, false>(s, l, tokens, c0, g, acc_w, acc_b);
  }
}

void check_token_mlp(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2) {
  check_rows(x, "x");
  check_rows(w1, "w1");
  check_rows(w2, "w2");
  TORCH_CHECK(w1.size(1) == x.size(0) && w2.size(1) == w1.size(0),
              "token MLP shapes: x (tokens, N), w1 (hidden, tokens), w2 (out, hidden)");
}

}  // namespace

// Y = W2 relu(W1 X + b1) + b2 for X (tokens, N), or with `stem` = {Ws, bs} for the patch stem's
// X = relu(Ws P + bs) of x = P (tokens, images x pixels), N = images x channels (see Stem):
// returns Y (out, N), the hidden layer
// relu(W1 X + b1) in tile order (tiles, hidden, kTile) (zero-padded X columns past N), and with
// `channels` > 0 the sums and sums of squares (2, channels) in float64 of Y's values by channel,
// column j being channel j % channels: the statistics of the BatchNorm that follows. Without
// `keep_hidden` (no backward to come) the hidden layer is not written and comes back empty.
std::vector<torch::Tensor> token_mlp_forward(torch::Tensor x, torch::Tensor w1, torch::Tensor b1,
                                             torch::Tensor w2, torch::Tensor b2,
                                             int64_t channels, bool keep_hidden,
                                             std::vector<torch::Tensor> stem_weights) {
  check_token_mlp(x, w1, w2);
  const bool in_stem = !stem_weights.empty();
  const Stem stem = in_stem ? make_stem(x, stem_weights[0], stem_weights[1]) : Stem{};
  const int64_t K = x.size(0), N = in_stem ? stem.images * stem.channels : x.size(1);
  const int64_t H = w1.size(0), O = w2.size(0);
  const int64_t tiles = (N + kTile - 1) / kTile;
  const bool stats = channels > 0;
  TORCH_CHECK(!stats || N % channels == 0, "token MLP: columns must be whole rows of channels");
  torch::Tensor hidden = torch::empty({keep_hidden ? tiles : 0, H, kTile}, x.options());
  torch::Tensor y = torch::empty({O, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* hp = hidden.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float *w1p = w1.data_ptr<float>(), *b1p = b1.data_ptr<float>();
  const float *w2p = w2.data_ptr<float>(), *b2p = b2.data_ptr<float>();
  // streaming stores need 64-byte aligned rows
  const bool aligned_rows = N % 16 == 0 && reinterpret_cast<uintptr_t>(yp) % 64 == 0;
  std::vector<double> partial(stats ? kTokenChunks * 2 * channels : 0, 0.0);
#pragma omp parallel
  {
    std::vector<float> x_tile(K * kTile), h_tile(H * kTile), y_tile(O * kTile), sums(2 * kTile);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < kTokenChunks; ++c) {
      double* acc = stats ? partial.data() + c * 2 * channels : nullptr;
      for (int64_t t = c * tiles / kTokenChunks; t < (c + 1) * tiles / kTokenChunks; ++t) {
        const int64_t j = t * kTile, cols = std::min(kTile, N - j);
        if (in_stem)
          stem_tile(stem, K, j, x_tile.data());
        else
          pack_tile(xp + j, N, K, cols, x_tile.data());
        product(H, w1p, x_tile.data(), h_tile.data(), kTile, K, {b1p, true});
        std::fill(sums.begin(), sums.end(), 0.0f);
        Epilogue second{b2p, false, nullptr, aligned_rows, stats ? sums.data() : nullptr};
        if (cols == kTile) {
          product(O, w2p, h_tile.data(), yp + j, N, H, second);
        } else {
          second.streaming = false;
          product(O, w2p, h_tile.data(), y_tile.data(), kTile, H, second);
          unpack_tile(y_tile.data(), O, cols, yp + j, N);
        }
        float* saved = hp + t * H * kTile;
        for (int64_t i = 0; keep_hidden && i < H * kTile; i += 16)
          store_streaming(saved + i, load(h_tile.data() + i));
        if (!stats) continue;
        for (int64_t i = 0, ch = j % channels; i < cols; ++i, ch = ch + 1 == channels ? 0 : ch + 1) {
          acc[ch] += sums[i];
          acc[channels + ch] += sums[kTile + i];
        }
      }
    }
  }
  torch::Tensor stats_out = torch::zeros({stats ? 2 : 0, channels}, x.options().dtype(torch::kFloat64));
  double* sp = stats_out.data_ptr<double>();
  for (int64_t c = 0; c < (stats ? kTokenChunks : 0); ++c)
    for (int64_t i = 0; i < 2 * channels; ++i) sp[i] += partial[c * 2 * channels + i];
  return {y, hidden, stats_out};
}

// The gradients of token_mlp_forward from grad = dL/dY (out, N): grad_x (tokens, N) (empty
// unless `input_grad`), grad_w1, grad_b1, grad_w2, grad_b2. With `norm` = {y, keep, a, b, d}
// (Y, the dropout mask or an empty tensor, the terms of batch_norm_dropout_grad_terms), grad is
// the gradient at the BatchNorm + dropout's output instead, and dL/dY is formed tile by tile
// (batch_norm_dropout_grad_input's values, without a pass of its own). With `stem` (as in the
// forward) there is no grad_x (x = P, the patches) and two more come back: the stem's weight
// and bias gradients.
std::vector<torch::Tensor> token_mlp_backward(torch::Tensor grad, torch::Tensor x,
                                              torch::Tensor hidden, torch::Tensor w1,
                                              torch::Tensor w2, bool input_grad,
                                              std::vector<torch::Tensor> norm,
                                              std::vector<torch::Tensor> stem_weights) {
  check_token_mlp(x, w1, w2);
  check_rows(grad, "grad");
  TORCH_CHECK(norm.empty() || norm.size() == 5, "norm: y, keep, a, b, d");
  const bool in_stem = !stem_weights.empty();
  TORCH_CHECK(!(in_stem && input_grad), "token MLP backward: no gradient at the stem's patches");
  const Stem stem = in_stem ? make_stem(x, stem_weights[0], stem_weights[1]) : Stem{};
  const int64_t K = x.size(0), N = in_stem ? stem.images * stem.channels : x.size(1);
  const int64_t H = w1.size(0), O = w2.size(0);
  const int64_t tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(grad.size(0) == O && grad.size(1) == N && hidden.is_contiguous() &&
                  hidden.numel() == tiles * H * kTile,
              "token MLP backward: grad (out, N), hidden as token_mlp_forward saved it");
  const torch::Tensor w1_t = w1.t().contiguous(), w2_t = w2.t().contiguous();
  torch::Tensor grad_x = torch::empty({input_grad ? K : 0, N}, x.options());
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *hp = hidden.data_ptr<float>(), *w1tp = w1_t.data_ptr<float>();
  const float* w2tp = w2_t.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  const bool aligned_rows = N % 16 == 0 && reinterpret_cast<uintptr_t>(gxp) % 64 == 0;
  // per chunk: grad_w2 (O x H), grad_w1 (H x K), grad_b2 (O), grad_b1 (H)
  NormGrad norm_grad{};
  std::vector<float> extended;  // a, b, d, each over channels + kTile columns
  if (!norm.empty()) {
    const int64_t C = norm[2].numel(), span = C + kTile;
    TORCH_CHECK(N % C == 0 && norm[0].numel() == O * N, "norm: y (out, N) in whole rows of channels");
    extended.resize(3 * span);
    for (int k = 0; k < 3; ++k)
      for (int64_t i = 0; i < span; ++i) extended[k * span + i] = norm[2 + k].data_ptr<float>()[i % C];
    norm_grad = {norm[0].data_ptr<float>(), norm[1].numel() ? norm[1].data_ptr<uint8_t>() : nullptr,
                 extended.data(), extended.data() + span, extended.data() + 2 * span, C};
  }
  // the stem's weight and bias gradients over its span of columns (channel i % C)
  const int64_t stem_sizes = in_stem ? (stem.pixels + 1) * stem.span : 0;
  const int64_t sizes = O * H + H * K + O + H + stem_sizes;
  std::vector<float> partial(kTokenChunks * sizes, 0.0f);
  constexpr int64_t kGroup = 8;  // tiles whose weight-gradient sums share one register pass
#pragma omp parallel
  {
    std::vector<float> g_tiles(kGroup * O * kTile), x_tiles(kGroup * K * kTile),
        gh_tiles(kGroup * H * kTile), gx_tile(K * kTile);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < kTokenChunks; ++c) {
      float* acc_w2 = partial.data() + c * sizes;
      float* acc_w1 = acc_w2 + O * H;
      float* acc_b2 = acc_w1 + H * K;
      float* acc_b1 = acc_b2 + O;
      float* acc_stem_w = acc_b1 + H;
      float* acc_stem_b = acc_stem_w + stem.pixels * stem.span;
      const int64_t first = c * tiles / kTokenChunks, last = (c + 1) * tiles / kTokenChunks;
      for (int64_t t0 = first; t0 < last; t0 += kGroup) {
        const int64_t group = std::min(kGroup, last - t0);
        for (int64_t u = 0; u < group; ++u) {
          const int64_t t = t0 + u, j = t * kTile, cols = std::min(kTile, N - j);
          float* g_tile = g_tiles.data() + u * O * kTile;
          float* gh_tile = gh_tiles.data() + u * H * kTile;
          if (t + 1 < last)  // the next tile's saved hidden layer, read by the epilogue's mask
            for (int64_t i = 0; i < H * kTile; i += 16) __builtin_prefetch(hp + (t + 1) * H * kTile + i);
          if (norm.empty())
            pack_tile(gp + j, N, O, cols, g_tile);
          else
            pack_norm_grad_tile(gp, N, O, j, cols, norm_grad, g_tile);
          float* x_tile = x_tiles.data() + u * K * kTile;
          if (in_stem)
            stem_tile(stem, K, j, x_tile);
          else
            pack_tile(xp + j, N, K, cols, x_tile);
          // through the second layer and the ReLU (mask: the saved hidden layer)
          product(H, w2tp, g_tile, gh_tile, kTile, O, {nullptr, false, hp + t * H * kTile, false});
          if (in_stem) {  // dL/dZ at the stem's products: through its ReLU (mask: the tile of X)
            product(K, w1tp, gh_tile, gx_tile.data(), kTile, H, {nullptr, false, x_tile});
            stem_grad_tile(stem, K, j, gx_tile.data(), acc_stem_w, acc_stem_b);
            continue;
          }
          if (!input_grad) continue;
          if (cols == kTile) {
            product(K, w1tp, gh_tile, gxp + j, N, H, {nullptr, false, nullptr, aligned_rows});
          } else {
            product(K, w1tp, gh_tile, gx_tile.data(), kTile, H, {});
            unpack_tile(gx_tile.data(), K, cols, gxp + j, N);
          }
        }
        dot_tiles(O, g_tiles.data(), O * kTile, H, hp + t0 * H * kTile, H * kTile, group, acc_w2);
        dot_tiles(H, gh_tiles.data(), H * kTile, K, x_tiles.data(), K * kTile, group, acc_w1);
        row_sums_tiles(O, g_tiles.data(), O * kTile, group, acc_b2);
        row_sums_tiles(H, gh_tiles.data(), H * kTile, group, acc_b1);
      }
    }
  }
  std::vector<double> total(sizes, 0.0);
  for (int64_t c = 0; c < kTokenChunks; ++c)
    for (int64_t i = 0; i < sizes; ++i) total[i] += partial[c * sizes + i];
  auto opts = x.options();
  torch::Tensor grad_w2 = torch::empty({O, H}, opts), grad_w1 = torch::empty({H, K}, opts),
                grad_b2 = torch::empty({O}, opts), grad_b1 = torch::empty({H}, opts);
  std::copy(total.begin(), total.begin() + O * H, grad_w2.data_ptr<float>());
  std::copy(total.begin() + O * H, total.begin() + O * H + H * K, grad_w1.data_ptr<float>());
  std::copy(total.begin() + O * H + H * K, total.begin() + O * H + H * K + O,
            grad_b2.data_ptr<float>());
  std::copy(total.begin() + O * H + H * K + O, total.begin() + O * H + H * K + O + H,
            grad_b1.data_ptr<float>());
  if (!in_stem) return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
  // fold the span's columns onto their channels: (pixels, span) -> Ws's (channels, pixels)
  const int64_t C = stem.channels, S = stem.pixels;
  std::vector<double> folded((S + 1) * C, 0.0);
  const double* st = total.data() + O * H + H * K + O + H;
  for (int64_t k = 0; k <= S; ++k)
    for (int64_t i = 0; i < stem.span; ++i) folded[k * C + i % C] += st[k * stem.span + i];
  torch::Tensor grad_stem_w = torch::empty({C, S}, opts), grad_stem_b = torch::empty({C}, opts);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < S; ++k) grad_stem_w.data_ptr<float>()[c * S + k] = folded[k * C + c];
    grad_stem_b.data_ptr<float>()[c] = folded[S * C + c];
  }
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_stem_w, grad_stem_b};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm_dropout_forward", &batch_norm_dropout_forward);
  m.def("batch_norm_dropout_grad_terms", &batch_norm_dropout_grad_terms);
  m.def("batch_norm_dropout_grad_input", &batch_norm_dropout_grad_input);
  m.def("linear_grad", &linear_grad);
  m.def("bias_relu_rows_", &bias_relu_rows_);
  m.def("relu_grad_row_sums", &relu_grad_row_sums);
  m.def("token_mlp_forward", &token_mlp_forward);
  m.def("token_mlp_backward", &token_mlp_backward);
}
