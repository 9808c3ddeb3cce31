"""Jobs through REST with an admin token: create, list, get, cancel; bad input changes nothing."""

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Role
from app.services import tokens
from app.settings import Settings
from tests.factories import db_snapshot, make_user


def admin_client(client: TestClient, db: Session) -> TestClient:
    admin = make_user(db, "ops", Role.admin)
    _, secret = tokens.create_token(db, user=admin, name="ops")
    db.commit()
    return TestClient(client.app, headers={"Authorization": f"Bearer {secret}"})


def test_job_lifecycle_through_rest(client: TestClient, db: Session) -> None:
    api = admin_client(client, db)
    created = api.post("/api/v1/jobs", json={"type": "reward", "params": {"epochs": 1}})
    assert created.status_code == 201
    job = created.json()
    assert job["status"] == "queued" and job["params"] == {"epochs": 1}
    assert [j["id"] for j in api.get("/api/v1/jobs").json()] == [job["id"]]
    assert api.get(f"/api/v1/jobs/{job['id']}").json()["type"] == "reward"
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    again = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert api.get("/api/v1/jobs", params={"status": "queued"}).json() == []


def test_bad_job_requests_are_4xx_and_change_nothing(client: TestClient, db: Session, settings: Settings) -> None:
    api = admin_client(client, db)
    api.get("/api/v1/me")  # records the token's last use (to the minute), so that the snapshot below is stable
    before = db_snapshot(settings.resolved_database_url)
    bad_type = api.post("/api/v1/jobs", json={"type": "nonsense"})
    assert bad_type.status_code == 422 and "unknown job type" in bad_type.json()["detail"]
    assert api.post("/api/v1/jobs", json={"type": "rl", "surprise": 1}).status_code == 422
    assert (
        api.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    )
    assert api.get("/api/v1/jobs/999").status_code == 404
    assert api.get("/api/v1/jobs", params={"status": "sleeping"}).status_code == 422
    assert db_snapshot(settings.resolved_database_url) == before
