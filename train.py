"""train.py: train, resume and sample nanosp's GPT with tensor x data parallelism.

    python train.py                                        # one process, tiny model, stdlib bytes
    torchrun --nproc_per_node=4 train.py --tp 2            # 2 tensor-parallel groups of 2, data parallel
    python train.py --sample --from out --prompt "def "    # sample from out/ckpt.pt

What to look for:
- ranks [d*t, ..., d*t+t-1] form tensor-parallel (TP) group d, so TP stays inside a node; ranks
  {r, r+t, r+2t, ...} form a data-parallel (DP) group. DP gradients are averaged by one visible
  all_reduce per step over a flat buffer (the step's loss rides along as its last element).
- The global batch of step s is a pure function of (seed, s); micro-step m of DP replica d reads
  its slice. So t, dp and --grad-accum change only how the batch is cut, and a resumed run sees
  the batches the uninterrupted run would have seen.
- Gradient clipping by the global norm: the squared norms of sharded parameters are summed over
  the TP group, replicated ones (LayerNorms, wpe, row-parallel biases) counted once.
- Checkpoints are unsharded (model and AdamW state), written atomically by rank 0, and resume at
  any t and dp. Weight decay goes to parameters with 2 or more dimensions only (matrices and
  embeddings), never to biases or LayerNorm weights.
- Dropout masks are a pure function of (seed, model.forward_count, ...). Before each micro-step
  forward_count is set to (global micro-step) * dp + (DP rank): DP replicas draw independent masks
  (not slices of one global mask, so dropout > 0 runs at different dp differ), and resume is exact.
- --resume without a checkpoint in --out-dir starts fresh (and says so), so one command line
  serves both the first submission of a job and its restarts. --init is ignored when resuming.
- --dtype bfloat16 is mixed precision as Megatron-LM does it: the model (weights, activations,
  gradients, collectives) in bf16, float32 master weights and AdamW state that the optimizer
  steps, rounded back into the model after each step. Checkpoints hold the float32 masters.
- Tokens are bytes (vocab 256) even for --init gpt2:PATH: GPT-2's first 256 token ids are reused
  as bytes, and sampling is restricted to them.
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import sysconfig
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import nanosp

PRESETS = {  # model shape; vocab 256 = bytes
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "seed")
MULTI_NODE = """multi-node (run on every node, same --master-addr, --node-rank 0..N-1):
  torchrun --nnodes=2 --node-rank=0 --nproc-per-node=8 --master-addr=HOST --master-port=29500 \\
      train.py --preset gpt2 --tp 8 --sequence-parallel --recompute selective --dtype bfloat16"""


class Usage(Exception):
    """A bad option or file: printed as one line by rank 0, exit code 2, on every rank alike."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=MULTI_NODE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, help="model shape (default tiny)")
    for name in ("n-layer", "n-head", "n-embd", "block-size"):
        a(f"--{name}", type=int, help="override the preset")
    a("--no-bias", dest="bias", action="store_const", const=False, help="no biases in linears and LayerNorms")
    a("--tp", type=int, help="tensor-parallel size t, dividing the world size (default: all ranks)")
    a("--sequence-parallel", action="store_true")
    a("--recompute", choices=nanosp.RECOMPUTE_MODES, default="none")
    a("--dropout", type=float, default=0.0)
    a("--batch-size", type=int, default=16, help="global sequences per optimizer step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--seq-len", type=int, help="default: the block size")
    a("--lr", type=float, default=1e-3)
    a("--min-lr", type=float, help="end of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=10)
    a("--max-steps", "--steps", dest="max_steps", type=int, default=200, help="length of the schedule")
    a("--stop-after", type=int, help="end this run after this step (the schedule still runs to --max-steps)")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0, help="global-norm clip; 0 = off")
    a("--seed", type=int, help="weights, data order and dropout masks (default 0, or the checkpoint's)")
    a("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
      help="of the model; bfloat16 keeps float32 master weights and AdamW state")
    a("--device", help="cpu or cuda (default: cuda if available); cuda uses NCCL and LOCAL_RANK")
    a("--timeout", type=float, default=120,
      help="seconds before a stuck collective fails; must exceed a checkpoint write (rank 0 writes, the rest wait)")
    a("--out-dir", default="out")
    a("--eval-interval", type=int, default=50)
    a("--eval-iters", type=int, default=10)
    a("--log-interval", type=int, default=10)
    a("--ckpt-interval", type=int, default=100, help="0 = only at the end of the run")
    a("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt when it exists")
    a("--init", help="gpt2:PATH, a torch-saved Hugging Face GPT-2 state dict")
    a("--data", help="a file read as bytes (default: the Python standard library's *.py)")
    a("--sample", action="store_true", help="generate text from --from DIR instead of training")
    a("--from", dest="from_dir", default="out")
    a("--prompt", default="\n")
    a("--max-new-tokens", type=int, default=200)
    a("--temperature", type=float, default=0.8, help="0 = greedy")
    a("--top-k", type=int, default=50)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data: bytes, a pure function of (seed, step)


def load_bytes(path, cap=8 << 20):
    if path:
        if not os.path.isfile(path):
            raise Usage(f"--data {path}: no such file")
        with open(path, "rb") as f:
            data = f.read()
    else:  # the stdlib's own *.py files, sorted by path, without site-packages
        root, paths = sysconfig.get_paths()["stdlib"], []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
            paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
        chunks, size = [], 0
        for path in sorted(paths):
            if size >= cap:
                break
            with open(path, "rb") as f:
                chunks.append(f.read())
            size += len(chunks[-1])
        data = b"".join(chunks)[:cap]
    data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n = int(len(data) * 0.9)  # the last 10% is validation
    return data[:n], data[n:]


def get_batch(data, rows, seq_len, seed):
    """`rows` random windows of data; the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - seq_len, (rows,), generator=gen)
    chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # (rows, seq_len + 1)
    return chunk[:, :-1], chunk[:, 1:]


def batch_seed(seed, step, split):  # train: steps 1.., val: eval iterations 0..
    return (seed * 1_000_003 + step) * 2 + (split == "val")


# ----------------------------------------------------------------------------------------------
# set-up: everything is validated before the first collective, so all ranks fail alike


def model_config(args, ckpt, ckpt_path):
    """The model's shape from --preset and its overrides, or from the checkpoint when there is one."""
    given = dict(PRESETS[args.preset]) if args.preset else {}
    given.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")
                  if getattr(args, k) is not None})
    if args.seed is not None and not args.sample:  # when sampling, --seed seeds the sampler only
        given["seed"] = args.seed
    shape = {**PRESETS["tiny"], "bias": True, "seed": 0, **given}
    if ckpt is not None:  # the checkpoint decides the shape; options that contradict it are errors
        for key in SHAPE_KEYS:
            if key in given and given[key] != ckpt["config"][key]:
                raise Usage(f"checkpoint {ckpt_path} has {key}={ckpt['config'][key]}, but "
                            f"{key}={given[key]} was given; drop the option or use another --out-dir")
        shape = {k: ckpt["config"][k] for k in SHAPE_KEYS}
    if shape["vocab_size"] < 256:
        raise Usage(f"vocab_size={shape['vocab_size']} cannot hold the 256 byte values")
    return nanosp.GPTConfig(**shape, dropout=args.dropout, sequence_parallel=args.sequence_parallel,
                            recompute=args.recompute)


@dataclasses.dataclass
class Run:
    """What a run needs, built once by `validate` from the options and the files it reads.
    The options themselves (`args`) are kept as given."""
    args: argparse.Namespace
    cfg: nanosp.GPTConfig
    t: int                     # tensor-parallel size
    dp: int                    # data-parallel size
    rank: int
    device: torch.device
    ckpt_path: str             # OUT_DIR/ckpt.pt, or FROM/ckpt.pt when sampling
    ckpt: dict | None = None   # the checkpoint resumed or sampled from
    seed: int = 0              # weights, data order, dropout: --seed, or the checkpoint's
    seq_len: int = 0
    data: tuple | None = None  # (training bytes, validation bytes)
    init: dict | None = None   # --init weights, in nanosp's keys
    tp_group: object = None    # the process groups, set by setup_distributed
    dp_group: object = None

    @property
    def dp_rank(self):  # which data-parallel replica this rank belongs to
        return self.rank // self.t

    @property
    def rows(self):  # sequences per micro-step per data-parallel replica
        return self.args.batch_size // (self.dp * self.args.grad_accum)


def validate(args, world, rank):
    """Checks the options and reads the files; returns the Run."""
    ckpt_path = os.path.join(args.from_dir if args.sample else args.out_dir, "ckpt.pt")
    ckpt = None
    if args.sample and not os.path.isfile(ckpt_path):
        raise Usage(f"--from {args.from_dir}: no checkpoint {ckpt_path}")
    if args.sample or (args.resume and os.path.isfile(ckpt_path)):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = model_config(args, ckpt, ckpt_path)
    t = args.tp or world
    if t < 1 or world % t:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise Usage(f"--tp {t} does not divide the world size {world}; --tp would fit among {divisors}")
    cfg.check_tensor_parallel(t)
    dp = world // t
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and "RANK" in os.environ:  # one GPU per process: LOCAL_RANK's
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    run = Run(args, cfg, t, dp, rank, torch.device(device), ckpt_path, ckpt)
    if args.sample:
        return run
    run.seed = cfg.seed  # the checkpoint's when resuming
    for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise Usage(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    run.seq_len = args.seq_len or cfg.block_size
    try:
        cfg.check_sequence(run.seq_len, t)
    except ValueError as e:
        raise Usage(f"--seq-len {run.seq_len}: {e}") from None
    if args.batch_size % (dp * args.grad_accum):
        raise Usage(f"--batch-size {args.batch_size} is not divisible by dp * grad-accum = {dp} * "
                    f"{args.grad_accum}; a multiple of {dp * args.grad_accum} would fit")
    run.data = load_bytes(args.data)
    if min(len(run.data[0]), len(run.data[1])) <= run.seq_len:
        raise Usage(f"{args.data or 'the stdlib sources'}: {len(run.data[1])} validation bytes, "
                    f"--seq-len {run.seq_len} needs more")
    if args.init and ckpt is None:
        kind, _, path = args.init.partition(":")
        if kind != "gpt2" or not os.path.isfile(path):
            raise Usage(f"--init {args.init}: expected gpt2:PATH of an existing file")
        run.init = gpt2_to_nanosp(torch.load(path, map_location="cpu", weights_only=True), cfg.n_layer)
        needs = {"wte.weight": (cfg.vocab_size, cfg.n_embd), "wpe.weight": (cfg.block_size, cfg.n_embd)}
        for key, want in needs.items():  # (n_head cannot be read off the weights)
            if key in run.init and tuple(run.init[key].shape) != want:
                raise Usage(f"--init {args.init}: {key} is {tuple(run.init[key].shape)}, the model needs "
                            f"{want}; check --preset, --n-embd, --block-size")
    return run


def setup_distributed(run):
    """Joins the torchrun world and makes the process groups (none for a single process)."""
    if "RANK" not in os.environ:  # plain `python train.py`: one process, no torch.distributed
        return
    if run.device.type == "cuda":
        torch.cuda.set_device(run.device)
    dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=run.args.timeout))
    t, dp, world = run.t, run.dp, run.t * run.dp
    # every rank creates every group, in the same order
    tp_groups = [dist.new_group(list(range(d * t, d * t + t))) for d in range(dp)]
    dp_groups = [dist.new_group(list(range(r, world, t))) for r in range(t)]
    run.tp_group = tp_groups[run.rank // t] if t > 1 else None
    run.dp_group = dp_groups[run.rank % t] if dp > 1 else None


# ----------------------------------------------------------------------------------------------
# GPT-2 weights


def gpt2_to_nanosp(hf_state_dict, n_layer):
    """Hugging Face GPT-2 layout -> nanosp keys. Conv1D stores (in, out): transpose to nn.Linear's
    (out, in). The causal-mask buffers and the tied lm_head are dropped."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for key, value in hf_state_dict.items():
        key = key.removeprefix("transformer.")
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[key] = value.t().contiguous() if key.endswith(conv1d) else value
    layers = len({k.split(".")[1] for k in out if k.startswith("h.")})
    if layers != n_layer:
        raise ValueError(f"the GPT-2 state dict has {layers} layers, the model n_layer={n_layer}")
    return out


# ----------------------------------------------------------------------------------------------
# optimizer, schedule, gradient norm, checkpoints


def learning_rate(step, args):  # step counts from 1; warmup, then cosine to min_lr at max_steps
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step <= args.warmup_steps:
        return args.lr * step / args.warmup_steps
    ratio = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


def make_optimizer(masters, args):
    """AdamW over the master weights, {name: parameter}."""
    groups = [{"params": [p for p in masters.values() if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in masters.values() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def grad_norm(model, masters):
    """The gradient norm of the unsharded model, identical on every rank of the TP group.
    model.shard_dims names the sharded parameters (the vocab-parallel embedding, column-parallel
    weights and biases, row-parallel weights); the rest are replicated on every rank."""
    sharded, replicated = (torch.zeros((), dtype=torch.float64, device=model.wpe.weight.device) for _ in "ab")
    for name, p in masters.items():
        (sharded if name in model.shard_dims else replicated).add_(p.grad.double().pow(2).sum())
    if model.tp_size > 1:  # each rank holds a different piece of the sharded ones; replicated count once
        dist.all_reduce(sharded, group=model.group)
    return (sharded + replicated).sqrt()


def optimizer_state(model, masters, optimizer):
    """Collective over the TP group: AdamW's state, unsharded, keyed by parameter name."""
    state = {}
    for name, p in masters.items():
        s = optimizer.state.get(p)
        if s:
            state[name] = {"step": float(s["step"]), "exp_avg": model.full_tensor(name, s["exp_avg"]).cpu(),
                           "exp_avg_sq": model.full_tensor(name, s["exp_avg_sq"]).cpu()}
    return state


def load_optimizer_state(model, masters, optimizer, state):
    index = {p: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    local = {}
    for name, p in masters.items():
        if name in state:
            s = state[name]
            local[index[p]] = {"step": torch.tensor(s["step"]),
                               "exp_avg": model.local_tensor(name, s["exp_avg"]),
                               "exp_avg_sq": model.local_tensor(name, s["exp_avg_sq"])}
    optimizer.load_state_dict({"state": local, "param_groups": optimizer.state_dict()["param_groups"]})


def save_atomic(obj, path):
    """torch.save to a temp file beside `path`, fsync, then rename onto it: a crash at any moment
    leaves either the old complete file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make ckpt.pt private
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(run, model, masters, optimizer, step):
    """The master weights (float32 under bfloat16), unsharded: model.full_state_dict() of them."""
    if run.dp_rank != 0:  # DP replicas hold the same weights: only replica 0's TP group gathers
        return
    weights = {name: model.full_tensor(name, p.detach()).cpu() for name, p in masters.items()}
    options = {**vars(run.args), "seed": run.seed, "seq_len": run.seq_len}  # as this run used them
    ckpt = {"model": weights, "optimizer": optimizer_state(model, masters, optimizer),
            "step": step, "config": dataclasses.asdict(model.cfg), "args": options,
            "forward_count": model.forward_count}
    if run.rank == 0:
        save_atomic(ckpt, run.ckpt_path)


# ----------------------------------------------------------------------------------------------
# training


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(run, model):
    """Mean loss over --eval-iters fixed validation batches (the same at every step)."""
    rows, lo = run.rows, run.dp_rank * run.rows  # this replica's slice of each batch
    model.eval()
    losses = torch.zeros(run.args.eval_iters, dtype=torch.float64, device=run.device)
    for i in range(run.args.eval_iters):
        x, y = get_batch(run.data[1], rows * run.dp, run.seq_len, batch_seed(run.seed, i, "val"))
        losses[i] = model(x[lo:lo + rows].to(run.device), y[lo:lo + rows].to(run.device))[1]
    if run.dp_group is not None:
        dist.all_reduce(losses, group=run.dp_group)
    model.train()
    return losses.mean().item() / run.dp


def build_model(cfg, tp_group, device, dtype, state_dict):
    """Returns (model in `dtype`, {name: master weight}). The optimizer steps the master weights.
    In float32 and float64 they are the model's own parameters. In bfloat16 they are float32
    copies, as in Megatron-LM's mixed precision: weights, activations and gradients in bf16 (2
    bytes, as Table 2 counts), gradients summed into float32, AdamW in float32, and the updated
    weights rounded to bf16 after each step; bf16 alone would lose every update smaller than
    1/256 of a weight."""
    model = nanosp.GPT(cfg, group=tp_group).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    if state_dict is not None:
        try:
            model.load_full_state_dict(state_dict)
        except ValueError as e:  # the same on every rank: all fail alike
            raise Usage(e) from None
    if dtype != torch.bfloat16:
        return model, dict(model.named_parameters())
    masters = {name: torch.nn.Parameter(p.detach().clone()) for name, p in model.named_parameters()}
    return model.to(dtype), masters


def train_step(run, model, masters, optimizer, step):
    """One optimizer step on the global batch of `step`; returns (mean loss, gradient norm)."""
    args, dp, dp_rank, rows = run.args, run.dp, run.dp_rank, run.rows
    x_all, y_all = get_batch(run.data[0], args.batch_size, run.seq_len, batch_seed(run.seed, step, "train"))
    params = list(model.parameters())  # in the order of masters
    loss_sum = 0.0
    for micro in range(args.grad_accum):
        lo = (micro * dp + dp_rank) * rows  # this replica's slice of this micro-step
        model.forward_count = ((step - 1) * args.grad_accum + micro) * dp + dp_rank  # dropout key
        loss = model(x_all[lo:lo + rows].to(run.device), y_all[lo:lo + rows].to(run.device))[1]
        (loss / args.grad_accum).backward()
        loss_sum = loss_sum + loss.detach()
    # the data-parallel all-reduce: every local gradient and the loss, one flat buffer (DDP would
    # bucket it and overlap it with backward; here it is one visible call after backward)
    # in the masters' dtype: under bfloat16 the gradients are summed in float32
    master_list = list(masters.values())
    dtype = master_list[0].dtype
    flat = torch.cat([p.grad.reshape(-1).to(dtype) for p in params] + [(loss_sum / args.grad_accum).reshape(1)])
    if run.dp_group is not None:
        dist.all_reduce(flat, group=run.dp_group)
        flat /= dp
    for p, master, g in zip(params, master_list, flat[:-1].split([p.numel() for p in params])):
        p.grad = None
        master.grad = g.view_as(master)
    norm = grad_norm(model, masters)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(master_list, args.grad_clip, norm.to(dtype))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if master_list[0] is not params[0]:  # bfloat16: round the updated master weights into the model
        with torch.no_grad():
            for p, master in zip(params, master_list):
                p.copy_(master)
    return flat[-1], norm


def train(run):
    args, cfg, ckpt = run.args, run.cfg, run.ckpt
    setup_distributed(run)
    model, masters = build_model(cfg, run.tp_group, run.device, getattr(torch, args.dtype),
                                 ckpt["model"] if ckpt else run.init)
    optimizer, start = make_optimizer(masters, args), 0
    if ckpt is not None:
        load_optimizer_state(model, masters, optimizer, ckpt["optimizer"])
        start, model.forward_count = ckpt["step"], ckpt["forward_count"]
    say = print if run.rank == 0 else (lambda *a, **k: None)
    if args.resume:
        say(f"resuming from {run.ckpt_path} at step {start}" if ckpt else
            f"--resume: no checkpoint at {run.ckpt_path}, starting fresh")
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a" if ckpt else "w") if run.rank == 0 else None
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    say(f"tp={run.t} dp={run.dp} sequence_parallel={cfg.sequence_parallel} recompute={cfg.recompute}, "
        f"{cfg.n_layer} layers x {cfg.n_embd}, batch {args.batch_size} x {run.seq_len} tokens in "
        f"{args.grad_accum} micro-steps, {run.device}, {args.dtype}")
    timer, timed_steps = 0.0, 0
    for step in range(start + 1, stop + 1):
        t0 = time.perf_counter()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, norm = train_step(run, model, masters, optimizer, step)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        timer, timed_steps = timer + time.perf_counter() - t0, timed_steps + 1

        val = None
        if (args.eval_interval and step % args.eval_interval == 0) or step == stop:
            val = evaluate(run, model)
        if step % args.log_interval == 0 or val is not None or step == start + 1:
            ms = 1000 * timer / timed_steps  # mean over the steps since the last line
            record = {"step": step, "loss": loss.item(), "val_loss": val, "lr": lr, "grad_norm": norm.item(),
                      "tokens_per_s": args.batch_size * run.seq_len / (ms / 1000), "ms": ms,
                      "mem_bytes": peak_memory(run.device), "tp": run.t, "dp": run.dp,
                      "sequence_parallel": cfg.sequence_parallel, "recompute": cfg.recompute}
            timer, timed_steps = 0.0, 0
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
                say(progress_line(record, args.max_steps), flush=True)
        if (args.ckpt_interval and step % args.ckpt_interval == 0) or step == stop:
            save_checkpoint(run, model, masters, optimizer, step)
    if start >= stop:
        say(f"{run.ckpt_path} is already at step {start} >= {stop}: nothing to do")
    if log:
        log.close()


def progress_line(r, max_steps):
    val = f" | val {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
    return (f"step {r['step']:>{len(str(max_steps))}}/{max_steps} {100 * r['step'] // max_steps:3d}% "
            f"| loss {r['loss']:.4f}{val} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s "
            f"| {r['ms']:.1f} ms | mem {r['mem_bytes'] / 2**20:,.0f} MiB")


# ----------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def sample(run):
    """Every rank samples with the same generator; logits are identical on every rank, so the
    tokens agree without a broadcast. Rank 0 prints."""
    args, device = run.args, run.device
    cfg = dataclasses.replace(run.cfg, sequence_parallel=False, dropout=0.0)  # any prompt length
    setup_distributed(run)
    model = build_model(cfg, run.tp_group, device, torch.float32, run.ckpt["model"])[0].eval()
    gen = torch.Generator().manual_seed(args.seed or 0)
    idx = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)
    for _ in range(args.max_new_tokens):
        logits = model(idx[:, -cfg.block_size:])[0][0, -1, :256].float().cpu()  # bytes only
        if args.temperature == 0:
            token = logits.argmax()[None]
        else:
            logits = logits / args.temperature
            if args.top_k:
                kth = torch.topk(logits, min(args.top_k, len(logits))).values[-1]
                logits[logits < kth] = -float("inf")
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        idx = torch.cat([idx, token.to(device)[None]], dim=1)
    if run.rank == 0:
        print(bytes(idx[0].tolist()).decode(errors="replace"))


def fail(error, rank):
    """Every rank fails alike; rank 0 says why. The others wait a moment before exiting, because
    torchrun kills the remaining ranks as soon as one exits non-zero, maybe before rank 0 printed."""
    if rank == 0:
        print(f"train.py: error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        run = validate(args, world, rank)
    except (Usage, ValueError) as e:
        fail(e, rank)
    try:
        if args.sample:
            sample(run)
        else:
            train(run)
    except Usage as e:
        fail(e, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
