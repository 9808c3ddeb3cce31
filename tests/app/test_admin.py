"""The admin dashboard, job pages with charts, dataset export in TRL's formats, and data import."""

import json

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Role
from app.services import annotation, chat, feedback, jobs, prompts
from app.settings import Settings
from tests.factories import login, make_user


def admin_session(client: TestClient, db: Session) -> str:
    make_user(db, "chief", Role.admin)
    return login(client, "chief")


def ranked_set(db: Session) -> None:
    """One prompt, three answers, two annotators: a → [1, 1, 2] (a tie), b → [1, 2, 3]."""
    prompts.add_prompts(db, items=[([{"role": "user", "content": "What is 2 plus 2?"}], None)], source="demo")
    prompt_id = db.query(prompts.Prompt).one().id
    cset = annotation.create_set(
        db, prompt_id=prompt_id, answers=[("4", 1), ("four", 1), ("5", 1)], model_version_id=None, params={}, seed=0
    )
    by_text = {c.content: c.id for c in cset.candidates}
    for name, ranks in (("ann-a", {"4": 1, "four": 1, "5": 2}), ("ann-b", {"4": 1, "four": 2, "5": 3})):
        annotation.submit_ranking(
            db,
            annotator=make_user(db, name, Role.annotator),
            set_id=cset.id,
            status="ranked",
            entries=[(by_text[t], r) for t, r in ranks.items()],
        )
    db.commit()


def export(client: TestClient, kind: str) -> list[dict]:
    response = client.get(f"/admin/export/{kind}")
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    return [json.loads(line) for line in response.text.splitlines()]


def test_exports_in_trl_formats(client: TestClient, db: Session) -> None:
    admin_session(client, db)
    ranked_set(db)
    rankings = export(client, "rankings")
    assert len(rankings) == 2 and all(len(r["answers"]) == 3 for r in rankings)
    pairs = export(client, "pairs")
    assert len(pairs) == 2 + 3  # the tie gives no pair: a yields 2 pairs, b yields 3
    assert all(p["chosen"][0]["role"] == "assistant" and p["prompt"][-1]["role"] == "user" for p in pairs)
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs} >= {("4", "5"), ("four", "5")}
    raw = export(client, "raw-rankings")
    assert {r["annotator"] for r in raw} == {"ann-a", "ann-b"} and all(len(r["candidates"]) == 3 for r in raw)
    assert client.get("/admin/export/everything").status_code == 422


def test_dialogue_and_thumb_exports_respect_the_training_switch(client: TestClient, db: Session) -> None:
    admin_session(client, db)
    person = make_user(db, "talker")
    for allow, text in ((True, "shared"), (False, "private")):
        conversation = chat.create_conversation(db, user=person)
        chat.update_conversation(db, user=person, conversation_id=conversation.id, allow_training=allow)
        _, answer = chat.add_user_message(db, user=person, conversation_id=conversation.id, content=text)
        chat.finish_answer(
            db, message_id=answer.id, content=f"re: {text}", finish_reason="stop", model_version_id=None, sampling={}
        )
        feedback.set_feedback(db, user=person, message_id=answer.id, value=-1 if allow else 1)
    db.commit()
    dialogues = export(client, "dialogues")
    assert [d["messages"] for d in dialogues] == [
        [{"role": "user", "content": "shared"}, {"role": "assistant", "content": "re: shared"}]
    ]
    thumbs = export(client, "thumbs")
    assert thumbs == [
        {
            "prompt": [{"role": "user", "content": "shared"}],
            "completion": [{"role": "assistant", "content": "re: shared"}],
            "label": False,
        }
    ]


def test_dashboard_jobs_and_charts(client: TestClient, db: Session) -> None:
    csrf = admin_session(client, db)
    ranked_set(db)
    from app.models import ModelKind, ModelVersion

    db.add(
        ModelVersion(
            name="rm-7",
            kind=ModelKind.reward,
            path="/m",
            training_data={"ranking_id": 42},
            metrics={"val_acc": 0.8, "gate": "wins 0.6"},
        )
    )
    db.commit()
    overview = client.get("/admin")
    assert overview.status_code == 200 and 'id="overview-counts"' in overview.text
    assert "labels per day" in overview.text  # today's two rankings make a trend line
    for section in ("/admin/data", "/admin/jobs", "/admin/models", "/admin/users", "/admin/settings"):
        assert f'href="http://testserver{section}"' in overview.text  # the nav between the pages
    data = client.get("/admin/data")
    assert data.status_code == 200 and "rankings" in data.text and "ann-a" in data.text
    page = client.get("/admin/models")
    assert "all rankings (row ids up to 42)" in page.text and "held-out accuracy: 80.0%" in page.text
    assert "gate: <strong>held back</strong> — wins 0.6" in page.text
    created = client.post(
        "/admin/jobs", data={"type": "reward", "params": '{"steps": 3}', "csrf_token": csrf}, follow_redirects=False
    )
    assert created.status_code == 303
    job_id = int(created.headers["location"].rsplit("/", 1)[1])
    bad = client.post("/admin/jobs", data={"type": "reward", "params": "[1, 2]", "csrf_token": csrf})
    assert bad.status_code == 422
    jobs.claim(db, worker_id="w", lease_s=60)
    jobs.heartbeat(
        db,
        job_id=job_id,
        worker_id="w",
        lease_s=60,
        progress=0.5,
        metrics=[{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.6}],
        log="step 2\n",
    )
    db.commit()
    detail = client.get(f"/admin/jobs/{job_id}")
    assert "<polyline" in detail.text and "loss: 0.9 → 0.6" in detail.text and "step 2" in detail.text
    assert 'id="job-log"' in detail.text and "Yes, cancel job" in detail.text  # Cancel is asked twice
    assert '"steps": 3' in detail.text and "defaults are filled in" in detail.text  # as given, until a worker starts
    partial = client.get(f"/admin/jobs/{job_id}", headers={"HX-Request": "true"})
    assert partial.text.lstrip().startswith("{#") or partial.text.lstrip().startswith("<section")
    assert "<html" not in partial.text
    assert "running" in client.get("/admin/jobs").text


def test_import_prompts_dialogues_and_corpus(client: TestClient, db: Session, settings: Settings) -> None:
    csrf = admin_session(client, db)

    def upload(kind: str, content: bytes):
        return client.post(
            "/admin/import",
            data={"kind": kind, "csrf_token": csrf},
            files={"file": (f"{kind}.jsonl", content)},
            follow_redirects=False,
        )

    assert upload("prompts", b'{"prompt": "Where is Oslo?"}\n').status_code == 303
    bad = upload("dialogues", b'{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert bad.status_code == 422 and "assistant" in bad.text
    assert not (settings.data_dir / "datasets" / "dialogues").exists()
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    response = upload("dialogues", good)
    assert response.status_code == 303 and "1 dialogues" in client.get(response.headers["location"]).text
    assert len(list((settings.data_dir / "datasets" / "dialogues").iterdir())) == 1
    assert upload("corpus", b"Mira lives in Oslo.\n").status_code == 303
    assert upload("corpus", b"\xff\xfe").status_code == 422


def test_model_lineage_on_the_admin_page(client: TestClient, db: Session) -> None:
    """Parents are linked, training data reads as counts and row-id watermarks, and the gate's verdict is shown."""
    from app.models import ModelKind, ModelStatus, ModelVersion

    admin_session(client, db)
    base = ModelVersion(
        name="base-job1", kind=ModelKind.base, path="/m/b", training_data={"data": ["demo"]}, status=ModelStatus.active
    )
    db.add(base)
    db.flush()
    sft = ModelVersion(
        name="sft-job2",
        kind=ModelKind.sft,
        path="/m/s",
        parent_id=base.id,
        status=ModelStatus.active,
        training_data={"conversation_id": 31, "dialogues": 9, "files": ["/data/datasets/d/a.jsonl"], "demo": True},
    )
    db.add(sft)
    db.flush()
    reward = ModelVersion(
        name="reward-job3",
        kind=ModelKind.reward,
        path="/m/r",
        parent_id=sft.id,
        training_data={"ranking_id": 57, "rankings": 6, "feedback_id": 0, "thumbs": 0},
    )
    db.add(reward)
    db.flush()
    policy = ModelVersion(
        name="policy-job4",
        kind=ModelKind.policy,
        path="/m/p",
        parent_id=sft.id,
        training_data={
            "prompt_id": 800,
            "prompts": 640,
            "reward_version_id": reward.id,
            "reference_version_id": sft.id,
        },
        metrics={"win_rate": 0.41, "kl": 2.5, "promoted": False, "gate": "win rate 0.410 is below 0.520"},
    )
    db.add(policy)
    db.commit()

    page = client.get("/admin/models").text
    row = page[page.index(f'id="model-{policy.id}"') :]
    row = row[: row.index("</tr>")]
    assert f'href="http://testserver/admin/models/{sft.id}" class="parent">sft-job2</a>' in row
    assert "640 train-split prompts (row ids up to 800)" in row and "judged by reward model: reward-job3" in row
    assert "gate: <strong>held back</strong> — win rate 0.410 is below 0.520" in row
    assert "6 rankings (row ids up to 57)" in page and "thumbs up/down: none" in page
    assert "9 chats that allow training (row ids up to 31)" in page and "a.jsonl" in page
    assert "/data/datasets" not in page  # file names, not the server's paths

    detail = client.get(f"/admin/models/{policy.id}")
    assert detail.status_code == 200
    ancestors = detail.text[detail.text.index('id="ancestors"') :]
    ancestors = ancestors[: ancestors.index("</ol>")]
    assert ancestors.index("sft-job2") < ancestors.index("base-job1")  # parent first, then its parent
    assert f'href="http://testserver/admin/models/{reward.id}">reward-job3</a>' in detail.text
    assert "Held back</strong>: win rate 0.410 is below 0.520" in detail.text and "0.41" in detail.text
    base_page = client.get(f"/admin/models/{base.id}").text
    assert "no parent version" in base_page and "the demo world&#39;s corpus" in base_page and "sft-job2" in base_page
    assert client.get("/admin/models/999").status_code == 404


def test_lineage_descriptions() -> None:
    from app.services.lineage import describe_training_data, gate_verdict

    recorded = {"ranking_id": 12, "feedback_id": 5, "thumbs": 2, "reward_version_id": 3, "mystery": "x"}
    lines = {i.label: (i.text, i.version_id) for i in describe_training_data(recorded, {3: "rm"})}
    assert lines == {
        "rankings": ("all rankings (row ids up to 12)", None),
        "thumbs up/down": ("2 thumbs up/down (row ids up to 5)", None),
        "judged by reward model": ("rm", 3),
        "mystery": ("x", None),
    }
    assert gate_verdict({"val_acc": 0.8}) is None
    verdict = gate_verdict({"gate": "wins 0.600", "promoted": True, "win_rate": 0.6, "steps": 3})
    assert verdict.promoted and verdict.numbers == {"win_rate": 0.6}


def test_a_source_given_as_a_string_reads_as_one_source_not_its_letters() -> None:
    """The lineage once spelt `corpus: d, e, m, o, , d, i, a, l, …`: a string iterated as a list of sources."""
    from app.services.lineage import describe_training_data
    from app.services.training_data import TrainingData

    for record in (
        TrainingData(corpus="demo dialogues.txt", files="/data/datasets/d/a.jsonl"),  # type: ignore[arg-type]
        TrainingData.from_json({"data": "demo dialogues.txt", "files": "/data/datasets/d/a.jsonl"}),
    ):
        lines = {i.label: i.text for i in describe_training_data(record)}
        assert lines["corpus"] == "demo dialogues.txt" and lines["imported dialogue files"] == "a.jsonl"
    extra = {i.label: i.text for i in describe_training_data({"sources": ["x", "y"], "note": "plain words"})}
    assert extra == {"sources": "x, y", "note": "plain words"}
