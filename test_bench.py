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
    for title in ("### 1. Activation memory", "### 2. FLOPs", "### 3a.", "### 3b.", "### 4. Time", "### 5", "### 6.",
                  "### 7. autoshard"):
        assert title in run.stdout, f"{title!r} missing from:\n{run.stdout}"
    result = json.loads(out.read_text())

    memory = result["memory"]
    assert {r["t"] for r in memory} == {1, 2, 4, 8} and len(memory) == 24
    assert all(0.97 < r["ratio"] < 1.03 for r in memory), [r["ratio"] for r in memory]
    best = next(r for r in memory if r["t"] == 8 and r["configuration"].endswith("sequence parallel + selective recompute"))
    assert best["vs_tp"] > 4

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
        assert [r["static"].split(":")[-1].split()[0] for r in rows if r["static"]] == ["none", "selective", "full"]
        assert all(a["activation_bytes"] > b["activation_bytes"] and a["recompute_flops"] < b["recompute_flops"]
                   for a, b in zip(rows, rows[1:]))

    assert set(result["time"]["dropout"]) == {"F.dropout", "nanosp.dropout", "nanosp.dropout_keep_mask"}
    assert [r["config"] for r in result["time"]["steps"]] == ["TP", "TP+SP", "TP+selective", "TP+SP+selective", "TP+full"]
    assert all(r[column]["ms"] > 0 for r in result["time"]["steps"] for column in ("dropout 0.1", "dropout 0.0"))
