"""The one way async code hops to a thread (database work, loading a model): one pool, a plain `run_in_executor`.

A request's database work must not run on the event loop, but the hop to a thread is paid on every request:
Starlette's `run_in_threadpool` (anyio: capacity limiter, cancel scope, run-vars) costs ~160 µs of CPU a hop on the
reference machine, a bare executor hop ~60 µs. The pool is as large as anyio's (40), which the SQLite connection
pool is sized for.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction

P = ParamSpec("P")
T = TypeVar("T")

# Its threads start as work arrives, so importing the app starts none.
_pool = ThreadPoolExecutor(max_workers=40, thread_name_prefix="flywheel-db")


async def run_db(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a pool thread; its result or its exception."""
    loop = asyncio.get_running_loop()
    if kwargs:
        return await loop.run_in_executor(_pool, lambda: fn(*args, **kwargs))
    return await loop.run_in_executor(_pool, fn, *args)


async def run_in_transaction(factory: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    """`fn(session)` on a pool thread, in one transaction of its own (committed when `fn` returns): for async routes
    whose whole database work is one unit, without a session dependency and its exit stack."""

    def run() -> T:
        with transaction(factory) as session:
            return fn(session)

    return await run_db(run)
