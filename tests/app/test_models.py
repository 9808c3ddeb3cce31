"""The constraints that keep data honest hold on both databases."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from app import migrate
from app.db import make_engine, make_session_factory
from app.models import (
    Candidate,
    CandidateSet,
    Conversation,
    Feedback,
    Message,
    MessageRole,
    ModelKind,
    ModelStatus,
    ModelVersion,
    Prompt,
    PromptSource,
    Ranking,
    RankingEntry,
    RankingStatus,
    User,
)


@pytest.fixture
def session(any_db_url: str) -> Iterator[Session]:
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def add_user(session: Session, name: str) -> User:
    user = User(username=name, password_hash="x")
    session.add(user)
    session.commit()
    return user


def assistant_message(session: Session, user: User) -> Message:
    conversation = Conversation(user_id=user.id)
    session.add(conversation)
    session.flush()
    message = Message(conversation_id=conversation.id, role=MessageRole.assistant, content="hi")
    session.add(message)
    session.commit()
    return message


def test_one_feedback_per_message_and_user(session: Session) -> None:
    user = add_user(session, "ann")
    message = assistant_message(session, user)
    session.add(Feedback(message_id=message.id, user_id=user.id, value=1))
    session.commit()
    session.add(Feedback(message_id=message.id, user_id=user.id, value=-1))
    with pytest.raises(IntegrityError):
        session.commit()


def test_feedback_value_is_a_thumb(session: Session) -> None:
    user = add_user(session, "ann")
    message = assistant_message(session, user)
    session.add(Feedback(message_id=message.id, user_id=user.id, value=2))
    with pytest.raises(IntegrityError):
        session.commit()


def test_foreign_keys_are_enforced(session: Session) -> None:
    session.add(Feedback(message_id=999, user_id=999, value=1))
    with pytest.raises(IntegrityError):
        session.commit()


def candidate_set(session: Session) -> CandidateSet:
    prompt = Prompt(messages=[{"role": "user", "content": "hi"}], content_hash="h", source=PromptSource.demo)
    session.add(prompt)
    session.flush()
    cset = CandidateSet(prompt_id=prompt.id)
    session.add(cset)
    session.flush()
    session.add_all([Candidate(candidate_set_id=cset.id, position=i, content=f"a{i}") for i in range(2)])
    session.commit()
    return cset


def test_one_ranking_per_set_and_annotator(session: Session) -> None:
    annotator = add_user(session, "ann")
    cset = candidate_set(session)
    session.add(Ranking(candidate_set_id=cset.id, annotator_id=annotator.id, status=RankingStatus.ranked))
    session.commit()
    session.add(Ranking(candidate_set_id=cset.id, annotator_id=annotator.id, status=RankingStatus.skipped))
    with pytest.raises(IntegrityError):
        session.commit()


def test_ranking_lands_whole_or_not_at_all(session: Session) -> None:
    annotator = add_user(session, "ann")
    cset = candidate_set(session)
    ranking = Ranking(candidate_set_id=cset.id, annotator_id=annotator.id, status=RankingStatus.ranked)
    ranking.entries = [RankingEntry(candidate_id=cset.candidates[0].id, rank=1), RankingEntry(candidate_id=999, rank=2)]
    session.add(ranking)
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    assert session.scalar(text("SELECT count(*) FROM rankings")) == 0
    assert session.scalar(text("SELECT count(*) FROM ranking_entries")) == 0


def test_enums_are_checked_in_the_database(session: Session) -> None:
    with pytest.raises(StatementError):  # refused before SQL by the Enum type
        session.add(User(username="x", password_hash="x", role="emperor"))
        session.commit()
    session.rollback()
    with pytest.raises(IntegrityError):  # and by the CHECK constraint for raw SQL
        session.execute(
            text(
                "INSERT INTO users (username, password_hash, role, disabled, created_at) "
                "VALUES ('y', 'x', 'emperor', false, CURRENT_TIMESTAMP)"
            )
        )
        session.commit()


def test_timestamps_round_trip_as_utc(session: Session) -> None:
    user = add_user(session, "ann")
    local = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=8)))
    user.last_login_at = local
    session.commit()
    session.expire_all()
    loaded = session.get(User, user.id).last_login_at
    assert loaded == local and loaded.tzinfo is not None and loaded.utcoffset() == timedelta(0)
    assert loaded.tzinfo == UTC or loaded.utcoffset() == timedelta(0)
    with pytest.raises(StatementError):
        user.last_login_at = datetime(2026, 1, 1)  # naive: refused
        session.commit()


def test_at_most_one_active_model_per_kind(session: Session) -> None:
    for i in range(2):
        session.add(ModelVersion(name=f"p{i}", kind=ModelKind.policy, path=f"/m/{i}", status=ModelStatus.active))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    session.add(ModelVersion(name="p0", kind=ModelKind.policy, path="/m/0", status=ModelStatus.active))
    session.add(ModelVersion(name="r0", kind=ModelKind.reward, path="/m/r", status=ModelStatus.active))
    session.add(ModelVersion(name="p1", kind=ModelKind.policy, path="/m/1", status=ModelStatus.retired))
    session.commit()


def test_nul_characters_from_people_or_models_are_dropped_on_both_databases(session: Session) -> None:
    from app.services import annotation, chat, prompts

    user = add_user(session, "nul")
    conversation = chat.create_conversation(session, user=user, title="a\x00b")
    _, answer = chat.add_user_message(session, user=user, conversation_id=conversation.id, content="hi\x00 there")
    chat.finish_answer(
        session,
        message_id=answer.id,
        content="model\x00 output",
        finish_reason="stop",
        model_version_id=None,
        sampling={},
    )
    prompts.add_prompts(
        session, items=[(prompts.validate_messages([{"role": "user", "content": "q\x00?"}], "x"), None)], source="demo"
    )
    cset = annotation.create_set(
        session,
        prompt_id=session.query(Prompt).one().id,
        answers=[("x\x00", 1), ("y", 1)],
        model_version_id=None,
        params={},
    )
    session.commit()
    session.expire_all()
    assert session.get(Conversation, conversation.id).title == "ab"
    assert [m.content for m in session.query(Message).order_by(Message.id)] == ["hi there", "model output"]
    assert session.query(Prompt).one().messages[0]["content"] == "q?"
    assert sorted(c.content for c in session.get(CandidateSet, cset.id).candidates) == ["x", "y"]


def test_roll_back_goes_to_the_previous_policy_and_from_the_first_one_to_the_sft_model(session: Session) -> None:
    from app.errors import Conflict
    from app.services.model_versions import promote, roll_back, served_version

    sft = ModelVersion(name="sft", kind=ModelKind.sft, path="/m/sft", status=ModelStatus.active)
    first, second = (ModelVersion(name=n, kind=ModelKind.policy, path=f"/m/{n}") for n in ("first", "second"))
    session.add_all([sft, first, second])
    session.flush()
    with pytest.raises(Conflict, match="no earlier policy"):
        roll_back(session, kind=ModelKind.policy)  # no policy is served: nothing to roll back
    promote(session, version_id=first.id)
    promote(session, version_id=second.id)
    assert served_version(session).name == "second"
    assert roll_back(session, kind=ModelKind.policy).name == "first"
    assert (served_version(session).name, second.status) == ("first", ModelStatus.retired)
    session.execute(text("UPDATE model_versions SET activated_at = NULL WHERE name = 'second'"))
    session.expire_all()  # as if `second` had never been served: `first` is the only policy ever promoted
    assert roll_back(session, kind=ModelKind.policy).name == "sft"
    assert served_version(session).name == "sft" and first.status == ModelStatus.retired
