"""train.py end to end: real runs (train.main in this process for one process, torchrun with gloo
on CPU for more), compared through what they write: log.jsonl and the unsharded checkpoints.

Tolerances: float64 layouts against the single process, relative to the largest reference
element, under 1e-10 (what differs is reduction order). Resume at the same t is exact (float32,
bit for bit); resume at another t in float32 differs by reduction order only (1e-4).
Every process, and train.main called in-process, runs with one thread: on a busy 2-core machine
more threads only spin (a tiny step takes 1.7 s with two threads there, 15 ms with one).
"""
import contextlib
import glob
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checks
import guards
import ledgers
import nanosp
import train
from test_nanosp import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"
SMALL = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--block-size", "32",
         "--batch-size", "8", "--eval-iters", "2", "--log-interval", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc=1, check=True, timeout=240, log_dir=None):
    """`python train.py args`, run as train.main in this process (one thread, and no second torch
    import to pay), or torchrun with nproc processes; with log_dir, torchrun writes each rank's
    stderr there (see rank_stderr) and its own report stays in the returned stderr."""
    args = list(map(str, args))
    if nproc == 1:
        out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                train.main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    else:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master-port={free_port()}"]
        if log_dir:
            launcher += ["--log-dir", str(log_dir), "--redirects", "2"]
        proc = subprocess.run([sys.executable, *launcher, os.path.join(HERE, "train.py"), *args],
                              env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def rank_stderr(log_dir, rank):
    """What a rank wrote to stderr, from torchrun --log-dir DIR --redirects 2."""
    (path,) = glob.glob(os.path.join(log_dir, "*", "attempt_0", str(rank), "stderr.log"))
    with open(path) as f:
        return f.read()


def exit_codes(report):
    """{rank: exit code} from torchrun's failure report (negative: the signal that ended it)."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", report)}


class Background:
    """train.py in the background, in a session of its own: under torchrun with the options
    `launcher`, or plain python (launcher=None). Its stdout and stderr go to files. Leaving the
    block kills what is left of it: torchrun and every rank it started (each in a session of its
    own), stopped ones too."""

    def __init__(self, args, tmp_path, launcher=("--nproc_per_node=2",), name="run"):
        cmd = [sys.executable] + ([] if launcher is None else ["-m", "torch.distributed.run", *launcher])
        self.paths = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.paths[0], "w") as out, open(self.paths[1], "w") as err:
            self.proc = subprocess.Popen(list(map(str, [*cmd, os.path.join(HERE, "train.py"), *args])), env=ENV,
                                         stdout=out, stderr=err, start_new_session=True)
        self.seen = set()

    def ranks(self):
        """{rank: pid} of the ranks torchrun runs now; {} while it (re)starts them."""
        ranks = {}
        with contextlib.suppress(OSError):
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
            for pid in children:
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/environ", "rb") as f:  # (before exec, torchrun's own)
                        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                    if b"RANK" in env:
                        ranks[int(env[b"RANK"])] = pid
        self.seen.update(ranks.values())
        return ranks

    def stdout(self):
        return self.paths[0].read_text()

    def stderr(self):
        return self.paths[1].read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ranks()
        for pid in [*self.seen, self.proc.pid]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        self.proc.wait()


def wait_for_step(out_dir, step, *jobs, timeout=120):
    """Until out_dir/log.jsonl has logged `step` or a later one; every job must still be running."""
    deadline = time.monotonic() + timeout
    while max(logged_steps(out_dir), default=0) < step:
        for job in jobs:
            assert job.proc.poll() is None, f"the run ended before step {step}:\n{job.stderr()}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.01)


def logged_steps(out_dir):
    steps = []
    with contextlib.suppress(OSError), open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError):  # a line being written
                steps.append(json.loads(line)["step"])
    return steps


def read_log(out_dir):
    """{step: record}; a resumed run appends, so the last record of a step wins."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """About 70 kB of learnable text: random sentences over 14 words, from a fixed seed."""
    rng = random.Random(0)
    words = "the model reads every shard of a sequence and sums its gradients over ranks".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
             for _ in range(1500)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One process, no torchrun, the default data (the stdlib's source): 40 steps."""
    out = str(tmp_path_factory.mktemp("trained"))
    run([*SMALL, "--steps", 40, "--lr", 3e-3, "--eval-interval", 20, "--out-dir", out])
    return out


# ----------------------------------------------------------------------------------------------
# training runs


def test_single_process_loss_decreases_and_logs(trained):
    log = read_log(trained)
    assert log[40]["loss"] < log[1]["loss"] - 1.0, (log[1]["loss"], log[40]["loss"])
    assert log[40]["val_loss"] < log[20]["val_loss"]
    assert set(log[40]) >= {"step", "loss", "val_loss", "lr", "tokens_per_s", "ms", "mem_bytes", "tp",
                            "dp", "sequence_parallel", "recompute"}
    assert (log[40]["tp"], log[40]["dp"]) == (1, 1) and log[40]["mem_bytes"] > 0
    ckpt = load_ckpt(trained)
    assert ckpt["step"] == 40 and ckpt["config"]["n_embd"] == 32 and not any(
        name.startswith(".ckpt-") for name in os.listdir(trained))


def test_learning_rate_warms_up_then_follows_the_cosine(trained):
    """--lr 3e-3 and 10 warm-up steps (the default), then a cosine to lr / 10 at step 40, as logged."""
    log = read_log(trained)
    for step in range(1, 41):
        if step <= 10:
            want = 3e-3 * step / 10
        else:
            want = 3e-4 + 0.5 * (1 + math.cos(math.pi * (step - 10) / 30)) * (3e-3 - 3e-4)
        assert log[step]["lr"] == pytest.approx(want, rel=1e-12), step


def test_validation_loss_is_the_held_out_windows_loss(trained):
    """val_loss at step 40 is the mean loss of step 40's weights (the checkpoint's), in eval mode,
    over --eval-iters fixed windows of the last 10% of the data (batch_seed(seed, i, "val")),
    recomputed here. Every layout logs the same val_loss, so only this sees one taken on the
    training split."""
    ckpt, logged = load_ckpt(trained), read_log(trained)[40]["val_loss"]
    model = nanosp.GPT(nanosp.GPTConfig(**{k: ckpt["config"][k] for k in checks.SHAPE_KEYS})).eval()
    model.load_full_state_dict(ckpt["model"])
    held_out = checks.read_data(None, None, longest=32)[1]
    with torch.no_grad():
        losses = [model(*train.get_batch(held_out, 8, 32, train.batch_seed(0, i, "val")))[1] for i in range(2)]
    assert logged == pytest.approx(torch.stack(losses).double().mean().item(), rel=1e-6)


def test_batches_are_windows_and_their_next_tokens():
    """get_batch on data 0, 1, 2, ...: each row of x is a window of the data, its row of y the same
    window one token on (the next-token targets); a seed gives one batch, another seed another."""
    data = torch.arange(100, dtype=torch.int32)
    x, y = train.get_batch(data, 16, 10, seed=3)
    assert x.shape == y.shape == (16, 10) and x.dtype == y.dtype == torch.long
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(10)) and torch.equal(y, x + 1) and y.max() < 100
    assert torch.equal(train.get_batch(data, 16, 10, seed=3)[0], x)
    assert not torch.equal(train.get_batch(data, 16, 10, seed=4)[0], x)


def test_top_k_1_samples_the_greedy_continuation(trained):
    args = ["--sample", "--from", trained, "--prompt", "import ", "--max-new-tokens", 30]
    greedy = run([*args, "--temperature", 0]).stdout
    assert run([*args, "--temperature", 0.8, "--top-k", 1, "--seed", 5]).stdout == greedy
    assert run([*args, "--temperature", 0.8, "--seed", 5]).stdout != greedy  # (so the sampler samples)


def test_sampling_draws_from_the_softmax_of_logits_over_temperature(trained):
    """--temperature 0.5 --top-k 5 --seed 3: each token is torch.multinomial's draw, from a generator
    seeded 3, over softmax(logits / 0.5) of the 5 likeliest bytes; the loop written out here writes
    the same text. (Greedy and top-k 1 cannot tell a temperature that multiplies from one that divides.)"""
    text = run(["--sample", "--from", trained, "--prompt", "def ", "--max-new-tokens", 12, "--temperature", 0.5,
                "--top-k", 5, "--seed", 3]).stdout
    ckpt = load_ckpt(trained)
    model = nanosp.GPT(nanosp.GPTConfig(**{k: ckpt["config"][k] for k in checks.SHAPE_KEYS})).eval()
    model.load_full_state_dict(ckpt["model"])
    gen, ids = torch.Generator().manual_seed(3), list(b"def ")
    for _ in range(12):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1] / 0.5
        logits[logits < logits.topk(5).values[-1]] = -math.inf
        ids.append(torch.multinomial(logits.softmax(-1), 1, generator=gen).item())
    assert text == bytes(ids).decode(errors="replace") + "\n"


def test_sample_agrees_sharded_and_not(trained):
    args = ["--sample", "--from", trained, "--prompt", "import ", "--max-new-tokens", 40, "--seed", 3]
    one = run(args).stdout
    two = run(args, nproc=2).stdout
    assert one.startswith("import ") and len(one) > 20
    assert two == one


LAYOUTS = {  # (nproc, extra options)
    "tp2": (2, ["--tp", 2, "--sequence-parallel", "--recompute", "selective"]),
    "dp2": (2, ["--tp", 1, "--grad-accum", 2]),
    "tp2-dp2": (4, ["--tp", 2, "--sequence-parallel", "--recompute", "full"]),
}


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference"))
    run(equivalence_args(text, out))
    return out


def equivalence_args(text, out):
    # grad-clip 0.05 is well under the norm, so clipping acts and a wrong norm would show
    return [*SMALL, "--data", text, "--steps", 2, "--warmup-steps", 0, "--dtype", "float64",
            "--grad-clip", 0.05, "--out-dir", out]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_steps_equal_single_process(layout, text, reference, adamw_by_hand, tmp_path):
    nproc, extra = LAYOUTS[layout]
    run([*equivalence_args(text, tmp_path), *extra], nproc=nproc)
    want, got = load_ckpt(reference), load_ckpt(tmp_path)
    for name, tensor in want["model"].items():
        assert rel_err(got["model"][name], tensor) < 1e-10, name
        assert rel_err(got["model"][name], adamw_by_hand[1][name]) < 1e-10, name  # AdamW written out, below
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(got["optimizer"][name][key], want["optimizer"][name][key]) < 1e-10, (name, key)
        assert got["optimizer"][name]["step"] == 2
    want_log, got_log = read_log(reference), read_log(tmp_path)
    for step in (1, 2):
        assert want_log[step]["grad_norm"] > 0.05  # clipping acted
        assert got_log[step]["grad_norm"] == pytest.approx(want_log[step]["grad_norm"], rel=1e-10)
        assert got_log[step]["loss"] == pytest.approx(want_log[step]["loss"], rel=1e-10)
    assert got_log[2]["val_loss"] == pytest.approx(want_log[2]["val_loss"], rel=1e-10)  # each replica its rows


def test_data_parallel_dropout_is_a_single_process_with_as_many_micro_steps(text, tmp_path):
    """Dropout 0.1, float64: micro-step m of DP replica d reads the rows and draws the masks of
    micro-step m * dp + d of one process with dp x --grad-accum micro-steps, so dp=2 is --grad-accum 2
    (weights, losses, validation loss) to 1e-10; replicas that drew the same masks would not be."""
    common = [*SMALL, "--data", text, "--steps", 2, "--warmup-steps", 0, "--dtype", "float64", "--dropout", 0.1]
    run([*common, "--grad-accum", 2, "--out-dir", tmp_path / "one"])
    run([*common, "--tp", 1, "--out-dir", tmp_path / "dp2"], nproc=2)
    want, got = load_ckpt(tmp_path / "one")["model"], load_ckpt(tmp_path / "dp2")["model"]
    assert all(rel_err(got[name], want[name]) < 1e-10 for name in want)
    want_log, got_log = read_log(tmp_path / "one"), read_log(tmp_path / "dp2")
    for step, key in ((1, "loss"), (2, "loss"), (2, "val_loss")):
        assert got_log[step][key] == pytest.approx(want_log[step][key], rel=1e-10), (step, key)


# the decayed parameters of SMALL's model: every weight matrix and both embeddings (wte is also the head)
DECAYED = {"wte.weight", "wpe.weight"} | {f"h.{i}.{name}.weight" for i in range(2)
                                          for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_weight_decay_goes_to_matrices_and_embeddings_only(dtype):
    """make_optimizer's groups, by name: decay on DECAYED, none on biases and LayerNorm weights;
    under bfloat16 the groups hold the float32 master weights. AdamW's betas are (0.9, 0.95)."""
    cfg = nanosp.GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model, masters = train.build_model(cfg, None, torch.device("cpu"), getattr(torch, dtype), None, "")
    optimizer = train.make_optimizer(masters, train.parse_args(["--weight-decay", "0.25", "--lr", "0.002"]))
    name_of = {p: name for name, p in masters.items()}
    decay = [(name_of[p], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(name for name, _ in decay) == sorted(dict(model.named_parameters()))  # each exactly once
    assert {name for name, wd in decay if wd == 0.25} == DECAYED
    assert all(wd == 0.0 for name, wd in decay if name not in DECAYED)
    if dtype == "bfloat16":
        assert all(p.dtype == torch.float32 for p in name_of)
    assert all(group["betas"] == (0.9, 0.95) and group["lr"] == 0.002 for group in optimizer.param_groups)


@pytest.fixture(scope="module")
def adamw_by_hand(text):
    """The two steps of equivalence_args written out: the gradient of the step's batch (nanosp,
    unsharded, float64), clipped to norm 0.05 as torch clips (by 0.05 / (norm + 1e-6) when that is
    under 1), the cosine learning rate from 1e-3 at step 0 to 1e-4 at step 2, and AdamW: decoupled
    decay 0.1 on DECAYED, betas (0.9, 0.95), eps 1e-8, bias corrections 1 - beta^step.
    {step: (loss, grad norm)} and the weights and moments after step 2."""
    lr, min_lr, clip, wd, beta1, beta2, eps = 1e-3, 1e-4, 0.05, 0.1, 0.9, 0.95, 1e-8
    model = nanosp.GPT(nanosp.GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=32)).double()
    w = {name: p.detach().clone() for name, p in model.named_parameters()}  # seed 0's initial weights
    m = {name: torch.zeros_like(p) for name, p in w.items()}
    v = {name: torch.zeros_like(p) for name, p in w.items()}
    data, logged = checks.read_data(text, None, longest=32)[0], {}
    for step in (1, 2):
        x, y = train.get_batch(data, 8, 32, train.batch_seed(0, step, "train"))
        model.load_full_state_dict(w)
        model.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        norm = sum(g.pow(2).sum() for g in grads.values()).sqrt().item()
        logged[step] = (loss.item(), norm)
        lr_t = min_lr + 0.5 * (1 + math.cos(math.pi * step / 2)) * (lr - min_lr)
        for name, g in grads.items():
            g = g * min(1.0, clip / (norm + 1e-6))
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            m_hat, v_hat = m[name] / (1 - beta1**step), v[name] / (1 - beta2**step)
            decay = wd if name in DECAYED else 0.0
            w[name] = w[name] * (1 - lr_t * decay) - lr_t * m_hat / (v_hat.sqrt() + eps)
    return logged, w, m, v


def test_two_steps_are_adamw_written_out(reference, adamw_by_hand):
    """The single process's two steps (weight decay on, clipping acting) against adamw_by_hand;
    the layouts' weights (tp2, dp2, tp2-dp2: optimizer state sharded by t) are held to it above."""
    logged, w, m, v = adamw_by_hand
    ckpt, log = load_ckpt(reference), read_log(reference)
    for step, (loss, norm) in logged.items():
        assert log[step]["loss"] == pytest.approx(loss, rel=1e-12)
        assert log[step]["grad_norm"] == pytest.approx(norm, rel=1e-10) and norm > 0.05
    for name in w:
        assert rel_err(ckpt["model"][name], w[name]) < 1e-10, name
        assert rel_err(ckpt["optimizer"][name]["exp_avg"], m[name]) < 1e-10, name
        assert rel_err(ckpt["optimizer"][name]["exp_avg_sq"], v[name]) < 1e-10, name


def test_grad_norm_unsharded_equals_torch():
    torch.manual_seed(0)
    model = nanosp.GPT(nanosp.GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)).double()
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)[1].backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert train.grad_norm(model, dict(model.named_parameters())).item() == pytest.approx(want.item(), rel=1e-12)


def test_activation_budget_replans_as_the_batch_length_changes(text, tmp_path):
    """--seq-len-schedule 8,32,16 with --activation-budget: every logged step names its plan and its
    predicted bytes, which stay within the budget; short batches keep every activation, long ones
    recompute; and the losses are those of the same run without recomputation, bit for bit."""
    cfg = nanosp.GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, dropout=0.1)
    costs = {T: ledgers.recompute_costs(cfg, 1, 8, T, torch.float32) for T in (8, 16, 32)}
    budget = 2 * costs[16]["none"][0]  # T = 16 fits without recompute; T = 32 does not
    assert 2 * costs[32]["none"][0] > budget
    common = [*SMALL, "--data", text, "--steps", 6, "--dropout", 0.1, "--seq-len-schedule", "8,32,16"]
    planned, plain = tmp_path / "planned", tmp_path / "plain"
    printed = run([*common, "--activation-budget", budget, "--out-dir", planned]).stdout
    run([*common, "--out-dir", plain])
    got, want = read_log(planned), read_log(plain)
    assert [got[s]["seq_len"] for s in range(1, 7)] == [8, 32, 16] * 2
    for step, record in got.items():
        T = record["seq_len"]
        assert record["activation_bytes"] <= budget and record["loss"] == want[step]["loss"]
        assert record["recompute"] == str(ledgers.plan_recompute(cfg, 1, 8, T, torch.float32, budget))
        assert (record["recompute"] == "none x2") == (T < 32), record
    assert f"T 32: {got[2]['recompute']}" in printed


def test_attention_sdpa_trains_and_resumes_with_the_checkpoints_choice(text, tmp_path):
    """--attention sdpa learns what the written-out attention does (float32: to round-off); the
    checkpoint keeps the choice and a resume without --attention continues with it, bit for bit;
    with --activation-budget the planner says what selective recompute has left to save."""
    common = [*SMALL, "--data", text, "--steps", 6, "--eval-interval", 3, "--lr", 3e-3]
    run([*common, "--out-dir", tmp_path / "explicit"])
    assert "attention=sdpa," in run([*common, "--attention", "sdpa", "--out-dir", tmp_path / "sdpa"]).stdout
    run([*common, "--attention", "sdpa", "--stop-after", 3, "--out-dir", tmp_path / "cut"])
    assert load_ckpt(tmp_path / "cut")["config"]["attention"] == "sdpa"
    assert "attention=sdpa," in run([*common, "--resume", "--out-dir", tmp_path / "cut"]).stdout
    explicit, sdpa, cut = (read_log(tmp_path / name) for name in ("explicit", "sdpa", "cut"))
    assert [cut[s]["loss"] for s in range(1, 7)] == [sdpa[s]["loss"] for s in range(1, 7)]
    assert max(abs(sdpa[s]["loss"] - explicit[s]["loss"]) for s in range(1, 7)) < 1e-4
    weights = [load_ckpt(tmp_path / name)["model"] for name in ("explicit", "sdpa")]
    assert 0 < max(rel_err(weights[1][k], w) for k, w in weights[0].items()) < 1e-4  # another kernel ran
    printed = run([*common, "--attention", "sdpa", "--steps", 1, "--activation-budget", "1MiB",
                   "--out-dir", tmp_path / "planned"]).stdout
    assert "T=32: attention='sdpa' keeps no s^2 tensor: selective recompute saves only the kernel's" in printed


@pytest.mark.parametrize("argv, says", [
    (["--activation-budget", "1000"], "--activation-budget 1,000: no recompute plan fits"),
    (["--activation-budget", "2GiB", "--recompute", "full"], "--activation-budget chooses what to recompute"),
    (["--activation-budget", "2XB"], "'2XB' is not a size"),
    (["--seq-len-schedule", "8,x"], "'8,x' is not a comma-separated list"),
    (["--seq-len-schedule", "8,40"], "--seq-len-schedule 40: sequence length T=40 must be in [1, block_size=32]"),
])
def test_budget_and_schedule_errors(argv, says, text, tmp_path):
    proc = run([*SMALL, "--data", text, *argv, "--out-dir", tmp_path], check=False)
    assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_kill_and_resume_reproduces_the_run(text, tmp_path):
    """Dropout on, float32, tp=2 with sequence parallelism: 12 steps straight; 6 steps, a crash in
    the middle of a checkpoint write, then resume to 12 at tp=2 and (from a copy) at tp=1."""
    common = [*SMALL, "--data", text, "--steps", 12, "--dropout", 0.1, "--lr", 3e-3, "--warmup-steps", 2,
              "--eval-interval", 4, "--ckpt-interval", 4, "--sequence-parallel"]
    straight, cut, other_t = tmp_path / "straight", tmp_path / "cut", tmp_path / "other_t"
    run([*common, "--out-dir", straight], nproc=2)
    run([*common, "--out-dir", cut, "--stop-after", 6], nproc=2)
    # a process killed between torch.save and os.replace: its temp file is left behind
    crash = (f"import os, guards; os.replace = lambda *a: os._exit(9); "
             f"guards.write_atomic({str(cut / 'ckpt.pt')!r}, b'junk')")
    assert subprocess.run([sys.executable, "-c", crash], cwd=HERE, env=ENV).returncode == 9
    assert any(name.startswith(".ckpt-") for name in os.listdir(cut))
    shutil.copytree(cut, other_t)
    resumed = run([*common, "--out-dir", cut, "--resume"], nproc=2).stdout
    assert "at step 6" in resumed
    run([*common, "--out-dir", other_t, "--resume", "--tp", 1])

    want, same_t, tp1 = read_log(straight), read_log(cut), read_log(other_t)
    assert want[12]["loss"] < want[1]["loss"] - 0.5  # the tp=2 run learns
    diff = max(abs(same_t[s][k] - want[s][k]) for s in range(7, 13) for k in ("loss", "grad_norm"))
    diff_t = max(abs(tp1[s]["loss"] - want[s]["loss"]) for s in range(7, 13))
    print(f"resume max |loss diff|: same t {diff:.3g}, tp=2 -> tp=1 {diff_t:.3g}")
    assert diff == 0 and diff_t < 1e-4  # the same t: bit for bit
    assert same_t[8]["val_loss"] == want[8]["val_loss"]
    final, resumed_final = load_ckpt(straight), load_ckpt(cut)
    assert resumed_final["forward_count"] == final["forward_count"]
    assert all(torch.equal(resumed_final["model"][k], v) for k, v in final["model"].items())


def test_bfloat16_steps_float32_master_weights_and_resumes_exactly(text, tmp_path):
    """--dtype bfloat16, tp=2 with sequence parallelism: after AdamW's first step (lr 1e-4, no decay,
    no clipping) every master weight has moved by about lr * sign(gradient) from its float32
    initial value. bf16 weights alone could not hold that: near 1.0 (the LayerNorm weights) their
    spacing is 2^-7. Resuming from the float32 masters then reproduces the run exactly."""
    init, cut, straight = tmp_path / "init", tmp_path / "cut", tmp_path / "straight"
    run([*SMALL, "--data", text, "--stop-after", 0, "--out-dir", init])  # the float32 initial weights
    common = [*SMALL, "--data", text, "--steps", 3, "--lr", 1e-4, "--min-lr", 1e-4, "--warmup-steps", 0,
              "--weight-decay", 0, "--grad-clip", 0, "--dtype", "bfloat16", "--tp", 2, "--sequence-parallel"]
    run([*common, "--stop-after", 1, "--out-dir", cut], nproc=2)
    first, initial = load_ckpt(cut), load_ckpt(init)["model"]
    moved = {}
    for name, w0 in initial.items():
        w1 = first["model"][name]
        assert w1.dtype == torch.float32 and first["optimizer"][name]["exp_avg"].dtype == torch.float32
        moved[name] = (w1 - w0).abs()
        assert moved[name].max() < 1.01e-4, name
    # (the key bias has no gradient: softmax ignores a constant added to a row of scores)
    moved_by_lr = torch.cat([m.reshape(-1) for m in moved.values()]) > 0.9e-4
    assert moved_by_lr.float().mean() > 0.9
    assert (moved["h.0.ln_1.weight"] > 0.9e-4).all() and torch.equal(initial["h.0.ln_1.weight"], torch.ones(32))
    run([*common, "--resume", "--out-dir", cut], nproc=2)
    run([*common, "--out-dir", straight], nproc=2)
    want, got = read_log(straight), read_log(cut)
    assert [got[s]["loss"] for s in (2, 3)] == [want[s]["loss"] for s in (2, 3)]
    assert all(torch.equal(load_ckpt(cut)["model"][k], v) for k, v in load_ckpt(straight)["model"].items())


# ----------------------------------------------------------------------------------------------
# errors: one line naming the value, exit code 2 (1 for a run that fails later), no hang


def error_of(argv, monkeypatch=None, world=None, code=2):
    if world:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    proc = run(argv, check=False)
    message = proc.stderr.strip()
    assert proc.returncode == code, proc.stderr
    assert message.startswith("train.py: error: ") and "\n" not in message and "Traceback" not in proc.stderr
    return message


def test_errors(monkeypatch, trained, tmp_path, text):
    assert "--data nope.txt: no such file" in error_of(["--data", "nope.txt"])
    msg = error_of([*SMALL, "--data", text, "--seq-len", 64])
    assert "--seq-len 64" in msg and "block_size=32" in msg
    msg = error_of([*SMALL, "--n-embd", 64, "--resume", "--out-dir", trained])
    assert "n_embd=32" in msg and "n_embd=64" in msg
    assert "--tp 3 does not divide the world size 4" in error_of(
        [*SMALL, "--tp", 3], monkeypatch, world=4)
    assert "n_head=4" in error_of([*SMALL, "--tp", 3], monkeypatch, world=3)
    assert "T=31 is not divisible by the tensor-parallel size t=2" in error_of(
        [*SMALL, "--sequence-parallel", "--seq-len", 31], monkeypatch, world=2)
    monkeypatch.delenv("WORLD_SIZE")
    assert "--from nowhere" in error_of(["--sample", "--from", "nowhere"])
    assert "--init gpt2:missing.pt: no such file" in error_of(
        [*SMALL, "--data", text, "--init", "gpt2:missing.pt", "--out-dir", tmp_path])
    assert not os.listdir(tmp_path)  # a refused run leaves nothing behind


BAD_OPTIONS = [  # (options, what the one line must say)
    (["--lr", -1], "--lr -1.0 must be a number > 0 and under 3.403e+37"),
    (["--lr", 0], "--lr 0.0 must be a number > 0 and under 3.403e+37"),
    (["--lr", 1e38], "--lr 1e+38 must be a number > 0 and under 3.403e+37 (AdamW's first step is 10 lr)"),
    (["--lr", "inf"], "--lr inf must be a number > 0"),
    (["--stop-after", -1], "--stop-after -1 must be at least 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--min-lr", -1], "--min-lr -1.0 must be in [0, --lr 0.001]"),
    (["--min-lr", 0.01], "--min-lr 0.01 must be in [0, --lr 0.001]"),
    (["--warmup-steps", -1], "--warmup-steps -1 must be at least 0"),
    (["--seq-len", 0], "--seq-len 0 must be at least 1"),
    (["--seq-len", -5], "--seq-len -5 must be at least 1"),
    (["--batch-size", 0], "--batch-size 0 must be at least 1"),
    (["--batch-size", 6, "--grad-accum", 4], "--batch-size 6 is not divisible by dp * grad-accum = 1 * 4"),
    (["--grad-accum", 0], "--grad-accum 0 must be at least 1"),
    (["--steps", 0], "--max-steps 0 must be at least 1"),
    (["--eval-iters", 0], "--eval-iters 0 must be at least 1"),
    (["--log-interval", 0], "--log-interval 0 must be at least 1"),
    (["--eval-interval", -1], "--eval-interval -1 must be at least 0"),
    (["--ckpt-interval", -1], "--ckpt-interval -1 must be at least 0"),
    (["--timeout", 0], "--timeout 0.0 must be in (0, 86400] seconds"),
    (["--timeout", -3], "--timeout -3.0"),
    (["--timeout", "inf"], "--timeout inf"),
    (["--dropout", 1], "--dropout 1.0 must be in [0, 1)"),
    (["--attention", "sdpa", "--dropout", 0.1], "attention='sdpa' takes no dropout (dropout=0.1)"),
    (["--attention", "flash"], "argument --attention: invalid choice: 'flash'"),
    (["--dropout", -0.1], "--dropout -0.1"),
    (["--weight-decay", -0.1], "--weight-decay -0.1 must be a finite number >= 0"),
    (["--grad-clip", -1], "--grad-clip -1.0 must be a finite number >= 0"),
    (["--n-layer", 0], "--n-layer 0 must be at least 1"),
    (["--n-embd", 30], "n_embd=30 is not divisible by n_head=4"),
    (["--tp", 0], "--tp 0 must be at least 1"),
    (["--seed", -1], "--seed -1 must be in [0, 2**32)"),
    (["--device", "banana"], "--device banana is not a device"),
    (["--device", "meta"], "--device meta: train.py runs on cpu or cuda"),
    (["--device", "cuda:99"], "--device cuda:99"),  # no CUDA here, or not 100 GPUs
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--sample", "--max-new-tokens", 0], "--max-new-tokens 0 must be at least 1"),
    (["--sample", "--temperature", -1], "--temperature -1.0 must be a finite number >= 0"),
    (["--sample", "--top-k", -1], "--top-k -1 must be at least 0"),
    (["--sample", "--prompt", ""], '--prompt "" is empty'),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: CUDA is not available")])


@pytest.mark.parametrize("options, says", BAD_OPTIONS, ids=[" ".join(map(str, o)) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line(options, says, tmp_path):
    assert says in error_of([*SMALL, *options, "--out-dir", tmp_path / "out"])
    assert not os.path.exists(tmp_path / "out")  # refused before any work


class Payload:  # what weights_only=True must refuse to unpickle: it would run a command
    def __reduce__(self):
        return os.system, ("touch pwned",)


def bad_files(good):
    """{kind: how to write it}, each a file train.py must refuse; `good` is a real checkpoint."""
    data = Path(good).read_bytes()
    return {
        "truncated": lambda p: p.write_bytes(data[:len(data) // 2]),
        "random bytes": lambda p: p.write_bytes(random.Random(0).randbytes(5000)),
        "empty": lambda p: p.write_bytes(b""),
        "a directory": lambda p: p.mkdir(),
        "a tensor": lambda p: torch.save(torch.zeros(3), p),
        "a dict of other keys": lambda p: torch.save({"weights": torch.zeros(3)}, p),
        "a pickled command": lambda p: p.write_bytes(pickle.dumps(Payload(), protocol=2)),
    }


BAD_FILE_SAYS = {  # kind: (as a checkpoint, as --init)
    "truncated": ("cannot be loaded",) * 2, "random bytes": ("cannot be loaded",) * 2,
    "empty": ("is empty",) * 2, "a directory": ("is a directory", "config.json: no such file"),
    "a tensor": ("holds a Tensor",) * 2,
    "a dict of other keys": ("has no model, optimizer, step, config, forward_count", "does not hold GPT-2"),
    "a pickled command": ("cannot be loaded",) * 2}


@pytest.mark.parametrize("kind", BAD_FILE_SAYS)
def test_bad_file_is_one_line(kind, trained, text, tmp_path, monkeypatch):
    """The same bad content as a checkpoint to resume, a checkpoint to sample and an --init file."""
    monkeypatch.chdir(tmp_path)  # where the pickled command would leave its mark
    out = tmp_path / "out"
    out.mkdir()
    bad_files(os.path.join(trained, "ckpt.pt"))[kind](out / "ckpt.pt")
    bad_files(os.path.join(trained, "ckpt.pt"))[kind](tmp_path / "gpt2.pt")
    as_ckpt, as_init = BAD_FILE_SAYS[kind]
    for argv, name, says in [
            ([*SMALL, "--data", text, "--resume", "--out-dir", out], f"checkpoint {out / 'ckpt.pt'}", as_ckpt),
            (["--sample", "--from", out], f"checkpoint {out / 'ckpt.pt'}", as_ckpt),
            ([*SMALL, "--data", text, "--init", f"gpt2:{tmp_path / 'gpt2.pt'}", "--out-dir", tmp_path / "o"],
             f"--init gpt2:{tmp_path / 'gpt2.pt'}", as_init)]:
        msg = error_of(argv)
        assert name in msg and says in msg, msg
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists(tmp_path / "o")


def test_checkpoint_that_does_not_fit_is_one_line(trained, tmp_path):
    """Loadable checkpoints whose contents do not agree: AdamW state of another shape, weights of
    another model than the config says."""
    ckpt = load_ckpt(trained)
    ckpt["optimizer"]["wte.weight"]["exp_avg"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert "AdamW state for 'wte.weight'" in error_of([*SMALL, "--resume", "--out-dir", tmp_path])
    ckpt = load_ckpt(trained)
    ckpt["config"]["n_layer"] = 3
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert f"checkpoint {tmp_path / 'ckpt.pt'}: " in error_of(["--sample", "--from", tmp_path])


def test_bad_data_file_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert f"--data {tmp_path}: is a directory" in error_of(["--data", tmp_path])
    assert f"--data {tmp_path / 'empty.txt'} is empty" in error_of(["--data", tmp_path / "empty.txt"])
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    assert "10 validation bytes" in error_of([*SMALL, "--data", tmp_path / "short.txt"])


def test_bad_file_fails_on_every_rank(trained, text, tmp_path, monkeypatch):
    """Under torchrun rank 0 says it once; rank 1, which reads the same file, fails alike (and
    says it too, naming itself, only if torchrun has not stopped it first)."""
    out = tmp_path / "out"
    out.mkdir()
    bad_files(os.path.join(trained, "ckpt.pt"))["truncated"](out / "ckpt.pt")
    argv = [*SMALL, "--data", text, "--resume", "--out-dir", out]
    logs = tmp_path / "logs"
    proc = run(argv, nproc=2, check=False, timeout=120, log_dir=logs)
    assert proc.returncode != 0 and exit_codes(proc.stderr)[0] == 2
    said = rank_stderr(logs, 0)
    assert said.startswith(f"train.py: error: checkpoint {out / 'ckpt.pt'} cannot be loaded") and said.count("\n") == 1
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(guards.time, "sleep", lambda seconds: None)  # torchrun is not here to stop it
    assert error_of(argv).startswith(f"train.py: error: rank 1: checkpoint {out / 'ckpt.pt'} cannot be")


def test_resume_without_checkpoint_starts_fresh(text, tmp_path):
    assert "no checkpoint" in run([*SMALL, "--data", text, "--steps", 1, "--resume", "--out-dir", tmp_path]).stdout
    assert load_ckpt(tmp_path)["step"] == 1


# ----------------------------------------------------------------------------------------------
# a run never overwrites another; a failed write keeps the previous checkpoint


def test_out_dir_holding_a_run_is_refused_and_resume_cuts_the_log(text, tmp_path):
    """A run checkpointed at step 2 whose process then logged steps 3 and 4 (the second line torn)
    and left a temp file before it died: a new run is refused and changes nothing; --resume cuts
    the log back to step 2, removes the temp file and logs each step once."""
    out = tmp_path / "out"
    common = [*SMALL, "--data", text, "--steps", 4, "--out-dir", out]
    run([*common, "--stop-after", 2])
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + '\n{"step": 4, "lo')
    (out / ".ckpt-crashed.tmp").write_bytes(b"partial")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    msg = error_of(common)
    assert f"--out-dir {out} already holds a run (ckpt.pt, log.jsonl)" in msg and "--resume" in msg
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    (tmp_path / "log_only").mkdir()
    (tmp_path / "log_only" / "log.jsonl").write_text("")
    assert "already holds a run (log.jsonl)" in error_of([*SMALL, "--out-dir", tmp_path / "log_only"])

    run([*common, "--resume"])
    with open(out / "log.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4] and read_log(out)[3]["loss"] > 0
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


def test_out_dir_unusable_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    msg = error_of([*SMALL, "--out-dir", tmp_path / "file" / "out"])
    assert f"--out-dir {tmp_path / 'file' / 'out'} cannot be created: not a directory" in msg
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # not a byte more: a full disk
    try:
        msg = error_of([*SMALL, "--out-dir", tmp_path / "out"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert f"--out-dir {tmp_path / 'out'} is not writable: file too large" in msg
    assert os.listdir(tmp_path / "out") == []


def test_failed_checkpoint_write_keeps_the_previous(text, tmp_path):
    """The disk fills up (a file-size limit below the checkpoint's size) while the step-4
    checkpoint is written: one line, exit code 1, the step-2 checkpoint intact, no temp file."""
    common = [*SMALL, "--data", text, "--steps", 4, "--out-dir", tmp_path]
    run([*common, "--stop-after", 2])
    size = os.path.getsize(tmp_path / "ckpt.pt")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # the log still fits, the checkpoint not
    try:
        msg = error_of([*common, "--resume"], code=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert msg == (f"train.py: error: {tmp_path / 'ckpt.pt'} could not be written: file too large; "
                   f"the previous one is kept")
    assert load_ckpt(tmp_path)["step"] == 2 and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.jsonl"]
    assert max(read_log(tmp_path)) == 4  # the steps ran; only their checkpoint is lost


# ----------------------------------------------------------------------------------------------
# a rank that stops answering


STUCK = {  # how rank 1 stops answering: (rank 0's line, most seconds from the signal to the end)
    # stopped: rank 0 waits --timeout, says so and ends the stopped rank (torchrun's SIGTERM cannot
    # end a stopped process, and it waits 30 s before its SIGKILL)
    "SIGSTOP": ("a collective on the tensor-parallel group timed out after 6 s: a rank stopped answering", 6 + 15),
    # gone: rank 0's collective fails at once, as torchrun sees rank 1 end and stops rank 0
    # (SIGTERM): which comes first is a race, so rank 0 may not get to say it
    "SIGKILL": ("a collective on the tensor-parallel group lost a rank: its process ended", 15),
}


@pytest.mark.parametrize("sig", STUCK)
def test_stuck_rank_ends_the_run(sig, text, tmp_path):
    """torchrun, tp=2, --timeout 6: once training has started, rank 1 is stopped (SIGSTOP) or
    killed (SIGKILL). Rank 0 says so in one line and exits 1; the run ends in bounded time."""
    timeout, out, logs = 6, tmp_path / "out", tmp_path / "logs"
    says, most = STUCK[sig]
    args = [*SMALL, "--data", text, "--steps", 10**6, "--eval-interval", 0, "--ckpt-interval", 0, "--tp", 2,
            "--timeout", timeout, "--out-dir", out]
    with Background(args, tmp_path, ["--nproc_per_node=2", "--log-dir", logs, "--redirects", "2"]) as job:
        wait_for_step(out, 1, job)
        os.kill(job.ranks()[1], getattr(signal, sig))
        start = time.monotonic()
        job.proc.wait(timeout=most + 30)
        elapsed = time.monotonic() - start
    codes = exit_codes(job.stderr())
    print(f"{sig} of rank 1, --timeout {timeout}: the run ended after {elapsed:.1f} s")
    assert elapsed < most and (sig != "SIGSTOP" or elapsed > timeout)
    said = rank_stderr(logs, 0)
    assert job.proc.returncode != 0 and codes[1] == -signal.SIGKILL and rank_stderr(logs, 1) == ""
    if sig == "SIGSTOP":
        assert codes[0] == 1 and said == f"train.py: error: {says}\n"
    else:  # stopped by torchrun before, while or after it says its one line
        assert codes[0] in (1, -signal.SIGTERM) and said in ("", f"train.py: error: {says}\n"), (codes, said)


# ----------------------------------------------------------------------------------------------
# the GPU check's switches: --compile and --no-kernels


def test_compile_trains_as_eager_and_no_kernels_reaches_the_model(text, tmp_path):
    """--compile runs each layer under torch.compile: the same losses to float32 rounding, and the
    log says so. --compile with dropout is refused (the masks' key would recompile every step).
    --no-kernels makes the model use nanosp's definitions (on CUDA, where kernels.py would run)."""
    base = [*SMALL, "--n-layer", 1, "--steps", 2, "--data", text]
    run([*base, "--out-dir", tmp_path / "eager"])
    try:
        run([*base, "--compile", "--out-dir", tmp_path / "compiled"])
    finally:
        torch._dynamo.reset()  # the other tests run eager
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["compile"] for r in compiled.values()] == [True, True] and not eager[1]["compile"]
    for step, r in eager.items():
        assert abs(compiled[step]["loss"] - r["loss"]) <= 1e-5 * r["loss"], (step, compiled[step], r)
    refused = error_of([*base, "--compile", "--dropout", 0.1, "--out-dir", tmp_path / "x"])
    assert "--compile needs --dropout 0 (got 0.1)" in refused and not os.path.exists(tmp_path / "x")
    assert train.model_config(train.parse_args([]), None, None, None).fused_kernels
    assert not train.model_config(train.parse_args(["--no-kernels"]), None, None, None).fused_kernels


# ----------------------------------------------------------------------------------------------
# what a cluster does to a run: restarts, preemption, divergence, a busy directory, a lost node


def cluster_args(text, out, *extra):
    """Dropout on, a checkpoint every 5 steps, t = the world size: resumes are exact (float32)."""
    return [*SMALL, "--data", text, "--steps", 40, "--dropout", 0.1, "--eval-interval", 10, "--ckpt-interval", 5,
            "--timeout", 30, "--out-dir", out, *extra]


@pytest.fixture(scope="module")
def uninterrupted(text, tmp_path_factory):
    """{nproc: log} of the runs that nothing stopped, each made when first asked for."""
    logs = {}

    def log_of(nproc):
        if nproc not in logs:
            out = tmp_path_factory.mktemp(f"uninterrupted{nproc}")
            run(cluster_args(text, out), nproc=nproc)
            logs[nproc] = read_log(out)
        return logs[nproc]
    return log_of


def assert_resumed_exactly(out, want):
    got = read_log(out)
    assert sorted(got) == sorted(want) == list(range(1, 41))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]  # bit for bit
    assert [got[s]["val_loss"] for s in (10, 20, 30, 40)] == [want[s]["val_loss"] for s in (10, 20, 30, 40)]


def new_ranks(job, old, timeout=60):
    """{rank: pid} of the ranks torchrun started after the ranks `old`, as soon as both are there."""
    start, ranks = time.monotonic(), old
    while len(ranks) < 2 or set(ranks.values()) & set(old.values()):
        assert time.monotonic() - start < timeout and job.proc.poll() is None, job.stderr()
        time.sleep(0.005)
        ranks = job.ranks()
    return ranks


def test_elastic_restart_comes_back_and_resumes_exactly(uninterrupted, text, tmp_path):
    """torchrun --max-restarts --resume: a rank is SIGKILLed mid-run, NANOSP_RESTARTS times (default
    1; rank 1, rank 0, ...), and torchrun starts both ranks again; then once more, and this time
    the new rank 0 is held (SIGSTOP) for 6 s before it joins, as a node slow to come back would be.
    torchrun's store still holds the killed attempt's gloo addresses: rank 1 read rank 0's old one
    and failed ("Connection refused"), or hung in init_process_group, whenever it got there first.
    Now every attempt comes back, rank 1 waits for the held rank 0, and the run ends with the
    uninterrupted run's losses, bit for bit."""
    out, restarts = tmp_path / "out", int(os.environ.get("NANOSP_RESTARTS", 1))
    launcher = ["--nproc_per_node=2", f"--max-restarts={restarts + 1}"]
    with Background(cluster_args(text, out, "--resume"), tmp_path, launcher) as job:
        seconds, resumed_at = [], 0
        for attempt in range(restarts + 1):
            wait_for_step(out, max(resumed_at + 3, 7), job)  # 3 steps after the checkpoint it resumed from
            killed, log = job.ranks(), os.stat(out / "log.jsonl").st_ino
            os.kill(killed[attempt % 2], signal.SIGKILL)
            start, resumed_at = time.monotonic(), load_ckpt(out)["step"]
            ranks = new_ranks(job, killed)
            if attempt == restarts:  # hold rank 0, whose address rank 1 reads to connect to it
                os.kill(ranks[0], signal.SIGSTOP)  # before it has imported torch (a second or more)
                time.sleep(6)  # longer than gloo tries to connect (about 3 s)
                os.kill(ranks[0], signal.SIGCONT)
            while os.stat(out / "log.jsonl").st_ino == log or max(logged_steps(out), default=0) <= resumed_at:
                assert time.monotonic() - start < 120 and job.proc.poll() is None, job.stderr()  # (a resume
                time.sleep(0.01)  # rewrites the log, cut back to its checkpoint, then logs the next step)
            seconds.append(time.monotonic() - start)
        assert job.proc.wait(timeout=120) == 0, job.stderr()
    times = ", ".join(f"{s:.1f}" for s in seconds[:-1])
    print(f"{restarts} restarts came back, from the SIGKILL to the first resumed step: {times} s "
          f"(median {sorted(seconds[:-1])[len(seconds[:-1]) // 2]:.1f} s); with a rank held 6 s: {seconds[-1]:.1f} s")
    assert job.stdout().count("resuming from") == restarts + 1  # (the first attempt: "no checkpoint")
    assert_resumed_exactly(out, uninterrupted(2))


STOPS = {  # who is sent what: (the launcher, the signal, who gets it)
    "SIGTERM to torchrun": (["--nproc_per_node=2"], signal.SIGTERM, "torchrun"),  # it forwards it to both ranks
    "SIGTERM to rank 1 only": (["--nproc_per_node=2"], signal.SIGTERM, 1),  # rank 0 learns it from rank 1
    "SIGINT to python": (None, signal.SIGINT, "python"),  # Ctrl-C
}


@pytest.mark.parametrize("case", STOPS)
def test_stop_signal_checkpoints_the_step_every_rank_stopped_after(case, uninterrupted, text, tmp_path):
    """A signal mid-run: every rank stops after the same step, whose checkpoint is written, one line
    says so, the ranks exit 128 + the signal's number, and --resume gives the uninterrupted run's
    losses. A rank that stopped alone would leave the other in a collective: no checkpoint."""
    launcher, sig, who = STOPS[case]
    out = tmp_path / "out"
    with Background(cluster_args(text, out), tmp_path, launcher) as job:
        wait_for_step(out, 12, job)
        os.kill(job.proc.pid if who in ("torchrun", "python") else job.ranks()[who], sig)
        start = time.monotonic()
        job.proc.wait(timeout=60)
        print(f"{case}: the run ended {time.monotonic() - start:.1f} s after the signal")
    said = [line for line in job.stderr().splitlines() if line.startswith("train.py")]
    stopped = re.fullmatch(rf"train.py: stopped by {sig.name} after step (\d+): {out / 'ckpt.pt'} holds it; "
                           r"continue with --resume", said[0] if len(said) == 1 else "")
    assert stopped, job.stderr()
    step = int(stopped[1])
    assert 12 <= step < 40 and load_ckpt(out)["step"] == step and max(read_log(out)) == step
    if who == "python":
        assert job.proc.returncode == 128 + sig and job.stderr() == said[0] + "\n"
    elif who == 1:  # torchrun reports both ranks' exit codes; the resume is the case above's
        assert set(exit_codes(job.stderr()).values()) == {128 + sig}, job.stderr()
        return
    nproc = 1 if launcher is None else 2
    run(cluster_args(text, out, "--resume"), nproc=nproc)
    assert_resumed_exactly(out, uninterrupted(nproc))


def catches(pid, sig):
    """Whether process `pid` has a handler of its own for signal `sig` (SigCgt in /proc/PID/status)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_the_first_step_ends_the_run_in_one_line(sig, text, tmp_path):
    """SIGTERM or Ctrl-C while plain python train.py still imports torch (seconds): nothing to save,
    so it ends at once with one line and 128 + the signal, and leaves no checkpoint and no log. It
    used to end silently (SIGTERM's default, -15) or with a KeyboardInterrupt traceback."""
    out = tmp_path / "out"
    with Background([*SMALL, "--data", text, "--out-dir", out], tmp_path, launcher=None) as job:
        while not catches(job.proc.pid, signal.SIGTERM):  # train.py's handlers: SIGINT's, then SIGTERM's
            assert job.proc.poll() is None, job.stderr()
            time.sleep(0.001)
        os.kill(job.proc.pid, sig)
        job.proc.wait(timeout=60)
    assert job.stderr() == f"train.py: stopped by {sig.name} before the first step; nothing was written\n"
    assert job.proc.returncode == 128 + sig and not job.stdout()
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()


def strict_json(line):
    """json.loads that refuses NaN and Infinity, which RFC 8259 (and jq, and JavaScript) reject."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_diverging_run_stops_before_the_bad_step_and_keeps_the_checkpoint(text, tmp_path):
    """From a good checkpoint at --lr 200 the loss grows and turns nan. The first non-finite step
    is not applied; the run stops with one line naming it and the last finite loss, exit code 3;
    the last checkpoint (of finite weights) is kept, and log.jsonl stays strict JSON."""
    common = [*SMALL, "--data", text, "--steps", 30, "--ckpt-interval", 2, "--eval-interval", 1, "--out-dir", tmp_path]
    run([*common, "--stop-after", 4])
    msg = error_of([*common, "--resume", "--lr", 200], code=3)
    found = re.fullmatch(r"train.py: error: step (\d+): the (loss|gradient norm) is not finite \(.*\): the step is not "
                         r"applied; the last finite loss was (\S+) at step (\d+); the checkpoint of step (\d+) is kept", msg)
    assert found, msg
    bad, last_loss, last, kept = int(found[1]), float(found[3]), int(found[4]), int(found[5])
    with open(tmp_path / "log.jsonl") as f:
        log = {r["step"]: r for r in map(strict_json, f)}
    assert last == bad - 1 and max(log) == last and log[last]["loss"] == pytest.approx(last_loss, rel=1e-5)
    ckpt = load_ckpt(tmp_path)
    assert ckpt["step"] == kept == last - last % 2 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    assert strict_json(guards.json_line({"loss": math.nan, "val_loss": -math.inf, "lr": 0.5})) == {
        "loss": None, "val_loss": None, "lr": 0.5}
    guard = guards.StepGuard(guards.StopSignals(), saved=8)  # (its handlers are not installed)
    with pytest.raises(guards.Diverged, match="step 9: the weights are not all finite"):
        guard.check_weights({"w": torch.tensor([1.0, math.inf])}, 9)


def test_a_non_finite_gradient_under_a_finite_loss_and_a_first_step_that_diverges(text, tmp_path):
    """Two more ways in. A c_fc bias of -1e20 (in a checkpoint) gives GeLU inputs whose output is
    0, so the loss is finite, and whose derivative is 0 * inf, so the gradient is NaN: the gradient
    norm stops the run at its first step, nothing applied, the checkpoint unchanged. And --lr 1e30
    from scratch: step 1 is finite, step 2 is not, before any checkpoint: the line says that none
    was written (it said "the checkpoint of step 0 is kept"), and none is."""
    common = [*SMALL, "--data", text, "--steps", 30, "--ckpt-interval", 2, "--out-dir", tmp_path / "bias"]
    run([*common, "--stop-after", 2])
    ckpt = load_ckpt(tmp_path / "bias")
    ckpt["model"]["h.1.mlp.c_fc.bias"][-1] = -1e20
    torch.save(ckpt, tmp_path / "bias" / "ckpt.pt")
    msg = error_of([*common, "--resume"], code=3)
    assert re.fullmatch(r"train.py: error: step 3: the gradient norm is not finite \(loss \d\.\d+, gradient norm nan\): "
                        r"the step is not applied; this run applied no step before it; the checkpoint of step 2 is kept",
                        msg), msg
    kept = load_ckpt(tmp_path / "bias")["model"]
    assert all(torch.equal(kept[name], w) for name, w in ckpt["model"].items())
    fresh = tmp_path / "fresh"
    msg = error_of([*SMALL, "--data", text, "--lr", 1e30, "--warmup-steps", 1, "--ckpt-interval", 5, "--out-dir", fresh],
                   code=3)
    assert re.fullmatch(r"train.py: error: step 2: the loss is not finite \(.*\): the step is not applied; the last "
                        r"finite loss was \S+ at step 1; no checkpoint was written", msg), msg
    assert not (fresh / "ckpt.pt").exists()
    with open(fresh / "log.jsonl") as f:
        assert [r["step"] for r in map(strict_json, f)] == [1]


def test_one_run_per_out_dir_and_a_killed_run_leaves_no_lock(text, tmp_path):
    """While a run trains into --out-dir, a second one is refused in one line naming the first
    (pid and host). Once the first is SIGKILLed, its lock file blocks nothing: --resume continues."""
    out = tmp_path / "out"
    args = [*SMALL, "--data", text, "--steps", 10**6, "--ckpt-interval", 3, "--out-dir", out]
    with Background(args, tmp_path, launcher=None) as first:
        wait_for_step(out, 4, first)
        msg = error_of([*args, "--resume", "--stop-after", 8])
        assert msg == (f"train.py: error: --out-dir {out} is in use by the run of pid {first.proc.pid} on host "
                       f"{socket.gethostname()} (it holds {out / 'lock'}); wait for it to end, or choose another --out-dir")
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    assert (out / "lock").exists()  # left behind, still naming the killed run
    step = load_ckpt(out)["step"]
    assert f"at step {step}" in run([*args, "--resume", "--stop-after", step + 1]).stdout
    assert load_ckpt(out)["step"] == step + 1 and not (out / "lock").exists()
    # a lock file that names a live process (its pid reused) on this host, or another host: only a held lock blocks
    for holder in (f"pid {os.getpid()} on host {socket.gethostname()}", "pid 1 on host elsewhere"):
        (out / "lock").write_text(holder + "\n")
        run([*args, "--resume", "--stop-after", step + 2])


def listening(port):
    """Whether a socket of this machine listens on TCP `port` (state 0A in /proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            if any(int(row.split()[1].split(":")[1], 16) == port and row.split()[3] == "0A" for row in list(f)[1:]):
                return True
    return False


def running(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


LOST = {  # which node is lost, and how
    # torchrun starts each rank in a session of its own: killing the agent's process group (as one
    # ends a node's job) left its ranks behind, and they trained on, unsupervised, with node A's
    "node B's agent's process group is SIGKILLed": ("b", "group"),
    # node A holds rank 0 (c10d orders the nodes by pid) and the rendezvous: node B's ranks lose theirs
    "node A's agent and its ranks are SIGKILLed": ("a", "ranks"),
}


def test_lost_node_ends_the_other_and_resume_continues(text, tmp_path):
    """Two torchrun agents on this machine, c10d rendezvous on loopback, 2 ranks each, tp=2 (TP
    inside a node, DP across). A node is lost mid-run, once each way: the other node's ranks end
    within --timeout and a few seconds, with one line and a non-zero exit, none of the lost node's
    ranks is left, and --resume on both nodes continues from the last checkpoint."""
    timeout, out = 10, tmp_path / "out"
    args = [*SMALL, "--data", text, "--steps", 10**6, "--eval-interval", 0, "--ckpt-interval", 5, "--tp", 2,
            "--timeout", timeout, "--out-dir", out, "--resume"]
    for attempt, how in enumerate(LOST):
        port, step = free_port(), load_ckpt(out)["step"] if attempt else 0
        launcher = ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id=lost{attempt}"]
        with Background(args, tmp_path, launcher, name=f"a{attempt}") as a:
            while not listening(port):  # A hosts the rendezvous, and starts first: it holds rank 0
                assert a.proc.poll() is None, a.stderr()
                time.sleep(0.05)
            with Background(args, tmp_path, launcher, name=f"b{attempt}") as b:
                wait_for_step(out, step + 7, a, b)
                (lost, other), kill = (b, a) if LOST[how][0] == "b" else (a, b), LOST[how][1]
                ranks = lost.ranks()
                assert (0 in ranks) == (lost is a), ranks
                if kill == "group":
                    os.killpg(lost.proc.pid, signal.SIGKILL)
                else:
                    for pid in [lost.proc.pid, *ranks.values()]:
                        os.kill(pid, signal.SIGKILL)
                start = time.monotonic()
                other.proc.wait(timeout=timeout + 60)
                elapsed = time.monotonic() - start
                time.sleep(1)
                left = [pid for pid in ranks.values() if running(pid)]
        said = [line for line in (a.stderr() + b.stderr()).splitlines() if line.startswith("train.py")]
        print(f"{how}, --timeout {timeout}: the other node ended after {elapsed:.1f} s: {said}")
        assert elapsed < timeout + 15 and other.proc.returncode != 0 and len(said) == 1 and not left, (
            elapsed, said, left)
        if attempt:
            assert f"resuming from {out / 'ckpt.pt'} at step {step}" in a.stdout() + b.stdout()
    assert load_ckpt(out)["step"] > step
