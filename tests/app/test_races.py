"""Races that the load test (bench/http_load.py) found: two requests doing the same write at the same moment."""

import threading

from sqlalchemy import func, select

from app import migrate
from app.db import make_engine, make_session_factory
from app.errors import Conflict
from app.models import Prompt, PromptSource, Ranking, RankingEntry, RankingStatus, Role
from app.services import annotation, chat, prompts
from tests.factories import make_user


def test_two_annotators_syncing_the_same_chat_into_prompts_both_succeed(any_db_url: str) -> None:
    """Both transactions see the chat turn as new and insert its prompt; the second insert meets the unique hash and
    is skipped on its savepoint (it was a 500 for the second annotator asking for work)."""
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    factory = make_session_factory(engine)
    with factory() as db:
        person = make_user(db, "chatter")
        conversation = chat.create_conversation(db, user=person)
        chat.add_user_message(db, user=person, conversation_id=conversation.id, content="What is 2 plus 2?")
        db.commit()
    first, second = factory(), factory()
    assert prompts.sync_chat_prompts(first) == 1  # not committed yet: the second one cannot see it
    errors: list[BaseException] = []

    def sync_second() -> None:
        try:
            prompts.sync_chat_prompts(second)
            second.commit()
        except BaseException as exc:  # the test asserts on it below
            errors.append(exc)

    thread = threading.Thread(target=sync_second)
    thread.start()
    thread.join(0.5)  # it waits for the first writer (SQLite: the write lock; PostgreSQL: the unique index)
    first.commit()
    thread.join(30)
    assert not thread.is_alive() and errors == []
    with factory() as db:
        assert db.scalar(select(func.count()).select_from(Prompt).where(Prompt.source == PromptSource.chat)) == 1
    first.close()
    second.close()
    engine.dispose()


def test_the_same_ranking_sent_twice_at_once_is_stored_once_and_the_second_is_a_conflict(any_db_url: str) -> None:
    """Both requests pass the "already ranked?" read before either commits; the unique constraint settles it."""
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    factory = make_session_factory(engine)
    with factory() as db:
        annotator = make_user(db, "ann", Role.annotator)
        prompts.add_prompts(db, items=[([{"role": "user", "content": "Hi"}], None)], source=PromptSource.demo)
        cset = annotation.create_set(
            db, prompt_id=db.scalar(select(Prompt.id)), answers=[("a", 1), ("b", 1)], model_version_id=None, params={}
        )
        db.commit()
        entries = [(c.id, i + 1) for i, c in enumerate(cset.candidates)]
    first, second = factory(), factory()
    annotation.submit_ranking(first, annotator=annotator, set_id=cset.id, status=RankingStatus.ranked, entries=entries)
    outcome: list[BaseException | None] = []

    def submit_second() -> None:
        try:
            annotation.submit_ranking(
                second, annotator=annotator, set_id=cset.id, status=RankingStatus.ranked, entries=entries
            )
            second.commit()
            outcome.append(None)
        except BaseException as exc:  # the test asserts on it below
            second.rollback()
            outcome.append(exc)

    thread = threading.Thread(target=submit_second)
    thread.start()
    thread.join(0.5)
    first.commit()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    with factory() as db:
        assert db.scalar(select(func.count()).select_from(Ranking)) == 1
        assert db.scalar(select(func.count()).select_from(RankingEntry)) == 2
    first.close()
    second.close()
    engine.dispose()
