"""autoshard proven on modules written the ordinary way: discover finds the plan derived by hand, and shard
runs it equal to the unsharded module.

The models are plain torch (a Llama block, a GPT-J parallel block, a stack of four linears, a narrow MLP,
grouped-query attention written out, a mean over a wide layer, a Mistral block, timm's ViT block, a block of chunk,
einsum and GEGLU, four square linears each added to its own input, LayerScale, Mamba's gated depthwise convolution,
a convolutional block of BatchNorm, GroupNorm and pools, a block that writes into its activations),
Hugging Face's GPT2Block and LlamaDecoderLayer as transformers ships them, and nanosp's own Block, its attention
written out or through SDPA. The optimum of each is derived by hand in its test; N is the bytes of the block's
activation (B T C at the inputs' element size), and a rank sends 2(t-1)/t N for an all-reduce, (t-1)/t N for an
all-gather or a reduce-scatter. Whole models shard equal too: a GPT with tied embeddings (ids in, logits out, its
tied weight's gradient under both of its names) and returning its loss, transformers' GPT2Model, GPTNeoXModel,
FalconModel, RobertaModel, BertModel with a padding mask and ViTModel on pixels; and an MLP returning each of five
losses. A GPT trained a few AdamW steps on its shards keeps the unsharded model's losses, and every option the rules
allow any op, forced into the plan one op at a time, runs equal: what the search could pick is sound too.

Equivalence runs in one world of 4 gloo processes, started once per test session (test_nanosp's World): each rank
discovers the plan on a meta-device copy, shards a real float64 module with it, and compares outputs, input
gradients and full_grads() with the unsharded module, relative to the largest reference element (under 1e-10;
what remains is reduction order). The collectives shard runs, logged by ledgers.collective_log, equal the plan's.
"""
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import autoshard
import ledgers
import nanosp
from test_nanosp import rel_err, world  # noqa: F401 (world: the one gloo world of the session, a fixture)

TOL = 1e-10

# ----------------------------------------------------------------------------------------------
# the models, written the ordinary way


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Llama(nn.Module):
    """A Llama block: RMSNorm, separate q, k, v, o without bias, rotary, causal attention, SwiGLU."""

    def __init__(self, C, H, F_, T):
        super().__init__()
        self.H = H
        self.attention_norm, self.ffn_norm = RMSNorm(C), RMSNorm(C)
        self.q, self.k, self.v, self.o = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(C, F_, bias=False), nn.Linear(C, F_, bias=False), nn.Linear(F_, C, bias=False)
        inv = 1.0 / 10000 ** (torch.arange(0, C // H, 2).float() / (C // H))
        freqs = torch.outer(torch.arange(T).float(), inv)
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin(), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.attention_norm(x)
        q, k, v = (p(h).view(B, T, self.H, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(y)
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class GPTJ(nn.Module):
    """GPT-J's parallel block: attention (interleaved rotary, written out with masked_fill and softmax) and the
    MLP read one LayerNorm output and add into the residual together."""

    def __init__(self, C, H, T):
        super().__init__()
        self.H = H
        self.ln_1 = nn.LayerNorm(C)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.fc_in, self.fc_out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        freqs = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, C // H, 2).float() / (C // H)))
        self.register_buffer("sin", freqs.sin().repeat_interleave(2, -1), persistent=False)
        self.register_buffer("cos", freqs.cos().repeat_interleave(2, -1), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(T, T, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln_1(x)
        q, k, v = (p(h).view(B, T, self.H, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.cos[:T, None].to(x.dtype), self.sin[:T, None].to(x.dtype)
        q, k = (z * cos + rotate_every_two(z) * sin for z in (q, k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~self.causal[:T, :T], torch.finfo(att.dtype).min).softmax(dim=-1)
        y = self.out_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return y + self.fc_out(F.gelu(self.fc_in(h), approximate="tanh")) + x


class MLPStack(nn.Module):
    """Four linears: C -> 4C -> C -> 4C -> C, GeLUs between the wide ones."""

    def __init__(self, C):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Linear(C, 4 * C), nn.GELU(),
                                 nn.Linear(4 * C, C))

    def forward(self, x):
        return self.net(x)


class NarrowMLP(nn.Module):
    """An MLP whose hidden size H is smaller than its width C, with a residual."""

    def __init__(self, C, H):
        super().__init__()
        self.up, self.down = nn.Linear(C, H), nn.Linear(H, C)

    def forward(self, x):
        return x + self.down(F.relu(self.up(x)))


class GroupedQuery(nn.Module):
    """Grouped-query attention as Hugging Face's Llama writes it: fewer k, v heads, repeated by expand and reshape;
    the attention written out, a causal mask by masked_fill, then softmax."""

    def __init__(self, C, H, groups=2):
        super().__init__()
        self.H, self.KV, self.d = H, H // groups, C // H
        self.norm = nn.RMSNorm(C)
        self.q, self.o = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.k, self.v = nn.Linear(C, self.KV * self.d, bias=False), nn.Linear(C, self.KV * self.d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, T, self.H, self.d).transpose(1, 2)
        k, v = (p(h).view(B, T, self.KV, self.d).transpose(1, 2) for p in (self.k, self.v))
        k, v = (z[:, :, None].expand(B, self.KV, self.H // self.KV, T, self.d).reshape(B, self.H, T, self.d) for z in (k, v))
        att = (q @ k.transpose(-2, -1)) * self.d ** -0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf")).softmax(-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(B, T, C))


class MeanGate(nn.Module):
    """x scaled by the mean of a wide hidden layer: a mean over a split index is a part of the whole mean."""

    def __init__(self, C):
        super().__init__()
        self.fc = nn.Linear(C, 4 * C)

    def forward(self, x):
        return x * F.gelu(self.fc(x)).mean(-1, keepdim=True)


class Mistral(nn.Module):
    """A Mistral block: RMSNorm computed in float32 and cast back by type_as, KV < H heads repeated to the query
    heads by repeat_interleave, SDPA, transpose(1, 2).contiguous().view(...), SwiGLU."""

    def __init__(self, C, H, KV, F_):
        super().__init__()
        self.H, self.KV, self.d = H, KV, C // H
        self.wq, self.wo = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.wk, self.wv = nn.Linear(C, KV * self.d, bias=False), nn.Linear(C, KV * self.d, bias=False)
        self.attention_norm, self.ffn_norm = nn.Parameter(torch.ones(C)), nn.Parameter(torch.ones(C))
        self.w1, self.w3, self.w2 = nn.Linear(C, F_, bias=False), nn.Linear(C, F_, bias=False), nn.Linear(F_, C, bias=False)

    def norm(self, x, weight):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * weight

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm(x, self.attention_norm)
        q = self.wq(h).view(B, T, self.H, self.d).transpose(1, 2)
        k = self.wk(h).view(B, T, self.KV, self.d).transpose(1, 2).repeat_interleave(self.H // self.KV, dim=1)
        v = torch.repeat_interleave(self.wv(h).view(B, T, self.KV, self.d).transpose(1, 2), self.H // self.KV, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(y.transpose(1, 2).contiguous().view(B, T, C))
        h = self.norm(x, self.ffn_norm)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class ViT(nn.Module):
    """A ViT block as timm writes it: qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0), the output
    flatten(2)-ed, biases in every linear, GeLU (tanh), dropout (the module in eval())."""

    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (C // self.H) ** -0.5
        x = x + self.drop(self.proj((att.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh")))


class ChunkEinsum(nn.Module):
    """q, k, v by .chunk(3, dim=-1), attention by torch.einsum, nanoGPT's causal mask (a registered tril buffer,
    sliced, expanded, masked_fill), and a GEGLU MLP whose fused up projection is .chunk(2, -1)-ed."""

    def __init__(self, C, H, T):
        super().__init__()
        self.H = H
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.out = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
        self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(2 * C, C)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.H, C // self.H) for z in self.qkv(self.ln_1(x)).chunk(3, dim=-1))
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(C // self.H)
        s = s.masked_fill(self.bias[:, :, :T, :T].expand(B, self.H, T, T) == 0, float("-inf"))
        x = x + self.out(torch.einsum("bhts,bshd->bthd", F.softmax(s, dim=-1), v).reshape(B, T, C))
        a, b = self.up(self.ln_2(x)).chunk(2, -1)
        return x + self.down(F.gelu(a) * b)


class HFLlama(nn.Module):
    """transformers' LlamaDecoderLayer (SDPA attention, KV = H/2 heads), called as LlamaModel calls it: the
    rotary cos, sin of positions 0..T-1 from its LlamaRotaryEmbedding."""

    def __init__(self, C, H, T):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = LlamaConfig(hidden_size=C, num_attention_heads=H, num_key_value_heads=H // 2,
                          intermediate_size=3 * C // 2, max_position_embeddings=T, attn_implementation="sdpa")
        self.layer, self.rotary = LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self.layer(x, position_ids=positions, position_embeddings=self.rotary(x, positions))


def gpt2_block(C, H, T):
    """Hugging Face's GPT2Block, as transformers ships it (eval(): its dropouts off)."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return GPT2Block(GPT2Config(n_embd=C, n_head=H, n_positions=T)).eval()


def nanosp_block(C, H, T, attention="explicit"):
    return nanosp.Block(nanosp.GPTConfig(block_size=T, n_layer=1, n_head=H, n_embd=C, attention=attention), None, 0)


# name: (build(B, T, C, H) -> module, the input's dims)
class ResidualLinears(nn.Module):
    """x + gelu(W x + b), four times: each W's output is added to its own input, so that its rows and columns would
    be one index; the last adds it the other way round, its input second."""

    def __init__(self, C, n=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(C, C) for _ in range(n))

    def forward(self, x):
        for k, lin in enumerate(self.layers):
            x = x + F.gelu(lin(x)) if k < len(self.layers) - 1 else F.gelu(lin(x)) + x
        return x


class MaxMLP(nn.Module):
    """torch.max both ways: of two tensors (max.other: a ReLU) and along a dim (max.dim: values and indices), as
    attention masks and max-pooling write them."""

    def __init__(self, C):
        super().__init__()
        self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        h = self.up(x)
        peak = h.max(-1, keepdim=True).values
        return x + self.down(torch.max(h, torch.zeros((), dtype=h.dtype)) - peak)


class MetaLlama(nn.Module):
    """A Llama block as Meta's reference code writes it: rotary as a complex product (view_as_complex of (d/2, 2)
    pairs times a table made by torch.polar, view_as_real, flatten), H/2 k, v heads repeated by expand and
    reshape before the transpose to (B, H, T, d), SDPA, SwiGLU, RMSNorm written out."""

    def __init__(self, C, H, T):
        super().__init__()
        self.H, self.KV, self.d = H, H // 2, C // H
        self.wq, self.wo = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.wk, self.wv = nn.Linear(C, self.KV * self.d, bias=False), nn.Linear(C, self.KV * self.d, bias=False)
        self.w1, self.w3 = nn.Linear(C, 2 * C, bias=False), nn.Linear(C, 2 * C, bias=False)
        self.w2 = nn.Linear(2 * C, C, bias=False)
        self.attention_norm, self.ffn_norm = RMSNorm(C), RMSNorm(C)
        angles = torch.outer(torch.arange(T, dtype=torch.float64),
                             10000.0 ** -(torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rotary(self, x):  # x: (B, T, heads, d)
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * self.freqs_cis[:x.shape[1], None]).flatten(3).type_as(x)

    def forward(self, x):
        B, T, C = x.shape
        h = self.attention_norm(x)
        q = self.rotary(self.wq(h).view(B, T, self.H, self.d))
        k = self.rotary(self.wk(h).view(B, T, self.KV, self.d))
        v = self.wv(h).view(B, T, self.KV, self.d)
        k, v = (z[:, :, :, None].expand(B, T, self.KV, 2, self.d).reshape(B, T, self.H, self.d) for z in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).contiguous().view(B, T, C))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TopKMoE(nn.Module):
    """Top-2 routing over E experts as small mixture-of-experts code writes it: the router's logits' topk, the two
    weights' softmax, then every expert (an MLP) run on every token and weighted by its gate,
    (weights * (indices == e)).sum(-1)."""

    def __init__(self, C, E=4):
        super().__init__()
        self.router = nn.Linear(C, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
                                     for _ in range(E))

    def forward(self, x):
        weights, indices = self.router(x).topk(2, dim=-1)
        weights, out = weights.softmax(-1), torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (indices == e)).sum(-1, keepdim=True) * expert(x)
        return x + out


class Decomposed(nn.Module):
    """An MLP through ops that have no rule of their own but a decomposition in torch (relu6, SELU, CELU, threshold,
    hardshrink, nan_to_num, lerp, addcmul, tril, F.normalize) and ops with rules of their own (F.glu by its
    halves, exp2, sign, floor; along T, a token shift by F.pad and a slice, flip, roll, index_select; movedim,
    std_mean); and a side projection padded by 0.5, then summed. (Not hardsigmoid: eager's backward scales by a
    float32 1/6, 3e-8 from float64's.)"""

    def __init__(self, C):
        super().__init__()
        self.up, self.down, self.side = nn.Linear(C, 4 * C), nn.Linear(2 * C, C), nn.Linear(2 * C, C)

    def forward(self, x):
        T = x.shape[1]
        a = F.glu(self.up(x), -1)
        a = F.relu6(a) + F.selu(a) * F.celu(a) + F.threshold(a, 0.1, -1.0) + F.hardshrink(a, 0.2)
        a = torch.lerp(a, torch.addcmul(a, a, a, value=0.5), 0.3) + torch.nan_to_num(a.exp2()) * a.sign() * a.floor()
        y = self.down(a)
        reverse = torch.arange(T - 1, -1, -1, device=x.device)
        y = y + F.pad(y, (0, 0, 1, 0))[:, :-1].flip(1).roll(1, 1).index_select(1, reverse)
        y = torch.tril(y.movedim(1, 2)).movedim(2, 1)
        side = F.pad(self.side(a), (0, 1), value=0.5).sum(-1, keepdim=True)
        return x + F.normalize(y, dim=-1) * torch.std_mean(y, -1, keepdim=True)[0] + side


class GatedConv(nn.Module):
    """Mamba's and H3's convolution branch: a LayerNorm, an input projection to two halves u, z (chunk), a causal
    depthwise Conv1d along T on u (groups = its channels, padded by k - 1, the first T kept), silu(u) silu(z),
    an output projection."""

    def __init__(self, C, k=4):
        super().__init__()
        self.norm, self.inp, self.out = nn.LayerNorm(C), nn.Linear(C, 4 * C, bias=False), nn.Linear(2 * C, C)
        self.conv = nn.Conv1d(2 * C, 2 * C, k, groups=2 * C, padding=k - 1)

    def forward(self, x):
        u, z = self.inp(self.norm(x)).chunk(2, dim=-1)
        u = self.conv(u.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        return x + self.out(F.silu(u) * F.silu(z))


class ConvNorms(nn.Module):
    """A convolutional block on (B, T, C) read as C channels along T: BatchNorm1d in training (batch statistics,
    none kept), GroupNorm, a Conv1d to 2C (kernel 3), BatchNorm1d in eval (its running statistics fixed buffers),
    GELU, a max pool plus an average pool along T (kernel 3, stride 1, padded by 1), a 1x1 Conv1d back to C."""

    def __init__(self, C, groups):
        super().__init__()
        self.norm, self.up, self.bn = nn.GroupNorm(groups, C), nn.Conv1d(C, 2 * C, 3, padding=1), nn.BatchNorm1d(2 * C)
        self.down, self.batch = nn.Conv1d(2 * C, C, 1), nn.BatchNorm1d(C, track_running_stats=False)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 2 * C))
            self.bn.running_var.copy_(torch.linspace(0.5, 2.0, 2 * C))
        self.bn.eval()

    def forward(self, x):
        h = F.gelu(self.bn(self.up(self.norm(self.batch(x.transpose(1, 2))))))
        h = F.max_pool1d(h, 3, 1, 1) + F.avg_pool1d(h, 3, 1, 1)
        return x + self.down(h).transpose(1, 2)


class Writes(nn.Module):
    """Writes into activations, as code does in place: h[:, 0] = 0 and a slice of T written (copy, slice_scatter),
    h[h > 1] = 0.5, h[:, every third of T] = 0.25 and h[:, [0, -1]] = h[:, [1, 0]] (index_put by masks and by
    indices), a cumprod along T, tensor_split into quarters (a * b + c, the fourth unused), and the residual
    copied into a new tensor with copy_."""

    def __init__(self, C):
        super().__init__()
        self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(C, C)

    def forward(self, x):
        h = F.gelu(self.up(x)).clone()
        h[:, 0] = 0.0
        h[:, 1:3] = h[:, 1:3] * 2
        h[h > 1] = 0.5
        h[:, torch.arange(x.shape[1], device=x.device) % 3 == 1] = 0.25
        h[:, [0, -1]] = h[:, [1, 0]]
        a, b, c, _ = torch.tensor_split(h * torch.sigmoid(h).cumprod(1), 4, dim=-1)  # (the last quarter unused)
        return torch.empty_like(x).copy_(x) + self.down(a * b + c)


MODELS = {
    "llama": (lambda B, T, C, H: Llama(C, H, 3 * C // 2, T), None),
    "gptj": (lambda B, T, C, H: GPTJ(C, H, T), None),
    "mlp4": (lambda B, T, C, H: MLPStack(C), None),
    "narrow": (lambda B, T, C, H: NarrowMLP(C, C // 4), None),
    "gpt2": (lambda B, T, C, H: gpt2_block(C, H, T), None),
    "gqa": (lambda B, T, C, H: GroupedQuery(C, H), None),
    "meangate": (lambda B, T, C, H: MeanGate(C), None),
    "mistral": (lambda B, T, C, H: Mistral(C, H, H // 4, 3 * C // 2), None),
    "vit": (lambda B, T, C, H: ViT(C, H).eval(), None),
    "chunkeinsum": (lambda B, T, C, H: ChunkEinsum(C, H, T), None),
    "hfllama": (lambda B, T, C, H: HFLlama(C, H, T), None),
    "residual": (lambda B, T, C, H: ResidualLinears(C), None),
    "max": (lambda B, T, C, H: MaxMLP(C), None),
    "metallama": (lambda B, T, C, H: MetaLlama(C, H, T), None),
    "moe": (lambda B, T, C, H: TopKMoE(C), None),
    "decomposed": (lambda B, T, C, H: Decomposed(C), None),
    "layerscale": (lambda B, T, C, H: LayerScale(C), None),
    "gatedconv": (lambda B, T, C, H: GatedConv(C), None),
    "convnorms": (lambda B, T, C, H: ConvNorms(C, H), None),
    "writes": (lambda B, T, C, H: Writes(C), None),
    "nanosp": (lambda B, T, C, H: nanosp_block(C, H, T), "T B C"),
    "nanosp_sdpa": (lambda B, T, C, H: nanosp_block(C, H, T, "sdpa"), "T B C"),
}


def randomized(module, gen=None):
    """module with every parameter drawn from N(0, 0.3^2) (by gen, or torch's global generator), so that no norm
    weight is 1 and no bias 0."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


def built(name, B, T, C, H, device="meta", dtype=torch.float64, seed=0):
    """The model and its input on `device` (meta: nothing computed); real ones with random weights, every norm's
    weight and bias included."""
    build, dims = MODELS[name]
    with torch.device(device):
        module = build(B, T, C, H).to(dtype)
    x_shape = (T, B, C) if dims else (B, T, C)
    if device == "meta":
        return module, torch.empty(x_shape, device="meta", dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return randomized(module, gen), torch.randn(x_shape, generator=gen, dtype=dtype)


def plan_of(name, B=2, T=16, C=64, H=8, t=2, constraint="weights"):
    """discover on the model, on the meta device, in float64."""
    module, x = built(name, B, T, C, H)
    return autoshard.discover(module, (x,), t, dims=MODELS[name][1], constraint=constraint)


def split_dim(plan, parameter):
    """Which dim of a parameter the plan splits, and the size of the index it splits it along (None: whole)."""
    v = next(v for v in plan.graph.values.values() if v.target == parameter)
    p = plan.placements.get(v.name, autoshard.R)
    if p.kind != "S":
        return None
    return next(d for d, dim in enumerate(v.dims) if p.index in dim), plan.graph.idx.size[p.index]


def collectives(*entries):
    """Sorted (phase, op, bytes), each entry (phase, op, bytes, how many)."""
    return sorted(e[:3] for e in entries for _ in range(e[3]))


def ring(plan):
    return sum(ledgers.ring_bytes_sent(op, n, plan.t) for _, op, n in plan.collectives)


# ----------------------------------------------------------------------------------------------
# discover finds the optimum derived by hand, at t = 2, 4, 8 (B=2, T=16, C=64, H=8 heads of 8, float64)

B, T, C, H, E = 2, 16, 64, 8, 8  # E: bytes per element
N = B * T * C * E
TS = [2, 4, 8]


@pytest.mark.parametrize("t", TS)
def test_llama_is_megatron_and_sequence_parallel(t):
    """Weights split: q, k, v, gate, up column-parallel (q, k, v by heads), o, down row-parallel. The residual
    stream is whole, so each half reads the RMSNorm output through one f (its 3 or 2 readers' partial
    gradients summed into one all-reduce) and leaves through one f̄: 2 all-reduces forward, 2 backward,
    8 (t-1)/t N. Keep activations split too, and it is sequence parallelism: g, re-gathered once for q, k, v
    together, ḡ, and the RMSNorm weights' gradients summed (C elements each)."""
    plan = plan_of("llama", t=t)
    assert {w: split_dim(plan, w) for w in plan.weights} == {
        "attention_norm.weight": None, "ffn_norm.weight": None, "q.weight": (0, H), "k.weight": (0, H),
        "v.weight": (0, H), "o.weight": (1, H), "gate.weight": (0, 3 * C // 2), "up.weight": (0, 3 * C // 2),
        "down.weight": (1, 3 * C // 2)}
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 2), ("backward", "all-reduce", N, 2))
    assert plan.bytes_sent == ring(plan) == 8 * (t - 1) * N // t
    sp = plan_of("llama", t=t, constraint="activations")
    assert {w: split_dim(sp, w) for w in sp.weights} == {w: split_dim(plan, w) for w in plan.weights}
    assert sp.first == autoshard.S("T")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 2), ("forward", "reduce-scatter", N, 2), ("backward", "reduce-scatter", N, 2),
        ("backward", "all-gather", N, 4), ("backward", "all-reduce", C * E, 2))
    assert sp.bytes_sent == ring(sp) == (10 * N + 4 * C * E) * (t - 1) // t


@pytest.mark.parametrize("t", TS)
def test_gptj_parallel_block_reduces_once(t):
    """Attention and MLP read one LayerNorm output and add into the residual: their partial sums are added
    before one f̄, and their partial gradients of the LayerNorm output summed before one f. One all-reduce
    forward and one backward: 4 (t-1)/t N, half of two sub-blocks'. fc_out's bias joins the partial sums (rank
    0's copy), so it is never reduced. Split activations: one g (re-gathered once), one ḡ, and the LayerNorm's
    weight and bias gradients summed."""
    plan = plan_of("gptj", t=t)
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1))
    assert plan.bytes_sent == 4 * (t - 1) * N // t
    assert [split_dim(plan, w) for w in ("q_proj.weight", "out_proj.weight", "fc_in.weight", "fc_out.weight")] == \
        [(0, H), (1, H), (0, 4 * C), (1, 4 * C)]
    sp = plan_of("gptj", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 1), ("forward", "reduce-scatter", N, 1), ("backward", "reduce-scatter", N, 1),
        ("backward", "all-gather", N, 2), ("backward", "all-reduce", C * E, 2))


@pytest.mark.parametrize("t", TS)
def test_a_stack_of_four_linears_pairs_them_column_then_row(t):
    """C -> 4C -> C -> 4C -> C: Megatron's pairing twice, f f̄ f f̄ (the biases of the row-parallel linears join
    their partial sums): 8 (t-1)/t N. Split activations: g ḡ g ḡ, each g re-gathered in backward; the partial
    sum between the pairs is reduce-scattered along T and gathered again, as sequence parallelism does."""
    plan = plan_of("mlp4", t=t)
    assert [split_dim(plan, f"net.{i}.weight") for i in (0, 2, 3, 5)] == [(0, 4 * C), (1, 4 * C), (0, 4 * C), (1, 4 * C)]
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 2), ("backward", "all-reduce", N, 2))
    sp = plan_of("mlp4", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 2), ("forward", "reduce-scatter", N, 2), ("backward", "reduce-scatter", N, 2),
        ("backward", "all-gather", N, 4))


@pytest.mark.parametrize("t", TS)
def test_linears_added_to_their_own_inputs_split_as_columns_then_rows(t):
    """x + gelu(W x + b), four times (W square: its output is added to its input). The first reads x whole:
    column-parallel, f, its output split along C (x sliced to it for free). Each next one reads that split
    input as a row-parallel linear, its partial sums reduce-scattered back to split along C (ḡ: 2); the
    output returns whole (all-gather, 1): 2 + 3 x 2 + 1 = 9 (t-1)/t N. Split activations: x gathered (g: 2),
    the first linear's input kept split and gathered again in backward (1), the three rows (6), the output
    returned to split along T (g: 2): 11."""
    plan = plan_of("residual", t=t)
    assert split_dim(plan, "layers.0.weight") == (0, C)
    assert all(split_dim(plan, f"layers.{i}.weight") for i in range(4))
    assert sorted(plan.collectives) == collectives(
        ("backward", "all-reduce", N, 1), ("forward", "reduce-scatter", N, 3), ("backward", "all-gather", N, 3),
        ("forward", "all-gather", N, 1))
    sp = plan_of("residual", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 2), ("backward", "reduce-scatter", N, 2), ("backward", "all-gather", N, 4),
        ("forward", "reduce-scatter", N, 3))
    assert sp.bytes_sent == 11 * N * (t - 1) // t


@pytest.mark.parametrize("t", TS)
def test_a_narrow_mlp_beats_megatron_row_then_column(t):
    """Hidden size C/4. Megatron (up column, down row) moves the C-wide activation: f + f̄, 4N. Row then
    column moves the narrow one instead: up reads x split along C (free: x is whole), its partial sums (B T
    C/4) are reduced (reduce-scatter + all-gather, the same bytes as an all-reduce, the narrow activation kept
    split), down splits its output along C, and the output returns whole (all-gather, N); backward the
    mirror, x's split gradient all-gathered (N). 4 N/4 + 2N = 3N < 4N."""
    plan, n = plan_of("narrow", t=t), N // 4
    assert split_dim(plan, "up.weight") == (1, C) and split_dim(plan, "down.weight") == (0, C)
    assert sorted(plan.collectives) == collectives(
        ("forward", "reduce-scatter", n, 1), ("forward", "all-gather", n, 1), ("forward", "all-gather", N, 1),
        ("backward", "all-gather", n, 1), ("backward", "reduce-scatter", n, 1), ("backward", "all-gather", N, 1))
    assert plan.bytes_sent == 3 * N * (t - 1) // t < 4 * N * (t - 1) // t


@pytest.mark.parametrize("t", [2, 4])
def test_grouped_query_attention_splits_by_key_value_heads(t):
    """4 k, v heads shared by 8 query heads: every projection splits along the k, v heads (each rank holds
    its k, v heads and the query heads that read them), Megatron's f f̄ around the attention."""
    plan = plan_of("gqa", t=t)
    assert [split_dim(plan, w) for w in ("q.weight", "k.weight", "v.weight", "o.weight")] == [(0, 4)] * 3 + [(1, 4)]
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1))


@pytest.mark.parametrize("t", TS)
def test_huggingface_gpt2_block_is_megatron_and_sequence_parallel(t):
    """transformers' GPT2Block: Conv1D weights are (in, out), c_attn's output split into q, k, v by .split and
    into heads by .view: c_attn is split along the heads inside its 3C outputs (dim 1 = 3 x [8] x 8), the
    projections along their inputs (dim 0). f f̄ f f̄; split activations g ḡ g ḡ, the LayerNorms' weights and
    biases summed (the row-parallel biases are added once, before the reduce-scatter)."""
    plan = plan_of("gpt2", t=t)
    assert [split_dim(plan, w) for w in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                         "mlp.c_proj.weight")] == [(1, H), (0, H), (1, 4 * C), (0, 4 * C)]
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 2), ("backward", "all-reduce", N, 2))
    sp = plan_of("gpt2", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 2), ("forward", "reduce-scatter", N, 2), ("backward", "reduce-scatter", N, 2),
        ("backward", "all-gather", N, 4), ("backward", "all-reduce", C * E, 4))


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("name", ["vit", "chunkeinsum", "hfllama", "mistral", "metallama"])
def test_blocks_written_other_ways_are_megatron_and_sequence_parallel(name, t):
    """timm's qkv unbind(0), q, k, v by chunk(3) and attention by einsum with GEGLU's chunk(2), transformers'
    LlamaDecoderLayer, Mistral's float32 RMSNorm and repeat_interleave (16 heads, 4 k, v heads), Meta's Llama
    with complex rotary: the Llama block's f f̄ f f̄, 8 (t-1)/t N, heads split (q, k, v together, or k, v with
    the query heads that read them).
    Split activations: g ḡ g ḡ, each g re-gathered once, and the norms' weight (and bias) gradients summed."""
    norms = {"vit": 4, "chunkeinsum": 4}.get(name, 2)
    heads = 16 if name == "mistral" else H
    plan = plan_of(name, t=t, H=heads)
    assert all(split_dim(plan, v.target) for v in plan.graph.values.values() if v.kind == "parameter" and v.shape[1:])
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 2), ("backward", "all-reduce", N, 2))
    assert plan.bytes_sent == 8 * (t - 1) * N // t
    sp = plan_of(name, t=t, H=heads, constraint="activations")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 2), ("forward", "reduce-scatter", N, 2), ("backward", "reduce-scatter", N, 2),
        ("backward", "all-gather", N, 4), ("backward", "all-reduce", C * E, norms))


@pytest.mark.parametrize("name, subblocks", [("mistral", 2), ("gqa", 1)])
def test_fewer_key_value_heads_than_ranks_are_gathered(name, subblocks):
    """t = 4 ranks, 2 k, v heads (8 query heads; repeat_interleave in one, expand in the other): the k, v heads
    cannot split 4 ways. The query heads still split (2 of each k, v head's 4 per rank); k and v are split
    along their head dim and all-gathered whole (N/4 each: g forward, its reduce-scatter backward), then
    repeated to the query heads. Megatron's 4 (t-1)/t N per sub-block, and 2 x 2 x N/4 more: (t-1)/t N."""
    t = 4
    with torch.device("meta"):
        module = (Mistral(C, H, 2, 3 * C // 2) if name == "mistral" else GroupedQuery(C, H, groups=4)).double()
    plan = autoshard.discover(module, (torch.empty(B, T, C, device="meta", dtype=torch.float64),), t)
    assert sorted(plan.collectives) == collectives(
        ("forward", "all-reduce", N, subblocks), ("backward", "all-reduce", N, subblocks),
        ("forward", "all-gather", N // 4, 2), ("backward", "reduce-scatter", N // 4, 2))
    assert plan.bytes_sent == (4 * subblocks + 1) * N * (t - 1) // t


@pytest.mark.parametrize("t", [2, 4])
def test_top_k_routing_gathers_the_logits_and_reduces_the_experts_once(t):
    """A top-2 mixture of 4 experts: the router split by experts, its logits (B T 4) all-gathered for topk
    (forward only: topk's gradient comes back whole on every rank); each expert's MLP column then row, the four
    weighted outputs added as partial sums and reduced once (f̄); the input's gradient by one f. Each gate
    (B T 1) multiplies a partial sum, so its gradient is partial too: an all-reduce of B T E bytes each."""
    plan = plan_of("moe", t=t)
    assert all(split_dim(plan, v.target) for v in plan.graph.values.values() if v.kind == "parameter" and v.shape[1:])
    assert sorted(plan.collectives) == collectives(
        ("forward", "all-gather", B * T * 4 * E, 1), ("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1),
        ("backward", "all-reduce", B * T * E, 4))
    assert plan.bytes_sent == (B * T * 4 * E + 4 * N + 4 * 2 * B * T * E) * (t - 1) // t


@pytest.mark.parametrize("t", TS)
def test_ops_decomposed_or_along_t_plan_as_megatron_and_sequence_parallel(t):
    """Decomposed: F.glu split as its two halves (the up projection's columns, each rank both halves' shares), the
    elementwise ops split along them; the row-parallel down projection's partial sums carried through the token
    shift, flip, roll, index_select and tril (all linear) to the normalize, and the side projection's reduced
    before its F.pad by 0.5 (not linear: t ranks' pads would add up to t times 0.5). f once, f̄ for each
    projection: 6 (t-1)/t N. Split activations: g (re-gathered once), a ḡ for each, along T: 7 (t-1)/t N."""
    plan = plan_of("decomposed", t=t)
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 2), ("backward", "all-reduce", N, 1))
    sp = plan_of("decomposed", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(("forward", "all-gather", N, 1), ("forward", "reduce-scatter", N, 2),
                                                 ("backward", "reduce-scatter", N, 1), ("backward", "all-gather", N, 3))
    assert (plan.bytes_sent, sp.bytes_sent) == (6 * N * (t - 1) // t, 7 * N * (t - 1) // t)


@pytest.mark.parametrize("t", TS)
def test_a_depthwise_convolution_splits_by_its_groups(t):
    """GatedConv: the input projection column-parallel (u and z each split along their 2C channels), the depthwise
    Conv1d split along its groups (each rank convolves its channels, all of T, with its 1/t of the kernels, groups
    = 2C/t), the output projection row-parallel: Megatron's f f̄, 4 (t-1)/t N. Split activations: the conv still
    reads all of T, on its channels' share: g (re-gathered once), ḡ, and the LayerNorm's weight and bias
    gradients summed, (5 N + 4 C E)(t-1)/t."""
    plan = plan_of("gatedconv", t=t)
    assert {w: split_dim(plan, w) for w in plan.weights} == {
        "norm.weight": None, "norm.bias": None, "inp.weight": (0, 2 * C), "out.weight": (1, 2 * C),
        "out.bias": None, "conv.weight": (0, 2 * C), "conv.bias": (0, 2 * C)}
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1))
    sp = plan_of("gatedconv", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 1), ("forward", "reduce-scatter", N, 1), ("backward", "reduce-scatter", N, 1),
        ("backward", "all-gather", N, 2), ("backward", "all-reduce", C * E, 2))
    assert (plan.bytes_sent, sp.bytes_sent) == (4 * N * (t - 1) // t, (5 * N + 4 * C * E) * (t - 1) // t)


@pytest.mark.parametrize("t", TS)
def test_batch_and_group_norms_and_pools_split_by_channels(t):
    """ConvNorms: the norms and pools run per channel (the GroupNorm per group), so Megatron's pairing holds: the
    norms replicated on the whole input, the kernel-3 conv column-parallel (each rank its channels, all of T), the
    eval BatchNorm, GELU and both pools on those channels, the 1x1 conv row-parallel: f f̄, 4 (t-1)/t N. Split
    activations: both norms sum over all of T, so input 0 is gathered (g) and they run on their channels' (and
    groups') shares; the conv reads all channels, so the GroupNorm's output is gathered (g, re-gathered once); the
    1x1 conv's partial sums reduce-scattered along T (ḡ): 7 (t-1)/t N."""
    plan = plan_of("convnorms", t=t)
    assert {w: split_dim(plan, w) for w in plan.weights} == {
        "batch.weight": None, "batch.bias": None, "norm.weight": None, "norm.bias": None, "up.weight": (0, 2 * C),
        "up.bias": (0, 2 * C), "bn.weight": (0, 2 * C), "bn.bias": (0, 2 * C), "down.weight": (1, 2 * C),
        "down.bias": None}
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1))
    sp = plan_of("convnorms", t=t, constraint="activations")
    assert split_dim(sp, "norm.weight") == split_dim(sp, "batch.weight") == (0, H)  # (by groups; and by H of C)
    assert sorted(sp.collectives) == collectives(
        ("forward", "all-gather", N, 2), ("forward", "reduce-scatter", N, 1), ("backward", "reduce-scatter", N, 2),
        ("backward", "all-gather", N, 2))
    assert (plan.bytes_sent, sp.bytes_sent) == (4 * N * (t - 1) // t, 7 * N * (t - 1) // t)


@pytest.mark.parametrize("t", TS)
def test_writes_into_activations_keep_megatrons_plan(t):
    """Writes: every write is along T or elementwise, on each rank's channels (the tensor_split's quarters each
    split, each rank every quarter's share, as F.glu's halves), so the up projection is column-parallel and the down
    row-parallel: f f̄, 4 (t-1)/t N. Split activations: g (re-gathered once), ḡ: 5 (t-1)/t N."""
    plan = plan_of("writes", t=t)
    assert {w: split_dim(plan, w) for w in plan.weights} == {
        "up.weight": (0, C), "up.bias": (0, C), "down.weight": (1, C), "down.bias": None}
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1))
    sp = plan_of("writes", t=t, constraint="activations")
    assert sorted(sp.collectives) == collectives(("forward", "all-gather", N, 1), ("forward", "reduce-scatter", N, 1),
                                                 ("backward", "reduce-scatter", N, 1), ("backward", "all-gather", N, 2))
    assert (plan.bytes_sent, sp.bytes_sent) == (4 * N * (t - 1) // t, 5 * N * (t - 1) // t)


def test_tensor_split_is_read_as_the_sizes_torch_splits_into():
    x = torch.empty(2, 7)
    node = type("Node", (), {"meta": {"val": x}})  # (an fx node's meta is all _sections reads)
    for parts in [3, 7, 2, [2, -1], [0, 7], [3], [-3, 9]]:
        assert autoshard._sections(node, parts, 1) == [p.shape[1] for p in torch.tensor_split(x, parts, 1)], parts


class WithSquaredSum(nn.Module):
    """x + MLP(x), returned with the sum of its squares (as a loss would be) or alone."""

    def __init__(self, C, total):
        super().__init__()
        self.up, self.down, self.total = nn.Linear(C, 4 * C), nn.Linear(4 * C, C), total

    def forward(self, x):
        y = x + self.down(F.gelu(self.up(x)))
        return (y, (y * y).sum()) if self.total else y


@pytest.mark.parametrize("t", [2, 4])
def test_a_sum_over_a_split_index_is_a_partial_sum(t):
    """Activations split along T: the sum of y's squares is summed on each rank's part of T, a partial sum P, and
    returned as one (shard's own all-reduce makes it whole, unpriced): the scalar costs nothing over y alone. Were
    T not an option of the sum, y * y would be all-gathered first: (t-1)/t N more."""
    x = torch.empty(B, T, C, device="meta", dtype=torch.float64)
    with torch.device("meta"):
        alone, total = (autoshard.discover(WithSquaredSum(C, s).double(), (x,), t, constraint="activations")
                        for s in (False, True))
    assert total.bytes_sent == alone.bytes_sent and total.placements[total.graph.outputs[1]] == autoshard.P


class AlongT(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return x + self.op(x)


ALONG_T = {"flip": lambda x: x.flip(1), "roll": lambda x: x.roll(1, 1), "cumsum": lambda x: x.cumsum(1),
           "token shift": lambda x: F.pad(x, (0, 0, 1, 0))[:, :-1],
           "reverse": lambda x: x.index_select(1, torch.arange(x.shape[1] - 1, -1, -1, device=x.device))}


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("op", ALONG_T)
def test_an_op_along_t_gathers_a_sequence_split_input(op, t):
    """x + op(x), x split along T: op needs all of T, so x is all-gathered, and op's output split again for the add
    (its gradient all-gathered back): 2 (t-1)/t N. Were T not whole for op, each rank would flip (roll, shift...)
    only its own part, for nothing sent."""
    module, x = AlongT(ALONG_T[op]), torch.empty(B, T, 8, device="meta", dtype=torch.float64)
    plan = autoshard.discover(module, (x,), t, constraint="activations")
    n = B * T * 8 * E
    assert sorted(plan.collectives) == collectives(("forward", "all-gather", n, 1), ("backward", "all-gather", n, 1))


class CrossAttention(nn.Module):
    """A decoder's cross-attention: queries from x (B, T, C), keys and values from an encoder's memory (B, S, C)."""

    def __init__(self, C, H):
        super().__init__()
        self.H, self.norm = H, nn.LayerNorm(C)
        self.q, self.kv, self.o = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)

    def forward(self, x, memory):
        (B, T, C), S = x.shape, memory.shape[1]
        q = self.q(self.norm(x)).view(B, T, self.H, -1).transpose(1, 2)
        k, v = self.kv(memory).view(B, S, 2, self.H, -1).permute(2, 0, 3, 1, 4)
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("t", [2, 4])
def test_a_second_input_of_another_length_gets_dims_of_its_own(t):
    """Both inputs 3-D, dims not given: each is "B T C", but the memory's S = 24 is not x's T = 16, so it is named
    B T' C. Megatron's attention: f̄ forward on the output, f backward on the norm's output and on the memory."""
    with torch.device("meta"):
        module = CrossAttention(C, H).double()
    x, memory = (torch.empty(B, n, C, device="meta", dtype=torch.float64) for n in (T, 24))
    plan = autoshard.discover(module, (x, memory), t)
    M = B * 24 * C * E
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", N, 1), ("backward", "all-reduce", N, 1),
                                                   ("backward", "all-reduce", M, 1))
    assert plan.bytes_sent == (4 * N + 2 * M) * (t - 1) // t
    with pytest.raises(ValueError, match=r"dims names T for sizes 16 and 24 \(input 1\)"):  # named so: one size
        autoshard.discover(module, (x, memory), t, dims=("B T C", "B T C"))


# ----------------------------------------------------------------------------------------------
# nanosp's Block: the plans are Megatron's and sequence parallelism's, and nanosp's ledgers count them


@pytest.fixture(scope="module")
def fake_group():
    """Process groups of any size on the "fake" backend (exact shapes and bytes, no other processes), gone
    when this module is done: the other test files expect no process group in this process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    yield lambda t: dist.new_group(list(range(t)))
    dist.destroy_process_group()


@pytest.mark.parametrize("t", [2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_nanosp_block_plans_equal_nanosps_ledgers(fake_group, t, sp):
    """Megatron's: nanosp's communication ledger, message for message. SP's: the same messages on activations;
    nanosp sums the gradients of the LayerNorms and of the row-parallel biases (replicated_through_f), autoshard
    adds those biases once before the reduce-scatter and sums only the LayerNorms'. Activation and parameter
    bytes per rank equal what nanosp's activation ledger measures of its hand-sharded Block."""
    s, b, h, a = 32, 2, 64, 8
    cfg = nanosp.GPTConfig(block_size=s, n_layer=1, n_head=a, n_embd=h, sequence_parallel=sp)
    with torch.device("meta"):
        block = nanosp.Block(cfg, None, 0).bfloat16()
    plan = autoshard.discover(block, (torch.empty(s, b, h, device="meta", dtype=torch.bfloat16),), t, dims="T B C",
                              constraint="activations" if sp else "weights")
    log = ledgers.measure_communication(cfg, fake_group(t), b, s, torch.bfloat16, device="meta")
    bucket = [e for e in log if sp and e[1] == "CopyToTensorParallelRegion.backward"]
    on_params = [m for m in plan.moves if plan.graph.values[m.value].kind == "parameter"]
    assert sorted(autoshard.collectives([m for m in plan.moves if m not in on_params])) == \
        sorted((phase, op, n) for phase, _, op, n in log if (phase, _, op, n) not in bucket)
    params = sum(n for _, _, n in autoshard.collectives(on_params))
    assert params == (4 * h * 2 if sp else 0) and sum(e[3] for e in bucket) == (6 * h * 2 if sp else 0)
    measured, _ = ledgers.measure_activation_bytes(cfg, fake_group(t), b, s, torch.bfloat16)
    assert plan.activation_bytes == measured
    assert plan.param_bytes == sum(p.numel() * 2 for p in nanosp.Block(cfg, fake_group(t), 0).parameters())


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("constraint", ["weights", "activations"])
def test_nanosp_block_with_sdpa_has_the_written_out_blocks_plan(t, constraint):
    """attention="sdpa" (q, k, v by qkv.chunk(3, dim=-1), then F.scaled_dot_product_attention) is planned as
    the written-out attention is: each weight split alike, the same collectives and bytes."""
    explicit, sdpa = (plan_of(name, t=t, constraint=constraint) for name in ("nanosp", "nanosp_sdpa"))
    assert {w: split_dim(sdpa, w) for w in sdpa.weights} == {w: split_dim(explicit, w) for w in explicit.weights}
    assert sorted(sdpa.collectives) == sorted(explicit.collectives) and sdpa.bytes_sent == explicit.bytes_sent


# ----------------------------------------------------------------------------------------------
# the search: exact, linear, repeated blocks solved once


class TwoBranches(nn.Module):
    """Two linears read one hidden tensor and add into the residual: one reduction each way."""

    def __init__(self, C):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(C, 2 * C), nn.Linear(2 * C, C, bias=False), nn.Linear(2 * C, C)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return x + self.b(h) + self.c(h)


class LayerScale(nn.Module):
    """x + g * MLP(LayerNorm(x)), g a learned scale per channel (CaiT's LayerScale), or a fixed one (a buffer).
    Reading the MLP's partial sums as such would make g's gradient partial too; and the mul keeps the MLP's output
    for backward, so under "activations" it must read it split, not as the partial sums it arrives as."""

    def __init__(self, C, learned=True):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        if learned:
            self.g = nn.Parameter(torch.full((C,), 0.1))
        else:
            self.register_buffer("g", torch.full((C,), 0.1))
        self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        return x + self.g * self.down(F.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("model, constraint", [("narrow", "weights"), ("narrow", "activations"),
                                               ("layerscale", "weights"), ("fixedscale", "activations"),
                                               ("two", "weights"), ("two", "activations"), ("mlp4", "weights"),
                                               ("residual", "weights"), ("residual", "activations")])
def test_the_dynamic_programme_finds_the_least_bytes_of_every_choice(model, constraint):
    """Every option of every op, priced one by one (the options the search skips as no better included): none
    sends fewer bytes than discover's plan."""
    with torch.device("meta"):
        module, C = {"narrow": (NarrowMLP(16, 4), 16), "two": (TwoBranches(8), 8), "mlp4": (MLPStack(8), 8),
                     "residual": (ResidualLinears(8, 2), 8), "layerscale": (LayerScale(8), 8),
                     "fixedscale": (LayerScale(8, learned=False), 8)}[model]
    t, T = 2, 2 if constraint == "activations" else 3  # B = 1 and an odd T where it may be: fewer choices to price
    plan = autoshard.discover(module, (torch.empty(1, T, C, device="meta"),), t, constraint=constraint)
    g = plan.graph
    priced = [p.bytes_sent for combo in itertools.product(*(autoshard.options(g, k, t) for k in range(len(g.ops))))
              if (p := autoshard.account(g, t, constraint, plan.first, combo)) is not None]
    assert len(priced) > 1 and min(priced) == plan.bytes_sent


def every_option_case(name, B, T, C, H):
    """(module, its input, a meta-device copy, a meta input, dims): one of MODELS, or "tiedgpt" on ids (V = C)."""
    if name != "tiedgpt":
        return *built(name, B, T, C, H, "cpu", seed=5), *built(name, B, T, C, H), MODELS[name][1]
    gen = torch.Generator().manual_seed(5)
    module = randomized(TiedGPT(C, T, C, H).double(), gen)
    ids = torch.randint(0, C, (B, T), generator=gen)
    with torch.device("meta"):
        meta_module = TiedGPT(C, T, C, H).double()
    return module, ids, meta_module, torch.empty(B, T, dtype=torch.long, device="meta"), ("B T",)


def task_every_option(ctx, name, t, constraint, B=2, T=4, C=16, H=4):
    """discover's plan with one op's choice replaced by each other option the rules allow it (account() adds the
    moves it then needs), one op at a time, each run by shard: outputs, input gradients and full_grads() against
    the unsharded module. What the search could pick, on any model, is sound, not only what it picked here."""
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    module, x, meta_module, meta_x, dims = every_option_case(name, B, T, C, H)
    plan = autoshard.discover(meta_module, (meta_x,), t, dims=dims, constraint=constraint)
    x.requires_grad_(x.is_floating_point())
    y = module(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=y.dtype)
    (y * w).sum().backward()
    expected, expected_x = {n: p.grad for n, p in module.named_parameters()}, x.grad
    g, chosen, worst, runs = plan.graph, [plan.choices[op.name] for op in plan.graph.ops], {}, 0
    for k, op in enumerate(g.ops):
        for option in autoshard.options(g, k, t):
            forced = autoshard.account(g, t, constraint, plan.first, chosen[:k] + [option] + chosen[k + 1:])
            if option == chosen[k] or forced is None:
                continue
            x.grad, sharded = None, autoshard.shard(module, forced, group)
            ys = sharded(x)
            (ys * w).sum().backward()
            grads = sharded.full_grads()
            errors = [rel_err(ys, y)] + ([rel_err(x.grad, expected_x)] if x.is_floating_point() else []) + [
                rel_err(grads[n], expected[n]) for n in expected]
            worst[f"{op.kind} {op.name} as {option}"], runs = max(errors), runs + 1
    return worst, runs


@pytest.mark.parametrize("constraint", ["none", "activations"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "gqa", "chunkeinsum", "moe", "decomposed", "gatedconv",
                                  "metallama", "max", "nanosp", "tiedgpt", "convnorms", "writes"])
def test_every_option_of_every_op_runs_equal(world, name, constraint):
    """t = 2, B = 2, T = 4, C = 16, 4 heads: every factor even, so every index is an option; 3,247 plans in all.
    (Not the models that compute their norms in float32, Mistral's and transformers' Llama: a norm split along C
    rounds otherwise.)"""
    for result in world.run(task_every_option, name=name, t=2, constraint=constraint):
        if result is not None:
            worst, runs = result
            assert runs > 10 and max(worst.values()) < TOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def test_a_stack_of_blocks_is_solved_once_and_costs_each_block_once():
    with torch.device("meta"):
        one, stack = Llama(64, 8, 96, 16), nn.Sequential(*(Llama(64, 8, 96, 16) for _ in range(4)))
        x = torch.empty(2, 16, 64)
    block, plan = autoshard.discover(one, (x,), 4), autoshard.discover(stack, (x,), 4)
    assert plan.bytes_sent == 4 * block.bytes_sent
    segments = autoshard.segments(plan.graph)
    assert len({a0 for _, _, (a0, _) in segments}) == len(segments) // 4  # the later blocks reuse the first's tables


def test_a_llama_7b_shaped_block_is_planned_on_the_meta_device():
    """C = 4096, 32 heads, F = 11008, T = 4096 at t = 8: nothing is allocated, and the plan is Megatron's.
    (How long it takes is bench.py's: section 7.)"""
    with torch.device("meta"):
        module, x = Llama(4096, 32, 11008, 4096), torch.empty(1, 4096, 4096)
    plan = autoshard.discover(module, (x,), 8)
    n = 4096 * 4096 * 4
    assert sorted(plan.collectives) == collectives(("forward", "all-reduce", n, 2), ("backward", "all-reduce", n, 2))


@pytest.mark.parametrize("module_device, input_device", [("cpu", "meta"), ("meta", "cpu"), ("cpu", "cpu")])
def test_a_module_and_its_inputs_may_be_on_the_meta_device_or_not(module_device, input_device):
    """Real weights with meta inputs, or the reverse: the trace reads only shapes and dtypes, so the plan is the
    one found with both on the meta device."""
    expected = plan_of("llama", t=4, constraint="activations")
    module, x = built("llama", B, T, C, H, module_device)[0], built("llama", B, T, C, H, input_device)[1]
    plan = autoshard.discover(module, (x,), 4, constraint="activations")
    assert (plan.collectives, plan.weights) == (expected.collectives, expected.weights)


def test_the_plan_prints_each_weight_and_each_collective():
    plan = plan_of("llama", t=4)
    text = str(plan)
    assert all(f"'{w}'" in text for w in plan.weights)
    assert text.count("all-reduce") == 4 and "split: dim 0 = [8] x 8" in text and f"{plan.bytes_sent:,} bytes" in text
    rules = autoshard.RULE_OF
    assert {"linear", "scaled_dot_product_attention", "layer_norm", "view", "cat", "mul"} <= set(rules)


# ----------------------------------------------------------------------------------------------
# bad input: one line, a ValueError naming the op or the size


class FourierMix(nn.Module):  # FNet's token mixing by a Fourier transform (an op with no rule)
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.fft.rfft(self.lin(x), dim=1).abs()


class Twice(nn.Module):  # W (W x): W's rows and columns are one index (not planned)
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.lin(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.lin(x) + mask.sum(1).sum(1)[:, None, None]


def meta(*shape):  # small real inputs for real modules: discover computes nothing on them either
    return torch.zeros(shape)


@pytest.mark.parametrize("call, message", [
    (lambda: autoshard.discover(FourierMix(), (meta(2, 4, 8),), 2),
     r"no sharding rule for aten._fft_r2c \(test_autoshard.py:\d+ "),
    (lambda: autoshard.discover(TwoInputs(), (meta(2, 4, 8), meta(2, 1, 4, 4)), 2), r"input 1 has 4 dimensions \(2, 1, 4, 4\)"),
    (lambda: autoshard.discover(nn.Linear(8, 8), (meta(2, 8),), 2), r"input 0 has 2 dimensions \(2, 8\)"),
    (lambda: autoshard.discover(nn.Linear(8, 8), (meta(2, 4, 8),), 2, dims=("B T",)), r"dims\[0\]='B T' names 2"),
    (lambda: autoshard.discover(nn.Linear(7, 7), (meta(3, 5, 7),), 2), r"t=2 divides no dimension"),
    (lambda: autoshard.discover(nn.Linear(8, 8), (meta(2, 5, 8),), 2, constraint="activations"),
     r"its size 5 is not divisible by t=2"),
    (lambda: autoshard.discover(nn.Linear(8, 8), (meta(2, 4, 8),), 2, constraint="memory"), r"constraint='memory'"),
    (lambda: autoshard.discover(nn.Linear(8, 8), (meta(2, 4, 8),), 1), r"t=1 must be an int >= 2"),
    (lambda: autoshard.discover(nn.Linear(8, 8), (3.0,), 2), r"example input 0 is a float"),
    (lambda: autoshard.discover(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)), (meta(2, 4, 8),), 2), r"dropout p=0.1"),
    (lambda: autoshard.discover(nn.Linear(6, 6), (meta(3, 4, 6),), 4), r"no plan for Linear meets constraint='weights'"),
    (lambda: autoshard.discover(nn.BatchNorm1d(8), (meta(2, 8, 4),), 2, dims="B C T"),
     r"writes running_mean in its forward: .* eval\(\), or make it track_running_stats=False"),
    (lambda: autoshard.discover(Twice(), (meta(2, 4, 8),), 2), r"lin.weight \(8, 8\) has one index on two axes"),
    (lambda: autoshard.discover(GroupedQuery(16, 4), (meta(2, 4, 16),), 4, constraint="activations"),  # heads (2, 2)
     r"softmax \(test_autoshard.py:\d+ .*\) keeps its output \(2, 4, 4, 4\) for backward and cannot split it 4 ways"),
])
def test_bad_input_is_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# shard(): on 2, 3 and 4 gloo processes, equal to the unsharded module


@st.composite
def cases(draw, name, constraint):
    t = draw(st.sampled_from([2, 3, 4]))
    fewer_kv = name in ("gqa", "mistral", "hfllama", "metallama")  # k, v heads H/2 or H/4
    H = t * draw(st.integers(1, 2)) * (2 if fewer_kv else 1)
    C = H * draw(st.sampled_from([2, 4])) * (4 if name == "narrow" else 1)
    T = t * draw(st.integers(1, 3)) if constraint == "activations" else draw(st.integers(2, 9))
    return dict(name=name, t=t, constraint=constraint, B=draw(st.integers(1, 3)), T=T, C=C, H=H,
                seed=draw(st.integers(0, 2**30)))


def ran_collectives(forward, backward):
    """(phase, op, bytes) of each collective logged by ledgers.collective_log in forward and in backward, sorted."""
    return sorted([("forward", op, n) for _, _, op, n in forward] + [("backward", op, n) for _, _, op, n in backward])


def own_collectives(plan, y):
    """shard's own conversion (not priced) of the first output, y, to the whole of it: the collective it runs."""
    nbytes = y.numel() * y.element_size()
    return {"P": [("forward", "all-reduce", nbytes)], "S": [("forward", "all-gather", nbytes)]}.get(
        plan.placements[plan.graph.outputs[0]].kind, [])


def grad_errors(grads, module):
    """Each parameter's gradient error, relative to the largest gradient of them all (a key bias's gradient is 0 but
    for rounding: relative to itself, its error would measure only that rounding)."""
    scale = max(p.grad.abs().max() for p in module.parameters())
    errors = {n: ((grads[n] - p.grad).abs().max() / scale).item() for n, p in module.named_parameters()}
    return {n: math.inf if math.isnan(e) else e for n, e in errors.items()}  # (max() over errors would skip a NaN)


def task_equivalence(ctx, name, t, constraint, B, T, C, H, seed):
    """On every rank of a group of t: the plan discovered on a meta-device copy, a real float64 module sharded
    with it; outputs, input gradients and full_grads() against the unsharded module; the collectives logged
    against the plan's (and shard's own conversions of the full input and output)."""
    group = ctx.group(t)
    if ctx.rank >= t:  # the first group of t ranks runs it; the others would repeat it
        return None
    module, x = built(name, B, T, C, H, "cpu", seed=seed)
    meta_module, meta_x = built(name, B, T, C, H)
    plan = autoshard.discover(meta_module, (meta_x,), t, dims=MODELS[name][1], constraint=constraint)
    sharded = autoshard.shard(module, plan, group)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    x.requires_grad_(True)
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    (y * w).sum().backward()
    expected_x, expected = x.grad.clone(), {n: p.grad for n, p in module.named_parameters()}
    x.grad = None
    with ledgers.collective_log() as forward:
        ys = sharded(x)
    with ledgers.collective_log() as backward:
        (ys * w).sum().backward()
    ran = ran_collectives(forward, backward)
    if plan.first.kind == "S":  # shard's own: the full input split (its gradient gathered), the output gathered
        n = x.numel() * x.element_size()
        ran.remove(("backward", "all-gather", n))
        ran.remove(("forward", "all-gather", n))
    grads = sharded.full_grads()
    errors = {"output": rel_err(ys, y), "input grad": rel_err(x.grad, expected_x)}
    errors.update((f"grad {n}", rel_err(grads[n], g)) for n, g in expected.items())
    return errors, ran == sorted(plan.collectives), plan.bytes_sent


@pytest.mark.parametrize("constraint", ["weights", "activations"])
@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=int(os.environ.get("AUTOSHARD_EXAMPLES", 2)), deadline=None)
@given(data=st.data())
def test_shard_equals_the_unsharded_module(world, name, constraint, data):
    case = data.draw(cases(name, constraint))
    results = [r for r in world.run(task_equivalence, **case) if r is not None]
    assert results
    for errors, same, _ in results:
        assert same, f"the collectives run differ from the plan's for {case}"
        for what, err in errors.items():
            assert err < TOL, f"{what}: relative error {err:.2e} for {case}"


def task_nanosp_block(ctx, t, sequence_parallel, attention):
    """autoshard's shard of nanosp's unsharded Block against nanosp's own hand-sharded Block, the same weights."""
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    s, b, h, a = 8, 2, 16, 4
    cfg = nanosp.GPTConfig(block_size=s, n_layer=1, n_head=a, n_embd=h, sequence_parallel=sequence_parallel,
                           attention=attention)
    with torch.device("meta"):
        meta_block = nanosp.Block(cfg, None, 0).double()
    plan = autoshard.discover(meta_block, (torch.empty(s, b, h, device="meta", dtype=torch.float64),), t, dims="T B C",
                              constraint="activations" if sequence_parallel else "weights")
    gen = torch.Generator().manual_seed(7)
    full = randomized(nanosp.Block(cfg, None, 0).double(), gen)
    mine, r = nanosp.Block(cfg, group, 0).double(), nanosp.group_rank(group)  # nanosp's own, sliced as nanosp slices

    def slices(whole, m, p):
        dim, chunks = getattr(m, "shard_dims", {}).get(p, (None, 1))
        return whole if dim is None else torch.cat([c.chunk(t, dim)[r] for c in whole.chunk(chunks, dim)], dim)

    owned = [(f"{prefix}.{p}".lstrip("."), m, p, value) for prefix, m in mine.named_modules()
             for p, value in m.named_parameters(recurse=False)]
    with torch.no_grad():
        for name, m, p, value in owned:
            value.copy_(slices(full.get_parameter(name), m, p))
    x = torch.randn(s, b, h, generator=gen, dtype=torch.float64, requires_grad=True)
    sharded = autoshard.shard(full, plan, group)
    y_auto = sharded(x)
    y_auto.sum().backward()
    rows = slice(r * s // t, (r + 1) * s // t) if sequence_parallel else slice(None)
    x_mine = x.detach()[rows].clone().requires_grad_(True)
    y_mine = mine(x_mine, nanosp.ForwardContext(through_f=nanosp.replicated_through_f(mine, group, sequence_parallel)))
    y_mine.sum().backward()
    grads = sharded.full_grads()
    return [rel_err(y_auto[rows], y_mine), rel_err(x.grad[rows], x_mine.grad)] + [
        rel_err(value.grad, slices(grads[name], m, p)) for name, m, p, value in owned]


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("attention", nanosp.ATTENTIONS)
def test_shard_of_nanosp_block_equals_nanosps_hand_sharded_block(world, t, sequence_parallel, attention):
    for errors in world.run(task_nanosp_block, t=t, sequence_parallel=sequence_parallel, attention=attention):
        if errors is not None:
            assert max(errors) < TOL, errors


class TiedGPT(nn.Module):
    """A whole model, ids in and logits out: token and position embeddings, blocks, and a head that is the token
    embedding (tied, as GPT-2's): one parameter under two names."""
    def __init__(self, V, T, C, H, n_layer=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(NanoGPTLikeBlock(C, H) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class NanoGPTLikeBlock(nn.Module):  # nanoGPT's block: fused qkv split by size, causal sdpa, GELU MLP
    def __init__(self, C, H):
        super().__init__()
        self.H, self.ln_1, self.ln_2 = H, nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.H, C // self.H).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


def task_tied_gpt(ctx, t, constraint):
    """A whole tied-embedding GPT on integer ids (dims 'B T'): logits and full_grads() under both of the tied
    weight's names against the unsharded model, and the collectives run against the plan's."""
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    V, T, C, H = 8 * t, 4 * t, 8 * t, t
    torch.manual_seed(3)
    model = TiedGPT(V, T, C, H).double()
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(4))
    plan = autoshard.discover(model, (idx,), t, dims=("B T",), constraint=constraint)
    sharded = autoshard.shard(model, plan, group)
    w = torch.randn(2, T, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (model(idx) * w).sum().backward()
    with ledgers.collective_log() as forward:
        logits = sharded(idx)
    with ledgers.collective_log() as backward:
        (logits * w).sum().backward()
    ran = ran_collectives(forward, backward)
    grads, want = sharded.full_grads(), dict(model.named_parameters(remove_duplicate=False))
    errors = {"logits": rel_err(logits, model(idx))} | {n: rel_err(grads[n], p.grad) for n, p in want.items()}
    return errors, sorted(grads) == sorted(want), ran == sorted(plan.collectives + own_collectives(plan, logits))


@pytest.mark.parametrize("constraint", ["weights", "activations"])
@pytest.mark.parametrize("t", [2, 4])
def test_a_whole_gpt_with_tied_embeddings_shards_equal(world, t, constraint):
    for result in world.run(task_tied_gpt, t=t, constraint=constraint):
        if result is not None:
            errors, every_name, same = result
            assert every_name, "full_grads() must name the tied weight under both of its names"
            assert same, "the collectives run differ from the plan's"
            assert max(errors.values()) < TOL, errors


class HFModel(nn.Module):
    """A whole transformers model on ids (its last hidden state out), as from_pretrained would give it, its KV
    cache (which starts as an empty tensor) on: GPT2Model, GPTNeoXModel (rotary), or FalconModel (one k, v head
    indexed out of the fused projection by a list, attention and MLP in parallel, summed in place by +=), or
    RobertaModel (position ids a cumsum of the ids' padding mask), or BertModel given an attention mask that pads
    a sequence (the mask made by advanced indexing with two index tensors, and by &)."""

    def __init__(self, name, V, C, H, T):
        super().__init__()
        import transformers as tf
        if name == "gpt2":
            self.model = tf.GPT2Model(tf.GPT2Config(vocab_size=V, n_embd=C, n_head=H, n_layer=2, n_positions=T))
        elif name == "roberta":
            self.model = tf.RobertaModel(tf.RobertaConfig(vocab_size=V, hidden_size=C, num_attention_heads=H,
                                                          intermediate_size=4 * C, num_hidden_layers=2,
                                                          max_position_embeddings=T + 2), add_pooling_layer=False)
        elif name == "bert":
            self.model = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=C, num_attention_heads=H,
                                                    intermediate_size=4 * C, num_hidden_layers=2,
                                                    max_position_embeddings=T), add_pooling_layer=False)
        elif name == "falcon":
            self.model = tf.FalconModel(tf.FalconConfig(vocab_size=V, hidden_size=C, num_attention_heads=H,
                                                        num_hidden_layers=2, max_position_embeddings=T))
        else:
            self.model = tf.GPTNeoXModel(tf.GPTNeoXConfig(vocab_size=V, hidden_size=C, num_attention_heads=H,
                                                          intermediate_size=4 * C, num_hidden_layers=2,
                                                          max_position_embeddings=T))
        self.model.eval()

    def forward(self, ids, *mask):
        return self.model(input_ids=ids, attention_mask=mask[0] if mask else None).last_hidden_state


def task_hf_model(ctx, name, t, constraint):
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    V, C, H, T = 8 * t, 8 * t, t, 4 * t
    torch.manual_seed(6)
    model = randomized(HFModel(name, V, C, H, T).double())
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, T // 2 + 1:] = 0  # the first sequence padded
    inputs = (ids, mask) if name == "bert" else (ids,)
    with torch.device("meta"):  # the plan found on a meta-device copy (tensors made in forward lose their values)
        meta = HFModel(name, V, C, H, T).double()
    plan = autoshard.discover(meta, tuple(x.to("meta") for x in inputs), t, dims=("B T",) * len(inputs),
                              constraint=constraint)
    sharded = autoshard.shard(model, plan, group)
    w = torch.randn(2, T, C, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (model(*inputs) * w).sum().backward()
    with ledgers.collective_log() as forward:
        y = sharded(*inputs)
    with ledgers.collective_log() as backward:
        (y * w).sum().backward()
    ran = ran_collectives(forward, backward)
    errors = {"output": rel_err(y, model(*inputs))} | grad_errors(sharded.full_grads(), model)
    return ran == sorted(plan.collectives + own_collectives(plan, y)), errors


@pytest.mark.parametrize("constraint", ["weights", "activations"])
@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("name", ["gpt2", "neox", "falcon", "roberta", "bert"])
def test_whole_huggingface_models_on_ids_shard_equal(world, name, t, constraint):
    """Equal, and running exactly the plan's collectives, each priced at its tensor's own dtype (RoBERTa's
    position ids are int32)."""
    for result in world.run(task_hf_model, name=name, t=t, constraint=constraint):
        if result is not None:
            same, errors = result
            assert same, "the collectives run differ from the plan's"
            assert max(errors.values()) < TOL, errors


class GPTWithLoss(TiedGPT):
    """As nanoGPT's GPT: (logits, loss) of ids and targets, the loss cross-entropy averaged over the targets that
    are not -1 (ignored)."""

    def forward(self, idx, targets):
        logits = super().forward(idx)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def gpt_with_loss(t, seed):
    """GPTWithLoss at t's sizes (vocabulary 8t, block 4t, width 8t, t heads) in float64, its weights drawn from
    seed, and a generator (seed + 1) for its data."""
    torch.manual_seed(seed)
    return GPTWithLoss(8 * t, 4 * t, 8 * t, t).double(), torch.Generator().manual_seed(seed + 1)


def task_loss(ctx, t, constraint):
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    (model, gen), V, T = gpt_with_loss(t, seed=9), 8 * t, 4 * t
    idx, targets = torch.randint(0, V, (2, T), generator=gen), torch.randint(0, V, (2, T), generator=gen)
    targets[0, : T // 2 + 1] = -1  # ignored: fewer counted on some ranks than on others
    plan = autoshard.discover(model, (idx, targets), t, dims=("B T", "B T"), constraint=constraint)
    sharded = autoshard.shard(model, plan, group)
    w = torch.randn(2, T, V, generator=gen, dtype=torch.float64)
    logits, loss = model(idx, targets)
    (loss + (logits * w).sum()).backward()
    mine, my_loss = sharded(idx, targets)
    (my_loss + (mine * w).sum()).backward()
    grads = sharded.full_grads()
    return {"loss": rel_err(my_loss, loss), "logits": rel_err(mine, logits)} | {
        n: rel_err(grads[n], p.grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("constraint", ["weights", "activations"])
@pytest.mark.parametrize("t", [2, 4])
def test_a_gpt_returning_its_cross_entropy_loss_shards_equal(world, t, constraint):
    """F.cross_entropy is traced as the ops it is made of, so that the count of targets not ignored is reduced
    with the losses: the mean is exact on any split of the batch."""
    for errors in world.run(task_loss, t=t, constraint=constraint):
        assert errors is None or max(errors.values()) < TOL, errors


def task_training(ctx, t, constraint, steps=4):
    """GPTWithLoss trained by AdamW (weight decay on) for a few steps on new batches, sharded and unsharded, from
    the same weights: each step's loss, and at the end full_grads() and a forward on one more batch."""
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    (model, gen), V, T = gpt_with_loss(t, seed=14), 8 * t, 4 * t
    batches = [(torch.randint(0, V, (2, T), generator=gen), torch.randint(0, V, (2, T), generator=gen))
               for _ in range(steps + 1)]
    sharded = autoshard.shard(model, autoshard.discover(model, batches[0], t, dims=("B T", "B T"),
                                                        constraint=constraint), group)
    losses = {}
    for name, m in (("unsharded", model), ("sharded", sharded)):
        opt, losses[name] = torch.optim.AdamW(m.parameters(), lr=3e-2, weight_decay=0.1), []
        for idx, targets in batches[:steps]:
            opt.zero_grad()
            loss = m(idx, targets)[1]
            loss.backward()
            opt.step()
            losses[name].append(loss)
        losses[name].append(m(*batches[steps])[1])
    grads = sharded.full_grads()
    errors = {f"loss {k}": rel_err(a, b) for k, (a, b) in enumerate(zip(losses["sharded"], losses["unsharded"]))}
    return errors | {n: rel_err(grads[n], p.grad) for n, p in model.named_parameters()}, [
        loss.item() for loss in losses["unsharded"]]


@pytest.mark.parametrize("constraint", ["weights", "activations"])
@pytest.mark.parametrize("t", [2, 4])
def test_a_sharded_gpt_trains_as_the_unsharded_one(world, t, constraint):
    """shard's parameters are this rank's shards, trained by any optimizer: replicated ones get whole gradients
    (their partial ones all-reduced in backward), so every rank steps them alike. Four AdamW steps: each loss
    equal to the unsharded model's, and the loss falls."""
    for result in world.run(task_training, t=t, constraint=constraint):
        if result is not None:
            errors, losses = result
            assert max(errors.values()) < TOL, errors
            assert losses[-2] < losses[0], losses


LOSSES = {"mse": lambda y, z: F.mse_loss(y, z), "smooth_l1": lambda y, z: F.smooth_l1_loss(y, z, beta=0.5),
          "bce": lambda y, z: F.binary_cross_entropy(torch.sigmoid(y), torch.sigmoid(z)),  # new_full(y, ...) in it
          "kl": lambda y, z: F.kl_div(F.log_softmax(y, -1), F.softmax(z, -1), reduction="batchmean"),
          "ce_smoothed": lambda y, z: F.cross_entropy(y.transpose(1, 2), z.argmax(-1), label_smoothing=0.1)}


class MLPLoss(nn.Module):
    def __init__(self, loss, C=16):
        super().__init__()
        self.up, self.down, self.loss = nn.Linear(C, 4 * C), nn.Linear(4 * C, C), LOSSES[loss]

    def forward(self, x, z):
        return self.loss(self.down(F.gelu(self.up(x))), z)


def task_mlp_loss(ctx, loss, t, constraint):
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    torch.manual_seed(11)
    model, x, z = MLPLoss(loss).double(), torch.randn(2, 8, 16, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    sharded = autoshard.shard(model, autoshard.discover(model, (x, z), t, constraint=constraint), group)
    model(x, z).backward()
    mine = sharded(x, z)
    mine.backward()
    grads = sharded.full_grads()
    return {"loss": rel_err(mine, model(x, z))} | {n: rel_err(grads[n], p.grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("t, constraint", [(2, "weights"), (4, "activations")])
@pytest.mark.parametrize("loss", LOSSES)
def test_a_module_returning_a_loss_shards_equal(world, loss, t, constraint):
    for errors in world.run(task_mlp_loss, loss=loss, t=t, constraint=constraint):
        assert errors is None or max(errors.values()) < TOL, errors


def task_vit(ctx, t):
    """transformers' ViTModel on pixels (dims "B Ch H W"): a strided Conv2d cuts the patches, a class token is
    expanded and concatenated, position embeddings added."""
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    import transformers as tf
    torch.manual_seed(12)
    cfg = tf.ViTConfig(hidden_size=8 * t, num_attention_heads=t, intermediate_size=16 * t, num_hidden_layers=2,
                       image_size=8, patch_size=4, num_channels=3)
    model = randomized(tf.ViTModel(cfg, add_pooling_layer=False).double().eval())
    pixels = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    plan = autoshard.discover(model, (pixels.detach(),), t, dims=("B Ch H W",))
    sharded = autoshard.shard(model, plan, group)
    y = sharded(pixels).last_hidden_state
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    (y * w).sum().backward()
    mine, pixels.grad = pixels.grad, None
    expected = model(pixels).last_hidden_state
    (expected * w).sum().backward()
    convs = [v for v in plan.graph.values.values() if v.target == "embeddings.patch_embeddings.projection.weight"]
    errors = {"output": rel_err(y, expected), "pixels": rel_err(mine, pixels.grad)}
    return plan.placements[convs[0].name].kind, errors | grad_errors(sharded.full_grads(), model)


@pytest.mark.parametrize("t", [2, 4])
def test_a_whole_vision_transformer_on_pixels_shards_equal(world, t):
    for result in world.run(task_vit, t=t):
        if result is not None:
            conv, errors = result
            assert conv == "S", "the patch embedding's convolution is a weight: split"
            assert max(errors.values()) < TOL, errors


def task_shard_errors(ctx):
    plan = plan_of("llama", t=4)
    module, _ = built("llama", 2, 16, 64, 8, "cpu")
    found = []
    for call in (lambda: autoshard.shard(module, plan, ctx.group(2)),
                 lambda: autoshard.shard(built("llama", 2, 16, 32, 8, "cpu")[0], plan, ctx.group(4)),
                 lambda: autoshard.shard(module, plan, ctx.group(4))(torch.zeros(2, 8, 64, dtype=torch.float64))):
        try:
            call()
            found.append(None)
        except ValueError as e:
            found.append(str(e))
    return found


def test_shard_refuses_a_group_module_or_input_that_does_not_fit_the_plan(world):
    for rank, found in enumerate(world.run(task_shard_errors)):
        assert "the group has 2 ranks; the plan was discovered for t=4" in found[0]
        assert "parameter attention_norm.weight is (32,) torch.float64; the plan's is (64,)" in found[1]
        assert "inputs of shapes [(2, 8, 64)]; the plan was discovered for [(2, 16, 64)]" in found[2]


def task_cross_attention(ctx, t, constraint):
    """CrossAttention on x (B, T, C) and a memory (B, S, C) of another length, dims not given: outputs, both inputs'
    gradients and full_grads() against the unsharded module."""
    group = ctx.group(t)
    if ctx.rank >= t:
        return None
    gen = torch.Generator().manual_seed(21)
    module = randomized(CrossAttention(8 * t, 2 * t).double(), gen)
    x, memory = (torch.randn(2, n, 8 * t, generator=gen, dtype=torch.float64, requires_grad=True) for n in (2 * t, 3))
    plan = autoshard.discover(module, (x.detach(), memory.detach()), t, constraint=constraint)
    sharded = autoshard.shard(module, plan, group)
    y = sharded(x, memory)
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (y * w).sum().backward()
    mine = [x.grad, memory.grad]
    x.grad = memory.grad = None
    expected = module(x, memory)
    (expected * w).sum().backward()
    errors = {"output": rel_err(y, expected), "x": rel_err(mine[0], x.grad), "memory": rel_err(mine[1], memory.grad)}
    return errors | grad_errors(sharded.full_grads(), module)


@pytest.mark.parametrize("constraint", ["weights", "activations"])
@pytest.mark.parametrize("t", [2, 4])
def test_cross_attention_on_a_memory_of_another_length_shards_equal(world, t, constraint):
    for errors in world.run(task_cross_attention, t=t, constraint=constraint):
        if errors is not None:
            assert max(errors.values()) < TOL, errors
