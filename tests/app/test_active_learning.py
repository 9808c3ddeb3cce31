"""Active learning in the service: with FLYWHEEL_ACTIVE_LEARNING=disagreement annotators get the open set of the
highest priority (the reward ensemble's disagreement) first; with `random`, the default, the oldest, as before. On
SQLite and PostgreSQL."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import migrate
from app.models import Prompt, PromptSource, RankingStatus, Role
from app.services import annotation, prompts, tokens
from app.settings import ActiveLearning, Settings
from app.web.main import create_app
from tests.factories import make_user

PRIORITIES = [0.2, None, 0.9, 0.5, 0.9]  # set i's priority; the two 0.9s tie: the older first


@pytest.fixture
def world(any_db_url: str, settings: Settings) -> Iterator[tuple[TestClient, Session, list[int]]]:
    """An app on `any_db_url` with five open sets of the PRIORITIES above, in that order of ids."""
    settings.database_url = any_db_url
    migrate.upgrade(any_db_url)
    app = create_app(settings)
    with app.state.session_factory() as db, TestClient(app) as client:
        items = [([{"role": "user", "content": f"What is {i} plus 2?"}], None) for i in range(len(PRIORITIES))]
        prompts.add_prompts(db, items=items, source=PromptSource.demo)
        added = db.scalars(select(Prompt).order_by(Prompt.id)).all()
        ids = [
            annotation.create_set(
                db, prompt_id=p.id, answers=[("a", 1), ("b", 1)], model_version_id=None, params={}, priority=priority
            ).id
            for p, priority in zip(added, PRIORITIES, strict=True)
        ]
        db.commit()
        yield client, db, ids


def annotator(client: TestClient, db: Session, name: str) -> TestClient:
    _, secret = tokens.create_token(db, user=make_user(db, name, Role.annotator), name="t")
    db.commit()
    return TestClient(client.app, headers={"Authorization": f"Bearer {secret}"})


def rank(api: TestClient, task: dict) -> None:
    ranking = [{"candidate_id": c["id"], "rank": i + 1} for i, c in enumerate(task["candidates"])]
    assert api.post(f"/api/v1/annotation/sets/{task['set_id']}/ranking", json={"ranking": ranking}).status_code == 201


def test_with_disagreement_annotators_get_the_most_disputed_open_set_first(world) -> None:
    client, db, ids = world
    client.app.state.settings.active_learning = ActiveLearning.disagreement
    first, second = annotator(client, db, "a1"), annotator(client, db, "a2")
    order = []
    for _ in ids:
        task = first.get("/api/v1/annotation/next").json()
        order.append(task["set_id"])
        rank(first, task)
    assert order == [ids[2], ids[4], ids[3], ids[0], ids[1]]  # priority high to low, ties oldest first, unscored last
    # Every set now has one ranking: the second annotator gets them in the same order, from the top again.
    assert second.get("/api/v1/annotation/next").json()["set_id"] == ids[2]


def test_fewer_rankings_still_come_before_a_higher_priority(world) -> None:
    """Each set is to be ranked by `per_set` people: a disputed set with a ranking waits behind open sets with none."""
    client, db, ids = world
    client.app.state.settings.active_learning = ActiveLearning.disagreement
    other = make_user(db, "early", Role.annotator)
    annotation.submit_ranking(db, annotator=other, set_id=ids[2], status=RankingStatus.skipped, entries=[])
    db.commit()
    assert annotator(client, db, "a1").get("/api/v1/annotation/next").json()["set_id"] == ids[4]
    got = annotation.next_set_id(db, annotator_id=other.id, per_set=3, by_priority=True)
    assert got == ids[4]  # and nobody gets a set they ranked


def test_with_random_the_default_the_oldest_open_set_comes_first_whatever_its_priority(world) -> None:
    client, db, ids = world
    assert client.app.state.settings.active_learning == ActiveLearning.random
    api = annotator(client, db, "a1")
    order = []
    for _ in ids:
        task = api.get("/api/v1/annotation/next").json()
        order.append(task["set_id"])
        rank(api, task)
    assert order == ids


def test_the_setting_reads_flywheel_active_learning_and_refuses_other_values(monkeypatch) -> None:
    from pydantic import ValidationError

    assert Settings().active_learning == ActiveLearning.random
    monkeypatch.setenv("FLYWHEEL_ACTIVE_LEARNING", "disagreement")
    assert Settings().active_learning == ActiveLearning.disagreement
    monkeypatch.setenv("FLYWHEEL_ACTIVE_LEARNING", "uncertainty")
    with pytest.raises(ValidationError, match=r"random.*disagreement"):
        Settings()
