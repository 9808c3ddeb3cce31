"""The SQLite write lock (app.db.SQLiteWriteLock): concurrent writers all land, and the lock is always given back."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from app.db import make_engine


@pytest.fixture
def engines(tmp_path: Path):
    """Two engines on one file: two server processes, as far as the locks can tell (each has its own flock fd)."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first, second = make_engine(url), make_engine(url)
    with first.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER NOT NULL)"))
    yield first, second
    first.dispose()
    second.dispose()


def write(engine: Engine, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})


def timed_write(engine: Engine) -> float:
    start = time.monotonic()
    write(engine, -1)
    return time.monotonic() - start


def test_many_threads_of_two_processes_write_and_every_row_lands(engines) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: write(engines[n % 2], n), range(400)))
    with engines[0].connect() as conn:
        assert sorted(conn.scalars(text("SELECT n FROM t"))) == list(range(400))


@pytest.mark.parametrize("ending", ["commit", "rollback", "exception"])
def test_the_lock_is_given_back_however_the_transaction_ends(engines, ending: str) -> None:
    """After a commit, a rollback or an error half-way, the next writer (here: the other process) goes at once,
    not after the 10 s busy timeout."""
    first, second = engines
    with pytest.raises(RuntimeError) if ending == "exception" else nullcontext(), first.connect() as conn:
        conn.execute(text("INSERT INTO t (n) VALUES (1)"))
        if ending == "exception":
            raise RuntimeError("the request failed half-way")
        getattr(conn, ending)()
    assert timed_write(second) < 2
    assert timed_write(first) < 2


def test_a_writer_waits_for_the_holder_and_then_goes(engines) -> None:
    first, second = engines
    done: list[float] = []
    with first.connect() as conn:
        conn.execute(text("INSERT INTO t (n) VALUES (1)"))  # the lock is held from here until the commit
        thread = threading.Thread(target=lambda: done.append(timed_write(second)))
        thread.start()
        time.sleep(0.3)
        assert not done, "the other writer did not wait for the lock"
        conn.commit()
    thread.join(5)
    assert done and done[0] < 5
    with first.connect() as conn:
        assert sorted(conn.scalars(text("SELECT n FROM t"))) == [-1, 1]
