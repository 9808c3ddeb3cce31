"""First start: the demo model trains as a `bootstrap` job in the worker while the server already answers; the home
page shows the stage, step and time left, and enables chat once the model is served; Ctrl-C stops it all cleanly."""

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.bootstrap import enqueue_bootstrap, setup_status
from app.jobs.ranks import free_cores
from app.jobs.worker import Worker, WorkerConfig
from app.models import Job, JobStatus, ModelKind, ModelStatus, ModelVersion, Role
from app.services import jobs
from app.settings import Settings
from tests.app.faults import free_port, wait_for
from tests.factories import app_with_active_model, login, make_user, register_active_model, wait_for_model

TINY = {"pretrain_steps": 20, "sft_steps": 4, "demo_docs": 300, "n_layer": 2, "n_embd": 32, "pretrain_batch": 4}
HTMX = {"HX-Request": "true"}


@pytest.fixture
def factory(settings: Settings) -> sessionmaker[Session]:
    migrate.upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url))


def test_the_worker_trains_the_bootstrap_job_and_registers_both_models_active(settings: Settings, factory) -> None:
    with transaction(factory) as session:
        job_id = enqueue_bootstrap(session, **TINY).id
        assert enqueue_bootstrap(session) is None  # one is queued already
        assert setup_status(session).state == "queued"
    Worker(settings, WorkerConfig(poll_s=0.1)).run(once=True)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded and job.progress == 1.0, job.error
        assert {p["stage"] for p in job.metrics if "stage" in p} == {0, 1}  # pretraining, then fine-tuning
        assert "held-out greedy gold" in job.log_tail
        base, chat = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        assert (base.name, base.kind, chat.name, chat.kind) == ("demo-base", ModelKind.base, "demo-sft", ModelKind.sft)
        assert base.status == chat.status == ModelStatus.active and chat.parent_id == base.id
        assert base.job_id == chat.job_id == job_id
        assert 0 <= chat.metrics["heldout_gold_greedy"] <= 1 and 0 <= chat.metrics["heldout_correct_greedy"] <= 1
        assert Path(chat.path).is_dir() and Path(chat.path).name == f"demo-sft-job{job_id}"
        assert enqueue_bootstrap(session) is None  # a model is served: nothing to do
        assert setup_status(session).state == "trained"


def test_a_failed_bootstrap_is_queued_again_at_the_next_start(factory) -> None:
    with transaction(factory) as session:
        job = enqueue_bootstrap(session, **TINY)
        jobs.claim(session, worker_id="w", lease_s=60)
        jobs.finish(session, job_id=job.id, worker_id="w", status=JobStatus.failed, error="RuntimeError: out of disk")
    with transaction(factory) as session:
        status = setup_status(session)
        assert (status.state, status.error) == ("failed", "RuntimeError: out of disk")
        again = enqueue_bootstrap(session)
        assert again is not None and again.id != job.id and again.params["sft_steps"] > TINY["sft_steps"]


def test_free_cores_leaves_the_busy_ones_and_at_least_one() -> None:
    assert free_cores(cores=8, load=0.2) == 8
    assert free_cores(cores=8, load=5.6) == 2
    assert free_cores(cores=2, load=7.0) == 1
    assert free_cores(cores=2, load=2.1, own=2) == 2  # the load is this process's own threads: both cores are free
    assert free_cores(cores=2, load=2.9, own=2) == 1
    assert 1 <= free_cores() <= (os.cpu_count() or 1)


def running_bootstrap(session: Session, *points: dict) -> int:
    job = enqueue_bootstrap(session, pretrain_steps=300, sft_steps=600)
    jobs.claim(session, worker_id="w", lease_s=60)
    jobs.heartbeat(session, job_id=job.id, worker_id="w", lease_s=60, metrics=list(points))
    session.commit()
    return job.id


def test_the_home_page_shows_the_stage_step_and_time_left_and_polls(app, db: Session) -> None:
    make_user(db, "ann", Role.user)
    job_id = running_bootstrap(db, {"stage": 0, "step": 120, "max_steps": 300, "eta_s": 75.4, "loss": 1.5})
    with TestClient(app) as client:  # serves no model: nothing is active
        home = client.get("/")
        assert home.status_code == 200
        html = home.text
        assert "Setting up: training the demo model" in html and f"job {job_id}" in html
        assert "Pretraining (300 steps)" in html and "Fine-tuning (600 steps)" in html
        assert 'max="300" value="120"' in html and "step 120 / 300" in html and "about 1 min 15 s left" in html
        assert 'hx-get="http://testserver/setup" hx-trigger="every 2s"' in html
        login(client, "ann")
        html = client.get("/").text
        card = html[html.index('<li id="chat-card">') :].split("</li>")[0]
        assert "Opens when the model is ready" in card and "href" not in card

        with transaction(app.state.session_factory) as session:
            jobs.heartbeat(
                session,
                job_id=job_id,
                worker_id="w",
                lease_s=60,
                metrics=[{"stage": 1, "step": 30, "max_steps": 600, "eta_s": 9}],
            )
        panel = client.get("/setup", headers=HTMX)
        assert panel.status_code == 200 and "<html" not in panel.text  # the fragment, for htmx to swap
        assert '<li class="done">' in panel.text and '<li class="current">' in panel.text
        assert "step 30 / 600" in panel.text and "about 9 s left in this stage" in panel.text
        assert "<html" in client.get("/setup").text  # without htmx: the home page


def test_a_failed_bootstrap_shows_its_error_and_stops_polling(app, db: Session) -> None:
    job_id = running_bootstrap(db)
    jobs.finish(db, job_id=job_id, worker_id="w", status=JobStatus.failed, error="RuntimeError: <disk> full")
    db.commit()
    with TestClient(app) as client:
        html = client.get("/").text
        assert "could not be trained" in html and "RuntimeError: &lt;disk&gt; full" in html  # escaped
        assert "every 2s" not in html


def test_a_trained_model_not_yet_loaded_here_shows_loading(app, db: Session, model_dir: Path) -> None:
    register_active_model(db, model_dir)
    client = TestClient(app)  # no lifespan: this process never loads it
    panel = client.get("/setup", headers=HTMX).text
    assert "loading the model" in panel and "every 2s" in panel


def test_chat_enables_itself_once_the_model_is_served(settings: Settings, model_dir: Path) -> None:
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db:
        make_user(db, "ann", Role.user)
    with TestClient(app) as client:
        wait_for_model(app)
        login(client, "ann")
        panel = client.get("/setup", headers=HTMX).text  # the last poll of a page opened while it trained
        assert "The demo model is ready" in panel and "every 2s" not in panel
        card = panel[panel.index('<li id="chat-card" hx-swap-oob="true">') :].split("</li>")[0]
        assert '<a href="http://testserver/chat">Chat</a>' in card
        html = client.get("/").text  # a page opened now: no panel, chat open
        card = html[html.index('<li id="chat-card">') :].split("</li>")[0]
        assert '<section id="setup" hidden>' in html and '<a href="http://testserver/chat">Chat</a>' in card


def test_serve_answers_at_once_while_the_bootstrap_job_trains_and_ctrl_c_stops_it_cleanly(tmp_path: Path) -> None:
    """A fresh data directory: /healthz and / answer while the worker trains the demo model; SIGINT to the process
    group (Ctrl-C in a terminal) stops the server, the worker and the training, exit code 0, and the job goes back
    to the queue for the next start."""
    port, database = free_port(), tmp_path / "app.db"
    env = {
        **os.environ,
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{database}",
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "FLYWHEEL_SECRET_KEY": secrets.token_urlsafe(40),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "app.cli", "serve", "--no-access-log", "--port", str(port)]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    factory = make_session_factory(make_engine(f"sqlite:///{database}"))

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def training() -> bool:
        with factory() as session:
            job = session.scalar(select(Job).where(Job.type == "bootstrap"))
            return job is not None and job.status == JobStatus.running and any("stage" in p for p in job.metrics)

    try:
        wait_for(healthy, 60, "/healthz", every=0.2)
        wait_for(training, 300, "the bootstrap job's first progress point", every=0.5)
        assert healthy()
        home = httpx.get(url, timeout=10)
        assert home.status_code == 200 and "Setting up: training the demo model" in home.text
        assert "step " in home.text
        os.killpg(server.pid, signal.SIGINT)
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()
    assert server.returncode == 0, err[-3000:]
    assert "No model yet: the worker trains it now" in err and "KeyboardInterrupt" not in err, err[-3000:]
    with factory() as session:
        job = session.scalar(select(Job).where(Job.type == "bootstrap"))
        assert job.status == JobStatus.queued, (job.status, job.error)  # released, not failed: the next start runs it
        assert session.scalar(select(ModelVersion)) is None


def test_the_admin_sees_the_bootstrapped_models_held_out_greedy_gold(app, db: Session, model_dir: Path) -> None:
    make_user(db, "root", Role.admin)
    version = register_active_model(db, model_dir, name="demo-sft")
    version.metrics = {"heldout_gold_greedy": 0.451, "heldout_correct_greedy": 0.4062}
    db.commit()
    with TestClient(app) as client:
        login(client, "root")
        page = client.get(f"/admin/models/{version.id}").text
        assert "held-out gold score (greedy answers)" in page and "0.451" in page
        assert "held-out questions answered right (greedy)" in page and "40.6%" in page
