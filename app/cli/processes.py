"""`flywheel serve`, `flywheel worker`, `flywheel db`: start the processes and migrate the database."""

import argparse
import os
import sys

from app import migrate
from app.cli.common import CLIError, add, group
from app.settings import Settings


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import signal
    import subprocess

    from app.web import processes as web_processes

    # The served model decodes on a thread beside the event loop. With libgomp's default spin, idle OpenMP workers
    # keep cores busy that this thread's own team needs (SmolLM2 on 2 cores: a step of 57 ms on a thread against
    # 42 on the main thread; 48.5 with a spin of 1000). libgomp reads it when torch loads, so set it first; the
    # training worker keeps the default.
    worker_env = dict(os.environ)
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    host, port = args.host or settings.host, args.port or settings.port
    if args.reuse_port:  # one of the web processes that `serve --workers N` starts on Linux
        web_processes.serve_on_own_socket(host, port, access_log=not args.no_access_log)
        return
    if not args.no_migrate:
        migrate.upgrade(settings.resolved_database_url)
    if not args.no_bootstrap:
        _bootstrap(settings, f"http://{host}:{port}/", worker=not args.no_worker)
    worker = None
    if not args.no_worker:  # the embedded default: one worker process beside the web server
        command = [sys.executable, "-m", "app.cli", "worker", "--nproc", str(args.worker_nproc)]
        worker = subprocess.Popen(command, env=worker_env)
    print(f"Flywheel serving on http://{host}:{port} (Ctrl-C stops it)", file=sys.stderr)
    # uvicorn re-raises SIGTERM once it has shut down; with the default action that kills this process on the spot,
    # before `finally` stops the worker (left running, orphaned). Exit through `finally` instead, with success: a
    # stop that was asked for is no error (`make run` would print one).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        _serve_web(args, host, port)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)


def _bootstrap(settings: Settings, url: str, *, worker: bool) -> None:
    """First start: fill the demo prompt pool and, when no model is served, queue the demo model's training for the
    worker, so that the server answers at once while it trains (the home page shows how far it got)."""
    from app.db import make_engine, make_session_factory, transaction
    from app.jobs.bootstrap import enqueue_bootstrap, pending_bootstrap, seed_demo_prompts

    seed_demo_prompts(settings)
    with transaction(make_session_factory(make_engine(settings.resolved_database_url))) as session:
        job = enqueue_bootstrap(session) or pending_bootstrap(session)
        job_id = job.id if job else None
    if job_id is None:
        return
    where = "the worker trains it" if worker else "start `flywheel worker` to train it"
    print(f"No model yet: {where} now (job {job_id}, a few minutes); progress on {url}", file=sys.stderr)


def _serve_web(args: argparse.Namespace, host: str, port: int) -> None:
    """The web processes: N of them, each on a socket of its own (Linux), or uvicorn's own (one, or its workers)."""
    import uvicorn

    from app.web import processes as web_processes

    if args.workers > 1 and web_processes.reuse_port_works(port):
        access_log = ["--no-access-log"] if args.no_access_log else []
        command = [sys.executable, "-m", "app.cli", "serve", "--reuse-port", "--host", host, "--port", str(port)]
        try:
            web_processes.supervise([*command, *access_log], args.workers)
        except RuntimeError as exc:
            raise CLIError(str(exc)) from exc
    else:
        uvicorn.run(
            "app.web.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            proxy_headers=True,
            access_log=not args.no_access_log,
        )


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    import logging

    from app.jobs.worker import Worker, WorkerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.nproc < 1:
        raise CLIError("--nproc must be at least 1")
    worker = Worker(settings, WorkerConfig(poll_s=args.poll, lease_s=args.lease, nproc=args.nproc))
    worker.install_signal_handlers()
    print(f"worker {worker.worker_id} waiting for jobs", file=sys.stderr)
    worker.run(once=args.once)


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> None:
    migrate.upgrade(settings.resolved_database_url, args.revision)
    print(f"database at {args.revision}")


def cmd_db_downgrade(args: argparse.Namespace, settings: Settings) -> None:
    migrate.downgrade(settings.resolved_database_url, args.revision)
    print(f"database at {args.revision}")


def register(groups) -> None:
    serve = add(groups, "serve", cmd_serve, "migrate the database and serve the web app")
    serve.add_argument("--host", help="bind address (default FLYWHEEL_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default FLYWHEEL_PORT or 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="web processes (on Linux each with a socket of its own: app/web/processes.py)",
    )
    serve.add_argument("--no-migrate", action="store_true", help="do not upgrade the database first")
    serve.add_argument("--no-worker", action="store_true", help="run no embedded worker (run `flywheel worker`s)")
    serve.add_argument("--no-bootstrap", action="store_true", help="do not queue the demo model's training")
    serve.add_argument(
        "--no-access-log",
        action="store_true",
        help="log no line per request (uvicorn's access log: a tenth of a small request's CPU)",
    )
    serve.add_argument("--worker-nproc", type=int, default=1, metavar="N", help="the embedded worker's --nproc")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # app/web/processes.py

    worker = add(groups, "worker", cmd_worker, "claim and run training jobs from the queue")
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    worker.add_argument("--lease", type=float, default=60.0, help="seconds a job stays ours without a heartbeat")
    worker.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train each job on N processes (DDP: gloo on CPU, one GPU each on CUDA); rl, evaluate and "
        "candidates run in one",
    )

    db = group(groups, "db", "database schema")
    add(db, "upgrade", cmd_db_upgrade, "upgrade the schema").add_argument("revision", nargs="?", default="head")
    add(db, "downgrade", cmd_db_downgrade, "downgrade the schema").add_argument("revision", help="e.g. -1 or base")
