"""kernels.py against nanosp's definitions of the same ops.

On CPU (CI has nvcc and no GPU), after one build (half a minute, the parts compiled in parallel):
- importing kernels compiles nothing; NANOSP_KERNELS=0 and a failed build (one warning) turn it off;
- the extension's C++ and CUDA sources compile (g++; nvcc for sm_90), link and import;
- the dropout hash, kernels' own CUDA text compiled by nvcc for the host, gives nanosp's masks bit
  for bit, offsets past 2**32 included;
- the kernels themselves run on the host under a small emulator of the CUDA built-ins they use
  (each warp's 32 lanes as coroutines that meet at every shuffle, which every lane must reach),
  through kernels' own autograd Functions and public functions: every op against nanosp's
  definition, forward and backward, at odd sizes and unaligned storage, into poisoned outputs; and
  the model through them equals the model through nanosp's definitions.
On a GPU the same op and model tests run on CUDA.

Tolerances: a kernel in dtype against nanosp's definition in float64 on the same (rounded) inputs,
|got - want| <= eps |want| + eps max|want|. eps = 2**-8 for bfloat16 (the kernel rounds once, at
the store, by at most 2**-9), 2**-10 for float16 (2**-11), 1e-5 for float32 (a few float32 ulps of
arithmetic and exp; the emulator's __expf is the host's expf). Gradients that sum over rows (bias) or a row (the softmax's dot product)
of rounded values widen the absolute term: stated at each. Exact: dropout masks, dropped elements
and masked probabilities (0).
"""
import contextlib
import ctypes
import importlib.machinery
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import nanosp

ROOT = Path(__file__).resolve().parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(got, want, eps, atol=None):
    """|got - want| <= eps |want| + atol elementwise, atol = eps max|want| unless given; want float64."""
    atol = eps * want.abs().max().item() if atol is None else atol
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=atol, equal_nan=False)


def rand(shape, dtype, gen, device, unaligned=False):
    """Normal values rounded to dtype; unaligned: a view one element into its storage, so that no
    pointer is 16-byte aligned and the kernels take their element-by-element path."""
    n = math.prod(shape)
    t = torch.randn(n + unaligned, generator=gen).to(device=device, dtype=dtype)
    return t[int(unaligned):].view(shape)


def grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> for the inputs that are not None."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)


def f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


# ----------------------------------------------------------------------------------------------
# CPU: laziness, the override, a failed build


def test_import_compiles_nothing_and_cpu_has_no_kernels():
    """Importing kernels, and nanosp, which imports it, builds nothing; on a CPU there are no kernels."""
    code = ("import sys, torch, nanosp, kernels; built = kernels._build.cache_info; assert built().currsize == 0; "
            "a = kernels.available(); assert built().currsize == 0 and built().misses == 0, 'built'; "
            "assert 'torch.utils.cpp_extension' not in sys.modules, 'imported the builder'; "
            "assert not torch.cuda.is_initialized(), 'initialized CUDA'; print(a)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_nanosp_kernels_0_turns_them_off(monkeypatch):
    """With CUDA and a built extension, available() is True, unless NANOSP_KERNELS=0 (no build then)."""
    built = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_build", lambda: built.append(1) or "extension")
    monkeypatch.setenv("NANOSP_KERNELS", "1")
    assert kernels.available() and built == [1]
    monkeypatch.setenv("NANOSP_KERNELS", "0")
    assert not kernels.available() and built == [1]


@pytest.mark.parametrize("error, reason", [
    (RuntimeError("Error building extension 'nanosp_kernels': [1/3] nvcc -c cuda.cu\nFAILED: cuda.cuda.o\n"
                  "cuda.cu(12): error: identifier \"gelu\" is undefined\n2 errors detected"),
     'RuntimeError: cuda.cu(12): error: identifier "gelu" is undefined'),
    (OSError("CUDA_HOME environment variable is not set.\nPlease set it to your CUDA install root."),
     "OSError: CUDA_HOME environment variable is not set."),
])
def test_failed_build_warns_once_in_one_line_and_falls_back(monkeypatch, error, reason):
    import torch.utils.cpp_extension

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("NANOSP_KERNELS", raising=False)
    kernels._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning) as record:
            assert not kernels.available()
        assert len(record) == 1 and str(record[0].message).endswith(reason)
        assert "\n" not in str(record[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, no second build
            assert not kernels.available()
    finally:
        kernels._build.cache_clear()


def test_inputs_off_cuda_are_refused_by_name():
    x = torch.zeros(2, 8)
    for call, name in [(lambda: kernels.bias_gelu(x, None), "x"), (lambda: kernels.causal_softmax(x, 1.0), "scores"),
                       (lambda: kernels.dropout(x, 0.1, 5, 0), "x"),
                       (lambda: kernels.bias_dropout_add(x, None, x, 0.1, 5, 0), "x")]:
        with pytest.raises(ValueError, match=f"^{name} must be a CUDA tensor"):
            call()
    assert kernels.dropout(x, 0.0, 5, 0) is x and kernels.dropout(x, 0.1, None, 0) is x  # as nanosp.dropout


# ----------------------------------------------------------------------------------------------
# CPU: the sources compile, link and import; the hash and the emulator are built beside them

EMULATOR = r"""
// The CUDA built-ins that kernels.py uses, on the host. One OS thread runs everything: blocks and
// warps one after another, a warp's 32 lanes as coroutines (ucontext) that run until they finish
// or reach a shuffle; a shuffle is a barrier that every lane of the warp must reach.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <ucontext.h>
#include <functional>

static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static int faults;  // launches a GPU would refuse; shuffles that not every lane of the warp reached

namespace emu {
ucontext_t scheduler, lanes[32];
char stacks[32][1 << 16];
bool done[32];
int current, arrived, exited, generation;
float slots[32];
const std::function<void()>* kernel;

void lane_main() {
  (*kernel)();
  done[current] = true;
  exited++;
  if (arrived) faults++;  // lanes wait at a shuffle that this one skipped
  if (arrived && arrived == 32 - exited) arrived = 0, generation++;
  swapcontext(&lanes[current], &scheduler);
}

void barrier() {  // returns once every lane that has not exited has called it
  const int lane = current, gen = generation;
  if (++arrived == 32 - exited) arrived = 0, generation++;
  while (generation == gen) swapcontext(&lanes[lane], &scheduler);
}
}  // namespace emu

inline float __expf(float x) { return expf(x); }

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu || emu::exited) faults++;
  const unsigned lane = threadIdx.x % 32;
  emu::slots[lane] = v;
  emu::barrier();
  const float w = emu::slots[lane ^ lane_mask];
  emu::barrier();
  return w;
}

void emulate_launch(dim3 grid, dim3 block, size_t shared, cudaStream_t, const std::function<void()>& kernel) {
  if (grid.x == 0 || grid.y * grid.z * block.y * block.z != 1 || block.x % 32 || block.x > 1024 || shared) {
    faults++;
    return;
  }
  gridDim = grid, blockDim = block, emu::kernel = &kernel;
  for (unsigned b = 0; b < grid.x; ++b) {
    for (unsigned w = 0; w < block.x / 32; ++w) {
      for (int l = 0; l < 32; ++l) {
        getcontext(&emu::lanes[l]);
        emu::lanes[l].uc_stack = {emu::stacks[l], 0, sizeof emu::stacks[l]};
        emu::lanes[l].uc_link = nullptr;
        makecontext(&emu::lanes[l], emu::lane_main, 0);
        emu::done[l] = false;
      }
      emu::arrived = emu::exited = 0;
      for (int running = 32; running;) {
        running = 0;
        for (int l = 0; l < 32; ++l) {
          if (emu::done[l]) continue;
          threadIdx = {32 * w + l, 0, 0}, blockIdx = {b, 0, 0}, emu::current = l;
          swapcontext(&emu::scheduler, &emu::lanes[l]);
          running += !emu::done[l];
        }
      }
    }
  }
}

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
extern "C" int emulator_faults() { const int f = faults; faults = 0; return f; }
"""

HASH_HOST = r"""
#include <stdint.h>
%s
extern "C" void keep_mask(uint8_t* out, int64_t n, uint64_t key, uint64_t offset, uint32_t threshold) {
  for (int64_t i = 0; i < n; ++i) out[i] = dropout_keep(key, offset + i, threshold);
}
"""


def emulated_source(cuda):
    """kernels' CUDA source with each `kernel<<<grid, block, shared, stream>>>(args)` turned into
    `emulate_launch(grid, block, shared, stream, [&] { kernel(args); })`."""
    out, pos = [], 0
    for m in re.finditer(r"(\w+)<<<(.*?)>>>\(", cuda, flags=re.S):
        if m.start() < pos:
            continue
        depth, end = 1, m.end()
        while depth:  # the matching parenthesis of the argument list
            depth += {"(": 1, ")": -1}.get(cuda[end], 0)
            end += 1
        out.append(f"{cuda[pos:m.start()]}emulate_launch({m[2]}, [&] {{ {m[1]}({cuda[m.end():end - 1]}); }})")
        pos = end
    out.append(cuda[pos:])
    assert len(out) == 6 and "<<<" not in "".join(out), f"expected the 5 launches of kernels.py, found {len(out) - 1}"
    return "".join(out)


def _run_all(cmds):
    """Run the commands in parallel; fail with the first compiler error, and on any nvcc warning."""
    cmds = [[str(arg) for arg in c] for c in cmds]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for c, p in zip(cmds, procs):
        out = p.communicate()[0]
        assert p.returncode == 0, f"{' '.join(c)}\n{out[-4000:]}"
        assert "warning" not in out.lower(), f"{' '.join(c)}\n{out[-4000:]}"


def _toolkit(nvcc, source):
    """The CUDA toolkit's root, as the real nvcc reports it (the one on PATH may be a wrapper)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", source], capture_output=True, text=True).stderr
    return next(line.split("=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line)


def _cudart_flags(top):
    """-L and rpath flags for libcudart."""
    for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if os.path.exists(os.path.join(top, lib, "libcudart.so")):
            return [f"-L{top}/{lib}", f"-Wl,-rpath,{top}/{lib}"]
    return []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Compile, in parallel: the extension as load_inline would (g++ for the C++ file, nvcc for the
    CUDA file with torch's nvcc flags, sm_90), the hash for the host (nvcc), and the kernels under
    the emulator (g++); link the extension. Paths and the loaded host libraries."""
    nvcc, gxx = shutil.which("nvcc"), shutil.which("g++")
    if nvcc is None or gxx is None:
        pytest.skip("needs nvcc and g++ on PATH")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    d = tmp_path_factory.mktemp("kernels_build")
    cpp, cuda = kernels._sources()
    (d / "main.cpp").write_text(cpp)
    (d / "cuda.cu").write_text(cuda)
    (d / "hash.cu").write_text(HASH_HOST % kernels._CUDA_HASH)
    (d / "emulated.cpp").write_text(EMULATOR + emulated_source(cuda))
    top = _toolkit(nvcc, d / "hash.cu")
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    t0 = time.time()
    _run_all([
        [gxx, "-c", d / "main.cpp", "-o", d / "main.o", *inc, "-DTORCH_EXTENSION_NAME=nanosp_kernels",
         "-std=c++20", "-fPIC", "-O0"],
        [nvcc, "-c", d / "cuda.cu", "-o", d / "cuda.o", "-gencode", "arch=compute_90,code=sm_90",
         *COMMON_NVCC_FLAGS, "-std=c++20", "--compiler-options", "-fPIC", *kernels.CUDA_FLAGS],
        [nvcc, "-shared", d / "hash.cu", "-o", d / "hash.so", "--compiler-options", "-fPIC"],
        [gxx, "-shared", d / "emulated.cpp", "-o", d / "emulated.so", f"-I{top}/include", "-std=c++20",
         "-fPIC", "-O1", "-Wall", "-Wno-unused-function"],
    ])
    ext = d / "nanosp_kernels.so"
    _run_all([[gxx, "-shared", d / "main.o", d / "cuda.o", "-o", ext, "-lcudart", *_cudart_flags(top)]])
    print(f"compiled and linked in {time.time() - t0:.0f} s")
    return SimpleNamespace(extension=ext, hash=ctypes.CDLL(str(d / "hash.so")),
                           emulator=ctypes.CDLL(str(d / "emulated.so")))


def launcher_signatures():
    """{name: {parameter: ctypes type}} of the launchers, from the C++ declarations load_inline binds."""
    types = {"int": ctypes.c_int, "ptr": ctypes.c_int64, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
             "uint32_t": ctypes.c_uint32, "float": ctypes.c_float}
    cpp = kernels._sources()[0]
    return {name: {arg.split()[1]: types[arg.split()[0]] for arg in args.split(",")}
            for name, args in re.findall(r'extern "C" const char\* (\w+)\(([^)]*)\);', cpp)}


def bind_by_name(fn, params):
    """The ctypes function fn called as pybind11 calls a launcher: every parameter by its name, no
    other; its error string, or None."""
    def call(**args):
        if set(args) != set(params):
            raise TypeError(f"{fn.__name__}() takes {sorted(params)}, got {sorted(args)}")
        error = fn(*(args[name] for name in params))
        return error and error.decode()
    fn.argtypes, fn.restype = list(params.values()), ctypes.c_char_p
    return call


def test_extension_compiles_links_and_binds_the_launchers(built):
    loader = importlib.machinery.ExtensionFileLoader("nanosp_kernels", str(built.extension))
    ext = importlib.util.module_from_spec(importlib.util.spec_from_loader("nanosp_kernels", loader))
    loader.exec_module(ext)
    signatures = launcher_signatures()
    assert set(signatures) == {"bias_gelu_forward", "bias_gelu_backward", "bias_dropout_add", "causal_softmax_forward",
                               "causal_softmax_backward"}
    for name, params in signatures.items():  # bound by the names of their C parameters, and only by them
        with pytest.raises(TypeError):
            getattr(ext, name)(**dict.fromkeys(params, 0), unknown=0)
        if not torch.cuda.is_available():  # with no device the CUDA runtime's error comes back as a string
            args = dict.fromkeys(params, 0) | ({"key": 2**64 - 1} if "key" in params else {})  # a key's whole range
            error = getattr(ext, name)(**args)
            assert isinstance(error, str) and error


HASH_SETTINGS = settings(deadline=None, max_examples=200)
offsets = (st.sampled_from([0, 2**32 - 1, 2**32 - 777, 2**32, 2**40 + 3, 2**62 - 5000])
           | st.integers(0, 2**34) | st.integers(0, 2**62))


@HASH_SETTINGS
@given(n=st.integers(1, 3000), key=st.integers(0, 2**64 - 1), offset=offsets,
       p=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1 - 2**-30]) | st.floats(0.0, 1.0, exclude_max=True))
def test_hash_on_the_host_is_nanosp_mask_bit_for_bit(built, n, key, offset, p):
    out = torch.full((n,), 7, dtype=torch.uint8)
    built.hash.keep_mask(ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(n), ctypes.c_uint64(key),
                         ctypes.c_uint64(offset), ctypes.c_uint32(kernels.dropout_threshold(p)))
    assert torch.equal(out, nanosp.dropout_keep_mask((n,), p, key, offset).to(torch.uint8))


# ----------------------------------------------------------------------------------------------
# the ops against nanosp's definitions: under the emulator on CPU, and on CUDA


@pytest.fixture
def emulated(built, monkeypatch):
    """kernels with its extension replaced by the emulated kernels. kernels' tensor checks are
    bypassed (they would refuse CPU tensors): its launches, autograd Functions and public functions
    run as on CUDA."""
    lib = built.emulator
    extension = SimpleNamespace(**{name: bind_by_name(getattr(lib, name), params)
                                   for name, params in launcher_signatures().items()})
    monkeypatch.setattr(kernels, "_build", lambda: extension)
    monkeypatch.setattr(kernels, "_checked", lambda name, t, like=None, shape=None: t.contiguous())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=0))
    lib.emulator_faults()
    yield "cpu"
    assert lib.emulator_faults() == 0, "a launch a GPU would refuse, or a shuffle not every lane reached"


@pytest.fixture(params=["emulator", pytest.param("cuda", marks=needs_cuda)])
def device(request, monkeypatch):
    """The device the kernels run on; every output they allocate starts as NaN (or -1), so an
    element they do not write shows."""
    empty_like = torch.empty_like

    def poisoned(t, *args, **kwargs):
        out = empty_like(t, *args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty_like", poisoned)
    return request.getfixturevalue("emulated") if request.param == "emulator" else "cuda"


SHAPES = [(1,), (7,), (3, 9), (2, 1023), (4097,), (2, 3, 64), (5, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(device, dtype, shape, with_bias):
    eps = EPS[dtype]
    for unaligned in (False, True):
        gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
        x, g = rand(shape, dtype, gen, device, unaligned), rand(shape, dtype, gen, device)
        b = 3 * rand(shape[-1:], dtype, gen, device, unaligned) if with_bias else None
        y, got = grads(kernels.bias_gelu, [x, b], g)
        want_y, want = grads(nanosp.bias_gelu, f64(x, b), g.double())
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, want_y, eps)
        assert_close(got[0], want[0], eps)
        if with_bias:  # summed over rows of grad_x, each rounded to dtype
            rows = x.numel() // shape[-1]
            assert_close(got[1], want[1], eps, atol=eps * rows**0.5 * want[0].abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0, 2**32 - 2000, 2**40 + 3])
def test_dropout_masks_are_nanosp_masks(device, dtype, shape, offset):
    """dropout of ones is keep / (1 - p): the mask bit for bit, the kept value exact; backward
    applies the same mask."""
    for p in (0.1, 0.5, 0.9):
        key = nanosp.dropout_key(seed=17, layer=2, site=int(10 * p))
        keep = nanosp.dropout_keep_mask(shape, p, key, offset, device=device)
        ones = torch.ones(shape, dtype=dtype, device=device)
        out, (grad,) = grads(lambda x: kernels.dropout(x, p, key, offset), [ones], 2 * ones)
        scale = 1 / (1 - round(p * 2**16) / 2**16)  # 1 / (1 - p) for p rounded to 2**-16
        scale = torch.tensor(scale, dtype=torch.float32).to(dtype).item()  # rounded as the kernel stores
        assert torch.equal(out != 0, keep) and torch.equal(out[keep], torch.full_like(out[keep], scale))
        assert torch.equal(grad != 0, keep)
        assert_close(grad, nanosp.dropout(2 * ones.double(), p, key, offset), EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("p, offset", [(0.1, 0), (0.5, 2**32 - 500), (0.0, 0), (None, 0)])
def test_bias_dropout_add(device, dtype, shape, with_bias, p, offset):
    """p=None: key None, no dropout (evaluation)."""
    eps = EPS[dtype]
    key = None if p is None else nanosp.dropout_key(seed=3, layer=1, site=nanosp.SITE_MLP_OUT)
    p = 0.1 if p is None else p
    for unaligned in (False, True):
        gen = torch.Generator().manual_seed(shape[-1])
        x, r, g = (rand(shape, dtype, gen, device, unaligned) for _ in range(3))
        b = rand(shape[-1:], dtype, gen, device) if with_bias else None
        fn = lambda x, b, r: kernels.bias_dropout_add(x, b, r, p, key, offset)  # noqa: E731
        ref = lambda x, b, r: nanosp.bias_dropout_add(x, b, r, p, key, offset)  # noqa: E731
        y, got = grads(fn, [x, b, r], g)
        want_y, want = grads(ref, f64(x, b, r), g.double())
        assert_close(y, want_y, eps)
        assert_close(got[0], want[0], eps)
        assert torch.equal(got[-1], g)  # the residual's gradient is the incoming one
        if with_bias:
            rows = x.numel() // shape[-1]
            assert_close(got[1], want[1], eps, atol=eps * rows**0.5 * want[0].abs().max().item())
        if key is not None and p > 0:  # dropped: exactly the residual
            dropped = ~nanosp.dropout_keep_mask(shape, p, key, offset, device=device)
            assert torch.equal(y[dropped], r[dropped]) and not got[0][dropped].any()


SOFTMAX_SIZES = [(3, 1), (2, 7), (2, 9), (1, 33), (1, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, T", SOFTMAX_SIZES + [pytest.param(*s, marks=needs_cuda) for s in
                                                   [(1, 1023), (2, 2048), (1, 4097)]])
def test_causal_softmax(device, dtype, N, T):
    if device == "cpu" and T > 200:
        pytest.skip("long rows only on CUDA (the emulator runs a warp in about a millisecond)")
    eps, scale = EPS[dtype], T**-0.5
    for unaligned in (False, True):
        gen = torch.Generator().manual_seed(T)
        s, g = 4 * rand((N, T, T), dtype, gen, device, unaligned), rand((N, T, T), dtype, gen, device)
        y, (got,) = grads(lambda s: kernels.causal_softmax(s, scale), [s], g)
        want_y, (want,) = grads(lambda s: nanosp.causal_softmax(s, scale), f64(s), g.double())
        assert not y.triu(1).any()  # masked: exactly 0
        assert_close(y, want_y, eps)
        # backward uses y rounded to dtype: by 2**-9 y in bfloat16, which moves g.y by 2**-9 max|g|
        assert_close(got, want, eps, atol=2 * eps * scale * g.abs().max().item())
        assert not got.triu(1).any()


# rows longer than one pass of a warp, 32 V elements (V = 16 / element size: 128 in float32, 256 in
# 16-bit), up to 4097 on CUDA; on the emulator (a warp in about a millisecond) a few passes of each.
# (NANOSP_LONG_ROW=4097 runs that on the emulator too: under a minute.)
LONG_ROWS = {dtype: int(os.environ.get("NANOSP_LONG_ROW", T))
             for dtype, T in ((torch.float32, 1100), (torch.bfloat16, 600), (torch.float16, 600))}


def lane_maxima_grow(v, V):
    """For the last row of v (T, T), how often a lane's chunk max is above its running max from
    its earlier passes, and how often not: (grows, holds), over every pass after the first."""
    row = v[-1].double()
    passes = -(-row.numel() // (32 * V))
    chunks = torch.cat([row, row.new_full((passes * 32 * V - row.numel(),), -math.inf)]).view(passes, 32, V)
    chunk_max = chunks.amax(-1)  # (passes, 32 lanes)
    running = chunk_max.cummax(0).values
    later = chunk_max[1:] > -math.inf  # a lane past the row's end has nothing to add
    grows = (chunk_max[1:] > running[:-1]) & later
    return grows.sum().item(), (~grows & later).sum().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax_rescales_its_running_max_across_warp_passes(device, dtype):
    """Scaled scores 4 N(0, 1) + 4 j / T: from pass to pass a lane's max grows (its running sum is
    rescaled by exp(m - m_new)) or holds, both many times (checked on the last row). Each
    probability within eps of nanosp's (atol: eps times the largest of its row, so that long rows
    of small probabilities are held as tightly as short ones), every row sums to 1 within eps, and
    the gradient as in test_causal_softmax."""
    T = LONG_ROWS[dtype] if device == "cpu" else 4097
    eps, scale = EPS[dtype], T**-0.5
    gen = torch.Generator().manual_seed(T)
    v = 4 * torch.randn(1, T, T, generator=gen) + 4 * torch.arange(T) / T  # scale * scores
    s, g = (v / scale).to(device, dtype), rand((1, T, T), dtype, gen, device)
    grows, holds = lane_maxima_grow(s[0].float() * scale, 16 // dtype.itemsize)
    assert min(grows, holds) >= 10, (grows, holds)
    y, (got,) = grads(lambda s: kernels.causal_softmax(s, scale), [s], g)
    want_y, (want,) = grads(lambda s: nanosp.causal_softmax(s, scale), f64(s), g.double())
    assert not y.triu(1).any() and not got.triu(1).any()
    err = (y.double() - want_y).abs() - eps * want_y - eps * want_y.amax(-1, keepdim=True)
    assert err.max() <= 0, f"row {err.amax(-1).argmax().item()} is off by more than eps"
    assert (y.double().sum(-1) - 1).abs().max() <= eps
    assert_close(got, want, eps, atol=2 * eps * scale * g.abs().max().item())


@pytest.mark.parametrize("recompute", nanosp.RECOMPUTE_MODES)
@pytest.mark.parametrize("sequence_parallel, bias", [(False, True), (True, True), (False, False)])
def test_model_through_kernels_equals_model_through_nanosp(device, monkeypatch, recompute, sequence_parallel, bias):
    """One unsharded model (a group of one rank), float32, dropout on, fused_kernels on and off:
    every op the model calls, with the arguments it passes, through the kernels."""
    if device == "cpu":  # nanosp picks kernels only for CUDA tensors: pick them here by the config
        monkeypatch.setattr(nanosp, "ops_for", lambda x, cfg: kernels if cfg.fused_kernels else nanosp.REFERENCE_OPS)
    results = []
    for fused in (False, True):
        cfg = nanosp.GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.1, bias=bias,
                               recompute=recompute, sequence_parallel=sequence_parallel, fused_kernels=fused)
        model = nanosp.GPT(cfg).to(device)
        idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
        _, loss = model(idx, idx)
        loss.backward()
        assert nanosp.ops_for(idx, cfg) is (kernels if fused else nanosp.REFERENCE_OPS)
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert abs(loss_on - loss_off) <= 1e-5 * abs(loss_off)
    for name, grad in grads_off.items():  # float32 ulps of each op, through two layers and back: 1e-4
        assert_close(grads_on[name], grad.double(), 1e-4)


# ----------------------------------------------------------------------------------------------
# CUDA only: the build, and bad inputs


@needs_cuda
def test_kernels_build_on_cuda():
    """Where there is a GPU, a failed build is a failure, not a quiet fallback."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.available()


@needs_cuda
def test_bad_inputs_are_refused_by_name():
    x, b = torch.randn(4, 8, device="cuda"), torch.randn(8, device="cuda")
    cases = [(lambda: kernels.bias_gelu(x.double(), None), "x has dtype torch.float64"),
             (lambda: kernels.bias_gelu(x, b[:7]), r"bias has shape \(7,\); expected \(8,\)"),
             (lambda: kernels.bias_gelu(x, b.half()), "bias is torch.float16"),
             (lambda: kernels.bias_dropout_add(x, b, x.cpu(), 0.1, 1, 0), "residual must be a CUDA tensor"),
             (lambda: kernels.bias_dropout_add(x, b, x[:2], 0.1, 1, 0), "residual has shape"),
             (lambda: kernels.causal_softmax(x, 1.0), r"scores has shape \(4, 8\); expected \(..., T, T\)"),
             (lambda: kernels.dropout(x, 1.0, 1, 0), "p=1.0"), (lambda: kernels.dropout(x, 0.1, -1, 0), "key=-1"),
             (lambda: kernels.dropout(x, 0.1, 2**64, 0), "key=18446744073709551616"),
             (lambda: kernels.dropout(x, 0.1, 1, -1), "offset=-1")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@needs_cuda
def test_non_contiguous_inputs_are_made_contiguous():
    gen = torch.Generator().manual_seed(0)
    x, r = rand((8, 6), torch.float32, gen, "cuda").t(), rand((8, 6), torch.float32, gen, "cuda").t()
    s = rand((2, 5, 5), torch.float32, gen, "cuda").transpose(1, 2)
    assert_close(kernels.bias_gelu(x, None), nanosp.bias_gelu(x.double(), None), EPS[torch.float32])
    assert_close(kernels.bias_dropout_add(x, None, r, 0.5, 7, 3),
                 nanosp.bias_dropout_add(x.double(), None, r.double(), 0.5, 7, 3), EPS[torch.float32])
    assert_close(kernels.causal_softmax(s, 0.3), nanosp.causal_softmax(s.double(), 0.3), EPS[torch.float32])
