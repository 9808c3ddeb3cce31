"""Engine and session factory: SQLite (the embedded default) with WAL and foreign keys; PostgreSQL via psycopg."""

import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_S = 10
_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


def normalise_url(url: str) -> str:
    """Let people write `postgresql://…` and still get the psycopg 3 driver rather than psycopg2."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _configure_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes, fast
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    cursor.close()


class SQLiteWriteLock:
    """Writers take turns on a lock of our own before SQLite would make them wait.

    SQLite lets one connection write at a time; the others wait in its busy handler, which sleeps in growing steps
    (up to 100 ms) and cannot be woken. Under concurrent requests that sleeping, not the writing, set the latency.
    Here a connection takes this lock just before its transaction's first write, and gives it back the moment that
    transaction ends (in `LockingConnection.commit/rollback/close`, after SQLite has finished, not at the engine's
    commit event, which comes before it). Within a process that is a thread lock, so the next writer starts as soon
    as the previous one is done; across processes (`flywheel serve --workers N`, the training worker) it is also an
    flock on `<database>-writer.lock`, polled every half millisecond. If the lock is not had within SQLite's busy
    timeout, the writer goes on and lets SQLite decide, as it would without the lock; a process that dies loses its
    flock with it.
    """

    def __init__(self, path: str, timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self._lock = threading.Lock()  # not an RLock: a session may commit on another thread than it wrote on
        self._lock_path = f"{path}-writer.lock"
        # Opened once and kept (flock'd and unlocked on each turn): opening and closing it on every write was two
        # system calls more per ranking. A process that dies closes it, and so loses its flock, as before.
        self._fd: int | None = None
        self._locked = False  # whether this process holds the flock now
        self.timeout_s = timeout_s

    def install(self, engine: Engine) -> None:
        event.listen(engine, "connect", self._adopt)
        event.listen(engine, "before_cursor_execute", self._before_execute)

    def _adopt(self, dbapi_connection: "LockingConnection", _record) -> None:
        dbapi_connection.write_lock = self

    def _before_execute(self, _conn, cursor, statement: str, *_args) -> None:
        connection: LockingConnection = cursor.connection
        if not connection.holds_write_lock and _WRITE.match(statement):
            connection.holds_write_lock = self.acquire()

    def acquire(self) -> bool:
        """True once this process and no other may write; False after the timeout (then SQLite decides)."""
        deadline = time.monotonic() + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            return False
        if fcntl is None:  # no flock on this platform: SQLite's own lock is all there is between processes
            return True
        if self._fd is None:
            self._fd = os.open(self._lock_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            weakref.finalize(self, os.close, self._fd)  # closed when the engine and this lock are gone
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._locked = True
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.release()
                    return False
                time.sleep(0.0005)

    def release(self) -> None:
        if self._locked:
            self._locked = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._lock.release()


class LockingConnection(sqlite3.Connection):
    """A pysqlite connection that gives its engine's write lock back the moment its transaction ends."""

    write_lock: SQLiteWriteLock | None = None
    holds_write_lock = False

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._give_back()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._give_back()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._give_back()

    def _give_back(self) -> None:
        if self.holds_write_lock and self.write_lock is not None:
            self.holds_write_lock = False
            self.write_lock.release()


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        in_file = bool(path) and path != ":memory:" and not path.startswith("file:")
        if in_file:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A file database keeps one pooled connection per request thread (anyio runs up to 40): a smaller pool
        # opens and closes connections under load, and each new one pays for its PRAGMAs.
        pool = {"pool_size": 40, "max_overflow": 20} if in_file else {}
        connect_args = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
        if in_file:
            connect_args["factory"] = LockingConnection
        engine = create_engine(url, connect_args=connect_args, **pool)
        event.listen(engine, "connect", _configure_sqlite)
        if in_file:
            SQLiteWriteLock(path).install(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit if the block finishes, roll back everything if it raises."""
    with factory() as session, session.begin():
        yield session
