"""The rl job's over-optimisation watch: it samples the policy on held-out prompts, judged by gold in the demo world,
and the job page plots proxy, judge and agreement against KL, with a warning when the watch raises its flag."""

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Job, JobStatus, ModelKind, ModelVersion
from app.services import jobs
from app.settings import Settings
from tests.app.test_admin import admin_session
from tests.app.test_training_jobs import SMALL, collect_labels, factory, run  # noqa: F401 (factory: a fixture)


def test_the_rl_job_watches_its_policy_with_gold_as_the_judge(settings: Settings, factory) -> None:  # noqa: F811
    collect_labels(factory)
    assert run(settings, factory, "reward", **SMALL).status == JobStatus.succeeded
    rl_job = run(
        settings,
        factory,
        "rl",
        steps=3,
        watch_every=1,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=8,
        gate_prompts=4,
    )
    assert rl_job.status == JobStatus.succeeded, rl_job.error
    watched = [m for m in rl_job.metrics if "watch_proxy" in m]
    assert [m["step"] for m in watched] == [1, 2, 3]
    assert all({"kl", "watch_judge", "overopt"} <= m.keys() and 0 <= m["watch_judge"] <= 1 for m in watched)
    with factory() as db:
        policy = db.query(ModelVersion).filter_by(kind=ModelKind.policy).one()
        assert policy.metrics["watch_judge_name"] == "gold (demo world)" and "watch_proxy" in policy.metrics
    off = run(settings, factory, "rl", steps=1, watch_every=0, prompts_per_step=2, max_new_tokens=8, gate_prompts=4)
    assert off.status == JobStatus.succeeded, off.error
    assert not any("watch_proxy" in m for m in off.metrics)


def test_the_job_page_plots_the_watch_against_kl_and_warns(client: TestClient, db: Session) -> None:
    csrf = admin_session(client, db)
    created = client.post(
        "/admin/jobs", data={"type": "rl", "params": "{}", "csrf_token": csrf}, follow_redirects=False
    )
    job_id = int(created.headers["location"].rsplit("/", 1)[1])
    jobs.claim(db, worker_id="w", lease_s=60)
    points = [
        {"step": 10, "kl": 1.0, "watch_proxy": 0.1, "watch_judge": 0.40, "watch_agreement": 0.8},
        {"step": 20, "kl": 2.0, "watch_proxy": 0.3, "watch_judge": 0.41, "watch_agreement": 0.7},
    ]
    jobs.heartbeat(db, job_id=job_id, worker_id="w", lease_s=60, progress=0.5, metrics=points, log="")
    db.commit()
    page = client.get(f"/admin/jobs/{job_id}").text
    assert "held-out proxy reward against KL: 0.1 → 0.3" in page and "agreement against KL" in page
    assert "Over-optimisation watch" not in page  # two points: no trend yet
    third = {"step": 30, "kl": 3.0, "watch_proxy": 0.5, "watch_judge": 0.41, "watch_agreement": 0.55}
    jobs.heartbeat(db, job_id=job_id, worker_id="w", lease_s=60, progress=0.7, metrics=[third], log="")
    db.commit()
    page = client.get(f"/admin/jobs/{job_id}").text
    assert "Over-optimisation watch: possible over-optimisation (steps 10-30, KL 1.00 -&gt; 3.00)" in page
    assert db.get(Job, job_id).status == JobStatus.running
