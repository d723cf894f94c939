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

import ledgers
import nanosp
import train

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


def read_log(out_dir):
    """{step: record}; a resumed run appends, so the last record of a step wins."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


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
def test_layout_steps_equal_single_process(layout, text, reference, tmp_path):
    nproc, extra = LAYOUTS[layout]
    run([*equivalence_args(text, tmp_path), *extra], nproc=nproc)
    want, got = load_ckpt(reference), load_ckpt(tmp_path)
    for name, tensor in want["model"].items():
        assert rel_err(got["model"][name], tensor) < 1e-10, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(got["optimizer"][name][key], want["optimizer"][name][key]) < 1e-10, (name, key)
        assert got["optimizer"][name]["step"] == 2
    want_log, got_log = read_log(reference), read_log(tmp_path)
    for step in (1, 2):
        assert want_log[step]["grad_norm"] > 0.05  # clipping acted
        assert got_log[step]["grad_norm"] == pytest.approx(want_log[step]["grad_norm"], rel=1e-10)
        assert got_log[step]["loss"] == pytest.approx(want_log[step]["loss"], rel=1e-10)


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
    crash = (f"import os, train; os.replace = lambda *a: os._exit(9); "
             f"train.write_atomic({str(cut / 'ckpt.pt')!r}, b'junk')")
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
    (["--lr", -1], "--lr -1.0 must be a finite number > 0"),
    (["--lr", 0], "--lr 0.0 must be a finite number > 0"),
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
    monkeypatch.setattr(train.time, "sleep", lambda seconds: None)  # torchrun is not here to stop it
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}",
           "--log-dir", logs, "--redirects", "2", os.path.join(HERE, "train.py"), *SMALL, "--data", text,
           "--steps", 10**6, "--eval-interval", 0, "--ckpt-interval", 0, "--tp", 2, "--timeout", timeout,
           "--out-dir", out]
    with open(tmp_path / "torchrun.err", "w+") as report:
        proc = subprocess.Popen(list(map(str, cmd)), env=ENV, stdout=subprocess.DEVNULL, stderr=report)
        workers = []
        try:
            deadline = time.monotonic() + 120
            while not (out / "log.jsonl").exists() or not (out / "log.jsonl").stat().st_size:  # step 1 done
                assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
                time.sleep(0.1)
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                workers = [int(pid) for pid in f.read().split()]
            rank_of = {}
            for pid in workers:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                rank_of[int(env[b"RANK"])] = pid
            os.kill(rank_of[1], getattr(signal, sig))
            start = time.monotonic()
            proc.wait(timeout=most + 30)
            elapsed = time.monotonic() - start
        finally:
            for pid in workers:  # never leave a stopped process behind
                for kill in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, kill)
            proc.kill()
        report.seek(0)
        codes = exit_codes(report.read())
    print(f"{sig} of rank 1, --timeout {timeout}: the run ended after {elapsed:.1f} s")
    assert elapsed < most and (sig != "SIGSTOP" or elapsed > timeout)
    said = rank_stderr(logs, 0)
    assert proc.returncode != 0 and codes[1] == -signal.SIGKILL and rank_stderr(logs, 1) == ""
    if sig == "SIGSTOP":
        assert codes[0] == 1 and said == f"train.py: error: {says}\n"
    else:  # stopped by torchrun before, while or after it says its one line
        assert codes[0] in (1, -signal.SIGTERM) and said in ("", f"train.py: error: {says}\n"), (codes, said)
