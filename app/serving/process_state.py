"""What a web process keeps in its own memory, in one place: `ProcessState`, one on `app.state.process`.

`flywheel serve --workers N` runs N web processes that share nothing but the database (and the data directory). Every
piece here is therefore per process, and each says below what that means with N of them. Anything that must hold
across processes goes through the database instead: the served model follows the active version there
(`sync.py`), and Stop is recorded there (`LiveAnswers`), so that any process hears it.

It sits in `serving/` because the served answers and the model watcher use it and the web layer builds it: the
imports run web -> serving, never back.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy.orm import Session

from app.auth import LoginRateLimiter
from app.errors import Conflict
from app.services import chat
from app.settings import Settings
from app.threads import run_db

log = logging.getLogger("flywheel.serving")

STOP_POLL_S = 0.3  # how often a process with answers streaming asks the database whether one of them was stopped


@dataclass
class LiveAnswer:
    stop: asyncio.Event  # set by a Stop: the streaming loop ends the answer at its next delta
    seen: datetime | None  # the message's stop_requested_at as its stream started: a Stop from before is not for it


class LiveAnswers:
    """The answers this process is streaming, each with its Stop event, and the watcher that hears a Stop that was
    sent to another process.

    A Stop is recorded on the message in the database by whichever process receives it, and sets the event here
    straight away when the answer streams in this very process (the fast path). For the others, a watcher task asks
    the database every `poll_s` seconds, in one query for all of this process's live answers, whether a Stop came;
    it runs only while an answer streams here and ends with the last one. Polling rather than PostgreSQL's
    LISTEN/NOTIFY: the same code on SQLite and PostgreSQL, no connection held open per process to keep alive, one
    primary-key lookup a few times a second while someone is reading an answer, and a delay people do not notice.
    """

    def __init__(self, read_stops: Callable[[list[int]], dict[int, datetime]], poll_s: float = STOP_POLL_S) -> None:
        self.read_stops = read_stops  # message ids -> stop_requested_at, for those that have one (on a thread)
        self.poll_s = poll_s
        self._live: dict[int, LiveAnswer] = {}
        self._watcher: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, message_id: int) -> bool:
        return message_id in self._live

    def claim(self, message_id: int, seen: datetime | None = None) -> asyncio.Event:
        """Register an answer that starts streaming here; its Stop event. A 409 when this process already streams it
        (claimed with no await in between, so two requests cannot both pass)."""
        if message_id in self._live:
            raise Conflict(f"message {message_id} is already being answered")
        live = self._live[message_id] = LiveAnswer(asyncio.Event(), seen)
        self._watch()
        return live.stop

    def release(self, message_id: int) -> None:
        self._live.pop(message_id, None)

    def stop_here(self, message_id: int) -> bool:
        """Set the Stop event of an answer streaming in this process; False when it does not stream here."""
        live = self._live.get(message_id)
        if live is None:
            return False
        live.stop.set()
        return True

    def _watch(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # claimed outside an event loop (a test arranging state): nothing streams to watch
            return
        # One watcher, on the loop that streams (tests serve one app from two loops: a watcher whose loop is gone
        # would never run).
        if self._watcher is None or self._watcher.done() or self._watcher.get_loop() is not loop:
            self._watcher = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while self._live:
            await asyncio.sleep(self.poll_s)
            ids = list(self._live)
            if not ids:
                return
            try:
                requested = await run_db(self.read_stops, ids)
            except Exception as exc:  # the database is down: try again at the next tick; local stops still work
                log.warning("cannot read stop requests: %s", exc)
                continue
            for message_id, at in requested.items():
                live = self._live.get(message_id)
                if live is not None and at != live.seen:
                    live.stop.set()


@dataclass
class ProcessState:
    """Each web process's own memory. Under `serve --workers N` every piece below exists N times, independently:

    - `login_limiter`: failed logins are counted per process (on purpose: a failed login writes nothing), so a
      client whose tries are spread over N processes gets up to N times the limit before a 429;
    - `answers`: the answers streaming in this process and their Stop events; a Stop sent to another process
      reaches them through the database (see `LiveAnswers`), so Stop works whatever process receives it;
    - `unloadable_versions`: model versions this process failed to load and will not retry; each process finds out
      for itself (a broken checkpoint is tried once per process), and a restart tries again;
    - `prompts_synced_at`: when this process last turned chats into prompts for annotation; with N processes the
      sync runs up to N times as often (it is idempotent);
    - `next_set_floors`, `next_set_floors_at`: this process's lower bounds for the annotator's next set
      (`annotation.next_set_id`), dropped every few seconds; each process keeps its own.

    The served model itself (`app.state.inference`) is also one copy per process; every copy follows the active
    version in the database (`sync.py`).
    """

    login_limiter: LoginRateLimiter
    answers: LiveAnswers
    unloadable_versions: set[int] = field(default_factory=set)
    prompts_synced_at: float = float("-inf")
    next_set_floors: dict[int, int] = field(default_factory=dict)
    next_set_floors_at: float = float("-inf")


def make_process_state(settings: Settings, session_factory: Callable[[], Session]) -> ProcessState:
    def read_stops(message_ids: list[int]) -> dict[int, datetime]:
        with session_factory() as session:
            return chat.stop_requests(session, message_ids=message_ids)

    return ProcessState(
        login_limiter=LoginRateLimiter(settings.login_max_failures, settings.login_window_s),
        answers=LiveAnswers(read_stops),
    )


def process_state(app: FastAPI) -> ProcessState:
    """This process's state (typed access to `app.state.process`)."""
    return app.state.process
