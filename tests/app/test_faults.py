"""Faults under load, with real processes: the server killed with -9 mid-stream and mid-submission, then restarted;
PostgreSQL stopped and started again under load. Afterwards the database is audited against what the server
acknowledged (tests/app/faults.py says what that is): nothing acknowledged is lost, nothing is stored twice or half.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.web.errors import DATABASE_DOWN
from tests.app.faults import (
    Load,
    ServerProcess,
    ThrowawayPostgres,
    answer_from_events,
    audit,
    bearer,
    populate,
    wait_for,
)
from tests.factories import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a long context so that answers stream for a while (a random tiny model rarely samples its stop token)
    return make_tiny_model_dir(tmp_path_factory.mktemp("faults") / "tiny", max_seq_len=256)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[ServerProcess] = []

    def make(database_url: str) -> ServerProcess:
        server = ServerProcess(database_url, tmp_path / "data", tmp_path / "server.log")
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def test_kill_9_of_the_server_mid_stream_and_mid_submission_loses_nothing_acknowledged(
    any_db_url: str, model_dir: Path, server_factory
) -> None:
    cast = populate(any_db_url, model_dir)
    server = server_factory(any_db_url)
    server.start(cast.user)
    with Load(server.url, cast) as load:
        wait_for(lambda: load.count("rankings") >= 10 and load.count("answers") >= 3, 60, "acknowledged writes")
        wait_for(lambda: load.while_mid_stream(server.kill9), 30, "an answer in mid-stream to kill the server in")
    assert load.ledger.partial, "the kill cut no stream"

    server.start(cast.user)  # the same database and data directory
    summary = audit(any_db_url, load.ledger, cast)
    print("after the kill:", summary)
    assert summary["rankings"] >= 10 and summary["answers"] >= 3, summary

    # An answer the kill cut off is the empty placeholder still: the chat page answers it anew when it is opened.
    if waiting := summary["first_waiting"]:
        with httpx.Client(base_url=server.url, headers=bearer(cast.user), timeout=60) as client:
            text, finish = answer_from_events(client.get(f"/chat/messages/{waiting}/stream").text)
        assert finish is not None, "the waiting answer was not answered"
        load.ledger.partial.pop(waiting, None)
        load.ledger.answers[waiting] = (finish, text)
        after = audit(any_db_url, load.ledger, cast)
        assert after["waiting"] == summary["waiting"] - 1


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:300])
    assert response.json() == {"detail": DATABASE_DOWN}
    assert response.headers["retry-after"] == "1"


def test_postgres_restarted_under_load_gives_503_then_recovers_with_no_lost_write(
    throwaway_postgres: ThrowawayPostgres, model_dir: Path, server_factory
) -> None:
    url = throwaway_postgres.url
    cast = populate(url, model_dir)
    server = server_factory(url)
    server.start(cast.user)
    user, annotator = bearer(cast.user), bearer(next(iter(cast.annotators.values())))
    with Load(server.url, cast) as load, httpx.Client(base_url=server.url, timeout=30) as probe:
        wait_for(lambda: load.count("rankings") >= 10 and load.count("answers") >= 2, 60, "writes before the stop")
        throwaway_postgres.stop()  # immediate: a crash, mid-transaction for some requests
        down = time.monotonic()
        # while it is down, in the app's one error shape: reads, writes, browser pages; /readyz says why
        assert_unavailable(probe.get("/api/v1/me", headers=user))
        assert_unavailable(probe.post("/api/v1/conversations", headers=user, json={"title": "while down"}))
        first_set = next(iter(cast.sets))
        assert_unavailable(
            probe.post(f"/api/v1/annotation/sets/{first_set}/ranking", headers=annotator, json={"status": "skipped"})
        )
        page = probe.get("/chat", headers={**user, "Accept": "text/html"})
        assert page.status_code == 503 and DATABASE_DOWN in page.text
        assert probe.get("/readyz").status_code == 503
        time.sleep(1.0)  # the load keeps hitting the server meanwhile
        restart = time.monotonic()
        throwaway_postgres.start()
        wait_for(lambda: probe.get("/api/v1/me", headers=user).status_code == 200, 30, "requests to succeed again")
        back = time.monotonic()
        wait_for(
            lambda: load.count("rankings", since=back) >= 5 and load.count("answers", since=back) >= 2,
            60,
            "writes after the restart",
        )

    during = [
        (route, status, body)
        for start, end, route, status, body in load.ledger.responses
        if start > down and end < restart
    ]
    assert during, "no request while the database was down"
    assert {status for _, status, _ in during} == {503}, during[:5]
    assert all(f'"{DATABASE_DOWN}"' in body for _, _, body in during)
    # never a 500 or a hang; a 409 is a retried ranking whose first try landed; a stream may be cut off mid-answer
    # (its answer could not be saved), which the audit accepts as not acknowledged
    requests = {status for _, _, route, status, _ in load.ledger.responses if route != "stream"}
    streams = {status for _, _, route, status, _ in load.ledger.responses if route == "stream"}
    assert requests <= {200, 201, 409, 503} and streams <= {200, 503, "RemoteProtocolError"}, (requests, streams)
    summary = audit(url, load.ledger, cast)
    print(f"after the restart: {summary}; {len(during)} requests while down, all 503")
    assert summary["rankings"] >= 15, summary
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
