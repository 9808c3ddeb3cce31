"""`flywheel` commands, run as a user would run them: a subprocess with env vars, stdin, exit codes."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.cli.training import TRAINERS

EXE = [sys.executable, "-m", "app.cli"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["FLYWHEEL_DATA_DIR"] = str(tmp_path / "data")
    return env


def run(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], input=stdin, env=env, capture_output=True, text=True, timeout=120)


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = [["--help"]]
    for action in parser._subparsers._group_actions:  # walk the tree of sub-commands
        for name, sub in action.choices.items():
            commands.append([name, "--help"])
            if name in {"train", "demo"}:
                continue  # the trainers parse their own flags: checked below
            for sub_action in getattr(sub._subparsers, "_group_actions", []):
                commands += [[name, leaf, "--help"] for leaf in sub_action.choices]
    assert len(commands) > 10
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0, argv


@pytest.mark.parametrize("stage", sorted(TRAINERS))
def test_every_trainer_has_help(stage: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", stage, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: flywheel train {stage}" in capsys.readouterr().out


def test_demo_experiment_has_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "experiment", "--help"])
    assert exit_info.value.code == 0 and "usage: flywheel demo experiment" in capsys.readouterr().out


def test_users_and_tokens_from_the_command_line(env: dict[str, str]) -> None:
    assert run(env, "db", "upgrade").returncode == 0
    created = run(env, "users", "create", "root", "--role", "admin", stdin="a long password\n")
    assert created.returncode == 0, created.stderr
    assert "created root (admin)" in created.stdout
    run(env, "users", "create", "ann", stdin="another password\n")
    assert run(env, "users", "set-role", "ann", "annotator").returncode == 0
    listing = run(env, "users", "list").stdout
    assert "root\tadmin\tenabled" in listing and "ann\tannotator\tenabled" in listing

    token = run(env, "tokens", "create", "ann", "--name", "script")
    assert token.returncode == 0 and token.stdout.strip().startswith("fw_")
    assert "\tscript\t" in run(env, "tokens", "list", "ann").stdout
    assert "revoked" in run(env, "tokens", "revoke", "1").stdout
    assert "revoked" in run(env, "tokens", "list", "ann").stdout
    assert "is disabled" in run(env, "users", "disable", "ann").stdout


def run_in_process(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Same entry point as the console script, without a new interpreter per call (fast)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("users", "create", "root"), "a long password\n", "taken"),
        (("users", "create", "x"), "a long password\n", "username must be"),
        (("users", "create", "bob"), "short\n", "password must be"),
        (("users", "create", "bob"), "", "no password on stdin"),
        (("users", "set-role", "nobody", "admin"), "", "no user named"),
        (("tokens", "revoke", "99"), "", "token 99 not found"),
        (("users", "set-role", "root", "user"), "", "last enabled admin"),
        (("users", "delete", "root"), "", "last enabled admin"),
        (("users", "delete", "nobody"), "", "no user named"),
        (("worker", "--nproc", "0"), "", "--nproc must be at least 1"),
    ],
)
def test_errors_are_one_line_and_non_zero(env, monkeypatch, capsys, args, stdin, message) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_in_process(monkeypatch, capsys, "db", "upgrade")[0] == 0
    created = run_in_process(monkeypatch, capsys, "users", "create", "root", "--role", "admin", stdin="a long pw!\n")
    assert created[0] == 0
    code, _, err = run_in_process(monkeypatch, capsys, *args, stdin=stdin)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flywheel: error:") and message in lines[0], err


def test_users_delete_from_the_command_line(env, monkeypatch, capsys) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_in_process(monkeypatch, capsys, "db", "upgrade")[0] == 0
    assert run_in_process(monkeypatch, capsys, "users", "create", "bob", stdin="a long pw!\n")[0] == 0
    code, out, _ = run_in_process(monkeypatch, capsys, "users", "delete", "bob")
    assert code == 0 and "deleted bob" in out
    assert "bob" not in run_in_process(monkeypatch, capsys, "users", "list")[1]


def test_weak_secret_key_is_refused(env: dict[str, str]) -> None:
    result = run({**env, "FLYWHEEL_SECRET_KEY": "changeme"}, "db", "upgrade")
    assert result.returncode == 2 and "weak" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_password_is_never_an_argument() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["users", "create", "bob", "--password", "secret"])
