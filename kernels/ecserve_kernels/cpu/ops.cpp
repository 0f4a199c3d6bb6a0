// ecserve's CPU ops for the decode step: a small-batch linear and the fused MoE experts.
//
// Both are memory-bound at decode: each weight row is read once and dotted with every token
// row in registers, and the MoE op reads only the experts that hold a token. The arithmetic
// order is fixed, so the plain-torch twins in ecserve_kernels/reference.py (cpu_linear_reference,
// moe_experts_reference) reproduce it bit for bit in float32:
//   dot(a, b), K terms: 16 lane sums, lane l adding a[16c + l] * b[16c + l] over chunks c in
//   order (the product rounded, then added: no fused multiply-add), the tail chunk zero-padded;
//   then the lanes folded in halves: 8 = 0..7 + 8..15, 4, 2, 1.
// Built with -ffp-contract=off so the compiler keeps that order; vector extensions make it
// AVX-512 where the CPU has it and narrower vectors elsewhere, with the same lanes.
//
// bfloat16 inputs on a CPU with AVX512-BF16 take the dot product instruction instead
// (vdpbf16ps: 32 bf16 pairs into 16 float32 lanes), reading half the bytes with a quarter of
// the arithmetic instructions; its rounding is the hardware's, so those results match the twins
// within bf16 tolerance, not bit for bit. Elsewhere bf16 is widened to float32 as above.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ECSERVE_NATIVE_BF16 1
#else
#define ECSERVE_NATIVE_BF16 0
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

constexpr int64_t LANES = 16;
constexpr int MB = 8;  // token rows per register block
// linear() runs here while M * O * K <= 2^22 multiply-adds, and in float32 also at up to 8
// token rows: there BLAS's fixed cost per call (~100 us at 2-64 rows, measured with 2 threads,
// float32 and bf16) outweighs its faster blocked kernel. The rest goes to at::linear.
constexpr int64_t LINEAR_MAX_ROWS = 8;
constexpr int64_t LINEAR_MAX_MACS = int64_t{1} << 22;

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 load(const c10::BFloat16* p) {  // bf16 -> float32 is exact: the high half
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <typename T>
inline v16 load_tail(const T* p, int64_t n) {  // n < 16 values, the rest zero
  T buf[LANES];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
  return load(buf);
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline float fold(v16 a) {
  const v8 h8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) +
                __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// out[m * ldo + o] = dot(x[m], w[o]) for m < M, o < O (M <= MB, O <= OB): one register block.
template <int M, typename TX, typename TW>
inline void block(const TX* const* x, const TW* w, int64_t k, float* out, int64_t ldo) {
  v16 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = v16{};
  const int64_t full = k / LANES * LANES;
  for (int64_t i = 0; i < full; i += LANES) {
    const v16 wv = load(w + i);
    for (int m = 0; m < M; ++m) {
      const v16 p = load(x[m] + i) * wv;
      acc[m] = acc[m] + p;
    }
  }
  if (full < k) {
    const v16 wv = load_tail(w + full, k - full);
    for (int m = 0; m < M; ++m) {
      const v16 p = load_tail(x[m] + full, k - full) * wv;
      acc[m] = acc[m] + p;
    }
  }
  for (int m = 0; m < M; ++m) out[m * ldo] = fold(acc[m]);
}

#if ECSERVE_NATIVE_BF16
using bf16 = c10::BFloat16;

inline __m512bh load_bh(const bf16* p, int64_t n) {  // n <= 32 values, the rest zero
  if (n == 32) return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  // A masked load never touches the masked-off tail, so a row's end is safe.
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16((__mmask32{1} << n) - 1, p));
}

// block() for bf16 rows and weights: float32 lanes, one vdpbf16ps per 32 terms. An overload,
// more specialised than the template above, so dots() picks it for bf16 x bf16.
template <int M>
inline void block(const bf16* const* x, const bf16* w, int64_t k, float* out, int64_t ldo) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    const int64_t n = std::min<int64_t>(32, k - i);
    const __m512bh wv = load_bh(w + i, n);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], load_bh(x[m] + i, n), wv);
  }
  for (int m = 0; m < M; ++m) out[m * ldo] = _mm512_reduce_add_ps(acc[m]);
}
#endif

// out[m, o] (row stride ldo) = dot(x[m], w[o0 + o]) for all m < x.size(), o < o_count: one
// weight row at a time (reading several rows side by side halved the read rate here), each
// dotted with up to MB token rows held in registers.
template <typename TX, typename TW>
void dots(const std::vector<const TX*>& x, const TW* w, int64_t ldw, int64_t o0,
          int64_t o_count, int64_t k, float* out, int64_t ldo) {
  const int64_t mrows = static_cast<int64_t>(x.size());
  for (int64_t o = 0; o < o_count; ++o) {
    const TW* wr = w + (o0 + o) * ldw;
    for (int64_t m = 0; m < mrows; m += MB) {
      const TX* const* xr = x.data() + m;
      float* dst = out + m * ldo + o;
      switch (std::min<int64_t>(MB, mrows - m)) {
        case 1: block<1>(xr, wr, k, dst, ldo); break;
        case 2: block<2>(xr, wr, k, dst, ldo); break;
        case 3: block<3>(xr, wr, k, dst, ldo); break;
        case 4: block<4>(xr, wr, k, dst, ldo); break;
        case 5: block<5>(xr, wr, k, dst, ldo); break;
        case 6: block<6>(xr, wr, k, dst, ldo); break;
        case 7: block<7>(xr, wr, k, dst, ldo); break;
        default: block<8>(xr, wr, k, dst, ldo); break;
      }
    }
  }
}

// Weight rows per parallel work item: enough to amortise a task, few enough to share rows.
int64_t row_grain(int64_t rows) {
  const int64_t threads = at::get_num_threads();
  int64_t g = (rows + 4 * threads - 1) / (4 * threads);
  return std::max<int64_t>(g, 16);
}

template <typename T>
std::vector<const T*> row_ptrs(const at::Tensor& x) {
  std::vector<const T*> rows(x.size(0));
  const T* base = x.data_ptr<T>();
  for (int64_t i = 0; i < x.size(0); ++i) rows[i] = base + i * x.stride(0);
  return rows;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dtype() == at::kFloat || t.dtype() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.dtype());
  TORCH_CHECK(t.stride(-1) == 1, name, " must have contiguous rows");
}

// The row type weights of type T are dotted with: bf16 itself where the CPU has AVX512-BF16,
// else float32 (a bf16 row widened once, exactly, not once per weight row).
template <typename T>
using Row = std::conditional_t<ECSERVE_NATIVE_BF16 && !std::is_same_v<T, float>, T, float>;

template <typename T>
at::Tensor as_rows(const at::Tensor& x) {
  return std::is_same_v<Row<T>, float> ? x.to(at::kFloat) : x;
}

template <typename T>
at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& w) {
  const int64_t m = x.size(0), k = x.size(1), o = w.size(0);
  at::Tensor out = at::empty({m, o}, x.options().dtype(at::kFloat));
  const at::Tensor xr = as_rows<T>(x);
  const auto rows = row_ptrs<Row<T>>(xr);
  const T* wp = w.data_ptr<T>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, o, row_grain(o), [&](int64_t lo, int64_t hi) {
    dots(rows, wp, w.stride(0), lo, hi - lo, k, op + lo, o);
  });
  return out;
}

// y = x @ w.T (+ bias): x [M, K], w [O, K] -> [M, O] in x's dtype, accumulated in float32;
// float32 (and bf16 with AVX512-BF16) within the limits above here, the rest through
// at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  check_rows(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "linear: x [M, K] and w [O, K], got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.dtype() == w.dtype(), "linear: x and w must share a dtype");
  // Deciding here, not in the caller, keeps a compiled graph free of a guard on the batch size.
  const int64_t m = x.size(0);
  const bool fp32 = x.dtype() == at::kFloat;
  const bool own = m * w.size(0) * w.size(1) <= LINEAR_MAX_MACS || (fp32 && m <= LINEAR_MAX_ROWS);
  if (!own || !(fp32 || ECSERVE_NATIVE_BF16)) return at::linear(x, w, bias);
  at::Tensor out = fp32 ? linear_impl<float>(x, w) : linear_impl<c10::BFloat16>(x, w);
  if (bias) out.add_(*bias);
  return out.to(x.dtype());
}

template <typename T>
at::Tensor moe_impl(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gate,
                    const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                    int64_t act) {
  const int64_t n = x.size(0), d = x.size(1), e = idx.size(0), kk = idx.size(1);
  const int64_t f = wg.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();
  // The filled slots, expert-major (ascending expert, then slot order), and where each
  // expert's run starts: only these experts' weights are read.
  std::vector<int64_t> tok, first{0}, expert;
  std::vector<float> g;
  for (int64_t ex = 0; ex < e; ++ex) {
    const int64_t before = static_cast<int64_t>(tok.size());
    for (int64_t j = 0; j < kk; ++j) {
      const int64_t t = ip[ex * kk + j];
      if (t < 0) continue;
      TORCH_CHECK(t < n, "moe_experts: slot holds token ", t, " of ", n);
      tok.push_back(t);
      g.push_back(gp[ex * kk + j]);
    }
    if (static_cast<int64_t>(tok.size()) > before) {
      expert.push_back(ex);
      first.push_back(static_cast<int64_t>(tok.size()));
    }
  }
  at::Tensor y = at::zeros({n, d}, x.options().dtype(at::kFloat));
  const int64_t slots = static_cast<int64_t>(tok.size());
  if (slots == 0) return y;
  const int64_t active = static_cast<int64_t>(expert.size());
  const at::Tensor xr = as_rows<T>(x);
  const Row<T>* xp = xr.template data_ptr<Row<T>>();
  std::vector<const Row<T>*> xrows(slots);
  for (int64_t s = 0; s < slots; ++s) xrows[s] = xp + tok[s] * xr.stride(0);
  at::Tensor gu = at::empty({2, slots, f}, x.options().dtype(at::kFloat));
  float* gate_out = gu.data_ptr<float>();
  float* up_out = gate_out + slots * f;
  // Region 1: gate and up projections, work items (active expert, tile of F rows).
  const int64_t tile = std::min(f, row_grain(f * active));
  const int64_t tiles = (f + tile - 1) / tile;
  at::parallel_for(0, active * tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t a = it / tiles, f0 = it % tiles * tile, fc = std::min(tile, f - f0);
      const int64_t ex = expert[a], s0 = first[a];
      std::vector<const Row<T>*> rows(xrows.begin() + s0, xrows.begin() + first[a + 1]);
      const T* wgp = wg.data_ptr<T>() + ex * wg.stride(0);
      const T* wup = wu.data_ptr<T>() + ex * wu.stride(0);
      dots(rows, wgp, wg.stride(1), f0, fc, d, gate_out + s0 * f + f0, f);
      dots(rows, wup, wu.stride(1), f0, fc, d, up_out + s0 * f + f0, f);
    }
  });
  // The activation through ATen, one expert's [k_e, F] block per call as the twin makes it:
  // ATen runs an array's tail through its scalar path, so the blocks must match, not just the
  // function.
  at::Tensor h = at::empty({slots, f}, x.options().dtype(at::kFloat));
  for (int64_t a = 0; a < active; ++a) {
    const int64_t s0 = first[a], k = first[a + 1] - s0;
    at::Tensor ga = gu[0].narrow(0, s0, k), ha = h.narrow(0, s0, k);
    at::mul_out(ha, act == 0 ? at::silu(ga) : at::gelu(ga, "tanh"), gu[1].narrow(0, s0, k));
  }
  // bf16 weights: the hidden activation is rounded to bf16 before the down projection, as a
  // bf16 model's is, whichever instructions then read it.
  if (!std::is_same_v<T, float>) h = as_rows<T>(h.to(x.dtype()));
  const Row<T>* hp = h.template data_ptr<Row<T>>();
  std::vector<const Row<T>*> hrows(slots);
  for (int64_t s = 0; s < slots; ++s) hrows[s] = hp + s * f;
  // Region 2: down projection and the gated sum, work items tiles of d; each tile adds the
  // experts in ascending order, so every token's sum runs in the spec's order.
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, d, row_grain(d), [&](int64_t lo, int64_t hi) {
    std::vector<float> out(static_cast<size_t>(slots) * (hi - lo));
    for (int64_t a = 0; a < active; ++a) {
      const int64_t s0 = first[a], s1 = first[a + 1];
      std::vector<const Row<T>*> rows(hrows.begin() + s0, hrows.begin() + s1);
      const T* wdp = wd.data_ptr<T>() + expert[a] * wd.stride(0);
      dots(rows, wdp, wd.stride(1), lo, hi - lo, f, out.data() + s0 * (hi - lo), hi - lo);
      for (int64_t s = s0; s < s1; ++s) {
        float* yrow = yp + tok[s] * d;
        const float* orow = out.data() + s * (hi - lo);
        for (int64_t c = lo; c < hi; ++c) {
          const float p = orow[c - lo] * g[s];
          yrow[c] = yrow[c] + p;
        }
      }
    }
  });
  return y;
}

// y [N, d] float32 = sum over the filled slots (idx [E, K] >= 0) of gate * GLU_e(x[token]),
// each token's terms added in ascending expert order. act: 0 silu, 1 gelu (tanh).
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gate,
                       const at::Tensor& w_gate, const at::Tensor& w_up,
                       const at::Tensor& w_down, int64_t act) {
  check_rows(x, "x");
  for (const auto* w : {&w_gate, &w_up, &w_down}) {
    check_rows(*w, "expert weights");
    TORCH_CHECK(w->dtype() == x.dtype(), "moe_experts: weights and x must share a dtype");
  }
  TORCH_CHECK(idx.dtype() == at::kLong && gate.dtype() == at::kFloat &&
                  idx.sizes() == gate.sizes() && idx.dim() == 2 && idx.is_contiguous() &&
                  gate.is_contiguous(),
              "moe_experts: idx int64 and gate float32, both [E, K] and contiguous");
  TORCH_CHECK(act == 0 || act == 1, "moe_experts: act is 0 (silu) or 1 (gelu)");
  TORCH_CHECK(w_gate.size(0) == idx.size(0) && w_gate.size(2) == x.size(1) &&
                  w_down.size(1) == x.size(1) && w_down.size(2) == w_gate.size(1),
              "moe_experts: weights [E, F, d], [E, F, d], [E, d, F] for x [N, d]");
  return x.dtype() == at::kFloat
             ? moe_impl<float>(x, idx, gate, w_gate, w_up, w_down, act)
             : moe_impl<c10::BFloat16>(x, idx, gate, w_gate, w_up, w_down, act);
}

bool native_bf16() { return ECSERVE_NATIVE_BF16; }

}  // namespace

TORCH_LIBRARY(ecserve, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("moe_experts(Tensor x, Tensor idx, Tensor gate, Tensor w_gate, Tensor w_up, "
        "Tensor w_down, int act) -> Tensor");
  // Whether bf16 runs on AVX512-BF16's dot product instruction (else widened to float32).
  m.def("native_bf16() -> bool", &native_bf16);
}

TORCH_LIBRARY_IMPL(ecserve, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe_experts", &moe_experts);
}
