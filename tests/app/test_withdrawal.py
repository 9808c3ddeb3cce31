"""Withdrawal: deleting a chat or a message, switching training off, or deleting an account takes what came from the
person out of the prompt pool, the next annotation task, the candidate sets, every export and the jobs' inputs, in one
transaction, on SQLite and PostgreSQL; versions trained before say so in their lineage."""

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.errors import Conflict, Invalid
from app.jobs import handlers
from app.models import (
    CandidateSet,
    Conversation,
    ModelKind,
    ModelVersion,
    Prompt,
    Ranking,
    RankingStatus,
    Role,
    User,
    Withdrawal,
)
from app.services import annotation, chat, datasets, feedback, lineage, model_versions, prompts, users
from app.services.training_data import TrainingData
from app.settings import Settings
from app.web.main import create_app
from tests.factories import PASSWORD, db_snapshot, login, make_user

SECRET = "ALICE-SECRET"
KEPT = "BOB-KEPT"
EARLY = "alice-early-turn"


@pytest.fixture
def factory(any_db_url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


@dataclass
class World:
    alice: int
    bob: int
    annotator: int
    conversation: int
    early_turn: int  # alice's first user turn (no secret)
    secret_turn: int  # alice's second user turn (the secret): deleting it leaves the first
    version: int  # a reward model trained on everything before the withdrawal


def _turn(session: Session, user: User, conversation_id: int, text: str, answer: str) -> tuple[int, int]:
    message, reply = chat.add_user_message(session, user=user, conversation_id=conversation_id, content=text)
    chat.finish_answer(
        session, message_id=reply.id, content=answer, finish_reason="stop", model_version_id=None, sampling={}
    )
    return message.id, reply.id


def _sets_for(session: Session, prompt: Prompt, annotator: User, marker: str) -> None:
    """Two sets on the prompt: one fully ranked (per_set 1), one open."""
    for n in range(2):
        cset = annotation.create_set(
            session,
            prompt_id=prompt.id,
            answers=[(f"{marker} good {n}", 3), (f"{marker} bad {n}", 3)],
            model_version_id=None,
            params={},
            seed=n,
        )
        if n == 0:
            ids = [c.id for c in cset.candidates]
            annotation.submit_ranking(
                session,
                annotator=annotator,
                set_id=cset.id,
                status=RankingStatus.ranked,
                entries=[(ids[0], 1), (ids[1], 2)],
            )


def build_world(factory: sessionmaker[Session]) -> World:
    with transaction(factory) as session:
        admin = users.create_user(session, username="boss", password=PASSWORD, role=Role.admin)
        alice = users.create_user(session, username="alice", password=PASSWORD, role=Role.user)
        bob = users.create_user(session, username="bob", password=PASSWORD, role=Role.user)
        ann = users.create_user(session, username="ann", password=PASSWORD, role=Role.annotator)
        mine = chat.create_conversation(session, user=alice)
        early, _ = _turn(session, alice, mine.id, f"{EARLY} hello", "hi alice")
        secret, secret_answer = _turn(session, alice, mine.id, f"{SECRET} my address", f"{SECRET} noted")
        feedback.set_feedback(session, user=alice, message_id=secret_answer, value=1)
        theirs = chat.create_conversation(session, user=bob)
        _, bob_answer = _turn(session, bob, theirs.id, f"{KEPT} question", f"{KEPT} answer")
        feedback.set_feedback(session, user=bob, message_id=bob_answer, value=-1)
        prompts.sync_chat_prompts(session)
        for prompt in session.scalars(select(Prompt).order_by(Prompt.id)):
            marker = SECRET if SECRET in json.dumps(prompt.messages) else "cand"
            _sets_for(session, prompt, ann, marker)
        seen = TrainingData(
            rankings=datasets.rankings(session).rows(),
            thumbs=datasets.thumbs(session).rows(),
            dialogues=datasets.dialogues(session).rows(),
            prompts=datasets.prompt_records(session).rows(),
        )
        version = model_versions.register(
            session, name="rm-before", kind=ModelKind.reward, path="/m/rm", training_data=seen
        )
        assert admin.id
        return World(alice.id, bob.id, ann.id, mine.id, early, secret, version.id)


def job_inputs(session: Session, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """What the sft and reward jobs would train on now: their configs, caught before any training."""
    caught = []
    monkeypatch.setattr(handlers.JobContext, "train", lambda self, trainer, config: caught.append(config) or {})
    for kind, path in (("base", "/m/base"), ("sft", "/m/sft")):
        if not session.scalar(select(ModelVersion).where(ModelVersion.kind == kind)):
            model_versions.register(
                session, name=kind, kind=ModelKind(kind), path=path, training_data=TrainingData(), activate=True
            )
    session.commit()
    url = session.get_bind().url.render_as_string(hide_password=False)
    ctx = handlers.JobContext(0, {"include_demo": False}, tmp_path, url, lambda **_: None)
    for run in (handlers.run_sft, handlers.run_reward):
        with contextlib.suppress(ValueError):  # nothing left to train on at all: nothing withdrawn in it either
            run(ctx)
    return repr([vars(c) for c in caught])


def everything_shown(session: Session, monkeypatch, tmp_path) -> str:
    """The prompt pool, the next task of a new annotator, the open sets, every export and the jobs' inputs."""
    prompts.sync_chat_prompts(session)
    pool = [p.messages for p in session.scalars(select(Prompt))]
    fresh = session.scalar(select(User).where(User.username == "fresh-annotator"))
    if fresh is None:
        fresh = users.create_user(session, username="fresh-annotator", password=PASSWORD, role=Role.annotator)
    tasks = []
    set_id = annotation.next_set_id(session, annotator_id=fresh.id, per_set=2)
    if set_id is not None:
        tasks.append(annotation.load_task(session, set_id=set_id))
    needing = annotation.prompt_needing_candidates(session, annotator=fresh)
    sets = [annotation.load_task(session, set_id=s) for s in session.scalars(select(CandidateSet.id))]
    exports = {kind: datasets.export(session, kind).records for kind in datasets.KINDS}
    shown = json.dumps([pool, [vars(t) for t in tasks], needing and needing.messages, [vars(s) for s in sets]])
    return shown + json.dumps(exports) + job_inputs(session, monkeypatch, tmp_path)


def delete_conversation(session: Session, world: World) -> None:
    chat.delete_conversation(session, user=session.get(User, world.alice), conversation_id=world.conversation)


def delete_message(session: Session, world: World) -> None:
    chat.delete_message(session, user=session.get(User, world.alice), message_id=world.secret_turn)


def training_off(session: Session, world: World) -> None:
    alice = session.get(User, world.alice)
    chat.update_conversation(session, user=alice, conversation_id=world.conversation, allow_training=False)


def delete_account(session: Session, world: World) -> None:
    users.delete_user(session, user_id=world.alice, confirm="alice")


ACTIONS: dict[str, Callable[[Session, World], None]] = {
    "delete conversation": delete_conversation,
    "delete message": delete_message,
    "training off": training_off,
    "delete account": delete_account,
}


@pytest.mark.parametrize("action", ACTIONS)
def test_a_withdrawal_takes_the_text_out_of_every_pool_export_and_job_input(
    factory, action: str, monkeypatch, tmp_path
) -> None:
    world = build_world(factory)
    with factory() as session:
        before = everything_shown(session, monkeypatch, tmp_path)
    assert SECRET in before and KEPT in before and EARLY in before  # the check below can fail
    with transaction(factory) as session:
        ACTIONS[action](session, world)
    with factory() as session:
        after = everything_shown(session, monkeypatch, tmp_path)
        assert SECRET not in after
        assert KEPT in after  # someone else's data stays
        assert (EARLY in after) == (action == "delete message")  # a message takes only what follows from it
        kept = list(session.scalars(select(Ranking).where(Ranking.annotator_id == world.annotator)))
        assert kept and all(
            SECRET not in json.dumps(annotation.load_task(session, set_id=r.candidate_set_id).messages) for r in kept
        )
        record = session.scalars(select(Withdrawal)).one()
        assert record.conversation_ids == [world.conversation] and record.ranking_ids
        line = lineage.withdrawn_data(session, model_versions.get_version(session, version_id=world.version))
        assert line is not None and "trained on data since withdrawn (1 conversation" in line.text
        after_version = model_versions.register(
            session,
            name="rm-after",
            kind=ModelKind.reward,
            path="/m/rm2",
            training_data=TrainingData(rankings=datasets.rankings(session).rows()),
        )
        assert lineage.withdrawn_data(session, after_version) is None  # trained after: it never saw the data


FAIL_AT = {  # a step each action takes after its withdrawal has run: a failure there must undo the withdrawal
    "delete conversation": "app.services.chat.delete",
    "delete message": "app.services.chat.delete",
    "training off": "app.services.chat.utcnow",
    "delete account": "app.services.users.delete",
}


@pytest.mark.parametrize("action", ACTIONS)
def test_a_failure_midway_leaves_everything_as_it_was(factory, any_db_url: str, action: str, monkeypatch) -> None:
    world = build_world(factory)
    before = db_snapshot(any_db_url)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(FAIL_AT[action], boom)
    with pytest.raises(RuntimeError, match="injected"), transaction(factory) as session:
        ACTIONS[action](session, world)
    assert db_snapshot(any_db_url) == before


def test_training_switched_on_again_brings_the_prompts_back_new_and_unranked(factory) -> None:
    world = build_world(factory)
    with transaction(factory) as session:
        training_off(session, world)
    with transaction(factory) as session:
        alice = session.get(User, world.alice)
        chat.update_conversation(session, user=alice, conversation_id=world.conversation, allow_training=True)
        assert prompts.sync_chat_prompts(session) == 2
        back = [p for p in session.scalars(select(Prompt)) if SECRET in json.dumps(p.messages)]
        assert len(back) == 1
        assert not session.scalars(select(CandidateSet).where(CandidateSet.prompt_id == back[0].id)).all()


def test_deleting_an_annotator_keeps_their_rankings_anonymised(factory) -> None:
    world = build_world(factory)
    with factory() as session:
        flagged_set = session.scalar(select(CandidateSet.id).order_by(CandidateSet.id.desc()))
        annotation.submit_ranking(
            session,
            annotator=session.get(User, world.annotator),
            set_id=flagged_set,
            status=RankingStatus.flagged,
            entries=[],
            flag_reason="my own words",
        )
        session.commit()
        rankings_before = datasets.rankings(session).records
    with transaction(factory) as session:
        users.delete_user(session, user_id=world.annotator, confirm="ann")
    with factory() as session:
        left = list(session.scalars(select(Ranking)))
        assert left and all(r.annotator_id is None for r in left)
        assert all(r.flag_reason is None for r in left)
        assert datasets.rankings(session).records == rankings_before  # the training data keeps them
        assert {r["annotator"] for r in datasets.raw_rankings(session).records} == {None}
        assert session.scalars(select(Withdrawal)).all() == []  # nothing of theirs was withdrawn


def test_the_last_enabled_admin_cannot_delete_their_account(factory) -> None:
    build_world(factory)
    with factory() as session:
        boss = session.scalar(select(User).where(User.username == "boss"))
        with pytest.raises(Conflict, match="last enabled admin"):
            users.delete_user(session, user_id=boss.id, confirm="boss")
        with pytest.raises(Invalid, match="type the username"):
            users.delete_user(session, user_id=boss.id, confirm="Boss")


# --- through the pages and the REST API ---------------------------------------------------------------------------


@pytest.fixture
def web(any_db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, sessionmaker[Session]]]:
    settings = Settings(data_dir=tmp_path / "data", database_url=any_db_url, secret_key=secrets.token_urlsafe(40))
    migrate.upgrade(any_db_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.session_factory


def test_the_account_page_offers_deletion_behind_a_typed_confirmation(web) -> None:
    client, factory = web
    with factory() as session:
        make_user(session, "boss", Role.admin)
        alice = make_user(session, "alice")
        conversation = chat.create_conversation(session, user=alice)
        _turn(session, alice, conversation.id, f"{SECRET} hi", "hello")
        prompts.sync_chat_prompts(session)
        session.commit()
    csrf = login(client, "alice")
    page = client.get("/account/tokens").text
    form = page.split('id="delete-account"')[1].split("</section>")[0]  # a plain form: no JavaScript needed
    assert (
        'method="post" action="http://testserver/account/delete"' in form
        and 'name="confirm"' in form
        and "required" in form
    )
    wrong = client.post("/account/delete", data={"confirm": "bob", "csrf_token": csrf}, follow_redirects=False)
    assert wrong.status_code == 422 and "type the username" in wrong.text
    assert client.get("/api/v1/me").status_code == 200  # still there
    done = client.post("/account/delete", data={"confirm": "alice", "csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303
    assert client.get("/api/v1/me").status_code == 401  # the login went with the account
    with factory() as session:
        assert session.scalar(select(User).where(User.username == "alice")) is None
        assert session.scalars(select(Conversation)).all() == []
        assert all(SECRET not in json.dumps(p.messages) for p in session.scalars(select(Prompt)))


def _bearer(client: TestClient, factory, username: str) -> dict[str, str]:
    from app.services import tokens

    with factory() as session:
        _, secret = tokens.create_token(session, user=users.get_by_username(session, username=username), name="t")
        session.commit()
    return {"Authorization": f"Bearer {secret}"}


def test_accounts_are_deleted_by_themselves_and_by_admins_through_the_api_and_the_people_page(web) -> None:
    client, factory = web
    with factory() as session:
        for name, role in (("boss", Role.admin), ("alice", Role.user), ("bob", Role.user), ("carol", Role.user)):
            make_user(session, name, role)
    boss = _bearer(client, factory, "boss")
    alice = _bearer(client, factory, "alice")
    assert client.delete("/api/v1/me", headers=alice).status_code == 422  # no confirmation
    assert client.delete("/api/v1/me", params={"confirm": "alice"}, headers=alice).status_code == 204
    with factory() as session:
        bob_id = users.get_by_username(session, username="bob").id
        carol_id = users.get_by_username(session, username="carol").id
        boss_id = users.get_by_username(session, username="boss").id
    assert client.delete(f"/api/v1/users/{bob_id}", params={"confirm": "bob"}, headers=boss).status_code == 204
    csrf = login(client, "boss")
    page = client.get("/admin/users").text
    assert f'action="http://testserver/admin/users/{carol_id}/delete"' in page
    form = {"confirm": "carol", "csrf_token": csrf}
    assert client.post(f"/admin/users/{carol_id}/delete", data=form, follow_redirects=False).status_code == 303
    refused = client.delete(f"/api/v1/users/{boss_id}", params={"confirm": "boss"}, headers=boss)
    assert refused.status_code == 409 and "last enabled admin" in refused.json()["detail"]
    form = {"confirm": "boss", "csrf_token": csrf}
    assert client.post(f"/admin/users/{boss_id}/delete", data=form, follow_redirects=False).status_code == 409
    assert client.delete("/api/v1/me", params={"confirm": "boss"}, headers=boss).status_code == 409
    with factory() as session:
        assert [u.username for u in users.list_users(session)] == ["boss"]


def test_the_model_page_says_a_version_was_trained_on_withdrawn_data(web) -> None:
    client, factory = web
    world = build_world(factory)
    with transaction(factory) as session:
        users.update_user(session, user_id=world.bob, role=Role.admin)
    csrf = login(client, "bob")
    assert 'id="withdrawn-data"' not in client.get(f"/admin/models/{world.version}").text
    alice = TestClient(client.app)
    alice_csrf = login(alice, "alice")
    form = {"csrf_token": alice_csrf}
    assert alice.post(f"/chat/{world.conversation}/delete", data=form, follow_redirects=False).status_code == 303
    shown = client.get(f"/admin/models/{world.version}").text
    assert 'id="withdrawn-data"' in shown and "trained on data since withdrawn (1 conversation" in shown
    assert csrf
