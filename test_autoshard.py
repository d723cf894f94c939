"""autoshard.py rediscovers nanosp's collectives from the unsharded block: the traced graph is the
block, op by op; the cheapest plans are Megatron's and sequence parallelism's; their bytes, and the
activation and parameter bytes per rank, equal what nanosp's own ledgers count for the sharded model."""
import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F

import autoshard
import nanosp

SHAPES = [  # (s, b, h, a, t): T divisible by t, as sequence parallelism needs
    (32, 2, 64, 8, 4),
    (24, 3, 48, 6, 3),  # t = 3 also splits the q, k, v chunk: c_attn "column(three)" is a candidate
    (16, 1, 32, 4, 2),
    (32, 2, 64, 8, 8),
]


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left_behind():
    """autoshard's ledger comparisons start a fake process group in this process; the other test
    files expect none, so it goes when this module is done."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def config(s, h, a):
    return nanosp.GPTConfig(block_size=s, n_layer=1, n_head=a, n_embd=h)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda shape: "s{}-b{}-h{}-a{}-t{}".format(*shape))
def search(request):
    s, b, h, a, t = request.param
    return autoshard.Search(config(s, h, a), s, b, t)


# ----------------------------------------------------------------------------------------------
# the trace


def test_the_traced_graph_is_the_block_and_every_node_has_a_rule():
    cfg = config(16, 32, 4)
    gm = autoshard.trace_block(cfg, device="cpu").double()
    block = gm.meta["root"].block.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(16, 2, 32, generator=gen, dtype=torch.float64)
    assert torch.equal(gm(x), autoshard.call_block(block, x))  # same ops, same order: bit for bit

    df = autoshard.Dataflow.of_block(cfg, 16, 2)
    calls = {n.name for n in df.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
    assert calls == {op.name for op in df.ops} | set(df.no_data)  # every node read, by a rule or as a size
    kinds = [op.kind for op in df.ops]
    assert {k: kinds.count(k) for k in ("layer_norm", "linear", "bmm", "softmax", "gelu", "rearrange")} == \
        dict(layer_norm=2, linear=4, bmm=2, softmax=1, gelu=1, rearrange=2)
    assert [df.params[w] for w in df.weights] == ["attn.c_attn.weight", "attn.c_proj.weight",
                                                  "mlp.c_fc.weight", "mlp.c_proj.weight"]
    # the indices the rules found: q, k, v features spelled out by nanosp's own rearrange pattern
    assert df.dims[df.weights[0]] == [("three", "a", "d"), ("C",)]
    assert df.dims[df.weights[1]] == [("C",), ("a", "d")]


class _Unknown(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.drop = how, torch.nn.Dropout(0.1)

    def forward(self, x):
        if self.how == "function":
            return torch.flip(x, [0]) + x
        if self.how == "method":
            return x.cumsum(0)
        return self.drop(x)  # a module fx keeps whole


@pytest.mark.parametrize("how, name", [("function", "flip"), ("method", "cumsum"), ("module", "Dropout")])
def test_an_op_without_a_rule_is_an_error_that_names_it(how, name):
    with pytest.raises(ValueError, match=rf"no sharding rule for {name}\b"):
        autoshard.Dataflow(fx.symbolic_trace(_Unknown(how)), (4, 2, 8))


@pytest.mark.parametrize("t, message", [(0, "must be a positive int"), (3, "n_head=8 is not divisible")])
def test_a_tensor_parallel_size_that_does_not_fit_is_a_value_error(t, message):
    with pytest.raises(ValueError, match=message):
        autoshard.Search(config(32, 64, 8), 32, 2, t)


# ----------------------------------------------------------------------------------------------
# the search finds Megatron and sequence parallelism


def labels(search, placed):
    df = search.df
    return [autoshard.label(df, placed.plan, v) for v in [*df.weights, df.x]]


def test_with_weights_sharded_the_cheapest_plan_is_megatrons(search):
    best = search.best("weights sharded")
    assert labels(search, best) == ["column(a)", "row(a)", "column", "row", "replicated"]
    assert [(c.name, c.module, c.forward, c.backward) for c in best.collectives] == [
        ("f", "attn.c_attn", (), ("all-reduce",)), ("f̄", "attn.c_proj", ("all-reduce",), ()),
        ("f", "mlp.c_fc", (), ("all-reduce",)), ("f̄", "mlp.c_proj", ("all-reduce",), ())]
    assert best.bytes < search.placed["weights sharded"][1].bytes  # the only cheapest


def test_with_activations_sharded_too_the_cheapest_plan_is_sequence_parallelism(search):
    df, best = search.df, search.best("activations sharded too")
    assert labels(search, best) == ["column(a)", "row(a)", "column", "row", "sequence"]
    acts = [(c.name, c.module, c.src, c.dst) for c in best.collectives if c.value not in df.params]
    assert acts == [("g", "attn.c_attn", "S(T)", "R"), ("ḡ", "attn.c_proj", "P", "S(T)"),
                    ("g", "mlp.c_fc", "S(T)", "R"), ("ḡ", "mlp.c_proj", "P", "S(T)")]
    # a replicated parameter used on a sequence shard: its gradient is summed over the group (f)
    params = sorted(df.params[c.value] for c in best.collectives if c.value in df.params)
    assert params == sorted(["ln_1.weight", "ln_1.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                             "mlp.c_proj.bias"])
    assert {c.name for c in best.collectives if c.value in df.params} == {"f"}
    assert best.bytes < search.placed["activations sharded too"][1].bytes


@pytest.mark.parametrize("constraint, sequence_parallel", [("weights sharded", False),
                                                           ("activations sharded too", True)])
def test_bytes_and_memory_equal_nanosps_ledgers(search, constraint, sequence_parallel):
    s, b, h, a = search.shape
    t, best = search.t, search.best(constraint)
    log, ring = autoshard.nanosp_ledger(search.cfg, s, b, t, sequence_parallel)
    assert autoshard.messages(search.df, best) == log  # every collective: phase, kind, message bytes
    assert best.bytes == pytest.approx(ring, rel=1e-12)

    cfg = nanosp.GPTConfig(block_size=s, n_layer=1, n_head=a, n_embd=h, sequence_parallel=sequence_parallel)
    group = autoshard.fake_group(t)
    measured, _ = autoshard.measure_activation_bytes(cfg, group, b, s, torch.bfloat16)
    assert best.activation_bytes == measured
    block = nanosp.Block(cfg, group, layer=0)
    assert best.param_bytes == sum(p.numel() * 2 for p in block.parameters())


def test_each_placed_collective_is_at_a_line_of_nanosp_that_calls_its_operator(search):
    source = Path(nanosp.__file__).read_text().splitlines()
    for constraint in ("weights sharded", "activations sharded too"):
        for c in search.best(constraint).collectives:
            function, line, text = autoshard.where_in_nanosp(search.df, c)
            assert source[line - 1].strip() == text
            # a parameter's f: nanosp reads every replicated parameter through one f (its autograd Function)
            helper = "CopyToTensorParallelRegion" if c.value in search.df.params else autoshard.NANOSP_HELPERS[c.name]
            assert re.search(rf"\b{helper}(\.apply)?\(", text), (c, function, text)


def test_a_row_parallel_c_fc_costs_more_and_the_search_says_how_much(search):
    s, b, h, _ = search.shape
    t, megatron = search.t, search.best("weights sharded")
    worse = search.evaluate(search.plan_of(c_fc="row"), "weights sharded")
    assert autoshard.label(search.df, worse.plan, search.df.weights[2]) == "row"
    # c_fc's input is now split, not read whole: its gradient is all-gathered (1 N) instead of f's
    # all-reduce (2 N); but its output (T, B, 4h) is a partial sum, reduce-scattered for the GeLU and
    # all-gathered back in backward (2 x 4 N), and its bias is sliced to match (4h elements gathered)
    n = 2 * s * b * h
    assert worse.bytes - megatron.bytes == pytest.approx((t - 1) / t * (-n + 8 * n + 2 * 4 * h), rel=1e-12)
    acts = [c.name for c in worse.collectives if c.value not in search.df.params]
    assert acts == ["f", "f̄", "split", "ḡ(mlp.c_fc)", "f̄"]  # ḡ along the hidden index, not the sequence


# ----------------------------------------------------------------------------------------------
# the dynamic programme is exact


class _MLP(torch.nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.empty(4 * h, h, device="meta"))
        self.w2 = torch.nn.Parameter(torch.empty(h, 4 * h, device="meta"))

    def forward(self, x):
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],)), self.w1)), self.w2)


def test_the_dynamic_programme_finds_the_least_bytes_of_every_assignment():
    df, t = autoshard.Dataflow(fx.symbolic_trace(_MLP()), (8, 4, 8)), 2
    choices = {"x": ["R", "S(T)"], "w1": ["R", "S(w1)", "S(C)"], "w2": ["R", "S(C)", "S(w1)"]}
    for combo in itertools.product(*choices.values()):
        plan = dict(zip(choices, combo))
        every = [autoshard.account(df, plan, dict(zip((op.name for op in df.ops), splits)), t).bytes
                 for splits in itertools.product(*(df.options(op, t) for op in df.ops))]
        assert autoshard.account(df, plan, autoshard.place(df, plan, t), t).bytes == min(every), plan
