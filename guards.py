"""guards.py: what keeps a train.py run whole through what a cluster does to it.

One place per concern, each used by train.py in a line or two (checks.py checks the options and
files before any of this runs):
- how a run ends: the exceptions and their exit codes (1 failed, 2 bad usage, 3 diverged,
  128 + N stopped by signal N, as a shell reports a process that signal N ended); fail: one line
  from the rank that should say it, and the end of this host's ranks that a timeout left stuck;
- join_world: init_process_group that comes back after torchrun restarts the ranks
  (`--max-restarts`), which plain init_process_group does not always do; collectives: a
  collective that times out or loses a rank becomes one line naming its process group;
- DirectoryLock: one run per --out-dir, however the last one ended;
- StopSignals: SIGTERM and SIGINT stop every rank at the same step boundary; follow_agent: a
  rank whose torchrun agent dies gets SIGTERM;
- StepGuard: one tiny all-reduce per step agrees on a stop and on a non-finite loss or gradient
  norm (that step is not applied), and no checkpoint is written from non-finite weights;
- write_atomic: a file is replaced whole or not at all; a failed write keeps the previous one;
- Log: log.jsonl, cut back to the checkpoint a run resumes from, strict JSON (non-finite numbers
  are written as null); a failed write is one line.
"""
import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# how a run ends


class Failure(Exception):
    """A run that cannot go on (a collective timed out, a write failed): one line, exit code 1."""
    code = 1


class Timeout(Failure):
    """A collective that timed out: the run is over, so this host's other ranks are ended too."""


class Lost(Failure):
    """A collective that lost a rank: its process ended (killed, or its node lost)."""


class Usage(Failure):
    """A bad option or file: one line, exit code 2, on every rank alike."""
    code = 2


class Diverged(Failure):
    """A non-finite loss or gradient norm: the step is not applied, the run stops, exit code 3."""
    code = 3


class Stopped(Failure):
    """SIGTERM or SIGINT: every rank stopped after the same step, whose checkpoint is written."""

    def __init__(self, signum, step=None, ckpt_path=None):
        self.code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} before the first step; nothing was written" if step is None else
                         f"stopped by {name} after step {step}: {ckpt_path} holds it; continue with --resume")


def fail(error, rank, peers=(), signals=None):
    """Ends this process with one line and the error's exit code. Rank 0 speaks at once; torchrun
    then stops the other ranks. They wait a moment first, because torchrun stops every rank as soon
    as one exits, maybe before rank 0 has printed. A rank still running after that speaks too,
    naming itself: rank 0 could not (it is the one that stopped answering, or it did not fail); a
    node's other ranks wait longer, so that one line comes from each node. After a timeout the rank
    that speaks also ends this host's other ranks (`peers`, (host, pid) of every rank): torchrun's
    SIGTERM cannot end a stopped process, and it waits 30 s before its SIGKILL. What every rank
    agreed on (a stop, a divergence) rank 0 alone says. When a rank's process ended (Lost), each
    node's first rank says so at once and its other ranks end silently at once, so that a first
    rank blocked on them learns it too. A ValueError is a bad option or file: exit code 2."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    if isinstance(error, (Stopped, Diverged)):
        if "RANK" in os.environ:  # torchrun's SIGTERM, which follows the first rank out, keeps the code
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        quiet = rank != 0
    elif isinstance(error, Lost):
        quiet = not first
    else:
        if signals is not None:
            signals.restore()  # so that torchrun's SIGTERM ends this rank while it waits
        if rank != 0 and not (signals and signals.received):  # (received: torchrun is stopping it)
            time.sleep(5 if first else 7)
        quiet = False
    code = error.code if isinstance(error, Failure) else 2
    if quiet:
        sys.exit(code)
    where = "" if rank == 0 else f"rank {rank}: "
    what = "" if isinstance(error, Stopped) else "error: "
    print(f"train.py: {what}{where}{error}", file=sys.stderr, flush=True)
    if isinstance(error, Timeout):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, once it sees a peer end: exit with `code`
        for host, pid in peers:
            if host == socket.gethostname() and pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        os._exit(code)  # not through destroy_process_group, which would wait for the ranks just ended
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# joining the world, again after a restart


def join_world(backend, timeout):
    """init_process_group, under torchrun's restarts too.

    torchrun's agent keeps one TCPStore for its whole life and hands the same MASTER_PORT to every
    restart of the ranks (TORCHELASTIC_USE_AGENT_STORE=True), yet init_process_group keys that
    store as if it were new: gloo reads each peer's address under a fixed key
    ("default_pg/0//cpu//0/<rank>"). A restarted rank that reads its peer's key before the peer
    has rewritten it gets the address of a process that died with the last attempt: gloo fails
    with "Connection refused" (and the restart is spent) or hangs. PyTorch issue #135712 (the
    shared store and restarts; TORCHELASTIC_RESTART_COUNT, which would name an attempt, is counted
    per agent, so not the same on every node). Here every attempt works under a prefix no other
    attempt has: the one rank 0 makes up and the others join (fresh_namespace)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # rank 0 hosts a new store
        dist.init_process_group(backend, timeout=timeout)
        return
    follow_agent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    prefix = fresh_namespace(store, rank, world, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"nanosp/{prefix}/", store), rank=rank,
                            world_size=world, timeout=timeout)


def fresh_namespace(store, rank, world, timeout):
    """A name that every rank of this attempt agrees on and that no earlier attempt used. Rank 0
    makes one up and publishes it; each other rank answers under the published name with a name
    of its own, and waits for rank 0 to acknowledge that one. A name published by a rank 0 of an
    earlier attempt (it is dead) is never acknowledged: the rank reads the name again and again
    until this attempt's rank 0 has published its own. Everything waits at most `timeout`."""
    me = uuid.uuid4().hex
    if rank == 0:
        store.set("nanosp/leader", me)
        joined = [f"nanosp/{me}/{r}" for r in range(1, world)]
        store.wait(joined, timeout)  # raises after `timeout`: a rank did not come back
        for key in joined:
            store.set(f"nanosp/ack/{store.get(key).decode()}", me)
        return me
    deadline = time.monotonic() + timeout.total_seconds()
    leader = None
    while time.monotonic() < deadline:
        if store.check([f"nanosp/ack/{me}"]):  # (check does not wait; wait would warn at each try)
            return store.get(f"nanosp/ack/{me}").decode()
        published = store.get("nanosp/leader").decode() if store.check(["nanosp/leader"]) else None
        if published not in (None, leader):  # (re)join under the name published last
            leader = published
            store.set(f"nanosp/{leader}/{rank}", me)
        time.sleep(0.02)
    raise Timeout(f"rank 0 did not answer within --timeout {timeout.total_seconds():g} s while the ranks joined")


@contextlib.contextmanager
def collectives(group, timeout):
    """A collective in this block that times out (after `timeout` seconds), or loses a rank, becomes
    one line that names its process group. gloo says which only in the text of a RuntimeError:
    "... Timed out waiting 6000ms for recv operation to complete", "... Read error ...: Connection
    reset by peer"."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        if "timed out" in text or "timeout" in text:
            raise Timeout(f"a collective on the {group} group timed out after {timeout:g} s: "
                          f"a rank stopped answering") from None
        if "connection reset" in text or "connection closed" in text or "broken pipe" in text:
            raise Lost(f"a collective on the {group} group lost a rank: its process ended") from None
        raise


# ----------------------------------------------------------------------------------------------
# one run per directory


class DirectoryLock:
    """An exclusive flock on OUT_DIR/lock, which names its holder (host and pid). The kernel
    releases a flock when its process ends, however it ends (SIGKILL too), so a lock left by a
    killed run blocks nothing; flock also works across the hosts of an NFS mount (Linux emulates
    it with fcntl locks there). The holder unlinks the file before it lets go; a run that opened
    the file just before the unlink sees that its file is no longer the one in the directory
    and tries again."""

    def __init__(self, out_dir):
        self.path, self.fd = os.path.join(out_dir, "lock"), None
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Usage(f"--out-dir {out_dir}: {self.path} cannot be locked: {e.strerror.lower()}") from None
                raise Usage(f"--out-dir {out_dir} is in use by the run of {holder} (it holds {self.path}); "
                            f"wait for it to end, or choose another --out-dir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
                self.fd = fd
                return
            os.close(fd)  # the holder unlinked it as we opened it: lock the new one
        raise Usage(f"--out-dir {out_dir}: {self.path} keeps changing; is another run starting there?")

    def release(self):
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding it: see the class docstring
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------------
# stopping at a step boundary


class StopSignals:
    """Once installed, SIGTERM and SIGINT only note that they came: the run stops at the next step
    boundary that every rank agrees on (StepGuard), not where the signal happens to land. They stay
    installed until the process has said how it ends (fail), so that torchrun's SIGTERM to the ranks
    still running, sent once the first one exits, cannot cut a stopping rank short.
    torchrun forwards the SIGTERM (or SIGINT) it gets to every rank and gives them
    --shutdown-timeout seconds (default 30) to end before SIGKILL; a terminal's Ctrl-C may reach a
    rank twice (directly and through torchrun), which changes nothing."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0  # the signal's number, 0 for none
        self.previous = {}  # the handlers replaced while installed

    def install(self):
        if threading.current_thread() is threading.main_thread():  # (the only one signals reach)
            self.previous = {sig: signal.signal(sig, self.note) for sig in self.SIGNALS}

    def note(self, signum, frame):
        self.received = signum

    def restore(self):  # where they are still these handlers
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self.note:
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # (None: not Python's)


def follow_agent():
    """A rank whose torchrun agent dies gets SIGTERM (Linux's PR_SET_PDEATHSIG), so it stops
    like on any SIGTERM, and every other rank with it. torchrun starts each rank in a session of
    its own, so killing the agent's process group (kill -9 -PGID, as one ends a node's job) would
    otherwise leave its ranks training on, unsupervised, with the other nodes' ranks."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


# ----------------------------------------------------------------------------------------------
# agreeing, every step, on whether to go on


class StepGuard:
    """Every rank asks the same questions after each step's backward, and one all-reduce of two
    numbers over all ranks makes them give the same answers: has any rank been asked to stop
    (the signal's number), and is the loss or the gradient norm non-finite anywhere."""

    def __init__(self, signals, start):
        self.signals, self.stopping = signals, 0
        self.last_finite = None  # (step, loss) of the last finite step of this run
        self.saved = start  # the step of the checkpoint on disk

    def check_step(self, step, loss, norm):
        """Raises Diverged before a non-finite step is applied; sets self.stopping to the signal
        every rank stops on after this step."""
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        flags = torch.stack([torch.tensor(float(self.signals.received), dtype=torch.float64, device=loss.device),
                             (~finite).to(torch.float64)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, nonfinite = (int(x) for x in flags.tolist())
        if nonfinite:
            raise Diverged(f"step {step}: the {'loss' if not torch.isfinite(loss) else 'gradient norm'} is not "
                           f"finite (loss {loss.item():g}, gradient norm {norm.item():g}): the step is not applied"
                           f"; {self.last_seen()}; the checkpoint of step {self.saved} is kept")
        self.last_finite, self.stopping = (step, loss.item()), signum

    def check_weights(self, masters, step):
        """Collective: refuses to checkpoint weights that are not all finite, on every rank alike."""
        finite = torch.stack([torch.isfinite(p).all() for p in masters.values()]).all()
        bad = (~finite).to(torch.float64).reshape(1)  # on the weights' device, as NCCL needs
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise Diverged(f"step {step}: the weights are not all finite, so they are not written; "
                           f"{self.last_seen()}; the checkpoint of step {self.saved} is kept")

    def last_seen(self):
        if self.last_finite is None:
            return "no step of this run had a finite loss"
        return f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"


# ----------------------------------------------------------------------------------------------
# files written whole, and the log


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


def json_line(record):
    """One line of strict JSON (RFC 8259 has no NaN or Infinity): non-finite numbers become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class Log:
    """log.jsonl, to append the records of the steps after `start`, written by one rank (`writer`;
    on the others `write` does nothing). Records of later steps (logged after the last checkpoint
    by a run that then stopped) are cut off first, so that no step is logged twice."""

    def __init__(self, path, start, writer):
        self.file = None
        if not writer:
            return
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
        self.file = open(path, "a")

    def write(self, record):
        if self.file is None:
            return
        try:
            self.file.write(json_line(record))
            self.file.flush()
        except OSError as e:
            raise Failure(f"{self.file.name} could not be written: {e.strerror.lower()}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def open_log(out_dir, start, rank, timeout):
    """OUT_DIR/log.jsonl as a Log, rank 0's, once rank 0 has taken --out-dir over: after every rank
    has read the run's files there, the temp files of interrupted writes are removed and the log
    is cut back to `start`."""
    if dist.is_initialized():
        with collectives("default (all ranks)", timeout):
            dist.barrier()  # every rank has read the run's files before rank 0 changes --out-dir
    if rank == 0:
        remove_stale_temps(out_dir)
    return Log(os.path.join(out_dir, "log.jsonl"), start, writer=rank == 0)
