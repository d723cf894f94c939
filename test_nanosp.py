"""nanosp's proof: the sharded model computes what the unsharded one does.

One world of 4 CPU processes (gloo) is started once per session; its sub-groups give t = 1, 2, 3
and 4. Hypothesis draws configurations in this process and every rank runs each case; a rank
compares its own sharded model against an unsharded model it builds itself from the same seed.
That twin is nanosp too, so the proof is also held to an outside reference: transformers'
GPT2LMHeadModel and F.cross_entropy on the same weights, computed in this process (dropout 0).

Tolerances: float64 comparisons are relative to the largest reference element and must be under
1e-10 (what remains is reduction order, ~1e-15). Byte and FLOP counts are exact integers and are
compared exactly, except activation bytes against the paper's formula (3%, LayerNorm statistics).
"""
import itertools
import math
import os
import socket
import traceback
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kernels
import ledgers
import nanosp
from nanosp import GPT, GPTConfig

WORLD = 4
TOL = 1e-10  # float64, relative to the largest reference element
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


# ----------------------------------------------------------------------------------------------
# the process world


class Context:
    """What a task sees on its rank: the rank, and the sub-group of each size t it belongs to."""

    def __init__(self, rank):
        self.rank, self.groups = rank, {}
        for t in (1, 2, 3, 4):  # every rank creates every group, in the same order
            for start in range(0, WORLD - t + 1, t):
                ranks = list(range(start, start + t))
                group = dist.new_group(ranks)
                if rank in ranks:
                    self.groups[t] = group

    def group(self, t):
        """The group of size t holding this rank, or None if there is none (rank 3 for t = 3)."""
        return self.groups.get(t)


def _worker(rank, port, conn):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    ctx = Context(rank)
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, kwargs = message
        try:
            conn.send(("ok", fn(ctx, **kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class World:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spawn = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = spawn.Pipe()
            proc = spawn.Process(target=_worker, args=(rank, port, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, fn, **kwargs):
        """Run fn(ctx, **kwargs) on every rank; return the list of results by rank."""
        for conn in self.conns:
            conn.send((fn, kwargs))
        results = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(180):
                self.close()
                raise TimeoutError(f"rank {rank} did not answer in 180 s (a collective hung)")
            status, value = conn.recv()
            if status == "error":
                raise AssertionError(f"rank {rank} raised:\n{value}")
            results.append(value)
        return results

    def close(self):
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="session")
def world():
    w = World()
    yield w
    w.close()


# ----------------------------------------------------------------------------------------------
# helpers that run on a rank


def rel_err(a, b):
    """max |a - b| relative to max |b|; a NaN anywhere is an infinite error (max() over errors would skip a NaN)."""
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
    return math.inf if math.isnan(err) else err


def random_full_state_dict(model, seed):
    """Every parameter random, LayerNorm weights and biases included, so no bug hides behind 1s and 0s."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
            for name, shape in model.full_shapes().items()}


def make_batch(cfg, batch, seq, seed, ignore=True):
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    if ignore:
        targets[0, 0] = -1  # ignored positions must not count
    return idx, targets


def unsharded_twin(cfg):
    """The reference: unsharded, no recomputation, the core attention written out."""
    plain = GPTConfig(**{**cfg.__dict__, "sequence_parallel": False, "recompute": "none", "attention": "explicit"})
    return GPT(plain).double()


def sharded_and_twin(ctx, t, case):
    """(cfg, batch, seq, the t-way model, its unsharded twin) for a drawn case, both with the same
    random weights; None on a rank outside every group of size t (rank 3 for t = 3)."""
    group = ctx.group(t)
    if group is None:
        return None
    case = dict(case)
    batch, seq = case.pop("batch"), case.pop("seq")
    cfg = GPTConfig(**case)
    model, reference = GPT(cfg, group).double(), unsharded_twin(cfg)
    sd = random_full_state_dict(reference, cfg.seed)
    model.load_full_state_dict(sd)
    reference.load_full_state_dict(sd)
    return cfg, batch, seq, model, reference


@st.composite
def configurations(draw):
    t = draw(st.sampled_from([1, 2, 3, 4]))
    sp = draw(st.booleans())
    n_head = t * draw(st.integers(1, 2))
    seq = t * draw(st.integers(1, 3)) if sp else draw(st.integers(1, 9))
    n_layer = draw(st.integers(1, 3))
    mode = st.sampled_from(nanosp.RECOMPUTE_MODES)
    recompute = draw(mode | st.lists(mode, min_size=n_layer, max_size=n_layer))  # one for all, or per layer
    attention = draw(st.sampled_from(nanosp.ATTENTIONS))
    return dict(
        t=t, sequence_parallel=sp, recompute=recompute, attention=attention,  # sdpa takes no dropout
        dropout=0.0 if attention == "sdpa" else draw(st.sampled_from([0.0, 0.2])), batch=draw(st.integers(1, 3)),
        seq=seq, block_size=seq + draw(st.integers(0, 3)), n_head=n_head,
        # n_embd >= 4: a LayerNorm over 2 features outputs +-1 (up to its eps) whatever its input, so the
        # gradients below it are cancellations, which two different attention kernels round differently
        n_embd=n_head * draw(st.sampled_from([2, 4, 8] if n_head > 1 else [4, 8])),
        vocab_size=draw(st.integers(3, 37)),  # many not divisible by t
        n_layer=n_layer, bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


# ----------------------------------------------------------------------------------------------
# equivalence


def task_equivalence(ctx, t, steps=2, **case):
    """Logits, loss and every gradient (gathered) of the t-way model against the unsharded model,
    then the full weights after `steps` AdamW steps. Returns the worst relative errors."""
    built = sharded_and_twin(ctx, t, case)
    if built is None:
        return None
    cfg, batch, seq, model, reference = built
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1)
    idx, targets = make_batch(cfg, batch, seq, cfg.seed)
    errors = {"logits": 0.0, "loss": 0.0, "grad": 0.0, "weights": 0.0}
    for _ in range(steps):
        logits, _ = model(idx)
        logits_ref, _ = reference(idx)
        assert logits.shape == logits_ref.shape == (batch, seq, cfg.vocab_size)
        errors["logits"] = max(errors["logits"], rel_err(logits, logits_ref))
        _, loss = model(idx, targets)
        _, loss_ref = reference(idx, targets)
        errors["loss"] = max(errors["loss"], rel_err(loss, loss_ref))
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        grads_ref = {n: p.grad for n, p in reference.named_parameters()}
        for name, p in model.named_parameters():
            errors["grad"] = max(errors["grad"], rel_err(model.full_tensor(name, p.grad), grads_ref[name]))
        opt.step()
        opt_ref.step()
    full, full_ref = model.full_state_dict(), reference.full_state_dict()
    errors["weights"] = max(rel_err(full[n], full_ref[n]) for n in full_ref)
    return errors


@settings(max_examples=int(os.environ.get("NANOSP_EXAMPLES", 60)))
@given(case=configurations())
def test_sharded_model_equals_unsharded(world, case):
    results = [r for r in world.run(task_equivalence, **case) if r is not None]
    assert results
    for errors in results:
        for what, err in errors.items():
            assert err < TOL, f"{what}: relative error {err:.2e} for {case}"


def task_input_gradients(ctx, t, sequence_parallel, recompute):
    """The gradient reaching each layer's input (the residual stream), not only the weights'
    gradients, equals the unsharded model's; under SP each rank holds its rows of it."""
    group = ctx.group(t)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16, dropout=0.2,
                    sequence_parallel=sequence_parallel, recompute=recompute)
    grads = []
    for model in (unsharded_twin(cfg), GPT(cfg, group).double()):
        model.load_full_state_dict(random_full_state_dict(model, 3))
        inputs = []

        def keep_input(module, args):
            args[0].retain_grad()
            inputs.append(args[0])

        for block in model.h:
            block.register_forward_pre_hook(keep_input)
        idx, targets = make_batch(cfg, 2, 8, 3)
        model(idx, targets)[1].backward()
        grads.append([x.grad for x in inputs])
    r = nanosp.group_rank(group)
    rows = slice(r * 8 // t, (r + 1) * 8 // t) if sequence_parallel else slice(None)
    assert all(g is not None for g in grads[1])
    return max(rel_err(g, g_ref[rows]) for g, g_ref in zip(grads[1], grads[0]))


@pytest.mark.parametrize("recompute", nanosp.RECOMPUTE_MODES)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_input_gradients(world, sequence_parallel, recompute):
    errors = world.run(task_input_gradients, t=4, sequence_parallel=sequence_parallel, recompute=recompute)
    assert max(errors) < TOL


def task_conjugate_pairs(ctx):
    """Each of the four operators against its definition, forward and backward, on a world of 4.
    Rank r holds x_r; the sums and concatenations are written out by hand here."""
    group, t, r = ctx.group(4), 4, ctx.rank
    xs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(t)]
    gs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64) for i in range(t)]
    shard = slice(2 * r, 2 * r + 2)
    cases = {  # name: (operator, input, upstream grad, expected output, expected input grad)
        "f": (nanosp.f, xs[r], gs[r], xs[r], sum(gs)),
        "f_bar": (nanosp.f_bar, xs[r], gs[r], sum(xs), gs[r]),
        "g": (nanosp.g, xs[r][shard], gs[r], torch.cat([x[2 * i:2 * i + 2] for i, x in enumerate(xs)]),
                  sum(gs)[shard]),
        "g_bar": (nanosp.g_bar, xs[r], gs[r][shard], sum(xs)[shard],
                  torch.cat([g[2 * i:2 * i + 2] for i, g in enumerate(gs)])),
    }
    errors = {}
    for name, (op, x, g, y_expected, grad_expected) in cases.items():
        x = x.clone().requires_grad_()
        y = op(x, group)
        y.backward(g)
        errors[name] = max(rel_err(y, y_expected), rel_err(x.grad, grad_expected))
    return errors


def test_conjugate_pairs(world):
    for errors in world.run(task_conjugate_pairs):
        assert max(errors.values()) < TOL, errors


# ----------------------------------------------------------------------------------------------
# an outside reference: transformers' GPT-2 on the same weights
#
# The unsharded twin above is nanosp itself, so a mistake that both share (in the loss, say) would
# cancel. Here the reference is transformers' GPT2LMHeadModel in float64 (eager attention, dropout
# 0: its dropout cannot draw nanosp's hashed masks) and F.cross_entropy, computed in this process;
# the ranks compare their logits, loss and every gathered gradient with it.

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2: (in, out)


def transformers_reference(cfg, sd, idx, targets, ignore_index):
    """GPT2LMHeadModel with nanosp's full state dict `sd` (zero biases where cfg.bias is False):
    its logits, F.cross_entropy(logits, targets, ignore_index=ignore_index) and the gradient of
    that loss for every entry of sd, in nanosp's names and layouts. The head is tied to wte, so
    wte's gradient holds both of its uses, as nanosp's does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these sizes take milliseconds; more threads on a busy machine only spin
    try:
        return _transformers_reference(cfg, sd, idx, targets, ignore_index)
    finally:
        torch.set_num_threads(threads)


def _transformers_reference(cfg, sd, idx, targets, ignore_index):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, attn_implementation="eager")).double()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    names = {}  # nanosp's name -> transformers' parameter
    with torch.no_grad():
        for name, p in hf.named_parameters():  # the tied lm_head.weight is listed once, as wte's
            key = name.removeprefix("transformer.")
            if key in sd:
                p.copy_(sd[key].T if key.endswith(CONV1D) else sd[key])
                names[key] = p
            else:
                assert not cfg.bias and key.endswith(".bias"), key
                p.zero_()
    assert names.keys() == sd.keys()
    logits = hf(idx).logits  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
    loss.backward()
    grads = {key: p.grad.T if key.endswith(CONV1D) else p.grad for key, p in names.items()}
    return logits.detach(), loss.detach(), grads


@st.composite
def transformers_cases(draw):
    """configurations() without dropout, with a share of ignored targets (nanosp's -1 or PyTorch's
    -100, at least one position kept), and sometimes logits in the thousands, where a loss that did
    not shift by the true maximum over the whole vocabulary would overflow exp or lose every term.
    n_embd >= 4: a LayerNorm over 2 features is flat up to its eps (it outputs +-1), so every
    gradient behind ln_f is 1e-7 of the others and made by cancellation, and two correct
    implementations differ there by 1e-10 of it (the nanosp twin above shares nanosp's rounding)."""
    case = {**draw(configurations().filter(lambda case: case["n_embd"] >= 4)), "dropout": 0.0}
    ignore_index = draw(st.sampled_from([-1, -100]))
    ignored = draw(st.lists(st.booleans(), min_size=case["batch"] * case["seq"], max_size=case["batch"] * case["seq"]))
    ignored[draw(st.integers(0, len(ignored) - 1))] = False
    return case, ignore_index, ignored, draw(st.sampled_from([1.0, 1000.0]))


def sequence_parallel_case(t, recompute, **changes):
    """A fixed case at t with SP: 3 layers (so recompute can mix modes), vocab 11 padded at t = 2, 3, 4."""
    return dict(t=t, sequence_parallel=True, recompute=recompute, dropout=0.0, batch=2, seq=2 * t, block_size=2 * t + 1,
                n_head=t, n_embd=4 * t, vocab_size=11, n_layer=3, bias=True, seed=t, **changes)


MIXED = ("full", "selective", "none")
# besides the drawn cases: t = 2 and 4 with SP under each recompute mode and a per-layer mix
SP_CASES = [sequence_parallel_case(t, recompute) for t in (2, 4) for recompute in (*nanosp.RECOMPUTE_MODES, MIXED)]


def task_against_transformers(ctx, t, case, sd, idx, targets, want):
    """Rank's logits, loss and every gathered gradient against transformers' (`want`): unsharded
    on rank 0 when t = 1, else the t-way model. Returns the worst relative errors."""
    group = None if t == 1 else ctx.group(t)
    if (t == 1 and ctx.rank) or (t > 1 and group is None):
        return None
    model = GPT(GPTConfig(**case), group).double()
    model.load_full_state_dict(sd)
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    loss.backward()
    logits_want, loss_want, grads_want = want
    errors = {"logits": rel_err(logits, logits_want), "loss": rel_err(loss, loss_want)}
    for name, p in model.named_parameters():
        errors[name] = rel_err(model.full_tensor(name, p.grad), grads_want[name])
    return errors


@settings(max_examples=int(os.environ.get("NANOSP_EXAMPLES", 60)) // 3)
@given(drawn=transformers_cases())
@example(drawn=(SP_CASES[0], -100, [True, False] * 4, 1.0))
@example(drawn=(SP_CASES[1], -1, [False, True, True, False] * 2, 1000.0))
@example(drawn=(SP_CASES[2], -100, [False] * 7 + [True], 1.0))
@example(drawn=(SP_CASES[3], -1, [True] * 7 + [False], 1000.0))
@example(drawn=(SP_CASES[4], -1, [True, False] * 8, 1.0))
@example(drawn=(SP_CASES[5], -100, [False, True, True, False] * 4, 1000.0))
@example(drawn=(SP_CASES[6], -1, [False] * 15 + [True], 1.0))
@example(drawn=(SP_CASES[7], -100, [True] * 15 + [False], 1000.0))
def test_loss_and_every_gradient_equal_transformers(world, drawn):
    case, ignore_index, ignored, logit_scale = drawn
    case = dict(case)
    t, batch, seq = case.pop("t"), case.pop("batch"), case.pop("seq")
    cfg = GPTConfig(**case)
    sd = random_full_state_dict(GPT(cfg), cfg.seed)
    for name in ("ln_f.weight", "ln_f.bias"):
        if name in sd:
            sd[name] *= logit_scale  # logits scale with the final LayerNorm's output
    idx, targets = make_batch(cfg, batch, seq, cfg.seed, ignore=False)
    targets[torch.tensor(ignored).view(batch, seq)] = ignore_index
    want = transformers_reference(cfg, sd, idx, targets, ignore_index)
    results = [r for r in world.run(task_against_transformers, t=t, case=case, sd=sd, idx=idx, targets=targets,
                                    want=want) if r is not None]
    assert len(results) == (1 if t == 1 else WORLD // t * t)  # every rank of every group of size t
    for errors in results:
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f"{worst}: relative error {errors[worst]:.2e} at t={t} for {drawn}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_takes_its_loss_in_float32(dtype):
    """The model in 16 bits: its loss is F.cross_entropy of its own (16-bit) logits taken in
    float32, to float32's precision (1e-5), not to 16 bits' (1e-2), and it is a float32."""
    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg).to(dtype)
    model.load_full_state_dict(random_full_state_dict(model, 5))
    idx, targets = make_batch(cfg, 3, 16, 5)
    with torch.no_grad():
        loss, logits = model(idx, targets)[1], model(idx)[0]
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert loss.dtype == torch.float32 and abs(loss - want) <= 1e-5 * want


# ----------------------------------------------------------------------------------------------
# a loss of the user's own on the gathered logits


def task_logits_backward(ctx, t, **case):
    """Without targets the logits are gathered over the vocabulary; a loss written on them
    backpropagates through the gather. First a random cotangent (the same on every rank, as the
    logits are), then a distillation loss, KL(teacher || softmax(logits)): every gradient of
    the t-way model against the unsharded model's."""
    built = sharded_and_twin(ctx, t, case)
    if built is None:
        return None
    cfg, batch, seq, model, reference = built
    idx, _ = make_batch(cfg, batch, seq, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    cotangent = torch.randn(batch, seq, cfg.vocab_size, generator=gen, dtype=torch.float64)
    teacher = torch.randn(batch, seq, cfg.vocab_size, generator=gen, dtype=torch.float64).softmax(-1)
    losses = {"cotangent": lambda logits: (logits * cotangent).sum(),
              "distillation": lambda logits: (teacher * (teacher.log() - logits.log_softmax(-1))).sum(-1).mean()}
    errors = {}
    for what, loss_of in losses.items():
        for m in (model, reference):
            m.zero_grad()
            loss_of(m(idx)[0]).backward()
        grads_ref = dict(reference.named_parameters())
        errors[what] = max(rel_err(model.full_tensor(n, p.grad), grads_ref[n].grad) for n, p in model.named_parameters())
    return errors


@settings(max_examples=int(os.environ.get("NANOSP_EXAMPLES", 60)) // 4)
@given(case=configurations().filter(lambda case: case["t"] > 1))
@example(case={**sequence_parallel_case(2, MIXED), "dropout": 0.2})
@example(case={**sequence_parallel_case(3, "selective"), "dropout": 0.2})
@example(case={**sequence_parallel_case(4, "full"), "dropout": 0.2, "bias": False})
def test_a_loss_on_the_gathered_logits_backpropagates(world, case):
    results = [r for r in world.run(task_logits_backward, **case) if r is not None]
    assert len(results) == WORLD // case["t"] * case["t"]
    for errors in results:
        for what, err in errors.items():
            assert err < TOL, f"{what}: relative error {err:.2e} for {case}"


# ----------------------------------------------------------------------------------------------
# the known traps


def _sp_parameter_grad_errors(ctx, recompute):
    """Two micro-batches accumulate their gradients, as train.py's --grad-accum does; each backward
    sums the replicated parameters' gradients in one all-reduce, counted by the collective log."""
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16, sequence_parallel=True,
                    dropout=0.1, recompute=recompute)
    model, reference = GPT(cfg, ctx.group(4)).double(), unsharded_twin(cfg)
    sd = random_full_state_dict(reference, 1)
    model.load_full_state_dict(sd)
    reference.load_full_state_dict(sd)
    with ledgers.collective_log() as log:
        for micro in range(2):
            idx, targets = make_batch(cfg, 2, 8, micro)
            model(idx, targets)[1].backward()
            reference(idx, targets)[1].backward()
    ref = dict(reference.named_parameters())
    names = ["ln_f.weight", "ln_f.bias", "h.0.ln_1.weight", "h.1.ln_2.bias", "h.0.attn.c_proj.bias",
             "h.1.mlp.c_proj.bias", "wpe.weight"]
    errors = {n: rel_err(dict(model.named_parameters())[n].grad, ref[n].grad) for n in names}
    sums = [n for _, operator, op, n in log if operator == "CopyToTensorParallelRegion.backward"]
    return errors, sums


def task_sp_parameter_grads(ctx, summed, recompute="none"):
    """Under SP, LayerNorm weights (ln_f too), row-parallel biases and the position embedding see
    one sequence shard per rank. With `summed=False` the f that sums their gradients is removed,
    to show this test catches the trap."""
    real = nanosp.replicated_through_f
    if not summed:
        nanosp.replicated_through_f = lambda module, group, sequence_parallel: {}
    try:
        return _sp_parameter_grad_errors(ctx, recompute)
    finally:
        nanosp.replicated_through_f = real


@pytest.mark.parametrize("recompute", nanosp.RECOMPUTE_MODES)
def test_sequence_parallel_parameter_grads_are_summed_once_per_backward(world, recompute):
    replicated = 2 * 6 * 16 + 2 * 16 + 8 * 16  # per layer 2 LayerNorms + 2 biases; ln_f; wpe
    for errors, sums in world.run(task_sp_parameter_grads, summed=True, recompute=recompute):
        assert max(errors.values()) < TOL, errors
        assert sums == [replicated * 8] * 2  # one all-reduce of all of them (float64) per backward


def test_unsummed_sequence_parallel_grads_are_caught(world):
    """The same check without the sum fails: the test has teeth."""
    for errors, sums in world.run(task_sp_parameter_grads, summed=False):
        assert min(errors.values()) > 1e-3 and not sums, errors


def task_padded_vocabulary(ctx):
    """vocab 5 at t = 4 pads to 8 rows, 2 per rank: rank 3 holds only padding. Poison the padding
    rows: logits keep shape (B, T, 5) and logits, loss and gradients stay the unsharded ones."""
    cfg = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=4, n_embd=16)
    model, reference = GPT(cfg, ctx.group(4)).double(), unsharded_twin(cfg)
    sd = random_full_state_dict(reference, 2)
    model.load_full_state_dict(sd)
    reference.load_full_state_dict(sd)
    with torch.no_grad():
        padding = torch.arange(model.wte.start, model.wte.start + model.wte.per_rank) >= cfg.vocab_size
        model.wte.weight[padding] = 1e3
    idx, targets = make_batch(cfg, 2, 8, 2)
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    loss.backward()
    logits_ref, _ = reference(idx)
    _, loss_ref = reference(idx, targets)
    loss_ref.backward()
    grad = model.full_tensor("wte.weight", model.wte.weight.grad)
    return dict(shape=tuple(logits.shape), padding_rows=int(padding.sum()), logits=rel_err(logits, logits_ref),
                loss=rel_err(loss, loss_ref), grad=rel_err(grad, reference.wte.weight.grad),
                padding_grad=model.wte.weight.grad[padding].abs().max().item() if padding.any() else 0.0)


def test_padded_vocabulary_never_reaches_the_loss(world):
    results = world.run(task_padded_vocabulary)
    assert [r["padding_rows"] for r in results] == [0, 0, 1, 2]
    for r in results:
        assert r["shape"] == (2, 8, 5)
        assert max(r["logits"], r["loss"], r["grad"]) < TOL, r
        assert r["padding_grad"] == 0.0


def task_reshard(ctx):
    """Train a step at t = 2, gather weights and AdamW state as train.py's checkpoints hold them
    (train.optimizer_state: unsharded, by name), load them at t = 4 and t = 1 as its resume does
    (train.load_optimizer_state), take the next step there: the same weights as taking both steps
    at t = 2 (and unsharded). The optimizer is train.py's: decay and no-decay groups, so each
    parameter's state must find its place in another order than the model's."""
    import argparse

    import train

    cfg = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=4, n_embd=16, sequence_parallel=True,
                    dropout=0.1)
    idx, targets = make_batch(cfg, 2, 8, 4)
    options = argparse.Namespace(lr=1e-2, weight_decay=0.1)

    def step(model, opt):
        opt.zero_grad()
        model(idx, targets)[1].backward()
        opt.step()

    def start(t, sd=None, opt_state=None, forward_count=0):
        model = GPT(cfg, ctx.group(t) if t > 1 else None).double()
        model.load_full_state_dict(sd or random_full_state_dict(model, 4))
        model.forward_count = forward_count
        opt = train.make_optimizer(dict(model.named_parameters()), options)
        if opt_state is not None:  # reshard the unsharded optimizer state onto this model
            train.load_optimizer_state(model, dict(model.named_parameters()), opt, opt_state)
        return model, opt

    model, opt = start(2)
    step(model, opt)
    opt_full = train.optimizer_state(model, dict(model.named_parameters()), opt)
    sd = model.full_state_dict()
    step(model, opt)
    expected = model.full_state_dict()
    errors = {}
    for t in (2, 4, 1):
        other, other_opt = start(t, sd, opt_full, model.forward_count - 1)
        step(other, other_opt)
        got = other.full_state_dict()
        errors[t] = max(rel_err(got[n], expected[n]) for n in expected)
    return errors


def test_checkpoint_at_one_t_resumes_at_another(world):
    for errors in world.run(task_reshard):
        assert max(errors.values()) < TOL, errors


# ----------------------------------------------------------------------------------------------
# errors


def task_errors(ctx):
    messages = {}
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, n_embd=16, sequence_parallel=True)
    model = GPT(cfg, ctx.group(4))
    for name, fn in [("T % t", lambda: model(torch.zeros(1, 6, dtype=torch.long))),
                     ("n_head % t", lambda: GPT(GPTConfig(n_head=6, n_embd=12), ctx.group(4))),
                     ("T > block_size", lambda: model(torch.zeros(1, 20, dtype=torch.long)))]:
        with pytest.raises(ValueError) as info:
            fn()
        messages[name] = str(info.value)
    return messages


def test_errors_under_a_group(world):
    for messages in world.run(task_errors):
        assert "T=6" in messages["T % t"] and "t=4" in messages["T % t"] and "T=4 or 8" in messages["T % t"]
        assert "n_head=6" in messages["n_head % t"] and "t=4" in messages["n_head % t"]
        assert "[1, 2, 3, 6]" in messages["n_head % t"]
        assert "T=20" in messages["T > block_size"] and "block_size=16" in messages["T > block_size"]


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_head=3, n_embd=16), ["n_embd=16", "n_head=3", "[1, 2, 4, 8, 16]"]),
    (dict(recompute="some"), ["recompute='some'", "'selective'"]),
    (dict(n_layer=2, recompute=["full"]), ["recompute=['full']", "n_layer=2"]),
    (dict(n_layer=2, recompute=["full", "all"]), ["recompute='all'", "'selective'"]),
    (dict(recompute=None), ["recompute=None"]),
    (dict(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
    (dict(n_layer=0), ["n_layer=0"]),
    (dict(attention="flash"), ["attention='flash'", "'sdpa'"]),
    (dict(attention="sdpa", dropout=0.1), ["attention='sdpa'", "dropout=0.1", "attention='explicit'"]),
])
def test_config_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        GPTConfig(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_state_dict_errors():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    sd = model.full_state_dict()
    wrong_shape = {**sd, "wpe.weight": torch.zeros(9, 8)}
    with pytest.raises(ValueError, match=r"wpe.weight is \(9, 8\) torch.float32, this model needs .* \(8, 8\)"):
        model.load_full_state_dict(wrong_shape)
    with pytest.raises(ValueError, match=r"h.0.ln_1.bias is list"):
        model.load_full_state_dict({**sd, "h.0.ln_1.bias": [0.0] * 8})
    missing = {k: v for k, v in sd.items() if k != "ln_f.bias"}
    with pytest.raises(ValueError, match=r"missing \['ln_f.bias'\]"):
        model.load_full_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        model.load_full_state_dict({**sd, "lm_head.weight": sd["wte.weight"]})
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))


def task_bad_ids(ctx, t):
    """Token ids and targets outside the vocabulary are refused, unsharded and sharded alike (the
    embedding would look up zeros and the loss would pick a wrong logit); ignored positions, -1
    and PyTorch's -100, are the same; a batch whose targets are all ignored has loss 0 and every
    gradient exactly 0, not NaN."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, sequence_parallel=t > 1)
    model = GPT(cfg, ctx.group(t) if t > 1 else None).double()
    idx, targets = make_batch(cfg, 2, 4, 0, ignore=False)
    messages = {}
    for name, (i, y) in {"id 11": (idx.index_fill(1, torch.tensor([2]), 11), None),
                         "id -1": (idx.index_fill(0, torch.tensor([1]), -1), targets),
                         "target 11": (idx, targets.index_fill(1, torch.tensor([3]), 11)),
                         "target -2": (idx, targets.index_fill(1, torch.tensor([0]), -2))}.items():
        with pytest.raises(ValueError) as info:
            model(i, y)
        messages[name] = str(info.value)
    losses = [model(idx, targets.index_fill(1, torch.tensor([1]), ignore))[1].item() for ignore in (-1, -100)]
    _, loss = model(idx, torch.full_like(targets, -1))
    loss.backward()
    grads_zero = all(not p.grad.any().item() for p in model.parameters())  # (so finite too: NaN is not zero)
    return dict(messages=messages, losses=losses, all_ignored=loss.item(), grads_zero=grads_zero)


@pytest.mark.parametrize("t", [1, 2])
def test_out_of_range_ids_and_targets_are_refused(world, t):
    for r in world.run(task_bad_ids, t=t)[:t]:
        m = r["messages"]
        assert "token id 11" in m["id 11"] and "vocab_size=11" in m["id 11"], m
        assert "token id -1" in m["id -1"], m
        assert "target 11" in m["target 11"] and "-100" in m["target 11"], m
        assert "target -2" in m["target -2"], m
        assert r["losses"][0] == r["losses"][1] and math.isfinite(r["losses"][0])
        assert r["all_ignored"] == 0.0 and r["grads_zero"], "every target ignored: loss 0, every gradient exactly 0"


def test_a_bad_state_dict_changes_nothing():
    """load_full_state_dict checks every entry before it copies any: a bad last entry leaves the
    model as it was."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))
    before = model.full_state_dict()
    other = {name: torch.randn(v.shape) for name, v in before.items()}
    last = list(other)[-1]
    for bad in (torch.zeros(3), torch.zeros(other[last].shape, dtype=torch.long), "weights"):
        with pytest.raises(ValueError, match=last):
            model.load_full_state_dict({**other, last: bad})
        after = model.full_state_dict()
        assert all(torch.equal(after[n], before[n]) for n in before)


def test_autocast_is_refused():
    """Under torch.autocast the recomputed attention would rerun in another dtype than it first
    ran in; nanosp says so instead of training on silently different numbers."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, recompute="selective"))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match=r"model.to\(torch.bfloat16\)"):
        model(idx, idx)


def test_group_without_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        GPT(GPTConfig(), group=object())


# ----------------------------------------------------------------------------------------------
# the initial weights


def test_initialisation_is_gpt2s():
    """GPT-2's initial weights: N(0, 0.02^2) for the matrices and embeddings, the residual projections
    (c_proj) scaled by 1/sqrt(2 n_layer), LayerNorm weights 1 and biases 0. Mean and standard
    deviation within 5 standard errors (the smallest tensor has 4096 elements: 5.5% of the std)."""
    cfg = GPTConfig(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=64)
    for name, w in GPT(cfg).full_state_dict().items():
        if name.split(".")[-2].startswith("ln_") and name.endswith("weight"):
            assert torch.equal(w, torch.ones_like(w)), name
        elif name.endswith("bias"):
            assert not w.any(), name
        else:
            std, n = (0.02 / math.sqrt(2 * 4) if name.endswith("c_proj.weight") else 0.02), w.numel()
            assert abs(w.double().mean()) < 5 * std / n**0.5, name
            assert abs(w.double().std() / std - 1) < 5 / (2 * n) ** 0.5, name


# ----------------------------------------------------------------------------------------------
# dropout masks


def test_evaluation_has_no_dropout():
    """model.eval(): the logits of dropout 0.5 are those of dropout 0, forward after forward, and the
    training forwards' count (part of every mask's seed) stands still; model.train() draws masks again."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.5)
    model = GPT(cfg).double()
    plain = GPT(GPTConfig(**{**cfg.__dict__, "dropout": 0.0})).double()
    plain.load_full_state_dict(model.full_state_dict())
    idx = make_batch(cfg, 2, 8, 0)[0]
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(model(idx)[0], plain(idx)[0]) for _ in range(2)) and model.forward_count == 0
        model.train()
        assert not torch.equal(model(idx)[0], plain(idx)[0]) and model.forward_count == 1


def test_every_dropout_of_a_forward_draws_its_own_mask(monkeypatch):
    """The embedding's dropout and each layer's three (attention probabilities, attention output,
    MLP output) call the hash with keys that no other dropout of this forward or the next uses;
    with test_masks_are_uncorrelated, their masks are independent. The unsharded twin cannot see
    two sites sharing one key (it would share it too)."""
    keys = []
    def recording(x, p, key, offset):
        keys.append(key)
        return dropout(x, p, key, offset)
    dropout = nanosp.dropout
    monkeypatch.setattr(nanosp, "dropout", recording)  # bias_dropout_add calls it by name
    monkeypatch.setattr(nanosp.REFERENCE_OPS, "dropout", recording)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8, dropout=0.1)
    model, idx = GPT(cfg).double(), make_batch(cfg, 2, 8, 0)[0]
    for _ in range(2):
        model(idx)
    assert len(keys) == 2 * (1 + 3 * cfg.n_layer) and len(set(keys)) == len(keys)


def keep_mask_uint32(numel, p, key, offset):
    """The dropout rule written out in numpy's uint32 arithmetic (which wraps by definition), the
    way the CUDA kernel writes it: pair j = n // 2 hashes once, element n takes the low or high 16
    bits, kept when they are >= round(p * 2^16)."""
    n = np.arange(offset, offset + numel, dtype=np.uint64)
    j = n >> np.uint64(1)
    with np.errstate(over="ignore"):
        x = (j & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ np.uint32(key & 0xFFFFFFFF)
        k = np.uint32(key >> 32) + (j >> np.uint64(32)).astype(np.uint32) * np.uint32(0x9E3779B9)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= k ^ (x >> np.uint32(15))
        x *= np.uint32(0x2C1B3C6D)
        x ^= x >> np.uint32(16)
    bits = (x >> (np.uint32(16) * (n & np.uint64(1)).astype(np.uint32))) & np.uint32(0xFFFF)
    return bits >= min(round(p * 2**16), 2**16 - 1)


@settings(max_examples=60)
@given(numel=st.integers(1, 3000), p=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9]), seed=st.integers(0, 2**64 - 1),
       layer=st.integers(0, 99), site=st.integers(0, 3),
       offset=st.integers(0, 2**40) | st.sampled_from([2**33 - 1, 2**33 - 1000, 2**34 + 1]))
def test_keep_mask_matches_uint32_arithmetic(numel, p, seed, layer, site, offset):
    key = nanosp.dropout_key(seed, layer, site)
    assert 0 <= key < 2**64
    mask = nanosp.dropout_keep_mask((numel,), p, key, offset)
    assert np.array_equal(mask.numpy(), keep_mask_uint32(numel, p, key, offset))


def test_mask_is_a_slice_of_the_global_mask():
    key, p = nanosp.dropout_key(7, 1, 2), 0.3
    full = nanosp.dropout_keep_mask((64, 3, 40), p, key, 0)
    for start, rows in ((32, 16), (7, 9), (0, 1), (62, 1)):  # odd offsets split a hashed pair
        shard = nanosp.dropout_keep_mask((rows, 3, 40), p, key, start * 3 * 40 + 1)
        assert torch.equal(shard.flatten(), full.flatten()[start * 3 * 40 + 1:][:rows * 3 * 40])


N_STAT = 1 << 20  # statistics over a million mask elements: 5 standard errors is 0.5% of 1 - p


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_keep_rate_is_1_minus_p(p):
    keep = nanosp.dropout_keep_mask((N_STAT,), p, nanosp.dropout_key(3, 4, 1), 12345).double()
    exact = 1 - kernels.dropout_threshold(p) / 2**16  # p rounded to a multiple of 2^-16
    assert abs(exact - (1 - p)) <= 2**-17
    assert abs(keep.mean().item() - exact) < 5 * (exact * (1 - exact) / N_STAT) ** 0.5
    # and the scale makes dropout unbiased: the mean of dropout(ones) is 1
    out = nanosp.dropout(torch.ones(N_STAT, dtype=torch.float64), p, nanosp.dropout_key(3, 4, 1), 12345)
    assert abs(out.mean().item() - 1) < 5 * (p / (1 - p) / N_STAT) ** 0.5


def correlation(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).mean() / (a.pow(2).mean() * b.pow(2).mean()).sqrt()).item()


def test_masks_are_uncorrelated():
    """Neighbouring elements (in a pair and across pairs), and the same elements of another site,
    layer, forward pass or seed: every correlation within 5 standard errors (1/sqrt(n)) of 0."""
    mask = lambda seed, layer, site: nanosp.dropout_keep_mask((N_STAT + 64,), 0.5, nanosp.dropout_key(
        seed, layer, site), 0)
    base = mask(11 << 32 | 5, 2, 0)
    pairs = {f"lag {lag}": (base[:N_STAT], base[lag:N_STAT + lag]) for lag in (1, 2, 3, 64)}
    pairs.update({"another site": (base, mask(11 << 32 | 5, 2, 1)), "another layer": (base, mask(11 << 32 | 5, 3, 0)),
                  "the next forward": (base, mask(11 << 32 | 6, 2, 0)), "another seed": (base, mask(12 << 32 | 5, 2, 0))})
    limit = 5 / N_STAT ** 0.5
    for what, (a, b) in pairs.items():
        assert abs(correlation(a, b)) < limit, what


# ----------------------------------------------------------------------------------------------
# ledgers


def task_activation_table(ctx, t):
    cfg = GPTConfig(vocab_size=64, block_size=256, n_layer=1, n_head=8, n_embd=256, dropout=0.1)
    return ledgers.activation_table(cfg, ctx.group(t), batch=2)


@pytest.mark.parametrize("t", [2, 4])
def test_activation_bytes_match_table_2(world, t):
    rows = world.run(task_activation_table, t=t)[0]
    assert len(rows) == 6
    for row in rows:
        # measured >= formula: the extra is LayerNorm's per-row mean and rstd
        assert 1.0 <= row["ratio"] < 1.03, row


@pytest.mark.parametrize("attention", nanosp.ATTENTIONS)
def test_training_flops_are_counted_exactly(attention):
    B, L, s, h, V = 2, 2, 32, 64, 64
    counted = {}
    for mode in nanosp.RECOMPUTE_MODES:
        cfg = GPTConfig(vocab_size=V, block_size=s, n_layer=L, n_head=4, n_embd=h, recompute=mode, attention=attention)
        counted[mode] = ledgers.count_training_flops(cfg, B)
        assert counted[mode] == ledgers.exact_training_flops(B, L, s, h, V, mode, attention)
    # the fused kernel's backward computes QK^T again: 2Bs^2h per layer more than the written-out one
    fused = 2 * B * s**2 * h * L if attention == "sdpa" else 0
    assert counted["none"] - fused == ledgers.paper_training_flops(B, L, s, h, V, "none")
    assert counted["full"] - fused == round(ledgers.paper_training_flops(B, L, s, h, V, "full"))
    # selective recompute reruns the forward of QK^T and .V: 4Bs^2h per layer
    assert counted["selective"] - counted["none"] == 4 * B * s**2 * h * L


def test_layer_flops_count_what_is_computed_twice():
    """One layer, counted: what it computes twice (counted forward + backward minus 3x its forward)
    is 0 written out, 2Bs^2h/t fused (QK^T in SDPA's backward), +4Bs^2h/t selective, the forward full."""
    B, s, h = 2, 32, 64
    for attention in nanosp.ATTENTIONS:
        for mode in nanosp.RECOMPUTE_MODES:
            cfg = GPTConfig(vocab_size=16, block_size=s, n_layer=1, n_head=4, n_embd=h, recompute=mode,
                            attention=attention)
            forward, total = ledgers.count_layer_flops(cfg, batch=B)
            assert forward == ledgers.layer_forward_flops(B, s, h)
            assert total - 3 * forward == ledgers.recompute_flops(B, s, h, mode, attention), (attention, mode)


@st.composite
def layer_shapes(draw, t):
    n_layer = draw(st.integers(1, 3))
    n_head = t * draw(st.integers(1, 2))
    sp, attention = draw(st.booleans()), draw(st.sampled_from(nanosp.ATTENTIONS))
    return dict(cfg=dict(vocab_size=16, n_layer=n_layer, n_head=n_head, n_embd=n_head * draw(st.sampled_from([2, 8])),
                         block_size=t * draw(st.integers(1, 6)) if sp else draw(st.integers(1, 12)), sequence_parallel=sp,
                         attention=attention, dropout=0.0 if attention == "sdpa" else draw(st.sampled_from([0.0, 0.1])),
                         recompute=draw(st.lists(st.sampled_from(nanosp.RECOMPUTE_MODES), min_size=n_layer, max_size=n_layer))),
                batch=draw(st.integers(1, 3)), dtype=draw(st.sampled_from(["bfloat16", "float32", "float64"])))


def task_layer_bytes(ctx, t, cases):
    """Every saved byte of n_layer layers, measured, against layer_activation_bytes summed."""
    results = []
    for case in cases:
        cfg = GPTConfig(**case["cfg"])
        dtype = getattr(torch, case["dtype"])
        measured, _ = ledgers.measure_activation_bytes(cfg, ctx.group(t) if t > 1 else None, case["batch"], cfg.block_size,
                                                       dtype, paper_bytes=False, n_layer=cfg.n_layer)
        expected = sum(ledgers.layer_activation_bytes(cfg.block_size, case["batch"], cfg.n_embd, cfg.n_head, t,
                                                      cfg.sequence_parallel, cfg.recompute_of(i), cfg.dropout > 0,
                                                      dtype.itemsize, cfg.attention) for i in range(cfg.n_layer))
        results.append((measured, expected))
    return results


@settings(max_examples=5)
@given(data=st.data())
@pytest.mark.parametrize("t", [1, 2, 4])
def test_layer_activation_bytes_are_exact(world, t, data):
    """The planner's memory model is not an estimate: it is every byte the layers save."""
    cases = data.draw(st.lists(layer_shapes(t), min_size=8, max_size=8))
    for (measured, expected), case in zip(world.run(task_layer_bytes, t=t, cases=cases)[0], cases):
        assert measured == expected, case


def brute_force_plan(costs, n_layer, budget):
    """Every one of the 3^n_layer plans: the fewest FLOPs that fit, then the fewest bytes."""
    fits = [(sum(costs[m][1] for m in p), sum(costs[m][0] for m in p))
            for p in itertools.product(nanosp.RECOMPUTE_MODES, repeat=n_layer)]
    fits = [c for c in fits if c[1] <= budget]
    return min(fits) if fits else None


@settings(max_examples=200)
@given(n_layer=st.integers(1, 5), t=st.sampled_from([1, 2, 4, 8]), sp=st.booleans(), dropout=st.sampled_from([0.0, 0.1]),
       B=st.integers(1, 4), T=st.sampled_from([8, 64, 512, 2048]), h_per_head=st.sampled_from([8, 64, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), fraction=st.floats(0, 1.2),
       attention=st.sampled_from(nanosp.ATTENTIONS))
def test_planner_equals_brute_force(n_layer, t, sp, dropout, B, T, h_per_head, dtype, fraction, attention):
    cfg = GPTConfig(vocab_size=64, block_size=T, n_layer=n_layer, n_head=2 * t, n_embd=2 * t * h_per_head,
                    sequence_parallel=sp, dropout=0.0 if attention == "sdpa" else dropout, attention=attention)
    costs = ledgers.recompute_costs(cfg, t, B, T, dtype)
    most = n_layer * costs["none"][0]
    budget = int(fraction * most)
    best = brute_force_plan(costs, n_layer, budget)
    if best is None:
        with pytest.raises(ValueError, match=f"needs {n_layer * costs['full'][0]:,}"):
            ledgers.plan_recompute(cfg, t, B, T, dtype, budget)
        return
    plan = ledgers.plan_recompute(cfg, t, B, T, dtype, budget)
    assert (plan.recompute_flops, plan.activation_bytes) == best
    assert len(plan.modes) == n_layer and plan.activation_bytes == sum(costs[m][0] for m in plan.modes)


def test_planner_says_what_selective_saves_under_sdpa():
    """With the fused kernel, selective recompute has only the log-sum-exp left to save (4 bytes per
    head and row, against 5as^2b/t written out); the planner's plan says so."""
    a, h, T, B, t = 8, 512, 2048, 1, 4
    for attention in nanosp.ATTENTIONS:
        cfg = GPTConfig(vocab_size=64, block_size=T, n_layer=4, n_head=a, n_embd=h, sequence_parallel=True,
                        attention=attention)
        costs = ledgers.recompute_costs(cfg, t, B, T, torch.bfloat16)
        saved = costs["none"][0] - costs["selective"][0]
        plan = ledgers.plan_recompute(cfg, t, B, T, torch.bfloat16, 4 * costs["none"][0])
        if attention == "sdpa":
            assert saved == 4 * a * T * B // t and f"saves only the kernel's log-sum-exp, {saved:,} of" in plan.note
        else:
            assert saved == a * T * T * B // t * 2 and plan.note == ""  # softmax output, bf16, without dropout


def task_plan_is_measured_within_budget(ctx, t, fractions):
    """Budgets from all-none down to all-full; each chosen plan measured by the activation ledger."""
    cfg = GPTConfig(vocab_size=16, block_size=64, n_layer=4, n_head=4, n_embd=64, dropout=0.1, sequence_parallel=t > 1)
    costs = ledgers.recompute_costs(cfg, t, 2, 64, torch.float32)
    most, least = 4 * costs["none"][0], 4 * costs["full"][0]
    results = []
    for budget in [int(least + f * (most - least)) for f in fractions]:
        plan = ledgers.plan_recompute(cfg, t, 2, 64, torch.float32, budget)
        variant = GPTConfig(**{**cfg.__dict__, "recompute": plan.modes})
        measured, _ = ledgers.measure_activation_bytes(variant, ctx.group(t) if t > 1 else None, 2, 64, torch.float32,
                                                       paper_bytes=False, n_layer=4)
        results.append((budget, str(plan), plan.activation_bytes, measured))
    return results


@pytest.mark.parametrize("t", [1, 4])
def test_chosen_plan_measures_within_budget(world, t):
    fractions = [1.0, 0.7, 0.45, 0.3, 0.1, 0.02, 0.0]
    results = world.run(task_plan_is_measured_within_budget, t=t, fractions=fractions)[0]
    for budget, plan, predicted, measured in results:
        assert measured == predicted <= budget, (budget, plan)
    assert len({plan for _, plan, _, _ in results}) >= 4  # the budgets really choose different plans


def test_recompute_plans_do_not_change_what_is_learned():
    """Training with plans that change every step (as the batch length changes) gives the losses and
    weights of a fixed plan, bit for bit: recomputation replays the same arithmetic."""
    def train(plans):
        cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=4, n_embd=32, dropout=0.1, seed=1)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen, losses = torch.Generator().manual_seed(0), []
        for step in range(6):
            model.set_recompute(plans[step % len(plans)])
            idx = torch.randint(0, 64, (4, [8, 32, 16][step % 3]), generator=gen)
            loss = model(idx, idx)[1]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, model.full_state_dict()

    losses, weights = train(["none"])
    for plans in (["selective"], ["full"], [("full", "selective", "none"), ("none", "none", "full"), "selective"]):
        other_losses, other_weights = train(plans)
        assert other_losses == losses and all(torch.equal(other_weights[n], weights[n]) for n in weights), plans


def saved_bytes(model, idx):
    """The bytes autograd saves during one training forward of model (parameters included)."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(idx, idx)
    return sum(saved.values())


def test_set_recompute_replans_this_model_alone():
    """set_recompute gives this model's layers the new plan and changes neither the config the model
    was built from nor another model built from the same config: the replanned model saves what a
    model built with that plan saves, the other what it saved before."""
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)
    replanned, other = GPT(cfg), GPT(cfg)
    idx = make_batch(cfg, 2, 16, 0)[0]
    before = saved_bytes(other, idx)
    replanned.set_recompute(["full", "selective"])
    assert cfg.recompute == other.cfg.recompute == "none" and replanned.cfg.recompute == ("full", "selective")
    built = GPT(GPTConfig(**{**cfg.__dict__, "recompute": ("full", "selective")}))
    assert saved_bytes(replanned, idx) == saved_bytes(built, idx) < saved_bytes(other, idx) == before


def task_communication(ctx):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)
    logs = {}
    for sp in (False, True):
        variant = GPTConfig(**{**cfg.__dict__, "sequence_parallel": sp})
        logs[sp] = ledgers.measure_communication(variant, ctx.group(4), batch=2)
    return logs


def test_sequence_parallelism_sends_the_same_activation_bytes(world):
    logs = world.run(task_communication)[0]
    t, sbh = 4, 16 * 2 * 32 * 2  # bytes of one (s, b, h) bf16 activation
    ring = lambda rows: sum(ledgers.ring_bytes_sent(op, n, t) for _, _, op, n in rows)
    tp, sp = logs[False], logs[True]
    assert [(phase, op, n) for phase, _, op, n in tp] == [("forward", "all-reduce", sbh)] * 2 + [
        ("backward", "all-reduce", sbh)] * 2
    regather = [r for r in sp if r[1] == "LinearWithSequenceGather.backward" and r[2] == "all-gather"]
    params = [r for r in sp if r[1] == "CopyToTensorParallelRegion.backward"]
    activations = [r for r in sp if r not in regather and r not in params]
    assert ring(activations) == ring(tp)  # all-reduce = reduce-scatter + all-gather
    assert sorted(op for _, _, op, _ in activations) == ["all-gather"] * 4 + ["reduce-scatter"] * 4
    # the price of saving only the input shard: one all-gather again per column-parallel linear
    assert [n for *_, n in regather] == [sbh, sbh]
    # LayerNorm weights and biases (2 x 2) and the two row-parallel biases: 6 x h elements
    assert [n for *_, n in params] == [6 * 32 * 2]  # in one all-reduce


MESSAGE_CASES = [(2, False), (2, True), (4, False), (4, True)]  # (t, sequence_parallel)


def task_every_message_is_logged(ctx, cases):
    """Every call nanosp makes into torch.distributed, seen by a stand-in for nanosp.dist (and for the
    two gather/scatter entry points the helpers bind at import), against ledgers.collective_log, over
    training steps, the gathered logits and their backward, and full_state_dict: the same messages."""
    sent = []

    def spy(op, call, message):  # message(*args): the bytes of the whole message
        def wrapper(*args, **kwargs):
            sent.append((op, message(*args)))
            return call(*args, **kwargs)
        return wrapper

    class Dist:  # torch.distributed with every call that is not a query logged (unknown ones without bytes)
        def __getattr__(self, name):
            value = getattr(dist, name)
            queries = ("get_world_size", "get_rank", "is_initialized")
            if name in queries or not callable(value) or isinstance(value, type):  # ReduceOp is a type
                return value
            if name == "all_reduce":
                return spy("all-reduce", value, lambda x: x.numel() * x.element_size())
            return spy(name, value, lambda *_: None)

    results = []
    for t, sp in cases:
        cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16, dropout=0.1, sequence_parallel=sp,
                        recompute=("full", "selective"))
        model = GPT(cfg, ctx.group(t)).double()
        idx, targets = make_batch(cfg, 2, 8, 5)
        real = nanosp.dist, nanosp._all_gather_into, nanosp._reduce_scatter_into
        nanosp.dist = Dist()
        nanosp._all_gather_into = spy("all-gather", real[1], lambda out, x: out.numel() * out.element_size())
        nanosp._reduce_scatter_into = spy("reduce-scatter", real[2], lambda out, x: x.numel() * x.element_size())
        try:
            with ledgers.collective_log() as log:
                for _ in range(2):
                    model(idx, targets)[1].backward()
                model(idx)[0].sum().backward()
                model.full_state_dict()
        finally:
            nanosp.dist, nanosp._all_gather_into, nanosp._reduce_scatter_into = real
        results.append((sorted(sent), sorted((op, n) for *_, op, n in log), {operator for _, operator, *_ in log}))
        sent.clear()
    return results


def test_the_collective_log_sees_every_message_nanosp_sends(world):
    """The communication ledger is complete: the cross-entropy's max, the gather of the logits and
    full_tensor's gathers go through the helpers it counts, like every operator's collectives."""
    for results in world.run(task_every_message_is_logged, cases=MESSAGE_CASES):
        for (t, sp), (sent, logged, operators) in zip(MESSAGE_CASES, results):
            missing, extra = Counter(sent) - Counter(logged), Counter(logged) - Counter(sent)
            assert sent and not missing and not extra, f"t={t} sp={sp}: not logged {missing}; not sent {extra}"
            assert {"vocab_parallel_cross_entropy", "GatherFromVocabRegion.forward", "GPT.full_tensor"} <= operators
