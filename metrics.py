"""metrics.py: what a train.py run measures, and the record it logs of a step.

Between two log lines the steps' seconds and tokens add up (Metrics.timing, around train_step;
on CUDA it synchronises first, so the time is the GPU's). A logged step's record holds its loss,
validation loss (on evaluation steps), learning rate and gradient norm; tokens/s and ms per step
since the last line; the peak memory; the layout; the recompute plan with the activation bytes
the ledgers predict for it; which definitions of the fusable ops ran. Rank 0 writes it to
log.jsonl (guards.Log) and prints it as one progress line.
"""
import contextlib
import resource
import time

import torch

import ledgers
import nanosp


class Metrics:
    """The steps' time and tokens since the last log line; `record` logs a step and starts anew."""

    def __init__(self, run, model, log):
        self.run, self.model, self.log, self.ops = run, model, log, ops_in_use(model.cfg, run.device)
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        self.plans = {}  # {T: the layers' recompute plan at batch length T}, as the model runs it

    @contextlib.contextmanager
    def timing(self, tokens):
        device = self.run.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - start
        self.tokens += tokens
        self.steps += 1

    def record(self, step, T, lr, loss, norm, val):
        run, plan = self.run, self.plan(T)
        record = {"step": step, "loss": loss.item(), "val_loss": val, "lr": lr, "grad_norm": norm.item(),
                  "tokens_per_s": self.tokens / self.seconds, "ms": 1000 * self.seconds / self.steps,
                  "mem_bytes": peak_memory(run.device), "tp": run.t, "dp": run.dp, "seq_len": T,
                  "sequence_parallel": run.cfg.sequence_parallel, "recompute": str(plan),
                  "activation_bytes": plan.activation_bytes,  # predicted: what the layers save, per rank
                  "ops": self.ops, "compile": run.args.compile}
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        self.log.write(record)  # (rank 0's; on the other ranks it writes nothing)
        if run.rank == 0:
            planned = bool(run.plans or run.args.seq_len_schedule)
            print(progress_line(record, run.args.max_steps, planned), flush=True)


    def plan(self, T):
        """What the layers recompute at batch length T and the bytes they save (ledgers), once per T:
        --activation-budget's plan for T, or --recompute's for every T."""
        if T not in self.plans:
            cfg = self.model.cfg
            costs = ledgers.recompute_costs(cfg, self.run.t, self.run.rows, T, getattr(torch, self.run.args.dtype))
            self.plans[T] = ledgers.plan_of(costs, [cfg.recompute_of(layer) for layer in range(cfg.n_layer)])
        return self.plans[T]


def summary(run):
    """The run in one line, said before the first step, then what the planner noted of each length (with
    sdpa: that selective has little to save)."""
    args, cfg = run.args, run.cfg
    recompute = f"for {args.activation_budget:,} bytes" if run.plans else cfg.recompute
    lengths = "/".join(map(str, run.seq_lens))
    notes = "".join(f"\nT={T}: {plan.note}" for T, plan in run.plans.items() if plan.note)
    return (f"tp={run.t} dp={run.dp} sequence_parallel={cfg.sequence_parallel} recompute={recompute} "
            f"attention={cfg.attention}, {cfg.n_layer} layers x {cfg.n_embd}, batch {args.batch_size} x {lengths} "
            f"tokens in {args.grad_accum} micro-steps, {run.device}, {args.dtype}" + notes)


def progress_line(r, max_steps, planned=False):
    val = f" | val {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
    plan = f" | T {r['seq_len']}: {r['recompute']}, {r['activation_bytes'] / 2**20:,.1f} MiB" if planned else ""
    return (f"step {r['step']:>{len(str(max_steps))}}/{max_steps} {100 * r['step'] // max_steps:3d}% "
            f"| loss {r['loss']:.4f}{val} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s "
            f"| {r['ms']:.1f} ms | mem {r['mem_bytes'] / 2**20:,.0f} MiB{plan}")


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def ops_in_use(cfg, device):
    """Which definitions of the fusable ops the model runs on `device`: kernels.py's or nanosp's."""
    fused = nanosp.ops_for(torch.empty(0, device=device), cfg) is not nanosp.REFERENCE_OPS
    return "kernels.py" if fused else "nanosp"
