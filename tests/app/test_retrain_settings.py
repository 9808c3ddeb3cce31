"""The automatic retraining rule as a runtime setting: set on the admin page (with and without htmx) and through REST,
stored in `app_settings` over the environment default, and read by the worker at every poll."""

import secrets
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.worker import Worker
from app.models import AppSetting, Job, JobStatus, Role
from app.services import annotation, app_settings, prompts, tokens
from app.settings import Settings
from app.web.main import create_app
from tests.factories import login, make_user


def add_labels(session: Session, n: int, start: int = 0) -> None:
    """n new labels: skipped rankings by distinct annotators on one candidate set count like any ranking."""
    if start == 0:
        prompts.add_prompts(session, items=[([{"role": "user", "content": "Hi?"}], None)], source="demo")
        annotation.create_set(session, prompt_id=1, answers=[("a", 1), ("b", 1)], model_version_id=None, params={})
    for i in range(start, start + n):
        annotator = make_user(session, f"ann{i}", Role.annotator)
        annotation.submit_ranking(session, annotator=annotator, set_id=1, status="skipped", entries=[])
    session.commit()


def test_set_on_the_admin_page_without_javascript(client: TestClient, db: Session) -> None:
    make_user(db, "chief", Role.admin)
    csrf = login(client, "chief")
    page = client.get("/admin/settings")
    assert 'id="retrain-state">off<' in page.text and 'name="auto_retrain_after"' in page.text
    assert "from FLYWHEEL_AUTO_RETRAIN_AFTER" in page.text

    saved = client.post(
        "/admin/settings", data={"auto_retrain_after": "25", "csrf_token": csrf}, follow_redirects=False
    )
    assert saved.status_code == 303
    page = client.get(saved.headers["location"])
    assert "Automatic retraining: after 25 new labels" in page.text
    assert 'id="retrain-state">after 25 new labels<' in page.text and "set by chief" in page.text
    db.expire_all()
    row = db.get(AppSetting, app_settings.AUTO_RETRAIN_AFTER)
    assert row.value == 25 and row.updated_by.username == "chief"

    for bad, message in (("-3", "between 0 (off) and 1000000"), ("lots", "whole number"), ("2000000", "between")):
        response = client.post("/admin/settings", data={"auto_retrain_after": bad, "csrf_token": csrf})
        assert response.status_code == 422 and message in response.text, bad
        assert "<html" in response.text and f'value="{bad}"' in response.text and 'aria-invalid="true"' in response.text
    db.expire_all()
    assert db.get(AppSetting, app_settings.AUTO_RETRAIN_AFTER).value == 25  # unchanged by the bad values

    forged = client.post("/admin/settings", data={"auto_retrain_after": "1"}, follow_redirects=False)
    assert forged.status_code == 403
    off = client.post("/admin/settings", data={"auto_retrain_after": "0", "csrf_token": csrf})
    assert "Automatic retraining: off" in off.text and 'id="retrain-state">off<' in off.text


def test_set_on_the_admin_page_with_htmx(client: TestClient, db: Session) -> None:
    make_user(db, "chief", Role.admin)
    csrf = login(client, "chief")
    add_labels(db, 2)
    htmx = {"HX-Request": "true", "X-CSRF-Token": csrf}
    saved = client.post("/admin/settings", data={"auto_retrain_after": "4"}, headers=htmx)
    assert saved.status_code == 200 and "<html" not in saved.text
    assert '<section id="retrain"' in saved.text
    assert "saved" in saved.text and 'id="labels-since">2<' in saved.text and "after 4 new labels" in saved.text
    bad = client.post("/admin/settings", data={"auto_retrain_after": "-1"}, headers=htmx)
    assert bad.status_code == 422 and 'id="retrain-error"' in bad.text and "<html" not in bad.text


def test_rest_get_and_patch(tmp_path: Path, db: Session, client: TestClient) -> None:
    admin = make_user(db, "chief", Role.admin)
    _, secret = tokens.create_token(db, user=admin, name="ops")
    _, user_secret = tokens.create_token(db, user=make_user(db, "someone"), name="mine")
    db.commit()
    api = {"Authorization": f"Bearer {secret}"}
    got = client.get("/api/v1/settings", headers=api).json()
    assert got == {
        "auto_retrain_after": 0,
        "source": "environment",
        "updated_at": None,
        "updated_by": None,
        "labels_since_last_reward_model": 0,
    }

    patched = client.patch("/api/v1/settings", json={"auto_retrain_after": 12}, headers=api)
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["auto_retrain_after"] == 12 and body["source"] == "database" and body["updated_by"] == "chief"
    assert client.get("/api/v1/settings", headers=api).json()["auto_retrain_after"] == 12
    assert client.patch("/api/v1/settings", json={}, headers=api).json()["auto_retrain_after"] == 12  # no change

    for bad in (
        {"auto_retrain_after": -1},
        {"auto_retrain_after": "12"},
        {"auto_retrain_after": 1.5},
        {"auto_retrain_after": 10**7},
        {"auto_retrain_after_typo": 3},
    ):
        response = client.patch("/api/v1/settings", json=bad, headers=api)
        assert response.status_code == 422 and set(response.json()) == {"detail"}, bad
        assert isinstance(response.json()["detail"], str)
    user_api = {"Authorization": f"Bearer {user_secret}"}
    assert client.get("/api/v1/settings", headers=user_api).status_code == 403
    assert client.patch("/api/v1/settings", json={"auto_retrain_after": 1}, headers=user_api).status_code == 403
    assert client.get("/api/v1/settings", headers=api).json()["auto_retrain_after"] == 12


def test_the_environment_is_the_default_until_an_admin_sets_a_value(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=sqlite_url, secret_key=secrets.token_urlsafe(40), auto_retrain_after=7
    )
    migrate.upgrade(sqlite_url)
    app = create_app(settings)
    with app.state.session_factory() as db:
        admin = make_user(db, "chief", Role.admin)
        _, secret = tokens.create_token(db, user=admin, name="ops")
        db.commit()
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/api/v1/settings").json()["auto_retrain_after"] == 7
    assert client.patch("/api/v1/settings", json={"auto_retrain_after": 0}).json()["source"] == "database"
    assert client.get("/api/v1/settings").json()["auto_retrain_after"] == 0  # 0 set by an admin wins over 7


def test_the_worker_reads_the_rule_from_the_database_at_every_poll(tmp_path: Path, any_db_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=any_db_url, secret_key=secrets.token_urlsafe(40), auto_retrain_after=0
    )
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    factory = make_session_factory(engine)
    worker = Worker(settings)

    def queued() -> list[str]:
        with factory() as session:
            return [j.type for j in session.query(Job).filter(Job.status == JobStatus.queued).order_by(Job.id)]

    with factory() as session:
        add_labels(session, 2)
    worker._maybe_trigger()
    assert queued() == []  # the environment says off and no admin has set a value
    with transaction(factory) as session:
        app_settings.set_auto_retrain_after(session, value=3, user=None)
    worker._maybe_trigger()
    assert queued() == []  # 2 < 3
    with factory() as session:
        add_labels(session, 1, start=2)
    worker._maybe_trigger()
    assert queued() == ["reward", "rl"]
    with factory() as session:
        jobs = session.query(Job).order_by(Job.id).all()
        assert jobs[0].priority > jobs[1].priority  # reward runs first
    worker._maybe_trigger()
    assert queued() == ["reward", "rl"]  # not twice while they wait
    worker.factory.kw["bind"].dispose()
    engine.dispose()
