"""gpu_check.py: what nanosp claims on a GPU, checked and measured by one command.

    python3 gpu_check.py --out DIR            # a CUDA machine: 9 minutes at most (--budget 540)
    python3 gpu_check.py --out DIR --dry-run  # anywhere, tiny sizes (what test_gpu_check.py runs)

DIR gets gpu_check.json (every number), gpu_check.md (the tables, and each target met or missed)
and gpu_check.log (everything printed). The parts, cheapest and most important first:

1. env: device, driver, Python, torch, CUDA, cuDNN, Triton and nvcc versions; the bandwidth of a
   device-to-device copy and the bf16 matmul rate, the denominators of parts 4 and 5.
2. kernels: kernels.py built from an empty extension cache (timed); test_kernels.py's CUDA tests.
3. equivalence: nanosp's proof in CUDA mode: the model on the GPU (kernels on) against the
   unsharded float64 model, at t = 1 and t = 2, SP off and on, every recompute mode, dropout on.
4. kernel_bench: bench.py's section 5b, each fused op at GPT-2 small's and a GPT-3-like width.
5. training: train.py --device cuda, GPT-2 small in bf16 at T = 1024: kernels on and off,
   written-out and fused attention, torch.compile; tokens/s, MFU, peak memory; a bf16 resume.

Each part runs in a process of its own under a time limit (its share of --budget, plus what the
parts before it left unused), so a part that fails, hangs or breaks the CUDA context is recorded
with its error and what it measured until then, and the next part runs. Without CUDA the parts
that need it say so and the rest run on the CPU. The exit code is 0 once the report is written:
what failed is in it.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PARTS = ("env", "kernels", "equivalence", "kernel_bench", "training")
SHARES = dict(env=20, kernels=110, equivalence=80, kernel_bench=110, training=220)  # seconds of 540
FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
SIZES = {  # copy bytes, matmul n, repetitions; kernel bench s
    "full": dict(copy_bytes=2 << 30, matmul=8192, reps=20, bench=dict(s=2048, reps=50)),
    "dry": dict(copy_bytes=16 << 20, matmul=256, reps=5, bench=dict(s=128, reps=3)),
}
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM; NVIDIA's datasheets


# ----------------------------------------------------------------------------------------------
# running a command under a time limit, its output streamed


def stream(cmd, limit, prefix="", log=None):
    """Run cmd (cwd ROOT, in a process group of its own), each output line printed with `prefix`
    (and written to `log`) as it comes; after `limit` seconds kill it and everything it started.
    Returns (exit code, or None if it was killed, the output lines)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", process_group=0)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(prefix + lines[-1], flush=True)
            if log:
                log.write(prefix + lines[-1] + "\n")
                log.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, lines


def one_line(error):
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0] if text else type(error).__name__


class Record:
    """A part's results, written to its file after every change: a part stopped at its time limit
    leaves what it measured until then."""

    def __init__(self, path):
        self.path, self.data = Path(path), {}

    def __setitem__(self, key, value):
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def __getitem__(self, key):
        return self.data[key]

    def attempt(self, key, fn, *args, **kwargs):
        """self[key] = fn(...), or {"error": ...} if it raised: one measurement failing stops no other."""
        try:
            self[key] = fn(*args, **kwargs)
        except Exception as e:
            print(f"{key}: {one_line(e)}\n{traceback.format_exc()}", flush=True)
            self[key] = {"error": one_line(e), "traceback": traceback.format_exc()[-3000:]}
        return self.data[key]


@dataclasses.dataclass
class Part:
    """What a part's process knows: its sizes, its deadline, the results of the parts before it."""
    dry: bool
    deadline: float
    context: dict
    scratch: Path
    backend: str

    def left(self):
        return self.deadline - time.monotonic()

    @property
    def sizes(self):
        return SIZES["dry" if self.dry else "full"]

    def env(self, key, default=None):
        """A number of part 1 (env), e.g. env("copy", "GBps"), or default if it was not measured."""
        value = self.context.get("env", {}).get("result", {})
        for k in key if isinstance(key, tuple) else (key,):
            value = value.get(k) if isinstance(value, dict) else None
        return default if value is None else value


# ----------------------------------------------------------------------------------------------
# 1. env: versions, and the two ceilings


def version_of(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def command_output(cmd):
    """A command's output, or None when it is missing or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def nvidia_smi():
    fields = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,"
              "temperature.gpu,compute_mode")
    out = command_output(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    return None if out is None else [dict(zip(fields.split(","), (v.strip() for v in line.split(","))))
                                     for line in out.splitlines()]


def versions():
    import torch

    nvcc = find_nvcc()
    release = (command_output([nvcc, "--version"]) or "") if nvcc else ""
    gcc = command_output(["gcc", "--version"]) or ""
    return dict(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
                torch=torch.__version__, torch_cuda=torch.version.cuda, triton=version_of("triton"),
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                **{name: version_of(name) for name in ("numpy", "einops", "pytest", "hypothesis")},
                nvcc=nvcc, nvcc_version=next((line for line in release.splitlines() if "release" in line), None),
                gcc=gcc.splitlines()[0] if gcc else None, ninja=shutil.which("ninja"),
                cuda_home=os.environ.get("CUDA_HOME"), torch_cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))


def device_info():
    import torch

    props = torch.cuda.get_device_properties(0)
    return dict(name=props.name, capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count(),
                multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory,
                l2_bytes=getattr(props, "L2_cache_size", None))


def time_ms(fn, reps, device):
    """Median milliseconds of fn(): CUDA events on a GPU (bench.cuda_ms), the host clock on a CPU."""
    import statistics

    if device == "cuda":
        import bench

        return bench.cuda_ms(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def copy_bandwidth(device, nbytes, reps):
    """y.copy_(x) of random bf16 data: bytes read plus bytes written per second."""
    import torch

    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), reps, device)
    assert torch.equal(x, y), "the copy is not a copy"
    return dict(bytes=nbytes, ms=ms, GBps=2 * nbytes / ms / 1e6)


def matmul_rate(device, n, reps):
    """An n x n x n bf16 product of random matrices: 2 n^3 FLOPs per product."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device, generator=gen) for _ in "ab")
    c = torch.empty_like(a)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), reps, device)
    torch.testing.assert_close(c[:4].double(), a[:4].double() @ b.double(), rtol=2**-6, atol=2**-6 * n**0.5)
    return dict(n=n, ms=ms, TFLOPs=2 * n**3 / ms / 1e9)


def part_env(rec, p):
    import torch

    cuda = torch.cuda.is_available()
    rec["versions"] = versions()
    rec["cuda_available"] = cuda
    rec["device"] = device_info() if cuda else None
    rec["nvidia_smi"] = nvidia_smi()
    device, sizes = "cuda" if cuda else "cpu", p.sizes
    print(f"device: {rec['device'] or 'cpu'}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"nvcc {rec['versions']['nvcc_version']}", flush=True)
    copy = rec.attempt("copy", copy_bandwidth, device, sizes["copy_bytes"], sizes["reps"])
    print(f"copy: {copy.get('GBps', 0):,.0f} GB/s", flush=True)
    matmul = rec.attempt("matmul", matmul_rate, device, sizes["matmul"], sizes["reps"])
    print(f"bf16 matmul: {matmul.get('TFLOPs', 0):,.1f} TFLOP/s", flush=True)


# ----------------------------------------------------------------------------------------------
# 2. kernels: the build, and test_kernels.py on CUDA

# test_kernels.py's CUDA tests: the ops' and the model's tests with device=cuda, the CUDA-only ones
CUDA_TESTS = "cuda or bad_inputs_are_refused or non_contiguous"


def find_nvcc():
    """nvcc on PATH, else where CUDA toolkits and the nvidia-cuda-nvcc wheel put it; None if none."""
    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
                  "/usr/local/cuda/bin/nvcc", *sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), reverse=True)]
    for site in map(Path, sys.path):
        candidates += sorted(site.glob("nvidia/*/bin/nvcc"))
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def toolkit_root(nvcc):
    """The toolkit nvcc belongs to (the directory holding bin/ and include/), as nvcc itself reports
    it: the nvcc found first may be a wrapper script elsewhere."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True).stderr  # reads no file
    top = next((line.split("=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line), None)
    return os.path.normpath(top) if top else str(Path(os.path.realpath(nvcc)).parent.parent)


def prepare_environment(scratch):
    """What load_inline, pytest and the parts' processes need, wherever the machine keeps it: a
    writable extension cache (empty, so part 2 times a real build), CUDA_HOME where the real
    nvcc lives, ninja on PATH, unbuffered output."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(scratch / "torch_extensions"))
    os.environ["PYTHONUNBUFFERED"] = "1"
    nvcc = find_nvcc()
    home = os.environ.get("CUDA_HOME")
    if nvcc and not (home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)):  # unset, or without nvcc
        os.environ["CUDA_HOME"] = toolkit_root(nvcc)
    paths = [str(Path(nvcc).parent)] if nvcc else []
    if shutil.which("ninja") is None:  # pip's ninja, beside this Python, or in its package
        paths.append(str(Path(sys.executable).parent))
        try:
            import ninja

            paths.append(ninja.BIN_DIR)
        except ImportError:
            pass
    os.environ["PATH"] = os.pathsep.join(paths + [os.environ.get("PATH", "")])


def build_kernels():
    import warnings

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kernels

        built = kernels.available()
    return dict(built=built, seconds=time.perf_counter() - start, warnings=[str(w.message) for w in caught],
                extension_dir=os.environ.get("TORCH_EXTENSIONS_DIR"))


def pytest_summary(lines):
    """Counts from pytest's closing line ("3 failed, 300 passed, 2 skipped in 9.1s"), and its
    FAILED/ERROR lines."""
    closing = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|skipped|error|errors|"
                                                                   r"deselected|no tests ran)\b", line)), "")
    counts = {word.rstrip("s") if word == "errors" else word: int(n)
              for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", closing)}
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return dict(counts=counts, closing=closing.strip("= "), failures=failures[:50])


def part_kernels(rec, p):
    import torch

    rec["toolchain"] = dict(nvcc=find_nvcc(), cuda_home=os.environ.get("CUDA_HOME"), ninja=shutil.which("ninja"),
                            extension_dir=os.environ.get("TORCH_EXTENSIONS_DIR"))
    if torch.cuda.is_available():
        build = rec.attempt("build", build_kernels)
        print(f"kernels.py built: {build.get('built')} in {build.get('seconds', 0):.1f} s "
              f"{'; '.join(build.get('warnings', []))}", flush=True)
    else:
        rec["build"] = {"skipped": "no CUDA device"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "test_kernels.py", "-k", CUDA_TESTS]
    start = time.perf_counter()
    code, lines = stream(cmd, p.left() - 5, prefix="  pytest| ")
    rec["tests"] = dict(command=" ".join(cmd[1:]), returncode=code, seconds=time.perf_counter() - start,
                        **pytest_summary(lines), tail=lines[-40:])


# ----------------------------------------------------------------------------------------------
# 3. equivalence in CUDA mode
#
# Each rank builds its model on the GPU in the case's dtype (kernels.py on, except in float64,
# which the kernels do not take) and an unsharded float64 model with nanosp's definitions on the
# CPU, both from the same random weights, rounded to the dtype first so that only arithmetic
# differs. Compared as test_nanosp.py compares (the largest difference over the largest reference
# element): logits, loss, every gradient and the weights after an SGD step, twice (new dropout
# masks), each step from the same weights (the reference takes the model's after each).
#
# Tolerances. float64: 1e-10, as on the CPU (what is left is reduction order). float32 and
# bfloat16: every op here reads its inputs and rounds its output to the dtype once (the kernels
# compute in float32 registers and round at the store; matmuls accumulate in float32, with TF32
# and reduced-precision bf16 reductions off), a relative error of at most u (2**-24 float32,
# 2**-8 bfloat16) per stage, plus float32 accumulation over K terms, about sqrt(K) 2**-24. A layer
# has 13 such stages on its forward path (2 LayerNorms, QKV, scores, softmax, dropout, .V,
# projection, 2 residual adds, fc, GeLU, projection), the model 4 more (embedding sum, dropout,
# ln_f, head), and backward retraces each about twice: S = 3 (13 L + 4). The weights keep every
# activation near unit scale, so no stage amplifies what reaches it by more than a small factor,
# and independent rounding errors add in quadrature: an output is off by about sqrt(S) (u +
# sqrt(K) 2**-24) of its scale. The tolerance is 4 times that. (On the CPU, nanosp's definitions
# in these dtypes, 15 seeds of each t = 1 case: at worst 0.27 of it in bfloat16, a LayerNorm
# bias's gradient, and 0.04 in float32.)

EQUIVALENCE = dict(vocab_size=37, n_layer=2, n_head=4, n_embd=64, batch=2)  # 37: padded at t = 2


def tolerance(dtype, n_layer, longest):
    if dtype == "float64":
        return 1e-10
    u = {"float32": 2.0**-24, "bfloat16": 2.0**-8}[dtype]
    return 4 * math.sqrt(3 * (13 * n_layer + 4)) * (u + math.sqrt(longest) * 2.0**-24)


def equivalence_cases(attention_modes=("explicit",), dry=False):
    """dtype x (t = 1; t = 2, SP off; t = 2, SP on) x recompute mode, dropout 0.1; the lengths
    take the kernels' 16-byte paths (multiples of 8) and their element-by-element ones. The fused
    attention (no dropout), and every attention in a dry run, take a third of them: each (t, SP)
    once per dtype, each recompute mode once per dtype."""
    import nanosp

    cases = []
    for attention in attention_modes:
        for dtype in ("float64", "float32", "bfloat16"):
            for j, (t, sp) in enumerate(((1, False), (2, False), (2, True))):
                for i, recompute in enumerate(nanosp.RECOMPUTE_MODES):
                    T = (24, 26, 32)[i] if sp else (24, 13, 32)[i]
                    if i == j or not (dry or attention != "explicit"):
                        cases.append(dict(dtype=dtype, t=t, sequence_parallel=sp, recompute=recompute, T=T,
                                          attention=attention, seed=len(cases)))
    return cases


def unit_scale_state_dict(shapes, seed):
    """Random weights that keep activations near unit scale, so that each op's rounding error is
    about u of its output (what the tolerance assumes): matrices N(0, 1/fan_in), embeddings
    N(0, 0.3^2), LayerNorm weights near 1, small biases; none of them 0 or 1 exactly."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name in ("wte.weight", "wpe.weight"):
            sd[name] = 0.3 * w
        elif len(shape) == 2:
            sd[name] = w / math.sqrt(shape[1])
        else:  # LayerNorm weights, biases
            sd[name] = (1.0 if name.split(".")[-2].startswith("ln") and name.endswith("weight") else 0.0) + 0.1 * w
    return sd


class _Done:
    """The work handle of a collective that has already finished."""

    def wait(self, *args, **kwargs):
        return True


class HostStaged:
    """torch.distributed for nanosp with every tensor staged through host memory: two ranks on one
    GPU cannot use NCCL, and gloo is given CPU tensors only. It stands in for nanosp's `dist` (its
    all_reduce, the one collective nanosp calls there) and for _all_gather_into and
    _reduce_scatter_into, which nanosp binds at import; all else passes through. Used as a context
    manager, in this check only: nanosp's own code path is the one that runs on NCCL."""

    def __init__(self, nanosp):
        import torch.distributed as dist

        self.nanosp, self.dist = nanosp, dist
        self.saved = (nanosp.dist, nanosp._all_gather_into, nanosp._reduce_scatter_into)

    def __enter__(self):
        self.nanosp.dist = self
        self.nanosp._all_gather_into = self._into(self.saved[1])
        self.nanosp._reduce_scatter_into = self._into(self.saved[2])
        return self

    def __exit__(self, *exc):
        self.nanosp.dist, self.nanosp._all_gather_into, self.nanosp._reduce_scatter_into = self.saved

    def __getattr__(self, name):  # get_world_size, get_rank, ReduceOp, is_initialized, ...
        return getattr(self.dist, name)

    def all_reduce(self, x, op=None, group=None, async_op=False):
        host = x.to("cpu", copy=True)  # a copy even on a CPU, so that a dry run checks the way back
        self.dist.all_reduce(host, op=op or self.dist.ReduceOp.SUM, group=group)
        x.copy_(host)
        return _Done() if async_op else None

    @staticmethod
    def _into(collective):
        def staged(out, x, group=None, async_op=False):
            host = out.new_empty(out.shape, device="cpu")
            collective(host, x.cpu(), group=group)
            out.copy_(host)
            return _Done() if async_op else None

        return staged


def equivalence_case(case, group, device):
    """One case on this rank: the worst relative error of each quantity, and which ops ran."""
    import torch

    import nanosp
    from test_nanosp import make_batch, rel_err

    dtype = getattr(torch, case["dtype"])
    shape = {k: v for k, v in EQUIVALENCE.items() if k != "batch"}
    dropout = 0.0 if case["attention"] == "sdpa" else 0.1  # SDPA would draw its masks from torch's RNG
    cfg = nanosp.GPTConfig(**shape, block_size=case["T"] + 3, dropout=dropout, recompute=case["recompute"],
                           sequence_parallel=case["sequence_parallel"], seed=case["seed"],
                           fused_kernels=dtype != torch.float64, attention=case["attention"])
    model = nanosp.GPT(cfg, group).to(device, dtype)
    unsharded = dataclasses.replace(cfg, sequence_parallel=False, recompute="none", attention="explicit")
    reference = nanosp.GPT(unsharded).double()
    sd = {name: w.to(dtype).double() for name, w in unit_scale_state_dict(reference.full_shapes(), cfg.seed).items()}
    model.load_full_state_dict(sd)
    reference.load_full_state_dict(sd)
    idx, targets = make_batch(cfg, EQUIVALENCE["batch"], case["T"], cfg.seed)
    ops = "kernels.py" if nanosp.ops_for(idx.to(device), cfg) is not nanosp.REFERENCE_OPS else "nanosp"
    # SGD, whose step is a continuous function of the gradient; AdamW's first step is lr sign(g), so
    # a gradient that is 0 up to rounding (the key bias's is) would move a weight by +-lr either way
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    errors, worst_grad = dict(logits=0.0, loss=0.0, grad=0.0, weights=0.0), None
    for _ in range(2):
        logits, _ = model(idx.to(device))
        errors["logits"] = max(errors["logits"], rel_err(logits.cpu().double(), reference(idx)[0]))
        _, loss = model(idx.to(device), targets.to(device))
        _, loss_ref = reference(idx, targets)
        errors["loss"] = max(errors["loss"], rel_err(loss.cpu().double(), loss_ref))
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        grads_ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            err = rel_err(model.full_tensor(name, p.grad).cpu().double(), grads_ref[name].grad)
            if err >= errors["grad"]:
                errors["grad"], worst_grad = err, name
        opt.step()
        opt_ref.step()
        full, full_ref = model.full_state_dict(), reference.full_state_dict()
        errors["weights"] = max(errors["weights"], *(rel_err(full[n].double(), full_ref[n]) for n in full_ref))
        reference.load_full_state_dict({n: w.double() for n, w in full.items()})  # the next step starts level
    return dict(errors=errors, worst_grad=worst_grad, ops=ops, device=str(device))


def run_cases(cases, group, device, on_result=None):
    results = []
    for case in cases:
        try:
            results.append(equivalence_case(case, group, device))
        except Exception as e:
            results.append(dict(error=one_line(e), traceback=traceback.format_exc()[-2000:]))
        if on_result:
            on_result(len(results) - 1, results[-1])
    return results


def equivalence_rank(rank, world, port, backend, cases, queue=None, on_result=None):
    """Rank `rank` of a world of t processes: the t-way cases, over gloo (every rank on the one GPU,
    collectives staged through host memory) or NCCL (one GPU per rank). Rank 0 returns its
    results; the others put theirs on `queue`."""
    import datetime

    import torch
    import torch.distributed as dist

    import nanosp

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank if backend == "nccl" else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if backend == "nccl":
            results = run_cases(cases, dist.group.WORLD, device, on_result)
        else:
            with HostStaged(nanosp):
                results = run_cases(cases, dist.group.WORLD, device, on_result)
    finally:
        dist.destroy_process_group()
    if queue is None:
        return results
    queue.put((rank, results))


def part_equivalence(rec, p):
    import torch
    import torch.multiprocessing as mp

    import nanosp

    cuda = torch.cuda.is_available()
    modes = nanosp.ATTENTIONS  # the written-out attention, and the fused one
    backend = p.backend if p.backend != "auto" else "nccl" if cuda and torch.cuda.device_count() >= 2 else "gloo"
    cases = equivalence_cases(modes, p.dry)
    for case in cases:
        case["tolerance"] = tolerance(case["dtype"], EQUIVALENCE["n_layer"],
                                      max(4 * EQUIVALENCE["n_embd"], case["T"] + 3, EQUIVALENCE["vocab_size"]))
    rec["setup"] = dict(EQUIVALENCE, backend_t2=backend, attention_modes=modes,
                        device="cuda" if cuda else "cpu", staged_through_host=backend == "gloo" and cuda)
    rec["cases"] = cases
    sharded = [c for c in cases if c["t"] == 2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    other = ctx.Process(target=equivalence_rank, args=(1, 2, port, backend, sharded, queue), daemon=True)
    other.start()  # it starts up while rank 0 runs the t = 1 cases

    def done(case, result):
        case.update(result=result)
        rec["cases"] = cases
        errors = result.get("errors")
        print(f"{case['dtype']:>8} t={case['t']} sp={case['sequence_parallel']!s:5} {case['recompute']:>9} "
              f"{case['attention']}: " + (", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f" (tol "
              f"{case['tolerance']:.1e}, {result['ops']})" if errors else result["error"]), flush=True)

    if cuda:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    single = [c for c in cases if c["t"] == 1]
    for i, result in enumerate(run_cases(single, None, torch.device("cuda" if cuda else "cpu"))):
        done(single[i], result)
    equivalence_rank(0, 2, port, backend, sharded, on_result=lambda i, r: done(sharded[i], r))
    _, results = queue.get(timeout=max(5.0, p.left()))  # rank 1's comparisons: the worse of the two ranks counts
    other.join(timeout=30)
    for case, theirs in zip(sharded, results):
        if "error" in theirs:
            case["result"] = theirs
        elif "errors" in case["result"]:
            case["result"]["errors"] = {k: max(v, theirs["errors"][k]) for k, v in case["result"]["errors"].items()}
    rec["cases"] = cases


def case_ok(case):
    r = case.get("result", {})
    return "errors" in r and max(r["errors"].values()) <= case["tolerance"]


# ----------------------------------------------------------------------------------------------
# 4. the kernels against eager and torch.compile


def part_kernel_bench(rec, p):
    import torch

    if not torch.cuda.is_available():
        rec["skipped"] = "no CUDA device"
        return
    import bench
    import kernels

    if not kernels.available():
        rec["skipped"] = "kernels.py did not build (part 2 says why)"
        return
    copy = p.env(("copy", "GBps"))
    rows, notes = [], []
    for model in bench.KERNEL_MODELS:  # one model at a time, so a time limit keeps the first
        result = bench.bench_kernels(p.sizes["bench"], models=[model])
        rows += [dict(r, of_large_copy=r["GBps"] / copy if copy else None) for r in result["rows"]]
        notes += result["notes"]
        rec["rows"], rec["notes"] = rows, notes


# ----------------------------------------------------------------------------------------------
# 5. training: train.py --device cuda

def gpt2_options(T, B, steps):
    return ["--preset", "gpt2", "--seq-len", str(T), "--batch-size", str(B), "--max-steps", str(steps)]


TINY = ["--preset", "tiny", "--n-layer", "2", "--n-embd", "64", "--seq-len", "32", "--batch-size", "2", "--max-steps"]
TRAIN = {  # the timed runs' options, the steps left out of their averages (warm-up, compile), the resume's
    "full": dict(options=gpt2_options(1024, 16, 30) + ["--log-interval", "5"], skip=10, resume=gpt2_options(256, 8, 8)),
    "dry": dict(options=TINY + ["4", "--log-interval", "2"], skip=2, resume=TINY + ["4"]),
}
COMMON = ["--dtype", "bfloat16", "--lr", "6e-4", "--warmup-steps", "2", "--eval-interval", "0", "--eval-iters", "1",
          "--ckpt-interval", "0"]
VARIANTS = [  # most important first; the resume check runs after the first four
    ("fused attention, kernels on", ["--attention", "sdpa"]),
    ("fused attention, torch.compile of nanosp's ops", ["--attention", "sdpa", "--no-kernels", "--compile"]),
    ("written-out attention, kernels on", []),
    ("written-out attention, kernels off", ["--no-kernels"]),
    ("fused attention, kernels off", ["--attention", "sdpa", "--no-kernels"]),
    ("written-out attention, torch.compile of nanosp's ops", ["--no-kernels", "--compile"]),
]


def training_data(scratch):
    """A file of this repository's text, so that no run depends on where the stdlib lives."""
    path = scratch / "data.txt"
    if not path.exists():
        path.write_bytes(b"".join(f.read_bytes() for f in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*.md"))))
    return path


def read_log(out_dir):
    """train.py's records in out_dir/log.jsonl (a line a crash tore is left out)."""
    path, records = Path(out_dir) / "log.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def train_run(options, out_dir, limit, skip):
    """One train.py process; its steady rate: the steps after the first `skip` (warm-up, compile)."""
    cmd = [sys.executable, "train.py", *options, "--out-dir", str(out_dir)]
    start = time.perf_counter()
    code, lines = stream(cmd, limit, prefix="  train| ")
    records = read_log(out_dir)
    result = dict(command=" ".join(cmd[1:]), returncode=code, seconds=time.perf_counter() - start, tail=lines[-15:])
    if code != 0:
        result["error"] = "timed out" if code is None else (lines[-1] if lines else f"exit code {code}")
    steady, last = [], 0
    for r in records:
        steps, last = r["step"] - last, r["step"]
        if r["step"] > skip:
            steady.append((steps, r))
    if steady:
        steps = sum(n for n, _ in steady)
        seconds = sum(n * r["ms"] / 1e3 for n, r in steady)
        tokens = sum(n * r["ms"] / 1e3 * r["tokens_per_s"] for n, r in steady)
        result.update(steps_timed=steps, ms=1e3 * seconds / steps, tokens_per_s=tokens / seconds,
                      mem_bytes=max(r["mem_bytes"] for r in records), activation_bytes=records[-1]["activation_bytes"],
                      ops=records[-1].get("ops"), loss=records[-1]["loss"])
    return result


def resume_check(base, scratch, limit):
    """bf16, dropout on: N steps in one run, against N/2, stopped, then resumed; the losses of the
    resumed steps and the final checkpoints (weights and AdamW state) must be equal, bit for bit."""
    import torch

    options = [*base, "--dropout", "0.1", "--log-interval", "1"]
    steps = int(options[options.index("--max-steps") + 1])
    whole, halves = scratch / "resume-whole", scratch / "resume-halves"
    deadline = time.monotonic() + limit
    runs = [train_run(options, whole, limit / 3, 0),
            train_run([*options, "--stop-after", str(steps // 2)], halves, (deadline - time.monotonic()) / 2, 0),
            train_run([*options, "--resume"], halves, deadline - time.monotonic(), 0)]
    result = dict(steps=steps, resumed_at=steps // 2, runs=[{k: v for k, v in r.items() if k != "tail"} for r in runs])
    failed = [r for r in runs if r["returncode"] != 0]
    if failed:
        return dict(result, error=failed[0]["error"], tail=failed[0]["tail"])
    losses = {name: {r["step"]: r["loss"] for r in read_log(d) if r["step"] > steps // 2}
              for name, d in (("whole", whole), ("halves", halves))}
    a, b = (flat_tensors(torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True)) for d in (whole, halves))
    unequal = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    worst = max((relative_difference(a[k], b[k]) for k in unequal if k in a and k in b and a[k].shape == b[k].shape),
                default=None)
    losses_equal = losses["whole"] == losses["halves"] and len(losses["whole"]) == steps - steps // 2
    return dict(result, losses=losses, losses_equal=losses_equal, tensors=len(a), unequal_tensors=len(unequal),
                unequal_names=unequal[:5], worst_relative_difference=worst,
                equal=losses_equal and not unequal and len(a) > 0)


def relative_difference(x, y):
    x, y = x.double(), y.double()
    return ((x - y).abs().max() / x.abs().max().clamp_min(1e-300)).item()


def flat_tensors(tree, prefix=""):
    """{path: tensor} of every tensor in a checkpoint's nested dicts and lists."""
    import torch

    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in flat_tensors(value, f"{prefix}/{key}").items()}


def accepted(train, options):
    """None if train.py takes these options, else its one-line complaint."""
    import checks

    try:
        checks.check_options(train.parse_args(options))
    except (train.Usage, SystemExit) as e:
        return str(e)
    return None


def activation_ledger(options, device):
    """The layers' saved bytes, measured on this device (ledgers.measure_activation_bytes) beside
    the ledger's prediction (ledgers.layer_activation_bytes), for the training runs' shape: each
    attention, kernels on and off."""
    import torch

    import ledgers
    import nanosp
    import train

    args = train.parse_args(options)
    cfg = train.model_config(args, None, None, None)
    B, T, dtype = args.batch_size, args.seq_len, torch.bfloat16
    rows = []
    for attention in nanosp.ATTENTIONS:
        predicted = cfg.n_layer * ledgers.layer_activation_bytes(T, B, cfg.n_embd, cfg.n_head, 1, False, "none",
                                                                 cfg.dropout > 0, dtype.itemsize, attention=attention)
        for fused in (True, False):
            variant = dataclasses.replace(cfg, fused_kernels=fused, attention=attention)
            measured, _ = ledgers.measure_activation_bytes(variant, None, B, T, dtype, device=device,
                                                           paper_bytes=False, n_layer=cfg.n_layer)
            ops = "kernels.py" if nanosp.ops_for(torch.empty(0, device=device), variant) is not nanosp.REFERENCE_OPS \
                else "nanosp"
            rows.append(dict(attention=attention, fused_kernels=fused, ops=ops, measured=measured, predicted=predicted))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def with_rates(run, setup):
    """A timed run on a GPU with its MFU, of the measured bf16 rate and of the datasheet's, and its
    peak memory cut into static bytes (bf16 weights, float32 masters and AdamW state: 14 per
    parameter), the ledger's activations, and the rest."""
    if setup["device"] != "cuda" or "tokens_per_s" not in run:
        return run
    flops = run["tokens_per_s"] * setup["flops_per_token"]
    measured, sheet = setup["measured_bf16_TFLOPs"], setup["datasheet_bf16_TFLOPs"]
    static = 14 * setup["parameters"]
    return dict(run, mfu=measured and flops / (measured * 1e12), mfu_datasheet=sheet and flops / (sheet * 1e12),
                static_bytes=static, rest_bytes=run["mem_bytes"] - static - run["activation_bytes"])


def part_training(rec, p):
    import torch

    import ledgers
    import nanosp
    import train

    cuda = torch.cuda.is_available()
    if not cuda and not p.dry:
        rec["skipped"] = "no CUDA device (GPT-2 on a CPU would take hours; --dry-run trains a tiny model there)"
        return
    sizes = TRAIN["dry" if p.dry else "full"]
    data = training_data(p.scratch)
    base = [*sizes["options"], *COMMON, "--device", "cuda" if cuda else "cpu", "--data", str(data)]
    resume_base = [*sizes["resume"], *COMMON, "--device", "cuda" if cuda else "cpu", "--data", str(data)]
    args = train.parse_args(base)
    cfg = train.model_config(args, None, None, None)
    T = args.seq_len
    flops_per_token = ledgers.exact_training_flops(1, cfg.n_layer, T, cfg.n_embd, cfg.vocab_size) / T
    name = (p.env("device") or {}).get("name", "")
    parameters = sum(math.prod(shape) for shape in nanosp.GPT(cfg).full_shapes().values())
    rec["setup"] = dict(options=base, device="cuda" if cuda else "cpu", flops_per_token=flops_per_token,
                        parameters=parameters, measured_bf16_TFLOPs=p.env(("matmul", "TFLOPs")),
                        datasheet_bf16_TFLOPs=next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None))
    print(f"training: {' '.join(base)}", flush=True)
    runs = {}
    for i, (label, extra) in enumerate(VARIANTS):
        if i == 4:
            rec.attempt("resume", resume_check, resume_base, p.scratch, min(p.left() - 30, 150))
            print(f"resume: equal {rec['resume'].get('equal')}", flush=True)
        complaint = accepted(train, [*base, *extra])
        if complaint:
            runs[label] = dict(skipped=f"train.py does not take {' '.join(extra)}: {complaint}")
        elif p.dry:  # the resume check's runs are the dry run's training
            runs[label] = dict(skipped="dry run: train.py accepts these options; not run")
        elif p.left() < 40:
            runs[label] = dict(skipped=f"out of time ({p.left():.0f} s left)")
        else:
            out_dir = p.scratch / f"train-{i}"
            limit = min(p.left() - 20, 200 if "--compile" in extra else 90)
            runs[label] = with_rates(train_run([*base, *extra], out_dir, limit, sizes["skip"]), rec["setup"])
            shutil.rmtree(out_dir, ignore_errors=True)  # a GPT-2 checkpoint is 1.5 GB
        rec["runs"] = runs
    rec.attempt("ledger", activation_ledger, base, "cuda" if cuda else "cpu")


PART_FUNCTIONS = dict(env=part_env, kernels=part_kernels, equivalence=part_equivalence, kernel_bench=part_kernel_bench,
                      training=part_training)


# ----------------------------------------------------------------------------------------------
# the report: targets, tables


def fmt(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def table(headers, rows):
    return ["", "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers),
            *("| " + " | ".join(str(x) for x in row) + " |" for row in rows)]


def target(what, value, met, measured):
    """One row of the targets table: met is True / False, or None when it was not measured."""
    return dict(target=what, value=value, met=bool(met) if measured else None)


def targets(parts):
    """The targets nanosp set itself on a GPU, each met, missed or not measured (without CUDA)."""
    res = {name: part.get("result", {}) for name, part in parts.items()}
    out = []
    cases = res.get("equivalence", {}).get("cases", [])
    if cases:
        results = [c.get("result", {}) for c in cases]
        worst = max((max(r["errors"].values()) / c["tolerance"] for c, r in zip(cases, results) if "errors" in r),
                    default=None)
        through_kernels = all(r.get("ops") == "kernels.py" for c, r in zip(cases, results) if c["dtype"] != "float64")
        out.append(target("the CUDA-mode proof within its tolerances, float32 and bfloat16 through kernels.py",
                          f"{sum(map(case_ok, cases))}/{len(cases)} cases; worst {fmt(worst, '.2f')} of its "
                          f"tolerance{'' if through_kernels else '; not through kernels.py'}",
                          all(map(case_ok, cases)) and through_kernels,
                          res["equivalence"]["setup"]["device"] == "cuda"))
    tests = res.get("kernels", {}).get("tests")
    if tests:
        counts = tests["counts"]
        clean = tests["returncode"] == 0 and counts.get("passed") and not set(counts) - {"passed", "deselected"}
        out.append(target("test_kernels.py's CUDA tests pass, none skipped", tests["closing"], clean,
                          res.get("env", {}).get("cuda_available")))
    rows = res.get("kernel_bench", {}).get("rows", [])
    of_copy = [r["of_copy"] for r in rows]
    vs_compile = [r["vs_compile"] for r in rows if r.get("vs_compile") is not None]
    out.append(target("every kernel >= 85% of copy bandwidth", f"lowest {fmt(min(of_copy, default=None), '.2f')}",
                      min(of_copy, default=0) >= 0.85, rows))
    out.append(target("every kernel >= 1.0x torch.compile of its definition", f"lowest "
                      f"{fmt(min(vs_compile, default=None), '.2f')}x", min(vs_compile, default=0) >= 1.0, vs_compile))
    training = res.get("training", {})
    on_gpu = training.get("setup", {}).get("device") == "cuda"
    rate = {label: run.get("tokens_per_s") for label, run in training.get("runs", {}).items()}
    for attention in ("written-out", "fused"):
        on, off = rate.get(f"{attention} attention, kernels on"), rate.get(f"{attention} attention, kernels off")
        ratio = on / off if on and off else None
        out.append(target(f"{attention} attention: kernels on >= 1.15x kernels off, training tokens/s",
                          f"{fmt(ratio, '.2f')}x", ratio and ratio >= 1.15, on_gpu and ratio))
    fused = training.get("runs", {}).get("fused attention, kernels on", {})
    mfu = fused.get("mfu")
    out.append(target("GPT-2 small, T=1024, bf16, fused attention + kernels >= 40% MFU (of the measured bf16 rate)",
                      fmt(mfu, ".1%"), mfu and mfu >= 0.40, on_gpu and mfu))
    compiled = rate.get("fused attention, torch.compile of nanosp's ops")
    ratio = fused.get("tokens_per_s") / compiled if fused.get("tokens_per_s") and compiled else None
    out.append(target("... and >= 1.0x the same model under torch.compile", f"{fmt(ratio, '.2f')}x",
                      ratio and ratio >= 1.0, on_gpu and ratio))
    resume = training.get("resume", {})
    value = ("equal" if resume.get("equal") else resume.get("error") or f"{resume.get('unequal_tensors')} tensors "
             f"differ (worst {fmt(resume.get('worst_relative_difference'), '.1e')})") if resume else "-"
    out.append(target("a bf16 resume on CUDA equal to the uninterrupted run, bit for bit", value, resume.get("equal"),
                      on_gpu and resume))
    return out


def markdown(results):
    meta, parts = results["meta"], results["parts"]
    env = parts.get("env", {}).get("result", {})
    v, device = env.get("versions", {}), env.get("device") or {}
    driver = (env.get("nvidia_smi") or [{}])[0].get("driver_version")
    memory = device.get("memory_bytes")
    lines = [f"# nanosp GPU check: {device.get('name', 'no CUDA device')}, {meta['started'][:10]}", "",
             f"`{meta['command']}`: {meta['seconds']:.0f} s{' (a dry run)' if meta['dry_run'] else ''}; sources "
             f"{meta['sources']}. {meta.get('note', '')}"]
    lines += table(["", ""], [
        ("device", f"{device.get('name', '-')}, compute capability {device.get('capability', '-')}, "
                   f"{device.get('multiprocessors', '-')} SMs, {fmt(memory and memory / 2**30, '.0f')} GiB"),
        ("driver; Python; torch; CUDA; cuDNN; Triton", f"{driver}; {v.get('python')}; {v.get('torch')}; "
                                                        f"{v.get('torch_cuda')}; {v.get('cudnn')}; {v.get('triton')}"),
        ("nvcc", f"{v.get('nvcc_version')} ({v.get('nvcc')})"),
        ("device-to-device copy, read + write", f"{fmt(env.get('copy', {}).get('GBps'), ',.0f')} GB/s"),
        (f"bf16 matmul, n = {env.get('matmul', {}).get('n', '-')}",
         f"{fmt(env.get('matmul', {}).get('TFLOPs'), ',.1f')} TFLOP/s")])
    lines += ["", "## Parts", *table(["part", "status", "seconds", "error"], [
        (name, p["status"], f"{p['seconds']:.0f}", p.get("error") or p.get("skipped", ""))
        for name, p in parts.items()])]
    lines += ["", "## Targets", *table(["target", "measured", "met"], [
        (t["target"], t["value"], "-" if t["met"] is None else "met" if t["met"] else "MISSED")
        for t in targets(parts)])]
    res = {name: part.get("result", {}) for name, part in parts.items()}
    for name, report in (("kernels", report_kernels), ("equivalence", report_equivalence),
                         ("kernel_bench", report_kernel_bench), ("training", report_training)):
        if res.get(name) and "skipped" not in res[name]:
            lines += report(res[name])
    return "\n".join(lines) + "\n"


def report_kernels(r):
    build, tests = r.get("build", {}), r.get("tests", {})
    built = build.get("skipped") or build.get("error") or f"{build.get('built')}, {fmt(build.get('seconds'), '.0f')} s"
    return ["", "## 2. kernels.py", "", f"Built: {built}. `{tests.get('command')}`: {tests.get('closing')}", "",
            *(f"- {line}" for line in tests.get("failures", []))]


def report_equivalence(r):
    setup = r.get("setup", {})
    lines = ["", f"## 3. Equivalence on {setup.get('device')}, t = 2 over {setup.get('backend_t2')}"
             + (", staged through host memory" if setup.get("staged_through_host") else "")]
    rows = []
    for c in r.get("cases", []):
        result = c.get("result", {})
        e = result.get("errors", {})
        rows.append((c["dtype"], c["t"], c["sequence_parallel"], c["recompute"], c["attention"], c["T"],
                     result.get("ops", "-"), fmt(e.get("logits"), ".1e"), fmt(e.get("loss"), ".1e"),
                     f"{fmt(e.get('grad'), '.1e')} ({result.get('worst_grad', '-')})", fmt(e.get("weights"), ".1e"),
                     f"{c['tolerance']:.1e}", "yes" if case_ok(c) else result.get("error", "NO")))
    return lines + table(["dtype", "t", "SP", "recompute", "attention", "T", "ops", "logits", "loss", "grad (worst)",
                          "weights", "tolerance", "ok"], rows)


def report_kernel_bench(r):
    rows = [(x["model"], x["op"], x["phase"], tuple(x["shape"]), f"{x['ms']:.3f}", f"{x['GBps']:,.0f}",
             f"{x['of_copy']:.2f}", fmt(x.get("of_large_copy"), ".2f"), f"{x['vs_eager']:.2f}x",
             f"{fmt(x.get('vs_compile'), '.2f')}x") for x in r.get("rows", [])]
    return ["", "## 4. Fused kernels, bf16 (bench.py 5b; of copy: of a copy of the op's size)",
            *table(["model", "op", "pass", "shape", "ms", "GB/s", "of copy", "of part 1's copy", "vs eager",
                    "vs compile"], rows), "", *(f"- {note}" for note in r.get("notes", []))]


def report_training(r):
    setup = r.get("setup", {})
    lines = ["", "## 5. Training", "", f"`train.py {' '.join(setup.get('options', []))}`. MFU: the model's FLOPs "
             f"(ledgers.exact_training_flops, {fmt(setup.get('flops_per_token'), ',.0f')} per token) per second over "
             f"the measured bf16 matmul rate ({fmt(setup.get('measured_bf16_TFLOPs'), ',.0f')} TFLOP/s) and over the "
             f"datasheet's ({fmt(setup.get('datasheet_bf16_TFLOPs'), ',.0f')}). Memory: the peak of a step; static = "
             f"bf16 weights, float32 masters and AdamW state (14 bytes x {setup.get('parameters', 0):,} parameters); "
             "the ledger's activations; the rest (logits and loss in float32, gradients in flight)."]
    rows = []
    for label, run in r.get("runs", {}).items():
        if "tokens_per_s" not in run:
            rows.append((label, *[""] * 9, run.get("skipped") or run.get("error", "")))
            continue
        mib = {k: fmt(run.get(k) and run[k] / 2**20, ",.0f") for k in ("mem_bytes", "static_bytes", "activation_bytes",
                                                                        "rest_bytes")}
        rows.append((label, run["ops"], f"{run['tokens_per_s']:,.0f}", f"{run['ms']:.1f}", fmt(run.get("mfu"), ".1%"),
                     fmt(run.get("mfu_datasheet"), ".1%"), *mib.values(), run.get("error", "")))
    lines += table(["run", "ops", "tokens/s", "ms/step", "MFU", "MFU (datasheet)", "peak MiB", "static MiB",
                    "activations MiB", "rest MiB", "error"], rows)
    resume = r.get("resume", {})
    if resume:
        lines += ["", f"Resume, bf16, dropout 0.1: {resume.get('steps')} steps in one run against "
                  f"{resume.get('resumed_at')}, stopped, then resumed: losses equal {resume.get('losses_equal')}, "
                  f"{resume.get('tensors')} checkpoint tensors, {resume.get('unequal_tensors')} unequal "
                  f"{resume.get('unequal_names', '')}: "
                  f"**{'equal' if resume.get('equal') else 'NOT equal'}** {resume.get('error', '')}"]
    if isinstance(r.get("ledger"), list):
        lines += ["", "The layers' saved activations measured on the device beside the ledger's prediction:"]
        lines += table(["attention", "fused_kernels", "ops", "measured MiB", "predicted MiB", "ratio"], [
            (x["attention"], x["fused_kernels"], x["ops"], f"{x['measured'] / 2**20:,.1f}",
             f"{x['predicted'] / 2**20:,.1f}", f"{x['measured'] / x['predicted']:.3f}") for x in r["ledger"]])
    return lines


# ----------------------------------------------------------------------------------------------
# the parts, each in a process of its own


def sources():
    """A short hash of the files the check runs, to say which version of nanosp it measured."""
    h = hashlib.sha256()
    for f in sorted(ROOT.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def run_parts(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 16 << 30 else None
    scratch = Path(tempfile.mkdtemp(prefix="nanosp-gpu-check-", dir=tmp))
    prepare_environment(scratch)
    parts, started = args.parts.split(","), time.monotonic()
    command = " ".join([os.path.basename(sys.executable), "gpu_check.py", *sys.argv[1:]])
    results = dict(meta=dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             command=command, dry_run=args.dry_run, budget_s=args.budget, host=socket.gethostname(),
                             sources=sources(), seconds=0.0), parts={})
    scale, spare = args.budget / sum(SHARES[p] for p in parts), 0.0
    with open(out / "gpu_check.log", "w") as log:
        for i, name in enumerate(parts):
            limit = min(SHARES[name] * scale + spare, args.budget - (time.monotonic() - started))
            print(f"\n== part {i + 1}/{len(parts)}: {name} (limit {limit:.0f} s)", flush=True)
            log.write(f"\n== part {i + 1}/{len(parts)}: {name} (limit {limit:.0f} s)\n")
            results["parts"][name] = part = run_part(name, limit, args, scratch, results, log)
            spare = max(0.0, limit - part["seconds"])
            cuda = results["parts"].get("env", {}).get("result", {}).get("cuda_available")
            if name == "kernels" and cuda and not part["result"].get("build", {}).get("built"):  # or each process
                # of the parts after it would try to build it again
                os.environ["NANOSP_KERNELS"] = "0"
                results["meta"]["note"] = "kernels.py did not build: the parts after it ran with NANOSP_KERNELS=0"
            results["meta"]["seconds"] = time.monotonic() - started
            write_report(out, results)
            print(f"== {name}: {part['status']} in {part['seconds']:.0f} s {part.get('error', '')}", flush=True)
            log.write(f"== {name}: {part['status']} in {part['seconds']:.0f} s {part.get('error', '')}\n")
    shutil.rmtree(scratch, ignore_errors=True)
    report = (out / "gpu_check.md").read_text()  # the summary last: what a terminal, or a reply, shows
    print("\n" + report[:report.find("\n## ", report.find("## Targets") + 1)] if "## Targets" in report else report)
    print(f"wrote {', '.join(str(out / f) for f in FILES)}")


def run_part(name, limit, args, scratch, results, log):
    """One part in its own process under `limit` seconds; its record, status and error."""
    env = results["parts"].get("env", {}).get("result", {})
    start = time.monotonic()
    if name == "kernel_bench" and env.get("cuda_available") is False:
        return dict(status="skipped", seconds=0.0, skipped="no CUDA device", result={"skipped": "no CUDA device"})
    context = scratch / "context.json"
    context.write_text(json.dumps(results["parts"], default=str))
    cmd = [sys.executable, str(ROOT / "gpu_check.py"), "--part", name, "--scratch", str(scratch), "--context",
           str(context), "--time-limit", str(limit), "--backend", args.backend, *["--dry-run"] * args.dry_run]
    code, lines = stream(cmd, limit, prefix=f"[{name}] ", log=log)
    path = scratch / f"part-{name}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    part = dict(seconds=time.monotonic() - start, returncode=code, result=record)
    if code is None:
        part.update(status="timed out", error=f"stopped at its limit of {limit:.0f} s; what it measured before is kept")
    elif code != 0 or "error" in record:
        part.update(status="failed", error=record.get("error") or (lines[-1] if lines else f"exit code {code}"),
                    tail=lines[-30:])
    elif "skipped" in record:
        part.update(status="skipped", skipped=record["skipped"])
    else:
        part.update(status="ok")
    return part


def write_report(out, results):
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results))


def run_part_here(args):
    """The body of a part's process."""
    rec = Record(Path(args.scratch) / f"part-{args.part}.json")
    context = json.loads(Path(args.context).read_text()) if args.context else {}
    p = Part(args.dry_run, time.monotonic() + args.time_limit - 5, context, Path(args.scratch), args.backend)
    try:
        PART_FUNCTIONS[args.part](rec, p)
    except Exception as e:
        traceback.print_exc()
        rec["traceback"] = traceback.format_exc()[-4000:]
        rec["error"] = one_line(e)
        return 1
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the directory for gpu_check.json, gpu_check.md and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: the check of the check, anywhere")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"a comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget", type=float, help="seconds for all the parts (default 540; 600 in a dry run)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="part 3's t = 2: auto = NCCL with a GPU per rank when there are 2, else gloo on one")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--time-limit", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part is None and args.out is None:
        parser.error("--out DIR is needed")
    unknown = [name for name in args.parts.split(",") if name not in PARTS]
    if unknown:
        parser.error(f"--parts {args.parts}: there is no part {unknown[0]!r}; the parts are {','.join(PARTS)}")
    if args.budget is None:
        args.budget = 600.0 if args.dry_run else 540.0
    return args


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(run_part_here(arguments) if arguments.part else run_parts(arguments))
