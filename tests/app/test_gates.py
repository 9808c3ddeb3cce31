"""Held-out human labels and the two gates: rankings of held-out prompts never reach training and score every reward
model; a reward model needs enough labels and held-out accuracy no worse than the active one's; a policy is judged
by a reward model that did not train it, on the lower bound of its win rate's interval.

The decisions and the interval are pure functions, checked on worked numbers; the jobs run tiny models."""

import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.bootstrap import bootstrap_demo_model, seed_demo_prompts
from app.jobs.gate import Interval, bootstrap_interval, decide, decide_reward
from app.jobs.worker import Worker, WorkerConfig
from app.models import (
    CandidateSet,
    Job,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Prompt,
    PromptSource,
    Ranking,
    Role,
    Split,
    User,
)
from app.services import annotation, chat, datasets, feedback, jobs, prompts
from app.settings import Settings
from app.web.main import create_app
from ml.demo.world import World
from tests.factories import login, make_user

# ---- the interval and the decisions, on numbers ------------------------------------------------------------------


def test_the_bootstrap_interval_resamples_whole_groups() -> None:
    assert bootstrap_interval([]) is None and bootstrap_interval([(0, 0)]) is None
    same = bootstrap_interval([(3, 4), (6, 8), (1.5, 2)])
    assert (same.estimate, same.low, same.high, same.trials, same.groups) == (0.75, 0.75, 0.75, 14, 3)
    # 20 single trials, half right: the normal approximation's 90% interval is 0.5 +- 1.645 * sqrt(0.25 / 20).
    coin = bootstrap_interval([(1, 1)] * 10 + [(0, 1)] * 10, confidence=0.9)
    half_width = 1.645 * math.sqrt(0.25 / 20)
    assert (
        coin.estimate == 0.5
        and abs(coin.low - (0.5 - half_width)) < 0.04
        and abs(coin.high - (0.5 + half_width)) < 0.04
    )
    assert coin == bootstrap_interval([(1, 1)] * 10 + [(0, 1)] * 10, confidence=0.9)  # seeded
    # The same 200 pairs, right or wrong a set at a time (correlated) rather than one by one: a wider interval.
    clustered = bootstrap_interval([(10, 10)] * 10 + [(0, 10)] * 10)
    independent = bootstrap_interval([(1, 1)] * 100 + [(0, 1)] * 100)
    assert clustered.estimate == independent.estimate == 0.5
    assert clustered.high - clustered.low > 2.5 * (independent.high - independent.low)
    wider = bootstrap_interval([(1, 1)] * 10 + [(0, 1)] * 10, confidence=0.99)
    assert wider.low < coin.low and wider.high > coin.high


def test_reward_gate_decisions_on_worked_numbers() -> None:
    good = Interval(0.80, 0.70, 0.88, trials=60, groups=20)
    worse = Interval(0.60, 0.50, 0.68, trials=60, groups=20)
    few = decide_reward(labels=19, min_labels=20, candidate=good, active=worse)
    assert not few.promote and few.reason == "trained on 19 labels, fewer than the 20 required"
    assert few.metrics == {"gate_labels": 19, "gate_min_labels": 20}
    assert decide_reward(labels=20, min_labels=20, candidate=good, active=worse).promote
    held = decide_reward(labels=50, min_labels=20, candidate=worse, active=good)
    assert (
        not held.promote and "0.600 [0.500, 0.680]" in held.reason and "below the active model's 0.800" in held.reason
    )
    # Non-inferiority: worse by less than its noise (its upper bound reaches the active one's estimate) passes.
    close = Interval(0.75, 0.62, 0.80, trials=60, groups=20)
    assert decide_reward(labels=50, min_labels=20, candidate=close, active=good).promote
    # No active model: chance is the baseline.
    coin = Interval(0.30, 0.20, 0.45, trials=30, groups=10)
    assert not decide_reward(labels=50, min_labels=20, candidate=coin, active=None).promote
    assert "no worse than chance" in decide_reward(labels=50, min_labels=20, candidate=good, active=None).reason
    # Too few held-out sets (or none): the label count alone decides, and the reason says so.
    for candidate in (None, Interval(0.0, 0.0, 0.0, trials=4, groups=4)):
        early = decide_reward(labels=20, min_labels=20, candidate=candidate, active=good)
        assert early.promote and "promoted on the label count" in early.reason


def test_the_policy_gate_promotes_on_the_win_rates_lower_bound() -> None:
    base = {
        "win_rate": 0.6,
        "win_rate_low": 0.53,
        "win_rate_high": 0.67,
        "kl": 1.0,
        "ppl_candidate": 2,
        "ppl_active": 2,
    }
    limits = {"gate_margin": 0.02, "kl_budget": 5.0, "ppl_tolerance": 1.0}
    passed = decide(base, **limits)
    assert passed.promote and passed.reason.startswith("wins 0.600 (lower bound 0.530)")
    held = decide({**base, "win_rate_low": 0.51}, **limits)
    assert not held.promote
    assert held.reason == "win rate 0.600 (interval 0.510-0.670): its lower bound is below 0.520"


# ---- held-out labels in the data and in the jobs ----------------------------------------------------------------


def _question(split: Split, taken: set[str]) -> str:
    """A question whose hash puts it on `split` (as a chat's turn would land)."""
    for i in range(1000):
        text = f"Question number {i}?"
        if text not in taken and prompts.split_for([{"role": "user", "content": text}]) == split:
            return text
    raise AssertionError("no such question")


def _rank(db: Session, annotator, prompt: Prompt, world: World, bad: str = "I do not know, go away.") -> None:
    """A set of a good and a bad answer to one of the demo world's questions, ranked good first."""
    good = world.reference_answer(world.find_question(prompt.messages[-1]["content"]))
    cset = annotation.create_set(
        db, prompt_id=prompt.id, answers=[(good, 5), (bad, 6)], model_version_id=None, params={}
    )
    by_text = {c.content: c.id for c in cset.candidates}
    entries = [(by_text[good], 1), (by_text[bad], 2)]
    annotation.submit_ranking(db, annotator=annotator, set_id=cset.id, status="ranked", entries=entries)


def _thumb(db: Session, person, question: str, value: int) -> None:
    conversation = chat.create_conversation(db, user=person)
    _, answer = chat.add_user_message(db, user=person, conversation_id=conversation.id, content=question)
    chat.finish_answer(
        db, message_id=answer.id, content="An answer.", finish_reason="stop", model_version_id=None, sampling={}
    )
    feedback.set_feedback(db, user=person, message_id=answer.id, value=value)


def test_heldout_labels_are_left_out_of_every_training_export(any_db_url: str) -> None:
    """Rankings of held-out prompts, and thumbs whose context is a held-out prompt (its row's split, else its
    hash), come out only when the held-out split is asked for; every set lands on its prompt's side."""
    migrate.upgrade(any_db_url)
    factory = make_session_factory(make_engine(any_db_url))
    world = World(0)
    questions = [p.messages for p in world.prompts(40)]
    with factory() as db:
        annotator, person = make_user(db, "ann", Role.annotator), make_user(db, "rater")
        imported = [(m, Split.train if i % 2 else Split.heldout) for i, m in enumerate(questions[:6])]
        prompts.add_prompts(db, items=imported, source=PromptSource.imported)
        rows = db.query(Prompt).order_by(Prompt.id).all()
        for prompt in rows + rows[:2]:  # the first two prompts get a second set
            _rank(db, annotator, prompt, world)
        # A chat's question imported as a held-out prompt (its hash says train: the row decides), one whose hash says
        # held out (no row), and one on the train side.
        on_a_row = _question(Split.train, set())
        prompts.add_prompts(
            db, items=[([{"role": "user", "content": on_a_row}], Split.heldout)], source=PromptSource.imported
        )
        _thumb(db, person, on_a_row, 1)
        _thumb(db, person, _question(Split.heldout, set()), -1)
        _thumb(db, person, _question(Split.train, {on_a_row}), 1)
        db.commit()
    with factory() as db:
        split_of = {p.content_hash: p.split for p in db.query(Prompt)}
        assert db.query(Ranking).count() == 8
        train, heldout = datasets.rankings(db, Split.train), datasets.rankings(db, Split.heldout)
        assert len(train.records) == 4 and len(heldout.records) == 4 and len(datasets.rankings(db).records) == 8
        assert {split_of[prompts.content_hash(r["prompt"])] for r in train.records} == {Split.train}
        assert {split_of[prompts.content_hash(r["prompt"])] for r in heldout.records} == {Split.heldout}
        assert len(set(heldout.sets)) == 4 and not set(heldout.sets) & set(train.sets)
        assert (train.last_id, heldout.last_id) == (8, 7)  # each side's own watermark (ranking 7: rows[0]'s second)
        assert len(datasets.pairs(db, Split.train).records) == 4
        assert [t["label"] for t in datasets.thumbs(db, Split.train).records] == [True]
        assert [t["label"] for t in datasets.thumbs(db, Split.heldout).records] == [True, False]
        assert len(datasets.thumbs(db).records) == 3


def test_annotators_are_handed_heldout_sets_and_prompts(any_db_url: str) -> None:
    """Held-out labels exist only if annotators rank held-out sets: work is handed out whatever the split."""
    migrate.upgrade(any_db_url)
    factory = make_session_factory(make_engine(any_db_url))
    world = World(0)
    with factory() as db:
        annotator, other = make_user(db, "ann", Role.annotator), make_user(db, "ann2", Role.annotator)
        messages = [p.messages for p in world.prompts(20)]
        prompts.add_prompts(db, items=[(messages[0], Split.train), (messages[1], Split.heldout)], source="demo")
        train, held = db.query(Prompt).order_by(Prompt.id).all()
        _rank(db, other, train, world)
        assert annotation.prompt_needing_candidates(db, annotator=annotator).id == held.id  # the fewest sets first
        _rank(db, other, held, world)
        train_set, held_set = (db.query(CandidateSet).filter_by(prompt_id=p.id).one().id for p in (train, held))
        assert annotation.next_set_id(db, annotator_id=annotator.id, per_set=2) == train_set  # the oldest first
        _rank_existing(db, annotator, train_set)
        assert annotation.next_set_id(db, annotator_id=annotator.id, per_set=2) == held_set


def _rank_existing(db: Session, annotator: User, set_id: int) -> None:
    task = annotation.load_task(db, set_id=set_id)
    entries = [(candidate_id, i + 1) for i, (candidate_id, _, _) in enumerate(task.candidates)]
    annotation.submit_ranking(db, annotator=annotator, set_id=set_id, status="ranked", entries=entries)


def _demo(settings: Settings) -> sessionmaker[Session]:
    """A migrated database with the tiny demo chat model and the demo prompt pool (train and held-out prompts)."""
    migrate.upgrade(settings.resolved_database_url)
    bootstrap_demo_model(settings, pretrain_steps=6, sft_steps=3, demo_docs=300, n_layer=2, n_embd=32)
    seed_demo_prompts(settings)
    return make_session_factory(make_engine(settings.resolved_database_url))


@pytest.fixture
def demo(settings: Settings) -> sessionmaker[Session]:
    return _demo(settings)


@pytest.fixture
def any_demo(any_db_url: str, settings: Settings) -> sessionmaker[Session]:
    settings.database_url = any_db_url
    return _demo(settings)


def _label(factory, split: Split, count: int, offset: int = 0) -> list[int]:
    """Rank `count` prompts of `split` (a set each); returns the ranking ids."""
    world = World(0)
    with factory() as db:
        annotator = db.query(User).filter_by(username="ann").one_or_none()
        annotator = annotator or make_user(db, "ann", Role.annotator)
        chosen = db.query(Prompt).filter(Prompt.split == split).order_by(Prompt.id).offset(offset).limit(count).all()
        for prompt in chosen:
            _rank(db, annotator, prompt, world)
        db.commit()
    with factory() as db:
        return [r.id for r in db.query(Ranking).order_by(Ranking.id)][-count:]


def _run(settings: Settings, factory, type: str, **params) -> Job:
    with transaction(factory) as db:
        job_id = jobs.enqueue(db, type=type, params=params, max_attempts=1).id
    Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.5)).run(once=True)
    with factory() as db:
        job = db.get(Job, job_id)
        assert job.status == JobStatus.succeeded, job.error
        return job


def _version_of(factory, job: Job) -> ModelVersion:
    with factory() as db:
        return db.query(ModelVersion).filter_by(job_id=job.id).one()


def _admin_page(settings: Settings, path: str) -> str:
    with TestClient(create_app(settings)) as client:
        with make_session_factory(make_engine(settings.resolved_database_url))() as db:
            make_user(db, "chief", Role.admin)
        login(client, "chief")
        return client.get(path).text


def test_the_reward_job_never_trains_on_heldout_sets_and_too_few_labels_stay_a_candidate(
    settings: Settings, any_demo
) -> None:
    train_ids = _label(any_demo, Split.train, 4)
    heldout_ids = _label(any_demo, Split.heldout, 6)
    assert max(train_ids) < min(heldout_ids)
    version = _version_of(any_demo, _run(settings, any_demo, "reward", steps=3, batch_size=4))
    # What the trainer read: the 4 training rankings (split again into its own train and validation), nothing else.
    assert version.metrics["train_rankings"] + version.metrics["heldout_rankings"] == 4
    assert version.training_data["rankings"] == 4 and version.training_data["ranking_id"] == max(train_ids)
    # What it is scored on: the 6 held-out sets, a pair each.
    assert version.metrics["heldout_sets"] == 6 and version.metrics["heldout_pairs"] == 6
    low, acc, high = (version.metrics[k] for k in ("heldout_acc_low", "heldout_acc", "heldout_acc_high"))
    assert 0 <= low <= acc <= high <= 1
    # 4 labels < FLYWHEEL_REWARD_MIN_LABELS (20 by default): a candidate, with the reason on the admin page.
    assert settings.reward_min_labels == 20
    assert version.status == ModelStatus.candidate and version.metrics["promoted"] is False
    assert version.metrics["gate"] == "trained on 4 labels, fewer than the 20 required"
    page = _admin_page(settings, "/admin/models")
    row = page[page.index(f'id="model-{version.id}"') :]
    row = row[: row.index("</tr>")]
    assert "gate: <strong>held back</strong> — trained on 4 labels, fewer than the 20 required" in row
    assert "held-out human-label accuracy: " in row and "Promote" in row  # an admin can still promote it by hand


def test_an_accurate_reward_model_is_promoted_and_the_policy_gate_is_judged_by_another(
    settings: Settings, demo
) -> None:
    settings.reward_min_labels = 8
    _label(demo, Split.train, 8)
    _label(demo, Split.heldout, 6)
    rm = dict(steps=30, batch_size=4, lr=3e-3, seed=0)
    first = _version_of(demo, _run(settings, demo, "reward", **rm))
    assert first.status == ModelStatus.active, first.metrics["gate"]
    assert first.metrics["heldout_sets"] == 6 and "no worse than chance" in first.metrics["gate"]
    assert first.metrics["heldout_acc_high"] >= 0.5
    # Trained again on the same labels: the same accuracy, measured beside the active one on the same sets.
    second = _version_of(demo, _run(settings, demo, "reward", **rm))
    assert second.status == ModelStatus.active, second.metrics["gate"]
    assert second.metrics["baseline_version_id"] == first.id == second.training_data["baseline_version_id"]
    assert second.metrics["active_heldout_acc"] == pytest.approx(first.metrics["heldout_acc"])
    assert f"no worse than the active model's {first.metrics['heldout_acc']:.3f}" in second.metrics["gate"]

    rl = _run(settings, demo, "rl", steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, gate_prompts=4)
    policy = _version_of(demo, rl)
    # Trained against the active reward model (the second), judged by the one active before it.
    assert policy.training_data["reward_version_id"] == second.id
    assert policy.metrics["judge_version_id"] == first.id == policy.training_data["judge_version_id"]
    assert policy.metrics["judge_is_trainer"] is False and f"judged by {first.name}" in policy.metrics["gate"]
    assert {"win_rate_low", "win_rate_high"} <= set(policy.metrics)
    assert policy.metrics["win_rate_low"] <= policy.metrics["win_rate"] <= policy.metrics["win_rate_high"]
    page = _admin_page(settings, f"/admin/models/{policy.id}")
    assert "gate&#39;s judge (a reward model that did not train it)</th>" in page
    assert f'href="http://testserver/admin/models/{first.id}">{first.name}</a>' in page
