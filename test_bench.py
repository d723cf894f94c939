"""bench.py --quick runs, prints every table and writes JSON whose numbers agree with the paper where
nanosp claims they do: activation bytes within 3% of Table 2, FLOPs counted equal to the exact
count, the activation collectives of TP and TP+SP equal in ring bytes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    for title in ("### 1a. Activation memory", "### 1b.", "### 2. FLOPs", "### 3a.", "### 3b.", "### 4a. Time", "### 4b.",
                  "### 4c.", "### 5", "### 6.", "### 7. autoshard"):
        assert title in run.stdout, f"{title!r} missing from:\n{run.stdout}"
    result = json.loads(out.read_text())

    memory = result["memory"]
    assert {r["t"] for r in memory} == {1, 2, 4, 8} and len(memory) == 24
    assert all(0.97 < r["ratio"] < 1.03 for r in memory), [r["ratio"] for r in memory]
    best = next(r for r in memory if r["t"] == 8 and r["configuration"].endswith("sequence parallel + selective recompute"))
    assert best["vs_tp"] > 4

    attention = result["attention"]  # one layer at t = 8 with SP, written out and fused
    assert all(r["measured"] == r["ledger"] for r in attention)
    for s in {r["s"] for r in attention}:
        by = {r["configuration"]: r for r in attention if r["s"] == s}
        sdpa, selective = by["TP + SP + sdpa"], by["TP + SP + selective (Table 2's row)"]
        assert sdpa["measured"] < selective["measured"] and 0.97 < selective["measured"] / selective["formula"] < 1.03
        h, a, b = (result["meta"]["sizes"]["attention"][k] for k in ("h", "a", "b"))
        assert sdpa["measured"] - by["TP + SP + selective, no dropout"]["measured"] == 4 * a * s * b // 8  # the lse
        qk = 2 * b * s * s * h // 8  # FLOPs of QK^T (or of .V) on one rank
        assert {name: r["twice"] for name, r in by.items()} == {
            "TP + SP": 0, "TP + SP + selective (Table 2's row)": 2 * qk, "TP + SP + selective, no dropout": 2 * qk,
            "TP + SP + sdpa": qk, "TP + SP + sdpa + selective": 3 * qk}

    floor = result["floor"]["rows"]  # the floor computes nanosp's loss, for each attention
    assert [r["attention"] for r in floor] == ["explicit", "sdpa"]
    assert all(r["loss_difference"] < 1e-5 and r["nanosp"] > 0 and r["floor"] > 0 for r in floor)

    flops = [r for r in result["flops"] if r["counted"] is not None]
    assert [r["recompute"] for r in flops] == ["none", "selective", "full"]
    assert all(r["counted"] == r["exact"] for r in flops)
    assert all(abs(r["exact"] / r["paper"] - 1) < 1e-12 for r in result["flops"] if r["recompute"] != "selective")

    summary = result["communication"]["summary"]
    assert [r["t"] for r in summary] == [2, 4, 8]
    assert all(r["tp_activations"] == r["sp_activations"] > 0 for r in summary)
    assert all(r["sp_regather"] == r["sp_activations"] / 4 for r in summary)  # 2 of 8 sequence collectives

    frontier = result["frontier"]
    measured = [r for r in frontier if r["measured"] is not None]
    assert measured and all(r["measured"] == r["activation_bytes"] for r in measured)
    for model in {r["model"] for r in frontier}:  # bytes fall and recompute FLOPs rise along the frontier
        rows = [r for r in frontier if r["model"] == model]
        statics = [r["static"].split(":")[-1].split()[0] for r in rows if r["static"]]
        if "sdpa" in model:  # selective saves only the log-sum-exp: on the frontier or not, by the shape
            statics = [m for m in statics if m != "selective"]
        assert statics == (["none", "full"] if "sdpa" in model else ["none", "selective", "full"])
        assert all(a["activation_bytes"] > b["activation_bytes"] and a["recompute_flops"] < b["recompute_flops"]
                   for a, b in zip(rows, rows[1:]))

    assert set(result["time"]["dropout"]) == {"F.dropout", "nanosp.dropout", "nanosp.dropout_keep_mask"}
    assert [r["config"] for r in result["time"]["steps"]] == ["TP", "TP+SP", "TP+selective", "TP+SP+selective", "TP+full"]
    assert all(r[column]["ms"] > 0 for r in result["time"]["steps"] for column in ("dropout 0.1", "dropout 0.0"))
