"""Annotation: task assignment, rankings (ties, bad input), agreement, prompt import and chat-derived prompts."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Prompt, PromptSource, Ranking, RankingEntry, Role
from app.services import annotation, chat, prompts, tokens
from app.settings import Settings
from tests.factories import app_with_active_model, db_snapshot, make_user, wait_for_model


@pytest.fixture
def setup(settings: Settings, model_dir: Path) -> Iterator[tuple]:
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db:
        items = [([{"role": "user", "content": f"What is {i} plus 1?"}], None) for i in range(3)]
        prompts.add_prompts(db, items=items, source=PromptSource.demo)
        db.commit()
        with TestClient(app) as client:
            wait_for_model(app)
            yield client, db, settings


def annotator(client: TestClient, db: Session, name: str) -> TestClient:
    user = make_user(db, name, Role.annotator)
    _, secret = tokens.create_token(db, user=user, name="t")
    db.commit()
    return TestClient(client.app, headers={"Authorization": f"Bearer {secret}"})


def test_each_set_goes_to_n_distinct_annotators_and_nobody_sees_one_twice(setup) -> None:
    client, db, settings = setup
    settings.annotations_per_set = 2
    given: dict[str, list[int]] = {}
    for name in ("a1", "a2", "a3", "a4"):
        api = annotator(client, db, name)
        given[name] = []
        for _ in range(3):
            task = api.get("/api/v1/annotation/next").json()
            assert len(task["candidates"]) == 4 and [c["label"] for c in task["candidates"]] == ["A", "B", "C", "D"]
            assert task["messages"][-1]["role"] == "user"
            ranking = [{"candidate_id": c["id"], "rank": i + 1} for i, c in enumerate(task["candidates"])]
            response = api.post(f"/api/v1/annotation/sets/{task['set_id']}/ranking", json={"ranking": ranking})
            assert response.status_code == 201
            given[name].append(task["set_id"])
    for name, sets in given.items():
        assert len(set(sets)) == len(sets), f"{name} was given a set twice"
    per_set = {s: sum(s in sets for sets in given.values()) for sets in given.values() for s in sets}
    assert max(per_set.values()) == 2  # sets are shared, and never beyond the limit
    assert db.query(Ranking).count() == 12


def test_bad_rankings_are_422_and_store_nothing(setup) -> None:
    client, db, settings = setup
    api = annotator(client, db, "ann")
    task = api.get("/api/v1/annotation/next").json()
    other = api.get("/api/v1/annotation/next").json()  # not ranked yet, so still the same set
    assert other["set_id"] == task["set_id"]
    ids = [c["id"] for c in task["candidates"]]
    url = f"/api/v1/annotation/sets/{task['set_id']}/ranking"
    before = db_snapshot(settings.resolved_database_url)
    cases = {
        "repeated": [{"candidate_id": ids[0], "rank": 1}, {"candidate_id": ids[0], "rank": 2}]
        + [{"candidate_id": i, "rank": 3} for i in ids[1:]],
        "missing": [{"candidate_id": i, "rank": 1} for i in ids[:-1]],
        "foreign": [{"candidate_id": i, "rank": 1} for i in ids] + [{"candidate_id": 99_999, "rank": 2}],
        "zero": [{"candidate_id": i, "rank": 0} for i in ids],
    }
    messages = {"repeated": "more than once", "missing": "has no rank", "foreign": "is not in set", "zero": ""}
    for case, ranking in cases.items():
        response = api.post(url, json={"ranking": ranking})
        assert response.status_code == 422, case
        assert messages[case] in response.json()["detail"], (case, response.json())
    assert (
        api.post(url, json={"status": "skipped", "ranking": [{"candidate_id": ids[0], "rank": 1}]}).status_code == 422
    )
    assert db_snapshot(settings.resolved_database_url) == before


def test_ties_are_kept_and_a_second_ranking_is_refused(setup) -> None:
    client, db, _ = setup
    api = annotator(client, db, "tie")
    task = api.get("/api/v1/annotation/next").json()
    ids = [c["id"] for c in task["candidates"]]
    ranking = [
        {"candidate_id": ids[0], "rank": 2},
        {"candidate_id": ids[1], "rank": 2},
        {"candidate_id": ids[2], "rank": 5},
        {"candidate_id": ids[3], "rank": 9},
    ]
    url = f"/api/v1/annotation/sets/{task['set_id']}/ranking"
    stored = api.post(url, json={"ranking": ranking, "time_spent_ms": 4200}).json()
    assert sorted(e["rank"] for e in stored["ranking"]) == [1, 1, 2, 3] and stored["time_spent_ms"] == 4200
    again = api.post(url, json={"status": "skipped"})
    assert again.status_code == 409 and "already" in again.json()["detail"]
    assert db.query(Ranking).count() == 1 and db.query(RankingEntry).count() == 4


def test_the_workspace_page_takes_a_ranking_without_javascript(setup) -> None:
    from tests.factories import login

    client, db, _ = setup
    make_user(db, "webann", Role.annotator)
    csrf = login(client, "webann")
    page = client.get("/annotate")
    assert page.status_code == 200 and 'id="ranking-form"' in page.text
    set_id = int(page.text.split('data-set-id="')[1].split('"')[0])
    cset = annotation.get_set(db, set_id=set_id)
    form = {"csrf_token": csrf, "action": "rank", "started_ms": str(int(time.time() * 1000) - 5000)}
    form.update({f"rank-{c.id}": str(i + 1) for i, c in enumerate(cset.candidates)})
    assert client.post(f"/annotate/sets/{set_id}", data=form, follow_redirects=False).status_code == 303
    ranking = db.query(Ranking).one()
    assert ranking.annotator_id is not None and ranking.time_spent_ms >= 5000


def test_kendall_tau_b_on_hand_worked_numbers() -> None:
    assert annotation.kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert annotation.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # pairs: (0,1) concordant, (0,2) concordant, (1,2) discordant → (2 - 1) / 3
    assert annotation.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # a tie in b: pairs 3, ties_b 1 → (C=2, D=0) / sqrt(3 * 2)
    assert annotation.kendall_tau_b([1, 2, 3], [1, 2, 2]) == pytest.approx(2 / 6**0.5)
    assert annotation.kendall_tau_b([1, 1], [1, 2]) is None


def test_agreement_per_annotator(setup) -> None:
    _, db, _ = setup
    cset = annotation.create_set(
        db,
        prompt_id=db.query(Prompt).first().id,
        answers=[("x", 1), ("y", 1), ("z", 1)],
        model_version_id=None,
        params={},
    )
    ids = [c.id for c in cset.candidates]
    orders = {"pat": [1, 2, 3], "quin": [1, 2, 3], "rex": [3, 2, 1]}
    for name, ranks in orders.items():
        annotation.submit_ranking(
            db,
            annotator=make_user(db, name, Role.annotator),
            set_id=cset.id,
            status="ranked",
            entries=list(zip(ids, ranks, strict=True)),
        )
    db.commit()
    result = annotation.agreement(db)
    assert result.sets_compared == 1
    assert result.per_annotator["pat"][0] > 0 > result.per_annotator["rex"][0]


def test_prompt_import_is_all_or_nothing(setup) -> None:
    client, db, settings = setup
    admin = make_user(db, "boss", Role.admin)
    _, secret = tokens.create_token(db, user=admin, name="t")
    db.commit()
    api = TestClient(client.app, headers={"Authorization": f"Bearer {secret}"})
    api.get("/api/v1/me")  # records the token's first use, so that the snapshot below is stable
    before = db_snapshot(settings.resolved_database_url)
    bad = '{"prompt": "fine"}\n{"messages": [{"role": "assistant", "content": "no user turn"}]}\n'
    response = api.post("/api/v1/prompts/import", json={"jsonl": bad})
    assert response.status_code == 422 and "line 2" in response.json()["detail"]
    assert api.post("/api/v1/prompts/import", json={"jsonl": "not json"}).status_code == 422
    assert db_snapshot(settings.resolved_database_url) == before
    good = '{"prompt": "new one"}\n{"messages": [{"role": "user", "content": "What is 0 plus 1?"}]}\n'
    assert api.post("/api/v1/prompts/import", json={"jsonl": good}).json() == {"added": 1}  # the second exists


def test_prompts_come_only_from_chats_that_allow_training(setup) -> None:
    _, db, _ = setup
    person = make_user(db, "chatter")
    allowed = chat.create_conversation(db, user=person)
    withheld = chat.create_conversation(db, user=person)
    chat.update_conversation(db, user=person, conversation_id=withheld.id, allow_training=False)
    for conversation, text in ((allowed, "share me"), (withheld, "keep me private")):
        _, answer = chat.add_user_message(db, user=person, conversation_id=conversation.id, content=text)
        chat.finish_answer(
            db, message_id=answer.id, content="ok", finish_reason="stop", model_version_id=None, sampling={}
        )
    db.commit()
    assert prompts.sync_chat_prompts(db) == 1
    assert prompts.sync_chat_prompts(db) == 0  # idempotent
    texts = [p.messages[-1]["content"] for p in db.query(Prompt).filter_by(source=PromptSource.chat)]
    assert texts == ["share me"]
