"""autoshard.py: discover how to shard a module written the ordinary way, then run it sharded.

nanosp.py places Megatron-LM's f, f̄ and sequence parallelism's g, ḡ by hand. Here any unsharded module
(nn.Linear, LayerNorm or RMSNorm, rotary embeddings, scaled_dot_product_attention or attention written out,
SwiGLU, Hugging Face blocks, nanosp's own Block) is traced, its cheapest plan searched, and the plan run on
t ranks with those same operators:

    plan = autoshard.discover(module, example_inputs, t, dims=None, constraint="weights")
    print(plan)                                    # each weight's placement, each collective's bytes
    sharded = autoshard.shard(module, plan, group)
    y = sharded(*inputs); y.sum().backward(); sharded.full_grads()

1. trace    torch.export turns the module into ATen ops; on the meta device nothing is computed
2. indices  every dimension of every tensor is a tuple of named factors, einsum-style: B T C, (heads, head dim)
3. rules    a tensor is R (replicated), S(i) (split along index i) or P (partial sums: the ranks' tensors add
            up to it); RULES says what each op cannot split, what it is linear in and what it keeps
4. price    the paper's f, f̄, g, ḡ and a few other moves between placements, priced under the ring algorithm
5. search   a dynamic programme over the ops in graph order: exact, linear, repeated blocks solved once
6. run      shard(): the traced graph interpreted on this rank's shards, the moves in the autograd graph

    python autoshard.py    # nanosp's Block: the rules, then the plans that are Megatron's and SP's
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import math
import operator
import os
import re
import time
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

import nanosp

CONSTRAINTS = {"none": "any plan, replicating everything included",
               "weights": "every weight matrix split over the t ranks, and no collective moves a weight",
               "activations": "weights split, and every floating activation a rank keeps for backward split too "
                              "(but one no dimension of which t divides: a loss)"}

# 1. trace -------------------------------------------------------------------------------------

def trace(module, inputs):
    """torch.export's training IR of module(*inputs): ATen ops, linear, layer_norm and sdpa kept whole; in-place
    ops made functional, and an op without a rule decomposed into the ops it is made of (a loss into log_softmax,
    gather and sum; F.glu, F.normalize, lerp...), if torch has a decomposition of it; the ops that only spell
    another (REWRITES) rewritten to it."""
    held = next(itertools.chain(module.parameters(), module.buffers()), None)  # inputs on the module's device:
    inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device=held.device) if torch.is_tensor(x) and held is not None
                   and x.device != held.device else x for x in inputs)  # (a trace reads only their shapes and dtypes)
    try:
        ep = torch.export.export(module, inputs, strict=False)
    except Exception as e:  # export names the Python it could not trace: its first line, as one line
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"torch.export could not trace {type(module).__name__}: {first}") from e
    names = {op_name(node) for node in ep.graph.nodes if node.op == "call_function"}
    inplace = any(n.endswith("_") and n[0] != "_" for n in names)  # x += y: made x + y by any run_decompositions
    table, done = torch.export.default_decompositions(), set()
    while True:  # (a decomposition may make ops without a rule of their own, but with a decomposition)
        _rewrite(ep)  # (before a decomposition, which would make tensor_split slices)
        unruled = {op for op in _varying_ops(ep) if op in table and rule_of(op) is None and op_name(op) not in MAKERS}
        if not unruled - done and not inplace:
            return ep
        ep = ep.run_decompositions({op: table[op] for op in unruled - done})
        done, inplace = done | unruled, False

def _rewrite(ep):
    for node in ep.graph.nodes:
        if node.op == "call_function" and op_name(node) in REWRITES:
            node.target, node.args = REWRITES[op_name(node)](*node.args, **node.kwargs)
            node.kwargs = {}
    ep.graph_module.recompile()

def _varying_ops(ep):
    """The ops that read an input or a parameter, at any remove (an op on buffers and constants alone, a causal
    mask's triu, runs whole on every rank: it needs no rule)."""
    kinds, varying = {s.arg.name: s.kind.name for s in ep.graph_signature.input_specs}, set()
    for node in ep.graph.nodes:
        if kinds.get(node.name) in ("USER_INPUT", "PARAMETER") or set(_nodes((node.args, node.kwargs))) & varying:
            varying.add(node)
    return {node.target for node in varying if node.op == "call_function"}

aten = torch.ops.aten
REWRITES = {  # an op: the op it is, and that op's arguments
    "chunk": lambda x, n, dim=0: (aten.split.Tensor, (x, -(-x.meta["val"].shape[dim] // n), dim)),  # ceil(d/n)
    "unsafe_split": lambda x, size, dim=0: (aten.split.Tensor, (x, size, dim)),
    "tensor_split": lambda x, parts, dim=0: _split_at(x, parts, dim),
    "hsplit": lambda x, parts: _split_at(x, parts, int(x.meta["val"].dim() > 1)),
    "vsplit": lambda x, parts: _split_at(x, parts, 0),
    "dsplit": lambda x, parts: _split_at(x, parts, 2),
    "type_as": lambda x, other: (aten.to.dtype, (x, other.meta["val"].dtype)),
    "view_as": lambda x, other: (aten.view.default, (x, list(other.meta["val"].shape))),
    "reshape_as": lambda x, other: (aten.reshape.default, (x, list(other.meta["val"].shape))),
    "expand_as": lambda x, other: (aten.expand.default, (x, list(other.meta["val"].shape))),
    "mT": lambda x: (aten.transpose.int, (x, -2, -1)),
    "movedim": lambda x, source, destination: (aten.permute.default, (x, _moved(x.meta["val"].dim(), source,
                                                                              destination))),
} | dict.fromkeys(["swapaxes", "swapdims"], lambda x, a, b: (aten.transpose.int, (x, a, b)))
REWRITES["unsafe_chunk"] = REWRITES["chunk"]

def _split_at(x, parts, dim):  # tensor_split and its h, v, d forms: the split into the sizes they make
    return aten.split_with_sizes.default, (x, _sections(x, parts, dim), dim)

def _sections(x, parts, dim):
    """tensor_split's sizes of x's dim: `parts` near-equal ones (the first n % parts one larger), or cut at the
    indices `parts` (negative ones from the end)."""
    n = x.meta["val"].shape[dim]
    if isinstance(parts, int):
        return [n // parts + 1] * (n % parts) + [n // parts] * (parts - n % parts)
    cuts = [0] + [min(max(c + n * (c < 0), 0), n) for c in parts] + [n]
    if cuts != sorted(cuts):
        raise ValueError(f"tensor_split at indices {list(parts)}: its parts overlap, which no split can make")
    return [b - a for a, b in zip(cuts, cuts[1:])]

def _moved(n, source, destination):  # movedim's permutation
    source, destination = ([d % n for d in ([ds] if isinstance(ds, int) else ds)] for ds in (source, destination))
    rest = iter(d for d in range(n) if d not in source)
    return [source[destination.index(k)] if k in destination else next(rest) for k in range(n)]

def source(node):
    """'file.py:12 `code`': the line of the module's source that made an op (in its innermost forward)."""
    found = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.meta.get("stack_trace") or "")
    return f"{os.path.basename(found[-1][0])}:{found[-1][1]} `{found[-1][2].strip()}`" if found else node.name

def op_name(node):  # (or of an op)
    target = getattr(node, "target", node)
    return target.name().split("::")[-1].split(".")[0] if hasattr(target, "name") else str(target)

def rule_of(target):  # (max.other's own rule, else max's)
    name = op_name(target)
    return RULE_OF.get(f"{name}.{getattr(target, '_overloadname', '')}", RULE_OF.get(name))

def named_args(node):
    """An op's arguments by the names of its ATen schema, defaults filled in."""
    schema = node.target._schema.arguments
    args = {a.name: a.default_value if a.has_default_value() else None for a in schema}
    return args | dict(zip((a.name for a in schema), node.args)) | dict(node.kwargs)

def _nodes(value):
    found = []
    fx.node.map_arg(value, found.append)
    return found

# 2. indices -----------------------------------------------------------------------------------

class Indices:
    """Index names, as einsum's letters. A dimension is a tuple of factors: (C,), or (heads, d) once a view
    spells them out. Unifying two dimensions makes them one index, cutting a factor where the other has a
    boundary: a projection's 3C features and the (3, C) of a split become one."""

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
        """Factor f becomes (f/n, f%m): its outer n and the inner rest m."""
        self.alias[f] = (self.new(f"{f}/{n}", n), self.new(f"{f}%{self.size[f] // n}", self.size[f] // n))
        return self.alias[f]

    def unify(self, a, b, where):
        def one(f, h):
            if f != h:
                old, new = sorted((f, h), key=self.born.get)
                self.alias[new] = (old,)
        return self.pairs(a, b, where, one)

    def pairs(self, a, b, where, each=lambda f, h: None):
        """The factors of dims a and b side by side, each cut where the other has a boundary: [(of a, of b)]."""
        a, b, found = list(self.expand(a)), list(self.expand(b)), []
        if math.prod(map(self.size.get, a)) != math.prod(map(self.size.get, b)):
            raise ValueError(f"{where}: dimensions {a} and {b} differ in size")
        while a and b:
            a[:1], b[:1] = self.expand(a[:1]), self.expand(b[:1])  # an earlier step may have cut them
            big, small = (b, a) if self.size[a[0]] < self.size[b[0]] else (a, b)
            if self.size[big[0]] % self.size[small[0]]:
                raise ValueError(f"{where}: dimensions of {a[0]} and {b[0]} cannot be one index")
            if self.size[big[0]] > self.size[small[0]]:
                big[:1] = self.cut(big[0], self.size[small[0]])
            found.append((a.pop(0), b.pop(0)))
            each(*found[-1])
        return found

    def regroup(self, dims, shape):
        """dims' factors in order grouped into the dimensions of `shape` (a view), cutting a factor a new boundary
        falls inside; None if the boundaries do not align (an uneven reshape)."""
        queue, out = [f for d in dims for f in self.expand(d)], []
        for n in shape:
            out.append([])
            while n > 1:
                if not queue or (n % self.size[queue[0]] and self.size[queue[0]] % n):
                    return None
                if n % self.size[queue[0]]:
                    queue[:1] = self.cut(queue[0], n)
                out[-1].append(queue.pop(0))
                n //= self.size[out[-1][-1]]
        return [tuple(d) for d in out]

# 3. rules: each op read as an einsum ----------------------------------------------------------

class Law(NamedTuple):
    """What a rule says of one op, in its indices (while tracing, its inputs are nodes)."""
    outputs: list           # the dims of each output
    whole: tuple = ()       # dims it cannot split (a norm's, a softmax's, a slice's)
    summed: tuple = ()      # dims it sums over: split along one, its output is a partial sum P
    linear: tuple = ()      # groups of inputs it is linear in together: read as P, its output is P
    affine: tuple = ()      # inputs added to a sum (a bias): read as P when the output is P
    saves: tuple = ()       # inputs it keeps for backward; "out": its output
    new: tuple = ()         # dims of tensors it makes and keeps (a norm's statistics)
    view: bool = False      # elementwise or a view: keeps its inputs' placement when it can
    twins: dict = {}        # {input: {index of the output: its twin in that input}} (Graph.join)

def _fresh(g, shape, stem):
    return [(g.idx.new(f"{stem}:{k}", n),) if n > 1 else () for k, n in enumerate(shape)]

def _align(g, node, out, xs, cut=0):
    """Fill and unify out's dims with those of tensors xs (less their last `cut`), aligned from the right as
    broadcasting aligns them; a size-1 dim joins nothing."""
    for x in xs:
        kept = len(g.shape(x)) - cut
        for k, (n, d) in enumerate(zip(g.shape(x)[:kept][::-1], g.dims(x)[:kept][::-1]), 1):
            if n > 1:
                out[-k] = out[-k] or d
                g.join(source(node), (node.name, x.name), out[-k], d)
    return out

def _pointwise(saves, linear):
    """An elementwise op. saves: "inputs", "out", "first"/"second" (a mask) or "". linear: "all" (its tensors
    together, not with a number added), "one" (any one), "first", "rest", "fill0" or ""."""
    def rule(g, node, a):
        xs = [x for v in a.values() for x in _nodes(v)]
        number = any(isinstance(v, (int, float)) and v and k in ("self", "other") for k, v in a.items())
        groups = {"all": [xs] * (not number), "one": [[x] for x in xs] * (len(set(xs)) == len(xs)),
                  "first": [xs[:1]], "rest": [xs[1:]] * (len(xs) == 3), "fill0": [xs[:1]] * (a.get("value") == 0)}
        kept = {"inputs": xs, "out": ["out"], "first": xs[:1], "second": xs[1:2]}.get(saves, [])
        return Law([_align(g, node, [()] * len(g.shape(node)), xs)], linear=tuple(map(tuple, groups.get(linear, []))),
                   saves=tuple(kept), view=True)
    return rule

def _scan(linear):  # cumsum (linear), cumprod, logcumsumexp, cummax, cummin: along dim j, j whole
    def rule(g, node, a):
        x, dx = a["self"], g.dims(a["self"])
        return Law([dx] * len(_tensors_of(node.meta["val"])), whole=(dx[a["dim"]],), linear=((x,),) * linear,
                   saves=(x, "out") * (not linear))
    return rule

def _cast(g, node, a):  # partial sums rounded to another dtype do not add up to the sum rounded
    law = _pointwise("", "all")(g, node, a)
    return law if node.meta["val"].dtype == a["self"].meta["val"].dtype else law._replace(linear=())

def _reduction(linear, saves=True):  # sum, mean (linear): split along a summed index, the output P; others whole
    def rule(g, node, a):
        x, dim, dx = a["self"], a.get("dim"), g.dims(a["self"])
        gone = range(len(dx)) if dim in (None, []) else {d % len(dx) for d in ([dim] if isinstance(dim, int) else dim)}
        out = [() if k in gone else d for k, d in enumerate(dx) if a.get("keepdim") or k not in gone]
        if linear:
            return Law([out], summed=[dx[k] for k in gone], linear=((x,),))
        return Law([out] * len(_tensors_of(node.meta["val"])), whole=[dx[k] for k in gone],  # max.dim's indices too
                   saves=(x, "out") if saves else ())
    return rule

def _contraction(g, node, a):  # x[.., m, i] times W[.., i, n] (linear's W is [n, i]), plus a bias
    name = op_name(node)
    x, w, bias = (a.get(arg) for arg in {"linear": ("input", "weight", "bias"), "addmm": ("mat1", "mat2", "self"),
                                         "baddbmm": ("batch1", "batch2", "self"),
                                         "matmul": ("self", "other", None)}.get(name, ("self", "mat2", None)))
    dx, dw = g.dims(x), g.dims(w)[::-1] if name == "linear" else g.dims(w)
    if len(dx) < 2:
        raise ValueError(f"no sharding rule for {name} of a 1-D input ({source(node)})")
    matrix = len(dw) > 1  # else W is a vector, and y[.., m]
    g.idx.unify(dx[-1], dw[-2] if matrix else dw[0], source(node))
    out = _align(g, node, [()] * (len(g.shape(node)) - 1 - matrix), [x, w], cut=2) + [dx[-2]] + dw[-1:] * matrix
    _align(g, node, out, [bias] if bias is not None else [])
    return Law([out], summed=(dx[-1],), linear=((x, bias), (w, bias)), affine=(bias,), saves=(x, w))

def _conv(g, node, a):
    """conv1d/2d/3d: x[b, (g i), *space] W[(g o), i, *kernel] -> y[b, (g o), *space'], a contraction over i (as
    linear's, the bias added along o) in each of g groups (groups=1: g is no index); space and kernel whole."""
    x, w, bias, groups = a["input"], a["weight"], a.get("bias"), a["groups"]
    dx, dw = g.dims(x), g.dims(w)
    batched = int(len(dx) == len(dw))  # (an unbatched input has no b)
    grouped = _fresh(g, [groups], f"{node.name}:groups")[0]
    inner = _fresh(g, [g.shape(w)[1], g.shape(w)[0] // groups], node.name)
    g.idx.unify(dx[batched], grouped + inner[0], source(node))
    g.idx.unify(dw[0], grouped + inner[1], source(node))
    g.idx.unify(dw[1], inner[0], source(node))
    out = dx[:batched] + [dw[0]] + _fresh(g, g.shape(node)[batched + 1:], node.name)
    _align(g, node, [dw[0]], [bias] if bias is not None else [])
    return Law([out], whole=tuple(dx[batched + 1:] + dw[2:] + out[batched + 1:]), summed=(inner[0],),
               linear=((x, bias), (w, bias)), affine=(bias,), saves=(x, w))

def _norm(g, node, a):
    x, k, dx = a["input"], len(a["normalized_shape"]), g.dims(a["input"])
    _align(g, node, dx[-k:], [p for p in (a.get("weight"), a.get("bias")) if p is not None])
    return Law([dx], whole=tuple(dx[-k:]), saves=(x,), new=(dx[:-k],) * (2 if op_name(node) == "layer_norm" else 1))

def _group_norm(g, node, a):  # x[n, (groups c), ...] normalized over c and the rest, each group apart
    x, dx, groups = a["input"], g.dims(a["input"]), a["group"]
    _align(g, node, [dx[1]], [p for p in (a["weight"], a["bias"]) if p is not None])
    parts = _parts(g, node, dx[1], groups, g.shape(x)[1] // groups) if groups > 1 else ((), *dx[1])
    stats = [dx[0], parts[:1] if groups > 1 else ()]
    return Law([dx, stats, stats], whole=(parts[1:],) + tuple(dx[2:]), saves=(x,), new=(stats, stats))

def _batch_norm(g, node, a):  # x[n, c, ...] per channel c; in training, its statistics over n and the rest
    x, dx, outputs = a["input"], g.dims(a["input"]), len(_tensors_of(node.meta["val"]))  # (y, or y, mean, 1/std)
    _align(g, node, [dx[1]], [a[p] for p in ("weight", "bias", "running_mean", "running_var") if a.get(p) is not None])
    return Law([dx] + [[dx[1]]] * (outputs - 1), whole=tuple(dx[:1] + dx[2:]) * a.get("training", False),
               saves=(x,), new=([dx[1]], [dx[1]]))

def _pool(g, node, a):  # x[.., *space] -> y[.., *space']: the last k dims (k = len(kernel_size)) whole
    x, dx, k, made = a["self"], g.dims(a["self"]), len(a.get("kernel_size", a.get("output_size"))), _tensors_of(
        node.meta["val"])  # (y, or y and its indices)
    out, avg = dx[:-k] + _fresh(g, made[0].shape[-k:], node.name), "avg" in op_name(node)
    return Law([out] * len(made), whole=tuple(dx[-k:] + out[-k:]),
               linear=((x,),) * avg, saves=(x,) * (not avg))

def _attention(g, node, a):
    """scaled_dot_product_attention: q[.., h, s, d] k[.., h', s', d] v[.., h', s', e]; with fewer k, v heads
    (enable_gqa) q's heads are (h', group). Heads and batch split; s, s', d, e whole."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a["dropout_p"]:
        raise ValueError(f"scaled_dot_product_attention with dropout_p={a['dropout_p']} ({source(node)}): a sharded "
                         f"run would draw other masks; trace the module in eval() or with dropout 0")
    dq, dk, dv, group = g.dims(q), g.dims(k), g.dims(v), g.shape(q)[-3] // g.shape(k)[-3]
    for x, y in ((dq[-3], dk[-3] + ((g.idx.new("group", group),) if group > 1 else ())), (dk[-3], dv[-3]),
                 (dq[-1], dk[-1]), (dk[-2], dv[-2])):
        g.idx.unify(x, y, source(node))
    batch = _align(g, node, [()] * (len(dq) - 3), [q, k, v], cut=3)
    _align(g, node, batch + [dq[-3], dq[-2], dk[-2]], [mask] if mask is not None else [])
    return Law([batch + [dq[-3], dq[-2], dv[-1]]], whole=(dq[-2], dk[-2], dq[-1], dv[-1]), saves=(q, k, v, "out"),
               new=(batch + [dq[-3], dq[-2]],))

def _shape_op(g, node, a):
    """view, reshape, flatten, squeeze, unsqueeze: factors regrouped (an uneven regrouping cannot split what it
    touches); permute, transpose, expand: dims moved or added; slice, select: part of a dim taken, whole."""
    name, x = op_name(node), a["self"]
    dx, sx, shape, whole = list(g.dims(x)), g.shape(x), g.shape(node), ()
    if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze"):
        out = g.idx.regroup(dx, shape)
        if out is None:
            out = _fresh(g, shape, node.name)
            return Law([out], whole=tuple(dx + out), view=True)
        dx = out
    elif name in ("permute", "numpy_T", "t"):  # t, numpy_T: the dims reversed
        dx = [dx[d] for d in a.get("dims", range(len(dx))[::-1])]
    elif name == "transpose":
        dx[a["dim0"]], dx[a["dim1"]] = dx[a["dim1"]], dx[a["dim0"]]
    elif name == "expand":  # a size-1 dim grown to n is a new index
        sx, dx = (1,) * (len(shape) - len(sx)) + sx, [()] * (len(shape) - len(dx)) + dx
        dx = [d if m == n else _fresh(g, [n], f"{node.name}.{k}")[0] for k, (d, m, n) in enumerate(zip(dx, sx, shape))]
    elif name == "select":
        k = a["dim"] % len(dx)
        whole, dx = (dx[k],), dx[:k] + dx[k + 1:]
    elif shape[k := a["dim"] % len(dx)] != sx[k]:  # slice, narrow
        new = _fresh(g, [shape[k]], f"{node.name}.{k}")[0]
        whole, dx[k] = (dx[k], new), new
    return Law([dx], whole=whole, linear=((x,),), view=name != "expand")  # expand grows it: moves cost more after

def _parts(g, node, d, n, size):  # dim d as (n parts, each of size): unified, its factors
    parts = (g.idx.new(f"{node.name}:parts", n),) + tuple(_fresh(g, [size], node.name)[0])
    g.idx.unify(d, parts, source(node))
    return parts

def _glu(g, node, a):  # F.glu: dim k as its two halves (2, rest), a * sigmoid(b) of size rest; the 2 whole
    x, dx, k = a["self"], g.dims(a["self"]), a["dim"] % len(g.shape(a["self"]))
    halves = _parts(g, node, dx[k], 2, g.shape(node)[k])
    return Law([dx[:k] + [halves[1:]] + dx[k + 1:]], whole=(halves[:1],), saves=(x,))

def _split(g, node, a):  # equal parts: the dim becomes (parts, rest), the parts whole; unequal parts: whole
    x, shapes, name = a["self"], [tuple(o.shape) for o in node.meta["val"]], op_name(node)
    dx, k = g.dims(x), a.get("dim", 0) % len(g.shape(x))
    if name == "unbind":
        return Law([dx[:k] + dx[k + 1:]] * len(shapes), whole=(dx[k],), linear=((x,),), view=True)
    if len(shapes) > 1 and len({s[k] for s in shapes}) == 1:
        parts = _parts(g, node, dx[k], len(shapes), shapes[0][k])
        return Law([dx[:k] + [parts[1:]] + dx[k + 1:]] * len(shapes), whole=(parts[:1],), linear=((x,),), view=True)
    outs = [dx[:k] + _fresh(g, [s[k]], f"{node.name}.{i}") + dx[k + 1:] for i, s in enumerate(shapes)]
    return Law(outs, whole=(dx[k],) + tuple(o[k] for o in outs), linear=((x,),), view=True)

def _repeat(g, node, a):
    """repeat_interleave: dim k's factors (a) become (a, r), each element r times; repeat: (r, a), the dim r times
    over (and new dims in front). r is a new index: split, each rank makes its r/t of the copies."""
    x, r, dx = a["self"], a["repeats"], g.dims(a["self"])
    if op_name(node) == "repeat":
        dx = [()] * (len(r) - len(dx)) + dx
        return Law([[_fresh(g, [n], f"{node.name}.{k}")[0] + d for k, (n, d) in enumerate(zip(r, dx))]],
                   linear=((x,),))
    if not isinstance(r, int) or a["dim"] is None:
        raise ValueError(f"no sharding rule for repeat_interleave by a tensor of counts or over a flattened tensor "
                         f"({source(node)}): give it an int and a dim")
    k = a["dim"] % len(dx)
    return Law([dx[:k] + [dx[k] + _fresh(g, [r], f"{node.name}.{k}")[0]] + dx[k + 1:]], linear=((x,),))

def _einsum(g, node, a):
    """Its own equation: a letter is an index, unified across operands; one missing from the output is summed.
    An ellipsis stands for the dims left over, aligned from the right."""
    xs, (terms, out) = a["tensors"], (a["equation"].replace(" ", "").split("->") + [None])[:2]
    terms, letters = terms.split(","), {}
    if out is None:  # implicit output: the letters used once, in alphabetical order
        used = "".join(terms)
        out = "..." * ("..." in used) + "".join(sorted(c for c in set(used) if used.count(c) == 1 and c.isalpha()))
    ellipsis = max(len(g.shape(x)) - len(term.replace("...", "")) for x, term in zip(xs, terms))

    def spelled(term, n):  # the ellipsis's dims as letters of their own, numbered from the right
        return term.replace("...", "".join(chr(0x2460 + j) for j in reversed(range(n - len(term) + 3))))
    for x, term in zip(xs, terms):
        for c, d, n in zip(spelled(term, len(g.shape(x))), g.dims(x), g.shape(x)):
            if n > 1:
                g.idx.unify(letters.setdefault(c, d), d, source(node))
    out = spelled(out, ellipsis + len(out) - 3 * ("..." in out))
    return Law([[letters.get(c, ()) for c in out]], summed=tuple(d for c, d in letters.items() if c not in out),
               linear=tuple((x,) for x in xs) * (len(set(xs)) == len(xs)), saves=tuple(xs))

def _gather(g, node, a):
    """y[.., j, ..] = x[.., index[.., j, ..], ..] along dim k: x's k whole; the other dims x's where their sizes
    match, whole where index is smaller."""
    x, ix, k = a["self"], a["index"], a["dim"] % len(g.shape(a["self"]))
    whole = [g.dims(x)[k]]
    for d, (m, n) in enumerate(zip(g.shape(x), g.shape(ix))):
        if d != k and m == n > 1:
            g.idx.unify(g.dims(x)[d], g.dims(ix)[d], source(node))
        elif d != k:
            whole += [g.dims(x)[d], g.dims(ix)[d]]
    return Law([g.dims(ix)], whole=tuple(whole), linear=((x,),), saves=(ix,))

def _index(g, node, a):
    """x[.., i, j, ..] (aten.index): the index tensors broadcast together replace the dims they index (moved to
    the front if those are not adjacent, as torch moves them); the indexed dims whole. index_select: one, at dim."""
    if op_name(node) == "index_select":
        a = a | {"indices": [None] * (a["dim"] % len(g.shape(a["self"]))) + [a["index"]]}
    x, dx = a["self"], g.dims(a["self"])
    ks, _, out = _indexed(g, node, dx, a["indices"])
    return Law([out], whole=tuple(dx[k] for k in ks), linear=((x,),), saves=tuple(a["indices"][k] for k in ks))

def _indexed(g, node, dx, indices):
    """x[indices] (x's dims dx): the indexed dims, the index tensors' dims broadcast together, and the dims of
    x[indices], where those replace the indexed dims (moved to the front if not adjacent, as torch moves them)."""
    ks = [k for k, i in enumerate(indices) if i is not None]
    picked = _align(g, node, [()] * max(len(g.shape(indices[k])) for k in ks), [indices[k] for k in ks])
    rest = [d for k, d in enumerate(dx) if k not in ks]
    return ks, picked, dx[:ks[0]] + picked + dx[ks[-1] + 1:] if ks == list(range(ks[0], ks[-1] + 1)) else picked + rest

def _sort(g, node, a):  # topk, sort: the values along dim k and their indices; k whole, the indices kept
    x, dx = a["self"], list(g.dims(a["self"]))
    k = a["dim"] % len(dx)
    out = dx[:k] + _fresh(g, [node.meta["val"][0].shape[k]], f"{node.name}.{k}") + dx[k + 1:]
    return Law([out, out], whole=(dx[k], out[k]), saves=tuple(u.name for u in node.users if u.args[1] == 1))

def _pad(g, node, a):  # constant_pad_nd: its pad's pairs from the last dim back; a padded dim a new index
    x, dx, pad = a["self"], list(g.dims(a["self"])), a["pad"]
    padded = [len(dx) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]]
    out = [_fresh(g, [g.shape(node)[k]], f"{node.name}.{k}")[0] if k in padded else d for k, d in enumerate(dx)]
    return Law([out], whole=tuple(dx[k] for k in padded) + tuple(out[k] for k in padded),
               linear=((x,),) * (a["value"] == 0))

def _broadcast(g, node, a):  # broadcast_tensors: each input to their one shape
    xs, shape = a["tensors"], node.meta["val"][0].shape
    return Law([_align(g, node, [()] * len(shape), xs)] * len(xs), view=True)

def _cat(g, node, a):  # (a 1-D empty tensor, as a cache starts, is left out, as torch.cat leaves it)
    xs, shape, stack = [x for x in a["tensors"] if g.shape(x) != (0,)], g.shape(node), op_name(node) == "stack"
    k, out = a["dim"] % len(shape), [()] * len(shape)
    for x in xs:
        for i, d in enumerate(g.dims(x)[:k] + [()] + g.dims(x)[k:] if stack else g.dims(x)):
            if i != k and shape[i] > 1:
                out[i] = out[i] or d
                g.idx.unify(out[i], d, source(node))
    out[k] = _fresh(g, [shape[k]], f"{node.name}.{k}")[0]
    return Law([out], whole=tuple(g.dims(x)[k] for x in xs if not stack) + (out[k],), linear=(tuple(xs),), view=True)

def _copy(g, node, a):  # copy(x, src), as x[...] = src or x.copy_(src) write it: src broadcast to x's shape, cast
    cast = a["src"].meta["val"].dtype != node.meta["val"].dtype  # (to x's dtype: then not linear, as _cast)
    return _pointwise("", "")(g, node, a)._replace(linear=() if cast else ((a["src"],),))

def _slice_scatter(g, node, a):  # x with src written over a slice of dim k (x[:, 1:3] = src): k whole
    x, src, k = a["self"], a["src"], a["dim"] % len(g.shape(a["self"]))
    for i, (d, e, n) in enumerate(zip(g.dims(x), g.dims(src), g.shape(src))):
        if i != k and n > 1:
            g.idx.unify(d, e, source(node))
    return Law([g.dims(x)], whole=(g.dims(x)[k], g.dims(src)[k]), linear=((x, src),), view=True)

def _index_put(g, node, a):
    """x[i] = v: x's indexed dims whole, v aligned with x[i] (as _index reads it). x[mask] = one value is where(mask,
    value, x): elementwise, the mask's dims x's."""
    x, dx, v, ins = a["self"], g.dims(a["self"]), a["values"], a["indices"]
    masks = [i is not None and i.meta["val"].dtype == torch.bool for i in ins]
    if any(masks) and not (all(m or i is None for m, i in zip(masks, ins)) and v.meta["val"].numel() == 1):
        raise ValueError(f"no sharding rule for index_put by a mask with many values ({source(node)}): the values "
                         f"land in the mask's order; write torch.where(mask, values, x)")
    if any(masks):
        k = 0
        for i, mask in zip(ins, masks):  # a mask covers as many of x's dims as it has, from where it stands
            width = len(g.shape(i)) if mask else 1
            if mask:
                _align(g, node, dx[k:k + width], [i])
            k += width
        return Law([dx], linear=((x, v),), view=True)
    ks, picked, written = _indexed(g, node, dx, ins)
    _align(g, node, written, [v])
    return Law([dx], whole=tuple(dx[k] for k in ks) + tuple(picked), linear=((x, v),))

RULES = [  # ATen ops, rule, indices, cannot split, linear in (P in, P out), keeps for backward
    ("add sub rsub", _pointwise("", "all"), "x[...] y[...] -> z[...] (broadcast)", "-", "x, y together", "-"),
    ("mul", _pointwise("inputs", "one"), "x[...] y[...] -> z[...]", "-", "x or y", "x, y"),
    ("div", _pointwise("inputs", "first"), "x[...] y[...] -> z[...]", "-", "x", "x, y"),
    ("neg clone alias contiguous lift_fresh_copy dropout detach", _pointwise("", "all"), "x[...] -> y[...]", "-", "x",
     "-"),
    ("to _to_copy", _cast, "x[...] -> y[...]", "-", "x, to its own dtype", "-"),
    ("silu gelu relu elu leaky_relu softplus hardtanh log sin cos erf abs pow clamp log1p square mish hardswish "
     "log_sigmoid sinh cosh tan atan asin acos asinh acosh atanh lgamma digamma erfc erfinv logit sinc",
     _pointwise("inputs", ""), "x[...] -> y[...]", "-", "-", "x"),
    ("sigmoid tanh exp exp2 rsqrt sqrt reciprocal expm1", _pointwise("out", ""), "x[...] -> y[...]", "-", "-", "y"),
    ("maximum minimum atan2 xlogy hypot polar max.other min.other", _pointwise("inputs", ""),
     "x[...] y[...] -> z[...]", "-", "-", "x, y"),
    ("where", _pointwise("first", "rest"), "c[...] x[...] y[...] -> z[...]", "-", "x, y together", "c"),
    ("masked_fill", _pointwise("second", "fill0"), "x[...] m[...] -> y[...]", "-", "x (filled with 0)", "m"),
    ("eq ne lt le gt ge logical_not logical_and logical_or bitwise_not isnan __and__ __or__ bitwise_and bitwise_or "
     "sign floor ceil trunc round fmod remainder fill", _pointwise("", ""), "x[...] -> z[...]", "-", "-", "-"),
    ("sum mean", _reduction(True), "x[i, j] -> y[i]", "-", "x (j summed)", "-"),
    ("amax amin var std var_mean logsumexp linalg_vector_norm prod max min", _reduction(False), "x[i, j] -> y[i]", "j",
     "-", "x, y"),
    ("argmax argmin any all", _reduction(False, saves=False), "x[i, j] -> y[i]", "j", "-", "-"),
    ("linear mm addmm bmm baddbmm matmul", _contraction, "x[.., m, i] W[i, n] b[n] -> y[.., m, n]", "-", "x with b",
     "x, W"),
    ("conv1d conv2d conv3d", _conv, "x[b, (g i), ...] W[(g o), i, ...] b[(g o)] -> y[b, (g o), ...]",
     "the spatial dims", "x with b", "x, W"),
    ("layer_norm rms_norm", _norm, "x[..., c] w[c] b[c] -> y[..., c]", "c", "-", "x; mean, 1/std per row"),
    ("native_group_norm", _group_norm, "x[n, (g c), ...] w[(g c)] b[(g c)] -> y[n, (g c), ...]", "c, ...", "-",
     "x; mean, 1/std per group"),
    ("batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training", _batch_norm,
     "x[n, c, ...] w[c] b[c] -> y[n, c, ...]", "n, ... (training)", "-", "x; mean, 1/std per c"),
    ("max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool2d avg_pool2d avg_pool3d "
     "_adaptive_avg_pool2d", _pool, "x[.., *s] -> y[.., *s']", "s, s'", "avg: x", "max: x"),
    ("view_as_complex", lambda g, node, a: Law([g.dims(a["self"])[:-1]], whole=tuple(g.dims(a["self"])[-1:]),
                                                linear=((a["self"],),), view=True), "x[..., 2] -> y[...]", "the 2",
     "x", "-"),
    ("view_as_real", lambda g, node, a: Law([g.dims(a["self"]) + (pair := _fresh(g, [2], node.name))],
                                            whole=tuple(pair), linear=((a["self"],),), view=True),
     "x[...] -> y[..., 2]", "the 2", "x", "-"),
    ("cumsum", _scan(True), "x[..., j] -> y[..., j]", "j", "x", "-"),
    ("cumprod logcumsumexp cummax cummin", _scan(False), "x[..., j] -> y[..., j]", "j", "-", "x, y"),
    ("softmax _softmax log_softmax", lambda g, node, a: Law([g.dims(a["self"])], whole=(g.dims(a["self"])[a["dim"]],),
                                                            saves=("out",)), "x[..., j] -> y[..., j]", "j", "-", "y"),
    ("scaled_dot_product_attention", _attention, "q[.., h, s, d] k[.., h, s', d] v[.., h, s', e] -> y[.., h, s, e]",
     "s, s', d, e", "-", "q, k, v, y; logsumexp"),
    ("embedding", lambda g, node, a: Law([g.dims(a["indices"]) + [g.dims(a["weight"])[1]]], saves=(a["indices"],),
                                         whole=(g.dims(a["weight"])[0],)),
     "W[v, c] i[...] -> y[..., c]", "v", "-", "i"),
    ("view reshape _unsafe_view flatten unflatten permute transpose t numpy_T unsqueeze squeeze expand slice select "
     "narrow", _shape_op, "x[(a b)] -> y[a, b]: factors regrouped, moved, added", "an uneven view; a sliced dim", "x",
     "-"),
    ("glu", _glu, "x[(2 m)] -> y[m]", "the 2", "-", "x"),
    ("split split_with_sizes unbind", _split, "x[(n m)] -> n tensors y[m]", "n", "x", "-"),
    ("repeat_interleave repeat", _repeat, "x[a] -> y[(a r)], or y[(r a)]", "-", "x", "-"),
    ("einsum", _einsum, "its equation's letters", "-", "each operand", "its operands"),
    ("copy", _copy, "x[...] v[...] -> y[...]: v", "-", "v", "-"),
    ("slice_scatter", _slice_scatter, "x[.., i] v[.., j] -> y[.., i]: x[.., a:b] = v", "i, j", "x, v together", "-"),
    ("index_put", _index_put, "x[a, v, b] i[j] w[a, j, b] -> y[a, v, b]: x[:, i] = w", "v", "x, w together", "-"),
    ("cat stack", _cat, "x[.., i] y[.., j] -> z[.., (i + j)]", "i, j", "all together", "-"),
    ("gather", _gather, "x[.., v] i[.., j] -> y[.., j]", "v", "x", "i"),
    ("index", _index, "x[a, v, b] i[j] -> y[a, j, b]: x[:, i]", "v", "x", "i"),
    ("flip", lambda g, node, a: Law([g.dims(a["self"])], whole=tuple(g.dims(a["self"])[d] for d in a["dims"]),
                                    linear=((a["self"],),)), "x[i] -> y[i], i reversed", "i", "x", "-"),
    ("constant_pad_nd", _pad, "x[i] -> y[i']: i padded", "i, i'", "x (padded with 0)", "-"),
    ("index_select", _index, "x[a, v, b] i[j] -> y[a, j, b]", "v", "x", "i"),
    ("topk sort", _sort, "x[.., j] -> y[.., k], i[.., k]", "j, k", "-", "i"),
    ("broadcast_tensors", _broadcast, "x[...] y[...] -> x[...] y[...] (broadcast)", "-", "-", "-"),
]
RULE_OF = {name: rule for names, rule, *_ in RULES for name in names.split()}
MAKERS = set("arange ones zeros full empty scalar_tensor zeros_like ones_like full_like empty_like new_ones new_zeros "
             "new_full new_empty tensor".split())  # made whole on each rank: no rule needed

# the traced graph, every dimension named ------------------------------------------------------

@dataclasses.dataclass
class Value:
    """One tensor of the traced graph."""
    name: str
    shape: tuple
    kind: str               # "input", "parameter", "constant" (buffers, made on each rank) or "activation"
    target: str = ""        # the parameter's name, or "input i"
    grad: bool = False      # needs a gradient
    floating: bool = True
    itemsize: int = 4       # bytes per element: its dtype's
    dims: list = None       # per dimension, a tuple of index names

    @property
    def factors(self):
        return {f for d in self.dims for f in d}

class Op(NamedTuple):
    name: str
    node: fx.Node
    kind: str               # the ATen op's name
    inputs: tuple           # the values it reads, constants aside, each once
    outputs: tuple          # the values it makes (None where unused)
    law: Law                # after tracing: value names, and sets of indices

class Graph:
    """A module traced to ATen ops, every dimension of every tensor named, every op read by its rule. Nothing is
    skipped: an op without a rule is a ValueError naming it and its source line."""

    def __init__(self, module, example_inputs, dims=None):
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.module, self.names, self.given = type(module).__name__, *_dim_names(inputs, dims)
        self.shapes_in, self.inputs_in = [x.shape for x in inputs], [x.to("meta") for x in inputs]
        floating = [x for x in (*inputs, *module.parameters()) if x.is_floating_point()]  # (a norm's statistics')
        self.element_size = floating[0].element_size() if floating else 4
        self.ep = trace(module, inputs)
        self.idx, self.values, self.ops, self.constants, self.inputs, self.memo = Indices(), {}, [], [], [], {}
        self.twins = []
        for s in self.ep.graph_signature.output_specs:
            if s.kind.name != "USER_OUTPUT":
                raise ValueError(f"{self.module} writes {s.target} in its forward: a sharded run cannot (a BatchNorm's "
                                 f"running statistics? put it in eval(), or make it track_running_stats=False)")
        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self._leaf(node, specs[node.name])
            elif node.op == "output":
                self.outputs = [a.name if isinstance(a, fx.Node) else None for a in node.args[0]]
            elif node.target is not operator.getitem and _tensors_of(node.meta.get("val")):
                self._op(node)
        x, y = self.values[self.inputs[0]], self.values.get(self.outputs[0])
        self.aligned = y is not None and y.shape == x.shape and y.kind == "activation"
        for d, e in zip(y.dims, x.dims) if self.aligned else ():  # one of a stack: its output is the next input
            self.join(f"{self.module}'s output and input", ("output",), e, d)
        self._freeze()
        self.sequence = x.dims[self.names[0].index("T")] if "T" in self.names[0] else ()

    def dims(self, x):
        """The dims of node (or Value) x; a leaf is named at its first use."""
        v = self.values[x.name]
        if v.dims is None:
            v.dims = _fresh(self, v.shape, v.target or v.name)
        return v.dims

    def shape(self, node):
        return tuple(node.meta["val"].shape)

    def join(self, where, key, a, b):
        """Unify dim a of an op's output with dim b of an input that it aligns elementwise (key: op, input). But if
        that would put one index on two axes of a weight (x + W x: W's rows and columns), they stay two indices, b
        the twin of a in that input: the op split along a reads it split along b."""
        E = self.idx.expand
        if set(E(a)) != set(E(b)) and any(set(E(d)) & set(E(a)) and set(E(e)) & set(E(b))
                                          for v in self.values.values() if v.kind == "parameter" and v.dims
                                          for d, e in itertools.permutations(v.dims, 2)):
            self.twins.append((where, key, a, b))
        else:
            self.idx.unify(a, b, where)

    def _leaf(self, node, spec):
        val, i = node.meta["val"], len(self.inputs)
        kind = {"USER_INPUT": "input", "PARAMETER": "parameter"}.get(spec.kind.name, "constant")
        target, floating = f"input {i}" if kind == "input" else spec.target, _floating(val)
        grad = floating and (kind == "input" or kind == "parameter" and self.ep.state_dict[target].requires_grad)
        v = self.values[node.name] = Value(node.name, tuple(val.shape), kind, target, grad, floating,
                                           val.element_size())
        if kind == "input":
            self.inputs.append(node.name)
            v.dims = []
            for name, n in zip(self.names[i], v.shape):
                while not self.given[i] and self.idx.size.get(name, n) != n:  # a default name, of another size
                    name += "'"
                if self.idx.size.get(name, n) != n:
                    raise ValueError(f"dims names {name} for sizes {self.idx.size[name]} and {n} ({target})")
                v.dims.append((name if name in self.idx.size else self.idx.new(name, n),) if n > 1 else ())

    def _op(self, node):
        val, name, ins = node.meta["val"], op_name(node), _nodes((node.args, node.kwargs))
        users = {u.args[1]: u.name for u in node.users if u.target is operator.getitem}
        outs = tuple(users.get(i) for i in range(len(val))) if isinstance(val, (list, tuple)) else (node.name,)
        constant = name in MAKERS or all(self.values[x.name].kind == "constant" for x in ins)
        if name.startswith("rand") or name in ("bernoulli", "native_dropout"):
            raise ValueError(f"{name} ({source(node)}) draws random numbers: a sharded run would draw others")
        grad = any(self.values[x.name].grad for x in ins) and name != "detach"
        for o, t in zip(outs, _tensors_of(val)):
            if o:
                self.values[o] = Value(o, tuple(t.shape), "constant" if constant else "activation",
                                       grad=grad and _floating(t), floating=_floating(t),
                                       itemsize=t.element_size())
        if constant:  # made whole on every rank, once
            return self.constants.append((node, outs))
        rule = rule_of(node.target)
        if rule is None:
            raise ValueError(f"no sharding rule for aten.{name} ({source(node)}); print_rules() lists the ops it knows")
        a = named_args(node)
        if name == "dropout" and a["p"] and a["train"]:
            raise ValueError(f"dropout p={a['p']} ({source(node)}): a sharded run would draw other masks; trace the "
                             f"module in eval() or with p=0")
        law = rule(self, node, a)
        for o, d in zip(outs, law.outputs):
            if o:
                self.values[o].dims = d
        seen = tuple(dict.fromkeys(x.name for x in ins if self.values[x.name].kind != "constant"))
        self.ops.append(Op(node.name, node, name, seen, outs, law))

    def _freeze(self):
        """Every dim in its finest factors; the laws in value names and index sets; what is live when."""
        E, cuts = self.idx.expand, -1
        while cuts != len(self.idx.alias):  # twins cut alike: an index cut on one side is cut on the other
            cuts = len(self.idx.alias)
            twins = [(key, self.idx.pairs(a, b, where)) for where, key, a, b in self.twins]
        for v in self.values.values():
            v.dims = [E(d) for d in self.dims(v)]
        renames = {}
        for (op, *read), pairs in twins:
            renames.setdefault(op, {}).setdefault(read[0] if read else None, {}).update(pairs)
        self.out_twin = renames.get("output", {}).get(None, {})  # input 0's index -> the output's

        def names(xs):
            return frozenset(getattr(x, "name", x) for x in xs if x is not None)

        def indices(dims):
            return frozenset(f for d in dims for f in E(d))

        self.ops = [op._replace(law=op.law._replace(
            whole=indices(op.law.whole), summed=indices(op.law.summed), affine=names(op.law.affine),
            saves=names(op.law.saves), linear=tuple(names(gr) for gr in op.law.linear if gr),
            new=tuple([E(d) for d in ds] for ds in op.law.new), twins=renames.get(op.name, {})))
            for op in self.ops]
        self.last_read, born = {}, {self.inputs[0]: 0}
        for k, op in enumerate(self.ops):
            for v in op.inputs:
                self.last_read[v] = k
                born.setdefault(v, k + 1)  # a leaf: placed at its first read
            born.update((o, k + 1) for o in op.outputs if o)
        self.last_read.update((o, len(self.ops)) for o in self.outputs if o and self.values[o].kind != "constant")
        self.live = [[v for v in born if born[v] <= k <= self.last_read.get(v, -1)] for k in range(len(self.ops) + 1)]

def _floating(x):  # real or complex: differentiable
    return x.is_floating_point() or x.is_complex()

def _tensors_of(val):
    return [o for o in (val if isinstance(val, (list, tuple)) else [val]) if torch.is_tensor(o)]

def _dim_names(inputs, dims):
    dims = (dims,) if isinstance(dims, str) else (None,) * len(inputs) if dims is None else tuple(dims)
    if len(dims) != len(inputs):
        raise ValueError(f"dims names {len(dims)} inputs; there are {len(inputs)} example inputs")
    for i, (x, spec) in enumerate(zip(inputs, dims)):
        if not torch.is_tensor(x):
            raise ValueError(f"example input {i} is a {type(x).__name__}: discover takes tensors")
        if spec is None and x.dim() != 3:
            raise ValueError(f"input {i} has {x.dim()} dimensions {tuple(x.shape)}: name them in dims, e.g. dims[{i}]="
                             f"{' '.join(f'd{k}' for k in range(x.dim()))!r} (only a 3-D input defaults to 'B T C')")
        if spec is not None and len(spec.split()) != x.dim():
            raise ValueError(f"dims[{i}]={spec!r} names {len(spec.split())} dimensions; input {i} has {x.dim()}: "
                             f"{tuple(x.shape)}")
    return [(spec or "B T C").split() for spec in dims], [spec is not None for spec in dims]

# 4. price: placements, and the moves between them ---------------------------------------------
# N is the whole tensor's bytes. Under the ring algorithm a rank sends 2(t-1)/t N for an all-reduce and
# (t-1)/t N for an all-gather or a reduce-scatter (Korthikanti et al. 2022, section 4.2.2).

class Placement(NamedTuple):
    """R replicated, S split along an index, P partial sums (the ranks' tensors add up to it)."""
    kind: str
    index: Optional[str] = None

    def __str__(self):
        return f"S({self.index})" if self.kind == "S" else self.kind

R, P, S = Placement("R"), Placement("P"), functools.partial(Placement, "S")  # S(i): split along index i

def grad_placement(p):
    """A tensor's gradient once its readers' parts are moved and summed: placed like it, except that a partial
    sum's gradient is whole (the reduction's backward hands it whole to every rank)."""
    return p if p.kind == "S" else R

class Read(NamedTuple):
    """How an op reads a tensor: the placement it reads, the placement of the gradient it sends back, and (under
    "activations") whether it keeps what it read for backward."""
    placement: Placement
    grad: Placement
    saved: bool = False

class Move(NamedTuple):
    name: str
    index: Optional[str] = None

MOVES = {  # name: forward, backward, from -> to, what nanosp.py calls it
    "f": ((), ("all-reduce",), "R -> R, read by a split op (its gradient P)", "f, CopyToTensorParallelRegion"),
    "f̄": (("all-reduce",), (), "P -> R", "f_bar, ReduceFromTensorParallelRegion"),
    "g": (("all-gather",), ("reduce-scatter",), "S(i) -> R, read by a split op", "g, GatherFromSequenceParallelRegion"),
    "ḡ": (("reduce-scatter",), ("all-gather",), "P -> S(i)", "g_bar, ReduceScatterToSequenceParallelRegion"),
    "gather": (("all-gather",), (), "S(i) -> R, read by an unsplit op", "all_gather_sequence"),
    "split": ((), ("all-gather",), "R -> S(j), its only split reader", "all_gather_sequence"),
    "regather": ((), ("all-gather",), "keeps S(i) of a gathered input", "LinearWithSequenceGather"),
    "slice": ((), (), "R -> S(j), its gradient P", "-"),
    "partial": ((), (), "R -> P (rank 0's, zeros elsewhere)", "-"),
}
RING = {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 1}

class Moved(NamedTuple):
    """A move a plan makes: of which value, its whole bytes, whether its backward runs."""
    value: str
    move: Move
    nbytes: int
    grad: bool

    def ops(self, phase):
        return MOVES[self.move.name][phase == "backward"] if phase == "forward" or self.grad else ()

def collectives(moves):
    return [(phase, c, m.nbytes) for m in moves for phase in ("forward", "backward") for c in m.ops(phase)]

def units(moves):
    """Ring bytes, in units of (t-1)/t: an integer, so that equal plans tie exactly."""
    return sum(RING[c] * n for _, c, n in collectives(moves))

def recipe(p, reads, via=None):
    """The moves that serve each read of a tensor placed p: {read: chain of moves}. Readers share what they can:
    every reader that sends back a partial gradient reads through one f (or one g), so branches reading one
    tensor reduce its gradient once; a lone split reader of a whole tensor takes a split instead (its gradient
    all-gathered: half an all-reduce's bytes). A partial sum read whole and kept (under "activations") goes
    through S(via): ḡ, then g and a re-gather, as sequence parallelism moves it."""
    chains = {rd: () for rd in reads if rd.placement == p and rd.grad == grad_placement(p)}
    rest = sorted(rd for rd in reads if rd not in chains)
    if p == P and via and any(rd.saved and rd.placement == R for rd in rest):
        return chains | {rd: (Move("ḡ", via),) + chain for rd, chain in recipe(S(via), rest).items()}
    if p == P and len({rd.placement for rd in rest}) == 1 and rest[0].placement.kind == "S":
        return chains | {rd: (Move("ḡ", rd.placement.index),) for rd in rest}
    if p.kind == "S":  # gathered: partial gradients summed and reduce-scattered by one g, whole ones by a gather
        return chains | {rd: (Move("gather" if rd.grad == R else "g", p.index),) + _narrow(rd)
                         + (Move("regather", p.index),) * (rd.saved and rd.placement == R) for rd in rest}
    prefix = (Move("f̄"),) if p == P and rest else ()  # whole from here on
    chains |= {rd: prefix + _narrow(rd) for rd in rest if rd.grad == R}
    needing = [rd for rd in rest if rd not in chains]
    if len({rd.placement for rd in needing}) == 1 and needing[0].placement.kind == "S":
        return chains | {rd: prefix + (Move("split", rd.placement.index),) for rd in needing}
    return chains | {rd: prefix + (Move("f"),) + _narrow(rd) for rd in needing}

def _narrow(rd):
    """From a whole tensor to what rd reads of it: rank 0's as partial sums, this rank's slice, or all of it."""
    return {"P": (Move("partial"),), "S": (Move("slice", rd.placement.index),)}.get(rd.placement.kind, ())

def via(g, v, t):
    """The index a partial sum v is reduce-scattered along before it is gathered again: T if it can."""
    return next((f for f in sorted(g.values[v].factors, key=lambda f: (f not in g.sequence, g.idx.born[f]))
                 if g.idx.size[f] % t == 0), None)

def moves_of(g, v, p, reads, t):
    """The moves a value makes: each distinct prefix of its chains once, in a fixed order (once per reads)."""
    if ("moves", v, p, reads, t) not in g.memo:
        chains = recipe(p, reads, via(g, v, t)).values()
        prefixes = sorted({c[:n] for c in chains for n in range(1, len(c) + 1)}, key=lambda c: (len(c), c))
        g.memo["moves", v, p, reads, t] = [Moved(v, c[-1], math.prod(g.values[v].shape) * g.values[v].itemsize,
                                                 g.values[v].grad) for c in prefixes]
    return g.memo["moves", v, p, reads, t]

# 5. search ------------------------------------------------------------------------------------

class Choice(NamedTuple):
    """How an op runs: split along an index, or not (None), reading its linear group `partial` as P."""
    index: Optional[str] = None
    partial: Optional[int] = None

class Stepped(NamedTuple):
    after: dict             # each input's and output's (placement, reads so far) after it; None: its last read
    done: tuple             # (value, placement, reads) of each value read for the last time
    units: int              # their moves' ring bytes, in units of (t-1)/t
    kept: tuple             # ((value, placement), bytes on one rank) of what the op keeps for backward

def options(g, k, t):
    """Op k's choices at size t: unsplit; split along an index of its outputs, or of what it sums over, that t
    divides, that it can split and no operand holds twice; each of its linear groups read as P."""
    if (k, t) not in g.memo:
        op, law = g.ops[k], g.ops[k].law
        vals = [g.values[v] for v in op.inputs + tuple(o for o in op.outputs if o)]
        found = {f for o in op.outputs if o for f in g.values[o].factors} | law.summed
        ok = [f for f in sorted(found - law.whole, key=g.idx.born.get)
              if g.idx.size[f] % t == 0 and all(sum(f in d for d in v.dims) <= 1 for v in vals)]
        g.memo[k, t] = [Choice()] + [Choice(f) for f in ok] + [Choice(partial=i) for i in range(len(law.linear))]
    return g.memo[k, t]

def choices(g, k, t, live, constraint):
    """The options worth trying in this state. An elementwise op or a view whose activations are placed alike
    keeps that placement when it can (if the constraint allows what it then keeps, and a partial sum read as one
    leaves no other input's gradient partial): a move before it costs what one after it would (the plan space
    searched, exactly, is the one where they do). A linear group is read as P only if one of it is P already."""
    op, law, opts = g.ops[k], g.ops[k].law, options(g, k, t)
    placed = {live[v][0] for v in op.inputs if g.values[v].kind != "parameter" and v in live}
    if law.view and len(placed) == 1:
        p, ps = placed.pop(), {v for v in op.inputs if v in live and live[v][0] == P}
        keep = Choice(p.index) if p.kind == "S" else Choice() if p == R else next(  # (the others' gradients whole)
            (Choice(partial=i) for i, gr in enumerate(law.linear) if ps <= gr and all(
                v in gr or not g.values[v].grad for v in op.inputs)), None)
        if keep in opts and stepped(g, t, constraint, k, keep, live) is not None:
            return [keep]
    return [c for c in opts if c.partial is None or any(live.get(v, (R,))[0] == P for v in law.linear[c.partial])]

def read_of(g, op, choice, v, constraint):
    """How op, run as `choice`, reads value v."""
    law, partial_out = op.law, choice.partial is not None or choice.index in op.law.summed
    index = law.twins.get(v, {}).get(choice.index, choice.index)  # its twin in v (Graph.join)
    if choice.index is not None and index in g.values[v].factors:
        rd = Read(S(index), S(index))
    elif choice.partial is not None and v in law.linear[choice.partial] or partial_out and v in law.affine:
        rd = Read(P, R)
    else:  # read whole by a split op, each rank sends back its part of the gradient: P
        rd = Read(R, P if choice.index is not None or partial_out else R)
    if not g.values[v].grad:  # no gradient: how it would come back does not matter
        return Read(rd.placement, grad_placement(rd.placement))
    return rd._replace(saved=constraint == "activations" and v in law.saves)

def step(g, t, constraint, k, choice, entries):
    """Op k run as `choice`, given its inputs' entries (None: a leaf read for the first time, placed as it is
    read); None if that breaks the constraint."""
    op, law = g.ops[k], g.ops[k].law
    partial_out = choice.partial is not None or choice.index in law.summed
    outs = {o: S(choice.index) if choice.index in g.values[o].factors else P if partial_out else R
            for o in op.outputs if o}
    after, done, kept = {}, [], []

    def keep(key, shape, p, itemsize=g.element_size):  # a tensor kept for backward, placed p: its bytes on one
        kept.append((key, math.prod(shape) * itemsize // (t if p.kind == "S" else 1)))  # rank; False if it breaks
        return constraint != "activations" or p.kind == "S" or not any(n % t == 0 for n in shape)  # (a loss: whole)

    for v, entry in zip(op.inputs, entries):
        val, rd = g.values[v], read_of(g, op, choice, v, constraint)
        p, reads = entry or (R if rd.placement == P else rd.placement, frozenset())
        matrix = val.kind == "parameter" and len(val.shape) > 1
        if constraint != "none" and matrix and (p.kind != "S" or rd.placement != p):
            return None  # a weight matrix is split, and read only as it is split
        if v in law.saves and val.kind != "parameter":
            regathered = rd.saved and rd.placement == R and (p.kind == "S" or p == P and via(g, v, t))
            q = (p if p.kind == "S" else S(via(g, v, t))) if regathered else rd.placement
            if not keep((v, q), val.shape, q, val.itemsize) and val.floating:
                return None  # (integer indices excepted: an embedding reads them whole)
        reads |= {rd} - {Read(p, grad_placement(p))}  # (a read as it is placed costs nothing, and changes nothing)
        after[v] = None if g.last_read[v] == k else (p, reads)
        done += [(v, p, reads)] * (g.last_read[v] == k)
    if not all([keep((o, p), g.values[o].shape, p, g.values[o].itemsize) or not g.values[o].floating
                for o, p in outs.items() if "out" in law.saves or o in law.saves]):  # (topk's indices: kept, whole)
        return None
    for i, dims in enumerate(law.new):
        if not keep((op.name, i), [g.idx.size[f] for d in dims for f in d],
                    S(choice.index) if any(choice.index in d for d in dims) else R):
            return None
    after.update((o, (p, frozenset())) for o, p in outs.items())
    return Stepped(after, tuple(done), units(m for d in done for m in moves_of(g, *d, t)), tuple(kept))

def stepped(g, t, constraint, k, choice, live):  # step, once for each state of op k's inputs
    key = ("step", t, constraint, k, choice, tuple(live.get(v) for v in g.ops[k].inputs))
    if key not in g.memo:
        g.memo[key] = step(g, t, constraint, k, choice, key[-1])
    return g.memo[key]

def returning(g, first, v, p):
    """An output's last read: the module's output returns to its input's placement; any other is taken as it is."""
    if g.aligned and v == g.outputs[0]:  # input 0's placement, its index read as its twin in the output if it has one
        p = S(g.out_twin.get(first.index, first.index)) if first.kind == "S" else first
    return Read(p, grad_placement(p))

def search(g, t, constraint, start, stop, states):
    """The dynamic programme over ops start..stop: a state is the (placement, reads) of every live value, and only
    the cheapest way to each state is kept, which is exact, since what happens after depends on nothing else.
    states: {state: (score, the choices so far)}. Op k's choices depend only on its inputs' entries: the states
    that agree on those share them."""
    for k in range(start, stop):
        following, ways, at = {}, {}, {v: i for i, v in enumerate(g.live[k])}
        for state, (score, path) in states.items():
            key = tuple(state[at[v]] if v in at else None for v in g.ops[k].inputs)
            if key not in ways:  # each choice: its cost, and each next live value's entry or its place in state
                live = {v: e for v, e in zip(g.ops[k].inputs, key) if v in at}
                ways[key] = [(choice, (s.units, sum(b for _, b in s.kept), choice.partial is not None),
                              [s.after[v] if v in s.after else at[v] for v in g.live[k + 1]])
                             for choice in choices(g, k, t, live, constraint)
                             if (s := stepped(g, t, constraint, k, choice, live)) is not None]
            for choice, more, after in ways[key]:
                cheapest(following, tuple(state[e] if isinstance(e, int) else e for e in after), score, more,
                         path + (choice,))
        states = following
    return states

def cheapest(states, state, score, more, path):
    """Keeps the cheapest way to each state. A score, score + more, is (ring bytes in units of (t-1)/t, activation
    bytes kept, reads of partial sums), compared in that order: ties go to less memory, then to fewer partial reads."""
    score = tuple(a + b for a, b in zip(score, more))
    if state not in states or score < states[state][0]:
        states[state] = (score, path)

def segments(g):
    """The ops cut where one value alone is live (between blocks, or sub-blocks): each run, with the first run of
    its form and the index map that makes it that one. A stack of identical blocks is solved once."""
    cuts = sorted({0, len(g.ops)} | {k for k in range(len(g.ops)) if len(g.live[k]) == 1})
    found, first = [], {}
    for a, b in zip(cuts, cuts[1:]):
        form, indices = _form(g, a, b)
        a0, indices0 = first.setdefault(form, (a, indices))
        found.append((a, b, (a0, dict(zip(indices0, indices)) if a0 != a else {})))
    return found

def _form(g, a, b):
    """Ops a..b without their names: each op's kind and other arguments, each value's role (the run's first value,
    a value it makes, or a leaf) and its indices numbered in order of appearance; and those indices."""
    made = {o: (k - a, i) for k in range(a, b) for i, o in enumerate(g.ops[k].outputs) if o}
    number, form = {}, []
    for op in g.ops[a:b]:
        form.append((op.kind, repr(fx.node.map_arg(op.node.args, lambda _: 0))))
        for v in filter(None, op.inputs + op.outputs):  # (an unused output is None)
            val = g.values[v]
            role = "first" if v in g.live[a] else (val.kind, val.shape, *made.get(v, (None, 0)))
            form.append((role, tuple(tuple(number.setdefault(f, len(number)) for f in d) for d in val.dims)))
    return tuple(form), list(number)

def _rename(state, fmap):
    def p(q):
        return q._replace(index=fmap.get(q.index, q.index))
    return tuple((p(e[0]), frozenset(Read(p(r.placement), p(r.grad), r.saved) for r in e[1])) for e in state)

def best(g, t, constraint, first):
    """The cheapest choices with input 0 placed `first`, or None: segment by segment, each solved once from each
    placement of its first value, for all its copies."""
    states = {((first, frozenset()),) * (g.inputs[0] in g.live[0]): ((0, 0, 0), ())}
    for a, b, (a0, fmap) in segments(g):
        following, back = {}, {h: f for f, h in fmap.items()}
        for state, (score, path) in states.items():
            key = ("segment", t, constraint, a0, _rename(state, back))
            if key not in g.memo:
                g.memo[key] = search(g, t, constraint, a0, a0 + b - a, {key[-1]: ((0, 0, 0), ())})
            for after, (more, sub) in g.memo[key].items():
                sub = tuple(c._replace(index=fmap.get(c.index, c.index)) for c in sub)
                cheapest(following, _rename(after, fmap), score, more, path + sub)
        states = following
    finals = {}  # the values live at the end make their moves, the output returning to its input's placement
    for state, (score, path) in states.items():
        ends = [moves_of(g, v, p, reads | {returning(g, first, v, p)}, t) for v, (p, reads) in zip(g.live[-1], state)]
        cheapest(finals, "end", score, (units(m for ms in ends for m in ms), 0, 0), path)
    return finals["end"][1] if finals else None

def account(g, t, constraint, first, chosen):
    """The Plan of one choice per op, input 0 placed `first` (None if it breaks the constraint): its moves in graph
    order; per rank, the parameter bytes and the activation bytes kept, each tensor once."""
    live, done, kept, placed = {g.inputs[0]: (first, frozenset())}, [], {}, {g.inputs[0]: first}
    for k, (op, choice) in enumerate(zip(g.ops, chosen)):
        s = step(g, t, constraint, k, choice, tuple(live.get(v) for v in op.inputs))
        if s is None:
            return None
        placed.update({v: p for v, p, _ in s.done} | {v: e[0] for v, e in s.after.items() if e})  # read, or made
        live.update(s.after)
        kept.update(s.kept)
        done += s.done
    done += [(v, live[v][0], live[v][1] | {returning(g, first, v, live[v][0])}) for v in g.live[-1]]  # their last
    moves = [m for d in done for m in moves_of(g, *d, t)]
    params = sum(math.prod(v.shape) * v.itemsize // (t if placed.get(v.name, R).kind == "S" else 1)
                 for v in g.values.values() if v.kind == "parameter")
    return Plan(t, constraint, g, first, {op.name: c for op, c in zip(g.ops, chosen)}, placed,
                {v: reads for v, _, reads in done}, moves, units(moves) * (t - 1) // t, sum(kept.values()), params)

def discover(module, example_inputs, t, dims=None, constraint="weights"):
    """The plan that sends the fewest bytes per rank (ring algorithm, forward and backward) under the constraint
    (CONSTRAINTS); ties go to fewer activation bytes kept. module (unsharded) and example_inputs may be on the meta
    device: nothing is computed. dims names each input's dimensions, e.g. ("T B C",); a 3-D input defaults to
    "B T C". Each tensor's bytes are at its dtype's element size (an upcast to float32 inside a bfloat16 model
    sends 4 bytes an element, its ids 8); the module is priced as one of a stack of identical blocks (its output
    returns to its input's placement: replicated, or split along T under "activations"); shard()'s conversions
    from and to full tensors are not. The plan applies to any module of the same parameters."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint={constraint!r} is not one of {tuple(CONSTRAINTS)}")
    if not isinstance(t, int) or isinstance(t, bool) or t < 2:
        raise ValueError(f"t={t!r} must be an int >= 2: the number of ranks to shard over")
    return solve(Graph(module, example_inputs, dims), t, constraint)

def solve(g, t, constraint):  # discover's search, on a traced Graph
    sizes = sorted({n for n in g.idx.size.values() if n > 1})
    if not any(n % t == 0 for n in sizes):
        raise ValueError(f"t={t} divides no dimension of {g.module}'s tensors (their sizes: {sizes})")
    seq = [f for f in g.sequence if g.idx.size[f] % t == 0]
    if constraint == "activations" and not seq:  # input 0 split along its sequence, as the paper's SP splits it
        size = g.shapes_in[0][g.names[0].index("T")] if g.sequence else None
        why = f"its size {size} is not divisible by t={t}" if g.sequence else "name it T"
        raise ValueError(f"constraint='activations' splits input 0 along its sequence dimension T: {why}")
    first = S(seq[0]) if constraint == "activations" else R
    gc.disable()  # the search makes many small tuples, none of them cyclic: the collector would only slow it
    try:
        found = best(g, t, constraint, first)
    finally:
        gc.enable()
    if found is None:
        raise ValueError(f"no plan for {g.module} meets constraint={constraint!r} at t={t}{_why(g, t, constraint)}")
    return account(g, t, constraint, first, found)

def _why(g, t, constraint):
    """Why no plan meets the constraint, where one weight or one op says why ("" if none does)."""
    for v in (v for v in g.values.values() if v.kind == "parameter" and len(v.shape) > 1):
        if not any(n % t == 0 for n in v.shape):
            return f": {v.target} {v.shape} has no dimension t divides"
        if len(set(v.dims)) < len(v.dims):  # W (W x): W's output and input are one index
            return (f": {v.target} {v.shape} has one index on two axes (applied to its own output?), so no split of it"
                    f" is a column or a row; constraint='none' replicates it")
    for k, op in enumerate(g.ops if constraint == "activations" else []):
        if ("out" in op.law.saves or op.law.new) and all(c.index is None for c in options(g, k, t)):
            shape = g.values[next(o for o in op.outputs if o)].shape
            return (f": {op.kind} ({source(op.node)}) keeps its output {shape} for backward and cannot split it {t} "
                    f"ways (no index of it that t divides is one it can split); constraint='weights' keeps it whole")
    return ""

# the plan -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Where each weight and activation of a module lives on t ranks, and the moves between them."""
    t: int
    constraint: str
    graph: Graph
    first: Placement        # input 0's placement (and the output's, in a stack of blocks)
    choices: dict           # op -> Choice
    placements: dict        # value -> Placement
    reads: dict             # value -> its Reads
    moves: list             # [Moved], in graph order
    bytes_sent: int         # per rank, forward and backward, ring algorithm
    activation_bytes: int   # kept for backward by one rank, each tensor once
    param_bytes: int        # held by one rank

    @property
    def collectives(self):
        """[(phase, name, bytes of the whole tensor)], forward and backward, in graph order."""
        return collectives(self.moves)

    @property
    def weights(self):
        """{parameter name: its Placement}."""
        return {v.target: self.placements.get(v.name, R) for v in self.graph.values.values() if v.kind == "parameter"}

    def describe(self, v):
        """A value's placement in words, e.g. "split: dim 0 = 3 x [16] x 64" (the bracketed factor is split)."""
        g, p = self.graph, self.placements.get(v, R)
        if p.kind != "S":
            return {"R": "replicated", "P": "partial sums"}[p.kind]
        d = next(k for k, dim in enumerate(g.values[v].dims) if p.index in dim)
        return f"split: dim {d} = " + " x ".join(f"[{g.idx.size[f]}]" if f == p.index else str(g.idx.size[f])
                                                for f in g.values[v].dims[d])

    def __str__(self):
        g, mib = self.graph, lambda b: f"{b / 2**20:,.2f} MiB"
        made = {o: source(op.node) for op in g.ops for o in op.outputs if o}
        lines = [f"{g.module} at t={self.t}, constraint={self.constraint!r}: {self.bytes_sent:,} bytes sent per rank, "
                 f"forward + backward (ring); per rank {mib(self.param_bytes)} of parameters, "
                 f"{mib(self.activation_bytes)} of activations kept", f"  input 0 {tuple(g.shapes_in[0])}: "
                 f"{self.describe(g.inputs[0])}" + "; the output returns to it" * g.aligned]
        lines += [f"  {v.target!r:34} {str(v.shape):14} {self.describe(v.name)}" for v in g.values.values()
                  if v.kind == "parameter"]
        for m in self.moves:
            forward, backward, v = " + ".join(m.ops("forward")), " + ".join(m.ops("backward")), g.values[m.value]
            if forward or backward:
                lines.append(f"  {m.move.name:8} {v.target or v.name:12} {str(v.shape):16} forward {forward or '-':15} "
                             f"backward {backward or '-':28} {m.nbytes:>13,} B  {made.get(v.name, '')}")
        return "\n".join(lines)

# 6. run: the traced graph on this rank's shards -----------------------------------------------

class Moving(torch.autograd.Function):
    """A move nanosp has no operator for: its forward and its backward, each a function of one tensor."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad), None, None

def along(x, dims, index, fn, size):
    """fn applied along factor `index` of x (dims: its factors, size: theirs), moved to dim 0 and back: a split,
    gather or scatter of a factor anywhere, even inside a merged dim."""
    d = next(k for k, dim in enumerate(dims) if index in dim)
    sizes, j = [size[f] for f in dims[d]], dims[d].index(index)
    sizes[j] = x.shape[d] // (math.prod(sizes) // sizes[j])  # this rank's part, or the whole
    y = fn(x.reshape(*x.shape[:d], *sizes, *x.shape[d + 1:]).movedim(d + j, 0)).movedim(0, d + j)
    return y.reshape(*y.shape[:d], math.prod(y.shape[d:d + len(sizes)]), *y.shape[d + len(sizes):]).contiguous()

def _regathering(kept):
    """Within an op, a saved tensor that views a gathered one is kept as the shard it was gathered from, gathered
    again when backward first needs it (once however many ops keep it, as nanosp's LinearWithSequenceGather does)
    and rebuilt by its strides. kept: {the gathered tensor's storage: its gathering again}."""
    def pack(x):
        holder = kept.get(x.untyped_storage().data_ptr())
        return x if holder is None else (holder, x.shape, x.stride(), x.storage_offset())

    def unpack(packed):
        return packed if torch.is_tensor(packed) else packed[0]().as_strided(*packed[1:])
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

class Sharded(torch.nn.Module):
    """A module run as a plan says on this rank of `group`: its parameters sliced, the traced graph interpreted op
    by op, the plan's moves in between. Called with the full inputs (the same on every rank), it returns the full
    outputs."""

    def __init__(self, module, plan, group):
        super().__init__()
        g, t = plan.graph, nanosp.group_size(group)
        if t != plan.t:
            raise ValueError(f"the group has {t} ranks; the plan was discovered for t={plan.t}")
        self.plan, self.group, self.local, self.names = plan, group, torch.nn.ParameterDict(), {}
        full = dict(module.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
        full |= dict(module.named_buffers(remove_duplicate=False))
        for v in (v for v in g.values.values() if v.kind == "parameter"):
            w, want = full.get(v.target), g.ep.state_dict[v.target]
            if w is None or w.shape != want.shape or w.is_meta or w.dtype != want.dtype:
                got = "missing" if w is None else "on the meta device" if w.is_meta else f"{tuple(w.shape)} {w.dtype}"
                raise ValueError(f"{type(module).__name__} does not fit the plan: parameter {v.target} is {got}; the "
                                 f"plan's is {v.shape} {want.dtype}")
            self.local[v.name] = torch.nn.Parameter(self._part(w.detach(), v.name).clone(), w.requires_grad)
            self.names[v.name] = [n for n, x in full.items() if x is w]
        device = next(iter(self.local.values()), torch.empty(0)).device
        self.constants = {v.name: full.get(v.target, g.ep.constants.get(v.target)) for v in g.values.values()
                          if v.kind == "constant" and v.target}  # buffers and tensor constants (not made by ops)
        if any(c.is_meta for c in self.constants.values()):  # tensors made in forward (x[:, [-2]], a KV cache's
            if g.memo.get(("again", id(module)), (None,))[0] is not module:  # (once per module, however many plans)
                zeros = tuple(torch.zeros(x.shape, dtype=x.dtype, device=device) for x in g.inputs_in)
                g.memo["again", id(module)] = module, trace(module, zeros).constants
            real = {}  # start), traced on meta: traced again, real. The k-th of a dtype and shape is the k-th again
            for c in g.memo["again", id(module)][1].values():  # (on meta, a Python number put in a tensor is none)
                real.setdefault((c.dtype, c.shape), []).append(c)
            order = {target: k for k, target in enumerate(g.ep.constants)}
            for v in sorted((v for v in g.values.values() if v.target in order), key=lambda v: order[v.target]):
                c = self.constants.get(v.name)
                if c is not None and c.is_meta:
                    self.constants[v.name] = (real.get((c.dtype, c.shape)) or [c]).pop(0)
        if any(c.is_meta for c in self.constants.values()):
            raise ValueError(f"{type(module).__name__}'s tensor constants were traced on the meta device: discover on "
                             f"an instance with real buffers, or make them buffers")
        for node, outs in g.constants:  # masks, rotary tables: made whole on every rank, once
            env = self.constants | {x.name: torch.empty(g.shape(x), dtype=x.meta["val"].dtype, device=device)
                                    for x in _nodes(node.args) if x.name not in self.constants}  # full_like(x)
            args, kwargs = _local(node.args, env, device), _local(node.kwargs, self.constants, device)
            _bind(self.constants, outs, node.target(*args, **kwargs))
        self.recipes = {v: recipe(plan.placements[v], reads, via(g, v, t)) for v, reads in plan.reads.items()}

    def forward(self, *inputs):
        g, plan = self.plan.graph, self.plan
        if [x.shape for x in inputs] != g.shapes_in:
            raise ValueError(f"inputs of shapes {[tuple(x.shape) for x in inputs]}; the plan was discovered for "
                             f"{[tuple(s) for s in g.shapes_in]}")
        env, moved, holders = dict(self.local) | self.constants, {}, {}
        env.update((v, self._part(x, v)) for v, x in zip(g.inputs, inputs))  # the full inputs to this rank's
        for op in g.ops:
            choice, local, kept = plan.choices[op.name], {}, {}
            for x in dict.fromkeys(_nodes((op.node.args, op.node.kwargs))):
                local[x.name], chain = self._read(x.name, read_of(g, op, choice, x.name, plan.constraint), env, moved)
                if chain and chain[-1].name == "regather":  # kept as the shard its gather started from
                    if (x.name, chain) not in holders:  # gathered again in backward: once, without a gradient
                        again = functools.partial(self._move, moved[x.name, chain[:-2]].detach(), x.name, chain[-2])
                        holders[x.name, chain] = functools.cache(torch.no_grad()(again))
                    kept[local[x.name].untyped_storage().data_ptr()] = holders[x.name, chain]
            target, args = _local_shapes(op, list(_local(op.node.args, local, inputs[0].device)),
                                         [plan.placements.get(o) for o in op.outputs], g, plan.t)
            with _regathering(kept) if kept else contextlib.nullcontext():
                result = target(*args, **_local(op.node.kwargs, local, inputs[0].device))
            if op.kind == "mean" and choice.index in op.law.summed:
                result = result / plan.t  # each rank's mean is over its 1/t of the elements: a part of the mean
            _bind(env, op.outputs, result)
        outputs = []
        for v in g.outputs:  # to the next block's placement (priced), then to the full outputs (not)
            rd = v and g.values[v].kind != "constant" and returning(g, plan.first, v, plan.placements[v])
            outputs.append(self._full(self._read(v, rd, env, moved)[0], v, rd.placement) if rd else env.get(v))
        return torch.utils._pytree.tree_unflatten(outputs, g.ep.call_spec.out_spec)  # as the module returns them

    def _read(self, v, rd, env, moved):
        """Value v as an op reads it (rd), and its chain of moves: each prefix of the plan's chain made once. A
        constant is whole on every rank: sliced, or rank 0's as a partial sum, for free."""
        chain = _narrow(rd) if self.plan.graph.values[v].kind == "constant" else self.recipes[v].get(rd, ())
        moved.setdefault((v, ()), env[v])
        for n in range(1, len(chain) + 1):
            if (v, chain[:n]) not in moved:
                moved[v, chain[:n]] = self._move(moved[v, chain[:n - 1]], v, chain[n - 1])
        return moved[v, chain], chain

    def _move(self, x, v, move):
        """One move of v on this rank: nanosp's f, f̄, g, ḡ where they apply, the others by Moving or slicing."""
        if move.name == "regather":  # the gathered tensor itself: _regathering keeps its shard for backward
            return x
        group, g = self.group, self.plan.graph
        t, rank = nanosp.group_size(group), nanosp.group_rank(group)

        def gather(y):
            return nanosp.all_gather_sequence(y, group)

        def mine(y):  # this rank's rows, to be gathered again
            return y.chunk(t)[rank].contiguous()
        fn = {"f": lambda y: nanosp.f(y, group), "f̄": lambda y: nanosp.f_bar(y, group),
              "g": lambda y: nanosp.g(y, group), "ḡ": lambda y: nanosp.g_bar(y, group),
              "gather": lambda y: Moving.apply(y, gather, mine), "split": lambda y: Moving.apply(y, mine, gather),
              "slice": lambda y: y.chunk(t)[rank],  # partial: rank 0's as partial sums, zeros elsewhere
              "partial": lambda y: Moving.apply(y, lambda z: torch.zeros_like(z) if rank else z.clone(),
                                                lambda z: z)}[move.name]
        return along(x, g.values[v].dims, move.index, fn, g.idx.size) if move.index else fn(x)

    def _part(self, x, v):
        """A full input or parameter to this rank's part of it (not priced)."""
        p = self.plan.placements.get(v, R)
        return self._move(x, v, Move("split", p.index)) if p.kind == "S" else x

    def _full(self, x, v, p):
        """This rank's part of an output or a gradient, placed p, to the whole of it (not priced)."""
        return x if p == R else self._move(x, v, Move("f̄") if p == P else Move("gather", p.index))

    def full_grads(self):
        """Collective: {each of the module's parameter names: its unsharded gradient (None if it has none)}, every
        rank; a tied weight's under each of its names."""
        placements = self.plan.placements
        grads = {v: self._full(w.grad.detach(), v, placements.get(v, R)).clone() if w.grad is not None else None
                 for v, w in self.local.items()}
        return {name: grads[v] for v in grads for name in self.names[v]}

def _bind(env, outs, result):
    """An op's results into env under its outputs' names (None: unused)."""
    env.update((o, r) for o, r in zip(outs, result if len(outs) > 1 else [result]) if o)

def _local(args, env, device):
    """An op's arguments (or keyword arguments) on this rank: values from env, the device this rank's."""
    args = fx.node.map_arg(args, lambda node: env[node.name])
    return torch.utils._pytree.tree_map(lambda a: device if isinstance(a, torch.device) else a, args)

def _local_shapes(op, args, placements, g, t):
    """The op and its arguments with the shapes in them this rank's: a view's, an expand's, a split's."""
    def local(v, p):
        return [math.prod(g.idx.size[f] // (t if p and f == p.index else 1) for f in d) for d in g.values[v].dims]
    o = next(o for o in op.outputs if o)
    out = local(o, placements[0])
    if op.kind in ("view", "reshape", "_unsafe_view", "squeeze", "unflatten"):  # a split dim may be 1 on a rank
        return torch.ops.aten.reshape.default, [args[0], out]
    if op.kind == "copy":  # (aten.copy has no derivative: the same by ops that have one)
        return lambda x, src, non_blocking=False: src.to(x.dtype).expand(x.shape).clone(), args
    if op.kind == "expand":
        args[1] = out
    elif op.kind in ("repeat", "repeat_interleave"):  # each rank its share of the copies: its output over its input
        copies = [n // m for n, m in zip(out, [1] * (len(out) - args[0].dim()) + [*args[0].shape])]
        args[1] = copies if op.kind == "repeat" else copies[named_args(op.node)["dim"] % args[0].dim()]
    elif op.kind.startswith("conv") and len(args) > 6:  # groups: this rank's input channels over a group's
        args[6] = args[0].shape[args[0].dim() == args[1].dim()] // args[1].shape[1]
    elif op.kind == "native_group_norm":  # N, C and groups: this rank's
        args[3], args[4], args[6] = args[0].shape[0], args[0].shape[1], args[6] * args[0].shape[1] // args[4]
    elif op.kind in ("split", "split_with_sizes"):
        k = named_args(op.node)["dim"] % len(g.values[o].shape)
        sizes = [local(v, p)[k] if v else None for v, p in zip(op.outputs, placements)]
        if op.kind == "split":
            args[1] = next(s for s in sizes if s)
        else:  # an unused part shrinks as a used one does (equal parts; unequal ones are whole)
            used, full = next((n, args[1][i]) for i, n in enumerate(sizes) if n is not None)
            args[1] = [n if n is not None else m * used // full for n, m in zip(sizes, args[1])]
    return op.node.target, args

shard = Sharded  # shard(module, plan, group): module run as `plan` on this rank of `group` (of size plan.t)

# python autoshard.py: the rules, and nanosp's Block rediscovered ------------------------------

def print_rules():
    print("An op split along index i reads each input that holds i split, S(i), and the others whole, R; its output is "
          "S(i), or P (partial sums) if it summed over i. An op linear in inputs may read them as P and give P, so "
          "branches that add up are reduced once. Ops on constants alone (masks, rotary tables) run whole on every "
          "rank and need no rule.\n")
    table(["ATen ops", "indices", "cannot split", "linear in (P in, P out)", "keeps for backward"],
          [(", ".join(names.split()[:6]) + " ..." * (len(names.split()) > 6), *text) for names, _, *text in RULES])
    print("\nMoves: what serves a tensor placed `from` to a reader of it placed `to`; N its whole bytes.\n")
    table(["move", "from -> to", "forward", "backward", "ring bytes per rank", "in nanosp.py"],
          [(name, fromto, " + ".join(fw) or "-", " + ".join(bw) or "-", f"{sum(RING[o] for o in fw + bw)} (t-1)/t N",
            helper) for name, (fw, bw, fromto, helper) in MOVES.items()])

def table(headers, rows):
    print("| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers) + "".join(
        "\n| " + " | ".join(str(x) for x in row) + " |" for row in rows))

def main():
    parser = argparse.ArgumentParser(description="Discover the plans of one nanosp Block (GPT-3 Medium's shape).")
    for name, default in [("seq", 2048), ("batch", 1), ("hidden", 1024), ("heads", 16), ("tp", 8)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    cfg = nanosp.GPTConfig(block_size=args.seq, n_layer=1, n_head=args.heads, n_embd=args.hidden)
    with torch.device("meta"):
        block, x = nanosp.Block(cfg, None, 0).bfloat16(), torch.empty(args.seq, args.batch, args.hidden).bfloat16()
    print(f"### autoshard: one nanosp Block, s={args.seq} b={args.batch} h={args.hidden} a={args.heads} t={args.tp}, "
          f"16-bit, traced on the meta device\n")
    print_rules()
    for constraint in CONSTRAINTS:
        start = time.perf_counter()
        try:
            plan = discover(block, (x,), args.tp, dims=("T B C",), constraint=constraint)
        except ValueError as e:
            parser.error(str(e))
        print(f"\n#### constraint={constraint!r}: {CONSTRAINTS[constraint]} (discovered in "
              f"{time.perf_counter() - start:.1f} s)\n\n```\n{plan}\n```")

if __name__ == "__main__":
    main()
