"""What every command module shares: the one-line error, the password prompt, the session factory, `add`."""

import argparse
import getpass
import sys
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory
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


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.resolved_database_url))


def add(sub, name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


def group(groups, name: str, help: str):
    """A command with actions under it (`flywheel NAME ACTION …`); the chosen one lands in `NAME_command`."""
    parser = groups.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")
