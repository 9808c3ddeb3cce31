"""Fuzzing the two endpoints where people's labels land: rankings and thumbs (hypothesis, SQLite and PostgreSQL).

Whatever arrives (valid rankings, ties, repeats, foreign or missing candidates, wrong types, garbage bytes, NUL
characters, other people's messages), after every request: no 5xx; a stored ranking always has an entry for every
candidate of its set (or none, when skipped or flagged); at most one thumb per message and person; a refused
request changed nothing; an accepted one stored exactly what the response says.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, text

from app import migrate
from app.models import Candidate, Feedback, PromptSource, Ranking, RankingEntry, Role
from app.services import annotation, chat, prompts, tokens
from app.services.feedback import REASONS
from app.settings import Settings
from app.web.main import create_app
from tests.factories import make_user

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
UNKNOWN_IDS = (987_654, 0, -7, 2**63)
LABEL_TABLES = ("rankings", "ranking_entries", "feedback")


@dataclass
class Arena:
    client: TestClient
    factory: object
    annotators: list[dict[str, str]]  # Authorization headers
    sets: dict[int, list[int]]  # set id -> its candidate ids
    chatter: dict[str, str]
    chatter_id: int
    messages: dict[str, int]  # what each message id is: an answer, a user turn, a streaming answer, someone else's


@pytest.fixture
def arena(any_db_url: str, settings: Settings) -> Iterator[Arena]:
    settings.database_url = any_db_url
    migrate.upgrade(any_db_url)
    app = create_app(settings)
    with app.state.session_factory() as db:
        headers = []
        for name in ("ann1", "ann2"):
            _, secret = tokens.create_token(db, user=make_user(db, name, Role.annotator), name="fuzz")
            headers.append({"Authorization": f"Bearer {secret}"})
        prompts.add_prompts(db, items=[([{"role": "user", "content": "Hi"}], None)], source=PromptSource.demo)
        prompt_id = db.scalar(text("SELECT id FROM prompts"))
        sets = {}
        for k in (2, 3, 4):
            cset = annotation.create_set(
                db,
                prompt_id=prompt_id,
                answers=[(f"answer {i}", 1) for i in range(k)],
                model_version_id=None,
                params={},
            )
            sets[cset.id] = [c.id for c in cset.candidates]
        person, other = make_user(db, "chatter"), make_user(db, "other")
        _, secret = tokens.create_token(db, user=person, name="fuzz")
        messages = {}
        for owner, label in ((person, "answer"), (person, "second answer"), (other, "someone else's answer")):
            conversation = chat.create_conversation(db, user=owner)
            turn, answer = chat.add_user_message(db, user=owner, conversation_id=conversation.id, content="Hello")
            chat.finish_answer(
                db, message_id=answer.id, content="Hi!", finish_reason="stop", model_version_id=None, sampling={}
            )
            messages[label] = answer.id
            messages.setdefault("a user turn", turn.id)
        conversation = chat.create_conversation(db, user=person)
        _, streaming = chat.add_user_message(db, user=person, conversation_id=conversation.id, content="Wait")
        messages["an answer still streaming"] = streaming.id
        db.commit()
        chatter_id = person.id
    with TestClient(app) as client:
        yield Arena(
            client,
            app.state.session_factory,
            headers,
            sets,
            {"Authorization": f"Bearer {secret}"},
            chatter_id,
            messages,
        )


def labels(arena: Arena) -> dict[str, list[tuple]]:
    """Every row of the tables that hold labels, to show that a refused request changed none of them."""
    with arena.factory() as db:
        return {t: sorted(map(tuple, db.execute(text(f"SELECT * FROM {t}"))), key=repr) for t in LABEL_TABLES}


def assert_rankings_whole(arena: Arena) -> None:
    """Each stored ranking names every candidate of its set once, with dense ranks from 1; skips and flags none."""
    with arena.factory() as db:
        candidates: dict[int, set[int]] = {}
        for set_id, candidate_id in db.execute(select(Candidate.candidate_set_id, Candidate.id)):
            candidates.setdefault(set_id, set()).add(candidate_id)
        for ranking in db.scalars(select(Ranking)):
            entries = db.execute(
                select(RankingEntry.candidate_id, RankingEntry.rank).where(RankingEntry.ranking_id == ranking.id)
            ).all()
            if ranking.status.value != "ranked":
                assert entries == [], ranking.id
                continue
            assert sorted(c for c, _ in entries) == sorted(candidates[ranking.candidate_set_id]), ranking.id
            ranks = sorted({r for _, r in entries})
            assert ranks == list(range(1, len(ranks) + 1)), (ranking.id, ranks)


def assert_refusal(response, before: dict, arena: Arena) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert labels(arena) == before, "a refused request changed the labels"


@st.composite
def ranking_bodies(draw, sets: dict[int, list[int]]) -> tuple[int, object]:
    """A set id and a body: often a valid ranking, else one broken in one of the ways people and programs break it."""
    set_id = draw(st.sampled_from([*sets] * 4 + [*UNKNOWN_IDS]))
    own = sets.get(set_id, [next(iter(sets.values()))[0]])
    every_candidate = [c for ids in sets.values() for c in ids]
    ranks = draw(st.lists(st.integers(1, 4), min_size=len(own), max_size=len(own)))
    entries = [{"candidate_id": c, "rank": r} for c, r in zip(draw(st.permutations(own)), ranks, strict=True)]
    breakage = draw(st.sampled_from(["none", "none", "drop", "repeat", "foreign", "rank", "type", "status", "bytes"]))
    if breakage == "drop" and entries:
        entries.pop(draw(st.integers(0, len(entries) - 1)))
    elif breakage == "repeat":
        entries.append(dict(draw(st.sampled_from(entries)), rank=draw(st.integers(1, 4))))
    elif breakage == "foreign":
        entries.append({"candidate_id": draw(st.sampled_from([*every_candidate, *UNKNOWN_IDS])), "rank": 1})
    elif breakage == "rank":
        entries[0]["rank"] = draw(st.sampled_from([0, -1, 2**63, 1.5, None]))
    elif breakage == "type":
        entries[0][draw(st.sampled_from(["candidate_id", "rank"]))] = draw(st.sampled_from(["1", [], {}, True]))
    elif breakage == "bytes":
        return set_id, draw(st.binary(max_size=40))
    status = draw(
        st.sampled_from(
            ["ranked", "ranked", "skipped", "flagged", "bogus"]
            if breakage == "status"
            else ["ranked", "ranked", "ranked", "skipped", "flagged"]
        )
    )
    body: dict[str, object] = {"status": status}
    if status == "ranked" or draw(st.booleans()):
        body["ranking"] = entries
    if draw(st.booleans()):
        body["flag_reason"] = draw(st.text(max_size=210))
    if draw(st.booleans()):
        body["time_spent_ms"] = draw(st.integers(-5, 2 * 24 * 3600 * 1000))
    return set_id, body


@given(data=st.data())
@FUZZ
def test_rankings_are_stored_whole_or_not_at_all(arena: Arena, data: st.DataObject) -> None:
    if data.draw(st.booleans(), label="start from no rankings"):
        with arena.factory() as db:
            db.execute(delete(Ranking))
            db.commit()
    headers = data.draw(st.sampled_from(arena.annotators), label="annotator")
    set_id, body = data.draw(ranking_bodies(arena.sets), label="request")
    before = labels(arena)
    url = f"/api/v1/annotation/sets/{set_id}/ranking"
    if isinstance(body, bytes):
        response = arena.client.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        response = arena.client.post(url, json=body, headers=headers)
    event(f"HTTP {response.status_code}")  # --hypothesis-show-statistics: the mix of outcomes reached
    if response.status_code == 201:
        stored = response.json()
        with arena.factory() as db:
            entries = db.execute(
                select(RankingEntry.candidate_id, RankingEntry.rank).where(RankingEntry.ranking_id == stored["id"])
            ).all()
        assert sorted(map(tuple, entries)) == sorted((e["candidate_id"], e["rank"]) for e in stored["ranking"])
        assert len(labels(arena)["rankings"]) == len(before["rankings"]) + 1
    else:
        assert response.status_code in (400, 404, 409, 422), response.text
        assert_refusal(response, before, arena)
    assert_rankings_whole(arena)


@st.composite
def feedback_requests(draw, messages: dict[str, int]) -> tuple[str, int, object]:
    method = draw(st.sampled_from(["PUT"] * 5 + ["DELETE"]))
    answers = [messages["answer"], messages["second answer"]] * 3
    message_id = draw(st.sampled_from([*answers, *messages.values(), *UNKNOWN_IDS]))
    if draw(st.integers(0, 9)) == 0:
        return method, message_id, draw(st.binary(max_size=30))
    body = {"value": draw(st.sampled_from([1, -1] * 4 + [0, 2, "1", None, 1.0]))}
    if draw(st.booleans()):
        body["reason"] = draw(st.sampled_from([*REASONS, "", "because", None, 3]))
    if draw(st.booleans()):
        body["comment"] = draw(st.one_of(st.text(max_size=60), st.just("x" * 2001), st.just(" \x00 "), st.none()))
    if draw(st.integers(0, 9)) == 0:
        body["extra"] = True
    return method, message_id, body


@given(data=st.data())
@FUZZ
def test_thumbs_are_one_per_person_and_message_and_refusals_change_nothing(arena: Arena, data: st.DataObject) -> None:
    method, message_id, body = data.draw(feedback_requests(arena.messages), label="request")
    before = labels(arena)
    url = f"/api/v1/messages/{message_id}/feedback"
    if isinstance(body, bytes):
        headers = {**arena.chatter, "Content-Type": "application/json"}
        response = arena.client.request(method, url, content=body, headers=headers)
    else:
        response = arena.client.request(method, url, json=body, headers=arena.chatter)
    event(f"{method} HTTP {response.status_code}")
    with arena.factory() as db:
        rows = db.execute(
            select(Feedback.message_id, Feedback.user_id, Feedback.value, Feedback.reason, Feedback.comment)
        ).all()
    assert len({(m, u) for m, u, *_ in rows}) == len(rows), "two thumbs for one message and person"
    mine = [row for row in rows if row.message_id == message_id and row.user_id == arena.chatter_id]
    if response.status_code == 200:
        vote = response.json()
        assert len(mine) == 1 and (mine[0].value, mine[0].reason, mine[0].comment) == (
            vote["value"],
            vote["reason"],
            vote["comment"],
        )
        assert mine[0].value == body["value"] and "\x00" not in (mine[0].comment or "")
    elif response.status_code == 204:
        assert mine == []
    else:
        assert response.status_code in (400, 404, 409, 413, 422), response.text
        assert_refusal(response, before, arena)


def test_a_garbage_body_is_refused_with_the_one_shape(arena: Arena) -> None:
    """The plainest case of the fuzz above, kept as an example that reads on its own."""
    set_id = next(iter(arena.sets))
    before = labels(arena)
    response = arena.client.post(
        f"/api/v1/annotation/sets/{set_id}/ranking",
        content=b'{"status": "ranked", "rank',
        headers={**arena.annotators[0], "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert_refusal(response, before, arena)
    assert json.loads(response.text)["detail"]
