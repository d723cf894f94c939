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
- --dtype bfloat16 is mixed precision as Megatron-LM does it: the model (weights, activations,
  gradients, collectives) in bf16, float32 master weights and AdamW state that the optimizer
  steps, rounded back into the model after each step. Checkpoints hold the float32 masters.
- Tokens are bytes (vocab 256), or the ids of the tokenizer of --init gpt2:DIR, a Hugging Face
  GPT-2 model directory read by gpt2.py: its config.json gives the shape, and its tokenizer, when it
  has one, encodes --data and --prompt and decodes the samples. The checkpoint keeps that tokenizer
  (its tokenizer.json text), so --resume and --sample use the same one wherever DIR has gone.
  Nothing is downloaded. --sample --from DIR samples from such a directory directly.
- Failing safely. Every option and every file read is checked before any work, on every rank
  alike: a bad one is one line on stderr and exit code 2. A run never overwrites another: an
  --out-dir that holds one is refused unless --resume continues it, and --out-dir is proven
  writable before the first step. Every process group waits at most --timeout seconds for a
  collective, so a rank that stops answering ends the run with one line (exit code 1): the rank
  that notices ends this host's other ranks, even a stopped one (SIGSTOP), which torchrun's SIGTERM
  cannot end. A failed checkpoint write keeps the previous checkpoint.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import gpt2
import ledgers
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


class Failure(Exception):
    """A run that cannot go on (a collective timed out, a write failed): one line, exit code 1."""
    code = 1


class Timeout(Failure):
    """A collective that timed out: the run is over, so this host's other ranks are ended too."""


class Usage(Failure):
    """A bad option or file: one line, exit code 2, on every rank alike."""
    code = 2


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
# data: bytes or a tokenizer's ids, a pure function of (seed, step)


def load_data(path, tokenizer, cap=8 << 20):
    """(training tokens, validation tokens), the last 10% for validation: the bytes of the file (or
    of the stdlib's *.py), or, with a tokenizer, the ids of their text."""
    if path:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:  # no such file, a directory, permission denied
            raise Usage(f"--data {path}: {e.strerror.lower()}") from None
        if not data:
            raise Usage(f"--data {path} is empty")
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
    if tokenizer is None:
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        try:  # the stdlib's: a file in another encoding, or a character cut at the cap, reads as U+FFFD
            text = data.decode("utf-8", errors="strict" if path else "replace")
        except UnicodeDecodeError as e:
            raise Usage(f"--data {path} is not UTF-8 text (byte {e.start}), which the tokenizer needs") from None
        data = torch.tensor(encode(tokenizer, text, f"--data {path or '(the stdlib sources)'}"), dtype=torch.int32)
    n = int(len(data) * 0.9)  # the last 10% is validation
    return data[:n], data[n:]


def encode(tokenizer, text, what):
    """The token ids of `text`: its UTF-8 bytes, or the tokenizer's ids (checked to decode back to it)."""
    if tokenizer is None:
        return list(text.encode())
    try:
        return tokenizer.encode(text, what)
    except ValueError as e:
        raise Usage(e) from None


def decode(tokenizer, ids):
    return bytes(ids).decode(errors="replace") if tokenizer is None else tokenizer.decode(ids)


def get_batch(data, rows, seq_len, seed):
    """`rows` random windows of data; the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - seq_len, (rows,), generator=gen)
    chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # (rows, seq_len + 1)
    return chunk[:, :-1], chunk[:, 1:]


def batch_seed(seed, step, split):  # train: steps 1.., val: eval iterations 0..
    return (seed * 1_000_003 + step) * 2 + (split == "val")


# ----------------------------------------------------------------------------------------------
# set-up: every option and file is checked before any work, so all ranks fail alike


def byte_size(text):
    """'2GiB', '512MiB', '1.5GB', '1000000': bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GiB, 512MiB, 1.5GB, 1000000)") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive size")
    return int(value)


def int_list(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of lengths") from None


def check_options(args):
    """Every number in its range, before anything is read; one line each."""
    def need(name, ok, fits):
        value = getattr(args, name)
        if value is not None and not ok(value):  # (a NaN fails every comparison, so every check)
            raise Usage(f"--{name.replace('_', '-')} {value} {fits}")

    for name in ("n_layer", "n_head", "n_embd", "block_size", "tp", "batch_size", "grad_accum", "seq_len",
                 "max_steps", "eval_iters", "log_interval", "max_new_tokens"):
        need(name, lambda v: v >= 1, "must be at least 1")
    for name in ("stop_after", "warmup_steps", "eval_interval", "ckpt_interval", "top_k"):
        need(name, lambda v: v >= 0, "must be at least 0")
    need("lr", lambda v: 0 < v < math.inf, "must be a finite number > 0")
    for name in ("weight_decay", "grad_clip", "temperature"):
        need(name, lambda v: 0 <= v < math.inf, "must be a finite number >= 0")
    need("min_lr", lambda v: 0 <= v <= args.lr, f"must be in [0, --lr {args.lr}]")
    need("dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")
    need("timeout", lambda v: 0 < v <= 86400, "must be in (0, 86400] seconds")
    need("seed", lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
    if args.activation_budget and args.recompute:
        raise Usage(f"--activation-budget chooses what to recompute: drop --recompute {args.recompute}")
    if args.sample and not args.prompt:
        raise Usage('--prompt "" is empty: sampling continues at least one byte, e.g. --prompt "\\n"')


def pick_device(args):
    """--device, checked: cpu or an available cuda; under torchrun, cuda means GPU LOCAL_RANK."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Usage(f"--device {name} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise Usage(f"--device {name}: train.py runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Usage(f"--device {name}: CUDA is not available here; use --device cpu")
        if "RANK" in os.environ:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if (device.index or 0) >= torch.cuda.device_count():
            raise Usage(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def load_file(path, name):
    """torch.load with weights_only=True (tensors and plain containers, never code). A file that
    cannot be loaded is one line with its `name`; torch.load's own message is about its internals."""
    if os.path.isdir(path):
        raise Usage(f"{name} is a directory, not a file")
    if not os.path.isfile(path):
        raise Usage(f"{name}: no such file")
    if os.path.getsize(path) == 0:
        raise Usage(f"{name} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file fails in a dozen ways (zip, pickle, struct, unicode, EOF)
        raise Usage(f"{name} cannot be loaded: it is not a whole torch.save file of tensors "
                    f"(truncated, damaged, or holding objects that weights_only=True refuses)") from None


def is_tensor_dict(d):
    return isinstance(d, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in d.items())


def check_checkpoint(ckpt, path):
    """What save_checkpoint writes: weights, AdamW state of the same shapes, step, config."""
    def bad(why):
        raise Usage(f"checkpoint {path} {why}; it is not one that train.py wrote")

    if not isinstance(ckpt, dict):
        bad(f"holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in ("model", "optimizer", "step", "config", "forward_count") if k not in ckpt]
    if missing:
        bad(f"has no {', '.join(missing)}")
    if not is_tensor_dict(ckpt["model"]):
        bad("has 'model' that is not a {name: tensor} dict")
    config = ckpt["config"]
    if not isinstance(config, dict) or any(not isinstance(config.get(k), int) for k in SHAPE_KEYS):
        bad(f"has 'config' without the integers {', '.join(SHAPE_KEYS)}")
    for key in ("step", "forward_count"):
        if not isinstance(ckpt[key], int) or ckpt[key] < 0:
            bad(f"has {key}={ckpt[key]!r}, not an integer >= 0")
    if not isinstance(ckpt.get("tokenizer"), (str, type(None))):  # (checkpoints of byte runs may lack it)
        bad(f"has a 'tokenizer' that is a {type(ckpt['tokenizer']).__name__}, not tokenizer.json text")
    optimizer, model = ckpt["optimizer"], ckpt["model"]
    if not isinstance(optimizer, dict):
        bad("has 'optimizer' that is not a dict")
    for name, s in optimizer.items():
        if (name not in model or not isinstance(s, dict) or not isinstance(s.get("step"), (int, float))
                or any(not torch.is_tensor(s.get(k)) or s[k].shape != model[name].shape
                       for k in ("exp_avg", "exp_avg_sq"))):
            bad(f"has AdamW state for {name!r} that does not match its weight")


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
                                recompute=args.recompute or "none", attention=attention)
    except ValueError as e:
        raise Usage(f"checkpoint {ckpt_path}: {e}" if ckpt is not None else e) from None


def init_path(args):
    kind, _, path = args.init.partition(":")
    if kind != "gpt2" or not path:
        raise Usage(f"--init {args.init}: expected gpt2:DIR (a Hugging Face model directory) or gpt2:FILE")
    return path


def load_pretrained(directory, name):
    """A Hugging Face GPT-2 model directory, read by gpt2.py: shape, weights, tokenizer or None."""
    try:
        return gpt2.load(directory)
    except ValueError as e:
        raise Usage(f"{name}: {e}") from None


def load_init_file(args, cfg):
    """--init gpt2:FILE: a torch-saved Hugging Face GPT-2 state dict, in nanosp's keys, checked
    against the shape the options give (n_head cannot be read off the weights)."""
    hf = load_file(init_path(args), f"--init {args.init}")
    if not is_tensor_dict(hf):
        raise Usage(f"--init {args.init} holds a {type(hf).__name__}, not a {{name: tensor}} GPT-2 state dict")
    try:
        return gpt2.hf_to_nanosp(hf, dataclasses.asdict(cfg), f"--init {args.init}")
    except ValueError as e:
        raise Usage(f"{e}; check --preset, --n-layer, --n-embd, --block-size") from None


def checkpoint_tokenizer(ckpt, path):
    """The tokenizer a run used, rebuilt from the tokenizer.json text its checkpoint keeps; None: bytes."""
    if ckpt.get("tokenizer") is None:
        return None
    try:
        return gpt2.Tokenizer(ckpt["tokenizer"], f"the tokenizer in checkpoint {path}")
    except ValueError as e:
        raise Usage(e) from None


def check_out_dir(args, resuming):
    """--out-dir exists (made if need be), is writable, and holds no other run."""
    out = args.out_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise Usage(f"--out-dir {out} cannot be created: {e.strerror.lower()}") from None
    held = [name for name in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out, name))]
    if held and not resuming:
        raise Usage(f"--out-dir {out} already holds a run ({', '.join(held)}); continue it with --resume, "
                    f"or choose another --out-dir")
    try:
        with tempfile.TemporaryFile(dir=out) as f:  # a write, not a permission bit: root ignores those
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise Usage(f"--out-dir {out} is not writable: {e.strerror.lower()}") from None


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
    seq_len: int = 0           # of the validation batches
    seq_lens: tuple = ()       # of the training batches, step after step, round and round
    plans: dict = dataclasses.field(default_factory=dict)  # --activation-budget: {T: its RecomputePlan}
    data: tuple | None = None  # (training tokens, validation tokens)
    init: dict | None = None   # --init's weights (or --from's model directory's), in nanosp's keys
    tokenizer: gpt2.Tokenizer | None = None  # None: tokens are bytes
    prompt: list | None = None  # --prompt's token ids, when sampling
    tp_group: object = None    # the process groups, set by setup_distributed
    dp_group: object = None
    peers: list = dataclasses.field(default_factory=list)  # (host, pid) of every rank

    @property
    def dp_rank(self):  # which data-parallel replica this rank belongs to
        return self.rank // self.t

    @property
    def rows(self):  # sequences per micro-step per data-parallel replica
        return self.args.batch_size // (self.dp * self.args.grad_accum)


def validate(args, world, rank):
    """Checks the options and reads the files; returns the Run. Cheap checks first; the last one
    makes --out-dir, so a run refused for any other reason leaves nothing behind."""
    check_options(args)
    device = pick_device(args)
    t = args.tp or world
    if world % t:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise Usage(f"--tp {t} does not divide the world size {world}; --tp would fit among {divisors}")
    dp = world // t
    if args.batch_size % (dp * args.grad_accum):
        raise Usage(f"--batch-size {args.batch_size} is not divisible by dp * grad-accum = {dp} * "
                    f"{args.grad_accum}; a multiple of {dp * args.grad_accum} would fit")
    ckpt_path = os.path.join(args.from_dir if args.sample else args.out_dir, "ckpt.pt")
    ckpt = pretrained = None
    if args.sample and not os.path.exists(ckpt_path):
        if not os.path.isfile(os.path.join(args.from_dir, "config.json")):
            raise Usage(f"--from {args.from_dir}: no checkpoint {ckpt_path}, nor the config.json of a "
                        f"Hugging Face model directory")
        pretrained = load_pretrained(args.from_dir, f"--from {args.from_dir}")
    elif args.sample or (args.resume and os.path.exists(ckpt_path)):
        ckpt = load_file(ckpt_path, f"checkpoint {ckpt_path}")
        check_checkpoint(ckpt, ckpt_path)
    elif args.init and os.path.isdir(init_path(args)):
        pretrained = load_pretrained(init_path(args), f"--init {args.init}")
    cfg = model_config(args, ckpt, ckpt_path, pretrained)
    cfg.check_tensor_parallel(t)
    run = Run(args, cfg, t, dp, rank, device, ckpt_path, ckpt)
    if ckpt is not None:
        run.tokenizer = checkpoint_tokenizer(ckpt, ckpt_path)
    elif pretrained is not None:
        run.tokenizer = pretrained.tokenizer
    if run.tokenizer is None and cfg.vocab_size < 256:
        raise Usage(f"vocab_size={cfg.vocab_size} cannot hold the 256 byte values")
    if run.tokenizer is not None and run.tokenizer.vocab_size > cfg.vocab_size:
        raise Usage(f"{run.tokenizer.source}: token ids reach {run.tokenizer.vocab_size - 1}, beyond the "
                    f"model's vocab_size={cfg.vocab_size}")
    if args.sample:
        run.prompt = encode(run.tokenizer, args.prompt, "--prompt")
        run.init = pretrained.state_dict if pretrained else None
        return run
    run.seed = cfg.seed  # the checkpoint's when resuming
    run.seq_len = cfg.block_size if args.seq_len is None else args.seq_len
    run.seq_lens = tuple(args.seq_len_schedule or [run.seq_len])
    for T, option in [(run.seq_len, "--seq-len")] + [(T, "--seq-len-schedule") for T in run.seq_lens]:
        try:
            cfg.check_sequence(T, t)
        except ValueError as e:
            raise Usage(f"{option} {T}: {e}") from None
    for T in dict.fromkeys(run.seq_lens) if args.activation_budget else ():
        try:
            run.plans[T] = ledgers.plan_recompute(cfg, t, run.rows, T, getattr(torch, args.dtype), args.activation_budget)
        except ValueError as e:
            raise Usage(f"--activation-budget {args.activation_budget:,}: {e}") from None
    run.data = load_data(args.data, run.tokenizer)
    longest = max(run.seq_len, *run.seq_lens)
    if min(len(run.data[0]), len(run.data[1])) <= longest:
        unit = "bytes" if run.tokenizer is None else "tokens"
        raise Usage(f"--data {args.data or '(the stdlib sources)'}: {len(run.data[1])} validation {unit} "
                    f"(the last 10%), a sequence of {longest} needs more")
    if args.init and ckpt is None:
        run.init = pretrained.state_dict if pretrained else load_init_file(args, cfg)
    check_out_dir(args, resuming=args.resume)
    return run


@contextlib.contextmanager
def collectives(group, run):
    """A collective in this block that times out, or loses a rank, becomes one line that names its
    process group. gloo says which only in the text of a RuntimeError: "... Timed out waiting
    6000ms for recv operation to complete", "... Read error ...: Connection reset by peer"."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        if "timed out" in text or "timeout" in text:
            raise Timeout(f"a collective on the {group} group timed out after {run.args.timeout:g} s: "
                          f"a rank stopped answering") from None
        if "connection reset" in text or "connection closed" in text or "broken pipe" in text:
            raise Failure(f"a collective on the {group} group lost a rank: its process ended") from None
        raise


def setup_distributed(run):
    """Joins the torchrun world and makes the process groups (none for a single process); every
    group waits at most --timeout for a collective."""
    if "RANK" not in os.environ:  # plain `python train.py`: one process, no torch.distributed
        return
    if run.device.type == "cuda":
        torch.cuda.set_device(run.device)
    timeout = timedelta(seconds=run.args.timeout)
    t, dp, world = run.t, run.dp, run.t * run.dp
    with collectives("default (all ranks)", run):
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo", timeout=timeout)
        # every rank creates every group, in the same order
        tp_groups = [dist.new_group(list(range(d * t, d * t + t)), timeout=timeout) for d in range(dp)]
        dp_groups = [dist.new_group(list(range(r, world, t)), timeout=timeout) for r in range(t)]
        run.peers = [None] * world
        dist.all_gather_object(run.peers, (socket.gethostname(), os.getpid()))
        dist.barrier()  # every rank has read the run's files before rank 0 changes --out-dir
    run.tp_group = tp_groups[run.rank // t] if t > 1 else None
    run.dp_group = dp_groups[run.rank % t] if dp > 1 else None


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


def write_atomic(path, data):
    """Writes `data` (bytes) to a temp file beside `path`, fsync, then renames it onto `path`: a
    crash at any moment leaves either the old complete file or the new one, never a torn one. A
    write that fails (disk full, permissions) removes the temp file and keeps the old one."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name.split('.')[0]}-", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise Failure(f"{path} could not be written: {e.strerror.lower()}; the previous one is kept") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def remove_stale_temps(directory):
    """Temp files of writes that a crash interrupted (see write_atomic)."""
    for name in os.listdir(directory):
        if name.startswith((".ckpt-", ".log-")) and name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))


def save_checkpoint(run, model, masters, optimizer, step):
    """The master weights (float32 under bfloat16), unsharded: model.full_state_dict() of them."""
    if run.dp_rank != 0:  # DP replicas hold the same weights: only replica 0's TP group gathers
        return
    weights = {name: model.full_tensor(name, p.detach()).cpu() for name, p in masters.items()}
    options = {**vars(run.args), "seed": run.seed, "seq_len": run.seq_len}  # as this run used them
    ckpt = {"model": weights, "optimizer": optimizer_state(model, masters, optimizer),
            "step": step, "config": dataclasses.asdict(model.cfg), "args": options,
            "forward_count": model.forward_count, "tokenizer": run.tokenizer.json if run.tokenizer else None}
    if run.rank == 0:  # serialised in memory first: torch.save hides a failed write's reason
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        write_atomic(run.ckpt_path, buffer.getbuffer())


# ----------------------------------------------------------------------------------------------
# training


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def all_reduce_dp(tensor, run):
    """Sums `tensor` over the data-parallel group, in place; nothing to do for one replica."""
    if run.dp_group is not None:
        with collectives("data-parallel", run):
            dist.all_reduce(tensor, group=run.dp_group)


@torch.no_grad()
def evaluate(run, model):
    """Mean loss over --eval-iters fixed validation batches (the same at every step)."""
    rows, lo = run.rows, run.dp_rank * run.rows  # this replica's slice of each batch
    model.eval()
    losses = torch.zeros(run.args.eval_iters, dtype=torch.float64, device=run.device)
    for i in range(run.args.eval_iters):
        x, y = get_batch(run.data[1], rows * run.dp, run.seq_len, batch_seed(run.seed, i, "val"))
        losses[i] = model(x[lo:lo + rows].to(run.device), y[lo:lo + rows].to(run.device))[1]
    all_reduce_dp(losses, run)
    model.train()
    return losses.mean().item() / run.dp


def build_model(cfg, tp_group, device, dtype, state_dict, source):
    """Returns (model in `dtype`, {name: master weight}). The optimizer steps the master weights.
    In float32 and float64 they are the model's own parameters. In bfloat16 they are float32
    copies, as in Megatron-LM's mixed precision: weights, activations and gradients in bf16 (2
    bytes, as Table 2 counts), gradients summed into float32, AdamW in float32, and the updated
    weights rounded to bf16 after each step; bf16 alone would lose every update smaller than
    1/256 of a weight. `source` names the state dict in the error when it does not fit."""
    model = nanosp.GPT(cfg, group=tp_group).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    if state_dict is not None:
        try:
            model.load_full_state_dict(state_dict)
        except ValueError as e:  # the same on every rank: all fail alike
            raise Usage(f"{source}: {e}") from None
    if dtype != torch.bfloat16:
        return model, dict(model.named_parameters())
    masters = {name: torch.nn.Parameter(p.detach().clone()) for name, p in model.named_parameters()}
    return model.to(dtype), masters


def train_step(run, model, masters, optimizer, step, seq_len):
    """One optimizer step on the global batch of `step`; returns (mean loss, gradient norm)."""
    args, dp, dp_rank, rows = run.args, run.dp, run.dp_rank, run.rows
    x_all, y_all = get_batch(run.data[0], args.batch_size, seq_len, batch_seed(run.seed, step, "train"))
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
                                 ckpt["model"] if ckpt else run.init,
                                 f"checkpoint {run.ckpt_path}" if ckpt else f"--init {args.init}")
    optimizer, start = make_optimizer(masters, args), 0
    if ckpt is not None:
        load_optimizer_state(model, masters, optimizer, ckpt["optimizer"])
        start, model.forward_count = ckpt["step"], ckpt["forward_count"]
    say = print if run.rank == 0 else (lambda *a, **k: None)
    if args.resume:
        say(f"resuming from {run.ckpt_path} at step {start}" if ckpt else
            f"--resume: no checkpoint at {run.ckpt_path}, starting fresh")
    log = None
    if run.rank == 0:
        remove_stale_temps(args.out_dir)
        log = open_log(os.path.join(args.out_dir, "log.jsonl"), start)
    stop = args.max_steps if args.stop_after is None else min(args.max_steps, args.stop_after)
    recompute = f"for {args.activation_budget:,} bytes" if run.plans else cfg.recompute
    lengths = "/".join(map(str, run.seq_lens))
    say(f"tp={run.t} dp={run.dp} sequence_parallel={cfg.sequence_parallel} recompute={recompute} "
        f"attention={cfg.attention}, {cfg.n_layer} layers x {cfg.n_embd}, batch {args.batch_size} x {lengths} "
        f"tokens in {args.grad_accum} micro-steps, {run.device}, {args.dtype}")
    for T, plan in run.plans.items():  # what the planner saw (with sdpa: selective has little to save)
        if plan.note:
            say(f"T={T}: {plan.note}")
    timer, tokens, timed_steps = 0.0, 0, 0
    for step in range(start + 1, stop + 1):
        t0 = time.perf_counter()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        T = run.seq_lens[(step - 1) % len(run.seq_lens)]  # a pure function of the step: resumes exactly
        if run.plans:
            model.set_recompute(run.plans[T].modes)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        loss, norm = train_step(run, model, masters, optimizer, step, T)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        timer, tokens, timed_steps = timer + time.perf_counter() - t0, tokens + args.batch_size * T, timed_steps + 1

        val = None
        if (args.eval_interval and step % args.eval_interval == 0) or step == stop:
            val = evaluate(run, model)
        if step % args.log_interval == 0 or val is not None or step == start + 1:
            plan = ledgers.plan_of(ledgers.recompute_costs(cfg, run.t, run.rows, T, getattr(torch, args.dtype)),
                                   [cfg.recompute_of(layer) for layer in range(cfg.n_layer)])
            record = {"step": step, "loss": loss.item(), "val_loss": val, "lr": lr, "grad_norm": norm.item(),
                      "tokens_per_s": tokens / timer, "ms": 1000 * timer / timed_steps,  # since the last line
                      "mem_bytes": peak_memory(run.device), "tp": run.t, "dp": run.dp, "seq_len": T,
                      "sequence_parallel": cfg.sequence_parallel, "recompute": str(plan),
                      "activation_bytes": plan.activation_bytes}  # predicted: what the layers save, per rank
            timer, tokens, timed_steps = 0.0, 0, 0
            if log:
                try:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                except OSError as e:
                    raise Failure(f"{log.name} could not be written: {e.strerror.lower()}") from None
                say(progress_line(record, args.max_steps, planned=bool(run.plans or args.seq_len_schedule)), flush=True)
        if (args.ckpt_interval and step % args.ckpt_interval == 0) or step == stop:
            save_checkpoint(run, model, masters, optimizer, step)
    if start == stop == 0:  # --stop-after 0: the weights as they start, as a checkpoint
        save_checkpoint(run, model, masters, optimizer, 0)
    elif start >= stop:
        say(f"{run.ckpt_path} is already at step {start} >= {stop}: nothing to do")
    if log:
        log.close()


def open_log(path, start):
    """log.jsonl, to append the steps after `start`. Records of later steps (logged after the last
    checkpoint by a run that then stopped) are cut off first, so that no step is logged twice."""
    if os.path.exists(path):
        kept = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line torn by a crash
                    pass
        write_atomic(path, b"".join(kept))
    return open(path, "a")


def progress_line(r, max_steps, planned=False):
    val = f" | val {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
    plan = f" | T {r['seq_len']}: {r['recompute']}, {r['activation_bytes'] / 2**20:,.1f} MiB" if planned else ""
    return (f"step {r['step']:>{len(str(max_steps))}}/{max_steps} {100 * r['step'] // max_steps:3d}% "
            f"| loss {r['loss']:.4f}{val} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s "
            f"| {r['ms']:.1f} ms | mem {r['mem_bytes'] / 2**20:,.0f} MiB{plan}")


# ----------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def sample(run):
    """Every rank samples with the same generator; logits are identical on every rank, so the
    tokens agree without a broadcast. Rank 0 prints."""
    args, device = run.args, run.device
    cfg = dataclasses.replace(run.cfg, sequence_parallel=False, dropout=0.0)  # any prompt length
    setup_distributed(run)
    weights, source = (run.ckpt["model"], f"checkpoint {run.ckpt_path}") if run.ckpt else (run.init, args.from_dir)
    model = build_model(cfg, run.tp_group, device, torch.float32, weights, source)[0].eval()
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
    if run.rank == 0:
        print(decode(run.tokenizer, idx[0].tolist()))


def fail(error, rank, peers=()):
    """Ends this process with one line and the error's exit code. Rank 0 speaks at once; torchrun
    then stops the other ranks. They wait a moment first, because torchrun stops every rank as soon
    as one exits, maybe before rank 0 has printed. A rank still running after that speaks too,
    naming itself: rank 0 could not (it is the one that stopped answering, or it did not fail).
    After a timeout the rank that speaks also ends this host's other ranks: torchrun's SIGTERM
    cannot end a stopped process, and it waits 30 s before its SIGKILL."""
    if rank != 0:
        time.sleep(5)
    where = "" if rank == 0 else f"rank {rank}: "
    print(f"train.py: error: {where}{error}", file=sys.stderr, flush=True)
    code = error.code if isinstance(error, Failure) else 2
    if isinstance(error, Timeout):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, once it sees a peer end: exit with `code`
        for host, pid in peers:
            if host == socket.gethostname() and pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        os._exit(code)  # not through destroy_process_group, which would wait for the ranks just ended
    sys.exit(code)


def main(argv=None):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        args = parse_args(argv)
        run = validate(args, world, rank)
    except (Failure, ValueError) as e:
        fail(e, rank)
    try:
        # the collectives not named otherwise (the model's, the gradient norm's, the checkpoint's)
        with collectives("tensor-parallel", run):
            if args.sample:
                sample(run)
            else:
                train(run)
    except Failure as e:
        fail(e, rank, run.peers)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
