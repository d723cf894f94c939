"""checks.py: every option and every file a train.py run reads, checked before any work.

A bad one is one line naming it and what would fit (guards.Usage, exit code 2). Every rank reads
the same options and files, so every rank fails alike, before any collective. The checks run
cheap ones first, and the last one makes --out-dir: a run refused for any other reason leaves
nothing behind. Files are read by gpt2.py's one torch.load check (weights_only=True: tensors,
never code).
"""
import argparse
import dataclasses
import math
import os
import sysconfig
import tempfile

import torch

import gpt2
import ledgers
from guards import Usage

# the config keys that give a model's shape and its initial weights; a checkpoint holds them as integers
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "seed")

# ----------------------------------------------------------------------------------------------
# options


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
    if args.compile and args.dropout:
        raise Usage(f"--compile needs --dropout 0 (got {args.dropout}): the dropout masks' key changes every "
                    f"step, and torch.compile would compile every step again")
    if args.activation_budget and args.recompute:
        raise Usage(f"--activation-budget chooses what to recompute: drop --recompute {args.recompute}")
    if args.sample and not args.prompt:
        raise Usage('--prompt "" is empty: sampling continues at least one byte, e.g. --prompt "\\n"')


def check_layout(args, world):
    """(t, dp): --tp divides the world size, and --batch-size the dp x --grad-accum micro-batches."""
    t = args.tp or world
    if world % t:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise Usage(f"--tp {t} does not divide the world size {world}; --tp would fit among {divisors}")
    dp = world // t
    if args.batch_size % (dp * args.grad_accum):
        raise Usage(f"--batch-size {args.batch_size} is not divisible by dp * grad-accum = {dp} * "
                    f"{args.grad_accum}; a multiple of {dp * args.grad_accum} would fit")
    return t, dp


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


def check_sequences(cfg, t, seq_len, seq_lens):
    """--seq-len and every length of --seq-len-schedule fit the model at tensor-parallel size t."""
    for T, option in [(seq_len, "--seq-len")] + [(T, "--seq-len-schedule") for T in seq_lens]:
        try:
            cfg.check_sequence(T, t)
        except ValueError as e:
            raise Usage(f"{option} {T}: {e}") from None


def budget_plans(args, cfg, t, rows, seq_lens):
    """--activation-budget's {T: plan} for every batch length: what each layer recomputes so that
    the activations fit with the fewest FLOPs (ledgers.plan_recompute); {} without a budget."""
    plans = {}
    for T in dict.fromkeys(seq_lens) if args.activation_budget else ():
        try:
            plans[T] = ledgers.plan_recompute(cfg, t, rows, T, getattr(torch, args.dtype), args.activation_budget)
        except ValueError as e:
            raise Usage(f"--activation-budget {args.activation_budget:,}: {e}") from None
    return plans


# ----------------------------------------------------------------------------------------------
# the files the model starts from: a checkpoint, a Hugging Face directory, a state dict


def read_sources(args, ckpt_path):
    """(checkpoint, gpt2.Pretrained), either or neither, read and checked: the checkpoint when
    sampling or resuming (if there is one); else --from's or --init's model directory."""
    if args.sample and not os.path.exists(ckpt_path):
        if not os.path.isfile(os.path.join(args.from_dir, "config.json")):
            raise Usage(f"--from {args.from_dir}: no checkpoint {ckpt_path}, nor the config.json of a "
                        f"Hugging Face model directory")
        return None, read_pretrained(args.from_dir, f"--from {args.from_dir}")
    if args.sample or (args.resume and os.path.exists(ckpt_path)):
        ckpt = gpt2.load_torch_file(ckpt_path, f"checkpoint {ckpt_path}")
        check_checkpoint(ckpt, ckpt_path)
        return ckpt, None
    if args.init and os.path.isdir(init_path(args)):
        return None, read_pretrained(init_path(args), f"--init {args.init}")
    return None, None


def check_checkpoint(ckpt, path):
    """What train.py's save_checkpoint writes: weights, AdamW state of the same shapes, step, config."""
    def bad(why):
        raise Usage(f"checkpoint {path} {why}; it is not one that train.py wrote")

    if not isinstance(ckpt, dict):
        bad(f"holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in ("model", "optimizer", "step", "config", "forward_count") if k not in ckpt]
    if missing:
        bad(f"has no {', '.join(missing)}")
    if not gpt2.is_tensor_dict(ckpt["model"]):
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


def init_path(args):
    kind, _, path = args.init.partition(":")
    if kind != "gpt2" or not path:
        raise Usage(f"--init {args.init}: expected gpt2:DIR (a Hugging Face model directory) or gpt2:FILE")
    return path


def read_pretrained(directory, name):
    """A Hugging Face GPT-2 model directory, read by gpt2.py: shape, weights, tokenizer or None."""
    try:
        return gpt2.load(directory)
    except ValueError as e:
        raise Usage(f"{name}: {e}") from None


def read_init_file(args, cfg):
    """--init gpt2:FILE: a torch-saved Hugging Face GPT-2 state dict, in nanosp's keys, checked
    against the shape the options give (n_head cannot be read off the weights)."""
    hf = gpt2.load_state_dict_file(init_path(args), f"--init {args.init}", "GPT-2 state dict")
    try:
        return gpt2.hf_to_nanosp(hf, dataclasses.asdict(cfg), f"--init {args.init}")
    except ValueError as e:
        raise Usage(f"{e}; check --preset, --n-layer, --n-embd, --block-size") from None


def read_tokenizer(ckpt, ckpt_path, pretrained, vocab_size):
    """The run's tokenizer: the one its checkpoint keeps (as tokenizer.json text), or the model
    directory's; None: tokens are bytes. Checked to fit the model's vocabulary."""
    tokenizer = pretrained.tokenizer if pretrained else None
    if ckpt is not None and ckpt.get("tokenizer") is not None:
        tokenizer = gpt2.Tokenizer(ckpt["tokenizer"], f"the tokenizer in checkpoint {ckpt_path}")
    if tokenizer is None and vocab_size < 256:
        raise Usage(f"vocab_size={vocab_size} cannot hold the 256 byte values")
    if tokenizer is not None:
        tokenizer.check_fits(vocab_size, "the model's")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# the data and --out-dir


def read_data(path, tokenizer, longest, cap=8 << 20):
    """(training tokens, validation tokens), the last 10% for validation, each longer than the
    `longest` sequence: the bytes of --data (or of the stdlib's *.py), or, with a tokenizer, the
    ids of their text (checked to decode back to it)."""
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
        for name in sorted(paths):
            if size >= cap:
                break
            with open(name, "rb") as f:
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
        data = torch.tensor(tokenizer.encode(text, f"--data {path or '(the stdlib sources)'}"), dtype=torch.int32)
    n = int(len(data) * 0.9)  # the last 10% is validation
    if min(n, len(data) - n) <= longest:
        unit = "bytes" if tokenizer is None else "tokens"
        raise Usage(f"--data {path or '(the stdlib sources)'}: {len(data) - n} validation {unit} "
                    f"(the last 10%), a sequence of {longest} needs more")
    return data[:n], data[n:]


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
