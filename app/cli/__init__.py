"""`flywheel …`: serve the app, run the worker, migrate, manage accounts, tokens and models, train, demo.

Every command has --help. Errors print one line `flywheel: error: …` and exit non-zero.
"""

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.cli import accounts, models, processes, training
from app.cli.common import CLIError
from app.errors import ServiceError
from app.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__.split("\n")[0])
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (processes, accounts, training, models):
        module.register(groups)
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
