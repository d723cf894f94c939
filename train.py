"""train.py: train, resume and sample nanosp's GPT with tensor x data parallelism.

    python train.py                                        # one process, tiny model, stdlib bytes
    torchrun --nproc_per_node=4 train.py --tp 2            # 2 tensor-parallel groups of 2, data parallel
    python train.py --sample --from out --prompt "def "    # sample from out/ckpt.pt
    python train.py --init gpt2:gpt2 --lr 1e-4             # fine-tune a Hugging Face GPT-2 directory

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
- --dtype bfloat16 is Megatron-LM's mixed precision (build_model); checkpoints hold the float32
  master weights.
- Tokens are bytes (vocab 256), or the ids of the tokenizer of --init gpt2:DIR, a Hugging Face
  GPT-2 directory (gpt2.py; nothing is downloaded), which the checkpoint keeps, so --resume and
  --sample use it wherever DIR has gone. --sample --from DIR samples from such a directory.
- Beside it, one file per concern: checks.py checks every option and file before any work (a bad
  one is one line, exit code 2, on every rank alike); guards.py keeps a run whole through what a
  cluster does (a rank that stops answering, restarts, SIGTERM, a diverging loss, a second run
  into --out-dir, a failed write); metrics.py times the steps and writes each logged record.
"""
import argparse
import dataclasses
import io
import math
import os
import signal
import socket
from datetime import timedelta


def stopped_before_the_steps(signum, frame):  # SIGTERM or Ctrl-C before the steps (guards.StopSignals then)
    line = f"train.py: stopped by {signal.Signals(signum).name} before the first step; nothing was written\n"
    if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for every rank; there is nothing to save
        os.write(2, line.encode())  # stderr, unbuffered: the process ends on the next line
    os._exit(128 + signum)


if __name__ == "__main__":  # set before `import torch`, which alone takes seconds
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped_before_the_steps)

import torch
import torch.distributed as dist

import checks
import gpt2
import guards
import ledgers
import metrics
import nanosp
from checks import SHAPE_KEYS, byte_size, int_list
from guards import Failure, Usage

PRESETS = {  # model shape; vocab 256 = bytes
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}
MULTI_NODE = """multi-node (the same command on every node; HOST runs the rendezvous, JOB names the run):
  torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
      train.py --preset gpt2 --tp 8 --sequence-parallel --recompute selective --dtype bfloat16

exit codes: 0 done, 1 failed, 2 bad option or file, 3 diverged (a non-finite loss or gradient norm),
130 / 143 stopped by SIGINT / SIGTERM after writing the checkpoint of the last step (before the first: none)"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other error here, not the whole usage
        raise Usage(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], epilog=MULTI_NODE,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, help="model shape (default tiny)")
    for name in ("n-layer", "n-head", "n-embd", "block-size"):
        a(f"--{name}", type=int, help="override the preset")
    a("--no-bias", dest="bias", action="store_const", const=False, help="no biases in linears and LayerNorms")
    a("--tp", type=int, help="tensor-parallel size t, dividing the world size (default: all ranks)")
    a("--sequence-parallel", action="store_true")
    a("--recompute", choices=nanosp.RECOMPUTE_MODES, help="for every layer (default none)")
    a("--attention", choices=nanosp.ATTENTIONS, help="the core attention written out, or F.scaled_dot_product_"
      "attention (no dropout); default explicit, or the checkpoint's")
    a("--activation-budget", type=byte_size, metavar="SIZE",
      help="per rank, e.g. 2GiB: before each step, recompute the fewest FLOPs whose activations fit "
           "(ledgers.plan_recompute); re-planned whenever the batch length changes")
    a("--dropout", type=float, default=0.0)
    a("--batch-size", type=int, default=16, help="global sequences per optimizer step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--seq-len", type=int, help="default: the block size")
    a("--seq-len-schedule", type=int_list, metavar="T1,T2,...",
      help="the training batches' lengths, step after step, round and round (default: --seq-len)")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min-lr", type=float, help="end of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=10)
    a("--max-steps", "--steps", dest="max_steps", type=int, default=200, help="length of the schedule")
    a("--stop-after", type=int, help="end this run after this step (the schedule still runs to --max-steps); "
                                      "0: write the initial (or --init) weights as a step-0 checkpoint")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0, help="global-norm clip; 0 = off")
    a("--seed", type=int, help="weights, data order and dropout masks (default 0, or the checkpoint's)")
    a("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
      help="of the model; bfloat16 keeps float32 master weights and AdamW state")
    a("--device", help="cpu or cuda (default: cuda if available); cuda uses NCCL and LOCAL_RANK")
    a("--no-kernels", dest="kernels", action="store_false",
      help="on CUDA, nanosp's PyTorch definitions of the fused ops instead of kernels.py's")
    a("--compile", action="store_true", help="torch.compile each layer (needs --dropout 0: the masks' key "
      "changes every step, and each step would compile again)")
    a("--timeout", type=float, default=120,
      help="seconds any process group waits for a collective before the run fails; must exceed a "
      "checkpoint write (rank 0 writes, the rest wait)")
    a("--out-dir", default="out", help="for ckpt.pt and log.jsonl; one that holds a run needs --resume")
    a("--eval-interval", type=int, default=50)
    a("--eval-iters", type=int, default=10)
    a("--log-interval", type=int, default=10)
    a("--ckpt-interval", type=int, default=100, help="0 = only at the end of the run")
    a("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt when it exists")
    a("--init", help="gpt2:DIR, a Hugging Face GPT-2 model directory (config.json, model.safetensors or "
      "pytorch_model.bin, and its tokenizer); or gpt2:FILE, a torch-saved GPT-2 state dict")
    a("--data", help="a file read as bytes, or as UTF-8 text by the tokenizer of --init (default: the Python "
      "standard library's *.py)")
    a("--sample", action="store_true", help="generate text from --from DIR instead of training")
    a("--from", dest="from_dir", default="out", help="a run's --out-dir, or a Hugging Face GPT-2 model directory")
    a("--prompt", default="\n")
    a("--max-new-tokens", type=int, default=200)
    a("--temperature", type=float, default=0.8, help="0 = greedy")
    a("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = off")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data (checks.read_data reads it): bytes or a tokenizer's ids, a batch a pure function of (seed, step)


def get_batch(data, rows, seq_len, seed):
    """`rows` random windows of data; the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - seq_len, (rows,), generator=gen)
    chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # (rows, seq_len + 1)
    return chunk[:, :-1], chunk[:, 1:]


def batch_seed(seed, step, split):  # train: steps 1.., val: eval iterations 0..
    return (seed * 1_000_003 + step) * 2 + (split == "val")


# ----------------------------------------------------------------------------------------------
# the run: every option and file checked (checks.py), then the world joined


def model_config(args, ckpt, ckpt_path, pretrained):
    """The model's shape from --preset and its overrides, or from the checkpoint, or from the
    config.json of a Hugging Face model directory (--init's, or --from's when sampling)."""
    given = dict(PRESETS[args.preset]) if args.preset else {}
    given.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")
                  if getattr(args, k) is not None})
    if args.seed is not None and not args.sample:  # when sampling, --seed seeds the sampler only
        given["seed"] = args.seed
    shape = {**PRESETS["tiny"], "bias": True, "seed": 0, **given}
    decided = None
    if ckpt is not None:
        decided, source = ckpt["config"], f"checkpoint {ckpt_path}"
    elif pretrained is not None:  # config.json has no seed: the options' (default 0)
        decided, source = {**pretrained.shape, "seed": shape["seed"]}, os.path.join(pretrained.path, "config.json")
    if decided is not None:  # it decides the shape; options that contradict it are errors
        for key in SHAPE_KEYS:
            if key in given and given[key] != decided[key]:
                raise Usage(f"{source} has {key}={decided[key]}, but {key}={given[key]} was given; drop the "
                            f"option" + (" or use another --out-dir" if ckpt is not None else ""))
        shape = {k: decided[k] for k in SHAPE_KEYS}
    # the attention a resumed run used, unless --attention says otherwise (the weights are the same)
    attention = args.attention or (ckpt["config"].get("attention", "explicit") if ckpt is not None else "explicit")
    try:
        return nanosp.GPTConfig(**shape, dropout=args.dropout, sequence_parallel=args.sequence_parallel,
                                recompute=args.recompute or "none", attention=attention, fused_kernels=args.kernels)
    except ValueError as e:
        raise Usage(f"checkpoint {ckpt_path}: {e}" if ckpt is not None else e) from None


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run needs, read and checked once by build_run; nothing changes it after."""
    args: argparse.Namespace   # the options, as given
    cfg: nanosp.GPTConfig      # the model's (its seed: weights, data order, dropout)
    t: int                     # tensor-parallel size
    dp: int                    # data-parallel size
    rank: int
    dp_rank: int               # which data-parallel replica this rank belongs to
    rows: int                  # sequences per micro-step per data-parallel replica
    device: torch.device
    ckpt_path: str             # OUT_DIR/ckpt.pt, or FROM/ckpt.pt when sampling
    ckpt: dict | None          # the checkpoint resumed or sampled from
    init: dict | None          # the weights to start from (the checkpoint's, --init's, --from's); None: seeded
    init_source: str           # what names them in an error
    tokenizer: gpt2.Tokenizer | None  # None: tokens are bytes
    prompt: list | None        # --prompt's token ids, when sampling
    seq_len: int               # of the validation batches
    seq_lens: tuple            # of the training batches, step after step, round and round
    plans: dict                # --activation-budget's {T: ledgers.RecomputePlan}; {}: none
    data: tuple | None         # (training tokens, validation tokens)
    tp_group: object           # the process groups; None: a group of one rank
    dp_group: object
    peers: list                # (host, pid) of every rank
    lock: guards.DirectoryLock | None  # rank 0's, on --out-dir
    signals: guards.StopSignals        # installed while the steps run


def build_run(args, world, rank):
    """Checks the options and reads the files, cheap checks first; the last check makes --out-dir,
    so a run refused for any other reason leaves nothing behind. Then joins the world, and rank 0
    locks --out-dir (one run per directory)."""
    checks.check_options(args)
    device = checks.pick_device(args)
    t, dp = checks.check_layout(args, world)
    rows = args.batch_size // (dp * args.grad_accum)
    ckpt_path = os.path.join(args.from_dir if args.sample else args.out_dir, "ckpt.pt")
    ckpt, pretrained = checks.read_sources(args, ckpt_path)
    cfg = model_config(args, ckpt, ckpt_path, pretrained)
    cfg.check_tensor_parallel(t)
    tokenizer = checks.read_tokenizer(ckpt, ckpt_path, pretrained, cfg.vocab_size)
    seq_len = cfg.block_size if args.seq_len is None else args.seq_len
    seq_lens = tuple(args.seq_len_schedule or [seq_len])
    init = ckpt["model"] if ckpt else pretrained.state_dict if pretrained else None
    prompt, plans, data = None, {}, None
    if args.sample:
        prompt = list(args.prompt.encode()) if tokenizer is None else tokenizer.encode(args.prompt, "--prompt")
    else:
        checks.check_sequences(cfg, t, seq_len, seq_lens)
        plans = checks.budget_plans(args, cfg, t, rows, seq_lens)
        data = checks.read_data(args.data, tokenizer, longest=max(seq_len, *seq_lens))
        if args.init and init is None:
            init = checks.read_init_file(args, cfg)
        checks.check_out_dir(args, resuming=args.resume)
    tp_group, dp_group, peers = setup_distributed(device, t, dp, rank, args.timeout)
    lock = guards.DirectoryLock(args.out_dir) if rank == 0 and not args.sample else None  # held until the end
    source = f"checkpoint {ckpt_path}" if ckpt else args.from_dir if args.sample else f"--init {args.init}"
    return Run(args, cfg, t, dp, rank, rank // t, rows, device, ckpt_path, ckpt, init, source, tokenizer, prompt,
               seq_len, seq_lens, plans, data, tp_group, dp_group, peers, lock, guards.StopSignals())


def setup_distributed(device, t, dp, rank, timeout):
    """Joins the torchrun world: (tensor-parallel group, data-parallel group, (host, pid) of every
    rank); a group of one rank is None. Every group waits at most --timeout for a collective."""
    if "RANK" not in os.environ:  # plain `python train.py`: one process, no torch.distributed
        return None, None, []
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait, world = timedelta(seconds=timeout), t * dp
    with guards.collectives("default (all ranks)", timeout), guards.default_signals():
        guards.join_world("nccl" if device.type == "cuda" else "gloo", wait)  # restarts too
        # every rank creates every group, in the same order
        tp_groups = [dist.new_group(list(range(d * t, d * t + t)), timeout=wait) for d in range(dp)]
        dp_groups = [dist.new_group(list(range(r, world, t)), timeout=wait) for r in range(t)]
        peers = [None] * world
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return tp_groups[rank // t] if t > 1 else None, dp_groups[rank % t] if dp > 1 else None, peers


# ----------------------------------------------------------------------------------------------
# the model, the optimizer, the gradient norm, checkpoints


def build_model(cfg, tp_group, device, dtype, state_dict, source, compiled=False):
    """Returns (model in `dtype`, {name: master weight}). The optimizer steps the master weights.
    In float32 and float64 they are the model's own parameters. In bfloat16 they are float32
    copies, as in Megatron-LM's mixed precision: weights, activations and gradients in bf16 (2
    bytes, as Table 2 counts), gradients summed into float32, AdamW in float32, and the updated
    weights rounded to bf16 after each step; bf16 alone would lose every update smaller than
    1/256 of a weight. `source` names the state dict in an error. `compiled`: each layer under
    torch.compile (the input checks and the loss's boolean indexing stay eager)."""
    model = nanosp.GPT(cfg, group=tp_group)
    model.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    if state_dict is not None:
        try:
            model.load_full_state_dict(state_dict)
        except ValueError as e:  # the same on every rank: all fail alike
            raise Usage(f"{source}: {e}") from None
    for block in model.h if compiled else ():
        block.compile()
    if dtype != torch.bfloat16:
        return model, dict(model.named_parameters())
    masters = {name: torch.nn.Parameter(p.detach().clone()) for name, p in model.named_parameters()}
    return model.to(dtype), masters


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
    """The gradient norm of the unsharded model, identical on every rank of the TP group; the
    sharded parameters are those model.shard_dims names."""
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


def resume(run, model, masters, optimizer):
    """The step to start after: the checkpoint's (its AdamW state and dropout count loaded), or 0."""
    if run.args.resume:
        say(run, f"resuming from {run.ckpt_path} at step {run.ckpt['step']}" if run.ckpt else
            f"--resume: no checkpoint at {run.ckpt_path}, starting fresh")
    if run.ckpt is None:
        return 0
    load_optimizer_state(model, masters, optimizer, run.ckpt["optimizer"])
    model.forward_count = run.ckpt["forward_count"]
    return run.ckpt["step"]


def save_checkpoint(run, model, masters, optimizer, guard, step):
    """The master weights (float32 under bfloat16), unsharded: model.full_state_dict() of them."""
    with guards.collectives("default (all ranks)", run.args.timeout):
        guard.check_weights(masters, step)  # never replaces a checkpoint with non-finite weights
    if run.dp_rank != 0:  # DP replicas hold the same weights: only replica 0's TP group gathers
        return
    weights = {name: model.full_tensor(name, p.detach()).cpu() for name, p in masters.items()}
    options = {**vars(run.args), "seed": run.cfg.seed, "seq_len": run.seq_len}  # as this run used them
    ckpt = {"model": weights, "optimizer": optimizer_state(model, masters, optimizer),
            "step": step, "config": dataclasses.asdict(model.cfg), "args": options,
            "forward_count": model.forward_count, "tokenizer": run.tokenizer.json if run.tokenizer else None}
    if run.rank == 0:  # serialised in memory first: torch.save hides a failed write's reason
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        guards.write_atomic(run.ckpt_path, buffer.getbuffer())
    guard.saved = step


# ----------------------------------------------------------------------------------------------
# training


def all_reduce_dp(tensor, run):
    """Sums `tensor` over the data-parallel group, in place; nothing to do for one replica."""
    if run.dp_group is not None:
        with guards.collectives("data-parallel", run.args.timeout):
            dist.all_reduce(tensor, group=run.dp_group)


@torch.no_grad()
def evaluate(run, model):
    """Mean loss over --eval-iters fixed validation batches of --batch-size sequences (the same at
    every step), each cut as a training batch is, so the figure does not depend on t, dp or
    --grad-accum: micro-step m of DP replica d evaluates its rows."""
    args, rows = run.args, run.rows
    model.eval()
    losses = torch.zeros(args.eval_iters, dtype=torch.float64, device=run.device)
    for i in range(args.eval_iters):
        x, y = get_batch(run.data[1], args.batch_size, run.seq_len, batch_seed(run.cfg.seed, i, "val"))
        for micro in range(args.grad_accum):
            lo = (micro * run.dp + run.dp_rank) * rows  # this replica's slice of this micro-step
            losses[i] += model(x[lo:lo + rows].to(run.device), y[lo:lo + rows].to(run.device))[1]
    all_reduce_dp(losses, run)
    model.train()
    return losses.mean().item() / (run.dp * args.grad_accum)


def train_step(run, model, masters, optimizer, guard, step, seq_len):
    """One optimizer step on the global batch of `step`; returns (mean loss, gradient norm)."""
    args, dp, dp_rank, rows = run.args, run.dp, run.dp_rank, run.rows
    x_all, y_all = get_batch(run.data[0], args.batch_size, seq_len, batch_seed(run.cfg.seed, step, "train"))
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
    all_reduce_dp(flat, run)
    flat /= dp
    for p, master, g in zip(params, master_list, flat[:-1].split([p.numel() for p in params])):
        p.grad = None
        master.grad = g.view_as(master)
    norm = grad_norm(model, masters)
    with guards.collectives("default (all ranks)", args.timeout):
        guard.check_step(step, flat[-1], norm)  # raises Diverged before a non-finite step is applied
    if args.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(master_list, args.grad_clip, norm.to(dtype))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if master_list[0] is not params[0]:  # bfloat16: round the updated master weights into the model
        with torch.no_grad():
            for p, master in zip(params, master_list):
                p.copy_(master)
    return flat[-1], norm


def say(run, text):  # rank 0 speaks for every rank
    if run.rank == 0:
        print(text, flush=True)


def every(step, interval):  # interval 0: never
    return interval and step % interval == 0


def train(run):
    """Model, optimizer, then the loop: learning rate, batch length and plan, train_step,
    evaluate, log, checkpoint."""
    args = run.args
    model, masters = build_model(run.cfg, run.tp_group, run.device, getattr(torch, args.dtype), run.init,
                                 run.init_source, compiled=args.compile)
    optimizer = make_optimizer(masters, args)
    start = resume(run, model, masters, optimizer)
    stop = args.max_steps if args.stop_after is None else min(args.max_steps, args.stop_after)
    say(run, metrics.summary(run))
    guard = guards.StepGuard(run.signals, saved=start if run.ckpt else None)
    with guards.open_log(args.out_dir, start, run.rank, args.timeout) as log:
        meter = metrics.Metrics(run, model, log)
        run.signals.install()  # SIGTERM, SIGINT: the run stops after a step that every rank agrees on
        for step in range(start + 1, stop + 1):
            lr = learning_rate(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            T = run.seq_lens[(step - 1) % len(run.seq_lens)]  # a pure function of the step: resumes exactly
            if run.plans:
                model.set_recompute(run.plans[T].modes)
            with meter.timing(tokens=args.batch_size * T):
                loss, norm = train_step(run, model, masters, optimizer, guard, step, T)
            val = evaluate(run, model) if every(step, args.eval_interval) or step == stop else None
            if every(step, args.log_interval) or val is not None or step == start + 1:
                meter.record(step, T, lr, loss, norm, val)
            if every(step, args.ckpt_interval) or step == stop or guard.stopping:
                save_checkpoint(run, model, masters, optimizer, guard, step)
            if guard.stopping:  # every rank got here after the same step
                raise guards.Stopped(guard.stopping, step, run.ckpt_path)
        if start == stop == 0:  # --stop-after 0: the weights as they start, as a checkpoint
            save_checkpoint(run, model, masters, optimizer, guard, 0)
        elif start >= stop:
            say(run, f"{run.ckpt_path} is already at step {start} >= {stop}: nothing to do")


# ----------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def sample(run):
    """Every rank samples with the same generator; logits are identical on every rank, so the
    tokens agree without a broadcast. Rank 0 prints."""
    args, device = run.args, run.device
    cfg = dataclasses.replace(run.cfg, sequence_parallel=False, dropout=0.0)  # any prompt length
    model = build_model(cfg, run.tp_group, device, torch.float32, run.init, run.init_source)[0].eval()
    gen = torch.Generator().manual_seed(args.seed or 0)
    vocab = 256 if run.tokenizer is None else run.tokenizer.vocab_size  # ids that decode to text
    idx = torch.tensor([run.prompt], dtype=torch.long, device=device)
    for _ in range(args.max_new_tokens):
        logits = model(idx[:, -cfg.block_size:])[0][0, -1, :vocab].float().cpu()
        if args.temperature == 0:
            token = logits.argmax()[None]
        else:
            logits = logits / args.temperature
            if args.top_k:
                kth = torch.topk(logits, min(args.top_k, len(logits))).values[-1]
                logits[logits < kth] = -float("inf")
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        idx = torch.cat([idx, token.to(device)[None]], dim=1)
    ids = idx[0].tolist()
    say(run, bytes(ids).decode(errors="replace") if run.tokenizer is None else run.tokenizer.decode(ids))


def main(argv=None):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    run = None
    try:
        run = build_run(parse_args(argv), world, rank)
        # the collectives not named otherwise (the model's, the gradient norm's, the checkpoint's)
        with guards.collectives("tensor-parallel", run.args.timeout):
            if run.args.sample:
                sample(run)
            else:
                train(run)
    except Failure as e:
        guards.fail(e, rank, *(run.peers, run.signals) if run else ())
    except ValueError as e:
        if run is not None:  # after the checks, not a bad option or file: a bug, with its traceback
            raise
        guards.fail(e, rank)
    finally:
        if run is not None:
            run.signals.restore()
            for sig in guards.StopSignals.SIGNALS:  # past the steps now: a signal ends the process as by default
                if signal.getsignal(sig) is stopped_before_the_steps:
                    signal.signal(sig, signal.SIG_DFL)
            if run.lock:
                run.lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
