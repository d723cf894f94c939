"""ledgers: nanosp's measuring instruments, each beside the paper's formula it checks.

    python ledgers.py     # 4 CPU processes: one training step sharded vs unsharded, then Table 2

1. Activation memory (Korthikanti et al. 2022, Table 2): the bytes autograd saves during one
   layer's forward, counted with saved_tensors_hooks, beside the formula sbh(34 + 5as/h) and its
   tensor-, sequence-parallel and recompute variants; the core attention written out or fused.
2. FLOPs (the paper's Appendix A): one training step counted by FlopCounterMode, beside the exact
   count of the matrix multiplies nanosp runs and the paper's 72BLsh^2(1 + s/6h + V/12hL); what
   one layer computes twice.
3. What to recompute for a memory budget: every layer's costs known exactly, the per-layer plan
   with the fewest recomputed FLOPs that fits (`plan_recompute`).
4. Communication: every collective of one layer, forward and backward, logged by wrapping
   nanosp's collective helpers for the duration of a measurement; bytes per rank under the ring
   algorithm.

s sequence length, b micro-batch, h hidden size, a heads, t tensor-parallel size, L layers, V vocab.
bench.py prints these as tables; the tests hold them to the paper.
"""
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist

import nanosp


# ----------------------------------------------------------------------------------------------
# 1. activation memory (Table 2)


def paper_activation_bytes(s, b, h, a, t=1, sequence_parallel=False, recompute="none"):
    """Korthikanti et al. 2022, Table 2: activation bytes per layer, 16-bit activations and 1-byte
    dropout masks (the formula assumes dropout is on)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    scores = 5 * a * s / (h * t) if recompute == "none" else 0.0  # softmax, its mask, dropout output
    if sequence_parallel:
        return s * b * h * (34 / t + scores)
    return s * b * h * (10 + 24 / t + scores)


def _layers_and_input(cfg, group, batch, seq, dtype, device, n_layer=1):
    """n_layer of nanosp's layers with random weights (seeded by cfg.seed), and an input that needs
    a gradient: this rank's (T/t, B, C) rows under SP, else (T, B, C)."""
    blocks = torch.nn.ModuleList(nanosp.Block(cfg, group, layer) for layer in range(n_layer)).to(device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    rows_here = seq // nanosp.group_size(group) if cfg.sequence_parallel else seq
    return blocks, torch.randn(rows_here, batch, cfg.n_embd, device=device, dtype=dtype, requires_grad=True)


def layer_activation_bytes(s, b, h, a, t=1, sequence_parallel=False, recompute="none", dropout=True,
                           float_bytes=2, attention="explicit"):
    """The bytes one of nanosp's layers saves for backward, term by term, exactly: what
    measure_activation_bytes counts. With 2-byte floats and dropout on, Table 2 plus LayerNorm's
    per-row mean and 1/std (8sb). Without dropout the masks are gone and the softmax output is
    also the dropout output. With attention="sdpa" (no dropout) the fused kernel keeps Q, K, V and
    its output, which is c_proj's input, and no s^2 term: one log-sum-exp per head and row instead,
    float32 (float64 in a float64 model), 4asb/t bytes; selective recompute saves only that."""
    if attention == "sdpa" and dropout:
        raise ValueError("attention='sdpa' takes no dropout: nanosp's GPTConfig refuses the combination")
    shard = t if sequence_parallel else 1  # LayerNorm and dropout see all s rows, or s/t under SP
    if recompute == "full":
        return float_bytes * s * b * h // shard  # the layer's input
    floats = 2 * (s * b * h + 2 * s * b) // shard  # the two LayerNorms' inputs, means and 1/stds
    floats += 2 * s * b * h // shard  # the inputs of c_attn and c_fc (under SP, their shard)
    floats += 12 * s * b * h // t  # Q, K, V; c_proj's input; the GeLU's input and output
    masks = 2 * s * b * h // shard if dropout else 0  # the two residual dropouts
    if recompute == "none" and attention == "sdpa":  # the kernel's log-sum-exp, at least float32
        return float_bytes * floats + a * s * b // t * max(4, float_bytes)
    if recompute == "none":  # the softmax output, its mask and the dropout output: 5as^2b/t
        floats += (2 if dropout else 1) * a * s * s * b // t
        masks += a * s * s * b // t if dropout else 0
    return float_bytes * floats + masks


def measure_activation_bytes(cfg, group=None, batch=1, seq=None, dtype=torch.bfloat16, device="cpu",
                             paper_bytes=True, n_layer=1):
    """The bytes autograd saves for backward during the forward of n_layer layers, term by term.

    Counted with saved_tensors_hooks: each storage once, floating elements of `dtype` at 2 bytes as
    in the paper's 16-bit accounting (paper_bytes=False: at their size), other floats (SDPA's float32
    log-sum-exp) at their size, bool masks at 1 byte, parameters excluded. Layer i recomputes as
    cfg.recompute_of(i) says. Returns (total, rows) with rows [(where, shape, dtype, bytes)]; `where`
    is the sub-module that was running when the tensor was saved. With kernels.py on CUDA the
    residual-dropout masks are regenerated rather than stored, and this comes in under the formula.
    With attention="sdpa" on CUDA the flash kernel (bf16, fp16) also keeps its Philox seed and
    offset, two 8-byte scalars: 16 bytes a layer over layer_activation_bytes; the memory-efficient
    kernel (float32) pads its log-sum-exp to a multiple of 32 rows, and float64 takes the math path,
    which keeps the s^2 tensors.
    """
    blocks, x = _layers_and_input(cfg, group, batch, seq or cfg.block_size, dtype, device, n_layer)
    parameters = {p.untyped_storage().data_ptr() for p in blocks.parameters()}
    where, saved = ["block input"], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved:
            elements = storage.nbytes() // tensor.element_size()
            float_bytes = 2 if paper_bytes and tensor.dtype == x.dtype else tensor.element_size()
            nbytes = elements * (float_bytes if tensor.is_floating_point() else tensor.element_size())
            saved[storage.data_ptr()] = (where[0], tuple(tensor.shape), str(tensor.dtype)[6:], nbytes)
        return tensor

    hooks = []
    for i, block in enumerate(blocks):
        for name in ("ln_1", "attn", "ln_2", "mlp"):
            label = name if n_layer == 1 else f"h.{i}.{name}"
            module = getattr(block, name)
            hooks.append(module.register_forward_pre_hook(lambda *_, n=label: where.__setitem__(0, n)))
            hooks.append(module.register_forward_hook(lambda *_, n=label: where.__setitem__(0, f"after {n}")))
    fwd = nanosp.ForwardContext(nanosp.ops_for(x, cfg), cfg.seed if cfg.dropout > 0 else None,
                                nanosp.replicated_through_f(blocks, group, cfg.sequence_parallel))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = x
        for block in blocks:
            y = block(y, fwd)
    for hook in hooks:
        hook.remove()
    del y
    rows = list(saved.values())
    return sum(r[3] for r in rows), rows


def activation_table(cfg, group, batch=1, seq=None, dtype=torch.bfloat16, device="cpu"):
    """Table 2's six rows for cfg's shape at t = size of group: measured bytes beside the formula.
    Collective: every rank of the group calls it."""
    seq, t = seq or cfg.block_size, nanosp.group_size(group)
    rows = []
    for name, sp, recompute in [("no parallelism", False, "none"), ("tensor parallel", False, "none"),
                                ("tensor + sequence parallel", True, "none"),
                                ("tensor parallel + selective recompute", False, "selective"),
                                ("tensor + sequence parallel + selective recompute", True, "selective"),
                                ("full recompute", False, "full")]:
        g = None if name == "no parallelism" else group
        variant = nanosp.GPTConfig(**{**cfg.__dict__, "sequence_parallel": sp, "recompute": recompute})
        measured, _ = measure_activation_bytes(variant, g, batch, seq, dtype, device)
        formula = paper_activation_bytes(seq, batch, cfg.n_embd, cfg.n_head, nanosp.group_size(g), sp, recompute)
        rows.append(dict(configuration=name, t=nanosp.group_size(g), measured=measured, formula=formula,
                         ratio=measured / formula))
    return rows


# ----------------------------------------------------------------------------------------------
# 2. FLOPs (Appendix A)


def paper_training_flops(B, L, s, h, V, recompute="none"):
    """Korthikanti et al. 2022, Appendix A: FLOPs of one training iteration (matrix multiplies).
    Model FLOPs 72 B L s h^2 (1 + s/6h + V/12hL); with selective recompute the paper writes
    s/3h for s/6h; full recompute adds one forward of every layer: 96 B L s h^2 (1 + s/6h + V/16hL)."""
    if recompute == "full":
        return 96 * B * L * s * h**2 * (1 + s / (6 * h) + V / (16 * h * L))
    attention = s / (3 * h) if recompute == "selective" else s / (6 * h)
    return 72 * B * L * s * h**2 * (1 + attention + V / (12 * h * L))


def layer_forward_flops(B, s, h):
    """The matrix multiplies of one layer's forward: QKV 6Bsh^2, QK^T 2Bs^2h, .V 2Bs^2h,
    projection 2Bsh^2, MLP 16Bsh^2."""
    return 24 * B * s * h**2 + 4 * B * s**2 * h


def recompute_flops(B, s, h, recompute, attention="explicit"):
    """What one layer's backward runs again: selective, the forward of QK^T and .V (4Bs^2h);
    full, the whole forward of the layer. With attention="sdpa" the fused kernel's backward also
    computes QK^T again (2Bs^2h), in every mode. (Divide by t for one rank's share.)"""
    fused = 2 * B * s**2 * h if attention == "sdpa" else 0
    return fused + {"none": 0, "selective": 4 * B * s**2 * h, "full": layer_forward_flops(B, s, h)}[recompute]


def exact_training_flops(B, L, s, h, V, recompute="none", attention="explicit"):
    """The matrix-multiply FLOPs nanosp runs for one training step (forward + backward = 3x forward,
    the LM head 2BshV) and its recomputation; `recompute` is a mode, or one per layer."""
    modes = [recompute] * L if isinstance(recompute, str) else recompute
    return 3 * (L * layer_forward_flops(B, s, h) + 2 * B * s * h * V) + sum(
        recompute_flops(B, s, h, m, attention) for m in modes)


def flop_counter():
    """FlopCounterMode, taught the FLOPs of SDPA's CPU kernels: its own formulas for the CUDA
    kernels (the two matmuls forward; five backward, QK^T computed again)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: fc.sdpa_backward_flop_count(grad, q, k, v)})


def count_training_flops(cfg, batch, seq=None):
    """FLOPs of one forward + backward of the unsharded model, counted by FlopCounterMode."""
    seq = seq or cfg.block_size
    model = nanosp.GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops()


def count_layer_flops(cfg, group=None, batch=1, seq=None):
    """(forward, forward + backward) FLOPs of one of nanosp's layers on this rank, counted by
    FlopCounterMode. What the layer computes twice is the second minus 3x the first."""
    (block,), x = _layers_and_input(cfg, group, batch, seq or cfg.block_size, torch.float32, "cpu")
    fwd = nanosp.ForwardContext(through_f=nanosp.replicated_through_f(block, group, cfg.sequence_parallel))
    with flop_counter() as counter:
        y = block(x, fwd)
    forward = counter.get_total_flops()
    with flop_counter() as counter:
        block(x, fwd).backward(torch.ones_like(y))
    return forward, counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# 3. what to recompute, for a memory budget
#
# The paper chooses none, selective or full once, for every layer. With every term of both costs
# known exactly, the choice can be made per layer and per batch shape: the fewest recomputed FLOPs
# whose activations fit the budget. The layers are alike, so a plan is a count of each mode, and
# the (L+1)(L+2)/2 counts are few enough to try them all.


class RecomputePlan(NamedTuple):
    modes: tuple  # one per layer: "full" first, then "selective", then "none"
    activation_bytes: int  # what the layers save, per rank (layer_activation_bytes, summed)
    recompute_flops: int  # what their backward runs again, per rank
    note: str = ""  # what the planner saw that a reader of the plan should know

    def __str__(self):
        counts = [f"{m} x{self.modes.count(m)}" for m in nanosp.RECOMPUTE_MODES if m in self.modes]
        return ", ".join(counts)


def recompute_costs(cfg, t, B, T, dtype):
    """{mode: (activation bytes, recomputed FLOPs)} of one layer on one rank."""
    float_bytes = torch.empty((), dtype=dtype).element_size()
    return {m: (layer_activation_bytes(T, B, cfg.n_embd, cfg.n_head, t, cfg.sequence_parallel, m, cfg.dropout > 0,
                                       float_bytes, cfg.attention),
                recompute_flops(B, T, cfg.n_embd, m, cfg.attention) // t) for m in nanosp.RECOMPUTE_MODES}


def plan_of(costs, modes):
    """The plan of these per-layer modes, with its costs from recompute_costs."""
    return RecomputePlan(tuple(modes), sum(costs[m][0] for m in modes), sum(costs[m][1] for m in modes))


def counted_modes(n_layer, n_full, n_selective):
    """n_full layers recomputed fully, then n_selective selectively, the rest not at all."""
    return ("full",) * n_full + ("selective",) * n_selective + ("none",) * (n_layer - n_full - n_selective)


def plan_recompute(cfg, t, B, T, dtype, budget):
    """The per-layer plan whose activations fit `budget` (bytes per rank, the layers' saved
    activations) with the fewest recomputed FLOPs, then the fewest bytes. cfg gives the shape and
    sequence parallelism; B, T the micro-batch; dtype the activations' (masks take 1 byte)."""
    costs = recompute_costs(cfg, t, B, T, dtype)
    (none_bytes, none_flops), (selective_bytes, selective_flops), (full_bytes, full_flops) = (
        costs[m] for m in nanosp.RECOMPUTE_MODES)
    L, best = cfg.n_layer, None
    for n_full in range(L + 1):
        for n_selective in range(L - n_full + 1):
            n_none = L - n_full - n_selective
            nbytes = n_full * full_bytes + n_selective * selective_bytes + n_none * none_bytes
            cost = (n_full * full_flops + n_selective * selective_flops + n_none * none_flops, nbytes)
            if nbytes <= budget and (best is None or cost < best[0]):
                best = cost, n_full, n_selective
    if best is None:
        raise ValueError(f"no recompute plan fits an activation budget of {budget:,} bytes per rank at B={B}, "
                         f"T={T}, t={t}: the smallest, full recompute of all {L} layers, needs {L * full_bytes:,}")
    note = ""
    if cfg.attention == "sdpa":  # the fused kernel stores no s^2 tensor: what is left for selective
        note = (f"attention='sdpa' keeps no s^2 tensor: selective recompute saves only the kernel's log-sum-exp, "
                f"{none_bytes - selective_bytes:,} of {none_bytes:,} bytes a layer, for "
                f"{selective_flops - none_flops:,} more FLOPs; full recompute is what saves memory")
    return plan_of(costs, counted_modes(L, *best[1:]))._replace(note=note)


# ----------------------------------------------------------------------------------------------
# 4. communication


@contextmanager
def collective_log():
    """Within the block, every collective nanosp sends is logged as (phase, operator, op, bytes of the
    full message): nanosp calls torch.distributed only through its three helpers (all_reduce,
    all_gather_sequence, reduce_scatter_sequence), which are wrapped to count. What calls them is
    wrapped to say which operator is running: the autograd Functions, forward or backward; the
    cross-entropy's max over the vocabulary shards (forward); GPT.full_tensor (outside both)."""
    log, running = [], [("outside", "an operator")]

    def counted(op, helper, full_message):
        def wrapper(x, group, **kwargs):
            nbytes = x.numel() * x.element_size() * (nanosp.group_size(group) if full_message else 1)
            log.append((*running[-1], op, nbytes))
            return helper(x, group, **kwargs)
        return wrapper

    def labelled(phase, operator, fn):
        def wrapper(*args, **kwargs):
            running.append((phase, operator))
            try:
                return fn(*args, **kwargs)
            finally:
                running.pop()
        return wrapper

    helpers = {"all_reduce": ("all-reduce", False), "all_gather_sequence": ("all-gather", True),
               "reduce_scatter_sequence": ("reduce-scatter", False)}  # the message is the full tensor
    patches = [(nanosp, name, counted(op, getattr(nanosp, name), full)) for name, (op, full) in helpers.items()]
    for cls in vars(nanosp).values():
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls is not nanosp.Recompute:
            patches += [(cls, phase, staticmethod(labelled(phase, f"{cls.__name__}.{phase}", getattr(cls, phase))))
                        for phase in ("forward", "backward")]
    patches += [(nanosp, "vocab_parallel_cross_entropy",
                 labelled("forward", "vocab_parallel_cross_entropy", nanosp.vocab_parallel_cross_entropy)),
                (nanosp.GPT, "full_tensor", labelled("outside", "GPT.full_tensor", nanosp.GPT.full_tensor))]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in patches]
    for owner, name, patched in patches:
        setattr(owner, name, patched)
    try:
        yield log
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


PAPER_NAMES = {"CopyToTensorParallelRegion": "f", "ReduceFromTensorParallelRegion": "f̄",
               "GatherFromSequenceParallelRegion": "g", "ReduceScatterToSequenceParallelRegion": "ḡ",
               "LinearWithSequenceGather": "g (fused with the linear)",
               "GatherFromVocabRegion": "gather of the vocabulary-parallel logits",
               "vocab_parallel_cross_entropy": "max of the vocabulary-parallel logits"}


def paper_name(operator):
    """'ReduceFromTensorParallelRegion.forward' -> 'f̄ forward': the paper's letter for a log entry."""
    cls, _, phase = operator.partition(".")
    return f"{PAPER_NAMES.get(cls, cls)} {phase}".strip()


def measure_communication(cfg, group, batch=1, seq=None, dtype=torch.bfloat16, device="cpu"):
    """Every collective of one layer's forward and backward: (phase, operator, op, bytes of the full
    message). Ring algorithms send 2(t-1)/t of that per rank for an all-reduce and (t-1)/t for an
    all-gather or a reduce-scatter: one all-reduce costs one reduce-scatter plus one all-gather."""
    (block,), x = _layers_and_input(cfg, group, batch, seq or cfg.block_size, dtype, device)
    with collective_log() as log:
        y = block(x, nanosp.ForwardContext(through_f=nanosp.replicated_through_f(block, group, cfg.sequence_parallel)))
        y.backward(torch.ones_like(y))
    return log


def ring_bytes_sent(op, nbytes, t):
    """Bytes one rank sends for a collective of an nbytes message under the ring algorithm."""
    return (2 if op == "all-reduce" else 1) * (t - 1) * nbytes / t


# ----------------------------------------------------------------------------------------------
# demo: python ledgers.py


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _demo(rank, world, port):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    group, say = dist.group.WORLD, (print if rank == 0 else lambda *a: None)

    # 1. one training step of a t-way model with SP + selective recompute + dropout equals the unsharded step
    cfg = nanosp.GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=8, n_embd=64, dropout=0.1,
                           sequence_parallel=True, recompute="selective")
    plain = nanosp.GPTConfig(**{**cfg.__dict__, "sequence_parallel": False, "recompute": "none"})
    reference = nanosp.GPT(plain).double()
    sharded = nanosp.GPT(cfg, group).double()
    idx = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    (_, loss_ref), (_, loss) = reference(idx, idx), sharded(idx, idx)
    loss_ref.backward()
    loss.backward()
    grads_ref = dict(reference.named_parameters())
    worst = max(_relative_error(sharded.full_tensor(n, p.grad), grads_ref[n].grad)
                for n, p in sharded.named_parameters())
    say(f"t={world}, sequence parallel, selective recompute, dropout 0.1, float64: "
        f"loss {loss.item():.6f} vs {loss_ref.item():.6f} unsharded; "
        f"largest relative error of any gradient {worst:.1e}")

    # 2. the paper's Table 2 for one layer at a GPT-3-like ratio 5as/h = 80, bf16
    cfg = nanosp.GPTConfig(vocab_size=256, block_size=1024, n_layer=1, n_head=8, n_embd=512, dropout=0.1)
    rows = activation_table(cfg, group, batch=1)
    say(f"\nactivation bytes per layer: s=1024 b=1 h=512 a=8 t={world} (bf16, measured by saved_tensors_hooks)")
    say("| configuration | t | measured | Table 2 formula | ratio |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        say(f"| {r['configuration']} | {r['t']} | {r['measured']:,} | {r['formula']:,.0f} | {r['ratio']:.4f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_demo, args=(4, port), nprocs=4)
