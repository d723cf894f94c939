"""nanosp: tensor parallelism, sequence parallelism and selective activation recomputation,
in one GPT you can read top to bottom. The three ideas, and where they live:

1. Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM"). Attention is split by heads and the
   MLP by its hidden dimension across the t ranks of `group`: a column-parallel linear, then a
   row-parallel one, between the conjugate pair f (identity / all-reduce) and f̄ (all-reduce /
   identity). Sections "collectives" and "parallel layers".
2. Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
   Transformer Models"). LayerNorm and dropout, which tensor parallelism leaves replicated, run on
   T/t sequence shards: f becomes g (all-gather / reduce-scatter), f̄ becomes ḡ (reduce-scatter /
   all-gather); the same bytes on the wire, t times less of those activations. `sequence_parallel`.
3. Selective activation recomputation (same paper). Only the core attention (QK^T, softmax, dropout,
   .V), large to store and cheap to recompute, is recomputed in backward: `recompute=` "selective",
   "full" (keep each layer's input only) or one per layer; `attention="sdpa"` fuses it. "recomputation".

Reading order: config, the four collectives, parallel layers, recomputation, the fusable ops,
attention / MLP / block, GPT, state dicts; then the dropout hash, a detail the model calls.
kernels.py has fused CUDA versions of the fusable ops; ledgers.py measures what the paper counts
and plans what to recompute. Inside the layers activations are (T, B, C), sequence first, so a
sequence shard is a contiguous block; shape comments mark the sharded dimension with /t.

    python ledgers.py       # 4 CPU processes: one step sharded vs unsharded, then Table 2 measured
    torchrun --standalone --nproc_per_node=2 train.py --sequence-parallel --recompute selective
"""
import dataclasses
import math
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import kernels  # fused CUDA versions of the fusable ops, and dropout's rounding of p; importing builds nothing


# ----------------------------------------------------------------------------------------------
# config

RECOMPUTE_MODES = ("none", "selective", "full")
ATTENTIONS = ("explicit", "sdpa")  # the core attention written out, or F.scaled_dot_product_attention

def _divisors(n):  # what a size that must divide n could be
    return [d for d in range(1, n + 1) if n % d == 0]

@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    sequence_parallel: bool = False
    recompute: Union[str, tuple] = "none"  # "none" | "selective" | "full", or one of them per layer
    attention: str = "explicit"  # "explicit": QK^T, softmax, dropout, .V, its s^2 terms visible; "sdpa": fused
    seed: int = 0  # seeds the initial weights and the dropout masks
    fused_kernels: bool = True  # use kernels.py when the tensors are on CUDA

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"n_head would fit among {_divisors(self.n_embd)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.recompute, (list, tuple)) and len(self.recompute) == self.n_layer:
            self.recompute = tuple(self.recompute)  # one mode per layer
        elif not isinstance(self.recompute, str):
            raise ValueError(f"recompute={self.recompute!r} must be a mode or a list of n_layer={self.n_layer}")
        for mode in (self.recompute,) if isinstance(self.recompute, str) else self.recompute:
            if mode not in RECOMPUTE_MODES:
                raise ValueError(f"recompute={mode!r} is not one of {RECOMPUTE_MODES}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTIONS}")
        if self.attention == "sdpa" and self.dropout > 0:  # SDPA's masks: PyTorch's RNG, not nanosp's hash
            raise ValueError(f"attention='sdpa' takes no dropout (dropout={self.dropout}): use attention='explicit'")

    def recompute_of(self, layer):
        return self.recompute if isinstance(self.recompute, str) else self.recompute[layer]

    def check_tensor_parallel(self, t):
        """Sizes that must divide by the tensor-parallel size t."""
        if self.n_head % t:
            raise ValueError(f"n_head={self.n_head} is not divisible by the tensor-parallel size t={t}; "
                             f"t would fit among {_divisors(self.n_head)}")

    def check_sequence(self, T, t):
        """A sequence length T this model can take at tensor-parallel size t."""
        if not 1 <= T <= self.block_size:
            raise ValueError(f"sequence length T={T} must be in [1, block_size={self.block_size}]")
        if self.sequence_parallel and T % t:
            fits = " or ".join(str(n) for n in (T // t * t, (T // t + 1) * t) if 0 < n <= self.block_size)
            raise ValueError(f"sequence length T={T} is not divisible by the tensor-parallel size t={t}, "
                             f"which sequence_parallel needs; T={fits or f'a multiple of {t}'} would fit")


# ----------------------------------------------------------------------------------------------
# collectives: f, f̄, g, ḡ
#
# Korthikanti et al. 2022 (Figures 4 and 5) name the operators around the parallel linears:
#
#   f  identity                       / all-reduce      entering a column-parallel linear (TP)
#   f̄  all-reduce                     / identity        leaving a row-parallel linear (TP)
#   g  all-gather along the sequence  / reduce-scatter  entering a column-parallel linear (SP)
#   ḡ  reduce-scatter along sequence  / all-gather      leaving a row-parallel linear (SP)
#
# (forward / backward; Megatron-LM 2019 called f̄ "g".) Each is a no-op on a group of one rank and
# on group=None, the unsharded model. Gathers and scatters are along dim 0, the sequence.
# Every collective in this file goes through the three helpers below, which ledgers.py counts.

def group_size(group):
    return 1 if group is None else dist.get_world_size(group)

def group_rank(group):
    return 0 if group is None else dist.get_rank(group)

# all_gather_single / reduce_scatter_single from torch 2.13 (*_tensor before); with async_op: (out, work).
_all_gather_into = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

def all_reduce(x, group, op=dist.ReduceOp.SUM):
    """Every rank's x -> their sum (or max: op) on every rank (in place)."""
    dist.all_reduce(x, op=op, group=group)
    return x

def all_gather_sequence(x, group, async_op=False):
    """(T/t, ...) on each rank -> (T, ...), rank r's shard at rows [r T/t, (r+1) T/t); other dims: moved to 0."""
    out = x.new_empty((x.shape[0] * group_size(group), *x.shape[1:]))
    work = _all_gather_into(out, x.contiguous(), group=group, async_op=async_op)
    return (out, work) if async_op else out

def reduce_scatter_sequence(x, group, async_op=False):
    """(T, ...) partial sums on each rank -> (T/t, ...): this rank's rows of the sum."""
    out = x.new_empty((x.shape[0] // group_size(group), *x.shape[1:]))
    work = _reduce_scatter_into(out, x.contiguous(), group=group, async_op=async_op)
    return (out, work) if async_op else out

class CopyToTensorParallelRegion(torch.autograd.Function):
    """f: forward identity, backward all-reduce: every rank's column-parallel linear reads the same
    input, so each holds a partial gradient of it. Several tensors: one all-reduce of a flat buffer."""

    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        flat = all_reduce(torch.cat([grad.reshape(-1) for grad in grads]), ctx.group)
        return None, *(part.view_as(grad) for part, grad in zip(flat.split([x.numel() for x in grads]), grads))

class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """f̄: forward all-reduce, backward identity. Sums the row-parallel linear's partial outputs."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None

class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """g: forward all-gather along the sequence, backward reduce-scatter (not a split: every rank
    used the whole sequence, so each holds a partial gradient of every shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad, ctx.group), None

class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """ḡ: forward reduce-scatter along the sequence (this rank's rows of the sum), backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_sequence(grad, ctx.group), None

def f(x, group):  # the four operators as the layers call them: no-ops on one rank
    return x if group_size(group) == 1 else CopyToTensorParallelRegion.apply(group, x)[0]

def f_bar(x, group):
    return x if group_size(group) == 1 else ReduceFromTensorParallelRegion.apply(x, group)

def g(x, group):
    return x if group_size(group) == 1 else GatherFromSequenceParallelRegion.apply(x, group)

def g_bar(x, group):
    return x if group_size(group) == 1 else ReduceScatterToSequenceParallelRegion.apply(x, group)


# ----------------------------------------------------------------------------------------------
# parallel layers

class LinearWithSequenceGather(torch.autograd.Function):
    """g fused into a column-parallel linear: Y = all_gather(X_shard) W^T + b. Unfused, the linear would save
    the gathered (T, B, C) input for its weight gradient; this saves the (T/t, B, C) shard and gathers it
    again in backward: one more all-gather, and the paper's 10 + 24/t bytes per sbh become 34/t."""

    @staticmethod
    def forward(ctx, x_shard, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x_shard, weight)
        x = all_gather_sequence(x_shard, group)  # (T, B, C)
        return F.linear(x, weight, bias)  # (T, B, n/t)

    @staticmethod
    def backward(ctx, grad_y):  # each collective runs while a matmul that does not need it does
        x_shard, weight = ctx.saved_tensors
        x, gathering = all_gather_sequence(x_shard, ctx.group, async_op=True)  # (T, B, C), gathered again
        grad_x = grad_y @ weight  # (T, B, C), this rank's partial sum, while x is gathered
        gathering.wait()
        grad_x, scattering = reduce_scatter_sequence(grad_x, ctx.group, async_op=True)  # (T/t, B, C): g's backward
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])  # (T·B, n/t)
        grad_weight = grad_y2d.T @ x.reshape(-1, x.shape[-1])  # (n/t, C), while grad_x is reduce-scattered
        grad_bias = grad_y2d.sum(0) if ctx.has_bias else None
        scattering.wait()
        return grad_x, grad_weight, grad_bias, None

def column_parallel_linear(x, weight, bias, group, sequence_parallel):
    """Y = X W^T + b with W split by output features. x: (T/t, B, C) under SP, else (T, B, C)."""
    if sequence_parallel and group_size(group) > 1:
        return LinearWithSequenceGather.apply(x, weight, bias, group)  # g, then the linear
    return F.linear(f(x, group), weight, bias)

class ColumnParallelLinear(nn.Module):
    """Output features split across ranks. With chunks=3 (the fused QKV projection) each of the
    three chunks [q; k; v] is split separately, so rank r holds the q, k and v of its own heads."""

    def __init__(self, in_features, out_features, group, sequence_parallel, bias, chunks=1):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features // group_size(group), in_features))
        self.bias = nn.Parameter(torch.empty(out_features // group_size(group))) if bias else None
        self.shard_dims = {"weight": (0, chunks), "bias": (0, chunks)}  # (dim, chunks)

    def forward(self, x, add_bias=True):  # (T/t or T, B, C) -> (T, B, n/t)
        bias = self.bias if add_bias else None
        return column_parallel_linear(x, self.weight, bias, self.group, self.sequence_parallel)

class RowParallelLinear(nn.Module):
    """Input features split across ranks; each rank's product is a partial sum, reduced by f̄ (TP)
    or ḡ (SP). Returns (y, bias): the bias is added once, after the reduction, by the caller."""

    def __init__(self, in_features, out_features, group, sequence_parallel, bias):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // group_size(group)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.shard_dims = {"weight": (1, 1)}

    def forward(self, x, fwd):  # (T, B, n/t) -> (T/t, B, C) under SP, else (T, B, C)
        y = F.linear(x, self.weight)  # (T, B, C), partial sum over this rank's n/t inputs
        if self.sequence_parallel:
            y = g_bar(y, self.group)  # (T/t, B, C)
        else:
            y = f_bar(y, self.group)  # (T, B, C)
        return y, fwd.param(self.bias)  # under SP the bias as read through f, just below

def replicated_through_f(module, group, sequence_parallel):
    """Under SP the replicated parameters (LayerNorms, row-parallel biases, wpe) see one sequence
    shard, so each rank holds a partial gradient of them. The layers read them through one f, whose
    backward runs once every layer is done with them: one all-reduce of all their gradients, on every
    backward, so gradient accumulation and recomputation need nothing more. {parameter: its read}."""
    if not sequence_parallel or group_size(group) == 1:
        return {}
    params = [p for m in module.modules() for name, p in m.named_parameters(recurse=False)
              if name not in getattr(m, "shard_dims", {})]
    return dict(zip(params, CopyToTensorParallelRegion.apply(group, *params)))

class VocabParallelEmbedding(nn.Module):
    """Rows split by vocabulary: rank r holds tokens [r V'/t, (r+1) V'/t), V' = vocab_size padded to
    a multiple of t. Padding rows are never looked up, and their logits are masked out of the loss."""

    def __init__(self, vocab_size, dim, group):
        super().__init__()
        self.per_rank = -(-vocab_size // group_size(group))  # ceil(V / t)
        self.start = group_rank(group) * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        self.shard_dims = {"weight": (0, 1)}

    def forward(self, idx):  # (T, B) -> (T, B, C), zero rows for tokens of other ranks
        local = idx - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return x.masked_fill(outside[..., None], 0.0)

class GatherFromVocabRegion(torch.autograd.Function):
    """Logits split by vocabulary -> all of them on every rank (inference); backward keeps our slice."""

    @staticmethod
    def forward(ctx, x, group):  # (T, B, V'/t) -> (T, B, V')
        ctx.group = group
        return all_gather_sequence(x.movedim(-1, 0), group).movedim(0, -1)  # the vocabulary moved to dim 0

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(group_size(ctx.group), dim=-1)[group_rank(ctx.group)], None

def vocab_parallel_cross_entropy(logits, targets, vocab_start, vocab_size, group):
    """Mean cross-entropy of logits (T, B, V'/t) split by vocabulary, never gathered (Megatron-LM):
    log(sum_v exp(z_v - m)) - (z_target - m), each sum reduced by f̄, whose identity backward is
    right: every rank computes the same loss. Targets -1 and -100 are ignored (all ignored: 0)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    n, valid = logits.shape[-1], targets >= 0
    if group_size(group) == 1:  # the whole vocabulary, no padding: PyTorch's fused log-softmax and NLL
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=-1), ignore_index=-1, reduction="sum")
        return nll / valid.sum().clamp(min=1)
    if vocab_start + n > vocab_size:  # padding rows here: they never reach the loss
        logits = logits.masked_fill(torch.arange(n, device=logits.device) >= vocab_size - vocab_start, float("-inf"))
    with torch.no_grad():  # the max only stabilises exp; its gradient cancels
        m = all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)  # (T, B), over every rank's
    shifted = logits - m[..., None]
    sum_exp = f_bar(shifted.exp().sum(dim=-1), group)  # (T, B)
    local_target = targets - vocab_start
    mine = (local_target >= 0) & (local_target < n)
    picked = shifted.gather(-1, local_target.clamp(0, n - 1)[..., None])[..., 0]
    target_logit = f_bar(picked.masked_fill(~mine, 0.0), group)  # (T, B)
    return (sum_exp.log() - target_logit)[valid].sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------
# recomputation

class Recompute(torch.autograd.Function):
    """Run fn keeping only its tensor inputs; run it again in backward (activation recomputation).
    Dropout masks are a function of (key, offset) alone: the replay draws the first run's masks."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)
        torch.autograd.backward(outputs, grads)  # parameter gradients accumulate here
        return (None, *(x.grad for x in inputs))


# ----------------------------------------------------------------------------------------------
# the fusable ops: their definitions
#
# kernels.py has a CUDA version of each, with the same signature, reading its inputs once and
# writing its outputs once. A forward picks one set (`ops_for`); key=None means no dropout.

def bias_gelu(x, bias):
    """gelu_tanh(x + bias); bias may be None."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")

def dropout(x, p, key, offset):
    """x * keep / (1 - p), keep the hashed mask of (key, offset + element index); `where` saves
    the mask for backward, a bool, one byte per element."""
    if key is None or p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape, p, key, offset, x.device)
    return torch.where(keep, x * kernels.dropout_scale(p), 0.0)  # 1 / (1 - p) for p rounded to 2^-16

def bias_dropout_add(x, bias, residual, p, key, offset):
    """residual + dropout(x + bias); bias may be None."""
    return residual + dropout(x if bias is None else x + bias, p, key, offset)

def causal_softmax(scores, scale):
    """softmax(scores * scale + causal mask) over the last dim. scores: (a/t B, T, T)."""
    T = scores.shape[-1]
    mask = torch.full((T, T), float("-inf"), device=scores.device, dtype=scores.dtype).triu(1)
    return F.softmax(torch.add(mask, scores, alpha=scale), dim=-1)  # the add saves nothing; softmax its output

REFERENCE_OPS = SimpleNamespace(bias_gelu=bias_gelu, dropout=dropout, bias_dropout_add=bias_dropout_add,
                                causal_softmax=causal_softmax)

def ops_for(x, cfg):
    """kernels.py when cfg.fused_kernels, x is on CUDA and the kernels build (the first call on CUDA
    builds them); else nanosp's ops."""
    return kernels if cfg.fused_kernels and x.is_cuda and kernels.available() else REFERENCE_OPS

class ForwardContext(NamedTuple):
    """What one forward pass hands every layer; GPT.forward builds one per pass (the default: a Block alone)."""
    ops: SimpleNamespace = REFERENCE_OPS  # nanosp's definitions, or kernels.py
    seed: Optional[int] = None  # of this pass's dropout masks; None: no dropout
    through_f: Optional[dict] = None  # under SP: {replicated parameter: its read through f}

    def param(self, p):
        """p as a layer reads it: under SP a replicated parameter sees one sequence shard, so it is read
        through f, whose backward sums its gradient over the ranks (replicated_through_f); else p."""
        return p if self.through_f is None else self.through_f.get(p, p)

    def dropout_key(self, layer, site):
        return None if self.seed is None else dropout_key(self.seed, layer, site)


# ----------------------------------------------------------------------------------------------
# attention, MLP, block

SITE_ATTN_PROBS, SITE_ATTN_OUT, SITE_MLP_OUT, SITE_EMBED = 0, 1, 2, 3  # dropout sites (the embedding's: layer n_layer)

class LayerNorm(nn.Module):
    def __init__(self, dim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x, fwd):  # saves its input x: 2sbh (2sbh/t under SP)
        return F.layer_norm(x, x.shape[-1:], fwd.param(self.weight), fwd.param(self.bias), 1e-5)  # SP: through f

def core_attention(q, k, v, ops, p, key, offset):
    """softmax(Q K^T / sqrt(d) + causal mask), dropout, times V. q, k, v: (a/t B, T, d). This is
    what selective recomputation recomputes: its saved activations grow with s^2."""
    scores = torch.bmm(q, k.transpose(1, 2))  # (a/t B, T, T); saves Q, K: 4sbh/t
    probs = ops.causal_softmax(scores, 1.0 / math.sqrt(q.shape[-1]))  # saves softmax out: 2as^2b/t
    probs = ops.dropout(probs, p, key, offset)  # saves the mask: as^2b/t (one byte each)
    return torch.bmm(probs, v)  # (a/t B, T, d); saves dropout out 2as^2b/t and V 2sbh/t

# The same, fused: PyTorch's FlashAttention kernel (its CPU port on a CPU) on (1, B a/t, T, d) never stores the
# s^2 tensors and recomputes QK^T in its backward; it saves Q, K, V, its output (c_proj's input too) and one
# float32 log-sum-exp per head and row: 4asb/t bytes.
fused_attention = partial(F.scaled_dot_product_attention, is_causal=True)

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, group, layer):
        super().__init__()
        self.cfg, self.group, self.layer = cfg, group, layer
        self.head_dim = cfg.n_embd // cfg.n_head
        self.first_head = group_rank(group) * (cfg.n_head // group_size(group))  # this rank's heads
        self.c_attn = ColumnParallelLinear(cfg.n_embd, 3 * cfg.n_embd, group, cfg.sequence_parallel, cfg.bias, 3)
        self.c_proj = RowParallelLinear(cfg.n_embd, cfg.n_embd, group, cfg.sequence_parallel, cfg.bias)

    def forward(self, x, fwd, selective=False):  # x: (T/t, B, C) under SP, else (T, B, C); saved: 2sbh
        qkv = self.c_attn(x)  # (T, B, 3C/t)
        T, B, d = qkv.shape[0], qkv.shape[1], self.head_dim
        if self.cfg.attention == "sdpa":  # (1, B a/t, T, d), laid out (T, B a/t, d) like SDPA's output: c_proj's input
            q, k, v = (z.contiguous().view(T, -1, d).transpose(0, 1)[None] for z in qkv.chunk(3, dim=-1))
            attend, heads = fused_attention, "1 (B a) T d"
        else:  # heads outermost: this rank's probabilities are one block of the unsharded (a, B, T, T) ones
            q, k, v = rearrange(qkv, "T B (three a d) -> three (a B) T d", three=3, d=d)
            attend = partial(core_attention, ops=fwd.ops, p=self.cfg.dropout, offset=self.first_head * B * T * T,
                             key=fwd.dropout_key(self.layer, SITE_ATTN_PROBS))
            heads = "(a B) T d"
        y = Recompute.apply(attend, q, k, v) if selective else attend(q, k, v)  # selective: keeps Q, K, V only
        y = rearrange(y, f"{heads} -> T B (a d)", B=B)  # (T, B, C/t); saved by c_proj: 2sbh/t
        return self.c_proj(y, fwd)  # (T/t or T, B, C), bias

class MLP(nn.Module):
    def __init__(self, cfg, group):
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.n_embd, 4 * cfg.n_embd, group, cfg.sequence_parallel, cfg.bias)
        self.c_proj = RowParallelLinear(4 * cfg.n_embd, cfg.n_embd, group, cfg.sequence_parallel, cfg.bias)

    def forward(self, x, fwd):  # x: (T/t, B, C) under SP, else (T, B, C); saved: 2sbh
        h = fwd.ops.bias_gelu(self.c_fc(x, add_bias=False), self.c_fc.bias)  # (T, B, 4C/t); saves its input: 8sbh/t
        return self.c_proj(h, fwd)  # saves the GeLU output: 8sbh/t; returns (T/t or T, B, C), bias

class Block(nn.Module):
    def __init__(self, cfg, group, layer):
        super().__init__()
        self.cfg, self.group, self.layer = cfg, group, layer
        self.recompute = cfg.recompute_of(layer)  # this layer's mode: GPT.set_recompute changes it, never cfg
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg, group, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg, group)

    def forward(self, x, fwd=ForwardContext()):  # fwd: what this forward pass hands every layer
        if self.recompute == "full":  # keeps x (and the parameters read through f)
            replicated = [p for p in self.parameters() if p in (fwd.through_f or {})]
            def layer(x, *params):  # the replay reads the parameters it was given, as inputs
                return self._forward(x, fwd._replace(through_f=dict(zip(replicated, params))))
            return Recompute.apply(layer, x, *(fwd.through_f[p] for p in replicated))
        return self._forward(x, fwd)

    def _forward(self, x, fwd):  # x: (T/t, B, C) under SP, else (T, B, C)
        p, ops, key = self.cfg.dropout, fwd.ops, partial(fwd.dropout_key, self.layer)
        # a dropout region is this rank's slice of the global (T, B, C) tensor: rows from rank T/t
        offset = group_rank(self.group) * x.numel() if self.cfg.sequence_parallel else 0
        y, bias = self.attn(self.ln_1(x, fwd), fwd, selective=self.recompute == "selective")
        x = ops.bias_dropout_add(y, bias, x, p, key(SITE_ATTN_OUT), offset)  # saves the mask: sbh (sbh/t SP)
        y, bias = self.mlp(self.ln_2(x, fwd), fwd)
        return ops.bias_dropout_add(y, bias, x, p, key(SITE_MLP_OUT), offset)  # saves the mask: sbh (sbh/t SP)


# ----------------------------------------------------------------------------------------------
# GPT

class GPT(nn.Module):
    """A GPT-2-shaped model, tensor parallel over `group` (None: unsharded, no torch.distributed).
    logits, loss = model(idx, targets): with targets, the loss only (training never builds
    full-vocabulary logits); without, logits (B, T, vocab_size), the same on every rank."""

    def __init__(self, cfg, group=None):
        super().__init__()
        if group is not None and not dist.is_initialized():
            raise ValueError("a process group was given but torch.distributed is not initialized")
        cfg.check_tensor_parallel(group_size(group))
        self.cfg, self.group = cfg, group
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.n_embd, group)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, group, layer) for layer in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.forward_count = 0  # training forwards so far: part of every dropout mask's seed
        self.shard_dims = {f"{name}.{p}": spec for name, module in self.named_modules()
                           for p, spec in getattr(module, "shard_dims", {}).items()
                           if getattr(module, p, None) is not None}
        self.load_full_state_dict(init_full_state_dict(cfg, self.full_shapes()))

    def set_recompute(self, recompute):
        """Another plan (a mode, or one per layer) from the next forward on: each Block's mode, a new self.cfg."""
        self.cfg = dataclasses.replace(self.cfg, recompute=recompute)  # checks the plan
        for block in self.h:
            block.recompute = self.cfg.recompute_of(block.layer)

    def check_input(self, idx, targets):
        """Refuse what would otherwise run silently wrong."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be (B, T) int64, got {tuple(idx.shape)} {idx.dtype}")
        if targets is not None and (targets.shape != idx.shape or targets.dtype != torch.long):
            raise ValueError(f"targets must be int64 of idx's shape {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)} {targets.dtype}")
        if torch.is_autocast_enabled(idx.device.type):
            raise ValueError("torch.autocast is not supported (recomputation would rerun in another dtype): "
                             "cast the model, model.to(torch.bfloat16), with float32 masters as train.py does")
        self.cfg.check_sequence(idx.shape[1], self.tp_size)
        V = self.cfg.vocab_size
        bad = (idx < 0) | (idx >= V)
        if bad.any():  # a host sync, as each check of values
            raise ValueError(f"token id {idx[bad][0].item()} in idx is outside [0, vocab_size={V})")
        bad = None if targets is None else (targets >= V) | (targets < 0) & (targets != -1) & (targets != -100)
        if bad is not None and bad.any():
            raise ValueError(f"target {targets[bad][0].item()} is outside [0, vocab_size={V}) and is not "
                             f"an ignored position (-1, or PyTorch's -100)")

    def next_dropout_seed(self):
        """The seed of this forward's dropout masks (cfg.seed, training forwards before it), or None."""
        self.forward_count += self.training
        if self.training and self.cfg.dropout > 0:
            return forward_seed(self.cfg.seed, self.forward_count - 1)

    def forward(self, idx, targets=None):
        self.check_input(idx, targets)
        cfg, group, sp, rank = self.cfg, self.group, self.cfg.sequence_parallel, self.tp_rank
        fwd = ForwardContext(ops_for(idx, cfg), self.next_dropout_seed(), replicated_through_f(self, group, sp))

        x = self.wte(idx.T)  # (T, B, C), each rank's partial: only its vocabulary rows
        if sp:
            x = g_bar(x, group)  # (T/t, B, C)
        else:
            x = f_bar(x, group)  # (T, B, C)
        positions = torch.arange(x.shape[0], device=idx.device) + (rank * x.shape[0] if sp else 0)  # this rank's rows
        x = x + F.embedding(positions, fwd.param(self.wpe.weight))[:, None, :]  # wpe read through f under SP
        x = fwd.ops.dropout(x, cfg.dropout, fwd.dropout_key(cfg.n_layer, SITE_EMBED), x.numel() * rank if sp else 0)
        for block in self.h:
            x = block(x, fwd)
        x = self.ln_f(x, fwd)
        logits = column_parallel_linear(x, self.wte.weight, None, group, sp)  # (T, B, V'/t), tied head
        if targets is not None:
            return None, vocab_parallel_cross_entropy(logits, targets.T, self.wte.start, cfg.vocab_size, group)
        if self.tp_size > 1:
            logits = GatherFromVocabRegion.apply(logits, group)  # (T, B, V')
        return logits[..., :cfg.vocab_size].transpose(0, 1), None  # (B, T, V)

    # -- unsharded state dicts: the same keys and shapes at every t --------------------------------

    def full_shapes(self):
        """Every parameter's unsharded shape (the vocabulary without its padding)."""
        shapes = {name: list(p.shape) for name, p in self.named_parameters()}
        for name, (dim, _) in self.shard_dims.items():
            shapes[name][dim] *= self.tp_size
        shapes["wte.weight"][0] = self.cfg.vocab_size
        return {name: tuple(shape) for name, shape in shapes.items()}

    def local_tensor(self, name, full):
        """This rank's shard (a new tensor) of parameter `name`, or of a tensor shaped like it."""
        if name not in self.shard_dims:
            return full.clone()
        dim, chunks = self.shard_dims[name]
        if name == "wte.weight":  # pad the vocabulary to t * per_rank rows of zeros
            full = F.pad(full, (0, 0, 0, self.tp_size * self.wte.per_rank - full.shape[0]))
        parts = [chunk.chunk(self.tp_size, dim)[self.tp_rank] for chunk in full.chunk(chunks, dim)]
        return torch.cat(parts, dim)

    def full_tensor(self, name, local):
        """Collective: every rank's shard of `name` -> the unsharded tensor (a new one) on every rank."""
        if name not in self.shard_dims or self.tp_size == 1:
            return local.clone()
        dim, chunks = self.shard_dims[name]
        parts = []
        for chunk in local.chunk(chunks, dim):  # each of q, k, v, or the whole tensor
            gathered = all_gather_sequence(chunk.movedim(dim, 0), self.group)  # the split dimension moved to dim 0
            parts.append(gathered.movedim(0, dim))
        full = torch.cat(parts, dim)
        return full[: self.cfg.vocab_size] if name == "wte.weight" else full

    @torch.no_grad()
    def full_state_dict(self):
        """Collective: the unsharded state dict (on CPU), as the group=None model would have it."""
        return {name: self.full_tensor(name, p.detach()).cpu() for name, p in self.named_parameters()}

    @torch.no_grad()
    def load_full_state_dict(self, state_dict):
        """Load an unsharded state dict, keeping this rank's shard."""
        shapes = self.full_shapes()
        missing, unexpected = shapes.keys() - state_dict.keys(), state_dict.keys() - shapes.keys()
        if missing or unexpected:
            raise ValueError(f"state dict does not fit this model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        for name, shape in shapes.items():  # every entry is checked before anything changes
            value = state_dict[name]
            if not (torch.is_tensor(value) and value.is_floating_point() and tuple(value.shape) == shape):
                what = f"{tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"state dict entry {name} is {what}, this model needs a floating tensor "
                                 f"of shape {shape}")
        for name, p in self.named_parameters():
            p.copy_(self.local_tensor(name, state_dict[name].to(p.device, p.dtype)))

def init_full_state_dict(cfg, shapes):
    """GPT-2's initialisation of the unsharded weights, drawn from cfg.seed in a fixed order, so a
    model at any t starts from slices of the same full tensors."""
    gen = torch.Generator().manual_seed(cfg.seed)
    state_dict = {}
    for name, shape in shapes.items():
        if name.split(".")[-2].startswith("ln_") and name.endswith("weight"):
            state_dict[name] = torch.ones(shape)
        elif name.endswith("bias"):
            state_dict[name] = torch.zeros(shape)
        else:  # residual projections scaled by 1/sqrt(2 n_layer), as in GPT-2
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
            state_dict[name] = torch.randn(shape, generator=gen) * std
    return state_dict


# ----------------------------------------------------------------------------------------------
# dropout that does not depend on how the model is cut
#
# A mask bit is a pure function of (seed, layer, site, global element index): rank r of a t-way
# model draws exactly its slice of the unsharded model's mask, and recomputation replays it.
# (Megatron-LM instead forks separate CUDA RNG states for the sharded and the replicated regions.)
# p is rounded to 2^-16 by kernels.dropout_threshold / dropout_scale: kernels.py needs them and imports no nanosp.

M32 = 0xFFFFFFFF

def mix32(x, k=0):
    """A keyed 32-bit integer hash: two xor-shift-multiply rounds, the key k between them. Exact on
    Python ints and on int64 tensors of values < 2^32 (in place): the multipliers are < 2^31, so no
    product leaves int64. kernels.py computes the same bits in uint32 arithmetic."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x &= M32
    x ^= k ^ (x >> 15)
    x *= 0x2C1B3C6D
    x &= M32
    x ^= x >> 16
    return x

def forward_seed(seed, forward):
    """The 64-bit seed of one forward pass's masks: cfg.seed, and the training forwards before it."""
    return (seed & M32) << 32 | (forward & M32)

def dropout_key(seed, layer, site):
    """The 64-bit key of one dropout site of one layer in one forward pass (Python ints)."""
    k0 = mix32(mix32(seed & M32, (seed >> 32) & M32) ^ layer, site)
    return mix32(k0, 0x9E3779B9) << 32 | k0

def dropout_keep_mask(shape, p, key, offset, device=None):
    """Which elements dropout keeps. Element i of the local tensor (row-major) is element offset + i
    of the site's global tensor, so a shard of any cut draws its slice of the unsharded mask. One
    hash serves elements 2j and 2j + 1, 16 bits each, low half first (FlashAttention spends 8 bits):
    h = mix32(lo ^ k0, k1 + hi * 0x9E3779B9 mod 2^32), k0, k1 the key's 32-bit words, lo, hi j's."""
    numel = math.prod(shape)
    first, last = offset // 2, (offset + numel - 1) // 2  # the pairs holding this tensor's elements
    bits = torch.empty(last - first + 1, dtype=torch.int32, device=device)
    chunk = 2**16 if bits.device.type == "cpu" else 2**32  # on a CPU the hash's dozen passes stay in cache
    for j in range(first // chunk * chunk, last + 1, chunk):  # chunks aligned to 2^16 never cross 2^32
        start, end = max(j, first), min(j + chunk, last + 1)
        lo = torch.arange(start & M32, ((end - 1) & M32) + 1, device=device)
        h = mix32(lo ^ (key & M32), ((key >> 32) + (j >> 32) * 0x9E3779B9) & M32)
        # int16 is signed: each half's top bit is flipped, which keeps the order, shifted down by 2^15
        bits[start - first:end - first] = h ^ 0x80008000  # int64 -> int32, the same 32 bits
    halves = bits.view(torch.int16)  # the low half first (little-endian, as everywhere torch runs)
    return (halves[offset % 2:][:numel] >= kernels.dropout_threshold(p) - 2**15).view(shape)  # p rounded to 2^-16
