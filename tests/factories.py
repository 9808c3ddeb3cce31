"""Factories and helpers for tests: users, browser-like login, CSRF tokens, database snapshots."""

import re

from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from app.db import make_engine
from app.models import Role, User
from app.services import users

PASSWORD = "correct horse battery"


def make_user(session: Session, username: str, role: Role = Role.user, password: str = PASSWORD) -> User:
    user = users.create_user(session, username=username, password=password, role=role)
    session.commit()
    return user


CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_INPUT.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Log in through the form like a browser; returns the session's CSRF token."""
    token = csrf_from(client.get("/login").text)
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    return csrf_from(client.get("/account/tokens").text)


def db_snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table: compare two snapshots to prove that a request changed nothing."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = [t for t in inspect(conn).get_table_names() if t != "alembic_version"]
            return {t: sorted(map(tuple, conn.execute(text(f'SELECT * FROM "{t}"'))), key=repr) for t in tables}
    finally:
        engine.dispose()


def user_named(session: Session, name: str) -> User:
    session.expire_all()
    return session.scalar(select(User).where(User.username == name))
