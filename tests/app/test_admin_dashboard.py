"""The admin dashboard's job page (effective parameters, ETA, log, wrapped error, few-labels warning), its charts,
formatted metrics, the lineage graph of a model, and the overview's trends."""

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.jobs.params import effective_params, label_count
from app.models import JobStatus, ModelKind, ModelStatus, ModelVersion, Role
from app.services import jobs, lineage, stats
from app.web.charts import line_chart, nice_ticks, reward_against_kl, smoothed
from app.web.formatting import duration, format_metrics, headline
from tests.factories import login, make_user


def admin(client: TestClient, db: Session) -> str:
    make_user(db, "chief", Role.admin)
    return login(client, "chief")


def running_reward_job(db: Session, *, rankings: int, error: str | None = None) -> int:
    job = jobs.enqueue(db, type="reward", params={"steps": 30})
    jobs.claim(db, worker_id="w", lease_s=60)
    ran_with = {"steps": 30, "lr": 3e-4, "rankings": {"records": rankings}, "thumbs": {"records": 2}, "sft": "/m/s"}
    points = [{"step": s, "max_steps": 30, "loss": 1 / s, "eta_s": 80.0 - s} for s in (1, 2)]
    jobs.heartbeat(db, job_id=job.id, worker_id="w", lease_s=60, metrics=points, log="step 2/30\n", params=ran_with)
    if error:
        jobs.finish(db, job_id=job.id, worker_id="w", status=JobStatus.failed, error=error)
    db.commit()
    return job.id


def test_the_job_page_shows_what_it_ran_with_its_eta_log_and_a_few_labels_warning(
    client: TestClient, db: Session
) -> None:
    admin(client, db)
    page = client.get(f"/admin/jobs/{running_reward_job(db, rankings=6)}").text
    params = page[page.index('id="job-params"') : page.index("</table>", page.index('id="job-params"'))]
    assert '<th scope="row">lr</th><td>0.0003</td>' in params  # a default, filled in
    assert '<th scope="row">steps</th><td>30 <span class="badge">set</span>' in params  # given by the admin
    assert "6 records" in params and "/m/s" in params
    assert "about 1m 18s left" in page and "step 2/30" in page
    assert "only 8 labels" in page and 'id="few-labels"' in page
    assert "· 1m 18s left" in client.get("/admin/jobs").text  # the jobs table too, polled or not
    assert "· 1m 18s left" in client.get("/admin/jobs", headers={"HX-Request": "true"}).text
    job = client.get("/api/v1/jobs").json()[0]  # REST has them too
    assert job["effective_params"]["rankings"] == {"records": 6} and job["params"] == {"steps": 30}

    enough = client.get(f"/admin/jobs/{running_reward_job(db, rankings=60)}").text
    assert 'id="few-labels"' not in enough


def test_a_failed_job_shows_its_whole_traceback_wrapped_and_no_eta(client: TestClient, db: Session) -> None:
    admin(client, db)
    long_line = "ValueError: " + "x" * 400
    page = client.get(f"/admin/jobs/{running_reward_job(db, rankings=60, error=long_line)}").text
    assert f'<pre class="traceback error" id="job-error">{long_line}</pre>' in page  # all of it, in a wrapping block
    assert "left</span>" not in page and "Yes, cancel job" not in page  # finished: no ETA, nothing to cancel


def test_a_queued_reward_job_warns_from_the_labels_there_are(client: TestClient, db: Session) -> None:
    admin(client, db)
    job = jobs.enqueue(db, type="reward")
    db.commit()
    page = client.get(f"/admin/jobs/{job.id}").text
    assert "would train on only 0 labels" in page
    assert "trainer's defaults are filled in" in page and 'id="few-labels-now"' in client.get("/admin/jobs").text
    assert 'id="few-labels"' not in client.get(f"/admin/jobs/{jobs.enqueue(db, type='pretrain').id}").text


def test_effective_params_count_records_and_hide_the_output_directory() -> None:
    from ml.train.reward import RewardConfig

    config = RewardConfig(sft="/m/s", out="/tmp/out", rankings=[{"a": 1}] * 3, thumbs=[{"b": 2}])
    params = effective_params(config, sft_version_id=4)
    assert params["rankings"] == {"records": 3} and params["thumbs"] == {"records": 1} and params["sft_version_id"] == 4
    assert params["lr"] == 3e-4 and params["batch_size"] == 8 and "out" not in params and "progress" not in params
    assert label_count(params) == 4 and label_count({"steps": 3}) is None and label_count(None) is None


def test_charts_have_axes_with_round_numbers_and_a_smoothed_line() -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 97) == [20, 40, 60, 80]
    assert smoothed([2.0] * 5) == [2.0] * 5  # a constant stays constant, ends included
    assert smoothed([0.0, 1.0, 2.0, 3.0, 4.0], half=1)[1:4] == [1.0, 2.0, 3.0]  # no lag behind a trend
    noisy = [(float(s), 1.0 + (0.5 if s % 2 else -0.5)) for s in range(1, 41)]
    chart = line_chart("loss", noisy)
    assert [t.label for t in chart.x_ticks] == ["10", "20", "30", "40"] and chart.smooth and not chart.dots
    smooth_ys = [float(p.split(",")[1]) for p in chart.smooth.split()]
    raw_ys = [float(p.split(",")[1]) for p in chart.points.split()]
    assert max(smooth_ys) - min(smooth_ys) < (max(raw_ys) - min(raw_ys)) / 2  # the smoothed line is calmer
    assert line_chart("x", [(1, 1.0)]) is None
    few = line_chart("x", [(1, 1.0), (2, 2.0)])
    assert few.dots and not few.smooth
    per_day = line_chart("labels", [(float(d), d % 3) for d in range(-13, 1)], counts=True)
    assert not per_day.smooth and all(float(t.label).is_integer() for t in per_day.x_ticks)  # days are whole
    nothing_yet = line_chart("labels", [(-1, 0), (0, 0)], counts=True)
    assert nothing_yet.y_ticks[0].label == "0" and nothing_yet.y_ticks[0].at == nothing_yet.bottom


def test_rl_jobs_chart_reward_against_kl(client: TestClient, db: Session) -> None:
    rl = [{"step": s, "reward": 0.1 * s, "kl": 0.05 * s * s} for s in range(1, 6)]
    chart = reward_against_kl(rl)
    assert chart.x_label == "KL" and chart.dots and chart.n == 5 and chart.first == 0.1
    assert reward_against_kl([{"step": 1, "loss": 2.0}]) is None
    admin(client, db)
    job = jobs.enqueue(db, type="rl")
    jobs.claim(db, worker_id="w", lease_s=60)
    jobs.heartbeat(db, job_id=job.id, worker_id="w", lease_s=60, metrics=rl)
    db.commit()
    page = client.get(f"/admin/jobs/{job.id}").text
    assert "reward against KL against KL" not in page and "reward against KL" in page
    assert '<text x="' in page and 'class="x-tick"' in page  # numbers on the axes


def test_metrics_are_named_rounded_and_internals_hidden() -> None:
    shown = format_metrics(
        {"rank": 0, "world_size": 1, "val_acc": 0.8123, "elapsed_s": 80.4, "params": 1234567, "loss": 2.345678}
    )
    assert [(m.label, m.text) for m in shown] == [
        ("final training loss", "2.346"),
        ("held-out accuracy", "81.2%"),
        ("parameters", "1,234,567"),
        ("training time", "1m 20s"),
    ]
    assert duration(3725) == "1h 02m" and duration(7) == "7s"
    row = headline({"loss": 0.5, "val_acc": 0.7, "heldout_acc": 0.75, "rank": 0, "gate": "x", "promoted": True})
    assert [(m.label, m.text) for m in row] == [
        ("held-out human-label accuracy", "75.0%"),
        ("held-out accuracy", "70.0%"),
        ("final training loss", "0.5"),
    ]


def test_model_page_draws_the_lineage_graph_with_base_and_adapter(client: TestClient, db: Session) -> None:
    admin(client, db)
    base = ModelVersion(name="base-1", kind=ModelKind.base, path="/b", training_data={"data": "demo"})
    db.add(base)
    db.flush()
    sft = ModelVersion(name="sft-2", kind=ModelKind.sft, path="/s", parent_id=base.id, status=ModelStatus.active)
    db.add(sft)
    db.flush()
    reward = ModelVersion(name="reward-3", kind=ModelKind.reward, path="/r", parent_id=sft.id)
    db.add(reward)
    db.flush()
    adapter = {"rank": 8, "alpha": 16, "targets": ["q", "v"]}
    policy = ModelVersion(
        name="policy-4",
        kind=ModelKind.policy,
        path="/p",
        parent_id=sft.id,
        training_data={"reward_version_id": reward.id, "adapter": adapter, "adapter_base_version_id": sft.id},
    )
    db.add(policy)
    db.commit()
    graph = lineage.graph(db, policy)
    assert [n.name for n in graph.chain] == ["base-1", "sft-2", "policy-4"] and graph.chain[-1].current
    assert graph.chain[-1].note == "sft-2 + LoRA adapter (rank 8), served merged"
    assert [(n.name, n.note) for n in graph.references] == [("reward-3", "judged by reward model")]
    page = client.get(f"/admin/models/{policy.id}").text
    drawn = page[page.index('id="lineage-graph"') :]
    assert drawn.index("base-1") < drawn.index("sft-2") < drawn.index("policy-4") < drawn.index("reward-3")
    assert "sft-2 + LoRA adapter (rank 8)" in drawn
    sft_page = client.get(f"/admin/models/{sft.id}").text
    assert "trained from it" in sft_page and "policy-4" in sft_page
    assert "corpus</th>\n    <td>the demo world&#39;s corpus" in client.get(f"/admin/models/{base.id}").text


def test_trends_count_labels_per_day_and_score_served_policies(db: Session) -> None:
    from app.models import utcnow
    from app.services import annotation, prompts

    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    days = stats.labels_per_day(db, days=3, now=now)
    assert [d.day.day for d in days] == [1, 2, 3] and all(d.total == 0 for d in days)
    prompts.add_prompts(db, items=[([{"role": "user", "content": "Hi?"}], None)], source="demo")
    prompt_id = db.query(prompts.Prompt).one().id
    cset = annotation.create_set(
        db, prompt_id=prompt_id, answers=[("a", 1), ("b", 1)], model_version_id=None, params={}
    )
    annotation.submit_ranking(
        db, annotator=make_user(db, "ann", Role.annotator), set_id=cset.id, status="skipped", entries=[]
    )
    today = stats.labels_per_day(db, days=2, now=utcnow())
    assert [(d.rankings, d.thumbs) for d in today] == [(0, 0), (1, 0)]
    assert stats.labels_per_day(db, days=2, now=utcnow() + timedelta(days=1))[0].rankings == 1  # yesterday, then
    for i, score in enumerate((0.4, 0.55)):
        db.add(
            ModelVersion(
                name=f"policy-{i}",
                kind=ModelKind.policy,
                path=f"/p{i}",
                activated_at=now - timedelta(days=1 - i),
                metrics={"win_rate": score, "reward_candidate": score * 10},
            )
        )
    db.add(ModelVersion(name="never-served", kind=ModelKind.policy, path="/x", metrics={"reward_candidate": 9.0}))
    db.commit()
    scores = stats.policy_scores(db)
    assert [(s.name, s.metric, s.value) for s in scores] == [
        ("policy-0", "reward_candidate", 4.0),
        ("policy-1", "reward_candidate", 5.5),
    ]
