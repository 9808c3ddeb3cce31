"""`flywheel serve --workers 2` on Linux: two web processes with a socket each, so that connections opened in a burst
are spread over both; both stop with the supervisor, on SIGTERM and on kill -9; a taken port is a one-line error."""

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.app.faults import free_port, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing is Linux's")


def serve(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "FLYWHEEL_SECRET_KEY": secrets.token_urlsafe(40),
    }
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--workers",
        "2",
        "--no-worker",
        "--no-bootstrap",
        "--no-access-log",
        "--port",
        str(port),
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except FileNotFoundError:
        return False


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_connections_opened_together_are_spread_over_both_processes(tmp_path: Path, stop: str) -> None:
    port = free_port()
    server, url = serve(tmp_path, port), f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: len(children(server.pid)) == 2 and healthy(url), 60, "two web processes serving")
        web = children(server.pid)
        idle = {pid: sockets_of(pid) for pid in web}
        clients = [httpx.Client(base_url=url, timeout=10) for _ in range(16)]  # one keep-alive connection each
        try:
            assert all(c.get("/healthz").status_code == 200 for c in clients)
            accepted = {pid: sockets_of(pid) - idle[pid] for pid in web}
            assert min(accepted.values()) >= 1, accepted  # the 16 connections did not all land on one process
        finally:
            for c in clients:
                c.close()
        server.send_signal(signal.SIGTERM if stop == "SIGTERM" else signal.SIGKILL)
        server.wait(40)
        wait_for(lambda: not any(alive(pid) for pid in web), 40, "the web processes to stop with the supervisor")
    finally:
        if server.poll() is None:
            server.kill()


def test_a_port_taken_by_another_program_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = serve(tmp_path, taken.getsockname()[1])
        try:
            _, err = server.communicate(timeout=90)
        finally:
            if server.poll() is None:
                server.kill()
    assert server.returncode != 0
    assert err.strip().splitlines()[-1] == "flywheel: error: a web process exited with status 1 as it started"
