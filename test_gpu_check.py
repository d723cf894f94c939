"""gpu_check.py's dry run: the entry point a GPU runs, at tiny sizes, on this machine's CPU, so
the day a GPU is lent the check itself is known to work.

The parts that need CUDA say they were skipped; the rest run for real and are held to what they
claim: versions and ceilings measured; test_kernels.py's CUDA tests selected (and skipped here,
with no failure); the CUDA-mode equivalence harness (its collectives staged through host memory)
within its derived tolerances at every dtype, t, SP and recompute mode it covers; train.py's runs
parsed into tokens/s and memory; a bf16 resume equal to the uninterrupted run bit for bit; the
activation ledger measured equal to its prediction. And the runner: a part past its time limit is
stopped and the next one runs; a part that fails is recorded with its error, and the rest go on.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpu_check

ROOT = Path(__file__).resolve().parent


def check(out, *options, timeout=600):
    run = subprocess.run([sys.executable, "gpu_check.py", "--out", str(out), *options], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), run.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a dry run on a GPU machine runs the CUDA parts, which this test does not describe")
    return check(tmp_path_factory.mktemp("gpu_check"), "--dry-run")


def test_the_report_is_three_files_a_device_sends_back(dry_run, tmp_path_factory):
    result, report, stdout = dry_run
    assert list(result["parts"]) == list(gpu_check.PARTS)
    assert result["meta"]["dry_run"] and result["meta"]["seconds"] > 0
    for heading in ("# nanosp GPU check", "## Parts", "## Targets", "## 3. Equivalence", "## 5. Training"):
        assert heading in report, heading
    assert "## Targets" in stdout  # the table a device's reply carries, its output's end
    for t in gpu_check.targets(result["parts"]):
        assert t["met"] is None, f"{t['target']}: judged without a GPU"  # each is measured on CUDA only


def test_env_measures_the_ceilings(dry_run):
    env = dry_run[0]["parts"]["env"]
    assert env["status"] == "ok", env
    r = env["result"]
    assert r["versions"]["torch"] == torch.__version__ and r["cuda_available"] is False
    assert r["copy"]["GBps"] > 0 and r["matmul"]["TFLOPs"] > 0


def test_kernels_part_selects_the_cuda_tests(dry_run):
    part = dry_run[0]["parts"]["kernels"]
    assert part["status"] == "ok" and part["result"]["build"] == {"skipped": "no CUDA device"}
    tests = part["result"]["tests"]
    counts = tests["counts"]
    # without CUDA every selected CUDA test is skipped; what runs here (a CPU refusal) passes
    assert tests["returncode"] == 0 and counts["skipped"] >= 300 and counts.get("failed", 0) == 0, tests
    assert counts["passed"] >= 1 and counts["deselected"] >= 300  # the emulator's twins are left out


def test_equivalence_harness_holds_at_every_dtype(dry_run):
    part = dry_run[0]["parts"]["equivalence"]
    assert part["status"] == "ok", part
    cases = part["result"]["cases"]
    assert {(c["dtype"], c["t"], c["sequence_parallel"]) for c in cases} == {
        (d, t, sp) for d in ("float64", "float32", "bfloat16") for t, sp in ((1, False), (2, False), (2, True))}
    for dtype in ("float64", "float32", "bfloat16"):
        assert {c["recompute"] for c in cases if c["dtype"] == dtype} == {"none", "selective", "full"}
    for c in cases:
        errors = c["result"]["errors"]
        assert gpu_check.case_ok(c), c
        assert c["dtype"] == "float64" or min(errors.values()) > 0, c  # another precision: compared, not copied
    assert max(c["tolerance"] for c in cases if c["dtype"] == "float64") == 1e-10


def test_training_runs_are_measured_and_the_bf16_resume_is_exact(dry_run):
    part = dry_run[0]["parts"]["training"]
    assert part["status"] == "ok", part
    r = part["result"]
    for label, run in r["runs"].items():  # the timed runs a GPU makes: accepted by train.py, or said to be missing
        assert run["skipped"].startswith(("dry run: train.py accepts", "train.py does not take --attention")), label
    resume = r["resume"]
    assert resume["equal"] and resume["losses_equal"] and resume["tensors"] > 0 and resume["unequal_tensors"] == 0
    assert all(run["returncode"] == 0 and run["tokens_per_s"] > 0 and run["mem_bytes"] > 0 and run["ops"] == "nanosp"
               for run in resume["runs"]), resume["runs"]
    assert all(row["measured"] == row["predicted"] > 0 for row in r["ledger"]), r["ledger"]


def test_a_part_past_its_limit_is_stopped_and_the_next_runs(tmp_path):
    start = time.monotonic()
    result, report, _ = check(tmp_path, "--dry-run", "--parts", "equivalence,kernel_bench", "--budget", "3")
    assert time.monotonic() - start < 60
    equivalence = result["parts"]["equivalence"]
    assert equivalence["status"] == "timed out" and "limit" in equivalence["error"], equivalence
    assert result["parts"]["kernel_bench"]["status"] in ("skipped", "timed out")
    assert "| equivalence | timed out |" in report


def test_a_failing_part_is_recorded_and_the_rest_go_on(tmp_path):
    """t = 2 over NCCL on a machine without it fails; the t = 1 cases it ran first are kept."""
    result, report, _ = check(tmp_path, "--dry-run", "--parts", "equivalence,kernel_bench", "--backend", "nccl")
    equivalence = result["parts"]["equivalence"]
    assert equivalence["status"] == "failed" and equivalence["error"], equivalence
    single = [c for c in equivalence["result"]["cases"] if c["t"] == 1]
    assert single and all(gpu_check.case_ok(c) for c in single)
    assert result["parts"]["kernel_bench"]["status"] == "skipped"
    assert "| equivalence | failed |" in report


def test_host_staged_collectives_are_nanosps_collectives():
    """The staging stand-in replaces exactly what nanosp calls, and gives it back afterwards."""
    import nanosp

    before = (nanosp.dist, nanosp._all_gather_into, nanosp._reduce_scatter_into)
    with gpu_check.HostStaged(nanosp) as staged:
        assert nanosp.dist is staged and staged.get_world_size is torch.distributed.get_world_size
        assert nanosp._all_gather_into is not before[1] and nanosp._reduce_scatter_into is not before[2]
    assert (nanosp.dist, nanosp._all_gather_into, nanosp._reduce_scatter_into) == before


def test_pytest_summary_reads_the_closing_line():
    lines = ["....F", "FAILED test_kernels.py::test_x[cuda] - AssertionError", "1 failed, 4 passed, 2 skipped, "
             "3 deselected, 1 error in 2.0s"]
    summary = gpu_check.pytest_summary(lines)
    assert summary["counts"] == dict(failed=1, passed=4, skipped=2, deselected=3, error=1)
    assert summary["failures"] == [lines[1]]


def test_unit_scale_weights_keep_activations_near_one():
    """What the tolerances assume: each linear's output is of unit scale."""
    import nanosp

    cfg = nanosp.GPTConfig(**{k: v for k, v in gpu_check.EQUIVALENCE.items() if k != "batch"}, block_size=32)
    model = nanosp.GPT(cfg)
    model.load_full_state_dict(gpu_check.unit_scale_state_dict(model.full_shapes(), 0))
    scales = []
    for block in model.h:
        block.mlp.c_fc.register_forward_hook(lambda m, a, y: scales.append(y.std().item()))
        block.attn.c_attn.register_forward_hook(lambda m, a, y: scales.append(y.std().item()))
    model(torch.randint(0, cfg.vocab_size, (2, 32)))
    assert all(0.5 < s < 2 for s in scales), scales
