"""Asking to annotate (a user asks, an admin approves or rejects on the people page) and the annotator's counters."""

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.models import Role, RoleRequest, RoleRequestStatus, User
from app.services import annotation, prompts, role_requests
from tests.factories import csrf_from, login, make_user


def two_sets(db: Session, long_answer: bool = False) -> list[int]:
    prompts.add_prompts(db, items=[([{"role": "user", "content": "What is 2 plus 2?"}], None)], source="demo")
    prompt_id = db.query(prompts.Prompt).one().id
    first = "four " * 100 if long_answer else "4"
    return [
        annotation.create_set(
            db, prompt_id=prompt_id, answers=[(first, 1), ("5", 1)], model_version_id=None, params={}, seed=i
        ).id
        for i in range(2)
    ]


def test_a_user_asks_to_annotate_and_an_admin_approves(client: TestClient, db: Session, app) -> None:
    make_user(db, "reader")
    csrf = login(client, "reader")
    refused = client.get("/annotate")
    assert refused.status_code == 200 and "Ask to annotate" in refused.text  # not a bare 403: the way to ask
    assert 'id="ranking-form"' not in refused.text
    sent = client.post("/annotate/request-role", data={"message": "I know maths", "csrf_token": csrf})
    assert sent.status_code == 200 and "waiting for an admin" in sent.text  # the redirect back to /annotate
    again = client.post("/annotate/request-role", data={"csrf_token": csrf}, follow_redirects=False)
    assert again.status_code == 303 and db.query(RoleRequest).count() == 1  # asking twice keeps one request

    admin = TestClient(app)
    make_user(db, "chief", Role.admin)
    admin_csrf = login(admin, "chief")
    assert "1 request for the annotator role" in admin.get("/admin").text
    people = admin.get("/admin/users").text
    request_id = db.query(RoleRequest).one().id
    assert f'id="role-request-{request_id}"' in people and "I know maths" in people
    decided = admin.post(
        f"/admin/role-requests/{request_id}",
        data={"decision": "approve", "csrf_token": admin_csrf},
        follow_redirects=False,
    )
    assert decided.status_code == 303
    db.expire_all()
    assert db.query(User).filter_by(username="reader").one().role == Role.annotator
    assert db.query(RoleRequest).one().status == RoleRequestStatus.approved
    assert "No requests waiting" in admin.get("/admin/users").text
    assert client.get("/annotate").status_code == 200  # the same login, now an annotator
    twice = admin.post(f"/admin/role-requests/{request_id}", data={"decision": "reject", "csrf_token": admin_csrf})
    assert twice.status_code == 409  # decided once only
    assert client.post("/annotate/request-role", data={"csrf_token": csrf}).status_code == 409  # has the role


def test_a_rejected_user_may_ask_again(db: Session) -> None:
    person, chief = make_user(db, "hopeful"), make_user(db, "chief", Role.admin)
    first = role_requests.ask(db, user=person, message="please")
    role_requests.decide(db, request_id=first.id, approve=False, admin=chief)
    assert person.role == Role.user and first.status == RoleRequestStatus.rejected and first.decided_by_id == chief.id
    second = role_requests.ask(db, user=person, message="  again  ")
    assert second.id == first.id and second.status == RoleRequestStatus.pending and second.message == "again"
    assert second.decided_at is None and role_requests.pending(db) == [second]
    try:
        role_requests.ask(db, user=make_user(db, "already", Role.annotator))
    except Conflict as exc:
        assert "already have the annotator role" in exc.message
    else:
        raise AssertionError("an annotator asked for the role they have")


def test_the_rejected_page_offers_to_ask_again(client: TestClient, db: Session) -> None:
    person, chief = make_user(db, "hopeful"), make_user(db, "chief", Role.admin)
    role_requests.decide(db, request_id=role_requests.ask(db, user=person).id, approve=False, admin=chief)
    db.commit()
    login(client, "hopeful")
    page = client.get("/annotate")
    assert page.status_code == 200 and "declined" in page.text and "Ask to annotate" in page.text


def test_counters_and_the_confirmation_after_submitting(client: TestClient, db: Session) -> None:
    two_sets(db)
    db.commit()
    make_user(db, "ann", Role.annotator)
    login(client, "ann")
    page = client.get("/annotate")
    assert '<strong id="tasks-left">2</strong> tasks left' in page.text
    assert '<strong id="done-today">0</strong> done today' in page.text and 'id="saved"' not in page.text
    set_id = int(page.text.split('data-set-id="')[1].split('"')[0])
    after = client.post(f"/annotate/sets/{set_id}", data={"action": "skip", "csrf_token": csrf_from(page.text)})
    assert str(after.url).endswith("/annotate?saved=skip")
    assert "Skipped — 1 left." in after.text and '<strong id="done-today">1</strong> done today' in after.text
    assert '<strong id="tasks-left">1</strong> task left' in after.text


def test_long_answers_are_compared_side_by_side(client: TestClient, db: Session) -> None:
    two_sets(db, long_answer=True)
    db.commit()
    make_user(db, "ann", Role.annotator)
    login(client, "ann")
    assert 'class="candidates side-by-side"' in client.get("/annotate").text


def test_progress_counts_only_open_sets_the_annotator_has_not_ranked(db: Session) -> None:
    ids = two_sets(db)
    me, other = make_user(db, "me", Role.annotator), make_user(db, "other", Role.annotator)
    annotation.submit_ranking(db, annotator=other, set_id=ids[0], status="skipped", entries=[])
    assert annotation.annotator_progress(db, annotator_id=me.id, per_set=2) == annotation.AnnotatorProgress(2, 0)
    assert annotation.annotator_progress(db, annotator_id=me.id, per_set=1).left == 1  # set 0 has its one ranking
    assert annotation.annotator_progress(db, annotator_id=other.id, per_set=2) == annotation.AnnotatorProgress(1, 1)


def test_requests_counters_and_trends_on_sqlite_and_postgresql(any_db_url: str) -> None:
    """The same service calls on both databases: the unique request per user, the correlated counts, the day buckets."""
    from app import migrate
    from app.db import make_engine, make_session_factory
    from app.models import utcnow
    from app.services import stats

    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    try:
        with make_session_factory(engine)() as db:
            ids = two_sets(db)
            person, chief = make_user(db, "person"), make_user(db, "chief", Role.admin)
            first = role_requests.ask(db, user=person, message="hi")
            assert role_requests.ask(db, user=person).id == first.id and len(role_requests.pending(db)) == 1
            role_requests.decide(db, request_id=first.id, approve=True, admin=chief)
            db.commit()
            assert person.role == Role.annotator and role_requests.pending(db) == []
            annotation.submit_ranking(db, annotator=person, set_id=ids[0], status="flagged", entries=[])
            db.commit()
            progress = annotation.annotator_progress(db, annotator_id=person.id, per_set=3)
            assert progress == annotation.AnnotatorProgress(left=1, done_today=1)
            assert stats.labels_per_day(db, days=2, now=utcnow())[-1].rankings == 1
    finally:
        engine.dispose()


def test_a_request_note_is_shown_as_text(client: TestClient, db: Session) -> None:
    note = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    role_requests.ask(db, user=make_user(db, "sly"), message=note)
    db.commit()
    make_user(db, "chief", Role.admin)
    login(client, "chief")
    page = client.get("/admin/users").text
    assert note not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
