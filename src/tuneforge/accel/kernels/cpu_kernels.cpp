// Fused CPU kernels for the memory-bound parts of a training step (tuneforge/kernels).
//
// Each one does in a single pass over memory what the PyTorch path does in several: SwiGLU's
// forward (silu, multiply) and backward (silu again, two multiplies, silu_backward); RMSNorm's
// forward (pow, mean, rsqrt, two multiplies) and input gradient; a dropped copy (copy, then
// scattered zeros). LoRA's A products with a dropped input take no copy at all: the products
// with the whole input, minus the dropped elements' terms. They use ATen's vector type, so SiLU's exponential is the
// same Sleef call as torch's and SwiGLU's values match torch's bit for bit; RMSNorm sums in a
// different order (float rounding). float32, contiguous, CPU only: the Python side checks.
//
// Built once per machine by tuneforge/kernels/__init__.py (g++ -march=native -fopenmp).

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrain = 32768;  // elements per task, as ATen's element-wise loops

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// silu(x) = x / (1 + exp(-x)), written as torch's own kernel writes it
inline Vec silu(const Vec& x) { return x / (Vec(1.0f) + x.neg().exp()); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check(gate, "gate");
  check(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up differ in shape");
  auto out = at::empty_like(gate);
  const float* g = gate.const_data_ptr<float>();
  const float* u = up.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
    constexpr int64_t W = Vec::size();
    int64_t i = begin;
    for (; i + 2 * W <= end; i += 2 * W) {  // two vectors per round: the exponentials overlap
      Vec a = silu(Vec::loadu(g + i)), b = silu(Vec::loadu(g + i + W));
      (a * Vec::loadu(u + i)).store(o + i);
      (b * Vec::loadu(u + i + W)).store(o + i + W);
    }
    for (; i < end; ++i) o[i] = silu(g[i]) * u[i];
  });
  return out;
}

// d_up = grad * silu(gate); d_gate = grad * up * s * (1 + gate * (1 - s)), s = sigmoid(gate)
// (torch's silu_backward, with grad * up as its incoming gradient)
std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check(grad, "grad");
  check(gate, "gate");
  check(up, "up");
  TORCH_CHECK(grad.sizes() == gate.sizes() && gate.sizes() == up.sizes(), "shapes differ");
  auto d_gate = at::empty_like(gate);
  auto d_up = at::empty_like(gate);
  const float* dy = grad.const_data_ptr<float>();
  const float* g = gate.const_data_ptr<float>();
  const float* u = up.const_data_ptr<float>();
  float* dg = d_gate.data_ptr<float>();
  float* du = d_up.data_ptr<float>();
  at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
    constexpr int64_t W = Vec::size();
    const Vec one(1.0f);
    int64_t i = begin;
    for (; i + W <= end; i += W) {
      Vec x = Vec::loadu(g + i), d = Vec::loadu(dy + i);
      Vec e = x.neg().exp();
      Vec s = one / (one + e);
      (d * (x / (one + e))).store(du + i);
      ((d * Vec::loadu(u + i)) * (s * (one + x * (one - s)))).store(dg + i);
    }
    for (; i < end; ++i) {
      float x = g[i], d = dy[i], e = std::exp(-x), s = 1.0f / (1.0f + e);
      du[i] = d * (x / (1.0f + e));
      dg[i] = (d * u[i]) * (s * (1.0f + x * (1.0f - s)));
    }
  });
  return {d_gate, d_up};
}

inline float row_sum_squares(const float* x, int64_t n) {
  return at::vec::map_reduce_all<float>([](Vec v) { return v * v; },
                                        [](Vec a, Vec b) { return a + b; }, x, n);
}

inline float row_dot(const float* a, const float* b, int64_t n) {
  return at::vec::map2_reduce_all<float>([](Vec x, Vec y) { return x * y; },
                                         [](Vec x, Vec y) { return x + y; }, a, b, n);
}

// out = x * rstd * weight over rows of x [rows, n]; rstd = 1 / sqrt(mean(x^2) + eps) per row
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                    double eps) {
  check(x, "x");
  check(weight, "weight");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(weight.numel() == n, "weight does not match the last dimension");
  auto out = at::empty_like(x);
  auto rstd_shape = x.sizes().vec();
  rstd_shape.back() = 1;
  auto rstd = at::empty(rstd_shape, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* r = rstd.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = xp + row * n;
      float* orow = o + row * n;
      const float s = 1.0f / std::sqrt(row_sum_squares(xr, n) / n + static_cast<float>(eps));
      r[row] = s;
      at::vec::map2<float>([s](Vec a, Vec b) { return a * Vec(s) * b; }, orow, xr, w, n);
    }
  });
  return {out, rstd};
}

// the input gradient: rstd * (g - x * rstd^2 * mean(g * x)), g = grad * weight
at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd) {
  check(grad, "grad");
  check(x, "x");
  check(weight, "weight");
  check(rstd, "rstd");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto dx = at::empty_like(x);
  const float* dy = grad.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  const float* r = rstd.const_data_ptr<float>();
  float* d = dx.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* dyr = dy + row * n;
      const float* xr = xp + row * n;
      float* dr = d + row * n;
      at::vec::map2<float>([](Vec a, Vec b) { return a * b; }, dr, dyr, w, n);  // g
      const float s = r[row];
      const float c = row_dot(dr, xr, n) * (s * s / n);
      at::vec::map2<float>([s, c](Vec g, Vec xv) { return (g - xv * Vec(c)) * Vec(s); }, dr, dr,
                           xr, n);
    }
  });
  return dx;
}

// The elements of `out` at the sorted flat positions `indices` that fall in [begin, end) set to 0.
void zero_range(float* out, const int64_t* idx, int64_t count, int64_t begin, int64_t end) {
  const int64_t* first = std::lower_bound(idx, idx + count, begin);
  const int64_t* last = std::lower_bound(first, idx + count, end);
  for (const int64_t* p = first; p != last; ++p) out[*p] = 0.0f;
}

void check_indices(const at::Tensor& indices, int64_t numel) {
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous() && indices.dim() == 1,
              "indices must be a 1-D contiguous int64 CPU tensor");
  const int64_t count = indices.numel();
  if (count) {
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    TORCH_CHECK(idx[0] >= 0 && idx[count - 1] < numel, "indices out of range");
  }
}

// A copy of x * scale with the elements at the sorted flat `indices` set to 0, in one pass.
at::Tensor zero_at(const at::Tensor& x, const at::Tensor& indices, double scale) {
  check(x, "x");
  check_indices(indices, x.numel());
  auto out = at::empty_like(x);
  const float* xp = x.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t count = indices.numel();
  const float f = static_cast<float>(scale);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (f == 1.0f) {
      std::copy(xp + begin, xp + end, o + begin);
    } else {
      at::vec::map<float>([f](Vec v) { return v * Vec(f); }, o + begin, xp + begin, end - begin);
    }
    zero_range(o, idx, count, begin, end);
  });
  return out;
}

at::Tensor& zero_at_(at::Tensor& x, const at::Tensor& indices) {
  check(x, "x");
  check_indices(indices, x.numel());
  float* o = x.data_ptr<float>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t count = indices.numel();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    zero_range(o, idx, count, begin, end);
  });
  return x;
}

// LoRA dropout without a dropped copy of the input. With x [tokens, in], A [r, in] and the
// sorted flat positions of the dropped elements of x, the products with the dropped x are the
// products with x minus the dropped elements' terms, a few per row (5% of x at p = 0.05):
//   h  = dropped(x) @ A^T        = x @ A^T        - sum over dropped (t, c) of x[t, c] A[:, c]  (row t)
//   dA = d_h^T @ dropped(x)      = d_h^T @ x      - sum over dropped (t, c) of d_h[t, :] x[t, c] (column c)

// The dropped positions of rows [row_begin, row_end) of a [rows, in] tensor.
std::pair<const int64_t*, const int64_t*> rows_range(const int64_t* idx, int64_t count, int64_t in,
                                                     int64_t row_begin, int64_t row_end) {
  const int64_t* first = std::lower_bound(idx, idx + count, row_begin * in);
  return {first, std::lower_bound(first, idx + count, row_end * in)};
}

void check_lora(const at::Tensor& x, const at::Tensor& a, const at::Tensor& indices) {
  check(x, "x");
  check(a, "A");
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && a.size(1) == x.size(1), "x is not [tokens, in] for A");
  check_indices(indices, x.numel());
}

// h [tokens, r] -= the dropped elements' terms (in place; h holds x @ A^T)
at::Tensor& lora_drop_product_(at::Tensor& h, const at::Tensor& x, const at::Tensor& a,
                               const at::Tensor& indices) {
  check_lora(x, a, indices);
  check(h, "h");
  const int64_t in = x.size(1), r = a.size(0);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == x.size(0) && h.size(1) == r, "h is not [tokens, r]");
  auto at_ = a.t().contiguous();  // [in, r]: a column of A is a row here
  const float* xp = x.const_data_ptr<float>();
  const float* ap = at_.const_data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t count = indices.numel();
  at::parallel_for(0, x.size(0), 64, [&](int64_t begin, int64_t end) {
    auto [first, last] = rows_range(idx, count, in, begin, end);
    int64_t t = begin, row_start = begin * in;  // the row of *p, advanced (no division)
    for (const int64_t* p = first; p != last; ++p) {
      while (*p >= row_start + in) ++t, row_start += in;
      const float v = xp[*p];
      const float* col = ap + (*p - row_start) * r;
      float* row = hp + t * r;
      for (int64_t j = 0; j < r; ++j) row[j] -= v * col[j];
    }
  });
  return h;
}

// dA [r, in] -= the dropped elements' terms (in place; dA holds d_h^T @ x). Each thread sums
// its rows' terms into its own [in, r] buffer; the buffers are added at the end.
at::Tensor& lora_drop_grad_(at::Tensor& da, const at::Tensor& d_h, const at::Tensor& x,
                            const at::Tensor& indices) {
  check_lora(x, da, indices);
  check(d_h, "d_h");
  const int64_t in = x.size(1), r = da.size(0), tokens = x.size(0);
  TORCH_CHECK(d_h.dim() == 2 && d_h.size(0) == tokens && d_h.size(1) == r, "d_h is not [tokens, r]");
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tokens));
  auto acc = at::zeros({parts, in, r}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* gp = d_h.const_data_ptr<float>();
  float* accp = acc.data_ptr<float>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t count = indices.numel();
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t rb = tokens * part / parts, re = tokens * (part + 1) / parts;
      auto [first, last] = rows_range(idx, count, in, rb, re);
      float* buf = accp + part * in * r;
      int64_t t = rb, row_start = rb * in;
      for (const int64_t* p = first; p != last; ++p) {
        while (*p >= row_start + in) ++t, row_start += in;
        const float v = xp[*p];
        const float* g = gp + t * r;
        float* col = buf + (*p - row_start) * r;
        for (int64_t j = 0; j < r; ++j) col[j] += v * g[j];
      }
    }
  });
  da.sub_(acc.sum(0).t());
  return da;
}


// -- variable-length causal attention ------------------------------------------------------------
// Packed rows hold several samples; each attends causally to itself only. ATen's CPU flash kernel,
// called once per sample, runs these short sequences (64-512 tokens, head_dim 64) at a fifth of the
// matmul rate. Here one task is one (sample, KV head): the G query heads that share the KV head
// are stacked into one [L*G, D] matrix (rows t-major), so each 64-token row block is one matmul of
// 64*G rows against the keys up to the block's end (the causal triangle, not the square). The
// block's scores stay in a [64*G, L] buffer: softmax in place, times V; backward recomputes them
// from the saved log-sum-exp, as flash attention does. The products are BLAS sgemm calls
// (PyTorch's own BLAS, one thread each inside the tasks), tasks longest first, dynamically shared
// out between the threads.

}  // namespace

extern "C" {
// Fortran BLAS, exported by PyTorch's CPU library when it is built with MKL (weak: a PyTorch
// without it loads the rest of this library, and has_blas() says false)
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha, const float* a,
                                  const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count: every task's sgemm runs on one thread, the same code path
// whatever the number of threads (so the numbers do not depend on it)
// (the Fortran entry, by reference: PyTorch's static MKL exports its C names at the same address)
__attribute__((weak)) int mkl_set_num_threads_local_(const int* n);
}

namespace {

bool has_blas() { return sgemm_ != nullptr; }

// C [m, n] = alpha * op(A) [m, k] @ op(B) [k, n] + beta * C, all row-major with leading dimensions
// (the column-major call computes C^T = op(B)^T op(A)^T)
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&opb, &opa, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

constexpr int64_t kBlock = 64;  // query tokens per row block

struct AttnShape {
  int64_t T, H, Hkv, G, D;
  int64_t ldk, ldv;  // k's and v's token strides: the leading dimensions of their sgemm operands
  std::vector<int64_t> start, len;  // the samples
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (sample, KV head), longest first
};

AttnShape attn_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cu_seqlens) {
  TORCH_CHECK(has_blas(), "this PyTorch has no BLAS sgemm");
  for (auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 &&
                    t->stride(2) == 1,
                "q, k and v must be float32 CPU tensors [tokens, heads, head_dim] with a unit "
                "last stride");
  }
  AttnShape s{q.size(0), q.size(1), k.size(1), 0, q.size(2), 0, 0, {}, {}, {}};
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == s.T && k.size(2) == s.D &&
                  s.Hkv > 0 && s.H % s.Hkv == 0,
              "k and v must be [tokens, kv_heads, head_dim], kv_heads dividing q's heads");
  // a single token's stride is arbitrary; otherwise BLAS needs rows at least head_dim apart
  s.ldk = s.T == 1 ? std::max(k.stride(0), s.D) : k.stride(0);
  s.ldv = s.T == 1 ? std::max(v.stride(0), s.D) : v.stride(0);
  TORCH_CHECK(s.ldk >= s.D && s.ldv >= s.D,
              "k and v need a token stride of at least head_dim (make them contiguous)");
  s.G = s.H / s.Hkv;
  auto cu = cu_seqlens.to(at::kLong).contiguous();
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "cu_seqlens must be 1-D with at least 2 entries");
  const int64_t* c = cu.const_data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0 && c[cu.numel() - 1] == s.T, "cu_seqlens must run from 0 to the tokens");
  for (int64_t i = 0; i + 1 < cu.numel(); ++i) {
    TORCH_CHECK(c[i + 1] > c[i], "cu_seqlens must be increasing");
    s.start.push_back(c[i]);
    s.len.push_back(c[i + 1] - c[i]);
  }
  for (int64_t i = 0; i < static_cast<int64_t>(s.len.size()); ++i)
    for (int64_t g = 0; g < s.Hkv; ++g) s.tasks.emplace_back(i, g);
  std::stable_sort(s.tasks.begin(), s.tasks.end(),
                   [&](auto a, auto b) { return s.len[a.first] > s.len[b.first]; });
  return s;
}

// rows (t, h) of the G heads of KV head g, t-major, into a packed [L*G, D] buffer, and back
inline void pack_heads(float* dst, const float* src, int64_t st, int64_t sh, int64_t L, int64_t G,
                       int64_t D) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t h = 0; h < G; ++h) std::copy(src + t * st + h * sh, src + t * st + h * sh + D,
                                              dst + (t * G + h) * D);
}
inline void unpack_heads(float* dst, const float* src, int64_t st, int64_t sh, int64_t L,
                         int64_t G, int64_t D) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t h = 0; h < G; ++h) std::copy(src + (t * G + h) * D, src + (t * G + h + 1) * D,
                                              dst + t * st + h * sh);
}

// A task's scratch floats, 64-byte aligned (MKL's kernels may take other paths, and round
// differently, on differently aligned operands: the same numbers on every run need the same
// alignment)
class Buffer {
 public:
  explicit Buffer(int64_t n, bool zero = false)
      : p_(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {
    if (p_ == nullptr) throw std::bad_alloc();
    if (zero) std::fill(p_, p_ + n, 0.0f);
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() { return p_; }
  float& operator[](int64_t i) { return p_[i]; }

 private:
  float* p_;
};

template <typename F>
void run_tasks(const AttnShape& s, const F& f) {
  const int64_t n = s.tasks.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads())))
  for (int64_t i = 0; i < n; ++i) {
    const int one = 1;
    const int before = mkl_set_num_threads_local_ ? mkl_set_num_threads_local_(&one) : 0;
    f(s.tasks[i].first, s.tasks[i].second);
    if (mkl_set_num_threads_local_) mkl_set_num_threads_local_(&before);
  }
}

// out [T, H, D] (contiguous) and the log-sum-exp of each query row's scores, lse [T, H]
std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const at::Tensor& cu_seqlens,
                                                            double scale) {
  const AttnShape s = attn_shape(q, k, v, cu_seqlens);
  const int64_t H = s.H, G = s.G, D = s.D;
  auto out = at::empty({s.T, H, D}, q.options());
  auto lse = at::empty({s.T, H}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  run_tasks(s, [&](int64_t i, int64_t g) {
    const int64_t o = s.start[i], L = s.len[i];
    Buffer qbuf(L * G * D), obuf(kBlock * G * D), sbuf(kBlock * G * L), inv(kBlock * G);
    pack_heads(qbuf.data(), qp + o * q.stride(0) + g * G * q.stride(1), q.stride(0), q.stride(1),
               L, G, D);
    const float* kb = kp + o * k.stride(0) + g * k.stride(1);
    const float* vb = vp + o * v.stride(0) + g * v.stride(1);
    for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
      const int64_t t1 = std::min(L, t0 + kBlock), R = (t1 - t0) * G, N = t1;
      float* S = sbuf.data();
      gemm(false, true, R, N, D, sc, qbuf.data() + t0 * G * D, D, kb, s.ldk, 0.0f, S, N);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = t0 + r / G, valid = t + 1;
        float* row = S + r * N;
        const float m = at::vec::reduce_all<float>(
            [](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, valid);
        at::vec::map<float>([m](Vec x) { return (x - Vec(m)).exp(); }, row, row, valid);
        const float sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, row, valid);
        std::fill(row + valid, row + N, 0.0f);
        inv[r] = 1.0f / sum;
        lp[(o + t) * H + g * G + r % G] = m + std::log(sum);
      }
      gemm(false, false, R, D, N, 1.0f, S, N, vb, s.ldv, 0.0f, obuf.data(), D);
      for (int64_t r = 0; r < R; ++r) {
        const float f = inv[r];
        at::vec::map<float>([f](Vec x) { return x * Vec(f); }, obuf.data() + r * D,
                            obuf.data() + r * D, D);
      }
      unpack_heads(op + (o + t0) * H * D + g * G * D, obuf.data(), H * D, D, t1 - t0, G, D);
    }
  });
  return {out, lse};
}

// dq [T, H, D], dk and dv [T, Hkv, D] (contiguous); grad and out as from the forward
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, double scale) {
  const AttnShape s = attn_shape(q, k, v, cu_seqlens);
  const int64_t H = s.H, G = s.G, D = s.D;
  check(out, "out");
  check(lse, "lse");
  TORCH_CHECK(out.sizes() == q.sizes() && lse.numel() == s.T * H, "out or lse does not match q");
  auto dy = grad.contiguous();
  TORCH_CHECK(dy.sizes() == q.sizes() && dy.scalar_type() == at::kFloat, "grad does not match q");
  auto dq = at::empty({s.T, H, D}, q.options());
  auto dk = at::empty({s.T, s.Hkv, D}, q.options());
  auto dv = at::empty({s.T, s.Hkv, D}, q.options());
  const float *qp = q.const_data_ptr<float>(), *kp = k.const_data_ptr<float>(),
              *vp = v.const_data_ptr<float>(), *yp = out.const_data_ptr<float>(),
              *dyp = dy.const_data_ptr<float>(), *lp = lse.const_data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  run_tasks(s, [&](int64_t i, int64_t g) {
    const int64_t o = s.start[i], L = s.len[i];
    Buffer qbuf(L * G * D), dybuf(L * G * D), dqbuf(L * G * D), delta(L * G),
        dkbuf(L * D, true), dvbuf(L * D, true), pbuf(kBlock * G * L), dpbuf(kBlock * G * L);
    pack_heads(qbuf.data(), qp + o * q.stride(0) + g * G * q.stride(1), q.stride(0), q.stride(1),
               L, G, D);
    pack_heads(dybuf.data(), dyp + o * H * D + g * G * D, H * D, D, L, G, D);
    for (int64_t t = 0; t < L; ++t)  // delta = rowsum(dO * O)
      for (int64_t h = 0; h < G; ++h)
        delta[t * G + h] = row_dot(dybuf.data() + (t * G + h) * D, yp + (o + t) * H * D + (g * G + h) * D, D);
    const float* kb = kp + o * k.stride(0) + g * k.stride(1);
    const float* vb = vp + o * v.stride(0) + g * v.stride(1);
    for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
      const int64_t t1 = std::min(L, t0 + kBlock), R = (t1 - t0) * G, N = t1;
      const float* qblk = qbuf.data() + t0 * G * D;
      const float* dyblk = dybuf.data() + t0 * G * D;
      float *P = pbuf.data(), *dP = dpbuf.data();
      gemm(false, true, R, N, D, sc, qblk, D, kb, s.ldk, 0.0f, P, N);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = t0 + r / G, valid = t + 1;
        const float m = lp[(o + t) * H + g * G + r % G];
        float* row = P + r * N;
        at::vec::map<float>([m](Vec x) { return (x - Vec(m)).exp(); }, row, row, valid);
        std::fill(row + valid, row + N, 0.0f);
      }
      gemm(true, false, N, D, R, 1.0f, P, N, dyblk, D, 1.0f, dvbuf.data(), D);  // dV += P^T dO
      gemm(false, true, R, N, D, 1.0f, dyblk, D, vb, s.ldv, 0.0f, dP, N);  // dP = dO V^T
      for (int64_t r = 0; r < R; ++r) {  // dS = P * (dP - delta), zero where P is
        const float d = delta[t0 * G + r];
        at::vec::map2<float>([d](Vec p, Vec x) { return p * (x - Vec(d)); }, dP + r * N,
                             P + r * N, dP + r * N, N);
      }
      gemm(false, false, R, D, N, sc, dP, N, kb, s.ldk, 0.0f, dqbuf.data() + t0 * G * D, D);
      gemm(true, false, N, D, R, sc, dP, N, qblk, D, 1.0f, dkbuf.data(), D);  // dK += dS^T Q
    }
    unpack_heads(dqp + o * H * D + g * G * D, dqbuf.data(), H * D, D, L, G, D);
    for (int64_t t = 0; t < L; ++t) {
      std::copy(dkbuf.data() + t * D, dkbuf.data() + (t + 1) * D, dkp + ((o + t) * s.Hkv + g) * D);
      std::copy(dvbuf.data() + t * D, dvbuf.data() + (t + 1) * D, dvp + ((o + t) * s.Hkv + g) * D);
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(tuneforge, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> Tensor");
  m.def("zero_at(Tensor x, Tensor indices, float scale) -> Tensor");
  m.def("zero_at_(Tensor(a!) x, Tensor indices) -> Tensor(a!)");
  m.def("lora_drop_product_(Tensor(a!) h, Tensor x, Tensor a, Tensor indices) -> Tensor(a!)");
  m.def("lora_drop_grad_(Tensor(a!) da, Tensor d_h, Tensor x, Tensor indices) -> Tensor(a!)");
  m.def("has_blas() -> bool", has_blas);
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> (Tensor, Tensor)");
  m.def("varlen_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tuneforge, CPU, m) {
  m.impl("swiglu_forward", swiglu_forward);
  m.impl("swiglu_backward", swiglu_backward);
  m.impl("rms_norm_forward", rms_norm_forward);
  m.impl("rms_norm_backward", rms_norm_backward);
  m.impl("zero_at", zero_at);
  m.impl("zero_at_", zero_at_);
  m.impl("lora_drop_product_", lora_drop_product_);
  m.impl("lora_drop_grad_", lora_drop_grad_);
  m.impl("varlen_attention_forward", varlen_attention_forward);
  m.impl("varlen_attention_backward", varlen_attention_backward);
}
