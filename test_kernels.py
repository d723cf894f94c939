"""Tests for kernels.py.

On any machine: the references against plain formulas, the import stays lazy, and the CUDA and
C++ sources really compile (nvcc + g++, linked and imported: the C++ checks raise ValueError on
CPU tensors). The elementwise ops' CUDA code (chunking, tails, bias wrap, dropout hash) is also
compiled for the host (-DNANOSP_HOST_TEST) and run on CPU tensors against the references.
On a GPU: every kernel against its reference, outputs and gradients.

Tolerances (kernel in dtype vs reference in float32 on the same inputs): relative eps, absolute
eps * sqrt(reduction length) with eps = 1e-5 (float32), 1e-3 (float16), 8e-3 (bfloat16); the
kernels round once, to dtype, at the end. Exact: dropout masks (bit-identical to nanosp), the
masked probabilities (0), and the CPU path (it is the reference).
"""
import ctypes
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from nanosp import dropout_keep_mask, dropout_key

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # dtype codes of the CUDA launchers
ODD = [1, 7, 8, 9, 1023, 4097]
HOST = settings(deadline=None, max_examples=40)
GPU = settings(deadline=None, max_examples=15)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

sizes = st.sampled_from(ODD) | st.integers(1, 300)
leading = st.lists(st.integers(1, 4), max_size=2)
seeds = st.integers(0, 2**31 - 1)
offsets = st.sampled_from([0, 2**32 - 5, 2**40 + 3]) | st.integers(0, 2**34)
probs = st.sampled_from([0.0, 0.1, 0.5, 0.9])


def assert_close(actual, expected, reduce=1):
    eps = EPS[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=eps, atol=eps * max(1, reduce) ** 0.5)


def rand(shape, dtype, gen, device="cpu", unaligned=False):
    """Random normal values; unaligned: a contiguous view 1 element into its storage (no 16-byte loads)."""
    n = 1
    for s in shape:
        n *= s
    t = torch.randn(n + unaligned, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return t[int(unaligned):].view(shape)


# -----------------------------------------------------------------------------
# CPU: laziness, override, argument checks, the references


def test_import_is_lazy_and_cpu_is_unavailable():
    code = ("import sys, kernels; a = kernels.available(); "
            "assert kernels._ops.cache_info().currsize == 0, 'compiled at import'; "
            "assert 'torch.utils.cpp_extension' not in sys.modules; print(a)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_override_forces_references(monkeypatch):
    monkeypatch.setenv("NANOSP_KERNELS", "0")
    assert not kernels.available()


def test_cpu_path_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    x, r, b = rand((3, 5, 7), torch.float32, gen), rand((3, 5, 7), torch.float32, gen), rand((7,), torch.float32, gen)
    s = rand((2, 6, 6), torch.float32, gen)
    key = dropout_key(1, 2, 3)
    assert torch.equal(kernels.bias_gelu(x, b), kernels.bias_gelu_ref(x, b))
    assert torch.equal(kernels.dropout(x, 0.3, key, 5), kernels.dropout_ref(x, 0.3, key, 5))
    assert torch.equal(kernels.bias_dropout_add(x, b, r, 0.3, key, 5),
                       kernels.bias_dropout_add_ref(x, b, r, 0.3, key, 5))
    assert torch.equal(kernels.scale_mask_softmax(s, 0.5), kernels.scale_mask_softmax_ref(s, 0.5))
    assert torch.equal(kernels.layer_norm(x, b, b, 1e-5), F.layer_norm(x, (7,), b, b, 1e-5))
    assert kernels.dropout(x, 0.0, key, 5) is x


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'nanosp_kernels'\n(the compiler log)")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fail)
    kernels._ops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="RuntimeError: Error building extension 'nanosp_kernels'$"):
            assert kernels._ops() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is silent
            assert kernels._ops() is None
    finally:
        kernels._ops.cache_clear()


@pytest.mark.parametrize("p, key, offset, what", [
    (1.0, 0, 0, "p=1.0"), (-0.1, 0, 0, "p=-0.1"), (0.1, -1, 0, "key=-1"),
    (0.1, 2**32, 0, "key=4294967296"), (0.1, 0, -1, "offset=-1"), (0.1, 1.5, 0, "key=1.5")])
def test_bad_dropout_arguments(p, key, offset, what):
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=what):
        kernels.dropout(x, p, key, offset)
    with pytest.raises(ValueError, match=what):
        kernels.bias_dropout_add(x, None, x, p, key, offset)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_binomial(p):
    n = 1_000_000
    kept = dropout_keep_mask((n,), p, dropout_key(7, 3, 1), 2**32 - n // 2).sum().item()  # crosses the hi word
    assert abs(kept - n * (1 - p)) < 6 * (n * p * (1 - p)) ** 0.5


def test_dropout_reference():
    x = torch.randn(1000, dtype=torch.float64)
    key = dropout_key(0, 1, 2)
    keep = dropout_keep_mask(x.shape, 0.25, key, 17)
    y = kernels.dropout_ref(x, 0.25, key, 17)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    assert torch.allclose(y[keep], x[keep] / 0.75)
    assert kernels.dropout_ref(x, 0.0, key, 17) is x


def test_bias_dropout_add_reference_gradients():
    gen = torch.Generator().manual_seed(1)
    x, r = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64), torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, b, r)]
    key = dropout_key(3, 0, 1)
    assert torch.autograd.gradcheck(lambda x, b, r: kernels.bias_dropout_add_ref(x, b, r, 0.3, key, 9), inputs)
    # the kernels' backward: grad_x = grad * keep * scale, grad_bias = its row sum, grad_residual = grad
    g = torch.randn_like(x)
    gx, gb, gr = torch.autograd.grad(kernels.bias_dropout_add_ref(x, b, r, 0.3, key, 9), inputs, g)
    want = kernels.dropout_ref(g, 0.3, key, 9)
    assert torch.allclose(gx, want) and torch.allclose(gb, want.sum((0, 1))) and torch.equal(gr, g)


def test_bias_gelu_reference_and_derivative():
    y = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    k0, k1 = (2 / torch.pi) ** 0.5, 0.044715
    t = torch.tanh(k0 * (y + k1 * y**3))
    assert torch.allclose(kernels.bias_gelu_ref(y, torch.zeros(1, dtype=y.dtype)), 0.5 * y * (1 + t))
    yy = y.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.gelu(yy, approximate="tanh").sum(), yy)
    # the derivative the CUDA backward computes
    assert torch.allclose(grad, 0.5 * (1 + t) + 0.5 * y * (1 - t * t) * k0 * (1 + 3 * k1 * y * y))


def test_softmax_reference():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    causal = torch.full((5, 5), float("-inf"), dtype=s.dtype).triu(1)
    y = kernels.scale_mask_softmax_ref(s, 0.7)
    assert torch.allclose(y, F.softmax(s * 0.7 + causal, dim=-1))
    assert torch.equal(y.triu(1), torch.zeros_like(y))
    sg = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: kernels.scale_mask_softmax_ref(s, 0.7), [sg])
    g = torch.randn(s.shape, generator=gen, dtype=s.dtype)
    (gs,) = torch.autograd.grad(kernels.scale_mask_softmax_ref(sg, 0.7), sg, g)
    assert torch.allclose(gs, 0.7 * y * (g - (g * y).sum(-1, keepdim=True)))  # the kernel's formula


def test_layer_norm_backward_formula():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(kernels.layer_norm_ref(x, w, b, 1e-5), (x, w, b), g)
    mean = x.mean(-1, keepdim=True)
    rstd = ((x - mean).pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
    xhat = ((x - mean) * rstd).detach()
    gwx = g * w.detach()
    want = rstd * (gwx - gwx.mean(-1, keepdim=True) - xhat * (gwx * xhat).mean(-1, keepdim=True))
    assert torch.allclose(gx, want) and torch.allclose(gw, (g * xhat).sum(0)) and torch.allclose(gb, g.sum(0))


# -----------------------------------------------------------------------------
# CPU: the sources compile, link and bind; the elementwise CUDA code runs on the host

def _run_all(cmds):
    """Run the commands in parallel; fail with the first compiler error."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for c, p in zip(cmds, procs):
        out = p.communicate()[0]
        assert p.returncode == 0, f"{' '.join(c)}\n{out[-4000:]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Compile the extension as load_inline would (g++ for C++, nvcc for CUDA, sm_90) and link it; also
    compile the CUDA source for the host. Paths of the extension and of the host library."""
    nvcc, gxx = shutil.which("nvcc"), shutil.which("g++")
    if nvcc is None or gxx is None:
        pytest.skip("needs nvcc and g++ on PATH")
    from torch.utils.cpp_extension import TORCH_LIB_PATH, include_paths

    d = tmp_path_factory.mktemp("kernels_build")
    cpp, cu = kernels._sources()
    (d / "main.cpp").write_text(cpp)
    (d / "cuda.cu").write_text(cu)
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cuda_flags = ["-std=c++20", "--compiler-options", "-fPIC", *kernels.CUDA_FLAGS]
    t0 = time.time()
    _run_all([
        [gxx, "-c", str(d / "main.cpp"), "-o", str(d / "main.o"), *inc, "-DTORCH_EXTENSION_NAME=nanosp_kernels",
         "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-std=c++20", "-fPIC", "-O0"],
        [nvcc, "-c", str(d / "cuda.cu"), "-o", str(d / "cuda.o"), "-gencode", "arch=compute_90,code=sm_90",
         *cuda_flags],
        [nvcc, "-shared", str(d / "cuda.cu"), "-o", str(d / "host.so"), "-DNANOSP_HOST_TEST",
         "-gencode", "arch=compute_90,code=sm_90", *cuda_flags],
    ])
    ext = d / "nanosp_kernels.so"
    _run_all([[gxx, "-shared", str(d / "main.o"), str(d / "cuda.o"), "-o", str(ext), f"-L{TORCH_LIB_PATH}",
               "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python", "-lcudart", *_cudart_dirs(nvcc)]])
    print(f"compiled and linked in {time.time() - t0:.0f} s")
    return ext, d / "host.so"


def _cudart_dirs(nvcc):
    """-L / rpath flags for libcudart: next to the real nvcc (it may be a wrapper script)."""
    out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
    tops = {line.split("=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line}
    flags = []
    for top in tops | {"/usr/local/cuda"}:
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            p = os.path.join(top, lib)
            if os.path.exists(os.path.join(p, "libcudart.so")):
                flags += [f"-L{p}", f"-Wl,-rpath,{p}"]
    return flags


def test_extension_compiles_and_checks_inputs(built):
    ext, _ = built
    loader = importlib.machinery.ExtensionFileLoader("nanosp_kernels", str(ext))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("nanosp_kernels", loader))
    loader.exec_module(mod)
    assert set(kernels._FUNCTIONS) <= set(dir(mod))
    x, b = torch.zeros(4, 8), torch.zeros(8)
    with pytest.raises(ValueError, match="x has dtype Double"):
        mod.bias_gelu_fwd(x.double(), b, x, 0)
    with pytest.raises(ValueError, match="x is on cpu"):
        mod.bias_gelu_fwd(x, b, x, 0)
    with pytest.raises(ValueError, match="x is on cpu"):
        mod.softmax_fwd(x, x, 1.0, 0)


@pytest.fixture(scope="module")
def host(built):
    lib = ctypes.CDLL(str(built[1]))
    P, I, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    sigs = {"bias_gelu_fwd_launch": [ctypes.c_int, P, P, P, I, I, I],
            "bias_gelu_bwd_launch": [ctypes.c_int, P, P, P, P, I, I, I],
            "dropout_add_launch": [ctypes.c_int, P, P, P, P, I, I, I, I, I, F32, I],
            "keep_mask_launch": [P, I, I, I, I, I]}
    for name, args in sigs.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, ctypes.c_char_p
    return lib


def _call(fn, *args):
    err = fn(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])
    assert err is None, err


def _poisoned(like):
    return torch.full_like(like, float("nan"))


@HOST
@given(data=st.data(), lead=leading, n=sizes, seed=seeds, unaligned=st.booleans())
def test_host_bias_gelu(host, data, lead, n, seed, unaligned):
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    x, b, g = (rand((*lead, n), dtype, gen, unaligned=unaligned), rand((n,), dtype, gen),
               rand((*lead, n), dtype, gen))
    out = _poisoned(x)
    _call(host.bias_gelu_fwd_launch, CODE[dtype], x, b, out, x.numel(), n, 0)
    xf, bf = x.float().requires_grad_(), b.float()
    want = kernels.bias_gelu_ref(xf, bf)
    assert_close(out, want)
    gx = _poisoned(x)
    _call(host.bias_gelu_bwd_launch, CODE[dtype], g, x, b, gx, x.numel(), n, 0)
    assert_close(gx, torch.autograd.grad(want, xf, g.float())[0])


@HOST
@given(data=st.data(), lead=leading, n=sizes, seed=seeds, unaligned=st.booleans(), p=probs, offset=offsets,
       with_bias=st.booleans(), with_residual=st.booleans())
def test_host_dropout_add(host, data, lead, n, seed, unaligned, p, offset, with_bias, with_residual):
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    key = dropout_key(seed, 1, 2)
    x = rand((*lead, n), dtype, gen, unaligned=unaligned)
    b = rand((n,), dtype, gen) if with_bias else None
    r = rand((*lead, n), dtype, gen) if with_residual else None
    out = _poisoned(x)
    _call(host.dropout_add_launch, CODE[dtype], x, b, r, out, x.numel(), n, *kernels._mask_args(p, key, offset), 0)
    want = kernels.dropout_ref(x.float() if b is None else x.float() + b.float(), p, key, offset)
    assert_close(out, want if r is None else want + r.float())
    if r is None:  # dropped elements are exactly 0
        keep = dropout_keep_mask(x.shape, p, key, offset)
        assert torch.equal(out[~keep].float(), torch.zeros(int((~keep).sum())))


@HOST
@given(n=sizes | st.integers(1, 5000), p=probs, offset=offsets, seed=seeds)
def test_host_keep_mask_is_bit_identical(host, n, p, offset, seed):
    key = dropout_key(seed, 4, 1)
    out = torch.full((n,), 7, dtype=torch.uint8)
    _call(host.keep_mask_launch, out, n, *kernels._mask_args(p, key, offset)[:3], 0)
    assert torch.equal(out.bool(), dropout_keep_mask((n,), p, key, offset))


# -----------------------------------------------------------------------------
# GPU: each kernel against its reference, outputs (into poisoned buffers) and gradients

def _grads(fn, inputs, g):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], g)


@cuda
@pytest.mark.parametrize("n", [0, 1, 7, 1023, 4097, 2**20 + 3])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_keep_mask_is_bit_identical(n, p):
    key = dropout_key(11, 2, 0)
    for offset in (0, 2**32 - n // 2, 2**40 + 3):
        assert torch.equal(kernels._keep_mask_cuda(n, p, key, offset),
                           dropout_keep_mask((n,), p, key, offset, device="cuda"))


@cuda
@GPU
@given(data=st.data(), lead=leading, n=sizes, seed=seeds, unaligned=st.booleans())
def test_gpu_bias_gelu(data, lead, n, seed, unaligned):
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    x, b, g = (rand((*lead, n), dtype, gen, "cuda", unaligned), rand((n,), dtype, gen, "cuda"),
               rand((*lead, n), dtype, gen, "cuda"))
    out = _poisoned(x)
    kernels._run("bias_gelu_fwd", x, b, out)
    y, (gx, gb) = _grads(kernels.bias_gelu, [x, b], g)
    want, (wx, wb) = _grads(kernels.bias_gelu_ref, [x.float(), b.float()], g.float())
    assert_close(out, want)
    assert_close(y, want)
    assert_close(gx, wx)
    assert_close(gb, wb, reduce=x.numel() // n)


@cuda
@GPU
@given(data=st.data(), lead=leading, n=sizes, seed=seeds, unaligned=st.booleans(), p=probs, offset=offsets,
       with_bias=st.booleans())
def test_gpu_bias_dropout_add(data, lead, n, seed, unaligned, p, offset, with_bias):
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    key = dropout_key(seed, 0, 3)
    x, r, g = (rand((*lead, n), dtype, gen, "cuda", unaligned) for _ in range(3))
    b = rand((n,), dtype, gen, "cuda") if with_bias else None
    out = _poisoned(x)
    kernels._run("dropout_add_fwd", x, b, r, out, *kernels._mask_args(p, key, offset))
    y, grads = _grads(lambda x, b, r: kernels.bias_dropout_add(x, b, r, p, key, offset), [x, b, r], g)
    f = None if b is None else b.float()
    want, wgrads = _grads(lambda x, b, r: kernels.bias_dropout_add_ref(x, b, r, p, key, offset),
                          [x.float(), f, r.float()], g.float())
    assert_close(out, want)
    assert_close(y, want)
    for got, exp in zip(grads, wgrads):
        assert_close(got, exp, reduce=x.numel() // n if got.dim() == 1 else 1)
    d = _poisoned(x)
    kernels._run("dropout_add_fwd", x, None, None, d, *kernels._mask_args(p, key, offset))
    assert_close(d, kernels.dropout_ref(x.float(), p, key, offset))
    if p > 0:
        dx, (gd,) = _grads(lambda x: kernels.dropout(x, p, key, offset), [x], g)
        keep = dropout_keep_mask(x.shape, p, key, offset, device="cuda")
        assert torch.equal(dx[~keep].float(), torch.zeros(int((~keep).sum()), device="cuda"))
        assert_close(gd, kernels.dropout_ref(g.float(), p, key, offset))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, T", [(3, 1), (2, 7), (2, 64), (1, 1023), (1, 2048), (1, 4096), (1, 8200)])
def test_gpu_scale_mask_softmax(dtype, N, T):
    gen = torch.Generator().manual_seed(T)
    s, g = rand((N, T, T), dtype, gen, "cuda"), rand((N, T, T), dtype, gen, "cuda")
    scale = T**-0.5
    out = _poisoned(s)
    kernels._run("softmax_fwd", s, out, scale)
    y, (gs,) = _grads(lambda s: kernels.scale_mask_softmax(s, scale), [s], g)
    want, (ws,) = _grads(lambda s: kernels.scale_mask_softmax_ref(s, scale), [s.float()], g.float())
    assert torch.equal(out.triu(1), torch.zeros_like(out))  # masked: exactly 0
    assert_close(out, want)  # per-element rounding: the row sums do not widen the tolerance
    assert_close(y, want)
    assert_close(gs, ws)


@cuda
@GPU
@given(data=st.data(), lead=leading, n=sizes, seed=seeds, affine=st.sampled_from(["both", "weight", "none"]))
def test_gpu_layer_norm(data, lead, n, seed, affine):
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    x, g = rand((*lead, n), dtype, gen, "cuda"), rand((*lead, n), dtype, gen, "cuda")
    w = rand((n,), dtype, gen, "cuda") if affine != "none" else None
    b = rand((n,), dtype, gen, "cuda") if affine == "both" else None
    rows = x.numel() // n
    out, mean, rstd = _poisoned(x), torch.full((rows,), float("nan"), device="cuda"), torch.empty(rows, device="cuda")
    kernels._run("layer_norm_fwd", x, w, b, out, mean, rstd, 1e-5)
    y, grads = _grads(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), [x, w, b], g)
    fl = [None if t is None else t.float() for t in (x, w, b)]
    want, wgrads = _grads(lambda x, w, b: kernels.layer_norm_ref(x, w, b, 1e-5), fl, g.float())
    assert_close(out, want)
    assert_close(y, want)
    torch.testing.assert_close(mean, x.float().mean(-1).flatten(), rtol=1e-5, atol=1e-5)
    assert_close(grads[0], wgrads[0])
    for got, exp in zip(grads[1:], wgrads[1:]):
        assert_close(got, exp, reduce=rows)


@cuda
def test_gpu_bad_inputs_name_the_tensor():
    x = torch.randn(4, 8, device="cuda")
    b = torch.randn(8, device="cuda")
    with pytest.raises(ValueError, match="x has dtype Double"):
        kernels.bias_gelu(x.double(), b.double())
    with pytest.raises(ValueError, match="bias has shape"):
        kernels.bias_gelu(x, torch.randn(7, device="cuda"))
    with pytest.raises(ValueError, match="bias has dtype"):
        kernels.bias_gelu(x, b.half())
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.bias_dropout_add(x.t(), None, x.t(), 0.1, 1, 0)
    with pytest.raises(ValueError, match="residual is on cpu"):
        kernels.bias_dropout_add(x, b, x.cpu(), 0.1, 1, 0)
    with pytest.raises(ValueError, match="expected \\(..., T, T\\)"):
        kernels.scale_mask_softmax(x, 1.0)
    with pytest.raises(ValueError, match="weight has shape"):
        kernels.layer_norm(x, torch.randn(4, device="cuda"), None)


@cuda
def test_gpu_benchmark_smoke():
    rows = kernels.benchmark(shape=(2, 64, 256), dtype=torch.bfloat16, iters=3)
    assert {r["op"] for r in rows} >= {"bias_gelu", "scale_mask_softmax (backward)", "layer_norm"}
    assert all(r["ms"] > 0 and r["GBps"] > 0 and r["vs_eager"] > 0 for r in rows)


# ----------------------------------------------------------------------------------------------
# nanosp through the kernels' API


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_model_through_kernel_api_equals_plain_model(monkeypatch, recompute):
    """nanosp's fused path (kernels.bias_gelu, bias_dropout_add, dropout, scale_mask_softmax,
    layer_norm) with the kernels' CPU references equals its plain path, in float64: the wiring and
    the semantics of every call are the same; on CUDA the same calls reach the kernels."""
    import nanosp

    cfg = nanosp.GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.2,
                           recompute=recompute)
    idx = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(0))
    results = []
    from types import SimpleNamespace

    through_kernels = SimpleNamespace(bias_gelu=kernels.bias_gelu, dropout=kernels.dropout,
                                      bias_dropout_add=kernels.bias_dropout_add,
                                      causal_softmax=kernels.scale_mask_softmax)
    for ops in (nanosp.REFERENCE_OPS, through_kernels):
        monkeypatch.setattr(nanosp, "ops_for", lambda x, cfg, ops=ops: ops)
        model = nanosp.GPT(cfg).double()
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_fused, grads_fused) = results
    assert abs(loss_fused.item() - loss_plain.item()) <= 1e-12 * abs(loss_plain.item())
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_fused[name], grad, rtol=1e-10, atol=1e-14), name


@cuda
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_model_with_kernels_on_cuda_equals_kernels_off(sequence_parallel):
    """On one GPU (a group of one rank): the model with the CUDA kernels equals the model without,
    float32, to float32 reduction-order tolerance."""
    import nanosp

    results = []
    for fused in (False, True):
        cfg = nanosp.GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.1,
                               recompute="selective", sequence_parallel=sequence_parallel, fused_kernels=fused)
        model = nanosp.GPT(cfg).cuda()
        idx = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}))
    assert kernels.available()
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert abs(loss_on - loss_off) < 1e-5 * abs(loss_off)
    for name, grad in grads_off.items():
        assert torch.allclose(grads_on[name], grad, rtol=1e-3, atol=1e-5), name


@cuda
def test_kernels_build_on_cuda():
    """Where there is a GPU, a failed build is a failure, not a silent fallback."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.available()
