"""TrainingData, the typed record of what a version trained on, and `model_versions.register`, the one way a version
comes to be: stored under the JSON keys versions have always had, read back the same, on both databases."""

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.errors import Conflict
from app.models import ModelKind, ModelStatus, ModelVersion
from app.services import model_versions
from app.services.lineage import describe_training_data
from app.services.training_data import Rows, TrainingData


@pytest.fixture
def factory(any_db_url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def test_the_record_is_stored_under_the_keys_versions_have_always_had() -> None:
    record = TrainingData(rankings=Rows(57, 6), thumbs=Rows(0, 0), corpus=["demo"], reward_version_id=3)
    stored = record.to_json()
    assert stored == {
        "ranking_id": 57,
        "rankings": 6,
        "feedback_id": 0,
        "thumbs": 0,
        "data": ["demo"],
        "reward_version_id": 3,
    }
    assert TrainingData.from_json(stored) == record


def test_an_old_version_reads_as_it_was_written() -> None:
    """Watermarks without counts, a corpus stored as one string (shown letter by letter before), unknown keys."""
    old = {"ranking_id": 12, "data": "demo world, seed 0", "bad_fraction": 0.2}
    record = TrainingData.from_json(old)
    assert record.rankings == Rows(12, None) and record.corpus == ["demo world, seed 0"]
    assert record.extra == {"bad_fraction": 0.2} and record.learned_from_demo
    assert record.to_json() == {**old, "data": ["demo world, seed 0"]}  # written back as a list of sources
    lines = {i.label: i.text for i in describe_training_data(record)}
    assert lines["corpus"] == "demo world, seed 0" and lines["rankings"] == "all rankings (row ids up to 12)"
    assert not TrainingData.from_json({"data": ["books.txt"]}).learned_from_demo


def test_register_makes_a_candidate_or_activates_it_retiring_the_active_one(factory) -> None:
    with transaction(factory) as session:
        first = model_versions.register(
            session, name="a", kind=ModelKind.reward, path="/m/a", training_data=TrainingData(), activate=True
        )
        second = model_versions.register(
            session,
            name="b",
            kind=ModelKind.reward,
            path="/m/b",
            parent_id=first.id,
            training_data=TrainingData(rankings=Rows(9, 4)),
            metrics={"val_acc": 0.75},
        )
        assert (first.status, second.status) == (ModelStatus.active, ModelStatus.candidate)
        third = model_versions.register(
            session, name="c", kind=ModelKind.reward, path="/m/c", training_data=TrainingData(), activate=True
        )
        ids = first.id, second.id, third.id
    with factory() as session:
        first, second, third = (session.get(ModelVersion, i) for i in ids)
        assert (first.status, third.status) == (ModelStatus.retired, ModelStatus.active)
        assert second.training_data == {"ranking_id": 9, "rankings": 4} and second.metrics == {"val_acc": 0.75}
        assert second.parent_id == first.id


def test_register_is_one_transaction_with_its_activation(factory) -> None:
    """A version that cannot be activated is not left behind as a candidate either (the caller's transaction)."""
    with transaction(factory) as session:
        failed = ModelVersion(name="f", kind=ModelKind.sft, path="/m/f", status=ModelStatus.failed)
        session.add(failed)
    with pytest.raises(Conflict), transaction(factory) as session:
        model_versions.register(
            session, name="g", kind=ModelKind.sft, path="/m/g", training_data=TrainingData(), activate=True
        )
        model_versions.promote(session, version_id=failed.id)
    with factory() as session:
        assert [v.name for v in model_versions.list_versions(session)] == ["f"]
