"""No bad row stops a job (issue #16): one chat prompt longer than the policy's context used to fail every rl job
(`prompt #460: the prompt leaves no room to answer within 128 tokens`). Now the jobs skip it, count it by reason in
their metrics and log, and fail only when nothing usable is left, saying why."""

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.bootstrap import bootstrap_demo_model, seed_demo_prompts
from app.models import CandidateSet, JobStatus, ModelKind, ModelVersion, Prompt, PromptSource, Split
from app.services import prompts
from app.settings import Settings
from tests.app.test_training_jobs import SMALL, collect_labels, run

LONG = [{"role": "user", "content": "Mira lives in Oslo and has a red cat. " * 60}]  # far over the context


@pytest.fixture
def factory(settings: Settings) -> sessionmaker[Session]:
    """A database with a bootstrapped demo model and the demo prompts (as tests/app/test_training_jobs.py's)."""
    settings.reward_min_labels = 8  # the reward gate's label count: what collect_labels collects
    migrate.upgrade(settings.resolved_database_url)
    bootstrap_demo_model(settings, pretrain_steps=6, sft_steps=3, demo_docs=300, n_layer=2, n_embd=32)
    seed_demo_prompts(settings)
    return make_session_factory(make_engine(settings.resolved_database_url))


RL = dict(steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, gate_prompts=4)


def test_a_prompt_longer_than_the_context_is_skipped_by_rl_and_candidates_and_fails_only_alone(
    settings: Settings, factory
) -> None:
    collect_labels(factory)
    assert run(settings, factory, "reward", **SMALL).status == JobStatus.succeeded
    with transaction(factory) as db:
        prompts.add_prompts(db, items=[(LONG, Split.train)], source=PromptSource.chat)
    with factory() as db:
        long_id = db.query(Prompt).filter(Prompt.content_hash == prompts.content_hash(LONG)).one().id

    job = run(settings, factory, "rl", **RL)
    assert job.status == JobStatus.succeeded, job.error
    assert [m["skipped_too_long"] for m in job.metrics if "skipped_too_long" in m] == [1]
    assert "too_long 1 (prompt #" in job.log_tail and "the prompt leaves no room to answer" in job.log_tail
    with factory() as db:
        policy = db.query(ModelVersion).filter_by(kind=ModelKind.policy).one()
        assert policy.metrics["skipped_too_long"] == 1 and "too_long 1" in policy.metrics["skipped"]

    # The candidates job takes the next prompt instead, naming the one it skipped by its row id. Two short prompts
    # wait for candidates besides the long one, which comes first.
    with transaction(factory) as db:
        waiting = select(Prompt.id).where(Prompt.id.not_in(select(CandidateSet.prompt_id)), Prompt.id != long_id)
        keep = list(db.scalars(waiting.order_by(Prompt.id).limit(2)))
        db.execute(delete(Prompt).where(Prompt.id.in_(waiting), Prompt.id.not_in(keep)))
    job = run(settings, factory, "candidates", sets=3, k=2, max_new_tokens=4)
    assert job.status == JobStatus.succeeded, job.error
    assert f"too_long 1 (prompt {long_id}: " in job.log_tail
    with factory() as db:
        assert db.query(CandidateSet).filter(CandidateSet.model_version_id.isnot(None)).count() == 2
        assert db.query(CandidateSet).filter_by(prompt_id=long_id).count() == 0

    with transaction(factory) as db:  # now the long prompt is the only training prompt left
        db.execute(update(Prompt).where(Prompt.id != long_id).values(split=Split.heldout))
    job = run(settings, factory, "rl", **RL)
    assert job.status == JobStatus.failed
    assert "no usable prompts: too_long 1 (prompt #0: the prompt leaves no room to answer" in job.error
