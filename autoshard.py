"""autoshard.py: discover how to shard a module written the ordinary way, then run it sharded.

nanosp.py places Megatron-LM's f, f̄ and sequence parallelism's g, ḡ by hand. Here any unsharded
module (nn.Linear, LayerNorm or RMSNorm, rotary embeddings, scaled_dot_product_attention or attention
written out, SwiGLU, Hugging Face blocks, nanosp's own Block) is traced, its cheapest plan searched,
and the plan run on t ranks with those same four operators:

    plan = autoshard.discover(module, example_inputs, t, dims=None, constraint="weights")
    print(plan)                                   # each weight's placement, each collective's bytes
    sharded = autoshard.shard(module, plan, group)
    y = sharded(*inputs); y.sum().backward(); sharded.full_grads()

1. trace    torch.export turns the module into ATen ops (linear, layer_norm, view, sdpa, ...); on
            the meta device nothing is computed, so a plan for a 7B-sized block costs no memory
2. indices  every dimension of every tensor is a tuple of named factors, einsum-style: B T C, and
            the (heads, head dim) a view spells out of a projection's output features
3. rules    a tensor is R (replicated), S(i) (split along index i) or P (partial sums: the ranks'
            tensors add up to it). An op split along i reads the inputs that hold i split and the
            others whole; RULES says what each op cannot split, what it is linear in (partial sums
            flow through it, so two branches reduce once) and what it keeps for backward
4. price    a tensor read in another placement than it has is moved, forward and backward, by the
            paper's f, f̄, g, ḡ or one of a few other moves, priced under the ring algorithm
5. search   a dynamic programme over the ops in graph order, exact and linear in their number;
            repeated identical blocks are solved once
6. run      shard(): the traced graph interpreted on this rank's shards, the plan's moves between
            the ops, in the autograd graph, so the sharded module trains

    python autoshard.py    # nanosp's Block: the rules, then Megatron's and SP's plans beside nanosp's ledger
"""
import argparse
import contextlib
import dataclasses
import gc
import math
import operator
import os
import re
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.fx as fx

import nanosp

CONSTRAINTS = {
    "none": "any plan, replicating everything included",
    "weights": "every weight matrix split over the t ranks, and no collective moves a weight",
    "activations": "weights split, and every activation a rank keeps for backward split too",
}


# ----------------------------------------------------------------------------------------------
# 1. trace


def trace(module, inputs):
    """torch.export's training IR of module(*inputs): ATen ops, linear, layer_norm and
    scaled_dot_product_attention kept whole."""
    try:
        return torch.export.export(module, inputs, strict=False)
    except Exception as e:  # export says which Python it could not trace: its first line, in one
        raise ValueError(f"torch.export could not trace {type(module).__name__}: "
                         f"{str(e).strip().splitlines()[0]}") from e


def source(node):
    """'file.py:12 `code`': where in the module's source an op was written."""
    found = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.meta.get("stack_trace") or "")
    return f"{os.path.basename(found[-1][0])}:{found[-1][1]} `{found[-1][2].strip()}`" if found else node.name


def op_name(node):
    return node.target.name().split("::")[-1].split(".")[0] if hasattr(node.target, "name") else str(node.target)


def named_args(node):
    """The op's arguments by the names of its ATen schema (defaults filled in)."""
    schema = node.target._schema.arguments
    args = {a.name: a.default_value if a.has_default_value() else None for a in schema}
    args.update(zip((a.name for a in schema), node.args))
    return args | dict(node.kwargs)


# ----------------------------------------------------------------------------------------------
# 2. indices


class Indices:
    """Index names, as einsum's letters. A dimension is a tuple of factors: (C,), or (heads, d) once
    a view spells them out. Unifying two dimensions makes them one index, cutting a factor where the
    other has a boundary: a projection's (3C) features and the (three, C) of a split become one."""

    def __init__(self):
        self.size, self.alias, self.born = {}, {}, {}

    def new(self, name, size):
        while name in self.size:
            name += "'"
        self.size[name], self.born[name] = size, len(self.born)
        return name

    def expand(self, dim):
        return tuple(g for f in dim for g in (self.expand(self.alias[f]) if f in self.alias else (f,)))

    def cut(self, f, n):
        """Factor f becomes (f/n, f%rest): its outer n and the rest."""
        self.alias[f] = (self.new(f"{f}/{n}", n), self.new(f"{f}%{self.size[f] // n}", self.size[f] // n))
        return self.alias[f]

    def unify(self, a, b, where):
        a, b = list(self.expand(a)), list(self.expand(b))
        if math.prod(map(self.size.get, a)) != math.prod(map(self.size.get, b)):
            raise ValueError(f"{where}: dimensions {a} and {b} differ in size")
        while a and b:
            a[:1], b[:1] = self.expand(a[:1]), self.expand(b[:1])  # an earlier step may have cut them
            x, y = a[0], b[0]
            if self.size[x] < self.size[y]:
                a, b, x, y = b, a, y, x
            if self.size[x] % self.size[y]:
                raise ValueError(f"{where}: dimensions of {x} and {y} cannot be one index")
            if self.size[x] > self.size[y]:
                a[:1] = self.cut(x, self.size[y])
                x = a[0]
            if x != y:
                old, new = sorted((x, y), key=self.born.get)
                self.alias[new] = (old,)
            del a[0], b[0]

    def regroup(self, dims, shape):
        """dims' factors in order, grouped into dimensions of `shape` (a view), cutting a factor
        that a new boundary falls inside. None if the boundaries do not align (an uneven reshape)."""
        queue, out = [f for d in dims for f in self.expand(d)], []
        for n in shape:
            dim = []
            while n > 1:
                if not queue:
                    return None
                f = queue.pop(0)
                if n % self.size[f] == 0:
                    dim.append(f)
                    n //= self.size[f]
                elif self.size[f] % n == 0:
                    head, tail = self.cut(f, n)
                    dim.append(head)
                    queue.insert(0, tail)
                    n = 1
                else:
                    return None
            out.append(tuple(dim))
        return out


# ----------------------------------------------------------------------------------------------
# 3. rules: each op read as an einsum


class Law(NamedTuple):
    """What a rule says of one op, in its indices (and, while tracing, its input nodes)."""
    outputs: list           # the dims of each output
    whole: tuple = ()       # dims it cannot split (a norm's, a softmax's, a slice's)
    summed: tuple = ()      # dims it sums over: split along one, its output is a partial sum P
    linear: tuple = ()      # groups of inputs it is linear in together: read as P, its output is P
    affine: tuple = ()      # inputs added to a sum (a bias): read as P when the output is P
    saves: tuple = ()       # inputs it keeps for backward; "out": its output
    new: tuple = ()         # dims of tensors it makes and keeps (a norm's statistics)
    view: bool = False      # elementwise or a view: keeps its inputs' placement when it can


def _fresh(g, shape, stem):
    return [(g.idx.new(f"{stem}:{k}", n),) if n > 1 else () for k, n in enumerate(shape)]


def _align(g, node, out, pairs):
    """Fill and unify out's dims with each (shape, dims), aligned from the right as broadcasting
    aligns them; a size-1 dim joins nothing."""
    for shape, dims in pairs:
        for k, (n, d) in enumerate(zip(shape[::-1], dims[::-1]), 1):
            if n > 1 and out[-k]:
                g.idx.unify(out[-k], d, source(node))
            elif n > 1:
                out[-k] = d
    return out


def _broadcast(g, node, tensors):
    return _align(g, node, [()] * len(g.shape(node)), [(g.shape(x), g.dims(x)) for x in tensors])


def _tensors(value):
    """The nodes among value's (nested) arguments."""
    found = []
    fx.node.map_arg(value, found.append)
    return found


def _pointwise(saves, linear):
    """An elementwise op. saves: "inputs", "out", "first"/"second" (a mask) or "". linear: "all"
    (its tensors together; not with a scalar added), "one" (any one), "first", "rest" or ""."""
    def rule(g, node, a):
        xs = [x for v in a.values() for x in _tensors(v)]
        scalar = any(isinstance(v, (int, float)) and v and k in ("self", "other") for k, v in a.items())
        groups = {"all": [xs] * (not scalar), "one": [[x] for x in xs] * (len(set(xs)) == len(xs)),
                  "first": [xs[:1]], "rest": [xs[1:]] * (len(xs) == 3),
                  "fill0": [xs[:1]] * (a.get("value") == 0)}.get(linear, [])
        kept = {"inputs": xs, "out": ["out"], "first": xs[:1], "second": xs[1:2]}.get(saves, [])
        return Law([_broadcast(g, node, xs)], linear=tuple(map(tuple, groups)), saves=tuple(kept), view=True)
    return rule


def _reduced(a, n):
    dim = a.get("dim")
    return sorted({d % n for d in ([dim] if isinstance(dim, int) else dim)}) if dim not in (None, []) else range(n)


def _reduction(linear):
    """sum, mean: linear, a split along a summed index gives P. The others cannot split it."""
    def rule(g, node, a):
        x = a["self"]
        dx, keep = g.dims(x), a.get("keepdim") or False
        gone = _reduced(a, len(dx))
        out = [() if k in gone else d for k, d in enumerate(dx) if keep or k not in gone]
        summed = tuple(dx[k] for k in gone)
        return Law([out], summed=summed, linear=((x,),)) if linear else Law([out], whole=summed, saves=(x, "out"))
    return rule


def _contraction(g, node, a):
    """linear, mm, addmm, bmm, matmul: x[.., m, i] times W[i, n] (linear: W[n, i]) plus a bias."""
    name = op_name(node)
    x, w = {"linear": ("input", "weight"), "addmm": ("mat1", "mat2"), "matmul": ("self", "other")}.get(name, ("self", "mat2"))
    x, w, bias = a[x], a[w], a["bias"] if name == "linear" else a["self"] if name == "addmm" else None
    dx, dw, sw = g.dims(x), g.dims(w), g.shape(w)
    if name == "linear":
        dw, sw = dw[::-1], sw[::-1]
    if len(dx) < 2 or len(dw) < 1:
        raise ValueError(f"no sharding rule for {name} of a 1-D input ({source(node)})")
    g.idx.unify(dx[-1], dw[-2] if len(dw) > 1 else dw[0], source(node))
    batch = _align(g, node, [()] * (len(g.shape(node)) - 1 - (len(dw) > 1)),
                   [(g.shape(x)[:-2], dx[:-2]), (sw[:-2], dw[:-2])])
    out = batch + [dx[-2]] + ([dw[-1]] if len(dw) > 1 else [])
    if bias is not None:
        _align(g, node, out, [(g.shape(bias), g.dims(bias))])
    groups = ((x, bias), (w, bias)) if bias is not None else ((x,), (w,))
    return Law([out], summed=(dx[-1],), linear=groups, affine=(bias,) if bias is not None else (), saves=(x, w))


def _einsum(g, node, a):
    ins, _, out = a["equation"].replace(" ", "").partition("->")
    xs, letters = a["tensors"], {}
    if "." in ins:
        raise ValueError(f"no sharding rule for an einsum with '...' ({source(node)})")
    for spec, x in zip(ins.split(","), xs):
        for ch, d, n in zip(spec, g.dims(x), g.shape(x)):
            if n > 1 and ch in letters:
                g.idx.unify(letters[ch], d, source(node))
            elif n > 1:
                letters[ch] = d
    out = out if "->" in a["equation"] else "".join(sorted(c for c in set(ins) - {","} if ins.count(c) == 1))
    return Law([[letters.get(ch, ()) for ch in out]], summed=tuple(d for ch, d in letters.items() if ch not in out),
               linear=tuple((x,) for x in xs), saves=tuple(xs))


def _norm(g, node, a):
    """layer_norm, rms_norm: the normalised dims whole; keeps x and per-row statistics."""
    x, k = a["input"], len(a["normalized_shape"])
    dx = g.dims(x)
    for p in (a.get("weight"), a.get("bias")):
        if p is not None:
            for d, e in zip(g.dims(p), dx[-k:]):
                g.idx.unify(d, e, source(node))
    return Law([dx], whole=tuple(dx[-k:]), saves=(x,), new=(dx[:-k],) * (2 if op_name(node) == "layer_norm" else 1))


def _softmax(g, node, a):
    dx = g.dims(a["self"])
    return Law([dx], whole=(dx[a["dim"] % len(dx)],), saves=("out",))


def _attention(g, node, a):
    """scaled_dot_product_attention: q[.., h, s, d] k[.., h', s', d] v[.., h', s', e]; with fewer
    k, v heads (enable_gqa) q's heads are (h', group). Heads and batch split; s, s', d, e whole."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a["dropout_p"]:
        raise ValueError(f"scaled_dot_product_attention with dropout_p={a['dropout_p']} ({source(node)}): "
                         f"a sharded run would draw other masks; trace it in eval() or with dropout 0")
    dq, dk, dv = g.dims(q), g.dims(k), g.dims(v)
    hq, hk = g.shape(q)[-3], g.shape(k)[-3]
    heads = dk[-3] + ((g.idx.new("group", hq // hk),) if hq != hk else ())
    for x, y in ((dq[-3], heads), (dk[-3], dv[-3]), (dq[-1], dk[-1]), (dk[-2], dv[-2])):
        g.idx.unify(x, y, source(node))
    batch = _align(g, node, [()] * (len(dq) - 3), [(g.shape(x)[:-3], g.dims(x)[:-3]) for x in (q, k, v)])
    if mask is not None:
        _align(g, node, batch + [dq[-3], dq[-2], dk[-2]], [(g.shape(mask), g.dims(mask))])
    return Law([batch + [dq[-3], dq[-2], dv[-1]]], whole=(dq[-2], dk[-2], dq[-1], dv[-1]), saves=(q, k, v, "out"),
               new=(batch + [dq[-3], dq[-2]],))


def _embedding(g, node, a):
    dw = g.dims(a["weight"])
    return Law([g.dims(a["indices"]) + [dw[1]]], whole=(dw[0],), saves=(a["indices"],))


def _view(g, node, a):
    """view, reshape: factors regrouped; an uneven regrouping cannot split anything it touches."""
    x, shape = a["self"], g.shape(node)
    out = g.idx.regroup(g.dims(x), shape)
    if out is None:
        out = _fresh(g, shape, node.name)
        return Law([out], whole=tuple(g.dims(x)) + tuple(out), view=True)
    return Law([out], linear=((x,),), view=True)


def _shape_op(g, node, a):
    """permute, transpose, t, unsqueeze, squeeze, expand, slice, select, narrow: dims rearranged;
    a slice or a select of part of a dim cannot split it."""
    name, x = op_name(node), a["self"]
    dx, sx, shape = list(g.dims(x)), g.shape(x), g.shape(node)
    whole = ()
    if name == "permute":
        dx = [dx[d] for d in a["dims"]]
    elif name in ("transpose", "t"):
        i, j = (a["dim0"], a["dim1"]) if name == "transpose" else (0, 1)
        dx[i], dx[j] = dx[j], dx[i]
    elif name == "unsqueeze":
        dx.insert(a["dim"] % (len(dx) + 1), ())
    elif name == "squeeze":
        dim = a.get("dim")
        gone = range(len(sx)) if dim is None else {d % len(sx) for d in ([dim] if isinstance(dim, int) else dim)}
        dx = [d for k, d in enumerate(dx) if not (k in gone and sx[k] == 1)]
    elif name == "expand":  # a size-1 dim grown to n is a new index
        sx = (1,) * (len(shape) - len(sx)) + tuple(sx)
        dx = [()] * (len(shape) - len(dx)) + dx
        dx = [d if m == n else (g.idx.new(f"{node.name}:{k}", n),) if n > 1 else ()
              for k, (d, m, n) in enumerate(zip(dx, sx, shape))]
    else:  # slice, select, narrow
        k = a["dim"] % len(dx)
        if name == "select":
            whole, dx = (dx[k],), dx[:k] + dx[k + 1:]
        elif shape[k] != sx[k]:
            new = (g.idx.new(f"{node.name}:{k}", shape[k]),) if shape[k] > 1 else ()
            whole, dx[k] = (dx[k], new), new
    return Law([dx], whole=whole, linear=((x,),), view=True)


def _split(g, node, a):
    """split, unbind: equal parts along a dim that becomes (parts, rest); the parts index whole."""
    x, shapes = a["self"], g.shapes(node)
    dx, k = g.dims(x), a.get("dim", 0) % len(g.dims(x))
    n, m = len(shapes), shapes[0][k] if op_name(node) != "unbind" else 1
    if op_name(node) == "unbind":
        return Law([dx[:k] + dx[k + 1:]] * n, whole=(dx[k],), linear=((x,),), view=True)
    if all(s[k] == m for s in shapes) and n > 1:
        parts = (g.idx.new(f"{node.name}:parts", n),) + ((g.idx.new(f"{node.name}:{k}", m),) if m > 1 else ())
        g.idx.unify(dx[k], parts, source(node))
        return Law([dx[:k] + [parts[1:]] + dx[k + 1:]] * n, whole=(parts[:1],), linear=((x,),), view=True)
    outs = [dx[:k] + [(g.idx.new(f"{node.name}:{i}", s[k]),) if s[k] > 1 else ()] + dx[k + 1:] for i, s in enumerate(shapes)]
    return Law(outs, whole=(dx[k],) + tuple(o[k] for o in outs), linear=((x,),), view=True)


def _cat(g, node, a):
    """cat, stack: the other dims shared; the joined dim (or the new one) whole."""
    xs, shape = a["tensors"], g.shape(node)
    k = a["dim"] % len(shape)
    stack = op_name(node) == "stack"
    out = [()] * len(shape)
    for x in xs:
        dx = g.dims(x)
        dx = dx[:k] + [()] + dx[k:] if stack else dx
        for i, d in enumerate(dx):
            if i != k and shape[i] > 1:
                if out[i]:
                    g.idx.unify(out[i], d, source(node))
                else:
                    out[i] = d
    out[k] = (g.idx.new(f"{node.name}:{k}", shape[k]),)
    return Law([out], whole=tuple(g.dims(x)[k] for x in xs if not stack) + (out[k],), linear=(tuple(xs),), view=True)


RULES = [  # ATen ops, rule, indices, cannot split, linear in (P flows through), keeps for backward
    ("add sub rsub", _pointwise("", "all"), "x[...] y[...] -> z[...] (broadcast)", "-", "x, y together", "-"),
    ("mul", _pointwise("inputs", "one"), "x[...] y[...] -> z[...]", "-", "x or y", "x, y"),
    ("div", _pointwise("inputs", "first"), "x[...] y[...] -> z[...]", "-", "x", "x, y"),
    ("neg clone alias contiguous to _to_copy lift_fresh_copy dropout detach", _pointwise("", "all"),
     "x[...] -> y[...] (dropout: p = 0 only)", "-", "x", "-"),
    ("silu gelu relu elu leaky_relu softplus hardtanh log sin cos erf abs pow clamp log1p square mish hardswish",
     _pointwise("inputs", ""), "x[...] -> y[...]", "-", "-", "x"),
    ("sigmoid tanh exp rsqrt sqrt reciprocal expm1", _pointwise("out", ""), "x[...] -> y[...]", "-", "-", "y"),
    ("maximum minimum atan2", _pointwise("inputs", ""), "x[...] y[...] -> z[...]", "-", "-", "x, y"),
    ("where", _pointwise("first", "rest"), "c[...] x[...] y[...] -> z[...]", "-", "x, y together", "c"),
    ("masked_fill", _pointwise("second", "fill0"), "x[...] m[...] -> y[...]", "-", "x (fill 0)", "m"),
    ("eq ne lt le gt ge logical_not logical_and logical_or bitwise_not isnan", _pointwise("", ""),
     "x[...] y[...] -> z[...]", "-", "-", "-"),
    ("sum mean", _reduction(True), "x[i, j] -> y[i]", "-", "x (j summed)", "-"),
    ("amax amin var std logsumexp linalg_vector_norm prod", _reduction(False), "x[i, j] -> y[i]", "j", "-", "x, y"),
    ("linear mm addmm bmm matmul", _contraction, "x[.., m, i] W[i, n] b[n] -> y[.., m, n]", "-", "x with b", "x, W"),
    ("einsum", _einsum, "its equation", "-", "any one operand", "all"),
    ("layer_norm rms_norm", _norm, "x[..., c] w[c] b[c] -> y[..., c]", "c", "-", "x; its mean, 1/std per row"),
    ("softmax _softmax log_softmax", _softmax, "x[..., j] -> y[..., j]", "j", "-", "y"),
    ("scaled_dot_product_attention", _attention, "q[.., h, s, d] k[.., h, s', d] v[.., h, s', e] -> y[.., h, s, e]",
     "s, s', d, e", "-", "q, k, v, y; logsumexp"),
    ("embedding", _embedding, "W[v, c] i[...] -> y[..., c]", "v", "-", "i"),
    ("view reshape _unsafe_view flatten unflatten", _view, "x[(a b)] -> y[a, b]: factors regrouped", "an uneven regrouping", "x", "-"),
    ("permute transpose t unsqueeze squeeze expand slice select narrow", _shape_op,
     "dims moved, added, or part of one taken", "a dim cut by slice/select", "x", "-"),
    ("split split_with_sizes unbind", _split, "x[(n m)] -> n tensors y[m]", "n", "x", "-"),
    ("cat stack", _cat, "x[.., i] y[.., j] -> z[.., (i + j)]", "i, j", "all together", "-"),
]
RULE_OF = {name: rule for names, rule, *_ in RULES for name in names.split()}
MAKERS = set("arange ones zeros full empty scalar_tensor zeros_like ones_like full_like empty_like new_ones "
             "new_zeros new_full new_empty tensor".split())  # made on each rank, whole: no rule needed
ALIASES = set("view _unsafe_view permute transpose t unsqueeze squeeze expand slice select narrow split "
              "split_with_sizes unbind alias detach".split())  # views: one storage with their input


def print_rules():
    print("An op split along index i reads each input that holds i split, S(i), and the others whole, R; its output "
          "is S(i), or P (partial sums) if it summed over i. An op linear in its inputs may read them as P and give P: "
          "partial sums flow on, so branches that add up are reduced once. Ops on constants alone (masks, rotary "
          "tables, aranges) run whole on every rank and need no rule.\n")
    table(["ATen ops", "indices", "cannot split", "linear in (P in, P out)", "keeps for backward"],
          [(", ".join(names.split()[:6]) + " ..." * (len(names.split()) > 6), *text) for names, _, *text in RULES])
    print("\nMoves: what serves a tensor placed `from` to a reader that reads it placed `to`; N its whole bytes.\n")
    table(["move", "from -> to", "forward", "backward", "ring bytes per rank", "in nanosp.py"],
          [(name, fromto, " + ".join(fwd) or "-", " + ".join(bwd) or "-",
            f"{sum(RING[o] for o in fwd + bwd)} (t-1)/t N" if fwd + bwd else "0", helper)
           for name, (fwd, bwd, fromto, helper) in MOVES.items()])


# ----------------------------------------------------------------------------------------------
# the traced graph, its dims named


@dataclasses.dataclass
class Value:
    """One tensor of the traced graph."""
    name: str
    shape: tuple
    kind: str               # "input", "parameter", "constant" (buffers, made on every rank) or "activation"
    target: str = ""        # the parameter's (or input's) name
    grad: bool = False      # needs a gradient
    dims: list = None       # per dimension, a tuple of index names
    base: str = None        # the value whose storage it views
    floating: bool = True

    @property
    def factors(self):
        return {f for d in self.dims for f in d}


@dataclasses.dataclass
class Op:
    name: str
    node: fx.Node
    kind: str               # the ATen op's name
    inputs: tuple           # the non-constant values it reads, each once
    outputs: tuple          # the values it makes (None where unused)
    law: Law                # in value names and (after freezing) sets of indices
    where: str              # its source line


class Graph:
    """A module traced to ATen ops, every dimension of every tensor named, every op read by its rule.
    Nothing is skipped: an op without a rule is a ValueError naming it and its source line."""

    def __init__(self, module, example_inputs, dims=None):
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        for i, x in enumerate(inputs):
            if not torch.is_tensor(x):
                raise ValueError(f"example input {i} is a {type(x).__name__}: discover takes tensors")
        self.names = names = _dim_names(inputs, dims)
        self.module, self.shapes_in = type(module).__name__, [tuple(x.shape) for x in inputs]
        self.element_size = next((x.element_size() for x in inputs if x.is_floating_point()), 4)
        self.ep = trace(module, inputs)
        self.idx, self.values, self.ops, self.program, self.inputs = Indices(), {}, [], [], []
        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        for s in self.ep.graph_signature.output_specs:
            if s.kind.name != "USER_OUTPUT":
                raise ValueError(f"{self.module} writes {s.target} in its forward: a sharded run cannot")
        for node in self.ep.graph.nodes:
            self._read(node, specs, names)
        x, y = self.values[self.inputs[0]], self.values.get(self.outputs[0])
        self.aligned = y is not None and y.shape == x.shape and y.kind == "activation"
        if self.aligned:  # one of a stack of blocks: the output is the next block's input
            for d, e in zip(y.dims, x.dims):
                self.idx.unify(d, e, f"{self.module}'s output and input")
        self._freeze()
        x = self.values[self.inputs[0]]
        self.sequence = x.dims[names[0].index("T")] if "T" in names[0] else ()

    def dims(self, node):
        v = self.values[node.name]
        if v.dims is None:  # a leaf named at its first use
            v.dims = _fresh(self, v.shape, v.target or v.name)
        return v.dims

    def shape(self, node):
        return tuple(node.meta["val"].shape)

    def shapes(self, node):
        return [tuple(o.shape) for o in node.meta["val"]]

    def _read(self, node, specs, names):
        if node.op == "placeholder":
            spec, val = specs[node.name], node.meta["val"]
            kind = {"USER_INPUT": "input", "PARAMETER": "parameter"}.get(spec.kind.name, "constant")
            target = f"input {len(self.inputs)}" if kind == "input" else spec.target
            grad = val.is_floating_point() and (kind == "input" or kind == "parameter" and
                                                self.ep.state_dict[target].requires_grad)
            v = self.values[node.name] = Value(node.name, tuple(val.shape), kind, target, grad, base=node.name,
                                               floating=val.is_floating_point())
            if kind == "input":
                v.dims = [(self._index(n, s, target),) if s > 1 else () for n, s in zip(names[len(self.inputs)], v.shape)]
                self.inputs.append(node.name)
        elif node.op == "output":
            self.outputs = [a.name if isinstance(a, fx.Node) else None for a in node.args[0]]
        elif node.target is not operator.getitem and any(torch.is_tensor(o) for o in _tensors_of(node.meta.get("val"))):
            self._read_op(node)

    def _index(self, name, size, where):
        if name in self.idx.size and self.idx.size[name] != size:
            raise ValueError(f"dims name {name} for sizes {self.idx.size[name]} and {size} ({where})")
        return name if name in self.idx.size else self.idx.new(name, size)

    def _read_op(self, node):
        val = node.meta["val"]
        multi = isinstance(val, (list, tuple))
        users = {u.args[1]: u.name for u in node.users if u.target is operator.getitem}
        outs = [users.get(i) for i in range(len(val))] if multi else [node.name]
        shapes = [tuple(o.shape) for o in _tensors_of(val)]
        ins = _tensors((node.args, node.kwargs))
        name = op_name(node)
        constant = name in MAKERS or all(self.values[x.name].kind == "constant" for x in ins)
        if name.startswith("rand") or name in ("bernoulli", "native_dropout"):
            raise ValueError(f"{name} ({source(node)}) draws random numbers: a sharded run would draw others")
        grad = any(self.values[x.name].grad for x in ins) and name != "detach"
        for o, shape, t in zip(outs, shapes, _tensors_of(val)):
            if o:
                self.values[o] = Value(o, shape, "constant" if constant else "activation", grad=grad and t.is_floating_point(),
                                       base=o, floating=t.is_floating_point())
        if constant:
            self.program.append(("constant", node, tuple(outs)))
            return
        if name not in RULE_OF:
            raise ValueError(f"no sharding rule for aten.{name} ({source(node)}); autoshard.print_rules() lists the ops it knows")
        a = named_args(node)
        if name == "dropout" and a["p"] and a["train"]:
            raise ValueError(f"dropout p={a['p']} ({source(node)}): a sharded run would draw other masks; "
                             f"trace the module in eval() or with p=0")
        law = RULE_OF[name](self, node, a)
        for o, d in zip(outs, law.outputs):
            if o:
                self.values[o].dims = d
        if name in ALIASES or name == "reshape" and _viewable(node):
            for o in outs:
                if o:
                    self.values[o].base = self.values[ins[0].name].base
        seen = list(dict.fromkeys(x.name for x in ins if self.values[x.name].kind != "constant"))
        self.ops.append(Op(node.name, node, name, tuple(seen), tuple(outs), law, source(node)))
        self.program.append(("op", len(self.ops) - 1, tuple(outs)))

    def _freeze(self):
        """Every dim in its finest factors; the laws in value names and index sets; who is live when."""
        E = self.idx.expand
        for v in self.values.values():
            v.dims = [E(d) for d in (v.dims if v.dims is not None else _fresh(self, v.shape, v.target or v.name))]

        def names(xs):
            return tuple("out" if x == "out" else x.name for x in xs if x is not None)

        for op in self.ops:
            law = op.law
            op.law = law._replace(whole=frozenset(f for d in law.whole for f in E(d)),
                                  summed=frozenset(f for d in law.summed for f in E(d)),
                                  linear=tuple(frozenset(names(gr)) for gr in law.linear if gr),
                                  affine=frozenset(names(law.affine)), saves=frozenset(names(law.saves)),
                                  new=tuple(tuple(E(d) for d in dims) for dims in law.new))
        n, self.last_read, born = len(self.ops), {}, {self.inputs[0]: 0}
        for k, op in enumerate(self.ops):
            for v in op.inputs:
                self.last_read[v] = k
                born.setdefault(v, k + 1)
            for o in op.outputs:
                if o:
                    born[o] = k + 1
        for o in self.outputs:
            if o and self.values[o].kind != "constant":
                self.last_read[o] = n
        self.live = [[v for v in born if born[v] <= k <= self.last_read.get(v, -1)] for k in range(n + 1)]
        self.memo = {}


def _tensors_of(val):
    return [o for o in (val if isinstance(val, (list, tuple)) else [val]) if torch.is_tensor(o)]


def _viewable(node):
    """Whether a reshape is a view (of a tensor laid out as traced) rather than a copy."""
    x = node.args[0].meta["val"]
    try:
        torch.empty_strided(x.shape, x.stride(), device="meta").view(node.meta["val"].shape)
        return True
    except RuntimeError:
        return False


def _dim_names(inputs, dims):
    dims = (dims,) if isinstance(dims, str) else (None,) * len(inputs) if dims is None else tuple(dims)
    if len(dims) != len(inputs):
        raise ValueError(f"dims names {len(dims)} inputs; there are {len(inputs)} example inputs")
    names = []
    for i, (x, spec) in enumerate(zip(inputs, dims)):
        if spec is None and x.dim() != 3:
            raise ValueError(f"input {i} has {x.dim()} dimensions {tuple(x.shape)}: name them in dims, e.g. "
                             f"dims[{i}]={' '.join('BTCDEFGH'[:x.dim()])!r} (only a 3-D input defaults to 'B T C')")
        names.append((spec or "B T C").split())
        if len(names[-1]) != x.dim():
            raise ValueError(f"dims[{i}]={spec!r} names {len(names[-1])} dimensions; input {i} has {x.dim()}: {tuple(x.shape)}")
    return names


# ----------------------------------------------------------------------------------------------
# 4. price: placements, and the moves between them
#
# N is the whole tensor's bytes. Under the ring algorithm a rank sends 2(t-1)/t N for an all-reduce and
# (t-1)/t N for an all-gather or a reduce-scatter (Korthikanti et al. 2022, section 4.2.2).


class Placement(NamedTuple):
    """R replicated, S split along an index, P partial sums (the ranks' tensors add up to it)."""
    kind: str
    index: Optional[str] = None

    def __str__(self):
        return f"S({self.index})" if self.kind == "S" else self.kind


R, P = Placement("R"), Placement("P")


def S(index):
    return Placement("S", index)


def grad_placement(p):
    """A tensor's gradient, once its readers' parts are moved and summed: placed like it, except
    that a partial sum's gradient is whole (the reduction's backward hands the whole to every rank)."""
    return p if p.kind == "S" else R


class Read(NamedTuple):
    """How an op reads a tensor: in which placement, the placement of the gradient it sends back,
    and (under "activations") whether it keeps what it read for backward."""
    placement: Placement
    grad: Placement
    saved: bool = False


class Move(NamedTuple):
    name: str
    index: Optional[str] = None


MOVES = {  # name: forward, backward, from -> to, nanosp's operator
    "f": ((), ("all-reduce",), "R -> R read by a split op (its gradient P)", "f, CopyToTensorParallelRegion"),
    "f̄": (("all-reduce",), (), "P -> R", "f_bar, ReduceFromTensorParallelRegion"),
    "g": (("all-gather",), ("reduce-scatter",), "S(i) -> R read by a split op", "g, GatherFromSequenceParallelRegion"),
    "ḡ": (("reduce-scatter",), ("all-gather",), "P -> S(i)", "g_bar, ReduceScatterToSequenceParallelRegion"),
    "gather": (("all-gather",), (), "S(i) -> R read by an unsplit op", "all_gather_sequence"),
    "split": ((), ("all-gather",), "R -> S(j), the only split reader", "all_gather_sequence"),
    "regather": ((), ("all-gather",), "keeps S(i) of a gathered input", "LinearWithSequenceGather"),
    "slice": ((), (), "R -> S(j), gradient P", "-"),
    "pad": ((), (), "S(i) -> P (zeros elsewhere)", "-"),
    "partial": ((), (), "R -> P (rank 0's, zeros elsewhere)", "-"),
    "mask": ((), (), "R -> R, gradient R -> P", "-"),
}
RING = {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 1}


class Moved(NamedTuple):
    """A move the plan makes: of which value, its whole bytes, whether its backward runs."""
    value: str
    move: Move
    nbytes: int
    grad: bool

    @property
    def forward(self):
        return MOVES[self.move.name][0]

    @property
    def backward(self):
        return MOVES[self.move.name][1] if self.grad else ()

    @property
    def units(self):
        return sum(RING[o] for o in self.forward + self.backward) * self.nbytes


def recipe(p, reads, via=None):
    """The moves that serve each read of a tensor placed p: {read: chain of moves}. Readers share
    what they can: every reader that sends a partial gradient back reads through one f (or one g),
    so two branches that read one tensor reduce its gradient once. A partial sum that an op reads
    whole and keeps (under "activations") goes through S(via): ḡ, then g and a re-gather, as
    sequence parallelism moves it."""
    chains = {rd: () for rd in reads if rd.placement == p and rd.grad == grad_placement(p)}
    rest = sorted(rd for rd in reads if rd not in chains)
    if p.kind == "P" and via and any(rd.saved and rd.placement == R for rd in rest):
        return chains | {rd: (Move("ḡ", via),) + chain for rd, chain in recipe(S(via), rest).items()}
    if p.kind == "P":
        to = {rd.placement for rd in rest}
        if len(to) == 1 and next(iter(to)).kind == "S":
            return chains | {rd: (Move("ḡ", rd.placement.index),) for rd in rest}
        return chains | _from_whole(rest, (Move("f̄"),) if rest else ())
    if p.kind == "R":
        return chains | _from_whole(rest, ())
    chains.update((rd, (Move("pad", p.index),)) for rd in rest if rd.placement == P)
    rest = [rd for rd in rest if rd.placement != P]
    shared = any(rd.grad != R for rd in rest)  # a partial gradient: all of them summed as P, reduce-scattered once
    base = (Move("g" if shared else "gather", p.index),)
    for rd in rest:
        then = () if rd.grad == P else (Move("slice", rd.placement.index),) if rd.placement.kind == "S" else \
            (Move("mask"),) if shared else ()
        chains[rd] = base + then + (Move("regather", p.index),) * (rd.saved and rd.placement == R)
    return chains


def _from_whole(rest, prefix):
    """Reads of a whole tensor: those sending a partial gradient share one f, unless a lone split
    reader is all there is (then a split: its gradient all-gathered, half an all-reduce's bytes)."""
    chains = {rd: prefix + (Move("partial"),) * (rd.placement == P) for rd in rest if rd.grad == R}
    needing = [rd for rd in rest if rd not in chains]
    if len({rd.placement for rd in needing}) == 1 and needing[0].placement.kind == "S":
        return chains | {rd: prefix + (Move("split", rd.placement.index),) for rd in needing}
    return chains | {rd: prefix + (Move("f"),) + ((Move("slice", rd.placement.index),) if rd.placement.kind == "S" else ())
                     for rd in needing}


def via(g, v, t):
    """The index a partial sum v is reduce-scattered along before it is gathered again: T if it can."""
    return next((f for f in sorted(g.values[v].factors, key=lambda f: (f not in g.sequence, g.idx.born[f]))
                 if g.idx.size[f] % t == 0), None)


def moves_of(g, v, p, reads, t):
    """The moves a value makes, each shared prefix of the chains once, in a fixed order."""
    val = g.values[v]
    chains = recipe(p, reads, via(g, v, t)).values()
    prefixes = sorted({c[:n] for c in chains for n in range(1, len(c) + 1)}, key=lambda c: (len(c), c))
    return [Moved(v, c[-1], math.prod(val.shape) * g.element_size, val.grad) for c in prefixes]


# ----------------------------------------------------------------------------------------------
# 5. search


class Choice(NamedTuple):
    """How an op runs: split along an index, or not (None), reading its linear group `partial` as P."""
    index: Optional[str] = None
    partial: Optional[int] = None


class Stepped(NamedTuple):
    entries: tuple          # each input's (placement, reads so far) after the op; None after its last read
    outputs: tuple          # each output's placement
    done: tuple             # (value, placement, reads) of the values read for the last time
    units: int              # their moves' ring bytes, in units of (t-1)/t
    kept: tuple             # (storage, bytes on one rank) of what the op keeps for backward


def options(g, k, t):
    """Op k's splits at size t: an index of its outputs or of what it sums over that t divides,
    that it can split and that no operand holds twice; unsplit; each linear group read as P."""
    if (k, t) not in g.memo:
        op, law = g.ops[k], g.ops[k].law
        vals = [g.values[v] for v in op.inputs + tuple(o for o in op.outputs if o)]
        found = {f for o in op.outputs if o for f in g.values[o].factors} | law.summed
        ok = [f for f in sorted(found - law.whole, key=g.idx.born.get) if g.idx.size[f] % t == 0
              and all(sum(f in d for d in v.dims) <= 1 for v in vals)]
        g.memo[k, t] = [Choice()] + [Choice(f) for f in ok] + [Choice(partial=i) for i in range(len(law.linear))]
    return g.memo[k, t]


def choices(g, k, t, live):
    """The choices worth trying in this state. An elementwise op or a view whose activation inputs
    are placed alike keeps that placement when it can: a move before it costs what one after it
    would (the plan space searched, exactly, is the one where they do). An op reads a group as P
    only if one of them is P already."""
    op, opts = g.ops[k], options(g, k, t)
    placed = {live[v][0] for v in op.inputs if g.values[v].kind != "parameter" and v in live}
    if op.law.view and len(placed) == 1:
        p = placed.pop()
        keep = Choice(p.index) if p.kind == "S" else Choice() if p == R else \
            next((Choice(partial=i) for i, gr in enumerate(op.law.linear)
                  if {v for v in op.inputs if v in live and live[v][0] == P} <= gr), None)
        if keep in opts:
            return [keep]
    return [c for c in opts if c.partial is None or any(live.get(v, (R,))[0] == P for v in op.law.linear[c.partial])]


def read_of(g, op, choice, v, constraint):
    """How op run as `choice` reads value v."""
    law, holds = op.law, choice.index is not None and choice.index in g.values[v].factors
    partial_out = choice.partial is not None or choice.index in law.summed
    if holds:
        rd = Read(S(choice.index), S(choice.index))
    elif choice.partial is not None and v in law.linear[choice.partial] or partial_out and v in law.affine:
        rd = Read(P, R)
    else:
        rd = Read(R, P if choice.index is not None or partial_out else R)
    if not g.values[v].grad:  # no gradient: how it would come back does not matter
        return Read(rd.placement, grad_placement(rd.placement))
    return rd._replace(saved=constraint == "activations" and v in law.saves)


def step(g, t, constraint, k, choice, entries):
    """Op k run as `choice`, given its inputs' entries (None: a leaf read for the first time, placed
    as read). None if the choice breaks the constraint."""
    op, law = g.ops[k], g.ops[k].law
    partial_out = choice.partial is not None or choice.index in law.summed
    outs = tuple(None if o is None else S(choice.index) if choice.index in g.values[o].factors else
                 P if partial_out else R for o in op.outputs)
    new, done, kept, nbytes = [], [], [], g.element_size
    for v, entry in zip(op.inputs, entries):
        val, rd = g.values[v], read_of(g, op, choice, v, constraint)
        p, reads = entry or (R if rd.placement == P else rd.placement, frozenset())
        if constraint != "none" and val.kind == "parameter" and len(val.shape) >= 2 and \
                (rd.placement.kind != "S" or rd.placement != p):
            return None  # a weight matrix split, and read only as it is split
        if v in law.saves and val.kind != "parameter":
            regathered = rd.saved and rd.placement == R and (p.kind == "S" or p == P and via(g, v, t))
            q = (p if p.kind == "S" else S(via(g, v, t))) if regathered else rd.placement
            if constraint == "activations" and q.kind != "S":
                return None
            storage = (val.base, q) if q == p else (v, q)
            size = math.prod(g.values[storage[0]].shape) * nbytes
            kept.append((storage, size // t if q.kind == "S" else size))
        reads = reads | {rd}
        new.append(None if g.last_read[v] == k else (p, reads))
        if g.last_read[v] == k:
            done.append((v, p, reads))
    for o, p in zip(op.outputs, outs):
        if o and "out" in law.saves:
            if constraint == "activations" and p.kind != "S":
                return None
            size = math.prod(g.values[g.values[o].base].shape) * nbytes
            kept.append(((g.values[o].base, p), size // t if p.kind == "S" else size))
    for i, dims in enumerate(law.new):
        split = any(choice.index in d for d in dims)
        if constraint == "activations" and not split:
            return None
        size = math.prod(g.idx.size[f] for d in dims for f in d) * nbytes
        kept.append(((op.name, i), size // t if split else size))
    units = sum(m.units for v, p, reads in done for m in moves_of(g, v, p, reads, t))
    return Stepped(tuple(new), outs, tuple(done), units, tuple(kept))


def finish(g, first, v, p, reads):
    """An output's last read: the module's output returns to its input's placement (the next block
    reads it so); any other output is taken as it is (shard's conversions to full are not priced)."""
    back = first if g.aligned and v == g.outputs[0] else p
    return reads | {Read(back, grad_placement(back))}


def search(g, t, constraint, first, start=0, stop=None, states=None):
    """The dynamic programme: over ops start..stop in graph order, a state is the (placement, reads)
    of every live value, and only the cheapest way to each state is kept; exact, because what
    happens later depends on nothing else. Returns {state: (units, kept bytes, partials, path)}."""
    stop = len(g.ops) if stop is None else stop
    states = states or {((first, frozenset()),) * (g.inputs[0] in g.live[0]): (0, 0, 0, None)}
    for k in range(start, stop):
        op, following = g.ops[k], {}
        for state, (units, kept, partials, path) in states.items():
            live = dict(zip(g.live[k], state))
            for choice in choices(g, k, t, live):
                key = ("step", t, constraint, k, choice, tuple(live.get(v) for v in op.inputs))
                if key not in g.memo:
                    g.memo[key] = step(g, t, constraint, k, choice, key[-1])
                s = g.memo[key]
                if s is None:
                    continue
                changed = dict(zip(op.inputs, s.entries)) | {o: (p, frozenset()) for o, p in zip(op.outputs, s.outputs) if o}
                after = tuple(changed[v] if v in changed else live[v] for v in g.live[k + 1])
                score = (units + s.units, kept + sum(b for _, b in s.kept), partials + (choice.partial is not None))
                if after not in following or score < following[after][:3]:
                    following[after] = (*score, (choice, path))
        states = following
    return states


class Segment(NamedTuple):
    """In a path of the search: the choices of a segment solved once, and the index map to this copy."""
    path: tuple
    fmap: dict


def segments(g):
    """The ops cut where one value alone is live (between two blocks, or two sub-blocks), each run with
    the first run it repeats and the map of indices that makes it that run again: a stack of identical
    blocks is solved once."""
    if "segments" not in g.memo:
        cuts = sorted({0, len(g.ops)} | {k for k in range(len(g.ops)) if len(g.live[k]) == 1})
        found, seen = [], {}
        for a, b in zip(cuts, cuts[1:]):
            shape = tuple((op.kind, g.values[next(o for o in op.outputs if o)].shape) for op in g.ops[a:b])
            match = next(((a0, fmap) for a0 in seen.get(shape, []) if (fmap := _same(g, a0, a, b - a)) is not None), None)
            found.append((a, b, match or (a, {})))
            if match is None:
                seen.setdefault(shape, []).append(a)
        g.memo["segments"] = found
    return g.memo["segments"]


def _same(g, a, b, n):
    """The map from indices of ops a..a+n to those of ops b..b+n if they are the same ops on the same
    shapes, reading values made at the same places; else None."""
    fmap, back, produced = {}, {}, {o: (k, i) for k, op in enumerate(g.ops) for i, o in enumerate(op.outputs) if o}

    def role(v, start):
        val = g.values[v]
        k, i = produced.get(v, (None, None))
        return (val.kind, val.shape, k - start if k is not None and k >= start else None, i)

    for x, y in zip(g.ops[a:a + n], g.ops[b:b + n]):
        if x.kind != y.kind or repr(fx.node.map_arg(x.node.args, lambda _: 0)) != repr(fx.node.map_arg(y.node.args, lambda _: 0)):
            return None
        for u, w in zip(x.inputs + x.outputs, y.inputs + y.outputs):
            if (u is None) != (w is None) or u and (role(u, a) != role(w, b) or g.values[u].dims is None):
                return None
            for f, h in zip((f for d in g.values[u].dims for f in d) if u else (), (f for d in g.values[w].dims for f in d) if w else ()):
                if fmap.setdefault(f, h) != h or back.setdefault(h, f) != f:
                    return None
    return fmap


def _rename(state, fmap):
    def p(q):
        return q._replace(index=fmap.get(q.index, q.index))
    return tuple(e and (p(e[0]), frozenset(Read(p(r.placement), p(r.grad), r.saved) for r in e[1])) for e in state)


def best(g, t, constraint, first):
    """The cheapest plan with input 0 placed `first`: (units, kept, choices), or None if none. Segment
    by segment, each solved from each placement of its first value once, for all its copies."""
    states = {((first, frozenset()),) * (g.inputs[0] in g.live[0]): (0, 0, 0, None)}
    for a, b, (a0, fmap) in segments(g):
        following, back = {}, {h: f for f, h in fmap.items()}
        for state, (units, kept, partials, path) in states.items():
            key = ("segment", t, constraint, a0, _rename(state, back))
            if key not in g.memo:
                g.memo[key] = search(g, t, constraint, first, a0, a0 + b - a, {key[-1]: (0, 0, 0, None)})
            for after, (u, m, pa, sub) in g.memo[key].items():
                after, score = _rename(after, fmap), (units + u, kept + m, partials + pa)
                if after not in following or score < following[after][:3]:
                    following[after] = (*score, (Segment(sub, fmap), path))
        states = following
    finals = []
    for state, (units, kept, partials, path) in states.items():
        units += sum(m.units for v, (p, reads) in zip(g.live[-1], state)
                     for m in moves_of(g, v, p, finish(g, first, v, p, reads), t))
        finals.append((units, kept, partials, path))
    if not finals:
        return None
    units, kept, _, path = min(finals, key=lambda f: f[:3])
    found = []
    while path:
        (sub, fmap), path = path
        while sub:
            choice, sub = sub
            found.append(choice._replace(index=fmap.get(choice.index, choice.index)))
    return units, kept, found[::-1]


def account(g, t, constraint, first, chosen):
    """The Plan of one choice per op (input 0 placed `first`), or None if it breaks the constraint:
    its moves in graph order, and per rank the parameter bytes and the activation bytes kept for
    backward, each storage once."""
    live, moved, kept, placements, reads_of = {g.inputs[0]: (first, frozenset())}, [], {}, {g.inputs[0]: first}, {}
    for k, (op, choice) in enumerate(zip(g.ops, chosen)):
        if choice not in choices(g, k, t, live):
            return None
        s = step(g, t, constraint, k, choice, tuple(live.get(v) for v in op.inputs))
        if s is None:
            return None
        live.update(zip(op.inputs, s.entries))
        for v, p, reads in s.done + tuple((v, *e) for v, e in zip(op.inputs, s.entries) if e):
            placements.setdefault(v, p)
        for v, p, reads in s.done:
            moved += moves_of(g, v, p, reads, t)
            reads_of[v] = reads
        live.update((o, (p, frozenset())) for o, p in zip(op.outputs, s.outputs) if o)
        placements.update((o, p) for o, p in zip(op.outputs, s.outputs) if o)
        kept.update(s.kept)
    for v in g.live[-1]:
        p, reads = live[v]
        reads_of[v] = finish(g, first, v, p, reads)
        moved += moves_of(g, v, p, reads_of[v], t)
    params = sum(math.prod(v.shape) * g.element_size // (t if placements.get(v.name, R).kind == "S" else 1)
                 for v in g.values.values() if v.kind == "parameter")
    return Plan(t, constraint, g, first, dict(zip((op.name for op in g.ops), chosen)), placements, reads_of, moved,
                sum(m.units for m in moved) * (t - 1) // t, sum(kept.values()), params)


def discover(module, example_inputs, t, dims=None, constraint="weights"):
    """The plan that sends the fewest bytes per rank (ring algorithm, forward and backward) under the
    constraint (CONSTRAINTS); ties go to fewer activation bytes kept. module is unsharded and may
    live on the meta device, as may example_inputs: nothing is computed. dims names each input's
    dimensions, e.g. ("T B C",); a 3-D input defaults to "B T C". Bytes are at the inputs' element
    size; the module is priced as one of a stack of identical blocks (its output returns to its
    input's placement); the conversions from and to full tensors that shard() makes are not priced."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint={constraint!r} is not one of {tuple(CONSTRAINTS)}")
    if not isinstance(t, int) or isinstance(t, bool) or t < 2:
        raise ValueError(f"t={t!r} must be an int >= 2: the number of ranks to shard over")
    g = Graph(module, example_inputs, dims)
    sizes = sorted({n for n in g.idx.size.values() if n > 1})
    if not any(n % t == 0 for n in sizes):
        raise ValueError(f"t={t} divides no dimension of {g.module}'s tensors (their sizes: {sizes})")
    first = R
    if constraint == "activations":  # input 0 split along its sequence, as the paper's SP splits it
        seq = [f for f in g.sequence if g.idx.size[f] % t == 0]
        if not seq:
            raise ValueError(f"constraint='activations' splits input 0 along its sequence dimension T: "
                             + (f"its size {g.shapes_in[0][g.names[0].index('T')]} is not divisible by t={t}"
                                if g.sequence else "name it T in dims"))
        first = S(seq[0])
    gc.disable()  # the search makes many small tuples, none of them cyclic: the collector would only slow it
    try:
        found = best(g, t, constraint, first)
    finally:
        gc.enable()
    if found is None:
        stuck = [f"{v.target} {v.shape}" for v in g.values.values() if v.kind == "parameter" and len(v.shape) >= 2
                 and not any(n % t == 0 for n in v.shape)]
        raise ValueError(f"no plan for {g.module} meets constraint={constraint!r} at t={t}"
                         + (f": {stuck[0]} has no dimension t divides" if stuck else ""))
    return account(g, t, constraint, first, found[2])


# ----------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class Plan:
    """How each weight and activation is placed on t ranks, and the moves between them."""
    t: int
    constraint: str
    graph: Graph
    first: Placement        # input 0's placement (and the output's, in a stack of blocks)
    choices: dict           # op -> Choice
    placements: dict        # value -> Placement
    reads: dict             # value -> its Reads
    moves: list             # [Moved], in graph order
    bytes_sent: int         # per rank, forward and backward, ring algorithm
    activation_bytes: int   # kept for backward by one rank, each storage once
    param_bytes: int        # held by one rank

    @property
    def collectives(self):
        """[(phase, name, bytes of the whole tensor)], forward and backward, in graph order."""
        return [(phase, c, m.nbytes) for m in self.moves for phase, ops in (("forward", m.forward),
                                                                            ("backward", m.backward)) for c in ops]

    @property
    def weights(self):
        """{parameter name: its Placement}."""
        return {v.target: self.placements.get(v.name, R) for v in self.graph.values.values() if v.kind == "parameter"}

    def describe(self, v):
        """A placement in words: "column-parallel, dim 0 split: [32] x 128" (the bracket is split)."""
        val, p = self.graph.values[v], self.placements.get(v, R)
        if p.kind != "S":
            return {"R": "replicated", "P": "partial sums"}[p.kind]
        d = next(k for k, dim in enumerate(val.dims) if p.index in dim)
        sizes = " x ".join(f"[{self.graph.idx.size[f]}]" if f == p.index else str(self.graph.idx.size[f])
                           for f in val.dims[d])
        reader = next((op for op in self.graph.ops if v in op.inputs), None)
        role = "" if reader is None or reader.kind not in RULE_OF or val.kind != "parameter" or \
            reader.kind not in ("linear", "mm", "addmm", "matmul", "bmm", "einsum") else \
            "row-parallel, " if p.index in reader.law.summed else "column-parallel, "
        return f"{role}dim {d} split: {sizes}"

    def __str__(self):
        g, mib = self.graph, lambda b: f"{b / 2**20:,.2f} MiB"
        lines = [f"{g.module} at t={self.t}, constraint={self.constraint!r}: {self.bytes_sent:,} bytes sent per rank, "
                 f"forward + backward (ring); per rank {mib(self.param_bytes)} of parameters, "
                 f"{mib(self.activation_bytes)} of activations kept",
                 f"  input 0 {g.values[g.inputs[0]].shape}: {self.describe(g.inputs[0])}"
                 + ("; the output returns to it" if g.aligned else "")]
        lines += [f"  {v.target!r:40s} {str(v.shape):18s} {self.describe(v.name)}"
                  for v in g.values.values() if v.kind == "parameter"]
        producer = {o: op for op in g.ops for o in op.outputs if o}
        for m in self.moves:
            if m.forward or m.backward:
                v = g.values[m.value]
                at = producer[m.value].where if m.value in producer else v.target
                lines.append(f"  {m.move.name:8s} {v.target or m.value:14s} {str(v.shape):18s} forward "
                             f"{' + '.join(m.forward) or '-':16s} backward {' + '.join(m.backward) or '-':28s} "
                             f"{m.nbytes:>14,} B  {at}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 6. run: the traced graph on this rank's shards


class Moving(torch.autograd.Function):
    """A move nanosp has no operator for, along dim 0: forward and backward each one of "slice"
    (this rank's rows), "gather" (all-gather), "sum" (all-reduce), "pad" (this rank's rows of a
    zero tensor), "mask" (rank 0 keeps it, the others zeros) or "-". counted=False: by
    torch.distributed itself, not nanosp's helpers (shard's conversions from and to full tensors)."""

    @staticmethod
    def forward(ctx, x, forward, backward, group, counted):
        ctx.how = backward, group, counted
        return _moving(x, forward, group, counted)

    @staticmethod
    def backward(ctx, grad):
        return _moving(grad, *ctx.how), None, None, None, None


def _moving(x, what, group, counted):
    t, rank = nanosp.group_size(group), nanosp.group_rank(group)
    if what == "slice":
        return x.chunk(t)[rank].contiguous()
    if what == "pad":
        return torch.cat([torch.zeros_like(x)] * rank + [x] + [torch.zeros_like(x)] * (t - 1 - rank))
    if what == "mask":
        return x.clone() if rank == 0 else torch.zeros_like(x)
    if what == "gather" and counted:
        return nanosp.all_gather_sequence(x, group)
    if what == "gather":
        out = x.new_empty((x.shape[0] * t, *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out
    if what == "sum" and counted:
        return nanosp.all_reduce(x.clone(), group)
    if what == "sum":
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x
    return x.view_as(x)


def along(x, dims, index, fn, size):
    """fn applied along factor `index` of x (dims its factors, size their sizes), which it moves to
    dim 0 and back: a split, gather or scatter of a factor anywhere, even inside a merged dim."""
    d = next(k for k, dim in enumerate(dims) if index in dim)
    sizes = [size[f] for f in dims[d]]
    j = dims[d].index(index)
    sizes[j] = x.shape[d] // (math.prod(sizes) // sizes[j])  # this rank's part, or the whole
    y = fn(x.reshape(*x.shape[:d], *sizes, *x.shape[d + 1:]).movedim(d + j, 0)).movedim(0, d + j)
    return y.reshape(*y.shape[:d], math.prod(y.shape[d:d + len(sizes)]), *y.shape[d + len(sizes):]).contiguous()


def apply_move(x, move, dims, size, group):
    """One move on this rank: nanosp's f, f̄, g, ḡ where they apply; the other moves by Moving."""
    fn = {"f": lambda y: nanosp.f(y, group), "f̄": lambda y: nanosp.f_bar(y, group),
          "g": lambda y: nanosp.g(y, group), "ḡ": lambda y: nanosp.g_bar(y, group)}.get(move.name)
    how = {"gather": ("gather", "slice"), "split": ("slice", "gather"), "slice": ("slice", "pad"),
           "pad": ("pad", "slice"), "partial": ("mask", "-"), "mask": ("-", "mask")}.get(move.name)
    if move.name == "regather":  # the gathered tensor itself; _regathering keeps its shard for backward
        return x
    if fn is None:
        fn = lambda y: Moving.apply(y, *how, group, True)  # noqa: E731
    return along(x, dims, move.index, fn, size) if move.index else fn(x)


class Sharded(torch.nn.Module):
    """A module run as a plan says on this rank of `group`: its parameters sliced, the traced graph
    interpreted op by op on the local shards, the plan's moves in between. Call it with the full
    inputs (the same on every rank); it returns the full outputs."""

    def __init__(self, module, plan, group):
        super().__init__()
        g, t = plan.graph, nanosp.group_size(group)
        if t != plan.t:
            raise ValueError(f"the group has {t} ranks; the plan was discovered for t={plan.t}")
        self.plan, self.group, self.rank = plan, group, nanosp.group_rank(group)
        full = dict(module.named_parameters()) | dict(module.named_buffers())
        want = {v.target: v for v in g.values.values() if v.kind == "parameter"}
        for name, v in want.items():
            if name not in full or tuple(full[name].shape) != v.shape or full[name].is_meta:
                what = "missing" if name not in full else "on the meta device" if full[name].is_meta else \
                    f"of shape {tuple(full[name].shape)}"
                raise ValueError(f"{type(module).__name__} does not fit the plan: parameter {name} is {what}, "
                                 f"the plan's is {v.shape}")
        self.local = torch.nn.ParameterList()
        self.slot = {}
        for name, v in want.items():
            p = plan.placements.get(v.name, R)
            local = full[name].detach()
            if p.kind == "S":
                local = along(local, v.dims, p.index, lambda y: y.chunk(t)[self.rank], g.idx.size)
            self.slot[v.name] = len(self.local)
            self.local.append(torch.nn.Parameter(local.clone(), requires_grad=full[name].requires_grad))
        specs = {s.arg.name: s.target for s in g.ep.graph_signature.input_specs}
        self.constants = {v.name: full[specs[v.name]] if specs[v.name] in full else g.ep.constants[specs[v.name]]
                          for v in g.values.values() if v.kind == "constant" and v.name in specs}
        self.recipes = {v: recipe(plan.placements[v], reads, via(g, v, t)) for v, reads in plan.reads.items()}

    def forward(self, *inputs):
        g, plan, group, t = self.plan.graph, self.plan, self.group, self.plan.t
        if [tuple(x.shape) for x in inputs] != g.shapes_in:
            raise ValueError(f"inputs of shapes {[tuple(x.shape) for x in inputs]}; the plan was discovered for {g.shapes_in}")
        device = inputs[0].device
        env = {v: self.local[i] for v, i in self.slot.items()} | {k: c.to(device) for k, c in self.constants.items()}
        for v, x in zip(g.inputs, inputs):  # from the full inputs to this rank's: not priced
            env[v] = self._convert(x, v, plan.placements.get(v, R), "slice", "gather")
        moved, holders = {}, {}
        for entry in g.program:
            if entry[0] == "constant":  # made whole on every rank
                node, outs = entry[1], entry[2]
                result = node.target(*_local_args(node.args, env, device), **_local_args(node.kwargs, env, device))
                env.update((o, r) for o, r in zip(outs, result if len(outs) > 1 else [result]) if o)
                continue
            op = g.ops[entry[1]]
            choice, local, regather = plan.choices[op.name], {}, []
            for x in dict.fromkeys(_tensors((op.node.args, op.node.kwargs))):
                rd = read_of(g, op, choice, x.name, plan.constraint)
                local[x.name], chain = self._read(x.name, rd, env, moved)
                if chain and chain[-1].name == "regather":  # keep the shard the gather started from
                    j = max(i for i, m in enumerate(chain) if m.name in ("g", "gather"))
                    if (x.name, chain) not in holders:
                        shard = moved[x.name, chain[:j]] if j else env[x.name]
                        holders[x.name, chain] = Regathered(shard, chain[j:-1], g.values[x.name].dims, g.idx.size, group)
                    regather.append((local[x.name], holders[x.name, chain]))
            target, args = _local_shapes(op, list(_local_args(op.node.args, local, device)),
                                         [plan.placements.get(o) for o in op.outputs], g, t)
            with _regathering(regather) if regather else contextlib.nullcontext():
                result = target(*args, **_local_args(op.node.kwargs, local, device))
            if op.kind == "mean" and choice.index in op.law.summed:
                result = result / t  # each rank's mean is over its 1/t of the elements: a partial sum of the mean
            env.update((o, r) for o, r in zip(op.outputs, result if len(op.outputs) > 1 else [result]) if o)
        outputs = []
        for v in g.outputs:  # to the next block's placement (priced), then to the full outputs (not)
            if v is None or g.values[v].kind == "constant":
                outputs.append(env.get(v))
                continue
            back = plan.first if g.aligned and v == g.outputs[0] else plan.placements[v]
            y, _ = self._read(v, Read(back, grad_placement(back)), env, moved)
            outputs.append(Moving.apply(y, "sum", "-", group, False) if back == P else
                           self._convert(y, v, back, "gather", "slice"))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _read(self, v, rd, env, moved):
        """Value v as read `rd`: the plan's chain of moves, each shared prefix made once."""
        g, val = self.plan.graph, self.plan.graph.values[v]
        if val.kind == "constant":  # whole on every rank: sliced, or rank 0's as a partial sum, for free
            how = {"S": "slice", "P": "partial"}.get(rd.placement.kind)
            return (env[v] if how is None else apply_move(env[v], Move(how, rd.placement.index), val.dims,
                                                          g.idx.size, self.group)), ()
        chain = self.recipes[v][rd]
        for n in range(1, len(chain) + 1):
            if (v, chain[:n]) not in moved:
                before = moved[v, chain[:n - 1]] if n > 1 else env[v]
                moved[v, chain[:n]] = apply_move(before, chain[n - 1], val.dims, g.idx.size, self.group)
        return (moved[v, chain] if chain else env[v]), chain

    def _convert(self, x, v, p, forward, backward):
        """A full tensor to this rank's split of it, or back: by torch.distributed, not priced."""
        if p.kind != "S":
            return x
        g = self.plan.graph
        return along(x, g.values[v].dims, p.index, lambda y: Moving.apply(y, forward, backward, self.group, False),
                     g.idx.size)

    def full_grads(self):
        """Collective: {the module's parameter name: its unsharded gradient (None if it has none)}, on every rank."""
        g, out = self.plan.graph, {}
        for v, i in self.slot.items():
            grad, p, val = self.local[i].grad, self.plan.placements.get(v, R), g.values[v]
            if grad is not None and p.kind == "S":
                grad = along(grad, val.dims, p.index, lambda y: _moving(y, "gather", self.group, False), g.idx.size)
            out[val.target] = None if grad is None else grad.clone()
        return out


def _local_args(args, env, device):
    if isinstance(args, (list, tuple)):
        return type(args)(_local_args(a, env, device) for a in args)
    if isinstance(args, dict):
        return {k: device if k == "device" else _local_args(a, env, device) for k, a in args.items()}
    return env[args.name] if isinstance(args, fx.Node) else args


def _local_shapes(op, args, placements, g, t):
    """The op and its arguments with shapes made this rank's: a view's, an expand's, a split's."""
    def local(v, p):
        return [math.prod(g.idx.size[f] // (t if p and p.kind == "S" and f == p.index else 1) for f in d)
                for d in g.values[v].dims]
    o = next(o for o in op.outputs if o)
    if op.kind in ("view", "reshape", "_unsafe_view", "expand"):
        args[1] = local(o, placements[0])
    elif op.kind in ("squeeze", "unflatten"):  # a split dim may be of size 1 on a rank: as a reshape
        return torch.ops.aten.reshape.default, [args[0], local(o, placements[0])]
    elif op.kind in ("split", "split_with_sizes"):
        k = named_args(op.node)["dim"] % len(g.values[o].shape)
        sizes = [local(v, p)[k] if v else None for v, p in zip(op.outputs, placements)]
        args[1] = sizes if op.kind == "split_with_sizes" else next(s for s in sizes if s)
    return op.node.target, args


class Regathered:
    """The shard of a gathered tensor that ops keep for backward instead of the tensor: gathered
    again when backward first needs it, once however many ops keep it (nanosp's
    LinearWithSequenceGather does the same for one linear)."""

    def __init__(self, shard, chain, dims, size, group):
        self.shard, self.chain, self.dims, self.size, self.group, self.whole = shard.detach(), chain, dims, size, group, None

    def get(self):
        if self.whole is None:
            with torch.no_grad():
                self.whole = self.shard
                for m in self.chain:
                    self.whole = apply_move(self.whole, m, self.dims, self.size, self.group)
        return self.whole


def _regathering(kept):
    """Within an op: a saved tensor that views a gathered one [(tensor, Regathered)] is kept as the
    shard, and rebuilt in backward by its strides from the tensor gathered again."""
    holders = {x.untyped_storage().data_ptr(): holder for x, holder in kept}

    def pack(x):
        holder = holders.get(x.untyped_storage().data_ptr())
        return x if holder is None else (holder, x.shape, x.stride(), x.storage_offset())

    def unpack(packed):
        return packed if torch.is_tensor(packed) else packed[0].get().as_strided(*packed[1:])

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def shard(module, plan, group):
    """module run as `plan` on this rank of `group` (size plan.t): a Sharded module."""
    return Sharded(module, plan, group)


# ----------------------------------------------------------------------------------------------
# python autoshard.py: nanosp's Block, rediscovered


def table(headers, rows):
    print("| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def fake_group(t):
    """A process group of size t on the "fake" backend: exact shapes and bytes, no other processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=64)
    return dist.new_group(list(range(t)))


def nanosp_messages(cfg, seq, batch, t, sequence_parallel):
    """nanosp's communication ledger for one hand-sharded Block: sorted (phase, op, message bytes)."""
    from ledgers import measure_communication

    cfg = dataclasses.replace(cfg, sequence_parallel=sequence_parallel)
    log = measure_communication(cfg, fake_group(t), batch, seq, torch.bfloat16, device="meta")
    return sorted((phase, op, nbytes) for phase, _, op, nbytes in log)


def bucketed(plan):
    """plan.collectives as nanosp sends them: the replicated parameters' gradient all-reduces in one
    flat buffer (nanosp's replicated_through_f), sorted."""
    on_params = [m for m in plan.moves if plan.graph.values[m.value].kind == "parameter" and m.backward]
    rest = [c for m in plan.moves if m not in on_params for c in Plan.collectives.fget(dataclasses.replace(plan, moves=[m]))]
    return sorted(rest + [("backward", "all-reduce", sum(m.nbytes for m in on_params))] * bool(on_params))


def main():
    parser = argparse.ArgumentParser(description="Discover the plans of one nanosp Block (GPT-3 Medium's shape).")
    for name, default in [("seq", 2048), ("batch", 1), ("hidden", 1024), ("heads", 16), ("tp", 8)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    cfg = nanosp.GPTConfig(block_size=args.seq, n_layer=1, n_head=args.heads, n_embd=args.hidden)
    with torch.device("meta"):
        block = nanosp.Block(cfg, None, 0).to(torch.bfloat16)
        x = torch.empty(args.seq, args.batch, args.hidden, dtype=torch.bfloat16)
    print(f"### autoshard: one nanosp Block, s={args.seq} b={args.batch} h={args.hidden} a={args.heads} "
          f"t={args.tp}, 16-bit, traced on the meta device\n")
    print_rules()
    for constraint, title, sp in [("none", "", None), ("weights", "Megatron-LM", False), ("activations", "SP", True)]:
        start = time.perf_counter()
        try:
            plan = discover(block, (x,), args.tp, dims=("T B C",), constraint=constraint)
        except ValueError as e:
            parser.error(str(e))
        print(f"\n#### constraint={constraint!r}: {CONSTRAINTS[constraint]} (discovered in "
              f"{time.perf_counter() - start:.1f} s)\n\n```\n{plan}\n```")
        if sp is not None:
            same = nanosp_messages(cfg, args.seq, args.batch, args.tp, sp) == bucketed(plan)
            print(f"\n{title}: nanosp's communication ledger for its hand-sharded Block (sequence_parallel={sp}) "
                  f"lists the same collectives, message by message: {'equal' if same else 'DIFFERENT'}.")


if __name__ == "__main__":
    main()
