"""One training job on N local processes under DDP: what `flywheel worker --nproc N` does.

The job's child process (app/jobs/worker.py) is rank 0. It builds the trainer's config once (so every rank trains on the
same database rows, even while new labels arrive), starts ranks 1..N-1 as its own children with the variables that
torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free port) and the pickled trainer and config
on their stdin, then trains as rank 0 itself. ml/train/common.py does the rest: the ranks join one process group
(`gloo` on CPU, `nccl` on CUDA, one GPU per rank), split each global batch, and only rank 0 reports progress and
writes the model directory.

Stopping and failing: the extra ranks die with rank 0 (PR_SET_PDEATHSIG and a watch thread), so the worker stops
them all by stopping its child, as for a one-process job. A rank that exits with an error fails the job with that
rank's error; should rank 0 be left blocked in a collective waiting for it, a watch thread ends rank 0 too.

Ranks are only started by run_ranks (`python -m app.jobs.ranks PARENT_PID THREADS`, trainer and config on stdin).
"""

import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STALL_GRACE_S = 10.0  # how long rank 0 may go on after another rank failed before the watch thread ends it
FAILURE_WAIT_S = 2.0  # when rank 0 fails, how long to look for a peer whose failure caused it
JOIN_S = 120.0  # once rank 0 has finished training, how long the others may take to exit
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")  # what torch puts before a rank's stderr lines inside a process group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun exports to each process it starts on one machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def free_cores(cores: int | None = None, load: float | None = None, own: int = 0) -> int:
    """The cores that other work leaves free now: cores less the 1-minute load average, less the `own` threads this
    process already runs (they are in the load too), at least 1. Training with a thread on every core of a busy
    machine makes each step wait for the slowest thread: on 2 shared cores the demo model's pretraining took 2.5 s a
    step on 2 threads and 0.8 s on 1."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: assume the machine is ours
            load = 0.0
    return max(1, min(cores, round(cores - max(0.0, load - own))))


def threads_per_rank(nproc: int) -> int:
    """Share the free cores: N ranks each using every core would fight over them."""
    return max(1, free_cores() // nproc)


@dataclass
class Rank:
    """An extra rank started by rank 0, with its stderr kept in a temporary file for the error message."""

    rank: int
    process: subprocess.Popen
    stderr: IO[bytes]

    def failure(self) -> str | None:
        """None while it runs or after a clean exit; otherwise what went wrong, in one line."""
        code = self.process.poll()
        if code is None or code == 0:
            return None
        lines = [RANK_PREFIX.sub("", line).strip() for line in self.stderr_text().splitlines() if line.strip()]
        return f"training rank {self.rank} failed (exit code {code})" + (f": {lines[-1]}" if lines else "")

    def stderr_text(self, chars: int = 4000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _start_rank(rank: int, world_size: int, port: int, blob: bytes, threads: int) -> Rank:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **rank_environment(rank, world_size, port), "PYTHONPATH": path}
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- run_ranks closes it once the rank has exited
    process = subprocess.Popen(
        [sys.executable, "-m", "app.jobs.ranks", str(os.getpid()), str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
    )
    try:
        assert process.stdin is not None
        process.stdin.write(blob)
        process.stdin.close()
    except BrokenPipeError:  # it died at start-up; its failure() says why
        process.wait()
    return Rank(rank, process, stderr)


def _watch(ranks: list[Rank], done: threading.Event, log: Callable[[str], None]) -> None:
    """Rank 0's guard: if another rank dies and rank 0 has not noticed within the grace period (blocked in a
    collective that waits for the dead rank), end rank 0 so that the worker fails the job instead of waiting."""
    while not done.wait(0.5):
        failure = next((f for r in ranks if (f := r.failure()) is not None), None)
        if failure is None:
            continue
        log(failure + "\n")
        if done.wait(STALL_GRACE_S):
            return
        for r in ranks:
            r.stop()
        log("rank 0 was left waiting for a failed rank: ending the job\n")
        time.sleep(0.5)  # let the log line leave through the worker's queue
        os._exit(1)


def _first_failure(ranks: list[Rank], wait_s: float) -> str | None:
    deadline = time.monotonic() + wait_s
    while True:
        failure = next((f for r in ranks if (f := r.failure()) is not None), None)
        if failure is not None or time.monotonic() >= deadline or all(r.process.poll() is not None for r in ranks):
            return failure
        time.sleep(0.1)


def run_ranks(
    trainer: Callable[..., dict[str, Any]],
    config: Any,
    *,
    nproc: int,
    on_progress: Callable[[dict[str, Any]], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """trainer(config, on_progress=...) on `nproc` processes, this one being rank 0; returns rank 0's metrics.
    Each progress point carries `world_size`. Raises if any rank fails."""

    def progress(info: dict[str, Any]) -> None:
        on_progress({**info, "world_size": nproc})

    if nproc <= 1:
        return trainer(config, on_progress=progress)
    import torch

    port, threads = free_port(), threads_per_rank(nproc)
    blob = pickle.dumps((trainer, config))
    ranks = [_start_rank(rank, nproc, port, blob, threads) for rank in range(1, nproc)]
    log(
        f"training on {nproc} processes (DDP, {threads} thread(s) each); extra ranks: pids "
        f"{', '.join(str(r.process.pid) for r in ranks)}\n"
    )
    done = threading.Event()
    threading.Thread(target=_watch, args=(ranks, done, log), daemon=True).start()
    saved_env = {name: os.environ.get(name) for name in RANK_VARIABLES}
    saved_threads = torch.get_num_threads()
    os.environ.update(rank_environment(0, nproc, port))
    torch.set_num_threads(threads)
    try:
        result = trainer(config, on_progress=progress)
    except RuntimeError as exc:  # a dead peer surfaces in rank 0 as a gloo error: name the rank that caused it
        failure = _first_failure(ranks, FAILURE_WAIT_S)
        if failure is not None:
            raise RuntimeError(failure) from exc
        raise
    else:
        for r in ranks:
            try:
                r.process.wait(JOIN_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"training rank {r.rank} did not finish after rank 0 did") from None
        failure = _first_failure(ranks, 0)
        if failure is not None:
            raise RuntimeError(failure)
        return result
    finally:
        done.set()
        for r in ranks:
            r.stop()
            r.stderr.close()
        torch.set_num_threads(saved_threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rank_main(parent_pid: int, threads: int) -> None:
    """An extra rank: die with rank 0, read the trainer and its config, train (the environment says which rank)."""
    from app.jobs.child import die_with_parent

    die_with_parent(parent_pid)
    trainer, config = pickle.loads(sys.stdin.buffer.read())
    import torch

    torch.set_num_threads(threads)
    trainer(config)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]))
