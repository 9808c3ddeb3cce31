"""The migrations build the schema of app.models exactly, both ways, on SQLite and on PostgreSQL."""

from sqlalchemy import inspect

from app import migrate
from app.db import make_engine
from app.models import Base


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_no_drift(any_db_url: str) -> None:
    migrate.upgrade(any_db_url)
    assert table_names(any_db_url) == set(Base.metadata.tables)
    migrate.check(any_db_url)  # raises when models and migrations disagree (what `alembic check` does)

    migrate.downgrade(any_db_url, "base")
    assert table_names(any_db_url) == set()

    migrate.upgrade(any_db_url)
    assert table_names(any_db_url) == set(Base.metadata.tables)
    migrate.check(any_db_url)
    engine = make_engine(any_db_url)
    assert migrate.is_current(engine)
    engine.dispose()


def test_database_behind_is_not_current(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    migrate.downgrade(sqlite_url, "base")
    engine = make_engine(sqlite_url)
    assert not migrate.is_current(engine)
    engine.dispose()
