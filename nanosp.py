"""nanosp: tensor parallelism, sequence parallelism and selective activation recomputation,
in one GPT you can read top to bottom.

The three ideas, and where they live in this file:

1. Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM"). Attention is split by heads and the
   MLP by its hidden dimension across the t ranks of `group`: a ColumnParallelLinear followed by a
   RowParallelLinear, with the conjugate pair f (identity / all-reduce) and g (all-reduce / identity)
   around them. Sections "collectives" and "parallel layers".
2. Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
   Transformer Models"). LayerNorm and dropout, which tensor parallelism leaves replicated, run on
   T/t sequence shards; g becomes a reduce-scatter (g-bar) and f an all-gather (g-hat). The bytes on
   the wire stay the same; those activations shrink by t. `sequence_parallel=True`.
3. Selective activation recomputation (same paper). Only the core attention (QK^T, softmax,
   dropout, .V), large to store and cheap to recompute, is recomputed in backward.
   `recompute="selective"`; `recompute="full"` keeps only each layer's input. Section "recomputation".

The last section holds the ledgers that check the paper's numbers: saved-activation bytes per
layer (Table 2), FLOPs of a training step (Appendix A) and bytes sent by each collective.

Activations inside the layers are laid out (T, B, C), sequence first, so that a sequence shard is
a contiguous block and every shape comment marks the sharded dimension with /t.

    python nanosp.py                          # demo: 4 CPU processes, equivalence error, memory table
    torchrun --nproc_per_node=2 train.py      # training
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ----------------------------------------------------------------------------------------------
# config


RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    sequence_parallel: bool = False
    recompute: str = "none"  # "none" | "selective" | "full"
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
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={self.recompute!r} is not one of {RECOMPUTE_MODES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

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
            lower, upper = T // t * t, (T // t + 1) * t
            fits = " or ".join(str(n) for n in (lower, upper) if 0 < n <= self.block_size)
            raise ValueError(f"sequence length T={T} is not divisible by the tensor-parallel size t={t}, "
                             f"which sequence_parallel needs; T={fits or f'a multiple of {t}'} would fit")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------------
# dropout that does not depend on how the model is cut
#
# A mask bit is a pure function of (seed, layer, site, global element index): rank r of a t-way
# model draws exactly its slice of the unsharded model's mask, and recomputation replays it.
# (Megatron-LM instead forks separate CUDA RNG states for the sharded and the replicated regions.)

M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply), exact on int64 tensors and Python ints.

    Values stay in [0, 2**32). The multiplications are split into 16-bit halves so that no
    intermediate leaves int64: the CUDA kernels compute the same bits with uint32 arithmetic.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x, c):
    """(x * c) mod 2**32 for x < 2**32, without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def dropout_key(seed, layer, site):
    """The 32-bit key of one dropout site of one layer for one forward pass (Python ints)."""
    k = mix32(seed & M32)
    k = mix32(k ^ ((seed >> 32) & M32))
    k = mix32(k ^ (layer & M32))
    return mix32(k ^ (site & M32))


def dropout_keep_mask(shape, p, key, offset, device=None):
    """Which elements dropout keeps: True where hash(key, offset + i) >= p * 2**32.

    Element i of the local tensor (row-major) is element offset + i of the site's global
    tensor, so a shard of any cut draws exactly its slice of the unsharded model's mask.
    """
    numel = math.prod(shape)
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    u = mix32(mix32(key ^ (idx & M32)) ^ (idx >> 32))
    return (u >= int(p * 2**32)).view(shape)


class HashDropout(torch.autograd.Function):
    """out = x * keep / (1 - p); the mask is stored for backward as bool, one byte per element."""

    @staticmethod
    def forward(ctx, x, p, key, offset):
        keep = dropout_keep_mask(x.shape, p, key, offset, x.device)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return x.masked_fill(~keep, 0) * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0) * ctx.scale, None, None, None


# dropout sites of a layer (the embedding dropout uses layer index n_layer)
SITE_ATTN_PROBS, SITE_ATTN_OUT, SITE_MLP_OUT, SITE_EMBED = 0, 1, 2, 3


def dropout(x, p, key, offset, fused=None):
    """key None means no dropout (evaluation, or p == 0). The fused kernel regenerates the mask
    in backward instead of storing it."""
    if key is None or p == 0.0:
        return x
    if fused is not None:
        return fused.dropout(x.contiguous(), p, key, offset)
    return HashDropout.apply(x.contiguous(), p, key, offset)


# ----------------------------------------------------------------------------------------------
# collectives: the four conjugate pairs
#
# Each is a no-op on a group of one rank (and on group=None, the unsharded model). Under sequence
# parallelism every gather and scatter is along dim 0, the sequence: a shard is a contiguous block.


def group_size(group):
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group):
    return 0 if group is None else dist.get_rank(group)


# torch 2.13 names these all_gather_single / reduce_scatter_single; earlier releases, *_tensor
_all_gather_into = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _all_reduce(x, group):
    dist.all_reduce(x, group=group)
    return x


def _all_gather_sequence(x, group):
    """(T/t, ...) on each rank -> (T, ...), rank r's shard at rows [r T/t, (r+1) T/t)."""
    out = x.new_empty((x.shape[0] * group_size(group), *x.shape[1:]))
    _all_gather_into(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_sequence(x, group):
    """(T, ...) partial sums on each rank -> (T/t, ...): this rank's rows of the sum."""
    out = x.new_empty((x.shape[0] // group_size(group), *x.shape[1:]))
    _reduce_scatter_into(out, x.contiguous(), group=group)
    return out


class CopyToTensorParallelRegion(torch.autograd.Function):
    """f: forward identity, backward all-reduce. Entering a column-parallel linear (TP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """g: forward all-reduce, backward identity. Leaving a row-parallel linear (TP)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """g-hat: forward all-gather along the sequence, backward reduce-scatter. Entering a
    column-parallel linear (SP). The backward is a reduce-scatter, not a split: every rank's
    linear used the whole gathered sequence, so each holds a partial gradient for every shard."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_sequence(grad, ctx.group), None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """g-bar: forward reduce-scatter along the sequence, backward all-gather. Leaving a
    row-parallel linear (SP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_sequence(grad, ctx.group), None


def copy_to_tp(x, group):
    return x if group_size(group) == 1 else CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tp(x, group):
    return x if group_size(group) == 1 else ReduceFromTensorParallelRegion.apply(x, group)


def gather_from_sp(x, group):
    return x if group_size(group) == 1 else GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sp(x, group):
    return x if group_size(group) == 1 else ReduceScatterToSequenceParallelRegion.apply(x, group)


# ----------------------------------------------------------------------------------------------
# parallel layers


class LinearWithSequenceGather(torch.autograd.Function):
    """g-hat fused into a column-parallel linear: Y = all_gather(X_shard) W^T + b.

    Unfused, the linear would save the gathered (T, B, C) input for its weight gradient. This
    saves only the (T/t, B, C) shard and gathers it again in backward: one more all-gather, and the
    paper's 10 + 24/t bytes per sbh become 34/t.
    """

    @staticmethod
    def forward(ctx, x_shard, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x_shard, weight)
        x = _all_gather_sequence(x_shard, group)  # (T, B, C)
        return F.linear(x, weight, bias)  # (T, B, n/t)

    @staticmethod
    def backward(ctx, grad_y):
        x_shard, weight = ctx.saved_tensors
        x = _all_gather_sequence(x_shard, ctx.group)  # (T, B, C), gathered again
        grad_x = _reduce_scatter_sequence(grad_y @ weight, ctx.group)  # (T/t, B, C): g-hat's backward
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])  # (T·B, n/t)
        grad_weight = grad_y2d.T @ x.reshape(-1, x.shape[-1])  # (n/t, C)
        grad_bias = grad_y2d.sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


def column_parallel_linear(x, weight, bias, group, sequence_parallel):
    """Y = X W^T + b with W split by output features. x: (T/t, B, C) under SP, else (T, B, C)."""
    if sequence_parallel and group_size(group) > 1:
        return LinearWithSequenceGather.apply(x, weight, bias, group)
    return F.linear(copy_to_tp(x, group), weight, bias)


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
    """Input features split across ranks; each rank's product is a partial sum, reduced by g (TP)
    or g-bar (SP). Returns (y, bias): the bias is added once, after the reduction, by the caller."""

    def __init__(self, in_features, out_features, group, sequence_parallel, bias):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // group_size(group)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.shard_dims = {"weight": (1, 1)}

    def forward(self, x):  # (T, B, n/t) -> (T/t, B, C) under SP, else (T, B, C)
        y = F.linear(x, self.weight)  # (T, B, C), partial sum over this rank's n/t inputs
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group)  # (T/t, B, C)
        else:
            y = reduce_from_tp(y, self.group)  # (T, B, C)
        return y, sp_parameter(self.bias, self.group, self.sequence_parallel)


def sp_parameter(p, group, sequence_parallel):
    """A replicated parameter used on a sequence shard gets only that shard's gradient: f sums
    it over the group in backward. (LayerNorms, row-parallel biases, the position embedding.)"""
    if p is None or not sequence_parallel:
        return p
    return copy_to_tp(p, group)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary: rank r holds tokens [r V'/t, (r+1) V'/t), where V' is
    vocab_size padded up to a multiple of t. Padding rows are never looked up, and their logits
    are masked out of the loss."""

    def __init__(self, vocab_size, dim, group):
        super().__init__()
        t = group_size(group)
        self.vocab_size, self.group = vocab_size, group
        self.per_rank = -(-vocab_size // t)  # ceil(V / t)
        self.start = group_rank(group) * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        self.shard_dims = {"weight": (0, 1)}

    def forward(self, idx):  # (T, B) -> (T, B, C), zero rows for tokens of other ranks
        local = idx - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return x.masked_fill(outside[..., None], 0.0)


class GatherFromVocabRegion(torch.autograd.Function):
    """Logits split by vocabulary -> full logits on every rank (inference only; training never
    gathers them). Backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(group_size(ctx.group), dim=-1)[group_rank(ctx.group)], None


def vocab_parallel_cross_entropy(logits, targets, vocab_start, vocab_size, group):
    """Mean cross-entropy of logits split by vocabulary, without gathering them (Megatron-LM):
    loss = log(sum_v exp(z_v - m)) - (z_target - m), each sum reduced across the group.

    logits (T, B, V'/t); targets (T, B), -1 is ignored. g's backward is the identity, which is
    right here: every rank computes the same loss, and each logit belongs to one rank only.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    n = logits.shape[-1]
    vocab_ids = torch.arange(vocab_start, vocab_start + n, device=logits.device)
    logits = logits.masked_fill(vocab_ids >= vocab_size, float("-inf"))  # padding never reaches the loss
    with torch.no_grad():  # the max only stabilises exp; its gradient cancels
        m = logits.max(dim=-1).values  # (T, B)
        if group_size(group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - m[..., None]
    sum_exp = reduce_from_tp(shifted.exp().sum(dim=-1), group)  # (T, B)
    local_target = targets - vocab_start
    mine = (local_target >= 0) & (local_target < n)
    picked = shifted.gather(-1, local_target.clamp(0, n - 1)[..., None])[..., 0]
    target_logit = reduce_from_tp(picked.masked_fill(~mine, 0.0), group)  # (T, B)
    valid = targets != -1
    return (sum_exp.log() - target_logit)[valid].mean()


# ----------------------------------------------------------------------------------------------
# fused kernels (kernels.py) or their plain-PyTorch equivalents


def fused_kernels_for(x, cfg):
    """kernels.py when enabled and x is on CUDA and the extension builds; None means plain PyTorch."""
    if not (cfg.fused_kernels and x.is_cuda):
        return None
    import kernels  # imported lazily: it is only needed (and only builds) on CUDA

    return kernels if kernels.available() else None


def bias_gelu(x, bias, fused):
    if fused is not None:
        return fused.bias_gelu(x, bias)
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def bias_dropout_add(x, bias, residual, p, key, offset, fused):
    """residual + dropout(x + bias). The fused kernel regenerates the mask in backward instead of
    storing it, so it saves one byte per element less than the formula counts."""
    if fused is not None and key is not None:
        return fused.bias_dropout_add(x, bias, residual, p, key, offset)
    if bias is not None:
        x = x + bias
    return residual + dropout(x, p, key, offset)


def causal_softmax(scores, scale, fused):
    """softmax(scores * scale + causal mask) over the last dim. scores: (a/t B, T, T)."""
    if fused is not None:
        return fused.scale_mask_softmax(scores, scale)
    T = scores.shape[-1]
    mask = torch.full((T, T), float("-inf"), device=scores.device, dtype=scores.dtype).triu(1)
    return F.softmax(scores * scale + mask, dim=-1)  # adds save nothing; softmax saves its output


# ----------------------------------------------------------------------------------------------
# recomputation


class Recompute(torch.autograd.Function):
    """Run fn without keeping its activations; run it again in backward (activation
    recomputation). Only fn's tensor inputs are saved. Dropout masks are a function of
    (key, offset) alone, so the replay draws exactly the masks of the first run."""

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
        outputs = (outputs,) if torch.is_tensor(outputs) else outputs
        torch.autograd.backward(outputs, grads)  # parameter gradients accumulate here
        return (None, *(x.grad for x in inputs))


# ----------------------------------------------------------------------------------------------
# attention, MLP, block


class LayerNorm(nn.Module):
    def __init__(self, dim, bias, group, sequence_parallel):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x, fused):  # saves its input x: 2sbh (2sbh/t under SP)
        weight = sp_parameter(self.weight, self.group, self.sequence_parallel)
        bias = sp_parameter(self.bias, self.group, self.sequence_parallel)
        if fused is not None:
            return fused.layer_norm(x, weight, bias, 1e-5)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


def core_attention(q, k, v, p, key, offset, fused):
    """softmax(Q K^T / sqrt(d) + causal mask), dropout, times V. q, k, v: (a/t B, T, d).

    This is the part selective recomputation recomputes: its saved activations grow with s^2.
    """
    scores = torch.bmm(q, k.transpose(1, 2))  # (a/t B, T, T); saves Q, K: 4sbh/t
    probs = causal_softmax(scores, 1.0 / math.sqrt(q.shape[-1]), fused)  # saves softmax out: 2as^2b/t
    probs = dropout(probs, p, key, offset, fused)  # saves the mask: as^2b/t (one byte each)
    return torch.bmm(probs, v)  # (a/t B, T, d); saves dropout out 2as^2b/t and V 2sbh/t


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, group, layer):
        super().__init__()
        t = group_size(group)
        self.cfg, self.group, self.layer = cfg, group, layer
        self.head_dim = cfg.n_embd // cfg.n_head
        self.first_head = group_rank(group) * (cfg.n_head // t)  # this rank's heads
        self.c_attn = ColumnParallelLinear(cfg.n_embd, 3 * cfg.n_embd, group, cfg.sequence_parallel,
                                           cfg.bias, chunks=3)
        self.c_proj = RowParallelLinear(cfg.n_embd, cfg.n_embd, group, cfg.sequence_parallel, cfg.bias)

    def forward(self, x, seed, fused):  # x: (T/t, B, C) under SP, else (T, B, C); saved: 2sbh
        qkv = self.c_attn(x)  # (T, B, 3C/t)
        q, k, v = rearrange(qkv, "T B (three a d) -> three (a B) T d", three=3, d=self.head_dim)
        T, B = qkv.shape[0], qkv.shape[1]
        # the probabilities are laid out (a, B, T, T) with heads outermost: this rank's heads are one
        # contiguous block of the unsharded tensor, starting at element first_head * B T T
        key = None if seed is None else dropout_key(seed, self.layer, SITE_ATTN_PROBS)
        attend = partial(core_attention, p=self.cfg.dropout, key=key,
                         offset=self.first_head * B * T * T, fused=fused)
        if self.cfg.recompute == "selective":
            y = Recompute.apply(attend, q, k, v)  # keeps Q, K, V; recomputes the s^2 part
        else:
            y = attend(q, k, v)
        y = rearrange(y, "(a B) T d -> T B (a d)", B=B)  # (T, B, C/t); saved by c_proj: 2sbh/t
        return self.c_proj(y)  # (T/t or T, B, C), bias


class MLP(nn.Module):
    def __init__(self, cfg, group):
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.n_embd, 4 * cfg.n_embd, group, cfg.sequence_parallel, cfg.bias)
        self.c_proj = RowParallelLinear(4 * cfg.n_embd, cfg.n_embd, group, cfg.sequence_parallel, cfg.bias)

    def forward(self, x, fused):  # x: (T/t, B, C) under SP, else (T, B, C); saved: 2sbh
        h = self.c_fc(x, add_bias=False)  # (T, B, 4C/t)
        h = bias_gelu(h, self.c_fc.bias, fused)  # saves the GeLU input: 8sbh/t
        return self.c_proj(h)  # saves the GeLU output: 8sbh/t; returns (T/t or T, B, C), bias


class Block(nn.Module):
    def __init__(self, cfg, group, layer):
        super().__init__()
        self.cfg, self.group, self.layer = cfg, group, layer
        sp = cfg.sequence_parallel
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias, group, sp)
        self.attn = CausalSelfAttention(cfg, group, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias, group, sp)
        self.mlp = MLP(cfg, group)

    def forward(self, x, seed, fused):
        if self.cfg.recompute == "full":
            return Recompute.apply(partial(self._forward, seed=seed, fused=fused), x)  # keeps x only
        return self._forward(x, seed, fused)

    def _forward(self, x, seed, fused):  # x: (T/t, B, C) under SP, else (T, B, C)
        p = self.cfg.dropout
        # a dropout region is this rank's slice of the global (T, B, C) tensor: rows from rank T/t
        offset = group_rank(self.group) * x.numel() if self.cfg.sequence_parallel else 0
        key_attn = None if seed is None else dropout_key(seed, self.layer, SITE_ATTN_OUT)
        key_mlp = None if seed is None else dropout_key(seed, self.layer, SITE_MLP_OUT)
        y, bias = self.attn(self.ln_1(x, fused), seed, fused)
        x = bias_dropout_add(y, bias, x, p, key_attn, offset, fused)  # saves the mask: sbh (sbh/t SP)
        y, bias = self.mlp(self.ln_2(x, fused), fused)
        return bias_dropout_add(y, bias, x, p, key_mlp, offset, fused)  # saves the mask: sbh (sbh/t SP)


# ----------------------------------------------------------------------------------------------
# GPT


class GPT(nn.Module):
    """A GPT-2-shaped model, tensor parallel over `group` (None: unsharded, no torch.distributed).

    logits, loss = model(idx, targets): with targets, loss only (full-vocabulary logits are never
    built in training); without, logits (B, T, vocab_size) identical on every rank.
    """

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
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, group, cfg.sequence_parallel)
        self.forward_count = 0  # training forwards so far: part of every dropout mask's seed
        self.shard_dims = {f"{name}.{p}": spec for name, module in self.named_modules()
                           for p, spec in getattr(module, "shard_dims", {}).items()
                           if getattr(module, p, None) is not None}
        self.load_full_state_dict(init_full_state_dict(cfg, self.full_shapes()))

    def check_input(self, idx):
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be (B, T) int64, got {tuple(idx.shape)} {idx.dtype}")
        if torch.is_autocast_enabled(idx.device.type):
            raise ValueError("torch.autocast is not supported: recomputation would rerun in another dtype and "
                             "the sequence-gathering linear would mix dtypes. Cast the model instead, "
                             "model.to(torch.bfloat16), with float32 master weights as in train.py")
        self.cfg.check_sequence(idx.shape[1], self.tp_size)

    def forward(self, idx, targets=None):
        self.check_input(idx)
        cfg, group, sp = self.cfg, self.group, self.cfg.sequence_parallel
        seed = None
        if self.training and cfg.dropout > 0:
            seed = (cfg.seed & M32) << 32 | (self.forward_count & M32)
        if self.training:
            self.forward_count += 1
        fused = fused_kernels_for(idx, cfg)
        T, t, rank = idx.shape[1], self.tp_size, self.tp_rank

        x = self.wte(idx.T)  # (T, B, C), each rank's partial: only its vocabulary rows
        if sp:
            x = reduce_scatter_to_sp(x, group)  # (T/t, B, C)
            positions = torch.arange(rank * T // t, (rank + 1) * T // t, device=idx.device)
        else:
            x = reduce_from_tp(x, group)  # (T, B, C)
            positions = torch.arange(T, device=idx.device)
        x = x + F.embedding(positions, sp_parameter(self.wpe.weight, group, sp))[:, None, :]
        key = None if seed is None else dropout_key(seed, cfg.n_layer, SITE_EMBED)
        x = dropout(x, cfg.dropout, key, rank * x.numel() if sp else 0, fused)
        for block in self.h:
            x = block(x, seed, fused)
        x = self.ln_f(x, fused)
        logits = column_parallel_linear(x, self.wte.weight, None, group, sp)  # (T, B, V'/t), tied head

        if targets is not None:
            return None, vocab_parallel_cross_entropy(logits, targets.T, self.wte.start, cfg.vocab_size, group)
        if t > 1:
            logits = GatherFromVocabRegion.apply(logits, group)  # (T, B, V')
        return logits[..., :cfg.vocab_size].transpose(0, 1), None  # (B, T, V)

    # -- unsharded state dicts: the same keys and shapes at every t --------------------------------

    def full_shapes(self):
        shapes = {}
        for name, p in self.named_parameters():
            shape = list(p.shape)
            if name in self.shard_dims:
                shape[self.shard_dims[name][0]] *= self.tp_size
            if name == "wte.weight":
                shape[0] = self.cfg.vocab_size  # without the padding
            shapes[name] = tuple(shape)
        return shapes

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
            full = local.clone()
        else:
            dim, chunks = self.shard_dims[name]
            parts = []
            for chunk in local.chunk(chunks, dim):
                gathered = [torch.empty_like(chunk) for _ in range(self.tp_size)]
                dist.all_gather(gathered, chunk.contiguous(), group=self.group)
                parts.append(torch.cat(gathered, dim))
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
        for name, p in self.named_parameters():
            if tuple(state_dict[name].shape) != shapes[name]:
                raise ValueError(f"state dict entry {name} has shape {tuple(state_dict[name].shape)}, "
                                 f"this model needs {shapes[name]}")
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
# ledgers: the paper's numbers, counted
#
# s sequence length, b micro-batch, h hidden size, a heads, t tensor-parallel size, L layers, V vocab.


def paper_activation_bytes(s, b, h, a, t=1, sequence_parallel=False, recompute="none"):
    """Korthikanti et al. 2022, Table 2: activation bytes per layer, 16-bit activations and 1-byte
    dropout masks (the formula assumes dropout is on)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    scores = 5 * a * s / (h * t) if recompute == "none" else 0.0  # softmax, its mask, dropout output
    if sequence_parallel:
        return s * b * h * (34 / t + scores)
    return s * b * h * (10 + 24 / t + scores)


def _init_for_measurement(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def measure_activation_bytes(cfg, group=None, batch=1, seq=None, dtype=torch.bfloat16, device="cpu"):
    """The bytes autograd saves for backward during one layer's forward, term by term.

    Counted with saved_tensors_hooks: each storage once, floating elements at 2 bytes (as in the
    paper's 16-bit accounting, whatever dtype runs), bool masks at 1 byte, parameters excluded.
    Returns (total, rows) with rows [(where, shape, dtype, bytes)]; `where` is the sub-module
    that was running when the tensor was saved. With kernels.py on CUDA the residual-dropout
    masks are regenerated rather than stored, and this comes in under the formula.
    """
    seq = seq or cfg.block_size
    t = group_size(group)
    block = Block(cfg, group, layer=0).to(device, dtype)
    _init_for_measurement(block, torch.Generator().manual_seed(cfg.seed))
    rows_here = seq // t if cfg.sequence_parallel else seq
    x = torch.randn(rows_here, batch, cfg.n_embd, device=device, dtype=dtype, requires_grad=True)
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    where, saved = ["block input"], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved:
            elements = storage.nbytes() // tensor.element_size()
            nbytes = elements * (2 if tensor.is_floating_point() else tensor.element_size())
            saved[storage.data_ptr()] = (where[0], tuple(tensor.shape), str(tensor.dtype)[6:], nbytes)
        return tensor

    hooks = []
    for name in ("ln_1", "attn", "ln_2", "mlp"):
        module = getattr(block, name)
        hooks.append(module.register_forward_pre_hook(lambda *_, n=name: where.__setitem__(0, n)))
        hooks.append(module.register_forward_hook(lambda *_, n=name: where.__setitem__(0, f"after {n}")))
    seed = cfg.seed if cfg.dropout > 0 else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = block(x, seed, fused_kernels_for(x, cfg))
    for hook in hooks:
        hook.remove()
    del y
    rows = list(saved.values())
    return sum(r[3] for r in rows), rows


def activation_table(cfg, group, batch=1, seq=None, dtype=torch.bfloat16, device="cpu"):
    """Table 2's six rows for cfg's shape at t = size of group: measured bytes beside the formula.
    Collective: every rank of the group calls it."""
    seq, t = seq or cfg.block_size, group_size(group)
    rows = []
    for name, sp, recompute in [("no parallelism", False, "none"), ("tensor parallel", False, "none"),
                                ("tensor + sequence parallel", True, "none"),
                                ("tensor parallel + selective recompute", False, "selective"),
                                ("tensor + sequence parallel + selective recompute", True, "selective"),
                                ("full recompute", False, "full")]:
        g = None if name == "no parallelism" else group
        variant = GPTConfig(**{**cfg.__dict__, "sequence_parallel": sp, "recompute": recompute})
        measured, _ = measure_activation_bytes(variant, g, batch, seq, dtype, device)
        formula = paper_activation_bytes(seq, batch, cfg.n_embd, cfg.n_head, group_size(g), sp, recompute)
        rows.append(dict(configuration=name, t=group_size(g), measured=measured, formula=formula,
                         ratio=measured / formula))
    return rows


def paper_training_flops(B, L, s, h, V, recompute="none"):
    """Korthikanti et al. 2022, Appendix A: FLOPs of one training iteration (matrix multiplies).
    Model FLOPs 72 B L s h^2 (1 + s/6h + V/12hL); with selective recompute the paper writes
    s/3h for s/6h; full recompute adds one forward of every layer: 96 B L s h^2 (1 + s/6h + V/16hL)."""
    if recompute == "full":
        return 96 * B * L * s * h**2 * (1 + s / (6 * h) + V / (16 * h * L))
    attention = s / (3 * h) if recompute == "selective" else s / (6 * h)
    return 72 * B * L * s * h**2 * (1 + attention + V / (12 * h * L))


def exact_training_flops(B, L, s, h, V, recompute="none"):
    """The matrix-multiply FLOPs nanosp runs for one training step (forward + backward = 3x forward).
    A layer's forward: QKV 6Bsh^2, QK^T 2Bs^2h, .V 2Bs^2h, projection 2Bsh^2, MLP 16Bsh^2;
    the LM head 2BshV. Selective recompute runs QK^T and .V once more, full the whole layer."""
    layer = 24 * B * s * h**2 + 4 * B * s**2 * h
    total = 3 * (L * layer + 2 * B * s * h * V)
    if recompute == "selective":
        total += L * 4 * B * s**2 * h
    if recompute == "full":
        total += L * layer
    return total


def count_training_flops(cfg, batch, seq=None):
    """FLOPs of one forward + backward of the unsharded model, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    seq = seq or cfg.block_size
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops()


def measure_communication(cfg, group, batch=1, seq=None, dtype=torch.bfloat16, device="cpu"):
    """Every collective of one layer's forward and backward: (phase, caller, op, bytes of the full
    message). Ring algorithms send 2(t-1)/t of that per rank for an all-reduce and (t-1)/t for an
    all-gather or a reduce-scatter: one all-reduce costs one reduce-scatter plus one all-gather."""
    import inspect

    from torch.utils._python_dispatch import TorchDispatchMode

    seq, t = seq or cfg.block_size, group_size(group)
    log, phase = [], ["forward"]

    class CollectiveLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                op = func.__name__.split(".")[0].strip("_")
                tensors = args[0] if isinstance(args[0], list) else [args[0]]
                if op == "reduce_scatter_base":  # the message is the full input, not the output shard
                    tensors = [args[1]]
                caller = next(f.frame.f_code.co_qualname for f in inspect.stack()
                              if f.filename == __file__ and not f.function.startswith("_"))
                log.append((phase[0], caller, op, sum(x.numel() * x.element_size() for x in tensors)))
            return func(*args, **(kwargs or {}))

    block = Block(cfg, group, layer=0).to(device, dtype)
    _init_for_measurement(block, torch.Generator().manual_seed(cfg.seed))
    rows_here = seq // t if cfg.sequence_parallel else seq
    x = torch.randn(rows_here, batch, cfg.n_embd, device=device, dtype=dtype, requires_grad=True)
    with CollectiveLog():
        y = block(x, None, None)
        phase[0] = "backward"
        y.backward(torch.ones_like(y))
    return log


def ring_bytes_sent(op, nbytes, t):
    """Bytes one rank sends for a collective of an nbytes message under the ring algorithm."""
    return (2 if op == "allreduce" else 1) * (t - 1) * nbytes / t


# ----------------------------------------------------------------------------------------------
# demo: python nanosp.py


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _demo(rank, world, port):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    group, say = dist.group.WORLD, (print if rank == 0 else lambda *a: None)

    # 1. one training step of a t-way model with SP + selective recompute + dropout equals the unsharded step
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=8, n_embd=64, dropout=0.1,
                    sequence_parallel=True, recompute="selective")
    reference = GPT(GPTConfig(**{**cfg.__dict__, "sequence_parallel": False, "recompute": "none"})).double()
    sharded = GPT(cfg, group).double()
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
    cfg = GPTConfig(vocab_size=256, block_size=1024, n_layer=1, n_head=8, n_embd=512, dropout=0.1)
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
