"""autoshard.py: derive tensor and sequence parallelism from the dataflow of one unsharded block.

nanosp.py writes Megatron's f, f̄ and sequence parallelism's g, ḡ by hand. This file starts from the
unsharded Block (group=None), searches the ways to shard it, and arrives at the same four operators
in the same places, with the same bytes as nanosp's own communication ledger.

1. trace      torch.fx turns Block.forward into a graph of tensor ops (layer_norm, linear, rearrange, bmm, ...)
2. indices    every dimension of every tensor gets a name, einsum-style (T, B, C; three a d from rearrange)
3. rules      a tensor is R (replicated), S(i) (split along index i) or P (partial sums); an op split
              along i reads inputs holding i as S(i) and the others whole; each rule says what it cannot
              split and what it saves for backward (RULES)
4. moves      a tensor read in another placement than it has is moved by a collective, priced forward
              and backward under the ring algorithm; four of the pairs are the paper's f, f̄, g, ḡ
5. placing    a plan fixes the weights and the activation between blocks; an exact dynamic programme
              over the graph splits every other op at least bytes
6. search     every plan, ranked by bytes per layer, with parameter and activation bytes per rank
7. nanosp     the lines of nanosp.py that hold each placed collective, and its communication ledger

    python autoshard.py              # the rules, the search's table, the two winners against nanosp.py
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

try:  # the measuring instruments live in their own module on newer nanosp
    from ledgers import measure_communication, measure_activation_bytes, ring_bytes_sent
except ImportError:
    from nanosp import measure_communication, measure_activation_bytes, ring_bytes_sent

BYTES = 2  # 16-bit activations and weights, as in the paper's accounting
BLOCK_INPUT = ("T", "B", "C")  # nanosp lays activations out sequence first
REGATHER = True  # nanosp's choice: a linear fed by a gather keeps only its shard, gathers it again in backward


# ----------------------------------------------------------------------------------------------
# 1. trace


def call_block(block, x):
    """The one place that knows Block's forward signature: no dropout, nanosp's plain-PyTorch ops."""
    return block(x, None, None)


class _Root(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return call_block(self.block, x)


def trace_block(cfg, device="meta"):
    """fx graph of one unsharded nanosp Block (group=None); einops' rearrange stays one node.
    On the meta device nothing is computed: shapes only, at any size."""
    cfg = dataclasses.replace(cfg, dropout=0.0, recompute="none", sequence_parallel=False)
    with torch.device(device):
        root = _Root(nanosp.Block(cfg, None, layer=0))
    gm = fx.GraphModule(root, fx.Tracer(autowrap_functions=(rearrange,)).trace(root))
    gm.meta["root"] = root  # the GraphModule keeps parameters, not the classes that own them
    return gm


# ----------------------------------------------------------------------------------------------
# 2. indices: a name for every dimension


class Indices:
    """Index names, einsum-style. A dimension is a tuple of factors: one name, or several where a
    rearrange spells them out, e.g. (three, a, d) for the fused q, k, v features. Ops unify the names
    they share: the residual add makes c_proj's output features the same index C as the input's."""

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
            a, b = b, a  # a: the single, newer name, renamed to b
        if len(a) > 1 or self.size[a[0]] != math.prod(self.size[f] for f in b):
            raise ValueError(f"{where}: dimensions {a} and {b} cannot be the same index")
        self.alias[a[0]] = b


# ----------------------------------------------------------------------------------------------
# 3. rules: each op as an einsum over named indices


def _dims(df, node, dims):
    """The dimensions of node (an input), naming them `dims` if nothing named them yet (a parameter)."""
    if node.name not in df.dims:
        df.dims[node.name] = list(dims)
    for mine, theirs in zip(df.dims[node.name], dims):
        df.idx.unify(mine, theirs, node.name)
    return df.dims[node.name]


def _elementwise(df, node, saves=()):
    tensors = [a for a in node.args if isinstance(a, fx.Node) and torch.is_tensor(df.values[a.name])]
    shape = df.values[node.name].shape
    out = [None] * len(shape)
    for a in sorted(tensors, key=lambda a: a.name not in df.dims):  # named inputs first, then parameters
        mine = df.values[a.name].shape
        dims = [out[k - len(mine)] if mine[k] == shape[k - len(mine)] else df.idx.new("1", 1)
                for k in range(len(mine))]  # aligned from the right; a size-1 dimension broadcasts
        dims = [d or df.idx.new(f"{node.name}.{k}", mine[k]) for k, d in enumerate(dims)]
        for k, d in enumerate(_dims(df, a, dims)):
            if mine[k] == shape[k - len(mine)]:
                out[k - len(mine)] = d
    return tensors, out, [], saves if saves != "operands" else [("in", a.name) for a in tensors[:2] if len(tensors) == 2]


def _layer_norm(df, node):
    x, k = node.args[0], len(node.args[1])
    dims = df.dims[x.name]
    params = [p for p in (node.kwargs.get("weight"), node.kwargs.get("bias")) if p is not None]
    for p in params:
        _dims(df, p, dims[-k:])
    return [x, *params], dims, dims[-k:], [("in", x.name), ("new", dims[:-k]), ("new", dims[:-k])]


def _linear(df, node):
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    dims = df.dims[x.name]
    out = df.dims.get(w.name, [df.idx.new(df.params.get(w.name, w.name).removesuffix(".weight"),
                                          df.values[w.name].shape[0])])[0]
    _dims(df, w, [out, dims[-1]])
    if bias is not None:
        _dims(df, bias, [out])
    return [a for a in (x, w, bias) if a is not None], dims[:-1] + [out], [], [("in", x.name)]


def _bmm(df, node):
    a, b = node.args
    (n, i, k), (n2, k2, j) = df.dims[a.name], df.dims[b.name]
    df.idx.unify(n, n2, node.name)
    df.idx.unify(k, k2, node.name)
    return [a, b], [n, i, j], [], [("in", a.name), ("in", b.name)]


def _groups(side):
    return [g.split() if g else [n] for g, n in re.findall(r"\(([^)]*)\)|(\S+)", side)]


def _rearrange(df, node):
    x, pattern = node.args
    sizes = {k: df.values[v.name] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    lhs, rhs = (_groups(side) for side in pattern.split("->"))
    names = {}
    for group, dim, size in zip(lhs, df.dims[x.name], df.values[x.name].shape, strict=True):
        factors = df.idx.expand(dim)
        if len(group) != len(factors):  # a dimension spelled out for the first time: new indices
            known = math.prod(sizes[n] for n in group if n in sizes)
            factors = tuple(df.idx.new(n, sizes.get(n, size // known))[0] for n in group)
            df.idx.unify(dim, factors, node.name)
        names.update(zip(group, factors))
    return [x], [tuple(names[n] for n in group) for group in rhs], [], []


def _getitem(df, node):
    x, index = node.args
    if not isinstance(index, int):
        raise ValueError(f"no sharding rule for indexing {node.name} with {index!r}: only an int index has one")
    dims = df.dims[x.name]
    return [x], dims[1:], dims[:1], []


def _transpose(df, node):
    x, i, j = node.args
    dims = list(df.dims[x.name])
    dims[i], dims[j] = dims[j], dims[i]
    return [x], dims, [], []


def _full(df, node):
    dims = [df.size_of[n.name] if isinstance(n, fx.Node) else df.idx.new("n", n) for n in node.args[0]]
    return [], dims, [], []


def _softmax(df, node):
    x = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return [x], df.dims[x.name], [df.dims[x.name][dim]], [("out",)]


def _triu(df, node):
    tensors, out, _, _ = _elementwise(df, node)
    return tensors, out, out[-2:], []


# op: its rule, the index law it states, what it cannot split, what it keeps for backward
RULES = [
    ((F.layer_norm,), _layer_norm, "x[..., c] w[c] b[c] -> y[..., c]", "c (normalised)", "x; mean, 1/std per row"),
    ((F.linear,), _linear, "x[..., i] W[o, i] b[o] -> y[..., o]", "-", "x"),
    ((torch.bmm,), _bmm, "x[n, i, k] y[n, k, j] -> z[n, i, j]", "-", "x, y"),
    ((F.softmax,), _softmax, "x[..., j] -> y[..., j]", "j (normalised)", "y"),
    ((F.gelu,), lambda df, n: _elementwise(df, n, [("in", n.args[0].name)]), "x[...] -> y[...]", "-", "x"),
    ((operator.add, operator.sub, operator.truediv), _elementwise, "broadcast: dims aligned from the right",
     "-", "-"),
    ((operator.mul,), lambda df, n: _elementwise(df, n, "operands"), "broadcast: dims aligned from the right",
     "-", "both operands if tensors"),
    ((rearrange,), _rearrange, "its pattern: T B (three a d) -> three (a B) T d", "-", "-"),
    ((operator.getitem,), _getitem, "x[k, ...] at an int -> y[...]", "k", "-"),
    (("transpose",), _transpose, "x[.., i, .., j] -> y[.., j, .., i]", "-", "-"),
    (("triu",), _triu, "x[..., i, j] -> y[..., i, j]", "i, j (by position)", "-"),
    ((torch.full,), _full, "sizes -> y[i, j]: made on each rank, any placement", "-", "-"),
]
SIZE_ARITHMETIC = (operator.mul, operator.truediv, operator.floordiv, operator.add, operator.sub, math.sqrt)


def _op_name(target):
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


Op = namedtuple("Op", "name kind inputs whole saves module")


class Dataflow:
    """A traced block: every tensor's dimensions named, every op read by its rule. Nothing is skipped:
    a node that handles tensors without a rule is a ValueError that names it."""

    def __init__(self, gm, shape):
        self.gm, self.idx, self.dims, self.size_of, self.shape_of = gm, Indices(), {}, {}, {}
        self.ops, self.params, self.values, self.module, self.no_data = [], {}, {}, {}, []
        interpreter = fx.Interpreter(gm)
        device = next(gm.parameters(), torch.empty(0, device="meta")).device  # meta: shapes only
        x = torch.empty(shape, device=device, requires_grad=True)
        env = iter([x])
        for node in gm.graph.nodes:  # run node by node, reading each as it is computed
            if node.op == "placeholder":
                value = next(env)
            elif node.op == "output":
                self.output = node.args[0].name
                continue
            else:
                args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
                value = getattr(interpreter, node.op)(node.target, args, kwargs)
            interpreter.env[node] = self.values[node.name] = value
            self._read(node, value)
        self.dims = {v: [self.idx.expand(d) for d in dims] for v, dims in self.dims.items()}
        self.factors = {v: {f for d in dims for f in d} for v, dims in self.dims.items()}
        self.ops = [op._replace(whole={f for d in op.whole for f in self.idx.expand(d)}) for op in self.ops]
        self.last_read = {v: k for k, op in enumerate(self.ops) for v in op.inputs}
        self.last_read[self.output] = len(self.ops)
        born = {op.name: k for k, op in enumerate(self.ops)}
        for k, op in enumerate(self.ops):
            for v in op.inputs:
                born.setdefault(v, k)  # a leaf (input, parameter) enters at its first read
        self.live = [[v for v in self.last_read if born[v] < k <= self.last_read[v]] for k in range(len(self.ops) + 1)]
        # where op k finds its inputs in the state (-1: a leaf read for the first time, from the plan),
        # and where each tensor live after it comes from: (0, slot) before, (1, i) its input i, (2, 0) its output
        self.slots = [[self.live[k].index(v) if v in self.live[k] else -1 for v in op.inputs]
                      for k, op in enumerate(self.ops)]
        self.recipe = [[(2, 0) if v == op.name else (1, op.inputs.index(v)) if v in op.inputs
                        else (0, self.live[k].index(v)) for v in self.live[k + 1]] for k, op in enumerate(self.ops)]
        self.numel = {v: t.numel() for v, t in self.values.items() if torch.is_tensor(t)}
        self.needs_grad = {v: t.requires_grad for v, t in self.values.items() if torch.is_tensor(t)}
        bases = {v: t if t._base is None else t._base for v, t in self.values.items() if torch.is_tensor(t)}
        self.storage = {v: (id(base), base.numel() * BYTES) for v, base in bases.items()}  # views share one
        self.weights = [op.inputs[1] for op in self.ops if op.kind == "linear" and op.inputs[1] in self.params]
        self._options, self.memo = {}, {}

    @classmethod
    def of_block(cls, cfg, seq, batch):
        return cls(trace_block(cfg), (seq, batch, cfg.n_embd))

    def _read(self, node, value):
        if node.op == "placeholder":
            self.x = node.name
            self.dims[node.name] = [self.idx.new(n, s) for n, s in zip(BLOCK_INPUT, value.shape, strict=True)]
        elif node.op == "get_attr":
            self.params[node.name] = node.target.removeprefix("block.")
            self.module[node.name] = node.target.removeprefix("block.").rsplit(".", 1)[0]
        elif not torch.is_tensor(value):  # sizes, devices, dtypes: no data to shard
            self.no_data.append(node.name)
            if node.target is getattr and node.args[1] in ("shape", "device", "dtype"):
                self.shape_of[node.name] = node.args[0].name
            elif node.target is operator.getitem and node.args[0].name in self.shape_of:
                self.size_of[node.name] = self.dims[self.shape_of[node.args[0].name]][node.args[1]]
            elif node.target not in SIZE_ARITHMETIC or any(torch.is_tensor(self.values[a.name])
                                                              for a in node.all_input_nodes):
                raise ValueError(f"no sharding rule for {_op_name(node.target)} (node {node.name})")
        else:
            rule = next((r for targets, r, *_ in RULES if node.target in targets and node.op != "call_module"), None)
            if rule is None:
                known = ", ".join(_op_name(t) for targets, *_ in RULES for t in targets)
                name = type(self.gm.get_submodule(node.target)).__name__ if node.op == "call_module" else _op_name(node.target)
                raise ValueError(f"no sharding rule for {name} (node {node.name}); "
                                 f"autoshard has rules for {known}")
            inputs, out, whole, saves = rule(self, node)
            self.dims[node.name] = out
            stack = list(node.meta.get("nn_module_stack", {}).values())
            self.module[node.name] = stack[-1][0].partition("block.")[2] if stack else ""
            self.ops.append(Op(node.name, _op_name(node.target), [a.name for a in inputs], whole, saves,
                               self.module[node.name]))

    def options(self, op, t):
        """The indices op can be split along at size t (None: not split): divisible by t, not one it
        needs whole, and in no operand twice (scores[n, T, T] cannot be split along T)."""
        if (op.name, t) not in self._options:
            tensors = [self.dims[v] for v in op.inputs] + [self.dims[op.name]]
            counts = [[f for d in dims for f in d] for dims in tensors]
            found = sorted({f for c in counts for f in c}, key=list(self.idx.size).index)
            self._options[op.name, t] = [None] + [
                f for f in found if self.idx.size[f] % t == 0 and f not in op.whole
                and all(c.count(f) <= 1 for c in counts)]
        return self._options[op.name, t]


# ----------------------------------------------------------------------------------------------
# 4. moves: the collectives between placements
#
# A rank holding a tensor placed `src` that must read it placed `dst`; the gradient comes back the
# other way. N is the whole tensor's bytes; under the ring algorithm a rank sends 2(t-1)/t N for an
# all-reduce and (t-1)/t N for an all-gather or a reduce-scatter.


def move(src, dst):
    """The collectives that turn a tensor placed src into one placed dst (R, P or S(i))."""
    if src == dst or src == "R":
        return ()  # R -> S(i) is a local slice
    if dst == "R":
        return ("all-reduce",) if src == "P" else ("all-gather",)
    return ("reduce-scatter",) if src == "P" else ("all-gather",)  # S(i) -> S(j): gather, then slice


def gradient_placement(p):
    """A tensor's gradient has its placement, except that a partial sum's gradient is whole (R)."""
    return p if p[0] == "S" else "R"


PAPER = {((), ("all-reduce",)): "f", (("all-reduce",), ()): "f̄",
         (("all-gather",), ("reduce-scatter",)): "g", (("reduce-scatter",), ("all-gather",)): "ḡ",
         ((), ("all-gather",)): "split", (("all-gather",), ()): "gather", (("all-gather",), ("all-gather",)): "reshard"}

Collective = namedtuple("Collective", "name value src dst forward backward nbytes module")


def ring_units(c):
    """Collective c's bytes, forward and backward, in units of (t-1)/t: an integer, so that equal
    plans compare equal."""
    return sum(2 if op == "all-reduce" else 1 for op in c.forward + c.backward) * c.nbytes


def ring_bytes(c, t):
    """Bytes one rank sends for collective c, forward and backward, under the ring algorithm."""
    return ring_units(c) * (t - 1) / t


def collectives(df, v, p, reads):
    """What serves every read of tensor v placed p: forward, p into each placement it is read in;
    backward, the summed gradient of those reads back into p's gradient placement."""
    if (v, p, reads) not in df.memo:  # the search asks the same question many times
        df.memo[v, p, reads] = _collectives(df, v, p, reads)
    return df.memo[v, p, reads]


def _collectives(df, v, p, reads):
    by_dst = {}
    for q, grad, regather, module in reads:
        if q in by_dst:  # one gather serves every reader; R + P gradients sum to P for free
            g0, n, first = by_dst[q]
            by_dst[q] = ("P" if "P" in (g0, grad) else grad, n + regather, first)
        else:
            by_dst[q] = (grad, int(regather), module)
    found = []
    for q, (grad, regathers, module) in by_dst.items():
        forward = move(p, q)
        backward = move(grad, gradient_placement(p)) if df.needs_grad[v] else ()
        if forward or backward:
            name = PAPER.get((forward, backward), f"{'+'.join(forward) or 'id'} / {'+'.join(backward) or 'id'}")
            where = df.module[v] if v in df.params or p == "P" else module  # a P leaves its producer
            found.append(Collective(name, v, p, q, forward, backward + ("all-gather",) * regathers,
                                    df.numel[v] * BYTES, where))
    return found


# ----------------------------------------------------------------------------------------------
# 5. placing: every op's split under a plan, at least bytes


def _step(df, t, k, s, entries):
    """Op k split along s (None: not split), given the placement and reads so far of each of its
    inputs. Returns their new entries (None after the last read), its output's placement, the
    collectives of the inputs it reads last with their ring bytes, and what it keeps for backward
    as (storage, placement, whole bytes). Pure, so the search asks it each question once."""
    if (t, k, s, entries) not in df.memo:
        df.memo[t, k, s, entries] = _read_op(df, t, k, s, entries)
    return df.memo[t, k, s, entries]


def _read_op(df, t, k, s, entries):
    op, new, done, kept = df.ops[k], [], [], []
    for v, (p, reads) in zip(op.inputs, entries):
        q = f"S({s})" if s in df.factors[v] else "R"
        regather = REGATHER and op.kind == "linear" and v == op.inputs[0] and p[0] == "S" and q == "R"
        grad = q if q != "R" else "P" if s else "R"  # read whole by a split op: each rank's part of it
        reads += ((q, grad, regather, op.module),)
        if ("in", v) in op.saves:  # the version it reads, or under REGATHER the shard it came from
            kept.append(((df.storage[v], p), p, df.storage[v][1]) if regather or q == p
                        else ((v, q), q, df.numel[v] * BYTES))
        last = df.last_read[v] == k
        done += collectives(df, v, p, reads) if last else []
        new.append(None if last else (p, reads))
    out = "R" if s is None else f"S({s})" if s in df.factors[op.name] else "P"  # P: s was summed over
    for i, (what, *dims) in enumerate(op.saves):
        if what == "out":
            kept.append(((df.storage[op.name], out), out, df.storage[op.name][1]))
        elif what == "new":  # made inside the op (LayerNorm's statistics): split with the op if it can be
            factors = [f for d in dims[0] for f in df.idx.expand(d)]
            kept.append(((op.name, i), f"S({s})" if s in factors else "R",
                         math.prod(df.idx.size[f] for f in factors) * BYTES))
    return tuple(new), out, done, sum(ring_units(c) for c in done), kept


def _walk(df, plan, t, k, s, state):
    """Op k split along s applied to `state`: the placement and reads so far of every live tensor
    (read before and again later; which ones is fixed by the graph: df.live[k])."""
    op = df.ops[k]
    entries = tuple(state[j] if j >= 0 else (plan[v], ()) for v, j in zip(op.inputs, df.slots[k]))
    new, out, done, cost, kept = _step(df, t, k, s, entries)
    pool = (state, new, ((out, ()),))
    return tuple(pool[a][b] for a, b in df.recipe[k]), done, cost, kept


VIEWS = ("getitem", "transpose", "rearrange")


def _choices(df, plan, t, k, state, weights_stay):
    """The splits op k may take; with weights_stay, only those that read every split parameter in
    its own split (a weight is never gathered whole). A view (getitem, transpose, rearrange) moves no data and keeps none,
    so it keeps its input's split (or none, if the index is gone) and leaves any move to its readers:
    moving its output costs the same bytes as moving its input, or fewer. This keeps the search small."""
    op, options = df.ops[k], df.options(df.ops[k], t)
    if weights_stay:
        split = [plan[v][2:-1] for v in op.inputs if v in df.params and plan[v] != "R"]
        options = [s for s in options if all(s == f for f in split)]
    if op.kind not in VIEWS:
        return options
    j = df.slots[k][0]
    p = state[j][0] if j >= 0 else plan[op.inputs[0]]
    if p == "P":
        return options
    return [p[2:-1] if p != "R" and p[2:-1] in options else None]


def _finish(df, plan, state):
    """The next block reads this block's output in the placement the plan gives the block's input."""
    b = plan[df.x]
    p, reads = state[df.live[-1].index(df.output)]
    return collectives(df, df.output, p, reads + ((b, gradient_placement(b), False, "next block"),))


def place(df, plan, t, constraint="none"):
    """Every op's split under `plan` (placements of the block's input and parameters) at least ring
    bytes: a dynamic programme over the ops in graph order whose state is every live tensor's
    placement and reads, so it is exact, not greedy; the constraint (CONSTRAINTS) narrows the splits. Ties go to the fewer activation bytes kept (counted op by op).
    Returns {op: split}, or None when no split meets the constraint."""
    states = {(): (0, 0, ())}  # state -> (ring units, activation bytes kept times t, splits so far)
    for k, op in enumerate(df.ops):
        following = {}
        for state, (cost, memory, splits) in states.items():
            for s in _choices(df, plan, t, k, state, constraint != "none"):
                key, _, c, kept = _walk(df, plan, t, k, s, state)
                if constraint == "activations sharded too" and any(p[0] != "S" for _, p, _ in kept):
                    continue
                best = (cost + c, memory + sum(b if p[0] == "S" else b * t for _, p, b in kept))
                if key not in following or best < following[key][:2]:
                    following[key] = (*best, splits + (s,))
        states = following
    finals = [(cost + sum(ring_units(c) for c in _finish(df, plan, state)), memory, splits)
              for state, (cost, memory, splits) in states.items()]
    if not finals:
        return None
    return dict(zip((op.name for op in df.ops), min(finals, key=lambda f: f[:2])[2]))


Placed = namedtuple("Placed", "plan splits placements collectives bytes param_bytes activation_bytes")


def account(df, plan, splits, t):
    """A placed plan: its collectives in graph order, ring bytes per rank per layer (forward and
    backward), and bytes per rank of parameters and of the activations kept for backward (each
    storage once; the LayerNorm statistics are the few bytes Table 2 leaves out)."""
    state, found, kept, placements = (), [], {}, dict(plan)
    for k, op in enumerate(df.ops):
        state, done, _, saved = _walk(df, plan, t, k, splits[op.name], state)
        placements[op.name] = state[df.live[k + 1].index(op.name)][0]
        found += done
        kept.update({key: nbytes / t if p[0] == "S" else nbytes for key, p, nbytes in saved})
    found += _finish(df, plan, state)
    params = sum(df.numel[v] * BYTES / (t if plan[v][0] == "S" else 1) for v in df.params)
    return Placed(plan, splits, placements, found, sum(ring_units(c) for c in found) * (t - 1) / t, params,
                  sum(kept.values()))


# ----------------------------------------------------------------------------------------------
# 6. search: every plan, ranked


def plan_choices(df, t):
    """Each linear weight W[o, i]: replicated, column-parallel (split along an index of its output
    features o) or row-parallel (along an index of its input features i); the activation between
    blocks: replicated or split along the sequence."""
    choices = {df.x: ["R"] + ["S(T)"] * (df.idx.size["T"] % t == 0)}
    for w in df.weights:
        choices[w] = ["R"] + [f"S({f})" for d in df.dims[w] for f in d if df.idx.size[f] % t == 0]
    return choices


def complete(df, choice):
    """A plan for every leaf: a bias takes its weight's split when it holds that index (a
    column-parallel bias), otherwise it is replicated, as are the LayerNorm parameters."""
    plan = {v: "R" for v in df.params} | choice
    for w in df.weights:
        for v in df.params:
            if df.module[v] == df.module[w] and v != w and choice[w][2:-1] in df.factors[v]:
                plan[v] = choice[w]
    return plan


def label(df, plan, v):
    """How a plan places weight or input v, in Megatron's words: column(a) = split along its output
    features' index a."""
    p = plan[v]
    if p == "R":
        return "replicated"
    if v == df.x:
        return "sequence" if p == "S(T)" else p
    f = p[2:-1]
    out, inp = df.dims[v]
    axis = out if f in out else inp
    return ("column" if f in out else "row") + (f"({f})" if len(axis) > 1 else "")


CONSTRAINTS = {
    "none": "every plan",
    "weights sharded": "every weight split and never gathered whole, so the model fits",
    "activations sharded too": "and every tensor a rank keeps for backward split (Table 2's replicated terms)",
}


class Search:
    """Every plan for one nanosp block at tensor-parallel size t, placed and ranked."""

    def __init__(self, cfg, seq, batch, t):
        cfg.check_tensor_parallel(t)
        start = time.perf_counter()
        self.df, self.cfg, self.t, self.shape = Dataflow.of_block(cfg, seq, batch), cfg, t, (seq, batch, cfg.n_embd, cfg.n_head)
        choices = plan_choices(self.df, t)
        self.placed = {name: [] for name in CONSTRAINTS}
        for combo in itertools.product(*choices.values()):
            plan = complete(self.df, dict(zip(choices, combo)))
            for constraint in CONSTRAINTS:
                if constraint != "none" and any(plan[w] == "R" for w in self.df.weights):
                    break
                placed = self.evaluate(plan, constraint)
                if placed is None:
                    break
                self.placed[constraint].append(placed)
        for results in self.placed.values():
            results.sort(key=lambda r: (r.bytes, r.param_bytes + r.activation_bytes))
        self.plans, self.seconds = len(self.placed["none"]), time.perf_counter() - start

    def evaluate(self, plan, constraint="none"):
        """Plan placed at least bytes under a constraint, or None if it cannot meet it."""
        splits = place(self.df, plan, self.t, constraint)
        return None if splits is None else account(self.df, plan, splits, self.t)

    def best(self, constraint):
        return self.placed[constraint][0]

    def plan_of(self, **labels):
        """The plan whose weights carry these labels, e.g. plan_of(c_fc="row"); unnamed ones Megatron's."""
        megatron = self.best("weights sharded").plan
        choice = {w: megatron[w] for w in self.df.weights} | {self.df.x: megatron[self.df.x]}
        for short, want in labels.items():
            v = self.df.x if short == "x" else next(w for w in self.df.weights if self.df.module[w].endswith(short))
            options = plan_choices(self.df, self.t)[v]
            choice[v] = next(p for p in options if label(self.df, {**choice, v: p}, v) == want)
        return complete(self.df, choice)


# ----------------------------------------------------------------------------------------------
# 7. nanosp: where it writes each collective by hand, and what its ledger counts

NANOSP_HELPERS = {"f": "copy_to_tp", "f̄": "reduce_from_tp", "ḡ": "reduce_scatter_to_sp",
                  "g": "LinearWithSequenceGather" if REGATHER else "gather_from_sp"}


def nanosp_line(module_cls, helper):
    """(function, line, text) of the first call of `helper` in module_cls.forward or in a nanosp
    function it calls: where nanosp.py places that collective by hand. None if it has no such call."""
    called = re.findall(r"(\w+)\(", inspect.getsource(module_cls.forward))
    for fn in [module_cls.forward] + [getattr(nanosp, n) for n in called if inspect.isfunction(getattr(nanosp, n, None))]:
        lines, start = inspect.getsourcelines(fn)
        for i, line in enumerate(lines):
            if re.search(rf"\b{helper}(\.apply)?\(", line):
                return fn.__qualname__, start + i, line.strip()
    return None


def where_in_nanosp(df, c):
    """The line of nanosp.py that holds placed collective c (None for a move nanosp never makes)."""
    if c.name not in NANOSP_HELPERS:
        return None
    module = df.gm.meta["root"].get_submodule("block" + (f".{c.module}" if c.module else ""))
    return nanosp_line(type(module), NANOSP_HELPERS[c.name])


def fake_group(t):
    """A process group of size t on the "fake" backend: exact shapes and bytes, no other processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=64)
    if t > dist.get_world_size():
        raise ValueError(f"t={t} is larger than the fake world of {dist.get_world_size()} ranks")
    return dist.new_group(list(range(t)))


def ledger_op(op):
    """The ledger's name of a collective ("allgather_base", ...) in this file's words."""
    return "all-reduce" if op.startswith("allreduce") else "all-gather" if op.startswith("allgather") else "reduce-scatter"


def nanosp_ledger(cfg, seq, batch, t, sequence_parallel):
    """nanosp's communication ledger for one layer at size t: sorted (phase, op, message bytes), and
    the ring bytes one rank sends."""
    cfg = dataclasses.replace(cfg, sequence_parallel=sequence_parallel)
    log = measure_communication(cfg, fake_group(t), batch, seq, torch.bfloat16, device="meta")
    return (sorted((phase, ledger_op(op), nbytes) for phase, _, op, nbytes in log),
            sum(ring_bytes_sent(op, nbytes, t) for _, _, op, nbytes in log))


def messages(placed):
    """A placed plan's collectives as the ledger lists them: sorted (phase, op, message bytes)."""
    return sorted([("forward", op, c.nbytes) for c in placed.collectives for op in c.forward]
                  + [("backward", op, c.nbytes) for c in placed.collectives for op in c.backward])


# ----------------------------------------------------------------------------------------------
# python autoshard.py


def table(headers, rows):
    print("| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def shape_text(dims):
    return " ".join(d[0] if len(d) == 1 else f"({' '.join(d)})" for d in dims)


def summary(df, placed):
    """A plan's collectives in the paper's letters, in graph order; parameter gradients counted."""
    acts = [c.name for c in placed.collectives if c.value not in df.params]
    params = [c.name for c in placed.collectives if c.value in df.params]
    return ", ".join([" ".join(acts)] * bool(acts) + [f"{n}×{params.count(n)} on parameters" for n in dict.fromkeys(params)])


def print_rules():
    print("\nAn op split along index i reads each input that holds i as S(i) and the others whole (R); its "
          "output is S(i) if it holds i, P if i was summed over. An input read whole by a split op gets a "
          "partial gradient (P). No op reads a P: it is reduced first.\n")
    table(["op", "indices", "cannot split", "keeps for backward"],
          [(", ".join(_op_name(t) for t in targets), law, whole, saves) for targets, _, law, whole, saves in RULES])
    print("\nMoves: a tensor placed `from`, read placed `to`; its gradient comes back the other way. Bytes one rank "
          "sends under the ring algorithm, N the whole tensor's bytes.\n")
    rows = []
    for src, dst, reader in [("R", "R", "split"), ("P", "R", "any"), ("S(i)", "R", "split"), ("P", "S(i)", "any"),
                             ("R", "S(i)", "any"), ("S(i)", "R", "not split"), ("S(i)", "S(j)", "any")]:
        grad = dst if dst != "R" else "P" if reader == "split" else "R"
        c = Collective("", "", src, dst, move(src, dst), move(grad, gradient_placement(src)), 1, "")
        rows.append((f"{src} -> {dst}", reader, " + ".join(c.forward) or "- (local)", f"{grad} -> "
                     f"{gradient_placement(src)}: {' + '.join(c.backward) or '-'}", f"{ring_units(c)} (t-1)/t N",
                     PAPER.get((c.forward, c.backward), "")))
    table(["move", "reader split", "forward", "backward", "ring bytes", "paper"], rows)


def print_search(search, top):
    df, mb = search.df, lambda x: f"{x / 2**20:,.2f}"
    for constraint, text in CONSTRAINTS.items():
        print(f"\n#### {constraint}: {text} ({len(search.placed[constraint])} plans)\n")
        table(["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "between blocks", "collectives", "MiB sent",
               "params MiB", "activations MiB"],
              [[label(df, r.plan, w) for w in df.weights] + [label(df, r.plan, df.x), summary(df, r), mb(r.bytes),
                                                            mb(r.param_bytes), mb(r.activation_bytes)]
               for r in search.placed[constraint][:top]])


def print_placement(search, constraint, title, sequence_parallel):
    df, best, cfg = search.df, search.best(constraint), search.cfg
    print(f"\n#### {title}: the cheapest plan with {constraint}, against nanosp.py\n")
    rows = []
    for c in best.collectives:
        line = where_in_nanosp(df, c)
        rows.append((c.name, f"{df.params.get(c.value, c.value)} ({shape_text(df.dims[c.value])})", c.module or "Block",
                     f"{c.src} -> {c.dst}", " + ".join(c.forward) or "-", " + ".join(c.backward) or "-",
                     f"{c.nbytes:,}", f"{line[1]} {line[0]}: `{line[2]}`" if line else "-"))
    table(["", "tensor", "in", "placement", "forward", "backward", "message bytes", "nanosp.py"], rows)
    seq, batch, _, _ = search.shape
    log, ring = nanosp_ledger(cfg, seq, batch, search.t, sequence_parallel)
    verdict = "equal" if log == messages(best) and ring == best.bytes else "DIFFERENT"
    print(f"\nbytes one rank sends per layer: {best.bytes:,.0f} placed here, {ring:,.0f} counted by nanosp's "
          f"communication ledger (sequence_parallel={sequence_parallel}); every message: {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    cfg = nanosp.GPTConfig(block_size=args.seq, n_layer=1, n_head=args.heads, n_embd=args.hidden)
    search = Search(cfg, args.seq, args.batch, args.tp)
    df = search.df
    kinds = [op.kind for op in df.ops]
    print(f"### autoshard: one nanosp Block, s={args.seq} b={args.batch} h={args.hidden} a={args.heads} "
          f"t={args.tp}, 16-bit\n\ntorch.fx traced {len(df.gm.graph.nodes)} nodes, {len(df.ops)} of them tensor ops: "
          + ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)))
    print_rules()
    print(f"\nSearched {search.plans} plans (each weight replicated, column- or row-parallel along any index "
          f"t divides; the activation between blocks replicated or split along the sequence) in {search.seconds:.1f} s. "
          f"Bytes one rank sends per layer, forward + backward; parameters and kept activations per rank.")
    print_search(search, args.top)
    print_placement(search, "weights sharded", "Megatron-LM", sequence_parallel=False)
    print_placement(search, "activations sharded too", "Sequence parallelism", sequence_parallel=True)
    megatron, worse = search.best("weights sharded"), search.evaluate(search.plan_of(c_fc="row"), "weights sharded")
    print(f"\nA worse plan, row-parallel c_fc: {summary(df, worse)}: {worse.bytes:,.0f} bytes, "
          f"{worse.bytes - megatron.bytes:,.0f} more than Megatron's ({worse.bytes / megatron.bytes:.2f}x).")


if __name__ == "__main__":
    main()
