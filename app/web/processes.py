"""`flywheel serve --workers N` on Linux: N web processes, each listening on its own socket bound to the same port
with SO_REUSEPORT, so that the kernel spreads new connections over them.

uvicorn's own workers share one listening socket, and the process that wakes first accepts. Clients that open their
keep-alive connections in a burst (a proxy's connection pool, bench/http_load.py's annotators) then all land on one
process, which does all the work while the others idle: in the load bench one process took 4,663 write turns and the
other 1. With a socket each, the kernel hashes every new connection to one of them. Elsewhere (or on port 0, where
each process would get a port of its own) `serve` keeps uvicorn's workers.
"""

import ctypes
import signal
import socket
import subprocess
import sys
import time

RESTART_GRACE_S = 2.0  # a process that exits sooner than this after its start is a failure to start, not a crash
STOP_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1  # prctl(2)


def reuse_port_works(port: int) -> bool:
    """Only Linux balances connections over SO_REUSEPORT sockets (BSDs give them all to the last one bound)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT") and port != 0


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) that other processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_on_own_socket(host: str, port: int, access_log: bool) -> None:
    """One web process (uvicorn, the app) on a SO_REUSEPORT socket of its own."""
    import uvicorn

    config = uvicorn.Config(
        "app.web.main:create_app", factory=True, host=host, port=port, proxy_headers=True, access_log=access_log
    )
    uvicorn.Server(config).run(sockets=[bind_reuse_port(host, port)])


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel send SIGTERM when the supervisor dies, even by kill -9, so that no
    web process is left holding the port."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(command: list[str]) -> tuple[subprocess.Popen, float]:
    return subprocess.Popen(command, preexec_fn=_die_with_parent), time.monotonic()


def supervise(command: list[str], n: int) -> None:
    """Run `n` copies of `command`; restart one that dies; on SIGTERM or SIGINT stop them all (SIGTERM: uvicorn's
    graceful shutdown) and return. Raises RuntimeError when a copy exits right after its start (say, the port is
    taken by another program): restarting it would only loop."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    processes = [_start(command) for _ in range(n)]
    try:
        while not stopping:
            for i, (process, started) in enumerate(processes):
                code = process.poll()
                if code is None:
                    continue
                if time.monotonic() - started < RESTART_GRACE_S:
                    raise RuntimeError(f"a web process exited with status {code} as it started")
                print(
                    f"flywheel: web process {process.pid} exited with status {code}; starting another", file=sys.stderr
                )
                processes[i] = _start(command)
            time.sleep(0.2)
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
