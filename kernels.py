"""kernels: a few fused CUDA ops for nanosp, each beside its plain-PyTorch reference.

Every op here is memory-bound: a handful of flops per element, so its time is the bytes it
moves. Eager PyTorch runs each step as its own kernel and writes every intermediate to
global memory and reads it back; a fused kernel reads its inputs once, keeps intermediates in
registers (in float32, whatever the storage dtype) and writes its outputs once.

| op                    | computes                                  | eager (reads+writes)  | fused |
| --------------------- | ----------------------------------------- | --------------------- | ----- |
| `bias_gelu`           | gelu_tanh(x + bias)                       | 4                     | 2     |
| `bias_dropout_add`    | residual + dropout(x + bias)              | 9 + mask              | 4     |
| `dropout`             | x * keep * 1/(1-p)                        | 4 + mask              | 2     |
| `scale_mask_softmax`  | softmax(scale * s + causal mask)          | 6                     | 1.5   |
| `layer_norm`          | F.layer_norm over the last dim            | (already fused)       | 2     |

(tensor passes, forward, in units of one activation; the fused softmax reads only the lower
triangle of the scores. Backward is fused the same way, and no dropout mask is ever stored.)

Dropout never stores its mask: `keep` is a hash of (key, global element index), the same bits
as `nanosp.dropout_keep_mask`, so backward (and recomputation) regenerates it for free.

Each op reads: reference -> CUDA source -> autograd Function -> public function. All the CUDA
and C++ sources are compiled together, once, on first use (`torch.utils.cpp_extension.load_inline`,
cached in TORCH_EXTENSIONS_DIR); importing this file never touches CUDA. The public functions use
the kernels when `available()` and the input is a CUDA tensor, the references otherwise.
Set NANOSP_KERNELS=0 to force the references everywhere.

Kernel inputs must be contiguous CUDA tensors of one dtype (float32, bfloat16 or float16);
anything else is a ValueError that names the tensor.
"""
import functools
import os
import statistics
import warnings

import torch
import torch.nn.functional as F

M32 = 0xFFFFFFFF


def _check_dropout_args(p, key, offset):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1)")
    if not (isinstance(key, int) and 0 <= key <= M32):
        raise ValueError(f"dropout key={key!r} must be an int in [0, 2**32)")
    if not (isinstance(offset, int) and offset >= 0):
        raise ValueError(f"dropout offset={offset!r} must be an int >= 0")


def _mask_args(p, key, offset):
    """(key, offset, threshold, scale) as the kernels take them; keep = hash >= threshold."""
    return key, offset, int(p * 2**32), 1.0 / (1.0 - p)


def _sum_rows(t, n):
    """Sum t over all leading dims: the gradient of a bias broadcast along the last dim."""
    return t.reshape(-1, n).sum(0)


# -----------------------------------------------------------------------------
# Shared sources and the one lazy build

# The CUDA file includes no torch header: kernels and launchers see raw pointers, a dtype code
# (0 float32, 1 bfloat16, 2 float16) and a stream. It compiles in seconds; the C++ file below
# does the tensor checks and the Python bindings.
_CUDA_HEADER = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

// HD: the elementwise code also compiles for the host, where the tests run it (NANOSP_HOST_TEST).
#define HD __host__ __device__ __forceinline__

// Memory holds T; registers hold float32.
HD float to_f(float v) { return v; }
HD float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
HD float to_f(__half v) { return __half2float(v); }
template <typename T> HD T from_f(float v);
template <> HD float from_f<float>(float v) { return v; }
template <> HD __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> HD __half from_f<__half>(float v) { return __float2half(v); }

// VEC elements moved as one 16-byte transaction (VEC = 16 / sizeof(T)) when VEC > 1.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

// f = p[i .. i+VEC) as float. A full chunk is one vector load (the launcher checked that p is
// 16-byte aligned and i is a multiple of VEC); the chunk that crosses the end n is loaded
// element by element, and its lanes at or past n read as `fill`.
template <int VEC, typename T>
HD void load(const T* p, int64_t i, int64_t n, float (&f)[VEC], float fill = 0.f) {
  if (i + VEC <= n) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) f[k] = to_f(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) f[k] = i + k < n ? to_f(p[i + k]) : fill;
  }
}

// p[i .. min(i+VEC, n)) = f, rounded to T (round to nearest even, as PyTorch does).
template <int VEC, typename T>
HD void store(T* p, int64_t i, int64_t n, const float (&f)[VEC]) {
  if (i + VEC <= n) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_f<T>(f[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) if (i + k < n) p[i + k] = from_f<T>(f[k]);
  }
}

// v[k] += bias[(i + k) % n_bias]: a chunk may cross a row end, so the bias index wraps. One
// 64-bit modulo per chunk, then a counter.
template <int VEC, typename T>
HD void add_bias(const T* bias, int64_t n_bias, int64_t i, float (&v)[VEC]) {
  int64_t j = i % n_bias;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    v[k] += to_f(bias[j]);
    if (++j == n_bias) j = 0;
  }
}

// The dropout hash, bit for bit nanosp.mix32 and nanosp.dropout_keep_mask (uint32 wraps).
HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}
// Does dropout keep element idx of the site's global tensor? threshold = int(p * 2**32).
HD bool keep(uint32_t key, uint64_t idx, uint32_t threshold) {
  return mix32(mix32(key ^ (uint32_t)idx) ^ (uint32_t)(idx >> 32)) >= threshold;
}

// Sum (or max) of v over the block, returned to every thread. blockDim.x is a multiple of 32,
// at most 1024: each warp reduces with shuffles, warp results meet in shared memory.
template <bool MAX>
__device__ float block_reduce(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x / 32) ? partial[lane] : (MAX ? -INFINITY : 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  return v;
}

// Threads for one block per row of n_cols elements, VEC per thread per step: one warp at least,
// 1024 at most (longer rows loop).
static int row_threads(int64_t n_cols, int vec) {
  const int64_t chunks = (n_cols + vec - 1) / vec;
  const int64_t t = (chunks + 31) / 32 * 32;
  return (int)(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

static bool aligned16(const void* p) { return p == nullptr || (uintptr_t)p % 16 == 0; }
template <typename... P> static bool all_aligned(P... p) { return (aligned16(p) && ...); }

// Calls f(V) with V = 16 / sizeof(T) (16-byte vectors) when vec, else V = 1 (scalar).
template <typename T, typename Fn> static void with_vec(bool vec, Fn f) {
  if (vec) f(std::integral_constant<int, 16 / sizeof(T)>{});
  else f(std::integral_constant<int, 1>{});
}

// Row kernels (one block per row of n_cols): picks VEC as with_vec, 16-byte vectors only when
// every row start stays aligned (VEC divides n_cols), and the block size; calls f(V, threads).
template <typename T, typename Fn> static void launch_rows(int64_t n_cols, bool aligned, Fn f) {
  with_vec<T>(aligned && n_cols % (16 / sizeof(T)) == 0,
              [&](auto V) { f(V, row_threads(n_cols, decltype(V)::value)); });
}

static const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#define DISPATCH_DTYPE(dtype, ...)                               \
  switch (dtype) {                                               \
    case 0: { using T = float; __VA_ARGS__; } break;             \
    case 1: { using T = __nv_bfloat16; __VA_ARGS__; } break;     \
    case 2: { using T = __half; __VA_ARGS__; } break;            \
    default: return "unsupported dtype code";                    \
  }

// Elementwise ops: thread t of the grid handles the chunks [c*VEC, c*VEC + VEC) with
// c = t, t + (threads in grid), ... ; `op.apply<VEC>(i, n)` does one chunk.
template <int VEC, typename Op>
__global__ void pointwise_kernel(Op op, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * VEC;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n; i += stride)
    op.template apply<VEC>(i, n);
}

template <typename Op>
static const char* launch_pointwise(const Op& op, int64_t n, bool vec, int64_t stream) {
  if (n == 0) return nullptr;
  with_vec<typename Op::T>(vec, [&](auto V) {
    constexpr int VEC = decltype(V)::value;
#ifdef NANOSP_HOST_TEST  // the CPU tests: the same chunks, one after another, on host pointers
    for (int64_t i = 0; i < n; i += VEC) op.template apply<VEC>(i, n);
#else
    const int threads = 256;
    int64_t blocks = ((n + VEC - 1) / VEC + threads - 1) / threads;
    if (blocks > (1 << 20)) blocks = 1 << 20;  // the grid-stride loop covers the rest
    pointwise_kernel<VEC><<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(op, n);
#endif
  });
#ifdef NANOSP_HOST_TEST
  return nullptr;
#else
  return launch_error();
#endif
}
"""

# Host side: tensor checks (ValueError naming the tensor: TORCH_CHECK_VALUE) and the call into
# the launchers, under a device guard so that a tensor on cuda:1 launches on cuda:1.
_CPP_HEADER = r"""
#include <torch/extension.h>

// dtype code shared with the CUDA launchers.
static int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default:
      TORCH_CHECK_VALUE(false, name, " has dtype ", t.scalar_type(),
                        "; the kernels take float32, bfloat16 or float16");
  }
  return -1;
}

// t must be a contiguous CUDA tensor on x's device, with x's dtype.
static void check(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " is on ", t.device(), "; the kernels need CUDA tensors");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " (shape ", t.sizes(), ", strides ", t.strides(),
                    ") is not contiguous; call .contiguous() first");
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
                    " but x has ", x.scalar_type(), "; cast it to x's dtype");
}

static void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check(t, name, x);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " has shape ", t.sizes(), " but x has ", x.sizes());
}

// x: the main input, at least 1-d, last dim not empty.
static int check_x(const at::Tensor& x) {
  const int code = dtype_code(x, "x");
  check(x, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "x has shape ", x.sizes(),
                    "; expected at least one dim, the last not empty");
  return code;
}

// A per-feature vector (bias, LayerNorm weight): shape (N,) with N = x.size(-1).
static void check_vector(const at::Tensor& v, const char* name, const at::Tensor& x) {
  check(v, name, x);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(-1), name, " has shape ", v.sizes(),
                    "; expected (", x.size(-1), ",), the last dim of x ", x.sizes());
}

// Per-row float32 statistics (LayerNorm mean, rstd): rows = x.numel() / x.size(-1) values.
static void check_stats(const at::Tensor& s, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(s.is_cuda() && s.device() == x.device() && s.is_contiguous() &&
                    s.scalar_type() == at::kFloat && s.numel() == x.numel() / x.size(-1),
                    name, " must be a contiguous float32 tensor on ", x.device(), " with ",
                    x.numel() / x.size(-1), " elements; got ", s.scalar_type(), " ", s.sizes(),
                    " on ", s.device());
}

static const void* ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

static void raise_if(const char* err) { TORCH_CHECK(err == nullptr, "CUDA kernel launch failed: ", err); }
"""


def _sources():
    """(C++ source, CUDA source) of the extension, exactly as compiled (the tests compile them too)."""
    cpp = [_CPP_HEADER, _CPP_BIAS_GELU, _CPP_DROPOUT, _CPP_SOFTMAX, _CPP_LAYER_NORM]
    cpp.append("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n")
    cpp += [f'  m.def("{f}", torch::wrap_pybind_function({f}));\n' for f in _FUNCTIONS]
    cpp.append("}\n")
    cuda = [_CUDA_HEADER, _CUDA_BIAS_GELU, _CUDA_DROPOUT, _CUDA_SOFTMAX, _CUDA_LAYER_NORM]
    return "".join(cpp), "".join(cuda)


_FUNCTIONS = ["bias_gelu_fwd", "bias_gelu_bwd", "dropout_add_fwd", "keep_mask",
              "softmax_fwd", "softmax_bwd", "layer_norm_fwd", "layer_norm_bwd"]
CUDA_FLAGS = ["-O3", "--use_fast_math"]  # fast math: __expf, approximate division and rsqrt


def available():
    """True when the fused kernels run: CUDA is present, NANOSP_KERNELS is not "0", and the
    extension compiled (the first call compiles it, ~1 minute; later calls hit the build cache)."""
    return os.environ.get("NANOSP_KERNELS", "1") != "0" and torch.cuda.is_available() and _ops() is not None


@functools.cache
def _ops():
    """The compiled extension, or None (with one warning saying why) if it does not build."""
    from torch.utils.cpp_extension import load_inline

    cpp, cuda = _sources()
    try:
        # Arch flags: TORCH_CUDA_ARCH_LIST if set, else the visible GPUs (sm_90 on Hopper).
        return load_inline(name="nanosp_kernels", cpp_sources=[cpp], cuda_sources=[cuda],
                           extra_cflags=["-O2"], extra_cuda_cflags=CUDA_FLAGS, no_implicit_headers=True)
    except Exception as e:  # no compiler, no CUDA toolkit, a compile error: fall back, but say why
        reason = (str(e).strip().splitlines() or [""])[0]
        warnings.warn(f"nanosp kernels unavailable, using the PyTorch references: {type(e).__name__}: {reason}",
                      RuntimeWarning, stacklevel=3)
        return None


def _use_kernels(x):
    return x.is_cuda and available()


def _run(op, *args):
    """Call op of the extension on the current stream of args[0]'s device."""
    getattr(_ops(), op)(*args, torch.cuda.current_stream(args[0].device).cuda_stream)


# -----------------------------------------------------------------------------
# 1. bias + GeLU (the MLP's first linear has its bias added here, not in the matmul)

def bias_gelu_ref(x, bias):
    return F.gelu(x + bias, approximate="tanh")


_CUDA_BIAS_GELU = r"""
// gelu(y) = 0.5 y (1 + tanh(u)),  u = sqrt(2/pi) (y + 0.044715 y^3)   (GPT-2's tanh GeLU)
#define GELU_K0 0.7978845608028654f
#define GELU_K1 0.044715f
HD float gelu(float y) {
  return 0.5f * y * (1.f + tanhf(GELU_K0 * (y + GELU_K1 * y * y * y)));
}
// gelu'(y) = 0.5 (1 + t) + 0.5 y (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 y^2),  t = tanh(u)
HD float gelu_grad(float y) {
  const float t = tanhf(GELU_K0 * (y + GELU_K1 * y * y * y));
  return 0.5f * (1.f + t) + 0.5f * y * (1.f - t * t) * GELU_K0 * (1.f + 3.f * GELU_K1 * y * y);
}

// out = gelu(x + bias). Eager: x + bias writes y, gelu reads it back: 4 tensor passes, here 2.
template <typename T_> struct BiasGeluFwd {
  using T = T_;
  const T* x; const T* bias; T* out; int64_t n_bias;
  template <int VEC> HD void apply(int64_t i, int64_t n) const {
    float v[VEC];
    load(x, i, n, v);
    add_bias(bias, n_bias, i, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = gelu(v[k]);
    store(out, i, n, v);
  }
};

// grad_x = grad * gelu'(x + bias): x + bias is recomputed, not stored.
template <typename T_> struct BiasGeluBwd {
  using T = T_;
  const T* grad; const T* x; const T* bias; T* grad_x; int64_t n_bias;
  template <int VEC> HD void apply(int64_t i, int64_t n) const {
    float g[VEC], v[VEC];
    load(grad, i, n, g);
    load(x, i, n, v);
    add_bias(bias, n_bias, i, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = g[k] * gelu_grad(v[k]);
    store(grad_x, i, n, v);
  }
};

extern "C" const char* bias_gelu_fwd_launch(int dtype, const void* x, const void* bias, void* out,
                                 int64_t n, int64_t n_bias, int64_t stream) {
  DISPATCH_DTYPE(dtype, return launch_pointwise(BiasGeluFwd<T>{(const T*)x, (const T*)bias, (T*)out, n_bias},
                                                n, all_aligned(x, out), stream));
}

extern "C" const char* bias_gelu_bwd_launch(int dtype, const void* grad, const void* x, const void* bias, void* grad_x,
                                 int64_t n, int64_t n_bias, int64_t stream) {
  DISPATCH_DTYPE(dtype, return launch_pointwise(
      BiasGeluBwd<T>{(const T*)grad, (const T*)x, (const T*)bias, (T*)grad_x, n_bias},
      n, all_aligned(grad, x, grad_x), stream));
}
"""

_CPP_BIAS_GELU = r"""
extern "C" const char* bias_gelu_fwd_launch(int, const void*, const void*, void*, int64_t, int64_t, int64_t);
extern "C" const char* bias_gelu_bwd_launch(int, const void*, const void*, const void*, void*, int64_t, int64_t, int64_t);

void bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out, int64_t stream) {
  const int dtype = check_x(x);
  check_vector(bias, "bias", x);
  check_like(out, "out", x);
  const c10::DeviceGuard guard(x.device());
  raise_if(bias_gelu_fwd_launch(dtype, x.data_ptr(), bias.data_ptr(), out.data_ptr(), x.numel(), bias.numel(), stream));
}

void bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& grad_x,
                   int64_t stream) {
  const int dtype = check_x(x);
  check_like(grad, "grad", x);
  check_vector(bias, "bias", x);
  check_like(grad_x, "grad_x", x);
  const c10::DeviceGuard guard(x.device());
  raise_if(bias_gelu_bwd_launch(dtype, grad.data_ptr(), x.data_ptr(), bias.data_ptr(), grad_x.data_ptr(),
                                x.numel(), bias.numel(), stream));
}
"""


class _BiasGelu(torch.autograd.Function):
    """gelu(x + bias); saves x (the ledger's "GeLU input") and the bias parameter, not x + bias."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        out = torch.empty_like(x)
        _run("bias_gelu_fwd", x, bias, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        _run("bias_gelu_bwd", grad.contiguous(), x, bias, grad_x)
        return grad_x, _sum_rows(grad_x, bias.numel()) if ctx.needs_input_grad[1] else None


def bias_gelu(x, bias):
    """gelu_tanh(x + bias) for x (..., N), bias (N,)."""
    return _BiasGelu.apply(x, bias) if _use_kernels(x) else bias_gelu_ref(x, bias)


# -----------------------------------------------------------------------------
# 2-3. dropout and bias + dropout + residual add (one kernel serves both, and both backwards)

def dropout_ref(x, p, key, offset):
    if p == 0:
        return x
    from nanosp import dropout_keep_mask  # here, not at the top: nanosp imports this file

    keep = dropout_keep_mask(x.shape, p, key, offset, device=x.device)
    return x.masked_fill(~keep, 0) * (1.0 / (1.0 - p))


def bias_dropout_add_ref(x, bias, residual, p, key, offset):
    return residual + dropout_ref(x if bias is None else x + bias, p, key, offset)


_CUDA_DROPOUT = r"""
// out = [residual +] keep * scale * (x [+ bias]), element i of the site at global index offset + i.
// bias and residual may be null; threshold == 0 (p == 0) skips the hash. With bias and residual
// this is bias_dropout_add (eager: 3 kernels, a stored byte mask, 8+ tensor passes; here 4);
// without, it is dropout forward, and applied to the incoming gradient, the backward of both.
template <typename T_> struct DropoutAdd {
  using T = T_;
  const T* x; const T* bias; const T* residual; T* out; int64_t n_bias;
  uint32_t key; uint64_t offset; uint32_t threshold; float scale;
  template <int VEC> HD void apply(int64_t i, int64_t n) const {
    float v[VEC];
    load(x, i, n, v);
    if (bias) add_bias(bias, n_bias, i, v);
    if (threshold) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = keep(key, offset + i + k, threshold) ? v[k] * scale : 0.f;
    }
    if (residual) {
      float r[VEC];
      load(residual, i, n, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] += r[k];
    }
    store(out, i, n, v);
  }
};

// The mask itself, one byte per element: only for tests against nanosp.dropout_keep_mask.
struct KeepMask {
  using T = uint8_t;
  uint8_t* out; uint32_t key; uint64_t offset; uint32_t threshold;
  template <int VEC> HD void apply(int64_t i, int64_t n) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) if (i + k < n) out[i + k] = keep(key, offset + i + k, threshold);
  }
};

extern "C" const char* dropout_add_launch(int dtype, const void* x, const void* bias, const void* residual, void* out,
                               int64_t n, int64_t n_bias, int64_t key, int64_t offset, int64_t threshold,
                               float scale, int64_t stream) {
  DISPATCH_DTYPE(dtype, return launch_pointwise(
      DropoutAdd<T>{(const T*)x, (const T*)bias, (const T*)residual, (T*)out, n_bias,
                    (uint32_t)key, (uint64_t)offset, (uint32_t)threshold, scale},
      n, all_aligned(x, residual, out), stream));
}

extern "C" const char* keep_mask_launch(void* out, int64_t n, int64_t key, int64_t offset, int64_t threshold, int64_t stream) {
  return launch_pointwise(KeepMask{(uint8_t*)out, (uint32_t)key, (uint64_t)offset, (uint32_t)threshold},
                          n, true, stream);
}
"""

_CPP_DROPOUT = r"""
extern "C" const char* dropout_add_launch(int, const void*, const void*, const void*, void*, int64_t, int64_t,
                               int64_t, int64_t, int64_t, float, int64_t);
extern "C" const char* keep_mask_launch(void*, int64_t, int64_t, int64_t, int64_t, int64_t);

static void check_mask_args(int64_t key, int64_t offset, int64_t threshold) {
  TORCH_CHECK_VALUE(key >= 0 && key <= 0xFFFFFFFFLL, "dropout key=", key, " must be in [0, 2**32)");
  TORCH_CHECK_VALUE(offset >= 0, "dropout offset=", offset, " must be >= 0");
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= 0xFFFFFFFFLL, "dropout threshold=", threshold,
                    " must be int(p * 2**32) for p in [0, 1)");
}

void dropout_add_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, const at::Tensor& out,
                     int64_t key, int64_t offset, int64_t threshold, double scale, int64_t stream) {
  const int dtype = check_x(x);
  if (bias) check_vector(*bias, "bias", x);
  if (residual) check_like(*residual, "residual", x);
  check_like(out, "out", x);
  check_mask_args(key, offset, threshold);
  const c10::DeviceGuard guard(x.device());
  raise_if(dropout_add_launch(dtype, x.data_ptr(), ptr(bias), ptr(residual), out.data_ptr(), x.numel(),
                              x.size(-1), key, offset, threshold, (float)scale, stream));
}

void keep_mask(const at::Tensor& out, int64_t key, int64_t offset, int64_t threshold, int64_t stream) {
  TORCH_CHECK_VALUE(out.is_cuda() && out.is_contiguous() && out.scalar_type() == at::kByte,
                    "out must be a contiguous uint8 CUDA tensor; got ", out.scalar_type(), " on ", out.device());
  check_mask_args(key, offset, threshold);
  const c10::DeviceGuard guard(out.device());
  raise_if(keep_mask_launch(out.data_ptr(), out.numel(), key, offset, threshold, stream));
}
"""


class _DropoutAdd(torch.autograd.Function):
    """[residual +] dropout(x [+ bias]); saves nothing: backward regenerates the mask from (key, offset)."""

    @staticmethod
    def forward(ctx, x, bias, residual, p, key, offset):
        ctx.mask = _mask_args(p, key, offset)
        ctx.n_bias = None if bias is None else bias.numel()
        out = torch.empty_like(x)
        _run("dropout_add_fwd", x, bias, residual, out, *ctx.mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        grad_x = torch.empty_like(grad)
        _run("dropout_add_fwd", grad, None, None, grad_x, *ctx.mask)  # grad_x = keep * scale * grad
        grad_bias = _sum_rows(grad_x, ctx.n_bias) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, grad if ctx.needs_input_grad[2] else None, None, None, None


def _keep_mask_cuda(numel, p, key, offset, device="cuda"):
    """The kernels' dropout mask as a bool tensor (for tests against nanosp.dropout_keep_mask)."""
    _check_dropout_args(p, key, offset)
    out = torch.empty(numel, dtype=torch.uint8, device=device)
    _run("keep_mask", out, *_mask_args(p, key, offset)[:3])
    return out.bool()


def dropout(x, p, key, offset):
    """x * keep * 1/(1-p); keep from (key, offset) as in nanosp.dropout_keep_mask."""
    _check_dropout_args(p, key, offset)
    if p == 0:
        return x
    return _DropoutAdd.apply(x, None, None, p, key, offset) if _use_kernels(x) else dropout_ref(x, p, key, offset)


def bias_dropout_add(x, bias, residual, p, key, offset):
    """residual + dropout(x + bias); bias may be None."""
    _check_dropout_args(p, key, offset)
    if _use_kernels(x):
        return _DropoutAdd.apply(x, bias, residual, p, key, offset)
    return bias_dropout_add_ref(x, bias, residual, p, key, offset)


# -----------------------------------------------------------------------------
# 4. scale + causal mask + softmax (attention scores; query i sees keys j <= i)

def scale_mask_softmax_ref(scores, scale):
    T = scores.size(-1)
    future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)  # (T, T), True where j > i
    return torch.softmax((scores * scale).masked_fill(future, float("-inf")), dim=-1)


_CUDA_SOFTMAX = r"""
// One block per row of the (rows, n_cols) view; row r is query i = r % n_cols against keys
// 0..n_cols-1, and keys j > i are masked. Masked scores are never read (the causal softmax reads
// the lower triangle only, about half of the scores) and their probability is written as 0.
//   pass 1: m = max over j <= i of v_j = scale * x_j
//   pass 2: s = sum of exp(v_j - m)
//   pass 3: y_j = exp(v_j - m) / s for j <= i, 0 for j > i
// If the row fits in shared memory (n_cols * 4 <= 32 KiB, n_cols <= 8192) pass 1 caches v and
// pass 2 caches exp(v - m) there, so global memory is read once; longer rows re-read it. Each
// thread only touches the cache slots of its own chunks, so the passes need no extra barrier.
template <typename T, int VEC>
__global__ void softmax_fwd_kernel(const T* x, T* y, int64_t n_cols, float scale, bool cache) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x;
  const int64_t len = r % n_cols + 1;  // unmasked keys: 0 .. i
  const T* xr = x + r * n_cols;
  T* yr = y + r * n_cols;
  const int64_t step = (int64_t)blockDim.x * VEC;
  // v = scale * x[j .. j+VEC), -inf past the mask (j + VEC <= n_cols: VEC divides n_cols or is 1)
  auto scores = [&](int64_t j, float (&v)[VEC]) {
    if (cache) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = row[j + k];
      return;
    }
    load(xr, j, len, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = j + k < len ? v[k] * scale : -INFINITY;
  };

  float m = -INFINITY;
  for (int64_t j = threadIdx.x * VEC; j < len; j += step) {
    float v[VEC];
    load(xr, j, len, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = j + k < len ? v[k] * scale : -INFINITY;
      m = fmaxf(m, v[k]);
      if (cache) row[j + k] = v[k];
    }
  }
  m = block_reduce<true>(m);

  float s = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < len; j += step) {
    float v[VEC];
    scores(j, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = __expf(v[k] - m);  // masked lanes: exp(-inf) = 0
      s += v[k];
      if (cache) row[j + k] = v[k];
    }
  }
  const float inv = 1.f / block_reduce<false>(s);

  for (int64_t j = threadIdx.x * VEC; j < n_cols; j += step) {
    float v[VEC];
    if (j < len) {
      scores(j, v);  // cached: exp(v - m) already
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = (cache ? v[k] : __expf(v[k] - m)) * inv;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = 0.f;
    }
    store(yr, j, n_cols, v);
  }
}

// grad_x_j = scale * y_j * (g_j - sum_k g_k y_k); y_j = 0 for j > i, so only j <= i is read.
template <typename T, int VEC>
__global__ void softmax_bwd_kernel(const T* grad, const T* y, T* grad_x, int64_t n_cols, float scale) {
  const int64_t r = blockIdx.x;
  const int64_t len = r % n_cols + 1;
  const T* gr = grad + r * n_cols;
  const T* yr = y + r * n_cols;
  T* dr = grad_x + r * n_cols;
  const int64_t step = (int64_t)blockDim.x * VEC;
  float dot = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < len; j += step) {
    float g[VEC], p[VEC];
    load(gr, j, len, g);
    load(yr, j, len, p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += g[k] * p[k];
  }
  dot = block_reduce<false>(dot);
  for (int64_t j = threadIdx.x * VEC; j < n_cols; j += step) {
    float g[VEC], p[VEC];
    load(gr, j, len, g);  // lanes past len read 0
    load(yr, j, len, p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = scale * p[k] * (g[k] - dot);
    store(dr, j, n_cols, g);
  }
}

extern "C" const char* softmax_fwd_launch(int dtype, const void* x, void* y, int64_t rows, int64_t n_cols, float scale,
                               int64_t stream) {
  if (rows == 0) return nullptr;
  const bool cache = n_cols * sizeof(float) <= 32 * 1024;  // under the 48 KiB default, 2 blocks/SM at 1024 threads
  DISPATCH_DTYPE(dtype,
    launch_rows<T>(n_cols, all_aligned(x, y), [&](auto V, int threads) {
      softmax_fwd_kernel<T, decltype(V)::value><<<(unsigned)rows, threads, cache ? n_cols * sizeof(float) : 0,
                                                  (cudaStream_t)stream>>>((const T*)x, (T*)y, n_cols, scale, cache);
    }));
  return launch_error();
}

extern "C" const char* softmax_bwd_launch(int dtype, const void* grad, const void* y, void* grad_x, int64_t rows,
                               int64_t n_cols, float scale, int64_t stream) {
  if (rows == 0) return nullptr;
  DISPATCH_DTYPE(dtype,
    launch_rows<T>(n_cols, all_aligned(grad, y, grad_x), [&](auto V, int threads) {
      softmax_bwd_kernel<T, decltype(V)::value><<<(unsigned)rows, threads, 0, (cudaStream_t)stream>>>(
          (const T*)grad, (const T*)y, (T*)grad_x, n_cols, scale);
    }));
  return launch_error();
}
"""

_CPP_SOFTMAX = r"""
extern "C" const char* softmax_fwd_launch(int, const void*, void*, int64_t, int64_t, float, int64_t);
extern "C" const char* softmax_bwd_launch(int, const void*, const void*, void*, int64_t, int64_t, float, int64_t);

static int check_scores(const at::Tensor& x) {
  const int dtype = check_x(x);
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(-1) == x.size(-2), "scores has shape ", x.sizes(),
                    "; expected (..., T, T)");
  TORCH_CHECK_VALUE(x.numel() / x.size(-1) < (1LL << 31), "scores has ", x.numel() / x.size(-1),
                    " rows; at most 2**31 - 1 fit in one launch");
  return dtype;
}

void softmax_fwd(const at::Tensor& x, const at::Tensor& out, double scale, int64_t stream) {
  const int dtype = check_scores(x);
  check_like(out, "out", x);
  const c10::DeviceGuard guard(x.device());
  raise_if(softmax_fwd_launch(dtype, x.data_ptr(), out.data_ptr(), x.numel() / x.size(-1), x.size(-1),
                              (float)scale, stream));
}

void softmax_bwd(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& grad_x, double scale,
                 int64_t stream) {
  const int dtype = check_scores(y);
  check_like(grad, "grad", y);
  check_like(grad_x, "grad_x", y);
  const c10::DeviceGuard guard(y.device());
  raise_if(softmax_bwd_launch(dtype, grad.data_ptr(), y.data_ptr(), grad_x.data_ptr(), y.numel() / y.size(-1),
                              y.size(-1), (float)scale, stream));
}
"""


class _ScaleMaskSoftmax(torch.autograd.Function):
    """Saves only the output probabilities (the ledger's "softmax output 2as²b")."""

    @staticmethod
    def forward(ctx, scores, scale):
        y = torch.empty_like(scores)
        _run("softmax_fwd", scores, y, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        grad_x = torch.empty_like(y)
        _run("softmax_bwd", grad.contiguous(), y, grad_x, ctx.scale)
        return grad_x, None


def scale_mask_softmax(scores, scale):
    """softmax(scores * scale + causal mask, dim=-1) for scores (..., T, T); entries j > i are 0."""
    return _ScaleMaskSoftmax.apply(scores, scale) if _use_kernels(scores) else scale_mask_softmax_ref(scores, scale)


# -----------------------------------------------------------------------------
# 5. LayerNorm over the last dim

def layer_norm_ref(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


_CUDA_LAYER_NORM = r"""
// One block per row of the (rows, n) view. Two-pass statistics (mean, then the mean squared
// deviation) avoid the cancellation of E[x^2] - E[x]^2; re-reading the row hits L1/L2.
// y = (x - mean) * rstd * w + b; mean and rstd (float32, one per row) are kept for backward.
template <typename T, int VEC>
__global__ void layer_norm_fwd_kernel(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd,
                                      int64_t n, float eps) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * n;
  T* yr = y + r * n;
  const int64_t step = (int64_t)blockDim.x * VEC;
  float s = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
    float v[VEC];
    load(xr, j, n, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += v[k];
  }
  const float mu = block_reduce<false>(s) / n;
  float q = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
    float v[VEC];
    load(xr, j, n, v, mu);  // lanes past n read mu: deviation 0
#pragma unroll
    for (int k = 0; k < VEC; ++k) q += (v[k] - mu) * (v[k] - mu);
  }
  const float rs = rsqrtf(block_reduce<false>(q) / n + eps);
  for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
    float v[VEC], wv[VEC], bv[VEC];
    load(xr, j, n, v);
    if (w) load(w, j, n, wv);
    if (b) load(b, j, n, bv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mu) * rs * (w ? wv[k] : 1.f) + (b ? bv[k] : 0.f);
    store(yr, j, n, v);
  }
  if (threadIdx.x == 0) { mean[r] = mu; rstd[r] = rs; }
}

// dx = rstd * (g w - mean(g w) - xhat * mean(g w xhat)),  xhat = (x - mean) * rstd.
// Block b handles rows b, b + gridDim.x, ...; thread t owns the same columns in every row, so it
// adds its rows' g * xhat and g into part_w[b] and part_b[b] (float32, touched by this thread
// only: no atomics); the caller sums the gridDim.x partial rows into dw and db.
template <typename T, int VEC>
__global__ void layer_norm_bwd_kernel(const T* grad, const T* x, const T* w, const float* mean, const float* rstd,
                                      T* grad_x, float* part_w, float* part_b, int64_t rows, int64_t n) {
  const int64_t step = (int64_t)blockDim.x * VEC;
  float* pw = part_w ? part_w + blockIdx.x * n : nullptr;
  float* pb = part_b ? part_b + blockIdx.x * n : nullptr;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // the same trip count for the whole block
    const T* gr = grad + r * n;
    const T* xr = x + r * n;
    const float mu = mean[r], rs = rstd[r];
    float a = 0.f, c = 0.f;
    for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
      float g[VEC], v[VEC], wv[VEC];
      load(gr, j, n, g);  // lanes past n: g = 0, no contribution
      load(xr, j, n, v);
      if (w) load(w, j, n, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float gw = g[k] * (w ? wv[k] : 1.f);
        a += gw;
        c += gw * (v[k] - mu) * rs;
      }
    }
    a = block_reduce<false>(a) / n;
    c = block_reduce<false>(c) / n;
    for (int64_t j = threadIdx.x * VEC; j < n; j += step) {
      float g[VEC], v[VEC], wv[VEC], d[VEC];
      load(gr, j, n, g);
      load(xr, j, n, v);
      if (w) load(w, j, n, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (v[k] - mu) * rs;
        d[k] = rs * (g[k] * (w ? wv[k] : 1.f) - a - xhat * c);
        if (j + k < n) {
          if (pw) pw[j + k] += g[k] * xhat;
          if (pb) pb[j + k] += g[k];
        }
      }
      store(grad_x + r * n, j, n, d);
    }
  }
}

extern "C" const char* layer_norm_fwd_launch(int dtype, const void* x, const void* w, const void* b, void* y, float* mean,
                                  float* rstd, int64_t rows, int64_t n, float eps, int64_t stream) {
  if (rows == 0) return nullptr;
  DISPATCH_DTYPE(dtype,
    launch_rows<T>(n, all_aligned(x, w, b, y), [&](auto V, int threads) {
      layer_norm_fwd_kernel<T, decltype(V)::value><<<(unsigned)rows, threads, 0, (cudaStream_t)stream>>>(
          (const T*)x, (const T*)w, (const T*)b, (T*)y, mean, rstd, n, eps);
    }));
  return launch_error();
}

extern "C" const char* layer_norm_bwd_launch(int dtype, const void* grad, const void* x, const void* w, const float* mean,
                                  const float* rstd, void* grad_x, float* part_w, float* part_b, int64_t rows,
                                  int64_t n, int64_t blocks, int64_t stream) {
  if (rows == 0) return nullptr;
  DISPATCH_DTYPE(dtype,
    launch_rows<T>(n, all_aligned(grad, x, w, grad_x), [&](auto V, int threads) {
      layer_norm_bwd_kernel<T, decltype(V)::value><<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
          (const T*)grad, (const T*)x, (const T*)w, mean, rstd, (T*)grad_x, part_w, part_b, rows, n);
    }));
  return launch_error();
}
"""

_CPP_LAYER_NORM = r"""
extern "C" const char* layer_norm_fwd_launch(int, const void*, const void*, const void*, void*, float*, float*, int64_t,
                                  int64_t, float, int64_t);
extern "C" const char* layer_norm_bwd_launch(int, const void*, const void*, const void*, const float*, const float*, void*,
                                  float*, float*, int64_t, int64_t, int64_t, int64_t);

void layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& mean,
                    const at::Tensor& rstd, double eps, int64_t stream) {
  const int dtype = check_x(x);
  if (weight) check_vector(*weight, "weight", x);
  if (bias) check_vector(*bias, "bias", x);
  check_like(out, "out", x);
  check_stats(mean, "mean", x);
  check_stats(rstd, "rstd", x);
  TORCH_CHECK_VALUE(x.numel() / x.size(-1) < (1LL << 31), "x has too many rows for one launch");
  const c10::DeviceGuard guard(x.device());
  raise_if(layer_norm_fwd_launch(dtype, x.data_ptr(), ptr(weight), ptr(bias), out.data_ptr(),
                                 mean.data_ptr<float>(), rstd.data_ptr<float>(), x.numel() / x.size(-1),
                                 x.size(-1), (float)eps, stream));
}

// part_w, part_b: float32 (blocks, N) zeros, or None when that gradient is not wanted.
void layer_norm_bwd(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                    const std::optional<at::Tensor>& part_w, const std::optional<at::Tensor>& part_b,
                    int64_t blocks, int64_t stream) {
  const int dtype = check_x(x);
  check_like(grad, "grad", x);
  if (weight) check_vector(*weight, "weight", x);
  check_stats(mean, "mean", x);
  check_stats(rstd, "rstd", x);
  check_like(grad_x, "grad_x", x);
  TORCH_CHECK_VALUE(blocks >= 1 && blocks < (1LL << 31), "blocks=", blocks, " must be in [1, 2**31)");
  for (const auto* p : {&part_w, &part_b}) {
    if (*p) {
      const at::Tensor& t = **p;
      TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device() && t.is_contiguous() &&
                        t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == blocks &&
                        t.size(1) == x.size(-1),
                        "partial sums must be float32 (", blocks, ", ", x.size(-1), ") on ", x.device(),
                        "; got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    }
  }
  const c10::DeviceGuard guard(x.device());
  raise_if(layer_norm_bwd_launch(dtype, grad.data_ptr(), x.data_ptr(), ptr(weight), mean.data_ptr<float>(),
                                 rstd.data_ptr<float>(), grad_x.data_ptr(),
                                 part_w ? part_w->data_ptr<float>() : nullptr,
                                 part_b ? part_b->data_ptr<float>() : nullptr,
                                 x.numel() / x.size(-1), x.size(-1), blocks, stream));
}
"""


class _LayerNorm(torch.autograd.Function):
    """Saves x (the ledger's "LayerNorm input 2sbh"), the weight, and per-row float32 mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = x.numel() // x.size(-1)
        y = torch.empty_like(x)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _run("layer_norm_fwd", x, weight, bias, y, mean, rstd, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, rows = x.size(-1), mean.numel()
        # a few blocks per SM, each looping over rows: few partial rows of dw, db to sum afterwards
        blocks = max(1, min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))

        def partial(wanted):
            return torch.zeros(blocks, n, dtype=torch.float32, device=x.device) if wanted else None

        part_w = partial(weight is not None and ctx.needs_input_grad[1])
        part_b = partial(ctx.has_bias and ctx.needs_input_grad[2])
        grad_x = torch.empty_like(x)
        _run("layer_norm_bwd", grad.contiguous(), x, weight, mean, rstd, grad_x, part_w, part_b, blocks)
        grad_w = None if part_w is None else part_w.sum(0).to(x.dtype)
        grad_b = None if part_b is None else part_b.sum(0).to(x.dtype)
        return grad_x, grad_w, grad_b, None


def layer_norm(x, weight, bias, eps=1e-5):
    """F.layer_norm(x, (N,), weight, bias, eps) for x (..., N); weight and bias may be None."""
    return _LayerNorm.apply(x, weight, bias, eps) if _use_kernels(x) else layer_norm_ref(x, weight, bias, eps)


# -----------------------------------------------------------------------------
# Benchmark: time, achieved bandwidth, and speed-up over eager and torch.compile

def _time_ms(fn, iters, warmup=5):
    """Median milliseconds of fn() over iters runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def benchmark(shape=(8, 2048, 4096), dtype=torch.bfloat16, iters=50):
    """Rows {op, shape, dtype, ms, GB/s, frac_copy, vs_eager, vs_compile, compile_note} (CUDA only).

    shape = (b, s, h) is one activation; the softmax runs on scores (b * h/128, s, s), one
    (s, s) matrix per 128-wide head. GB/s counts the minimal traffic of the op (each input read
    once, each output written once; the softmax reads the lower triangle); frac_copy divides it
    by the bandwidth of y.copy_(x) on a tensor of the op's size, timed the same way. "(backward)"
    rows time autograd.grad through the op, the graph built once beforehand.
    """
    if not available():
        raise RuntimeError("benchmark needs CUDA and the compiled kernels (see kernels.available())")
    b, s, h = shape
    dev, esize = torch.device("cuda"), torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen, device=dev, dtype=dtype)

    x, res, vec, vec2 = rand(b, s, h), rand(b, s, h), rand(h), rand(h)
    heads = max(1, h // 128)
    scores = rand(b * heads, s, s)
    tri = b * heads * s * (s + 1) // 2  # scores a causal softmax must read
    key, offset, p = 0x1234567, 0, 0.1
    n = x.numel()
    # (name, fused fn, reference fn, args, differentiable arg indices, forward bytes, backward bytes)
    cases = [
        ("bias_gelu", bias_gelu, bias_gelu_ref, (x, vec), (0, 1), 2 * n * esize, 3 * n * esize),
        ("bias_dropout_add", lambda a, c, r: bias_dropout_add(a, c, r, p, key, offset),
         lambda a, c, r: bias_dropout_add_ref(a, c, r, p, key, offset), (x, vec, res), (0, 1, 2),
         4 * n * esize, 2 * n * esize),
        ("dropout", lambda a: dropout(a, p, key, offset), lambda a: dropout_ref(a, p, key, offset), (x,), (0,),
         2 * n * esize, 2 * n * esize),
        ("scale_mask_softmax", lambda a: scale_mask_softmax(a, 0.125), lambda a: scale_mask_softmax_ref(a, 0.125),
         (scores,), (0,), (tri + scores.numel()) * esize, (2 * tri + scores.numel()) * esize),
        ("layer_norm", lambda a, w, c: layer_norm(a, w, c), lambda a, w, c: layer_norm_ref(a, w, c),
         (x, vec, vec2), (0, 1, 2), 2 * n * esize, 3 * n * esize),
    ]
    copy_ms = {}

    def copy_gbs(numel):  # device copy bandwidth at this size, measured once per size
        if numel not in copy_ms:
            src = torch.empty(numel, device=dev, dtype=dtype)
            dst = torch.empty_like(src)
            copy_ms[numel] = _time_ms(lambda: dst.copy_(src), iters)
        return 2 * numel * esize / copy_ms[numel] / 1e6

    rows = []
    for name, fused, ref, args, diff, fwd_bytes, bwd_bytes in cases:
        try:
            compiled, note = torch.compile(ref), None
            with torch.no_grad():
                compiled(*args)
        except Exception as e:  # report, keep benchmarking the rest
            compiled, note = None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        for phase, nbytes in (("", fwd_bytes), (" (backward)", bwd_bytes)):
            timers = {}
            for label, fn in (("fused", fused), ("eager", ref), ("compile", compiled)):
                if fn is None:
                    continue
                if not phase:
                    def run(fn=fn):
                        with torch.no_grad():
                            fn(*args)
                else:
                    leaves = [a.detach().requires_grad_(i in diff) for i, a in enumerate(args)]
                    out = fn(*leaves)
                    grad, inputs = torch.randn_like(out), [leaves[i] for i in diff]

                    def run(out=out, grad=grad, inputs=inputs):
                        torch.autograd.grad(out, inputs, grad, retain_graph=True)
                try:
                    timers[label] = _time_ms(run, iters)
                except Exception as e:
                    if label != "compile":
                        raise
                    note = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            ms = timers["fused"]
            size = args[0].numel()
            gbs = nbytes / ms / 1e6
            rows.append(dict(op=name + phase, shape=tuple(args[0].shape), dtype=str(dtype).removeprefix("torch."),
                             ms=ms, GBps=gbs, frac_copy=gbs / copy_gbs(size),
                             vs_eager=timers["eager"] / ms,
                             vs_compile=timers["compile"] / ms if "compile" in timers else None,
                             compile_note=note))
    return rows
