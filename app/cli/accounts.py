"""`flywheel users` and `flywheel tokens`: accounts and API tokens from the command line."""

import argparse
import sys

from app.cli.common import add, group, read_password, session_factory
from app.db import transaction
from app.errors import NotFound
from app.models import Role
from app.services import tokens, users
from app.settings import Settings


def cmd_users_create(args: argparse.Namespace, settings: Settings) -> None:
    password = read_password()
    with transaction(session_factory(settings)) as session:
        user = users.create_user(session, username=args.name, password=password, role=Role(args.role))
        print(f"created {user.username} ({user.role.value})")


def cmd_users_list(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        for user in users.list_users(session):
            state = "disabled" if user.disabled else "enabled"
            print(f"{user.id}\t{user.username}\t{user.role.value}\t{state}")


def _user_named(session, name: str):
    user = users.get_by_username(session, username=name)
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def cmd_users_set_role(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        user = users.update_user(session, user_id=_user_named(session, args.name).id, role=Role(args.role))
        print(f"{user.username} is now {user.role.value}")


def cmd_users_disable(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        user = users.update_user(session, user_id=_user_named(session, args.name).id, disabled=not args.enable)
        print(f"{user.username} is {'disabled' if user.disabled else 'enabled'}")


def cmd_users_delete(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        user = _user_named(session, args.name)
        users.delete_user(session, user_id=user.id, confirm=user.username)  # naming it on the command line confirms
    print(f"deleted {args.name}: its chats and what was made of them for training are gone")


def cmd_tokens_create(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        user = _user_named(session, args.user)
        token, secret = tokens.create_token(session, user=user, name=args.name, expires_in_days=args.expires_in_days)
    print(f"token {token.id} for {args.user} (shown once, store it now):", file=sys.stderr)
    print(secret)


def cmd_tokens_list(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        for t in tokens.list_tokens(session, user=_user_named(session, args.user)):
            state = "revoked" if t.revoked_at else "active"
            print(f"{t.id}\t{t.name}\t{t.prefix}…\t{state}")


def cmd_tokens_revoke(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        token = tokens.revoke_token(session, token_id=args.id)
        print(f"token {token.id} ({token.name}) revoked")


def register(groups) -> None:
    user_cmds = group(groups, "users", "accounts")
    create = add(user_cmds, "create", cmd_users_create, "create an account (password from stdin or a prompt)")
    create.add_argument("name")
    create.add_argument("--role", choices=[r.value for r in Role], default=Role.user.value)
    add(user_cmds, "list", cmd_users_list, "list accounts")
    set_role = add(user_cmds, "set-role", cmd_users_set_role, "change an account's role")
    set_role.add_argument("name")
    set_role.add_argument("role", choices=[r.value for r in Role])
    delete = add(user_cmds, "delete", cmd_users_delete, "delete an account, its chats and their training data")
    delete.add_argument("name")
    disable = add(user_cmds, "disable", cmd_users_disable, "disable an account (ends its sessions)")
    disable.add_argument("name")
    disable.set_defaults(enable=False)
    enable = add(user_cmds, "enable", cmd_users_disable, "enable a disabled account")
    enable.add_argument("name")
    enable.set_defaults(enable=True)

    token_cmds = group(groups, "tokens", "API tokens")
    tcreate = add(token_cmds, "create", cmd_tokens_create, "create an API token for a user (printed once)")
    tcreate.add_argument("user")
    tcreate.add_argument("--name", required=True, help="what the token is for")
    tcreate.add_argument("--expires-in-days", type=int, help="expiry (default: never)")
    add(token_cmds, "list", cmd_tokens_list, "list a user's tokens").add_argument("user")
    add(token_cmds, "revoke", cmd_tokens_revoke, "revoke a token by id").add_argument("id", type=int)
