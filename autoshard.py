"""autoshard.py: derive tensor and sequence parallelism from the dataflow of one unsharded block.

nanosp.py writes Megatron's f, f̄ and sequence parallelism's g, ḡ by hand. This file starts from the
unsharded Block (group=None), searches the ways to shard it, and arrives at the same four operators
in the same places, with the bytes and the activation memory that nanosp's own ledgers count.

1. trace     torch.fx turns Block.forward into a graph of tensor ops (layer_norm, linear, rearrange, bmm ...)
2. indices   every dimension of every tensor gets a name, einsum-style: T B C, and three a d where
             nanosp's rearrange spells out the fused q, k, v features
3. rules     a tensor is R (replicated), S(i) (split along index i) or P (partial sums). An op split
             along i reads the inputs that hold i as S(i) and the others whole; RULES says what each
             op cannot split and what it keeps for backward
4. moves     a tensor read in another placement than it has is moved by collectives, forward and
             backward, priced under the ring algorithm; four of the moves are the paper's f, f̄, g, ḡ
5. placing   a plan fixes the weights and the activation between blocks; a dynamic programme over the
             graph splits every other op at least bytes (exactly, not greedily)
6. search    every plan, ranked by bytes per layer, beside parameter and activation bytes per rank
7. nanosp    the lines of nanosp.py that hold each placed collective; nanosp's communication ledger

    python autoshard.py           # rules, moves, the search's table, the two winners against nanosp.py
"""
import argparse
import dataclasses
import inspect
import itertools
import math
import operator
import re
import time
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from einops import rearrange

import nanosp
from ledgers import measure_activation_bytes, measure_communication, ring_bytes_sent

BYTES = 2  # 16-bit activations and weights, as in the paper's accounting
BLOCK_INPUT = ("T", "B", "C")  # nanosp lays activations out sequence first
REGATHER = True  # nanosp's choice: a linear fed by a gather keeps only the shard, gathers it again in backward


# ----------------------------------------------------------------------------------------------
# 1. trace


def call_block(block, x):
    """The one place that knows Block's forward signature: no dropout, nanosp's plain-PyTorch ops."""
    return block(x, nanosp.Forward())


class _Root(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return call_block(self.block, x)


def trace_block(cfg, device="meta"):
    """fx graph of one unsharded nanosp Block (group=None), rearrange kept as one node. On the meta
    device nothing is computed: shapes only, at any size."""
    cfg = dataclasses.replace(cfg, dropout=0.0, recompute="none", sequence_parallel=False)
    with torch.device(device):
        root = _Root(nanosp.Block(cfg, None, layer=0))
    gm = fx.GraphModule(root, fx.Tracer(autowrap_functions=(rearrange,)).trace(root))
    gm.meta["root"] = root  # the GraphModule keeps the parameters, not the classes that own them
    return gm


# ----------------------------------------------------------------------------------------------
# 2. indices


class Indices:
    """Index names. A dimension is a tuple of factors: one name, or several where a rearrange spells
    them out, (three, a, d). Ops unify the names they share: the residual add makes c_proj's output
    features the same index C as the block's input."""

    def __init__(self):
        self.size, self.alias = {}, {}

    def new(self, name, size):
        while name in self.size:
            name += "'"
        self.size[name] = size
        return (name,)

    def expand(self, dim):
        return tuple(g for f in dim for g in (self.expand(self.alias[f]) if f in self.alias else (f,)))

    def unify(self, a, b, where):
        a, b = self.expand(a), self.expand(b)
        if a == b:
            return
        order = list(self.size)
        if len(a) > 1 or (len(b) == 1 and order.index(b[0]) > order.index(a[0])):
            a, b = b, a  # a: the single, newer name, which becomes b
        if len(a) > 1 or self.size[a[0]] != math.prod(self.size[f] for f in b):
            raise ValueError(f"{where}: dimensions {a} and {b} cannot be the same index")
        self.alias[a[0]] = b


# ----------------------------------------------------------------------------------------------
# 3. rules: each op read as an einsum; each returns (inputs, output dims, dims it needs whole, saves)
#
# saves: ("in", name) an input, ("out",) the output, ("new", dims) a tensor made inside the op.


def _name(df, node, dims):
    """node's dims, naming them `dims` if nothing did yet (a parameter at its first use)."""
    df.dims.setdefault(node.name, list(dims))
    for mine, theirs in zip(df.dims[node.name], dims):
        df.idx.unify(mine, theirs, node.name)
    return df.dims[node.name]


def _elementwise(df, node, saves=()):
    """Broadcasting: dims aligned from the right; a size-1 dim is a new index of its own."""
    tensors = [a for a in node.args if isinstance(a, fx.Node) and torch.is_tensor(df.values[a.name])]
    shape = df.values[node.name].shape
    out = [None] * len(shape)
    for a in sorted(tensors, key=lambda a: a.name not in df.dims):  # named inputs first, then parameters
        mine, n = df.values[a.name].shape, len(df.values[a.name].shape)
        dims = [out[k - n] or df.idx.new(f"{node.name}.{k}", mine[k]) if mine[k] == shape[k - n]
                else df.idx.new("1", 1) for k in range(n)]
        for k, d in enumerate(_name(df, a, dims)):
            out[k - n] = d if mine[k] == shape[k - n] else out[k - n]
    return tensors, out, [], saves


def _layer_norm(df, node):
    x, k = node.args[0], len(node.args[1])
    dims = df.dims[x.name]
    params = [p for p in (node.kwargs.get("weight"), node.kwargs.get("bias")) if p is not None]
    for p in params:
        _name(df, p, dims[-k:])
    return [x, *params], dims, dims[-k:], [("in", x.name), ("new", dims[:-k]), ("new", dims[:-k])]


def _linear(df, node):
    x, w, bias = (list(node.args) + [node.kwargs.get("bias")])[:3]
    dims = df.dims[x.name]
    fresh = df.idx.new(df.params.get(w.name, w.name).removesuffix(".weight"), df.values[w.name].shape[0])
    out = _name(df, w, [fresh, dims[-1]])[0]
    if bias is not None:
        _name(df, bias, [out])
    return [a for a in (x, w, bias) if a is not None], dims[:-1] + [out], [], [("in", x.name)]


def _bmm(df, node):
    a, b = node.args
    (n, i, k), (n2, k2, j) = df.dims[a.name], df.dims[b.name]
    df.idx.unify(n, n2, node.name)
    df.idx.unify(k, k2, node.name)
    return [a, b], [n, i, j], [], [("in", a.name), ("in", b.name)]


def _rearrange(df, node):
    """The pattern names the indices: a dimension it splits into factors for the first time gets
    them as new indices, their sizes from the pattern's keywords."""
    x, pattern = node.args
    sizes = {k: df.values[v.name] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    lhs, rhs = ([g.split() if g else [n] for g, n in re.findall(r"\(([^)]*)\)|(\S+)", side)]
                for side in pattern.split("->"))
    names = {}
    for group, dim, size in zip(lhs, df.dims[x.name], df.values[x.name].shape, strict=True):
        factors = df.idx.expand(dim)
        if len(group) != len(factors):
            known = math.prod(sizes[n] for n in group if n in sizes)
            factors = tuple(df.idx.new(n, sizes.get(n, size // known))[0] for n in group)
            df.idx.unify(dim, factors, node.name)
        names.update(zip(group, factors))
    return [x], [tuple(names[n] for n in group) for group in rhs], [], []


def _getitem(df, node):
    x, index = node.args
    if not isinstance(index, int):
        raise ValueError(f"no sharding rule for indexing {node.name} with {index!r}: only an int has one")
    return [x], df.dims[x.name][1:], df.dims[x.name][:1], []


def _transpose(df, node):
    x, i, j = node.args
    dims = list(df.dims[x.name])
    dims[i], dims[j] = dims[j], dims[i]
    return [x], dims, [], []


def _softmax(df, node):
    x, dim = node.args[0], node.kwargs.get("dim", node.args[-1])
    return [x], df.dims[x.name], [df.dims[x.name][dim]], [("out",)]


def _triu(df, node):
    inputs, out, _, _ = _elementwise(df, node)
    return inputs, out, out[-2:], []


def _full(df, node):  # no input: each rank makes the part it needs
    return [], [df.size_of[n.name] if isinstance(n, fx.Node) else df.idx.new("n", n) for n in node.args[0]], [], []


RULES = [  # targets, rule, the index law, what it cannot split, what it keeps for backward
    ((F.layer_norm,), _layer_norm, "x[..., c] w[c] b[c] -> y[..., c]", "c (normalised)", "x; mean, 1/std per row"),
    ((F.linear,), _linear, "x[..., i] W[o, i] b[o] -> y[..., o]", "-", "x"),
    ((torch.bmm,), _bmm, "x[n, i, k] y[n, k, j] -> z[n, i, j]", "-", "x, y"),
    ((F.softmax,), _softmax, "x[..., j] -> y[..., j]", "j (normalised)", "y"),
    ((F.gelu,), lambda df, n: _elementwise(df, n, [("in", n.args[0].name)]), "x[...] -> y[...]", "-", "x"),
    ((operator.add, torch.add, operator.sub, operator.mul, operator.truediv), _elementwise,
     "x[...] y[...] -> z[...], broadcast", "-", "- (mul of two tensors: none here)"),
    ((rearrange,), _rearrange, "its pattern: T B (three a d) -> three (a B) T d", "-", "-"),
    ((operator.getitem,), _getitem, "x[k, ...] at an int -> y[...]", "k", "-"),
    (("transpose",), _transpose, "x[.., i, .., j] -> y[.., j, .., i]", "-", "-"),
    (("triu",), _triu, "x[..., i, j] -> y[..., i, j]", "i, j (by position)", "-"),
    ((torch.full,), _full, "sizes of x's dims -> y[...], made on each rank", "-", "-"),
]
SIZES = (operator.mul, operator.truediv, operator.floordiv, operator.add, operator.sub, math.sqrt)
Op = namedtuple("Op", "name kind inputs whole saves module")


def _op_name(target):
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


class Dataflow:
    """A traced module run on meta tensors, every tensor's dims named, every op read by its rule.
    Nothing is skipped: a node that touches tensors without a rule is a ValueError that names it."""

    def __init__(self, gm, shape):
        self.gm, self.idx, self.dims, self.size_of, self.shape_of = gm, Indices(), {}, {}, {}
        self.ops, self.params, self.values, self.module, self.no_data = [], {}, {}, {}, []
        device = next(gm.parameters(), torch.empty(0, device="meta")).device

        class Read(fx.Interpreter):
            def run_node(run, node):
                value = super().run_node(node)
                self._read(node, value)
                return value

        Read(gm).run(torch.empty(shape, device=device, requires_grad=True))
        self.dims = {v: [self.idx.expand(d) for d in dims] for v, dims in self.dims.items()}
        self.factors = {v: {f for d in dims for f in d} for v, dims in self.dims.items()}
        self.ops = [op._replace(whole={f for d in op.whole for f in self.idx.expand(d)}) for op in self.ops]
        self.last_read = {v: k for k, op in enumerate(self.ops) for v in op.inputs} | {self.output: len(self.ops)}
        born = {v: k for k, op in reversed(list(enumerate(self.ops))) for v in [op.name, *op.inputs]}
        # live[k]: the tensors made or read before op k that are read again from op k on
        self.live = [[v for v in self.last_read if born[v] < k <= self.last_read[v]] for k in range(len(self.ops) + 1)]
        tensors = {v: t for v, t in self.values.items() if torch.is_tensor(t)}
        self.numel = {v: t.numel() for v, t in tensors.items()}
        self.needs_grad = {v: t.requires_grad for v, t in tensors.items()}
        bases = {v: t if t._base is None else t._base for v, t in tensors.items()}
        self.storage = {v: (id(base), base.numel() * BYTES) for v, base in bases.items()}  # views share one
        self.weights = [op.inputs[1] for op in self.ops if op.kind == "linear" and op.inputs[1] in self.params]
        self.memo = {}

    @classmethod
    def of_block(cls, cfg, seq, batch):
        return cls(trace_block(cfg), (seq, batch, cfg.n_embd))

    def _read(self, node, value):
        self.values[node.name] = value
        if node.op == "placeholder":
            self.x = node.name
            self.dims[node.name] = [self.idx.new(n, s) for n, s in zip(BLOCK_INPUT, value.shape, strict=True)]
        elif node.op == "output":
            self.output = node.args[0].name
        elif node.op == "get_attr":
            self.params[node.name] = node.target.removeprefix("block.")
            self.module[node.name] = self.params[node.name].rpartition(".")[0]
        elif not torch.is_tensor(value):  # sizes, devices, dtypes: no data to split
            self.no_data.append(node.name)
            if node.target is getattr and node.args[1] in ("shape", "device", "dtype"):
                self.shape_of[node.name] = node.args[0].name
            elif node.target is operator.getitem and node.args[0].name in self.shape_of:
                self.size_of[node.name] = self.dims[self.shape_of[node.args[0].name]][node.args[1]]
            elif node.target not in SIZES or any(torch.is_tensor(self.values[a.name]) for a in node.all_input_nodes):
                raise ValueError(f"no sharding rule for {_op_name(node.target)} (node {node.name})")
        else:
            rule = next((r for targets, r, *_ in RULES if node.target in targets and node.op != "call_module"), None)
            if rule is None:
                name = type(self.gm.get_submodule(node.target)).__name__ if node.op == "call_module" else \
                    _op_name(node.target)
                known = ", ".join(_op_name(t) for targets, *_ in RULES for t in targets)
                raise ValueError(f"no sharding rule for {name} (node {node.name}); autoshard has rules for {known}")
            inputs, self.dims[node.name], whole, saves = rule(self, node)
            stack = list(node.meta.get("nn_module_stack", {}).values())
            self.module[node.name] = stack[-1][0].partition("block.")[2] if stack else ""
            self.ops.append(Op(node.name, _op_name(node.target), [a.name for a in inputs], whole, saves,
                               self.module[node.name]))

    def options(self, op, t):
        """The indices op can be split along at size t, and None (not split): divisible by t, not
        needed whole, and in no operand twice (scores[n, T, T] cannot be split along T)."""
        if (op.name, t) not in self.memo:
            counts = [[f for d in self.dims[v] for f in d] for v in op.inputs + [op.name]]
            found = sorted({f for c in counts for f in c}, key=list(self.idx.size).index)
            self.memo[op.name, t] = [None] + [f for f in found if self.idx.size[f] % t == 0 and f not in op.whole
                                              and all(c.count(f) <= 1 for c in counts)]
        return self.memo[op.name, t]


def cached(fn):
    """fn(df, *key) computed once per Dataflow: the search asks the same questions many times."""
    def once(df, *key):
        if (fn, key) not in df.memo:
            df.memo[fn, key] = fn(df, *key)
        return df.memo[fn, key]
    return once


# ----------------------------------------------------------------------------------------------
# 4. moves: a tensor placed `src` read placed `dst`; its gradient comes back the other way
#
# N is the whole tensor's bytes. Under the ring algorithm a rank sends 2(t-1)/t N for an all-reduce,
# (t-1)/t N for an all-gather or a reduce-scatter (Korthikanti et al. 2022, section 4.2.2).


def move(src, dst):
    """The collectives that turn a tensor placed src into one placed dst."""
    if src == dst or src == "R":
        return ()  # R -> S(i): each rank keeps its slice
    if src == "P":
        return ("all-reduce",) if dst == "R" else ("reduce-scatter",)
    return ("all-gather",)  # S(i) -> R; S(i) -> S(j) gathers, then slices


def gradient_placement(p):
    """A tensor's gradient is placed like it, except that a partial sum's gradient is whole."""
    return p if p[0] == "S" else "R"


PAPER = {((), ("all-reduce",)): "f", (("all-reduce",), ()): "f̄", (("all-gather",), ("reduce-scatter",)): "g",
         (("reduce-scatter",), ("all-gather",)): "ḡ", ((), ("all-gather",)): "split",
         (("all-gather",), ()): "gather", (("all-gather",), ("all-gather",)): "reshard"}
Collective = namedtuple("Collective", "name value src dst forward backward nbytes module")


def ring_units(c):
    """Collective c's bytes, forward and backward, in units of (t-1)/t: an integer, so equal plans tie."""
    return sum(2 if op == "all-reduce" else 1 for op in c.forward + c.backward) * c.nbytes


@cached
def collectives(df, v, p, reads):
    """What serves every read of tensor v placed p: forward, p into each placement it is read in (one
    gather serves all its readers); backward, their summed gradient into p's gradient placement."""
    by_dst = {}
    for q, grad, regather, module in reads:
        g0, n, first = by_dst.get(q, (grad, 0, module))
        by_dst[q] = ("P" if "P" in (g0, grad) else grad, n + regather, first)  # R + P sum to P, locally
    found = []
    for q, (grad, regathers, module) in by_dst.items():
        forward = move(p, q)
        backward = move(grad, gradient_placement(p)) if df.needs_grad[v] else ()
        if forward or backward:
            where = df.module[v] if v in df.params or p == "P" else module  # P leaves the op that made it
            name = PAPER.get((forward, backward), f"{'+'.join(forward) or '-'} / {'+'.join(backward) or '-'}")
            split = next((x[2:-1] for x in (q, p) if x[0] == "S"), BLOCK_INPUT[0])
            name += f"({split})" * (name in ("g", "ḡ") and split != BLOCK_INPUT[0])  # the paper's are along T
            found.append(Collective(name, v, p, q, forward,
                                    backward + ("all-gather",) * regathers, df.numel[v] * BYTES, where))
    return found


# ----------------------------------------------------------------------------------------------
# 5. placing: every op's split under a plan, at least bytes


@cached
def _step(df, k, s, entries):
    """Op k split along s (None: not split), given the (placement, reads so far) of each input.
    Returns the inputs' new entries (None after their last read), the output's placement, the
    collectives of the inputs read for the last time, their ring units, and what the op keeps for
    backward as (storage, placement, whole bytes)."""
    op, new, done, kept = df.ops[k], [], [], []
    for v, (p, reads) in zip(op.inputs, entries):
        q = f"S({s})" if s in df.factors[v] else "R"
        regather = REGATHER and op.kind == "linear" and v == op.inputs[0] and p[0] == "S" and q == "R"
        reads += ((q, q if q != "R" else "P" if s else "R", regather, op.module),)  # read whole by a split op: P
        if ("in", v) in op.saves:  # the version it reads, or under REGATHER the shard it was gathered from
            kept.append(((df.storage[v], p), p, df.storage[v][1]) if regather or q == p
                        else ((v, q), q, df.numel[v] * BYTES))
        done += collectives(df, v, p, reads) if df.last_read[v] == k else []
        new.append(None if df.last_read[v] == k else (p, reads))
    out = "R" if s is None else f"S({s})" if s in df.factors[op.name] else "P"  # P: s was summed over
    for i, (what, *dims) in enumerate(op.saves):
        if what == "out":
            kept.append(((df.storage[op.name], out), out, df.storage[op.name][1]))
        elif what == "new":  # made inside the op (LayerNorm's statistics), split with it if it can be
            factors = [f for d in dims[0] for f in df.idx.expand(d)]
            kept.append(((op.name, i), f"S({s})" if s in factors else "R",
                         math.prod(df.idx.size[f] for f in factors) * BYTES))
    return tuple(new), out, done, sum(map(ring_units, done)), kept


def _walk(df, plan, k, s, live):
    """Op k split along s applied to `live`, {tensor: (placement, reads)} of df.live[k] (a leaf read for
    the first time is placed by the plan). Returns the state after it: entries in df.live[k + 1]'s order."""
    live, op = dict(live), df.ops[k]
    new, out, done, cost, kept = _step(df, k, s, tuple(live.pop(v, None) or (plan[v], ()) for v in op.inputs))
    live.update((v, entry) for v, entry in zip(op.inputs, new) if entry)
    live[op.name] = (out, ())
    return tuple(live[v] for v in df.live[k + 1]), done, cost, kept


def _choices(df, plan, t, k, live, weights_stay):
    """The splits op k may take. With weights_stay, a split weight is read only in its own split (never
    gathered whole). A view (getitem, transpose, rearrange) moves no data and keeps none: it keeps its
    input's split (or none, if that index is gone) and leaves any move to its readers, where it costs
    the same bytes or fewer. That keeps the search small."""
    op, options = df.ops[k], df.options(df.ops[k], t)
    if weights_stay:
        splits = {plan[v][2:-1] for v in op.inputs if v in df.params and plan[v] != "R"}
        options = [s for s in options if splits <= {s}]
    if op.kind not in ("getitem", "transpose", "rearrange"):
        return options
    p = (live.get(op.inputs[0]) or (plan[op.inputs[0]],))[0]
    return options if p == "P" else [p[2:-1] if p != "R" and p[2:-1] in options else None]


def _finish(df, plan, state):
    """The next block reads this block's output placed as the plan places the block's input."""
    p, reads = dict(zip(df.live[-1], state))[df.output]
    b = plan[df.x]
    return collectives(df, df.output, p, reads + ((b, gradient_placement(b), False, "next block"),))


def place(df, plan, t, constraint="none"):
    """Every op's split under `plan` (the placement of the block's input and of every parameter) at
    least ring bytes: a dynamic programme over the ops in graph order whose state is what `_walk`
    keeps, so it is exact, not greedy. Ties go to fewer activation bytes kept (counted op by op).
    Returns {op: split}, or None when no split meets the constraint (CONSTRAINTS)."""
    states = {(): (0, 0, ())}  # state -> (ring units, activation bytes kept x t, splits so far)
    for k, op in enumerate(df.ops):
        following = {}
        for state, (cost, memory, splits) in states.items():
            live = dict(zip(df.live[k], state))
            for s in _choices(df, plan, t, k, live, constraint != "none"):
                key, _, c, kept = _walk(df, plan, k, s, live)
                if constraint == "activations sharded too" and any(p[0] != "S" for _, p, _ in kept):
                    continue
                score = (cost + c, memory + sum(b if p[0] == "S" else b * t for _, p, b in kept))
                if key not in following or score < following[key][:2]:
                    following[key] = (*score, splits + (s,))
        states = following
    finals = [(cost + sum(map(ring_units, _finish(df, plan, state))), memory, splits)
              for state, (cost, memory, splits) in states.items()]
    return dict(zip((op.name for op in df.ops), min(finals, key=lambda f: f[:2])[2])) if finals else None


Placed = namedtuple("Placed", "plan splits placements collectives bytes param_bytes activation_bytes")


def account(df, plan, splits, t):
    """A placed plan: its collectives in graph order, the bytes one rank sends per layer (forward and
    backward, ring), and per rank the parameter bytes and the activation bytes kept for backward
    (each storage once, as nanosp's activation ledger counts them)."""
    state, found, kept, placements = (), [], {}, dict(plan)
    for k, op in enumerate(df.ops):
        state, done, _, saved = _walk(df, plan, k, splits[op.name], dict(zip(df.live[k], state)))
        placements[op.name] = dict(zip(df.live[k + 1], state))[op.name][0]
        found += done
        kept.update({key: nbytes / t if p[0] == "S" else nbytes for key, p, nbytes in saved})
    found += _finish(df, plan, state)
    params = sum(df.numel[v] * BYTES / (t if plan[v][0] == "S" else 1) for v in df.params)
    return Placed(plan, splits, placements, found, sum(map(ring_units, found)) * (t - 1) / t, params,
                  sum(kept.values()))


# ----------------------------------------------------------------------------------------------
# 6. search: every plan, ranked

CONSTRAINTS = {
    "none": "every plan",
    "weights sharded": "every weight split and never gathered whole, so the model fits",
    "activations sharded too": "and every tensor kept for backward split (Table 2's replicated terms)",
}


def plan_choices(df, t):
    """Each linear weight W[o, i]: replicated, column-parallel (split along an index of its output
    features o) or row-parallel (of its inputs i); the activation between blocks: replicated, or
    split along the sequence."""
    choices = {df.x: ["R"] + ["S(T)"] * (df.idx.size["T"] % t == 0)}
    for w in df.weights:
        choices[w] = ["R"] + [f"S({f})" for d in df.dims[w] for f in d if df.idx.size[f] % t == 0]
    return choices


def complete(df, choice):
    """A placement for every leaf: a bias takes its weight's split if it holds that index (column-
    parallel), otherwise it is replicated, as are the LayerNorm parameters."""
    plan = {v: "R" for v in df.params} | choice
    for w, v in itertools.product(df.weights, df.params):
        if df.module[v] == df.module[w] and v != w and choice[w][2:-1] in df.factors[v]:
            plan[v] = choice[w]
    return plan


def label(df, plan, v):
    """How a plan places weight or input v, in Megatron's words: column(a), split along the index a
    of its output features (the index is named when the features have several)."""
    p, f = plan[v], plan[v][2:-1]
    if p == "R" or v == df.x:
        return {"R": "replicated", "S(T)": "sequence"}.get(p, p)
    out, inp = df.dims[v]
    return "column" + f"({f})" * (len(out) > 1) if f in out else "row" + f"({f})" * (len(inp) > 1)


class Search:
    """Every plan for one nanosp block at tensor-parallel size t, placed and ranked."""

    def __init__(self, cfg, seq, batch, t):
        if not (isinstance(t, int) and t >= 1):
            raise ValueError(f"the tensor-parallel size t={t!r} must be a positive int")
        cfg.check_tensor_parallel(t)
        start, cpu = time.perf_counter(), time.process_time()
        self.cfg, self.t, self.shape = cfg, t, (seq, batch, cfg.n_embd, cfg.n_head)
        self.df = Dataflow.of_block(cfg, seq, batch)
        self.choices = plan_choices(self.df, t)
        self.placed = {name: [] for name in CONSTRAINTS}
        for combo in itertools.product(*self.choices.values()):
            plan = complete(self.df, dict(zip(self.choices, combo)))
            for constraint in CONSTRAINTS:  # each narrows the one before: stop at the first unmet
                if constraint != "none" and "R" in (plan[w] for w in self.df.weights):
                    break
                placed = self.evaluate(plan, constraint)
                if placed is None:
                    break
                self.placed[constraint].append(placed)
        for results in self.placed.values():
            results.sort(key=lambda r: (r.bytes, r.param_bytes + r.activation_bytes))
        self.plans, self.seconds = len(self.placed["none"]), time.perf_counter() - start
        self.cpu_seconds = time.process_time() - cpu

    def evaluate(self, plan, constraint="none"):
        """The plan placed at least bytes under the constraint, or None if it cannot meet it."""
        splits = place(self.df, plan, self.t, constraint)
        return None if splits is None else account(self.df, plan, splits, self.t)

    def best(self, constraint):
        return self.placed[constraint][0]

    def plan_of(self, **labels):
        """Megatron's plan with some weights placed otherwise, e.g. plan_of(c_fc="row")."""
        choice = {v: self.best("weights sharded").plan[v] for v in self.choices}
        for short, want in labels.items():
            v = next(w for w in self.df.weights if self.df.module[w].endswith(short))
            choice[v] = next(p for p in self.choices[v] if label(self.df, {v: p}, v) == want)
        return complete(self.df, choice)


# ----------------------------------------------------------------------------------------------
# 7. nanosp: where it writes each collective by hand, and what its ledger counts

NANOSP_HELPERS = {"f": "f", "f̄": "f_bar", "g": "LinearWithSequenceGather", "ḡ": "g_bar"}  # nanosp fuses g


def nanosp_line(function, helper):
    """(function, line, text) of the first call of `helper` in `function` or in a nanosp function it
    calls: where nanosp.py writes that collective. None if nowhere."""
    called = re.findall(r"(\w+)\(", inspect.getsource(function))
    for fn in [function] + [getattr(nanosp, n) for n in called if inspect.isfunction(getattr(nanosp, n, None))]:
        lines, start = inspect.getsourcelines(fn)
        for i, line in enumerate(lines):
            if re.search(rf"\b{helper}(\.apply)?\(", line):
                return fn.__qualname__, start + i, line.strip()
    return None


def where_in_nanosp(df, c):
    """The line of nanosp.py that holds placed collective c (None for a move nanosp never makes)."""
    if c.name not in NANOSP_HELPERS:
        return None
    if c.value in df.params:  # nanosp reads all the replicated parameters through one f
        return nanosp_line(nanosp.replicated_through_f, "CopyToTensorParallelRegion")
    module = df.gm.meta["root"].get_submodule("block" + f".{c.module}" * bool(c.module))
    return nanosp_line(type(module).forward, NANOSP_HELPERS[c.name])


def fake_group(t):
    """A process group of size t on the "fake" backend: exact shapes and bytes, no other processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=64)
    if t > dist.get_world_size():
        raise ValueError(f"t={t} is larger than the fake world of {dist.get_world_size()} ranks")
    return dist.new_group(list(range(t)))


def nanosp_ledger(cfg, seq, batch, t, sequence_parallel):
    """nanosp's communication ledger for one layer at size t, on meta tensors: its messages as sorted
    (phase, op, message bytes), and the ring bytes one rank sends."""
    cfg = dataclasses.replace(cfg, sequence_parallel=sequence_parallel)
    log = measure_communication(cfg, fake_group(t), batch, seq, torch.bfloat16, device="meta")
    return (sorted((phase, op, nbytes) for phase, _, op, nbytes in log),
            sum(ring_bytes_sent(op, nbytes, t) for _, _, op, nbytes in log))


def messages(df, placed):
    """A placed plan's collectives as nanosp's ledger lists them: sorted (phase, op, message bytes).
    The gradients of the replicated parameters (each an f) are summed in one all-reduce of one flat
    buffer, as nanosp's replicated_through_f does: the same ring bytes, fewer messages."""
    bucket = [c for c in placed.collectives if c.value in df.params and c.name == "f"]
    rest = [c for c in placed.collectives if c not in bucket]
    return sorted([("forward", op, c.nbytes) for c in rest for op in c.forward]
                  + [("backward", op, c.nbytes) for c in rest for op in c.backward]
                  + [("backward", "all-reduce", sum(c.nbytes for c in bucket))] * bool(bucket))


# ----------------------------------------------------------------------------------------------
# python autoshard.py


def table(headers, rows):
    print("| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def summary(df, placed):
    """A plan's collectives in the paper's letters, in graph order; those on parameters counted."""
    acts = [c.name for c in placed.collectives if c.value not in df.params]
    params = [c.name for c in placed.collectives if c.value in df.params]
    on_params = [f"{n}×{params.count(n)} on parameters" for n in dict.fromkeys(params)]
    return ", ".join([" ".join(acts)] * bool(acts) + on_params) or "-"


def print_rules():
    print("\nAn op split along index i reads each input that holds i as S(i) and the others whole (R); its output "
          "is S(i) if it holds i, P if i was summed over. An input read whole by a split op gets a partial gradient "
          "(P). No op reads a P: it is reduced first.\n")
    table(["op", "indices", "cannot split", "keeps for backward"],
          [(", ".join(map(_op_name, targets)), *text) for targets, _, *text in RULES])
    print("\nMoves: a tensor placed `from` read placed `to`; the gradient comes back. Bytes one rank sends, N the "
          "whole tensor's bytes.\n")
    rows = []
    for src, dst, reader in [("R", "R", "split"), ("P", "R", "any"), ("S(i)", "R", "split"), ("P", "S(i)", "any"),
                             ("R", "S(i)", "any"), ("S(i)", "R", "not split"), ("S(i)", "S(j)", "any")]:
        grad = dst if dst != "R" else "P" if reader == "split" else "R"
        forward, backward = move(src, dst), move(grad, gradient_placement(src))
        units = ring_units(Collective("", "", src, dst, forward, backward, 1, ""))
        name = PAPER.get((forward, backward), "")
        rows.append((f"{src} -> {dst}", reader, " + ".join(forward) or "- (local)",
                     f"{grad} -> {gradient_placement(src)}: {' + '.join(backward) or '-'}", f"{units} (t-1)/t N",
                     name + " (i = T)" * (name in ("g", "ḡ"))))
    table(["move", "reader split", "forward", "backward", "ring bytes", "name"], rows)


def print_search(search, top):
    df, mib = search.df, lambda x: f"{x / 2**20:,.2f}"
    for constraint, text in CONSTRAINTS.items():
        print(f"\n#### {constraint}: {text} ({len(search.placed[constraint])} plans)\n")
        table(["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "between blocks", "collectives", "MiB sent",
               "params MiB", "activations MiB"],
              [[label(df, r.plan, v) for v in df.weights + [df.x]]
               + [summary(df, r), mib(r.bytes), mib(r.param_bytes), mib(r.activation_bytes)]
               for r in search.placed[constraint][:top]])


def print_placement(search, constraint, title, sequence_parallel):
    df, best = search.df, search.best(constraint)
    print(f"\n#### {title}: the cheapest plan with {constraint}, against nanosp.py\n")
    bucket = [c for c in best.collectives if c.value in df.params and c.name == "f"]
    rows = []
    for c in [c for c in best.collectives if c not in bucket[1:]]:
        at = where_in_nanosp(df, c)
        dims = " ".join(d[0] if len(d) == 1 else f"({' '.join(d)})" for d in df.dims[c.value])
        tensor, module, nbytes = f"{df.params.get(c.value, c.value)} ({dims})", c.module or "Block", c.nbytes
        if c in bucket:  # one all-reduce of one flat buffer, as nanosp sums them
            tensor, module = ", ".join(df.params[b.value] for b in bucket), "the replicated parameters"
            nbytes = sum(b.nbytes for b in bucket)
        rows.append((c.name, tensor, module, f"{c.src} -> {c.dst}", " + ".join(c.forward) or "-",
                     " + ".join(c.backward) or "-", f"{nbytes:,}", f"{at[1]} {at[0]}: `{at[2]}`" if at else "-"))
    table(["", "tensor", "in", "placement", "forward", "backward", "message bytes", "nanosp.py"], rows)
    log, ring = nanosp_ledger(search.cfg, *search.shape[:2], search.t, sequence_parallel)
    verdict = "equal" if log == messages(df, best) and ring == best.bytes else "DIFFERENT"
    print(f"\nBytes one rank sends per layer: {best.bytes:,.0f} placed here, {ring:,.0f} counted by nanosp's "
          f"communication ledger (sequence_parallel={sequence_parallel}); message by message: {verdict}.")


def main():
    parser = argparse.ArgumentParser(description="Search the shardings of one nanosp block (GPT-3 Medium's shape).")
    for name, default in [("seq", 2048), ("batch", 1), ("hidden", 1024), ("heads", 16), ("tp", 8), ("top", 5)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    cfg = nanosp.GPTConfig(block_size=args.seq, n_layer=1, n_head=args.heads, n_embd=args.hidden)
    try:
        search = Search(cfg, args.seq, args.batch, args.tp)
    except ValueError as e:
        parser.error(str(e))
    kinds = [op.kind for op in search.df.ops]
    print(f"### autoshard: one nanosp Block, s={args.seq} b={args.batch} h={args.hidden} a={args.heads} t={args.tp}, "
          f"16-bit\n\ntorch.fx traced {len(search.df.gm.graph.nodes)} nodes; {len(kinds)} tensor ops: "
          + ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) + ".")
    print_rules()
    print(f"\nSearched {search.plans} plans (each weight replicated, or column- or row-parallel along any index t "
          f"divides; the activation between blocks replicated or split along the sequence) in {search.seconds:.1f} s "
          f"({search.cpu_seconds:.1f} s of CPU). "
          f"MiB one rank sends per layer, forward + backward; parameters and kept activations per rank.")
    print_search(search, args.top)
    print_placement(search, "weights sharded", "Megatron-LM", sequence_parallel=False)
    print_placement(search, "activations sharded too", "Sequence parallelism", sequence_parallel=True)
    megatron, worse = search.best("weights sharded"), search.evaluate(search.plan_of(c_fc="row"), "weights sharded")
    print(f"\nA worse plan, Megatron's with a row-parallel c_fc: {summary(search.df, worse)}; {worse.bytes:,.0f} "
          f"bytes, {worse.bytes - megatron.bytes:,.0f} more ({worse.bytes / megatron.bytes:.2f}x).")


if __name__ == "__main__":
    main()
