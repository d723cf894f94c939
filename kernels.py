"""kernels: fused CUDA versions of nanosp's bias_gelu, dropout, bias_dropout_add and causal_softmax,
with their signatures, on CUDA tensors of float32, bfloat16 or float16.

Each op does a few flops per element, so its time is the bytes it moves: eager PyTorch writes every
intermediate to memory and reads it back; a kernel here reads each input once, computes in float32
registers and writes each output once. No dropout mask is stored: a hash of (key, element index),
nanosp's bits exactly, recomputes it in backward. The CUDA source compiles once, on the first
available() (load_inline); importing this file compiles nothing. NANOSP_KERNELS=0 turns them off.
"""
import functools
import os
import re
import warnings

import torch


# ----------------------------------------------------------------------------------------------
# 0. what every kernel shares: elements in 16-byte chunks; a launcher called from Python by name

_CUDA_CHUNKS = r"""
// Memory holds T, registers float: float(v) and T(f), which rounds to nearest even as PyTorch does.
// torch's nvcc flags hide these conversions; this file includes nothing of torch's and takes them back.
#undef __CUDA_NO_HALF_CONVERSIONS__
#undef __CUDA_NO_BFLOAT16_CONVERSIONS__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <initializer_list>

using ptr = int64_t;  // how launchers take a pointer or a stream; 0 for an absent tensor (its length 0)

// T = the element type of a dtype code (kernels.DTYPES) in the statement that follows.
#define WITH_T(dtype, ...)                                            \
  if (dtype == 0) { using T = float; __VA_ARGS__; }                   \
  else if (dtype == 1) { using T = __nv_bfloat16; __VA_ARGS__; }      \
  else { using T = __half; __VA_ARGS__; }

// A chunk is the V = 16 / sizeof(T) elements p[i .. i+V): one 16-byte load or store when `vec` (p
// and i aligned) and it ends by n; else element by element, skipping those at or past n (load 0).
template <typename T, int V = 16 / sizeof(T)>
__device__ inline void load_chunk(const T* p, int64_t i, int64_t n, bool vec, float* f) {
  if (vec && i + V <= n) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + i);  // V elements of T
    for (int k = 0; k < V; ++k) f[k] = float(reinterpret_cast<const T*>(&raw)[k]);
  } else {
    for (int k = 0; k < V; ++k) f[k] = i + k < n ? float(p[i + k]) : 0.f;
  }
}

template <typename T, int V = 16 / sizeof(T)>
__device__ inline void store_chunk(T* p, int64_t i, int64_t n, bool vec, const float* f) {
  if (vec && i + V <= n) {
    uint4 raw;
    for (int k = 0; k < V; ++k) reinterpret_cast<T*>(&raw)[k] = T(f[k]);
    *reinterpret_cast<uint4*>(p + i) = raw;
  } else {
    for (int k = 0; k < V; ++k) if (i + k < n) p[i + k] = T(f[k]);
  }
}

// f[k] += bias[(i + k) % n_bias], the bias broadcast along rows of n_bias (no-op if bias is null).
template <typename T, int V = 16 / sizeof(T)>
__device__ inline void add_bias(const T* bias, int64_t n_bias, int64_t i, bool vec, float* f) {
  if (bias == nullptr) return;
  float b[V];
  int64_t j = i % n_bias;
  if (vec) load_chunk(bias, j, n_bias, true, b);  // vec: n_bias % V == 0, the chunk does not wrap
  else for (int k = 0; k < V; ++k, j = j + 1 == n_bias ? 0 : j + 1) b[k] = float(bias[j]);
  for (int k = 0; k < V; ++k) f[k] += b[k];
}

// Can chunks be 16-byte accesses? When every pointer (0: absent) is 16-byte aligned and the row
// length (of the bias, of a softmax row; 0: none) is a multiple of V, so that rows start aligned.
static bool vectorized(int64_t row, size_t size, std::initializer_list<ptr> ptrs) {
  for (ptr p : ptrs) if (p % 16) return false;
  return row % (16 / size) == 0;
}
static int64_t chunks(int64_t n, size_t size) { return (n + 16 / size - 1) / (16 / size); }
static dim3 grid(int64_t threads, int block) { return dim3((unsigned)((threads + block - 1) / block)); }
static const char* launch_error() {  // what each launcher returns: its CUDA error, or null
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
"""

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the launchers' dtype codes

def _launch(launcher, **args):
    """launcher(**args) by the names in its C signature, on the dtype, device and current stream of
    args' first tensor (nothing is launched if it is empty); tensors go as data pointers, None as 0."""
    first = next(a for a in args.values() if isinstance(a, torch.Tensor))
    if first.numel() == 0:
        return
    args = {name: a.data_ptr() if isinstance(a, torch.Tensor) else 0 if a is None else a for name, a in args.items()}
    with torch.cuda.device(first.device):
        stream = torch.cuda.current_stream().cuda_stream
        error = getattr(_build(), launcher)(dtype=DTYPES[first.dtype], **args, stream=stream)
    if error is not None:
        raise RuntimeError(f"{launcher}: CUDA error: {error}")

def _checked(name, t, like=None, shape=None):
    """t made contiguous, once it is known to be a CUDA tensor of a kernel dtype (like's dtype and
    device, if given) and of `shape`; otherwise a ValueError naming it."""
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        got = f"a tensor on {t.device}" if isinstance(t, torch.Tensor) else repr(type(t).__name__)
        raise ValueError(f"{name} must be a CUDA tensor (the kernels run on CUDA only), got {got}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the kernels take float32, bfloat16 or float16")
    if like is not None and (t.dtype, t.device) != (like.dtype, like.device):
        raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {like.dtype} on {like.device}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    return t.contiguous()

def _bias_grad(ctx, grad_x):
    """The gradient of the bias (argument 1) broadcast along rows: grad_x summed over them."""
    return grad_x.view(-1, ctx.n_bias).sum(0) if ctx.n_bias and ctx.needs_input_grad[1] else None


# ----------------------------------------------------------------------------------------------
# 1. bias-GeLU: equals nanosp.bias_gelu, gelu_tanh(x + bias)

_CUDA_BIAS_GELU = r"""
// gelu(y) = 0.5 y (1 + tanh(u)) = y s,  s = sigmoid(2u),  u = sqrt(2/pi) (y + 0.044715 y^3):
// GPT-2's tanh GeLU, written with 1 + tanh(u) = 2 sigmoid(2u) to keep precision where it nears 0.
__device__ inline float gelu_s(float y) {
  return 1.f / (1.f + expf(-1.5957691216057308f * (y + 0.044715f * y * y * y)));  // 2 sqrt(2/pi)
}
// gelu'(y) = s + 2 y s (1 - s) du/dy,  du/dy = sqrt(2/pi) (1 + 3 * 0.044715 y^2)
__device__ inline float gelu_grad(float y) {
  const float s = gelu_s(y);
  return s + 2.f * y * s * (1.f - s) * 0.7978845608028654f * (1.f + 0.134145f * y * y);
}

// Thread t owns one chunk: the V = 16 / sizeof(T) elements [V t, V t + V) of the flat tensor.
// y = gelu(x + bias): eager PyTorch writes x + bias and reads it back, 4 tensor passes; here 2.
template <typename T, int V = 16 / sizeof(T)>
__global__ void bias_gelu_forward_kernel(const T* x, const T* bias, T* y, int64_t n, int64_t n_bias, bool vec) {
  const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= n) return;
  float v[V];
  load_chunk(x, i, n, vec, v);
  add_bias(bias, n_bias, i, vec, v);
  for (int k = 0; k < V; ++k) v[k] *= gelu_s(v[k]);
  store_chunk(y, i, n, vec, v);
}

// grad_x = grad_y * gelu'(x + bias), with x + bias recomputed from the saved x and bias.
template <typename T, int V = 16 / sizeof(T)>
__global__ void bias_gelu_backward_kernel(const T* grad_y, const T* x, const T* bias, T* grad_x, int64_t n,
                                          int64_t n_bias, bool vec) {
  const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= n) return;
  float v[V], g[V];
  load_chunk(x, i, n, vec, v);
  add_bias(bias, n_bias, i, vec, v);
  load_chunk(grad_y, i, n, vec, g);
  for (int k = 0; k < V; ++k) g[k] *= gelu_grad(v[k]);
  store_chunk(grad_x, i, n, vec, g);
}

extern "C" const char* bias_gelu_forward(int dtype, ptr x, ptr bias, ptr y, int64_t n, int64_t n_bias, ptr stream) {
  WITH_T(dtype, bias_gelu_forward_kernel<<<grid(chunks(n, sizeof(T)), 256), 256, 0, (cudaStream_t)stream>>>(
      (const T*)x, (const T*)bias, (T*)y, n, n_bias, vectorized(n_bias, sizeof(T), {x, bias, y})));
  return launch_error();
}
extern "C" const char* bias_gelu_backward(int dtype, ptr grad_y, ptr x, ptr bias, ptr grad_x, int64_t n,
                                          int64_t n_bias, ptr stream) {
  WITH_T(dtype, bias_gelu_backward_kernel<<<grid(chunks(n, sizeof(T)), 256), 256, 0, (cudaStream_t)stream>>>(
      (const T*)grad_y, (const T*)x, (const T*)bias, (T*)grad_x, n, n_bias,
      vectorized(n_bias, sizeof(T), {grad_y, x, bias, grad_x})));
  return launch_error();
}
"""

class BiasGelu(torch.autograd.Function):
    """gelu_tanh(x + bias). Saves x and the bias, not x + bias (the same bytes as nanosp's GeLU input)."""

    @staticmethod
    def forward(ctx, x, bias):
        y = torch.empty_like(x)
        ctx.n_bias = 0 if bias is None else bias.numel()
        _launch("bias_gelu_forward", x=x, bias=bias, y=y, n=x.numel(), n_bias=ctx.n_bias)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        _launch("bias_gelu_backward", grad_y=grad_y.contiguous(), x=x, bias=bias, grad_x=grad_x, n=x.numel(),
                n_bias=ctx.n_bias)
        return grad_x, _bias_grad(ctx, grad_x)

def bias_gelu(x, bias):
    """gelu_tanh(x + bias); bias (x.shape[-1],) may be None."""
    x = _checked("x", x)
    bias = None if bias is None else _checked("bias", bias, like=x, shape=x.shape[-1:])
    return BiasGelu.apply(x, bias)


# ----------------------------------------------------------------------------------------------
# 2. dropout: equals nanosp.dropout, and bias_dropout_add equals nanosp.bias_dropout_add
#
# The mask, bit for bit nanosp.dropout_keep_mask: one 32-bit hash per pair j = i / 2 of a site's global
# tensor, 16 bits per element, kept when >= dropout_threshold(p) (nanosp reads it here); the tests compile it.

def dropout_threshold(p):
    """p rounded to a multiple of 2^-16, times 2^16: an element is kept when its 16 hash bits are >= it."""
    return min(round(p * 2**16), 2**16 - 1)

def dropout_scale(p):
    """1 / (1 - p) for p so rounded: an element is kept with probability exactly 1 - threshold / 2^16."""
    return 2**16 / (2**16 - dropout_threshold(p))

_CUDA_HASH = r"""
__host__ __device__ inline bool dropout_keep(uint64_t key, uint64_t i, uint32_t threshold) {
  const uint64_t j = i >> 1;
  const uint32_t k = (uint32_t)(key >> 32) + (uint32_t)(j >> 32) * 0x9E3779B9u;
  uint32_t h = (uint32_t)j ^ (uint32_t)key;  // nanosp.mix32(h, k), uint32 products wrap
  h ^= h >> 16, h *= 0x7FEB352Du, h ^= k ^ (h >> 15), h *= 0x2C1B3C6Du, h ^= h >> 16;
  return ((h >> (16 * (i & 1))) & 0xFFFFu) >= threshold;  // element 2j: the low 16 bits; 2j + 1: the high
}
"""

_CUDA_DROPOUT = r"""
// out = [residual +] keep * (x [+ bias]) * scale, element i at global index offset + i. With bias
// and residual, bias_dropout_add (eager: 3 kernels and a stored byte mask; 4 passes here); without,
// dropout, and applied to the incoming gradient, the backward of both. threshold 0 skips the hash.
template <typename T, int V = 16 / sizeof(T)>
__global__ void bias_dropout_add_kernel(const T* x, const T* bias, const T* residual, T* out, int64_t n,
                                        int64_t n_bias, uint64_t key, uint64_t offset, uint32_t threshold,
                                        float scale, bool vec) {
  const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= n) return;
  float v[V], r[V];
  load_chunk(x, i, n, vec, v);
  add_bias(bias, n_bias, i, vec, v);
  if (threshold)
    for (int k = 0; k < V; ++k) v[k] = dropout_keep(key, offset + i + k, threshold) ? v[k] * scale : 0.f;
  if (residual) {
    load_chunk(residual, i, n, vec, r);
    for (int k = 0; k < V; ++k) v[k] += r[k];
  }
  store_chunk(out, i, n, vec, v);
}

extern "C" const char* bias_dropout_add(int dtype, ptr x, ptr bias, ptr residual, ptr out, int64_t n,
                                        int64_t n_bias, uint64_t key, uint64_t offset, uint32_t threshold,
                                        float scale, ptr stream) {
  WITH_T(dtype, bias_dropout_add_kernel<<<grid(chunks(n, sizeof(T)), 256), 256, 0, (cudaStream_t)stream>>>(
      (const T*)x, (const T*)bias, (const T*)residual, (T*)out, n, n_bias, key, offset, threshold, scale,
      vectorized(n_bias, sizeof(T), {x, bias, residual, out})));
  return launch_error();
}
"""

def _check_dropout(p, key, offset, numel):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1)")
    if not isinstance(key, int) or not 0 <= key < 2**64:
        raise ValueError(f"dropout key={key!r} must be an int in [0, 2**64)")
    if not isinstance(offset, int) or not 0 <= offset <= 2**63 - 1 - numel:
        raise ValueError(f"dropout offset={offset!r} must be an int in [0, 2**63 - 1 - {numel}]")

class BiasDropoutAdd(torch.autograd.Function):
    """[residual +] dropout(x [+ bias]). Saves nothing: backward hashes the mask again."""

    @staticmethod
    def forward(ctx, x, bias, residual, p, key, offset):
        _check_dropout(p, key, offset, x.numel())
        ctx.mask = mask = dict(key=key, offset=offset, threshold=dropout_threshold(p), scale=dropout_scale(p))
        ctx.n_bias = 0 if bias is None else bias.numel()
        out = torch.empty_like(x)
        _launch("bias_dropout_add", x=x, bias=bias, residual=residual, out=out, n=x.numel(), n_bias=ctx.n_bias, **mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        grad_x = torch.empty_like(grad)  # dropout of grad with the same mask: keep * scale * grad
        _launch("bias_dropout_add", x=grad, bias=None, residual=None, out=grad_x, n=grad.numel(), n_bias=0, **ctx.mask)
        grad_residual = grad if ctx.needs_input_grad[2] else None
        return grad_x, _bias_grad(ctx, grad_x), grad_residual, None, None, None

def dropout(x, p, key, offset):
    """x * keep / (1 - p), keep = the hashed mask of (key, offset + element index); x if no dropout."""
    if key is None or p == 0.0:
        return x
    return BiasDropoutAdd.apply(_checked("x", x), None, None, p, key, offset)

def bias_dropout_add(x, bias, residual, p, key, offset):
    """residual + dropout(x + bias); bias (x.shape[-1],) may be None; residual has x's shape."""
    x = _checked("x", x)
    bias = None if bias is None else _checked("bias", bias, like=x, shape=x.shape[-1:])
    residual = _checked("residual", residual, like=x, shape=x.shape)
    if key is None or p == 0.0:
        p, key, offset = 0.0, 0, 0  # threshold 0: every element kept, scale 1
    return BiasDropoutAdd.apply(x, bias, residual, p, key, offset)


# ----------------------------------------------------------------------------------------------
# 3. causal softmax: equals nanosp.causal_softmax, softmax(scores * scale + causal mask)

_CUDA_SOFTMAX = r"""
// One warp per row of the (rows, cols) view of scores (N, T, T): row r is query i = r % T, and only
// its keys j <= i are read. Pass 1 keeps, per lane, the running max m of v = scale * x and the sum s
// of exp(v - m), rescaled when m grows (the online softmax, Milakov & Gimelshein 2018); the warp
// merges its 32 (m, s) pairs with shuffles. Pass 2 reads the row again (from cache) and writes
// y = exp(v - m) / s, and y = 0 for j > i. DRAM traffic: the lower triangle read, all of y written.
template <typename T, int V = 16 / sizeof(T)>
__global__ void causal_softmax_forward_kernel(const T* x, T* y, int64_t rows, int64_t cols, float scale, bool vec) {
  const int lane = threadIdx.x % 32;
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (r >= rows) return;  // the whole warp returns: its lanes share r
  const int64_t len = r % cols + 1, row = r * cols;  // row r holds keys 0 .. i = r % T at x + row
  float m = -INFINITY, s = 0.f;
  for (int64_t j = lane * V; j < len; j += 32 * V) {
    float v[V], chunk_max = -INFINITY;
    load_chunk(x + row, j, len, vec, v);
    for (int k = 0; k < V; ++k) {
      v[k] = j + k < len ? v[k] * scale : -INFINITY;
      chunk_max = fmaxf(chunk_max, v[k]);
    }
    if (chunk_max == -INFINITY) continue;  // nothing to add (and exp(-inf - -inf) would be NaN)
    const float m_new = fmaxf(m, chunk_max);
    s *= __expf(m - m_new);  // __expf: its argument is <= 0, where it is accurate to ~1e-6
    for (int k = 0; k < V; ++k) s += __expf(v[k] - m_new);
    m = m_new;
  }
  for (int o = 16; o > 0; o /= 2) {  // butterfly: every lane ends with the row's (m, s)
    const float m_o = __shfl_xor_sync(0xffffffffu, m, o), s_o = __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, m_o);
    s = m_new == -INFINITY ? 0.f : s * __expf(m - m_new) + s_o * __expf(m_o - m_new);
    m = m_new;
  }
  const float inv_s = 1.f / s;
  for (int64_t j = lane * V; j < cols; j += 32 * V) {
    float v[V];
    load_chunk(x + row, j, len, vec, v);  // reads nothing at or past len
    for (int k = 0; k < V; ++k) v[k] = j + k < len ? __expf(v[k] * scale - m) * inv_s : 0.f;
    store_chunk(y + row, j, cols, vec, v);
  }
}

// grad_x_j = scale * y_j * (grad_y_j - sum_k grad_y_k y_k) for j <= i, 0 for j > i (where y_j = 0).
template <typename T, int V = 16 / sizeof(T)>
__global__ void causal_softmax_backward_kernel(const T* grad_y, const T* y, T* grad_x, int64_t rows, int64_t cols,
                                               float scale, bool vec) {
  const int lane = threadIdx.x % 32;
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (r >= rows) return;
  const int64_t len = r % cols + 1, row = r * cols;
  float dot = 0.f;
  for (int64_t j = lane * V; j < len; j += 32 * V) {
    float g[V], p[V];
    load_chunk(grad_y + row, j, len, vec, g);  // elements past len read 0
    load_chunk(y + row, j, len, vec, p);
    for (int k = 0; k < V; ++k) dot += g[k] * p[k];
  }
  for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  for (int64_t j = lane * V; j < cols; j += 32 * V) {
    float g[V], p[V];
    load_chunk(grad_y + row, j, len, vec, g);
    load_chunk(y + row, j, len, vec, p);
    for (int k = 0; k < V; ++k) g[k] = j + k < len ? scale * p[k] * (g[k] - dot) : 0.f;
    store_chunk(grad_x + row, j, cols, vec, g);
  }
}

// 4 rows (warps) per block of 128 threads; 16-byte chunks only if every row starts aligned too.
extern "C" const char* causal_softmax_forward(int dtype, ptr x, ptr y, int64_t rows, int64_t cols, float scale,
                                              ptr stream) {
  WITH_T(dtype, causal_softmax_forward_kernel<<<grid(rows * 32, 128), 128, 0, (cudaStream_t)stream>>>(
      (const T*)x, (T*)y, rows, cols, scale, vectorized(cols, sizeof(T), {x, y})));
  return launch_error();
}
extern "C" const char* causal_softmax_backward(int dtype, ptr grad_y, ptr y, ptr grad_x, int64_t rows, int64_t cols,
                                               float scale, ptr stream) {
  WITH_T(dtype, causal_softmax_backward_kernel<<<grid(rows * 32, 128), 128, 0, (cudaStream_t)stream>>>(
      (const T*)grad_y, (const T*)y, (T*)grad_x, rows, cols, scale, vectorized(cols, sizeof(T), {grad_y, y, grad_x})));
  return launch_error();
}
"""

class CausalSoftmax(torch.autograd.Function):
    """Saves only its output y (nanosp's "softmax output 2as^2b"); backward needs nothing else."""

    @staticmethod
    def forward(ctx, scores, scale):
        y, T, ctx.scale = torch.empty_like(scores), max(scores.shape[-1], 1), scale
        _launch("causal_softmax_forward", x=scores, y=y, rows=scores.numel() // T, cols=T, scale=scale)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        grad_x, T = torch.empty_like(y), max(y.shape[-1], 1)
        _launch("causal_softmax_backward", grad_y=grad_y.contiguous(), y=y, grad_x=grad_x, rows=y.numel() // T,
                cols=T, scale=ctx.scale)
        return grad_x, None

def causal_softmax(scores, scale):
    """softmax(scores * scale + causal mask) over the last dim, scores (..., T, T); keys j > i get 0."""
    scores = _checked("scores", scores)
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected (..., T, T)")
    return CausalSoftmax.apply(scores, float(scale))


# ----------------------------------------------------------------------------------------------
# 4. the one lazy build

CUDA_FLAGS = ["-O3"]  # not --use_fast_math: it turns tanhf and expf into approximations

def _sources():
    """(C++, CUDA) sources: the kernels with their launchers, and bindings of the launchers that
    Python calls by the parameters' names in their C signatures."""
    cuda = _CUDA_CHUNKS + _CUDA_HASH + _CUDA_BIAS_GELU + _CUDA_DROPOUT + _CUDA_SOFTMAX
    launchers = re.findall(r'^extern "C" (const char\* (\w+)\(([^)]*)\))', cuda, flags=re.M)
    cpp = "#include <pybind11/pybind11.h>\n#include <stdint.h>\nusing ptr = int64_t;\n"
    cpp += "".join(f'extern "C" {signature};\n' for signature, _, _ in launchers)
    cpp += "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
    for _, name, params in launchers:  # each argument bound by its name: pybind11::arg("dtype"), ...
        names = "".join(f', pybind11::arg("{param.split()[-1]}")' for param in params.split(","))
        cpp += f'  m.def("{name}", &{name}{names});\n'
    return cpp + "}\n", cuda

def available():
    """True when the kernels can run: CUDA is present, NANOSP_KERNELS is not "0", and the extension
    built (the first call builds it, about a minute; later processes hit the build cache)."""
    return os.environ.get("NANOSP_KERNELS", "1") != "0" and torch.cuda.is_available() and _build() is not None

@functools.cache
def _build():
    """The compiled extension, or None after one warning that says why it did not build."""
    from torch.utils.cpp_extension import load_inline

    cpp, cuda = _sources()
    try:
        return load_inline(name="nanosp_kernels", cpp_sources=[cpp], cuda_sources=[cuda],
                           extra_cuda_cflags=CUDA_FLAGS, no_implicit_headers=True)
    except Exception as e:  # no toolkit, no compiler, a compile error: fall back, and say why
        lines = str(e).strip().splitlines() or [""]
        reason = next((line for line in lines if re.search(r"\berror:", line, re.I)), lines[0])  # a compiler's
        warnings.warn(f"nanosp kernels unavailable, nanosp keeps its PyTorch definitions: "
                      f"{type(e).__name__}: {reason.strip()}", RuntimeWarning, stacklevel=3)
        return None
