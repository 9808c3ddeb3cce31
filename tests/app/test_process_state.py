"""A web process's own memory in one object (`ProcessState`), and `LiveAnswers`: the answers streaming in a process,
whose Stop comes from the process itself or, through the database, from any other."""

import asyncio

import pytest
from sqlalchemy.orm import Session

from app import migrate
from app.auth import LoginRateLimiter
from app.db import make_engine, make_session_factory
from app.errors import Conflict, NotFound
from app.models import Message, User
from app.services import chat
from app.serving.process_state import LiveAnswers, ProcessState, make_process_state, process_state
from app.settings import Settings
from app.web.main import create_app
from tests.factories import make_user


@pytest.fixture
def db_factory(any_db_url: str):
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def streaming_answer(session: Session, username: str = "ulla") -> tuple[int, int]:
    """(answer id, user id) of a new answer still to be streamed."""
    user = make_user(session, username)
    conversation = chat.create_conversation(session, user=user)
    _, answer = chat.add_user_message(session, user=user, conversation_id=conversation.id, content="Hello")
    session.commit()
    return answer.id, user.id


def test_the_app_keeps_its_per_process_state_in_one_object(settings: Settings) -> None:
    app = create_app(settings)
    state = process_state(app)
    assert isinstance(state, ProcessState) and state is app.state.process
    assert isinstance(state.login_limiter, LoginRateLimiter)
    assert state.login_limiter.max_failures == settings.login_max_failures
    assert state.unloadable_versions == set() and state.next_set_floors == {} and len(state.answers) == 0
    for loose in ("login_limiter", "unloadable_versions", "stop_requests", "prompts_synced_at", "next_set_floors"):
        assert not hasattr(app.state, loose), loose
    assert create_app(settings).state.process is not state  # one per app, never shared


def test_an_answer_is_claimed_once_and_a_local_stop_sets_its_event() -> None:
    answers = LiveAnswers(lambda ids: {})
    stop = answers.claim(7)
    assert 7 in answers and len(answers) == 1
    with pytest.raises(Conflict):
        answers.claim(7)
    assert answers.stop_here(8) is False
    assert answers.stop_here(7) is True and stop.is_set()
    answers.release(7)
    answers.release(7)  # twice is harmless
    assert 7 not in answers and answers.stop_here(7) is False


def test_request_stop_records_only_on_the_owners_streaming_answer(db_factory) -> None:
    with db_factory() as session:
        answer_id, user_id = streaming_answer(session)
        user, other = session.get(User, user_id), make_user(session, "otto")
        with pytest.raises(NotFound):
            chat.request_stop(session, user=other, message_id=answer_id)
        assert chat.stop_requests(session, message_ids=[answer_id]) == {}
        assert chat.request_stop(session, user=user, message_id=answer_id) is True
        session.commit()
        recorded = chat.stop_requests(session, message_ids=[answer_id, answer_id + 100])
        assert list(recorded) == [answer_id] and recorded[answer_id] is not None
        session.get(Message, answer_id).finish_reason = "length"
        session.commit()
        assert chat.request_stop(session, user=user, message_id=answer_id) is False  # already answered
        session.commit()
        assert chat.stop_requests(session, message_ids=[answer_id]) == recorded  # unchanged


def test_the_watcher_hears_a_stop_recorded_by_another_process(db_factory, settings: Settings) -> None:
    """The Stop is written by one session (another process's request) and heard by the watcher, which asks the
    database only while an answer is live. A Stop recorded before the stream started is not for it."""
    with db_factory() as session:
        answer_id, user_id = streaming_answer(session)
        early_id, early_user_id = streaming_answer(session, "ella")
        chat.request_stop(session, user=session.get(User, early_user_id), message_id=early_id)
        session.commit()
        early_seen = chat.stop_requests(session, message_ids=[early_id])[early_id]

    answers = make_process_state(settings, db_factory).answers
    answers.poll_s = 0.02
    queries: list[list[int]] = []
    read = answers.read_stops
    answers.read_stops = lambda ids: queries.append(sorted(ids)) or read(ids)

    async def scenario() -> tuple[bool, bool]:
        stop = answers.claim(answer_id)
        early = answers.claim(early_id, early_seen)
        await asyncio.sleep(0.1)
        assert not stop.is_set() and not early.is_set()
        with db_factory() as session:  # "another process": the Stop reaches only the database
            chat.request_stop(session, user=session.get(User, user_id), message_id=answer_id)
            session.commit()
        await asyncio.wait_for(stop.wait(), 5)
        answers.release(answer_id)
        answers.release(early_id)
        await asyncio.sleep(0.1)  # the watcher ends with the last live answer
        return early.is_set(), answers._watcher.done()

    early_stopped, watcher_done = asyncio.run(scenario())
    assert not early_stopped
    assert watcher_done
    assert queries and all(q == sorted([answer_id, early_id]) for q in queries)  # one query for all live answers
