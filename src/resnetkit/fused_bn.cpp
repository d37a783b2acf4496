// Training-mode batch norm fused with the ReLU after it (and the residual sum before that
// ReLU): y = relu(bn(x) [+ r]) forward, and its backward, in one pass over memory each
// where ATen takes one per op. Channels-last maps seen as M x C rows (M = N*H*W), fp32 or
// bf16 activations, fp32 statistics and parameters. The batch statistics take one pass
// (shifted sums of x and x^2, in float over 64 rows, then in double). Rows are split into the
// same fixed chunks whatever the thread count, and the chunks' partial sums are added in
// chunk order: results depend on nothing but the input. Called through ctypes.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CHUNK = 1024;  // rows a partial sum covers

// The kernels are written once over a lane type V: a float (any channel count), or a vector
// of the widest registers the build targets (GCC's vector extension: 16 floats with AVX-512,
// 8 with AVX or AVX2, else 4) where the channel count is a multiple of that. Each lane does
// the same operations in the same order either way; the vector form only runs them several
// at a time. (A vector wider than the registers would be split and passed through memory:
// five times slower than the scalar loop under AVX2.)
#if defined(__AVX512F__)
constexpr int VEC = 16;
#elif defined(__AVX__)
constexpr int VEC = 8;
#else
constexpr int VEC = 4;
#endif
typedef float vf __attribute__((vector_size(VEC * 4)));
typedef uint32_t vu __attribute__((vector_size(VEC * 4)));
typedef uint16_t vh __attribute__((vector_size(VEC * 2)));

template <typename V> struct Lanes;

template <> struct Lanes<float> {
  static constexpr int width = 1;
  static float load(const float* p) { return *p; }
  static float load(const uint16_t* p) {
    uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static void store(float* p, float v) { *p = v; }
  static void store(uint16_t* p, float v) {  // round to nearest even, as ATen
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    const uint32_t quiet = (bits >> 16) | 0x40;  // a NaN stays a NaN
    *p = static_cast<uint16_t>((bits & 0x7fffffff) > 0x7f800000 ? quiet : rounded);
  }
  static float splat(float s) { return s; }
  static float lane(float v, int) { return v; }
};

template <> struct Lanes<vf> {
  static constexpr int width = VEC;
  static vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static vf load(const uint16_t* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
  static void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
  static void store(uint16_t* p, vf v) {  // Lanes<float>::store, lane by lane
    const vu bits = (vu)v;
    const vu rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    const vu quiet = (bits >> 16) | 0x40;
    const vh h = __builtin_convertvector((bits & 0x7fffffff) > 0x7f800000 ? quiet : rounded, vh);
    std::memcpy(p, &h, sizeof h);
  }
  static vf splat(float s) { return vf{} + s; }
  static float lane(vf v, int i) { return v[i]; }
};

// lanes of a per-channel parameter array: w floats from p
template <typename V> V param(const float* p) { return Lanes<V>::load(p); }

inline void affine(float mean, float invstd, float weight, float bias, float& scale, float& shift) {
  scale = invstd * weight;
  shift = bias - mean * scale;
}

// per channel, two sums over rows: f(i, q, a, b) adds the lanes of element i (channels q*width
// onwards of a row) to a and b; they are kept in fixed chunks of rows, in float over 64 rows
// then in double, and the chunks added in order
template <typename V, typename F>
void reduce(int64_t m, int c, int threads, double* out_a, double* out_b, F f) {
  constexpr int W = Lanes<V>::width;
  const int nv = c / W;
  const int64_t chunks = (m + CHUNK - 1) / CHUNK;
  std::vector<double> part(static_cast<size_t>(chunks) * c * 2, 0.0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < chunks; ++k) {
    double* dst = part.data() + k * c * 2;
    const int64_t end = std::min(m, (k + 1) * CHUNK);
    for (int64_t row = k * CHUNK; row < end; row += 64) {
      const int64_t stop = std::min(end, row + 64);
      // a lane's 64 rows in order, its sums held in registers (through memory, the
      // store-to-load forwarding between rows would set the pace)
      for (int q = 0; q < nv; ++q) {
        V a{}, b{};
        for (int64_t r = row; r < stop; ++r) f(r * c + q * W, q * W, a, b);
        for (int l = 0; l < W; ++l)
          dst[q * W + l] += Lanes<V>::lane(a, l), dst[c + q * W + l] += Lanes<V>::lane(b, l);
      }
    }
  }
  for (int j = 0; j < c; ++j) out_a[j] = out_b[j] = 0.0;
  for (int64_t k = 0; k < chunks; ++k)
    for (int j = 0; j < c; ++j) out_a[j] += part[k * c * 2 + j], out_b[j] += part[k * c * 2 + c + j];
}

// the batch statistics of x (m rows of c channels) and the affine map they give, y = x *
// scale + shift per channel
template <typename V, typename T>
void statistics(const T* x, int64_t m, int c, const float* weight, const float* bias, float eps,
                int threads, float* mean_out, float* var_out, float* invstd_out, float* scale,
                float* shift) {
  using L = Lanes<V>;
  // one pass: the sums of d = x - k and d^2, k a sample of each channel (its first row), so
  // that var = mean(d^2) - mean(d)^2 does not cancel away where the mean is far from 0
  std::vector<float> k(c);
  for (int j = 0; j < c; ++j) k[j] = Lanes<float>::load(x + j);
  const float* kk = k.data();
  std::vector<double> s(c), ss(c);
  reduce<V>(m, c, threads, s.data(), ss.data(), [&](int64_t i, int j, V& a, V& b) {
    const V d = L::load(x + i) - param<V>(kk + j);
    a += d;
    b += d * d;
  });
  for (int j = 0; j < c; ++j) {
    const double md = s[j] / m;
    const float mean = static_cast<float>(kk[j] + md);
    const float var = static_cast<float>(std::max(ss[j] / m - md * md, 0.0));
    const float invstd = 1.f / std::sqrt(var + eps);
    mean_out[j] = mean, var_out[j] = var, invstd_out[j] = invstd;
    affine(mean, invstd, weight ? weight[j] : 1.f, bias ? bias[j] : 0.f, scale[j], shift[j]);
  }
}

template <typename V, typename T>
void forward(const T* x, const T* res, T* y, int64_t m, int c, const float* weight,
             const float* bias, float eps, int relu, int threads, float* mean_out, float* var_out,
             float* invstd_out) {
  using L = Lanes<V>;
  constexpr int W = L::width;
  std::vector<float> scale(c), shift(c);
  statistics<V>(x, m, c, weight, bias, eps, threads, mean_out, var_out, invstd_out, scale.data(),
                shift.data());
  const float* sc = scale.data();
  const float* sh = shift.data();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < m; ++r) {
    const int64_t at = r * c;
    for (int j = 0; j < c; j += W) {
      V v = L::load(x + at + j) * param<V>(sc + j) + param<V>(sh + j);
      if (res) v += L::load(res + at + j);
      if (relu) v = v > V{} ? v : V{};
      L::store(y + at + j, v);
    }
  }
}

// BN's backward from the sums over m rows of g and g (x - mean) per channel: dbias, dweight
// (where wanted) and dx = k g - a - b (x - mean), i.e. k g - k mean(g) - k invstd^2
// mean(g (x - mean)) (x - mean)
inline void coefficients(const double* sg, const double* sgx, int64_t m, int c, const float* weight,
                         const float* invstd, float* dweight, float* dbias, float* k, float* a, float* b) {
  for (int j = 0; j < c; ++j) {
    const float w = weight ? weight[j] : 1.f;
    if (dbias) dbias[j] = static_cast<float>(sg[j]);
    if (dweight) dweight[j] = static_cast<float>(sgx[j]) * invstd[j];
    k[j] = w * invstd[j];
    a[j] = k[j] * static_cast<float>(sg[j] / m);
    b[j] = k[j] * invstd[j] * invstd[j] * static_cast<float>(sgx[j] / m);
  }
}

// g = dy where y > 0 (all of dy without the ReLU); dbias = sum g, dweight = sum g * xhat,
// dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat)); dres = g
template <typename V, typename T, bool RELU>
void backward(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t m, int c,
              const float* weight, const float* mean, const float* invstd, int threads,
              float* dweight, float* dbias) {
  using L = Lanes<V>;
  constexpr int W = L::width;
  std::vector<double> sg(c), sgx(c);
  reduce<V>(m, c, threads, sg.data(), sgx.data(), [&](int64_t i, int j, V& a, V& b) {
    const V d = L::load(dy + i);  // both loaded, then selected: a branch would not vectorize
    const V g = RELU ? (L::load(y + i) > V{} ? d : V{}) : d;
    a += g;
    b += g * (L::load(x + i) - param<V>(mean + j));
  });
  std::vector<float> a(c), b(c), k(c);
  coefficients(sg.data(), sgx.data(), m, c, weight, invstd, dweight, dbias, k.data(), a.data(), b.data());
  if (!dx && !dres) return;
  const float* kk = k.data();
  const float* aa = a.data();
  const float* bb = b.data();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < m; ++r) {
    const int64_t at = r * c;
    for (int j = 0; j < c; j += W) {
      const V d = L::load(dy + at + j);
      const V g = RELU ? (L::load(y + at + j) > V{} ? d : V{}) : d;
      if (dres) L::store(dres + at + j, g);
      if (dx)
        L::store(dx + at + j, param<V>(kk + j) * g - param<V>(aa + j) -
                                  param<V>(bb + j) * (L::load(x + at + j) - param<V>(mean + j)));
    }
  }
}

template <typename V, typename T>
void backward(const void* dy, const void* x, const void* y, void* dx, void* dres, int64_t m, int c,
              const float* weight, const float* mean, const float* invstd, int relu, int threads,
              float* dweight, float* dbias) {
  auto run = [&](auto fn) {
    fn(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(y), static_cast<T*>(dx),
       static_cast<T*>(dres), m, c, weight, mean, invstd, threads, dweight, dbias);
  };
  if (relu) run(backward<V, T, true>);
  else run(backward<V, T, false>);
}

// the running maximum: u replaces best where larger, or where u is the first NaN
template <typename V> auto takes(V best, V u) { return (u > best || u != u) && best == best; }
template <typename V> V pick(V best, V u) { return takes(best, u) ? u : best; }

// f(a0, a1, a2, a3, out) for each 2x2 window of NHWC maps (n, h, w, c), stride 2, floor
// mode: a0..a3 its four pixels' offsets in row order, out its pooled pixel's, in threads
template <typename F>
void windows(int64_t n, int h, int w, int c, int threads, F f) {
  const int oh = h / 2, ow = w / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < n; ++b)
    for (int i = 0; i < oh; ++i)
      for (int j = 0; j < ow; ++j) {
        const int64_t a0 = ((b * h + 2 * i) * w + 2 * j) * c, a2 = a0 + static_cast<int64_t>(w) * c;
        f(a0, a0 + c, a2, a2 + c, ((b * oh + i) * ow + j) * c);
      }
}

// which of four values is the first maximum (0-3 per lane; NaN wins), and that maximum
template <typename V> V winner(V v0, V v1, V v2, V v3, V& best) {
  using L = Lanes<V>;
  V win{};
  best = v0;
  win = takes(best, v1) ? L::splat(1.f) : win, best = pick(best, v1);
  win = takes(best, v2) ? L::splat(2.f) : win, best = pick(best, v2);
  win = takes(best, v3) ? L::splat(3.f) : win, best = pick(best, v3);
  return win;
}

// 2x2 max-pool, stride 2, no padding, floor mode (the pooled CIFAR stem's): x (n, h, w, c)
// to y (n, h/2, w/2, c); the first maximum of a window in row order wins, NaN propagates
template <typename V, typename T>
void maxpool2(const T* x, T* y, int64_t n, int h, int w, int c, int threads) {
  using L = Lanes<V>;
  windows(n, h, w, c, threads, [&](int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t out) {
    for (int k = 0; k < c; k += L::width) {
      V best;
      winner(L::load(x + a0 + k), L::load(x + a1 + k), L::load(x + a2 + k), L::load(x + a3 + k), best);
      L::store(y + out + k, best);
    }
  });
}

// its backward: dx (n, h, w, c) gets dy at each window's winner (the forward's rule,
// recomputed from x), zero elsewhere (the rows and columns floor mode leaves out included)
template <typename V, typename T>
void maxpool2_backward(const T* x, const T* dy, T* dx, int64_t n, int h, int w, int c, int threads) {
  using L = Lanes<V>;
  if (h % 2 || w % 2) std::memset(static_cast<void*>(dx), 0, sizeof(T) * n * h * w * c);
  windows(n, h, w, c, threads, [&](int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t out) {
    for (int k = 0; k < c; k += L::width) {
      V best;
      const V win = winner(L::load(x + a0 + k), L::load(x + a1 + k), L::load(x + a2 + k),
                           L::load(x + a3 + k), best);
      const V g = L::load(dy + out + k), zero{};
      L::store(dx + a0 + k, win == zero ? g : zero);
      L::store(dx + a1 + k, win == L::splat(1.f) ? g : zero);
      L::store(dx + a2 + k, win == L::splat(2.f) ? g : zero);
      L::store(dx + a3 + k, win == L::splat(3.f) ? g : zero);
    }
  });
}

// v as a T holds it (bf16: rounded as store rounds it)
template <typename V> V as_stored(V v, const float*) { return v; }
template <typename V> V as_stored(V v, const uint16_t*) {
  alignas(64) uint16_t held[Lanes<V>::width];
  Lanes<V>::store(held, v);
  return Lanes<V>::load(held);
}

// y = relu(x * scale + shift) as a T holds it, for channels k onwards
template <typename V, typename T> V bn_relu(V x, const float* scale, const float* shift, int k, const T*) {
  const V v = x * param<V>(scale + k) + param<V>(shift + k);
  return as_stored(v > V{} ? v : V{}, static_cast<const T*>(nullptr));
}

// The pooled stem's BN, ReLU and 2x2 max-pool (stride 2, even h and w) at once: p = the
// window's maximum of y = relu(bn(x)) as a T holds it (maxpool2's rule: the first maximum wins,
// NaN propagates), and xw = x at that winner. The full-size y is never written; the winner is
// the one the separate ops would pick, since they compare the same stored values.
template <typename V, typename T>
void bn_act_pool(const T* x, T* p, T* xw, int64_t n, int h, int w, int c, const float* weight,
                 const float* bias, float eps, int threads, float* mean, float* var, float* invstd) {
  using L = Lanes<V>;
  std::vector<float> scale(c), shift(c);
  statistics<V>(x, n * h * w, c, weight, bias, eps, threads, mean, var, invstd, scale.data(),
                shift.data());
  const float* sc = scale.data();
  const float* sh = shift.data();
  windows(n, h, w, c, threads, [&](int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t out) {
    for (int k = 0; k < c; k += L::width) {
      const V x0 = L::load(x + a0 + k), x1 = L::load(x + a1 + k);
      const V x2 = L::load(x + a2 + k), x3 = L::load(x + a3 + k);
      V best;
      const V win = winner(bn_relu(x0, sc, sh, k, x), bn_relu(x1, sc, sh, k, x),
                           bn_relu(x2, sc, sh, k, x), bn_relu(x3, sc, sh, k, x), best);
      L::store(p + out + k, best);
      L::store(xw + out + k, win == V{} ? x0 : win == L::splat(1.f) ? x1 : win == L::splat(2.f) ? x2 : x3);
    }
  });
}

// its backward: over the pooled maps only (elsewhere the pool passes no gradient), g = dp
// where p > 0; dbias = sum g, dweight = sum g * xhat(xw); dx (where wanted) as BN's backward
// with g at each window's winner (found again from x as the forward found it) and 0 elsewhere
template <typename V, typename T>
void bn_act_pool_backward(const T* dp, const T* p, const T* xw, const T* x, T* dx, int64_t n, int h,
                          int w, int c, const float* weight, const float* bias, const float* mean,
                          const float* invstd, int threads, float* dweight, float* dbias) {
  using L = Lanes<V>;
  const int64_t m = n * h * w;
  std::vector<double> sg(c), sgx(c);
  reduce<V>(n * (h / 2) * (w / 2), c, threads, sg.data(), sgx.data(), [&](int64_t i, int j, V& a, V& b) {
    const V d = L::load(dp + i);
    const V g = L::load(p + i) > V{} ? d : V{};
    a += g;
    b += g * (L::load(xw + i) - param<V>(mean + j));
  });
  std::vector<float> ka(c), aa(c), bb(c), sc(c), sh(c);
  coefficients(sg.data(), sgx.data(), m, c, weight, invstd, dweight, dbias, ka.data(), aa.data(), bb.data());
  for (int j = 0; j < c; ++j)
    affine(mean[j], invstd[j], weight ? weight[j] : 1.f, bias ? bias[j] : 0.f, sc[j], sh[j]);
  if (!dx) return;
  windows(n, h, w, c, threads, [&](int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t out) {
    for (int k = 0; k < c; k += L::width) {
      const V mu = param<V>(mean + k), kv = param<V>(ka.data() + k);
      const V av = param<V>(aa.data() + k), bv = param<V>(bb.data() + k);
      const V x0 = L::load(x + a0 + k), x1 = L::load(x + a1 + k);
      const V x2 = L::load(x + a2 + k), x3 = L::load(x + a3 + k);
      const float* s = sc.data();
      const float* t = sh.data();
      V best;
      const V win = winner(bn_relu(x0, s, t, k, x), bn_relu(x1, s, t, k, x), bn_relu(x2, s, t, k, x),
                           bn_relu(x3, s, t, k, x), best);
      const V d = L::load(dp + out + k), zero{};
      const V g = L::load(p + out + k) > zero ? d : zero;
      auto grad = [&](V xq, float q) { return (win == L::splat(q) ? kv * g : zero) - av - bv * (xq - mu); };
      L::store(dx + a0 + k, grad(x0, 0.f));
      L::store(dx + a1 + k, grad(x1, 1.f));
      L::store(dx + a2 + k, grad(x2, 2.f));
      L::store(dx + a3 + k, grad(x3, 3.f));
    }
  });
}

// fn(V{}, T{}) for the lane type that fits c channels and the activations' type T (bf16's
// bits as uint16_t, else float)
template <typename F>
int dispatch(int bf16, int c, F fn) {
  const bool vec = c % Lanes<vf>::width == 0;
  if (bf16) vec ? fn(vf{}, uint16_t{}) : fn(0.f, uint16_t{});
  else vec ? fn(vf{}, 0.f) : fn(0.f, 0.f);
  return 0;
}

}  // namespace

extern "C" {

// bf16: the activations are bf16 (else fp32); res, weight, bias may be null
int rk_bn_act_forward(int bf16, const void* x, const void* res, void* y, int64_t m, int c,
                      const float* weight, const float* bias, float eps, int relu, int threads,
                      float* mean, float* var, float* invstd) {
  if (m <= 0 || c <= 0) return -1;
  return dispatch(bf16, c, [&](auto lanes, auto t) {
    using T = decltype(t);
    forward<decltype(lanes)>(static_cast<const T*>(x), static_cast<const T*>(res), static_cast<T*>(y), m, c,
                             weight, bias, eps, relu, threads, mean, var, invstd);
  });
}

// dx, dres, dweight, dbias may be null (not wanted)
int rk_bn_act_backward(int bf16, const void* dy, const void* x, const void* y, void* dx, void* dres,
                       int64_t m, int c, const float* weight, const float* mean, const float* invstd,
                       int relu, int threads, float* dweight, float* dbias) {
  if (m <= 0 || c <= 0) return -1;
  return dispatch(bf16, c, [&](auto lanes, auto t) {
    backward<decltype(lanes), decltype(t)>(dy, x, y, dx, dres, m, c, weight, mean, invstd, relu, threads,
                                           dweight, dbias);
  });
}

// the 2x2 max-pool of NHWC maps (n, h, w, c), and its backward
int rk_maxpool2_forward(int bf16, const void* x, void* y, int64_t n, int h, int w, int c, int threads) {
  if (n <= 0 || h < 2 || w < 2 || c <= 0) return -1;
  return dispatch(bf16, c, [&](auto lanes, auto t) {
    using T = decltype(t);
    maxpool2<decltype(lanes)>(static_cast<const T*>(x), static_cast<T*>(y), n, h, w, c, threads);
  });
}

int rk_maxpool2_backward(int bf16, const void* x, const void* dy, void* dx, int64_t n, int h, int w, int c,
                         int threads) {
  if (n <= 0 || h < 2 || w < 2 || c <= 0) return -1;
  return dispatch(bf16, c, [&](auto lanes, auto t) {
    using T = decltype(t);
    maxpool2_backward<decltype(lanes)>(static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx),
                                       n, h, w, c, threads);
  });
}

// BN + ReLU + 2x2 max-pool of NHWC maps (n, h, w, c), h and w even: p and xw (n, h/2, w/2, c)
int rk_bn_act_pool_forward(int bf16, const void* x, void* p, void* xw, int64_t n, int h, int w, int c,
                           const float* weight, const float* bias, float eps, int threads, float* mean,
                           float* var, float* invstd) {
  if (n <= 0 || h < 2 || w < 2 || h % 2 || w % 2 || c <= 0) return -1;
  return dispatch(bf16, c, [&](auto lanes, auto t) {
    using T = decltype(t);
    bn_act_pool<decltype(lanes)>(static_cast<const T*>(x), static_cast<T*>(p), static_cast<T*>(xw), n, h, w, c,
                                 weight, bias, eps, threads, mean, var, invstd);
  });
}

// dx (and x, needed only for it) may be null
int rk_bn_act_pool_backward(int bf16, const void* dp, const void* p, const void* xw, const void* x,
                            void* dx, int64_t n, int h, int w, int c, const float* weight,
                            const float* bias, const float* mean, const float* invstd, int threads,
                            float* dweight, float* dbias) {
  if (n <= 0 || h < 2 || w < 2 || h % 2 || w % 2 || c <= 0 || (dx && !x)) return -1;
  return dispatch(bf16, c, [&](auto lanes, auto t) {
    using T = decltype(t);
    bn_act_pool_backward<decltype(lanes)>(static_cast<const T*>(dp), static_cast<const T*>(p),
                                          static_cast<const T*>(xw), static_cast<const T*>(x),
                                          static_cast<T*>(dx), n, h, w, c, weight, bias, mean, invstd,
                                          threads, dweight, dbias);
  });
}

}  // extern "C"
