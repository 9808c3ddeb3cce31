"""`flywheel …`: serve the app, migrate the database, manage users and tokens (later: worker, train, model, demo).

Every command has --help. Errors print one line `flywheel: error: …` and exit non-zero.
"""

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.errors import NotFound, ServiceError
from app.models import ModelKind, ModelVersion, Role
from app.services import model_versions, tokens, users
from app.settings import Settings


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def read_password(prompt: str = "Password: ") -> str:
    """From a prompt (asked twice) on a terminal, else the first line of stdin; never from argv (it leaks to `ps`)."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise CLIError("the two passwords differ")
        return first
    line = sys.stdin.readline()
    if not line:
        raise CLIError("no password on stdin")
    return line.rstrip("\r\n")


def _session_factory(settings: Settings):
    return make_session_factory(make_engine(settings.resolved_database_url))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import signal
    import subprocess

    import uvicorn

    from app import web_processes

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
        from app.bootstrap import bootstrap_demo_model, seed_demo_prompts

        bootstrap_demo_model(settings)
        seed_demo_prompts(settings)
    worker = None
    if not args.no_worker:  # the embedded default: one worker process beside the web server
        command = [sys.executable, "-m", "app.cli", "worker", "--nproc", str(args.worker_nproc)]
        worker = subprocess.Popen(command, env=worker_env)
    print(f"Flywheel serving on http://{host}:{port}", file=sys.stderr)
    # uvicorn re-raises SIGTERM once it has shut down; with the default action that kills this process on the spot,
    # before `finally` stops the worker (left running, orphaned). Exit through `finally` instead.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.workers > 1 and web_processes.reuse_port_works(port):
            command = [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--reuse-port",
                "--host",
                host,
                "--port",
                str(port),
                *(["--no-access-log"] if args.no_access_log else []),
            ]
            try:
                web_processes.supervise(command, args.workers)
            except RuntimeError as exc:
                raise CLIError(str(exc)) from exc
        else:
            uvicorn.run(
                "app.main:create_app",
                factory=True,
                host=host,
                port=port,
                workers=args.workers,
                proxy_headers=True,
                access_log=not args.no_access_log,
            )
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    import logging

    from app.worker import Worker, WorkerConfig

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


def cmd_users_create(args: argparse.Namespace, settings: Settings) -> None:
    password = read_password()
    with transaction(_session_factory(settings)) as session:
        user = users.create_user(session, username=args.name, password=password, role=Role(args.role))
        print(f"created {user.username} ({user.role.value})")


def cmd_users_list(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        for user in users.list_users(session):
            state = "disabled" if user.disabled else "enabled"
            print(f"{user.id}\t{user.username}\t{user.role.value}\t{state}")


def _user_named(session, name: str):
    user = users.get_by_username(session, username=name)
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def cmd_users_set_role(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        user = users.update_user(session, user_id=_user_named(session, args.name).id, role=Role(args.role))
        print(f"{user.username} is now {user.role.value}")


def cmd_users_disable(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        user = users.update_user(session, user_id=_user_named(session, args.name).id, disabled=not args.enable)
        print(f"{user.username} is {'disabled' if user.disabled else 'enabled'}")


def cmd_tokens_create(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        user = _user_named(session, args.user)
        token, secret = tokens.create_token(session, user=user, name=args.name, expires_in_days=args.expires_in_days)
    print(f"token {token.id} for {args.user} (shown once, store it now):", file=sys.stderr)
    print(secret)


def cmd_tokens_list(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        for t in tokens.list_tokens(session, user=_user_named(session, args.user)):
            state = "revoked" if t.revoked_at else "active"
            print(f"{t.id}\t{t.name}\t{t.prefix}…\t{state}")


def cmd_tokens_revoke(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        token = tokens.revoke_token(session, token_id=args.id)
        print(f"token {token.id} ({token.name}) revoked")


# `flywheel train NAME …` runs the trainer module's own command line (its add_arguments + main), imported only then.
TRAINERS = {
    "pretrain": ("ml.train.pretrain", "pretrain a base model on the demo world or your text"),
    "sft": ("ml.train.sft", "supervised fine-tuning on dialogues (assistant tokens only)"),
    "reward": ("ml.train.reward", "train a reward model from rankings and thumbs"),
    "rl": ("ml.train.rl", "RL against a reward model (PPO, GRPO, RLOO) with a KL penalty"),
    "dpo": ("ml.train.dpo", "offline DPO from preference pairs"),
    "kto": ("ml.train.dpo", "offline KTO from thumbs up/down"),
}


def run_module_cli(module_name: str, prog: str, argv: list[str]) -> int:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CLIError(f"{prog} is not available in this version ({exc.name} is missing)") from exc
    parser = argparse.ArgumentParser(prog=prog, description=(module.__doc__ or "").split("\n\n")[0])
    if prog.endswith(" kto"):
        module.add_arguments(parser, algo="kto")
    else:
        module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    return run_module_cli(TRAINERS[args.trainer][0], f"flywheel train {args.trainer}", args.rest)


def cmd_demo_experiment(args: argparse.Namespace, settings: Settings) -> int:
    return run_module_cli("ml.demo.experiment", "flywheel demo experiment", args.rest)


def cmd_demo_flywheel(args: argparse.Namespace, settings: Settings) -> int:
    return run_module_cli("app.demo_flywheel", "flywheel demo flywheel", args.rest)


def cmd_model_import(args: argparse.Namespace, settings: Settings) -> None:
    """Convert a Hugging Face checkpoint directory, or a .gguf file, into a model directory and register it
    (optionally active)."""
    from pathlib import Path

    src = Path(args.src)
    is_gguf = src.suffix.lower() == ".gguf"
    if is_gguf and not src.is_file():
        raise CLIError(f"no such GGUF file: {src}")
    if not is_gguf and not (src / "config.json").is_file():
        raise CLIError(f"{src} is neither a Hugging Face checkpoint directory (no config.json) nor a .gguf file")
    name = args.name or (src.stem if is_gguf else src.resolve().name)
    out = Path(args.out) if args.out else settings.data_dir / "models" / f"{'gguf' if is_gguf else 'hf'}-{name}"
    try:
        if is_gguf:
            from ml.gguf import convert_gguf_to_checkpoint

            convert_gguf_to_checkpoint(src, out)
        else:
            from ml.hf import convert_hf_to_checkpoint

            convert_hf_to_checkpoint(src, out)
    except ImportError as exc:  # the optional GGUF packages; the message says what to install
        raise CLIError(str(exc)) from exc
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:  # NotImplemented: a GGUF quantization type
        raise CLIError(f"cannot import {src}: {exc}") from exc
    with transaction(_session_factory(settings)) as session:
        version = ModelVersion(
            name=name,
            kind=ModelKind(args.kind),
            path=str(out.resolve()),
            training_data={"imported_from": str(src.resolve())},
        )
        session.add(version)
        session.flush()
        if args.activate:
            model_versions.promote(session, version_id=version.id)
        print(f"imported {src} as model version {version.id} ({version.kind.value}, {version.status.value}) at {out}")


def cmd_model_export(args: argparse.Namespace, settings: Settings) -> None:
    from ml.checkpoint import CheckpointError, load_checkpoint
    from ml.hf import export_hf

    try:
        model, _ = load_checkpoint(args.src)
        print(f"exported to {export_hf(model, args.dst, tokenizer_dir=args.src)}")
    except (CheckpointError, ValueError, OSError) as exc:
        raise CLIError(f"cannot export {args.src}: {exc}") from exc


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        for v in model_versions.list_versions(session):
            print(f"{v.id}\t{v.name}\t{v.kind.value}\t{v.status.value}\t{v.path}")


def cmd_model_promote(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(_session_factory(settings)) as session:
        version = model_versions.promote(session, version_id=args.id)
        print(f"{version.name} is the active {version.kind.value} model")


def _add(sub, name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__.split("\n")[0])
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _add(groups, "serve", cmd_serve, "migrate the database and serve the web app")
    serve.add_argument("--host", help="bind address (default FLYWHEEL_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default FLYWHEEL_PORT or 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="web processes (on Linux each with a socket of its own: app/web_processes.py)",
    )
    serve.add_argument("--no-migrate", action="store_true", help="do not upgrade the database first")
    serve.add_argument("--no-worker", action="store_true", help="run no embedded worker (run `flywheel worker`s)")
    serve.add_argument("--no-bootstrap", action="store_true", help="do not train the demo model on first start")
    serve.add_argument(
        "--no-access-log",
        action="store_true",
        help="log no line per request (uvicorn's access log: a tenth of a small request's CPU)",
    )
    serve.add_argument("--worker-nproc", type=int, default=1, metavar="N", help="the embedded worker's --nproc")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # app/web_processes.py

    worker = _add(groups, "worker", cmd_worker, "claim and run training jobs from the queue")
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

    db = groups.add_parser("db", help="database schema", description="database schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    _add(db, "upgrade", cmd_db_upgrade, "upgrade the schema").add_argument("revision", nargs="?", default="head")
    _add(db, "downgrade", cmd_db_downgrade, "downgrade the schema").add_argument("revision", help="e.g. -1 or base")

    user_cmds = groups.add_parser("users", help="accounts", description="accounts").add_subparsers(
        dest="users_command", required=True, metavar="ACTION"
    )
    create = _add(user_cmds, "create", cmd_users_create, "create an account (password from stdin or a prompt)")
    create.add_argument("name")
    create.add_argument("--role", choices=[r.value for r in Role], default=Role.user.value)
    _add(user_cmds, "list", cmd_users_list, "list accounts")
    set_role = _add(user_cmds, "set-role", cmd_users_set_role, "change an account's role")
    set_role.add_argument("name")
    set_role.add_argument("role", choices=[r.value for r in Role])
    disable = _add(user_cmds, "disable", cmd_users_disable, "disable an account (ends its sessions)")
    disable.add_argument("name")
    disable.set_defaults(enable=False)
    enable = _add(user_cmds, "enable", cmd_users_disable, "enable a disabled account")
    enable.add_argument("name")
    enable.set_defaults(enable=True)

    train = groups.add_parser("train", help="train models from the command line", description="train models")
    trainers = train.add_subparsers(dest="trainer", required=True, metavar="STAGE")
    for name, (_, help_text) in TRAINERS.items():
        stage = trainers.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        stage.add_argument("rest", nargs=argparse.REMAINDER)
        stage.set_defaults(handler=cmd_train)

    demo = groups.add_parser("demo", help="the built-in demo world", description="the built-in demo world")
    demo_cmds = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    experiment = demo_cmds.add_parser(
        "experiment", help="the whole pipeline on the demo world, with numbers", add_help=False, prefix_chars="\0"
    )
    experiment.add_argument("rest", nargs=argparse.REMAINDER)
    experiment.set_defaults(handler=cmd_demo_experiment)
    loop = demo_cmds.add_parser(
        "flywheel", help="turn the loop through HTTP with simulated people", add_help=False, prefix_chars="\0"
    )
    loop.add_argument("rest", nargs=argparse.REMAINDER)
    loop.set_defaults(handler=cmd_demo_flywheel)

    model_cmds = groups.add_parser("model", help="model versions", description="model versions").add_subparsers(
        dest="model_command", required=True, metavar="ACTION"
    )
    imp = _add(model_cmds, "import-hf", cmd_model_import, "import a Hugging Face checkpoint directory or a .gguf file")
    imp.add_argument(
        "src",
        help="a directory with config.json, safetensors (or .bin) weights and tokenizer files of a Llama (incl. 3.x "
        "rope scaling; SmolLM2), Mistral, Qwen2/2.5, Qwen3 or SmolLM3 checkpoint, "
        "or a Llama/Qwen2 .gguf file (dequantized to fp32; needs pip install 'flywheel[gguf]')",
    )
    imp.add_argument("--out", help="where to write the model directory (default: under the data directory)")
    imp.add_argument("--name", help="the model version's name (default: the directory's or file's name)")
    imp.add_argument("--kind", choices=[k.value for k in ModelKind], default=ModelKind.sft.value)
    imp.add_argument("--activate", action="store_true", help="make it the active model of its kind (served if sft)")
    exp = _add(model_cmds, "export-hf", cmd_model_export, "export a model directory in its family's HF layout")
    exp.add_argument("src", help="a Flywheel model directory")
    exp.add_argument("dst", help="the Hugging Face directory to write (transformers and vLLM load it)")
    _add(model_cmds, "list", cmd_model_list, "list model versions")
    _add(model_cmds, "promote", cmd_model_promote, "make a version the active one of its kind").add_argument(
        "id", type=int
    )

    token_cmds = groups.add_parser("tokens", help="API tokens", description="API tokens").add_subparsers(
        dest="tokens_command", required=True, metavar="ACTION"
    )
    tcreate = _add(token_cmds, "create", cmd_tokens_create, "create an API token for a user (printed once)")
    tcreate.add_argument("user")
    tcreate.add_argument("--name", required=True, help="what the token is for")
    tcreate.add_argument("--expires-in-days", type=int, help="expiry (default: never)")
    _add(token_cmds, "list", cmd_tokens_list, "list a user's tokens").add_argument("user")
    _add(token_cmds, "revoke", cmd_tokens_revoke, "revoke a token by id").add_argument("id", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
        code = args.handler(args, settings)
        if isinstance(code, int):
            return code
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"flywheel: error: settings: {first.get('msg')}", file=sys.stderr)
        return 2
    except (CLIError, ServiceError) as exc:
        print(f"flywheel: error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"flywheel: error: database: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
