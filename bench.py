"""bench.py: the tables behind every performance claim nanosp makes.

    python bench.py              # CPU, a few minutes: markdown tables on stdout, bench.json beside them
    python bench.py --quick      # small sizes, well under a minute (what test_bench.py runs)

1. activation memory: 1a per layer, measured beside the paper's Table 2, at t = 1, 2, 4, 8; 1b Table 2's
   sequence-parallel rows beside the fused attention (sdpa): bytes, and FLOPs computed twice
2. FLOPs of a training step with none / selective / full recompute, counted beside Appendix A
3. bytes on the wire per layer for TP and TP+SP: 3a collective by collective, 3b by what they move
4. time on CPU: 4a milliseconds per training step at t = 2 (two gloo processes), beside the paper's
   Table 4; 4b nanosp's dropout against F.dropout; 4c nanosp's training step at t = 1 against the
   floor, the same arithmetic as bare PyTorch calls
5. on CUDA only: 5a step times on one GPU, 5b each fused kernel against eager PyTorch and torch.compile
6. what to recompute for an activation budget: the planner's frontier, GPT-3 175B and a measured nanosp
7. autoshard's search: a Llama-7B-shaped block planned on the meta device at t = 8, and a stack of 8

`python bench.py --only NAME` runs one section: memory (1a), attention (1b), flops, communication,
time (4a, 4b), floor (4c), cuda, frontier or autoshard.

Tensor-parallel sizes above the number of processes are measured on one rank's shard with a
"fake" process group: every shape and byte count is exact, the values are not.
"""
import argparse
import json
import math
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ledgers
import nanosp

SIZES = {  # the memory shape keeps GPT-3's ratio 5as/h = 80 (s=2048, a=96, h=12288)
    "full": dict(memory=dict(s=1024, h=512, a=8, b=1), attention=dict(seqs=(1024, 2048), h=512, a=8, b=1),
                 flops=dict(L=4, s=512, h=256, a=8, V=256, b=2),
                 frontier=dict(L=4, s=512, h=256, a=8, V=256, b=2),
                 time=dict(L=2, s=512, h=256, a=8, V=256, b=2, reps=15, dropout=(16, 1024, 1024)),
                 floor=dict(L=4, s=256, h=256, a=8, V=8192, b=8, reps=15),
                 cuda=dict(L=4, s=2048, h=2048, a=16, V=50304, b=1, reps=10, kernels=dict(s=2048, reps=50)),
                 autoshard=dict(h=4096, a=32, F=11008, s=4096, stack=8, layers=32)),
    "quick": dict(memory=dict(s=256, h=128, a=8, b=1), attention=dict(seqs=(128, 256), h=128, a=8, b=1),
                  flops=dict(L=2, s=128, h=64, a=4, V=128, b=1),
                  frontier=dict(L=3, s=64, h=64, a=8, V=128, b=1),
                  time=dict(L=1, s=64, h=64, a=4, V=128, b=1, reps=3, dropout=(2, 64, 64)),
                  floor=dict(L=2, s=64, h=64, a=4, V=256, b=2, reps=3),
                  cuda=dict(L=2, s=512, h=512, a=8, V=1024, b=1, reps=3, kernels=dict(s=256, reps=5)),
                  autoshard=dict(h=256, a=8, F=688, s=256, stack=2, layers=2)),
}
PAPER_MODELS = [("GPT-3 175B", dict(L=96, s=2048, h=12288, V=51200)),
                ("MT-NLG 530B", dict(L=105, s=2048, h=20480, V=51200))]
# Korthikanti et al. 2022, Table 4: time per layer of a 22B model against TP without recompute
PAPER_TABLE4 = {"TP": 1.00, "TP+SP": 0.97, "TP+selective": 1.07, "TP+SP+selective": 1.04, "TP+full": 1.39}
DROPOUTS = (0.1, 0.0)
TIMED = [("TP", False, "none"), ("TP+SP", True, "none"), ("TP+selective", False, "selective"),
         ("TP+SP+selective", True, "selective"), ("TP+full", False, "full")]


def config(size, **overrides):
    """A GPTConfig from a SIZES entry (L, s, h, a, V), dropout 0.1 as in the paper's accounting."""
    fields = dict(vocab_size=size.get("V", 256), block_size=size["s"], n_layer=size.get("L", 1),
                  n_head=size["a"], n_embd=size["h"], dropout=0.1)
    return nanosp.GPTConfig(**{**fields, **overrides})


def table(title, headers, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + " --- |" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def fake_groups(ts):
    """One rank of a fake 8-process world, and a group of each size t (None for t = 1)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=max(ts))
    return {t: None if t == 1 else dist.new_group(list(range(t))) for t in ts}


# ----------------------------------------------------------------------------------------------
# 1a. activation memory (Table 2)


def bench_memory(size, groups):
    cfg, s, b = config(size), size["s"], size["b"]
    rows = []
    for t, group in groups.items():
        measured = ledgers.activation_table(cfg, group, batch=b, seq=s, dtype=torch.bfloat16)
        by_name = {r["configuration"]: r["measured"] for r in measured}
        for r in measured:
            rows.append(dict(r, t=t, vs_tp=by_name["tensor parallel"] / r["measured"],
                             vs_none=by_name["no parallelism"] / r["measured"]))
    table(f"1a. Activation memory per layer (Table 2): s={s} b={b} h={size['h']} a={size['a']}, "
          f"5as/h={5 * size['a'] * s // size['h']}, bf16, dropout 0.1; t > 1 measured on one rank's "
          f"shard with a fake process group",
          ["configuration", "t", "measured bytes", "formula bytes", "ratio", "reduction vs TP",
           "reduction vs none"],
          [(r["configuration"], r["t"], f"{r['measured']:,}", f"{r['formula']:,.0f}", f"{r['ratio']:.4f}",
            f"{r['vs_tp']:.2f}x", f"{r['vs_none']:.2f}x") for r in rows])
    best = next(r for r in rows if r["t"] == max(groups)
                and r["configuration"] == "tensor + sequence parallel + selective recompute")
    formula = paper_reduction(size, max(groups))
    print(f"\nTP -> TP+SP+selective at t={best['t']}: {best['vs_tp']:.2f}x measured, "
          f"{formula:.2f}x by the formula (the paper's headline: about 5x).")
    return rows


def paper_reduction(size, t):
    s, b, h, a = size["s"], size["b"], size["h"], size["a"]
    return (ledgers.paper_activation_bytes(s, b, h, a, t, False, "none")
            / ledgers.paper_activation_bytes(s, b, h, a, t, True, "selective"))


# ----------------------------------------------------------------------------------------------
# 1b. the core attention written out or fused: Table 2's sequence-parallel rows beside sdpa

ATTENTION_ROWS = [  # (configuration, attention, recompute, dropout); sdpa takes no dropout
    ("TP + SP", "explicit", "none", 0.1), ("TP + SP + selective (Table 2's row)", "explicit", "selective", 0.1),
    ("TP + SP + selective, no dropout", "explicit", "selective", 0.0), ("TP + SP + sdpa", "sdpa", "none", 0.0),
    ("TP + SP + sdpa + selective", "sdpa", "selective", 0.0)]


def bench_attention(size, groups):
    """One layer at t = the largest group: bytes measured (bf16) and by the ledger, and the FLOPs it
    computes twice, counted by FlopCounterMode: forward + backward minus 3x forward."""
    t, h, a, b = max(groups), size["h"], size["a"], size["b"]
    rows = []
    for s in size["seqs"]:
        for name, attention, recompute, p in ATTENTION_ROWS:
            cfg = config(dict(size, s=s), sequence_parallel=True, recompute=recompute, dropout=p, attention=attention)
            measured, _ = ledgers.measure_activation_bytes(cfg, groups[t], b, s, torch.bfloat16)
            forward, total = ledgers.count_layer_flops(cfg, groups[t], b, s)
            rows.append(dict(s=s, configuration=name, attention=attention, recompute=recompute, dropout=p,
                             measured=measured, ledger=ledgers.layer_activation_bytes(s, b, h, a, t, True, recompute,
                                                                                     p > 0, 2, attention),
                             formula=ledgers.paper_activation_bytes(s, b, h, a, t, True, recompute)
                             if attention == "explicit" and p > 0 else None, twice=total - 3 * forward,
                             step_flops=total))
    table(f"1b. The core attention written out or fused (F.scaled_dot_product_attention), one layer: h={h} a={a} "
          f"b={b} t={t} with SP, bf16; bytes measured by saved_tensors_hooks and by the ledger; FLOPs computed "
          f"twice = counted forward + backward - 3 x forward (FlopCounterMode), per rank",
          ["s", "configuration", "dropout", "measured bytes", "ledger bytes", "Table 2 formula", "FLOPs computed twice",
           "of the layer's step"],
          [(r["s"], r["configuration"], r["dropout"], f"{r['measured']:,}", f"{r['ledger']:,}",
            "-" if r["formula"] is None else f"{r['formula']:,.0f}", f"{r['twice']:,}",
            f"{100 * r['twice'] / r['step_flops']:.2f}%") for r in rows])
    by = {(r["s"], r["configuration"]): r["measured"] for r in rows}
    s = max(size["seqs"])
    sdpa, table2, plain = (by[s, name] for name in ("TP + SP + sdpa", "TP + SP + selective (Table 2's row)",
                                                    "TP + SP + selective, no dropout"))
    print(f"\nAt s={s}: sdpa keeps {sdpa:,} bytes, {100 * (1 - sdpa / table2):.1f}% less than Table 2's TP + SP + "
          f"selective row ({table2:,}, with its dropout masks), and {sdpa - plain:,} more than selective without "
          f"dropout: the kernel's log-sum-exp, 4 bytes per head and row. The fused kernel is selective recomputation "
          f"of QK^T (2Bs^2h/t FLOPs) done inside its own backward.")
    return rows


# ----------------------------------------------------------------------------------------------
# 2. recompute FLOPs (Appendix A)


def flop_rows(name, B, L, s, h, V, counted=None):
    exact = {m: ledgers.exact_training_flops(B, L, s, h, V, m) for m in nanosp.RECOMPUTE_MODES}
    paper = {m: ledgers.paper_training_flops(B, L, s, h, V, m) for m in nanosp.RECOMPUTE_MODES}
    return [dict(model=name, recompute=m, counted=counted and counted[m], exact=exact[m], paper=paper[m],
                 overhead_exact=exact[m] / exact["none"] - 1, overhead_paper=paper[m] / paper["none"] - 1,
                 s_over_h=s / h) for m in nanosp.RECOMPUTE_MODES]


def bench_flops(size):
    B, L, s, h, V = size["b"], size["L"], size["s"], size["h"], size["V"]
    counted = {m: ledgers.count_training_flops(config(size, recompute=m), B, s) for m in nanosp.RECOMPUTE_MODES}
    rows = flop_rows(f"nanosp L={L} s={s} h={h} V={V} B={B}", B, L, s, h, V, counted)
    for name, shape in PAPER_MODELS:
        rows += flop_rows(f"{name} (analytic) L={shape['L']} s={shape['s']} h={shape['h']} V={shape['V']} B=1",
                          B=1, **shape)
    table("2. FLOPs of one training step (forward + backward); counted by FlopCounterMode, exact = the "
          "matmuls nanosp runs, paper = Appendix A",
          ["model", "recompute", "counted", "exact", "paper", "overhead (exact)", "overhead (paper)"],
          [(r["model"], r["recompute"], "-" if r["counted"] is None else f"{r['counted']:.4e}",
            f"{r['exact']:.4e}", f"{r['paper']:.4e}", f"{100 * r['overhead_exact']:.2f}%",
            f"{100 * r['overhead_paper']:.2f}%") for r in rows])
    gpt3 = {r["recompute"]: r for r in rows if r["model"].startswith("GPT-3")}
    print(f"\nSelective recompute reruns only QK^T and .V in backward, 4Bs^2h per layer: s/18h of the "
          f"layer's 72Bsh^2. The paper's Appendix A writes s/3h for s/6h, an overhead of s/6h, three times "
          f"that. At GPT-3 175B: {100 * gpt3['selective']['overhead_exact']:.2f}% counted this way, "
          f"{100 * gpt3['selective']['overhead_paper']:.2f}% by the paper's formula. Full recompute: "
          f"exact and paper agree ({100 * gpt3['full']['overhead_exact']:.2f}% at GPT-3).")
    return rows


# ----------------------------------------------------------------------------------------------
# 3. communication


def collective_kind(sequence_parallel, operator, op):
    if sequence_parallel and op == "all-reduce":
        return "parameter gradients (sequence-shard params)"
    if operator == "LinearWithSequenceGather.backward" and op == "all-gather":
        return "re-gather of the saved input shard"
    return "activations"


def bench_communication(size, groups):
    s, b, h = size["s"], size["b"], size["h"]
    rows, summary = [], []
    for t, group in groups.items():
        if t == 1:
            continue
        kinds = {}
        for label, sp in (("TP", False), ("TP+SP", True)):
            log = ledgers.measure_communication(config(size, sequence_parallel=sp), group, b, s, torch.bfloat16)
            counts = {}
            for phase, operator, op, nbytes in log:
                key = (label, collective_kind(sp, operator, op), phase, op, nbytes)
                counts[key] = counts.get(key, 0) + 1
            for (label_, kind, phase, op, nbytes), n in counts.items():
                ring = n * ledgers.ring_bytes_sent(op, nbytes, t)
                rows.append(dict(t=t, config=label_, kind=kind, phase=phase, op=op, count=n,
                                 message_bytes=nbytes, ring_bytes=ring))
                kinds[(label_, kind)] = kinds.get((label_, kind), 0) + ring
        tp, sp = kinds[("TP", "activations")], kinds[("TP+SP", "activations")]
        summary.append(dict(t=t, tp_activations=tp, sp_activations=sp, equal=tp == sp,
                            sp_regather=kinds.get(("TP+SP", "re-gather of the saved input shard"), 0),
                            sp_param_grads=kinds.get(("TP+SP", "parameter gradients (sequence-shard params)"), 0)))
    table(f"3a. Collectives of one layer, forward + backward: s={s} b={b} h={h} bf16 (sbh = {s * b * h * 2:,} "
          f"bytes); ring bytes = bytes one rank sends; t > 1 on a fake process group",
          ["t", "config", "what", "phase", "op", "count", "message bytes", "ring bytes sent"],
          [(r["t"], r["config"], r["kind"], r["phase"], r["op"], r["count"], f"{r['message_bytes']:,}",
            f"{r['ring_bytes']:,.0f}") for r in rows])
    table("3b. Ring bytes per layer per step, by what they move",
          ["t", "TP activations", "TP+SP activations", "equal", "TP+SP re-gather (2 all-gathers of sbh)",
           "TP+SP parameter gradients (6h)", "TP+SP total / TP total"],
          [(r["t"], f"{r['tp_activations']:,.0f}", f"{r['sp_activations']:,.0f}", r["equal"],
            f"{r['sp_regather']:,.0f}", f"{r['sp_param_grads']:,.0f}",
            f"{(r['sp_activations'] + r['sp_regather'] + r['sp_param_grads']) / r['tp_activations']:.3f}")
           for r in summary])
    return dict(rows=rows, summary=summary)


# ----------------------------------------------------------------------------------------------
# 4. time on CPU: 4a per training step (Table 4), 4b dropout, 4c against a bare-PyTorch floor


def time_steps(models, idx, reps, sync, cpu=None):
    """Median ms of forward + backward per model, run interleaved (A B C ... A B C ...) after one
    warm-up round, so that drift in the machine's speed touches every model alike. A dict `cpu`
    receives the median CPU time of this thread, which other processes on the machine barely move."""
    times, cpu_times = {name: [] for name in models}, {name: [] for name in models}
    for rep in range(reps + 1):
        for name, model in models.items():
            sync()
            start, cpu_start = time.perf_counter(), time.thread_time()
            _, loss = model(idx, idx)
            loss.backward()
            sync()
            if rep:
                times[name].append(1e3 * (time.perf_counter() - start))
                cpu_times[name].append(1e3 * (time.thread_time() - cpu_start))
            model.zero_grad(set_to_none=True)
    if cpu is not None:
        cpu.update({name: statistics.median(ms) for name, ms in cpu_times.items()})
    return {name: statistics.median(ms) for name, ms in times.items()}


def _time_worker(rank, world, port, size, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    models = {(name, p): nanosp.GPT(config(size, sequence_parallel=sp, recompute=rc, dropout=p), dist.group.WORLD)
              for p in DROPOUTS for name, sp, rc in TIMED}
    idx = torch.randint(0, size["V"], (size["b"], size["s"]), generator=torch.Generator().manual_seed(0))
    ms = time_steps(models, idx, size["reps"], dist.barrier)
    if rank == 0:
        queue.put({f"dropout {p}": {name: ms[name, p] for name, *_ in TIMED} for p in DROPOUTS})
    dist.destroy_process_group()


def run_world(world, target, args, timeout):
    """Run target(rank, world, port, *args, queue) on `world` spawned processes; rank 0's answer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=target, args=(rank, world, port, *args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        raise TimeoutError(f"the {world} timing processes did not finish in {timeout} s")
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a timing process failed: exit codes {[p.exitcode for p in procs]}")
    return queue.get()


def time_table(title, columns, paper):
    """columns: {label: {config: median ms}}; each column's ratios are to its first config."""
    rows = []
    for name in paper:
        row = dict(config=name, paper=paper[name])
        for label, ms in columns.items():
            row[label] = dict(ms=ms[name], ratio=ms[name] / ms[next(iter(ms))])
        rows.append(row)
    headers = ["config", *[f"{h} ({label})" for label in columns for h in ("ms", "ratio")], "paper Table 4"]
    body = [[r["config"], *[cell for label in columns for cell in (f"{r[label]['ms']:.1f}", f"{r[label]['ratio']:.3f}")],
             f"{r['paper']:.2f}"] for r in rows]
    table(title, headers, body)
    return rows


def bench_time(size):
    columns = run_world(2, _time_worker, (size,), timeout=400)
    rows = time_table(f"4a. Time per training step, forward + backward, t=2 (two gloo CPU processes, one thread "
                      f"each): L={size['L']} s={size['s']} h={size['h']} a={size['a']} b={size['b']} float32; "
                      f"median of {size['reps']} interleaved rounds; ratio to TP", columns, PAPER_TABLE4)
    print("\nTP+SP sends the activation bytes of TP plus the backward re-gather (table 3b), over gloo here; the "
          "backward all-gather and reduce-scatter of each column-parallel linear run while a matmul does, the "
          "forward all-gather cannot. Selective recompute reruns the attention's softmax and dropout, which on "
          "a CPU cost about what its matmuls do.")
    return dict(steps=rows, dropout=bench_dropout(size["dropout"], size["reps"]))


def bench_dropout(shape, reps):
    """nanosp.dropout (the hashed mask, and applying it) against torch's F.dropout on the same CPU
    tensor, one thread: attention probabilities (a/t b, s, s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(shape)
    key = nanosp.dropout_key(1, 2, nanosp.SITE_ATTN_PROBS)
    ms = {}
    for name, fn in (("F.dropout", lambda: torch.nn.functional.dropout(x, 0.1, training=True)),
                     ("nanosp.dropout", lambda: nanosp.dropout(x, 0.1, key, 0)),
                     ("nanosp.dropout_keep_mask", lambda: nanosp.dropout_keep_mask(x.shape, 0.1, key, 0))):
        times = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        ms[name] = statistics.median(times[1:])
    torch.set_num_threads(threads)
    table(f"4b. Dropout on the attention probabilities {tuple(x.shape)} ({x.numel():,} elements, float32, one "
          f"thread), median of {reps}", ["op", "ms", "ratio to F.dropout"],
          [(name, f"{t:.1f}", f"{t / ms['F.dropout']:.2f}") for name, t in ms.items()])
    return ms


def floor_loss(w, idx, targets, n_layer, n_head, attention):
    """nanosp's arithmetic (GPT-2, tied embeddings, tanh GeLU) as bare PyTorch calls on an unsharded
    state dict w, laid out (B, T, C) as nanoGPT does: the floor nanosp's step is measured against."""
    (B, T), C = idx.shape, w["wpe.weight"].shape[1]
    x = F.embedding(idx, w["wte.weight"]) + w["wpe.weight"][:T]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(n_layer):
        p = {name[len(f"h.{i}."):]: t for name, t in w.items() if name.startswith(f"h.{i}.")}
        y = F.layer_norm(x, (C,), p["ln_1.weight"], p["ln_1.bias"], 1e-5)
        q, k, v = F.linear(y, p["attn.c_attn.weight"], p["attn.c_attn.bias"]).split(C, dim=2)
        q, k, v = (z.view(B, T, n_head, C // n_head).transpose(1, 2) for z in (q, k, v))  # (B, a, T, d)
        if attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.softmax(torch.add(causal, q @ k.transpose(-2, -1), alpha=1 / math.sqrt(C // n_head)), dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
        y = F.layer_norm(x, (C,), p["ln_2.weight"], p["ln_2.bias"], 1e-5)
        y = F.gelu(F.linear(y, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]), approximate="tanh")
        x = x + F.linear(y, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    x = F.layer_norm(x, (C,), w["ln_f.weight"], w["ln_f.bias"], 1e-5)
    return F.cross_entropy(F.linear(x, w["wte.weight"]).flatten(0, 1), targets.flatten())


class Floor:
    """floor_loss on its own copy of a model's unsharded weights, called like the model."""

    def __init__(self, model):
        self.cfg, self.w = model.cfg, {n: p.requires_grad_() for n, p in model.full_state_dict().items()}

    def __call__(self, idx, targets):
        return None, floor_loss(self.w, idx, targets, self.cfg.n_layer, self.cfg.n_head, self.cfg.attention)

    def zero_grad(self, set_to_none=True):
        for p in self.w.values():
            p.grad = None


def bench_floor(size):
    """nanosp's training step (forward + backward) at t = 1, one thread, float32, against the floor
    of the same arithmetic, each attention, interleaved; the losses must agree."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    idx = torch.randint(0, size["V"], (size["b"], size["s"]), generator=torch.Generator().manual_seed(0))
    models = {}
    for attention in nanosp.ATTENTIONS:
        model = nanosp.GPT(config(size, dropout=0.0, attention=attention))
        models[attention, "nanosp"], models[attention, "floor"] = model, Floor(model)
    losses = {name: model(idx, idx)[1].item() for name, model in models.items()}
    load, cpu = os.getloadavg()[0], {}
    ms = time_steps(models, idx, size["reps"], lambda: None, cpu)
    rows = [dict(attention=a, nanosp=ms[a, "nanosp"], floor=ms[a, "floor"], ratio=ms[a, "nanosp"] / ms[a, "floor"],
                 cpu_nanosp=cpu[a, "nanosp"], cpu_floor=cpu[a, "floor"], cpu_ratio=cpu[a, "nanosp"] / cpu[a, "floor"],
                 loss_difference=abs(losses[a, "nanosp"] - losses[a, "floor"])) for a in nanosp.ATTENTIONS]
    torch.set_num_threads(threads)
    table(f"4c. nanosp's training step against the floor (bench.floor_loss: the same arithmetic as bare PyTorch "
          f"calls, no nanosp), t=1, one thread, float32: L={size['L']} h={size['h']} a={size['a']} T={size['s']} "
          f"B={size['b']} vocab {size['V']}; median of {size['reps']} interleaved rounds, wall clock and CPU time "
          f"of the thread; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)",
          ["attention", "nanosp ms", "floor ms", "nanosp / floor", "nanosp CPU ms", "floor CPU ms", "CPU ratio",
           "|loss difference|"],
          [(r["attention"], f"{r['nanosp']:.1f}", f"{r['floor']:.1f}", f"{r['ratio']:.3f}", f"{r['cpu_nanosp']:.1f}",
            f"{r['cpu_floor']:.1f}", f"{r['cpu_ratio']:.3f}", f"{r['loss_difference']:.1e}") for r in rows])
    return dict(rows=rows, load=[load, os.getloadavg()[0]])


# ----------------------------------------------------------------------------------------------
# 5. CUDA: step times on one GPU, and the fused kernels against eager PyTorch and torch.compile

# the kernels' shapes: sequence s, hidden h, heads a, micro-batch b (the softmax runs on (a b, s, s))
KERNEL_MODELS = [("GPT-2 small", dict(h=768, a=12, b=8)), ("GPT-3-like", dict(h=12288, a=96, b=1))]


def cuda_ms(fn, reps, warmup=3):
    """Median milliseconds of fn() over reps runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_cases(s, h, a, b, dtype=torch.bfloat16):
    """Per op: (name, call(ops, *inputs), inputs, indices of the inputs it differentiates, forward
    bytes, backward bytes) at transformer sizes. The bytes are the least the op must move: each input
    read once, each output written once; the causal softmax reads only the lower triangle of its
    scores (and of the gradient and y in backward). Bias gradients' row sums are not counted."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    e = torch.finfo(dtype).bits // 8
    key = nanosp.dropout_key(0, 0, nanosp.SITE_ATTN_PROBS)
    mlp, act, att, tri = s * b * 4 * h, s * b * h, a * b * s * s, a * b * s * (s + 1) // 2

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    yield ("bias_gelu", lambda ops, x, bias: ops.bias_gelu(x, bias), (rand(s, b, 4 * h), rand(4 * h)), (0, 1),
           2 * mlp * e, 3 * mlp * e)
    yield ("bias_dropout_add", lambda ops, x, bias, r: ops.bias_dropout_add(x, bias, r, 0.1, key, 0),
           (rand(s, b, h), rand(h), rand(s, b, h)), (0, 1, 2), 3 * act * e, 2 * act * e)
    yield ("dropout", lambda ops, x: ops.dropout(x, 0.1, key, 0), (rand(a * b, s, s),), (0,), 2 * att * e, 2 * att * e)
    yield ("causal_softmax", lambda ops, x: ops.causal_softmax(x, s**-0.5), (rand(a * b, s, s),), (0,),
           (tri + att) * e, (2 * tri + att) * e)


def time_kernel_case(call, inputs, wrt, reps):
    """{pass: {implementation: median ms}} for kernels, nanosp's definition (eager) and torch.compile
    of it, forward (no grad) and backward (autograd.grad through a graph built once); and a note if
    torch.compile failed."""
    import kernels

    torch._dynamo.reset()  # a fresh compile cache: the lambdas below share one code object across cases
    impls = {"fused": lambda *a: call(kernels, *a), "eager": lambda *a: call(nanosp.REFERENCE_OPS, *a),
             "compile": torch.compile(lambda *a: call(nanosp.REFERENCE_OPS, *a))}
    ms, note = {"forward": {}, "backward": {}}, None
    for name, impl in impls.items():
        try:
            def forward(impl=impl):
                with torch.no_grad():
                    impl(*inputs)

            ms["forward"][name] = cuda_ms(forward, reps)
            leaves = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
            out = impl(*leaves)
            grad, wanted = torch.randn_like(out), [leaves[i] for i in wrt]
            ms["backward"][name] = cuda_ms(lambda: torch.autograd.grad(out, wanted, grad, retain_graph=True), reps)
            del out, grad, leaves, wanted
        except Exception as e:  # torch.compile may fail on a definition; say so, keep measuring
            if name != "compile":
                raise
            note = f"torch.compile: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return ms, note


def bench_kernels(size, models=KERNEL_MODELS):
    """Each fused op at GPT-2 small's and a GPT-3-like width, bf16: ms, GB/s of the least traffic,
    the fraction of a device-to-device copy's bandwidth, and the speed-up over eager and compile."""
    rows, notes, copy_gbs = [], [], {}
    for model, shape in models:
        for op, call, inputs, wrt, forward_bytes, backward_bytes in kernel_cases(size["s"], **shape):
            ms, note = time_kernel_case(call, inputs, wrt, size["reps"])
            notes += [f"{model} {op}: {note}"] if note else []
            n_bytes = inputs[0].numel() * inputs[0].element_size()
            if n_bytes not in copy_gbs:  # y.copy_(x) at the op's size, reads and writes counted
                src = torch.empty_like(inputs[0])
                dst = torch.empty_like(src)
                copy_gbs[n_bytes] = 2 * n_bytes / cuda_ms(lambda: dst.copy_(src), size["reps"]) / 1e6
                del src, dst
            for phase, n in (("forward", forward_bytes), ("backward", backward_bytes)):
                t = ms[phase]
                gbs = n / t["fused"] / 1e6
                rows.append(dict(model=model, op=op, phase=phase, shape=tuple(inputs[0].shape), ms=t["fused"],
                                 GBps=gbs, of_copy=gbs / copy_gbs[n_bytes], eager_ms=t["eager"],
                                 vs_eager=t["eager"] / t["fused"], compile_ms=t.get("compile"),
                                 vs_compile=t["compile"] / t["fused"] if "compile" in t else None))
            del inputs
            torch.cuda.empty_cache()
    table(f"5b. Fused kernels (kernels.py) on {torch.cuda.get_device_name()}, bf16, s={size['s']}: median of "
          f"{size['reps']}; GB/s of the least traffic; of copy = its fraction of y.copy_(x) at the op's size; "
          f"speed-ups over nanosp's definition, eager and under torch.compile",
          ["model", "op", "pass", "shape", "ms", "GB/s", "of copy", "vs eager", "vs compile"],
          [(r["model"], r["op"], r["phase"], r["shape"], f"{r['ms']:.3f}", f"{r['GBps']:.0f}", f"{r['of_copy']:.2f}",
            f"{r['vs_eager']:.2f}x", "-" if r["vs_compile"] is None else f"{r['vs_compile']:.2f}x") for r in rows])
    for note in notes:
        print(f"\n{note}")
    return dict(rows=rows, copy_GBps=copy_gbs, notes=notes)


def bench_cuda(size):
    """Unsharded none / selective / full on one GPU (bf16, fused kernels), then the kernels alone."""
    if not torch.cuda.is_available():
        print("\n### 5. CUDA\n\nNo CUDA device here: GPU step times and the kernel benchmark were skipped.")
        return dict(skipped="no CUDA device")
    idx = torch.randint(0, size["V"], (size["b"], size["s"]), device="cuda")
    models = {rc: nanosp.GPT(config(size, recompute=rc)).to("cuda", torch.bfloat16) for rc in nanosp.RECOMPUTE_MODES}
    ms = time_steps(models, idx, size["reps"], torch.cuda.synchronize)
    rows = time_table(f"5a. Time per training step on one GPU ({torch.cuda.get_device_name()}), unsharded, "
                      f"bf16: L={size['L']} s={size['s']} h={size['h']} a={size['a']} b={size['b']}",
                      {"dropout 0.1": ms}, {"none": 1.00, "selective": 1.07, "full": 1.39})
    del models
    import kernels

    if not kernels.available():
        print("\nkernels.available() is False (NANOSP_KERNELS=0, or the extension did not build): "
              "no kernel benchmark.")
        return dict(time=rows)
    return dict(time=rows, kernels=bench_kernels(size["kernels"]))


# ----------------------------------------------------------------------------------------------
# 6. what to recompute for a memory budget


def frontier(cfg, t, B, T, dtype):
    """The planner's choice for budgets from no recompute down to full recompute of every layer:
    the bytes of n layers moved from none to selective, then of n layers from selective to full."""
    costs, L = ledgers.recompute_costs(cfg, t, B, T, dtype), cfg.n_layer
    counts = [(0, n) for n in range(L + 1)] + [(n, L - n) for n in range(1, L + 1)]  # (full, selective)
    plans = [ledgers.plan_recompute(cfg, t, B, T, dtype, ledgers.plan_of(costs, ledgers.counted_modes(L, *c)).activation_bytes)
             for c in counts]
    return list(dict.fromkeys(plans))  # in order, without repeats


STATIC = {"none": "static: none", "selective": "static: selective (the paper's choice)", "full": "static: full"}


def frontier_rows(name, cfg, t, B, T, dtype, V, shown=None, measure_group=None):
    """One row per plan on the frontier (every `shown`-th, and the static choices), with the
    recompute overhead as a share of the step's FLOPs; measured by the activation ledger if asked."""
    step_flops = ledgers.exact_training_flops(B, cfg.n_layer, T, cfg.n_embd, V, attention=cfg.attention) / t
    rows = []
    for i, plan in enumerate(frontier(cfg, t, B, T, dtype)):
        static = next((label for m, label in STATIC.items() if plan.modes == (m,) * cfg.n_layer), "")
        if shown and i % shown and not static:
            continue
        row = dict(model=name, plan=str(plan), static=static, activation_bytes=plan.activation_bytes,
                   recompute_flops=plan.recompute_flops, overhead=plan.recompute_flops / step_flops, measured=None)
        if measure_group is not False:
            variant = nanosp.GPTConfig(**{**cfg.__dict__, "recompute": plan.modes})
            row["measured"] = ledgers.measure_activation_bytes(variant, measure_group, B, T, dtype, paper_bytes=False,
                                                               n_layer=cfg.n_layer)[0]
        rows.append(row)
    return rows


def bench_frontier(size, groups):
    big = PAPER_MODELS[0][1]
    gpt3 = nanosp.GPTConfig(vocab_size=big["V"], block_size=big["s"], n_layer=big["L"], n_head=96, n_embd=big["h"],
                            dropout=0.1, sequence_parallel=True)
    small = config(size, sequence_parallel=True)
    t = max(groups)
    rows = frontier_rows(f"GPT-3 175B, t={t}, SP, analytic", gpt3, t, 1, big["s"], torch.bfloat16, big["V"],
                         shown=12, measure_group=False)
    rows += frontier_rows(f"nanosp L={size['L']} s={size['s']} h={size['h']} b={size['b']}, t={t}, SP, measured",
                          small, t, size["b"], size["s"], torch.bfloat16, size["V"], measure_group=groups[t])
    # the fused attention (no dropout): selective has only the log-sum-exp left to save
    fused = {name: nanosp.GPTConfig(**{**c.__dict__, "dropout": 0.0, "attention": "sdpa"})
             for name, c in (("gpt3", gpt3), ("small", small))}
    rows += frontier_rows(f"GPT-3 175B, t={t}, SP, sdpa, analytic", fused["gpt3"], t, 1, big["s"], torch.bfloat16,
                          big["V"], shown=12, measure_group=False)
    rows += frontier_rows(f"nanosp L={size['L']} s={size['s']} h={size['h']} b={size['b']}, t={t}, SP, sdpa, measured",
                          fused["small"], t, size["b"], size["s"], torch.bfloat16, size["V"], measure_group=groups[t])
    table("6. What to recompute for an activation budget: the planner's choice as the budget shrinks, bf16, "
          "dropout 0.1 (sdpa: 0); bytes per rank saved by all layers, recompute FLOPs as a share of the step's "
          "(sdpa: its kernel's QK^T in backward included)",
          ["model", "plan", "", "activation bytes", "measured bytes", "recompute overhead"],
          [(r["model"], r["plan"], r["static"], f"{r['activation_bytes']:,}",
            "-" if r["measured"] is None else f"{r['measured']:,}", f"{100 * r['overhead']:.2f}%") for r in rows])
    print(f"\nThe planner, sdpa: {ledgers.plan_recompute(fused['gpt3'], t, 1, big['s'], torch.bfloat16, 2**40).note}.")
    return rows


# ----------------------------------------------------------------------------------------------
# 7. autoshard's search


def _timed_discover(autoshard, module, x, t, dims=None):
    """Seconds to trace and name the module, to search it, and to discover (both, as a user calls it), discover's
    CPU seconds, and the plan."""
    start = time.perf_counter()
    g = autoshard.Graph(module, (x,), dims)
    traced, start = time.perf_counter() - start, time.perf_counter()
    autoshard.solve(g, t, "weights")
    searched, start, cpu = time.perf_counter() - start, time.perf_counter(), time.process_time()
    plan = autoshard.discover(module, (x,), t, dims)
    return traced, searched, time.perf_counter() - start, time.process_time() - cpu, plan


class _LastHidden(torch.nn.Module):  # a transformers model, ids in, its last hidden state out
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state


def bench_autoshard(size, t=8):
    """autoshard.discover on one Llama block (test_autoshard's, written in plain torch) on the meta device, then on
    a stack of them, then on transformers' whole LlamaModel of that shape (ids in, bfloat16): the seconds to trace
    and name it, the seconds to search it, and what it found."""
    import transformers

    import autoshard
    from test_autoshard import Llama

    autoshard.discover(Llama(64, 8, 96, 16), (torch.zeros(1, 16, 64),), 2)  # torch.export's first call imports much
    h, a, F, s, n = size["h"], size["a"], size["F"], size["s"], size["stack"]
    rows, out = [], []
    cfg = transformers.LlamaConfig(hidden_size=h, num_attention_heads=a, intermediate_size=F, vocab_size=32000,
                                   num_hidden_layers=size["layers"], max_position_embeddings=s)
    with torch.device("meta"):  # (blocks, name, module, its input, the input's dims, how many tries)
        cases = [(1, "1 block", Llama(h, a, F, s), torch.empty(1, s, h), None, 3),
                 (n, f"{n} blocks", torch.nn.Sequential(*(Llama(h, a, F, s) for _ in range(n))), torch.empty(1, s, h),
                  None, 3),
                 ("model", f"transformers' LlamaModel, {size['layers']} layers, ids in",
                  _LastHidden(transformers.LlamaModel(cfg).bfloat16()), torch.zeros(1, s, dtype=torch.long), "B T", 1)]
    for blocks, name, module, x, dims, count in cases:
        tries = [_timed_discover(autoshard, module, x, t, dims) for _ in range(count)]
        traced, searched, seconds, cpu = (min(r[k] for r in tries) for k in range(4))
        plan = tries[-1][-1]
        out.append(dict(blocks=blocks, trace_s=traced, search_s=searched, discover_s=seconds, discover_cpu_s=cpu,
                        bytes_sent=plan.bytes_sent, collectives=len(plan.collectives)))
        rows.append((name, f"{traced:.2f}", f"{searched:.2f}", f"{seconds:.2f}", f"{cpu:.2f}",
                     f"{plan.bytes_sent / 2**20:,.0f}", len(plan.collectives)))
    table(f"7. autoshard: a Llama block (h={h}, {a} heads, F={F}, s={s}, b=1) planned on the meta device at t={t}, "
          f"best of 3 (the whole model: once; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
          ["module", "trace and name, s", "search, s", "discover, s", "discover, CPU s", "MiB sent per rank",
           "collectives"], rows)
    print(f"\nThe stack of {n}: discover takes {out[1]['discover_s'] / out[0]['discover_s']:.1f}x one block's time, its "
          f"search {out[1]['search_s'] / out[0]['search_s']:.1f}x: the repeated blocks are solved once (tracing is linear).")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--out", default="bench.json", help="where the JSON goes")
    parser.add_argument("--only", help="one section: memory, attention, flops, communication, time, floor, cuda, "
                                       "frontier or autoshard")
    args = parser.parse_args()
    sizes = SIZES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    result, seconds = dict(meta=dict(quick=args.quick, torch=torch.__version__, sizes=sizes)), {}
    groups = fake_groups([1, 2, 4, 8])  # spawned timing processes start clean of it
    for name, fn, size_args in (("memory", bench_memory, (sizes["memory"], groups)),
                                ("attention", bench_attention, (sizes["attention"], groups)),
                                ("flops", bench_flops, (sizes["flops"],)),
                                ("communication", bench_communication, (sizes["memory"], groups)),
                                ("time", bench_time, (sizes["time"],)),
                                ("floor", bench_floor, (sizes["floor"],)),
                                ("cuda", bench_cuda, (sizes["cuda"],)),
                                ("frontier", bench_frontier, (sizes["frontier"], groups)),
                                ("autoshard", bench_autoshard, (sizes["autoshard"],))):
        if args.only not in (None, name):
            continue
        start = time.perf_counter()
        result[name] = fn(*size_args)
        seconds[name] = time.perf_counter() - start
    result["meta"]["seconds"] = seconds
    print("\nseconds per section: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
