// Fused CPU kernels for the report block's BatchNorm (training mode) followed by dropout.
//
// torch runs BatchNorm, the dropout mask's random bits, the mask and the multiply as separate
// passes over the (rows x channels) activations, each reading and writing tens of megabytes;
// here the forward is one pass for the statistics and one for the output and the mask, the
// backward one pass for the sums and one for the input gradient (docs/speed.md measures both).
//
// Every sum is taken over a fixed number of row chunks and added in chunk order, in double
// precision, so results do not depend on the number of threads. The dropout mask of element k
// (row-major index) keeps it if the top 16 bits of SplitMix64(seed + (k + 1) * golden) are at
// least `threshold` (p = threshold / 2^16, as stages.model.Dropout rounds it).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
std::vector<torch::Tensor> batch_norm_dropout_forward(torch::Tensor x, torch::Tensor weight,
                                                      torch::Tensor bias, double eps,
                                                      int64_t threshold, double scale,
                                                      int64_t seed) {
  check_rows(x, "x");
  const int64_t N = x.size(0), C = x.size(1);
  const float* xp = x.data_ptr<float>();
  const std::vector<double> sums = column_sums(N, C, 2, [&](int64_t i, double* acc) {
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

// The gradients of batch_norm_dropout_forward: (grad_x, grad_weight, grad_bias). With g the
// gradient at the BatchNorm's output (grad through the mask) and xhat = (x - mean) * invstd:
// grad_bias = sum g, grad_weight = sum g xhat, grad_x = w invstd (g - mean g - xhat mean g xhat).
template <bool kDropout>
std::vector<torch::Tensor> batch_norm_dropout_backward_impl(
    const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& keep,
    const torch::Tensor& mean, const torch::Tensor& invstd, const torch::Tensor& weight,
    double scale) {
  const int64_t N = x.size(0), C = x.size(1);
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const uint8_t* kp = kDropout ? keep.data_ptr<uint8_t>() : nullptr;
  const float* mp = mean.data_ptr<float>();
  const float s = scale;
  const std::vector<double> sums = column_sums(N, C, 2, [&](int64_t i, double* acc) {
    const float* g = gp + i * C;
    const float* row = xp + i * C;
    const uint8_t* k = kp + i * C;
    double* gx = acc + C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const double gb = kDropout ? g[j] * s * k[j] : g[j] * s;
      acc[j] += gb;
      gx[j] += gb * (row[j] - mp[j]);
    }
  });

  auto opts = x.options();
  torch::Tensor grad_weight = torch::empty({C}, opts), grad_bias = torch::empty({C}, opts);
  std::vector<float> ka(C), kb(C), kd(C);  // grad_x = g * ka + x * kb + kd
  const float* w = weight.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  for (int64_t j = 0; j < C; ++j) {
    const double mean_g = sums[j] / N, mean_gxhat = sums[C + j] * is[j] / N;
    const double k1 = static_cast<double>(w[j]) * is[j];
    grad_bias.data_ptr<float>()[j] = sums[j];
    grad_weight.data_ptr<float>()[j] = sums[C + j] * is[j];
    ka[j] = k1 * s;  // the dropout's scale folded in
    kb[j] = -k1 * is[j] * mean_gxhat;
    kd[j] = k1 * (mp[j] * is[j] * mean_gxhat - mean_g);
  }

  torch::Tensor grad_x = torch::empty_like(x);
  float* gxp = grad_x.data_ptr<float>();
  const float* ap = ka.data();
  const float* bp = kb.data();
  const float* dp = kd.data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* g = gp + i * C;
    const float* row = xp + i * C;
    const uint8_t* k = kp + i * C;
    float* out = gxp + i * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j)
      out[j] = (kDropout ? g[j] * k[j] : g[j]) * ap[j] + row[j] * bp[j] + dp[j];
  }
  return {grad_x, grad_weight, grad_bias};
}

std::vector<torch::Tensor> batch_norm_dropout_backward(torch::Tensor grad, torch::Tensor x,
                                                       torch::Tensor keep, torch::Tensor mean,
                                                       torch::Tensor invstd, torch::Tensor weight,
                                                       double scale) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  return keep.numel() > 0
             ? batch_norm_dropout_backward_impl<true>(grad, x, keep, mean, invstd, weight, scale)
             : batch_norm_dropout_backward_impl<false>(grad, x, keep, mean, invstd, weight, scale);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm_dropout_forward", &batch_norm_dropout_forward);
  m.def("batch_norm_dropout_backward", &batch_norm_dropout_backward);
  m.def("linear_grad", &linear_grad);
  m.def("bias_relu_rows_", &bias_relu_rows_);
  m.def("relu_grad_row_sums", &relu_grad_row_sums);
}
