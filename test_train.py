"""train.py end to end: real runs (`python train.py` and torchrun with gloo on CPU), compared
through what they write: log.jsonl and the unsharded checkpoints.

Tolerances: float64 layouts against the single process, relative to the largest reference
element, under 1e-10 (what differs is reduction order). Resume at the same t is exact (float32,
bit for bit); resume at another t in float32 differs by reduction order only (1e-4).
Every process runs with OMP_NUM_THREADS=1: on a busy 2-core machine more threads only spin.
"""
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

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


def run(args, nproc=1, check=True, timeout=240):
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                      f"--master-port={free_port()}"]
    proc = subprocess.run([sys.executable, *launcher, os.path.join(HERE, "train.py"), *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


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
             f"train.save_atomic({{'junk': 1}}, {str(cut / 'ckpt.pt')!r})")
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
    run([*SMALL, "--data", text, "--steps", 1, "--lr", 0, "--out-dir", init])  # float32, unchanged
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
# GPT-2 weights, against an independent forward on the Hugging Face layout


def random_hf_gpt2(n_layer=2, n_embd=32, vocab=301, block=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.2: torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    C, sd = n_embd, {"transformer.wte.weight": r(vocab, n_embd), "transformer.wpe.weight": r(block, n_embd)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C), h + "ln_2.weight": 1 + r(C),
                   h + "ln_2.bias": r(C), h + "attn.bias": torch.ones(1, 1, block, block).tril(),
                   h + "attn.masked_bias": torch.tensor(-1e4),
                   h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C),
                   h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
                   h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C),
                   h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C)})
    sd.update({"transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C),
               "lm_head.weight": sd["transformer.wte.weight"]})
    return sd


def gpt2_forward(sd, idx, n_layer, n_head):
    """GPT-2 as Hugging Face lays it out: Conv1D is x @ W + b, GeLU tanh, LayerNorm eps 1e-5."""
    w = lambda key: sd["transformer." + key]
    B, T = idx.shape
    x = w("wte.weight")[idx] + w("wpe.weight")[:T]
    C = x.shape[-1]
    ln = lambda x, key: F.layer_norm(x, (C,), w(key + ".weight"), w(key + ".bias"), 1e-5)
    conv = lambda x, key: x @ w(key + ".weight") + w(key + ".bias")
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    heads = lambda z: z.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
    for i in range(n_layer):
        q, k, v = map(heads, conv(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, dim=-1))
        att = q @ k.transpose(-2, -1) / math.sqrt(C // n_head)  # (B, nh, T, T)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + conv((att @ v).transpose(1, 2).reshape(B, T, C), f"h.{i}.attn.c_proj")
        x = x + conv(gelu(conv(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ w("wte.weight").T  # (B, T, vocab)


GPT2_CFG = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=301)


def gpt2_logits_error(group):
    sd = random_hf_gpt2()
    model = nanosp.GPT(nanosp.GPTConfig(**GPT2_CFG), group=group).double().eval()
    model.load_full_state_dict(train.gpt2_to_nanosp(sd, 2))
    idx = torch.randint(0, 301, (2, 32), generator=torch.Generator().manual_seed(1))
    return rel_err(model(idx)[0], gpt2_forward(sd, idx, 2, 4))


def _gpt2_worker(rank, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        err = gpt2_logits_error(dist.group.WORLD)
        if rank == 0:
            with open(path, "w") as f:
                f.write(repr(err))
    finally:
        dist.destroy_process_group()


def test_gpt2_import_matches_reference_logits(tmp_path):
    assert gpt2_logits_error(None) < 1e-10
    mp.start_processes(_gpt2_worker, args=(free_port(), str(tmp_path / "err")), nprocs=2,
                       start_method="spawn")
    assert float((tmp_path / "err").read_text()) < 1e-10  # t=2, vocab 301 padded to 302


def test_init_gpt2_flag_loads_the_weights(text, tmp_path):
    """--init gpt2:PATH then one step at lr 0 (no update, no decay): the checkpoint holds the weights."""
    path = tmp_path / "gpt2.pt"
    torch.save(random_hf_gpt2(vocab=50257), path)  # the preset's vocabulary
    train.main(list(map(str, [*SMALL, "--preset", "gpt2", "--data", text, "--steps", 1, "--lr", 0, "--dtype",
                              "float64", "--init", f"gpt2:{path}", "--out-dir", tmp_path / "out"])))
    got, want = load_ckpt(tmp_path / "out")["model"], train.gpt2_to_nanosp(random_hf_gpt2(vocab=50257), 2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------------
# errors: one line naming the value, exit code 2, no hang


def error_of(capsys, argv, monkeypatch=None, world=None):
    if world:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(map(str, argv)))
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message.startswith("train.py: error: ") and "\n" not in message
    return message


def test_errors(capsys, monkeypatch, trained, tmp_path, text):
    assert "--data nope.txt" in error_of(capsys, ["--data", "nope.txt"])
    msg = error_of(capsys, [*SMALL, "--data", text, "--seq-len", 64])
    assert "--seq-len 64" in msg and "block_size=32" in msg
    msg = error_of(capsys, [*SMALL, "--n-embd", 64, "--resume", "--out-dir", trained])
    assert "n_embd=32" in msg and "n_embd=64" in msg
    assert "--tp 3 does not divide the world size 4" in error_of(
        capsys, [*SMALL, "--tp", 3], monkeypatch, world=4)
    assert "n_head=4" in error_of(capsys, [*SMALL, "--tp", 3], monkeypatch, world=3)
    monkeypatch.delenv("WORLD_SIZE")
    assert "--from nowhere" in error_of(capsys, ["--sample", "--from", "nowhere"])
    assert "--init gpt2:missing.pt" in error_of(capsys, [*SMALL, "--data", text, "--init", "gpt2:missing.pt"])


def test_error_under_torchrun_exits_without_hanging():
    proc = run([*SMALL, "--tp", 3], nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "train.py: error: --tp 3 does not divide the world size 2" in proc.stderr


def test_resume_without_checkpoint_starts_fresh(capsys, text, tmp_path):
    train.main(list(map(str, [*SMALL, "--data", text, "--steps", 1, "--resume", "--out-dir", tmp_path])))
    assert "no checkpoint" in capsys.readouterr().out
    assert load_ckpt(tmp_path)["step"] == 1
