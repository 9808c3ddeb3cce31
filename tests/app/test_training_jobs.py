"""The worker runs the alignment jobs on data collected in the database: reward → RL (gated) → DPO/KTO, and SFT.

Tiny models and a handful of steps: this checks the wiring (datasets from rows, lineage, promotion, the gate's
record), not model quality — that is the end-to-end flywheel test's job.
"""

import asyncio
import itertools
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.bootstrap import bootstrap_demo_model, seed_demo_prompts
from app.jobs.gate import REFERENCE_DIALOGUES, decide
from app.jobs.handlers import reference_dialogues
from app.jobs.worker import Worker, WorkerConfig
from app.models import CandidateSet, Job, JobStatus, ModelKind, ModelStatus, ModelVersion, Prompt, Role, Split
from app.services import annotation, chat, feedback, jobs, model_versions
from app.services.text import clean
from app.serving.inference import InferenceService
from app.settings import Settings
from ml import lora
from ml.checkpoint import load_checkpoint
from ml.demo.world import World, split_of
from ml.engine import Engine
from ml.textstream import decode_text
from ml.tokenizer import Tokenizer
from tests.app.test_inference import GREEDY, collect
from tests.factories import login, make_user

SMALL = {"steps": 3, "batch_size": 4}


@pytest.fixture
def factory(settings: Settings) -> sessionmaker[Session]:
    settings.reward_min_labels = 8  # the reward gate's label count: what collect_labels collects (6 rankings, 2 thumbs)
    migrate.upgrade(settings.resolved_database_url)
    bootstrap_demo_model(settings, pretrain_steps=6, sft_steps=3, demo_docs=300, n_layer=2, n_embd=32)
    seed_demo_prompts(settings)
    return make_session_factory(make_engine(settings.resolved_database_url))


def collect_labels(factory) -> None:
    """Rankings of three answers per prompt by the demo world's gold scorer, and thumbs on a chat's answers."""
    world = World(0)
    with factory() as db:
        annotator = make_user(db, "sim", Role.annotator)
        for prompt in db.query(Prompt).filter(Prompt.split == Split.train).limit(6):
            question = prompt.messages[-1]["content"]
            good, bad = world.reference_answer(world.find_question(question)), "I do not know, go away."
            cset = annotation.create_set(
                db, prompt_id=prompt.id, answers=[(good, 5), (bad, 6), ("", 0)], model_version_id=None, params={}
            )
            scores = {c.id: world.gold_score(prompt.messages, c.content) for c in cset.candidates}
            order = sorted(scores, key=lambda cid: -scores[cid])
            annotation.submit_ranking(
                db,
                annotator=annotator,
                set_id=cset.id,
                status="ranked",
                entries=[(cid, i + 1) for i, cid in enumerate(order)],
            )
        person = make_user(db, "rater")
        for text, value in (("What is 2 plus 3?", 1), ("Where does Mira live?", -1)):
            conversation = chat.create_conversation(db, user=person)
            _, answer = chat.add_user_message(db, user=person, conversation_id=conversation.id, content=text)
            chat.finish_answer(
                db,
                message_id=answer.id,
                content="5" if value > 0 else "No idea.",
                finish_reason="stop",
                model_version_id=None,
                sampling={},
            )
            feedback.set_feedback(db, user=person, message_id=answer.id, value=value)
        db.commit()


def run(settings: Settings, factory, type: str, **params) -> Job:
    with transaction(factory) as db:
        job_id = jobs.enqueue(db, type=type, params=params, max_attempts=1).id
    Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.5)).run(once=True)
    with factory() as db:
        return db.get(Job, job_id)


def test_reward_rl_evaluate_candidates_offline_and_sft_jobs(settings: Settings, factory) -> None:
    assert (
        run(settings, factory, "reward").error == "ValueError: no rankings or thumbs yet: annotate or rate "
        "some answers first"
    )
    collect_labels(factory)
    reward_job = run(settings, factory, "reward", **SMALL)
    assert reward_job.status == JobStatus.succeeded, reward_job.error
    with factory() as db:
        reward = db.query(ModelVersion).filter_by(kind=ModelKind.reward).one()
        assert reward.status == ModelStatus.active and reward.training_data["rankings"] == 6
        assert reward.training_data["thumbs"] == 2 and "val_acc" in reward.metrics
        assert reward.job_id == reward_job.id and reward_job.metrics  # progress points were recorded
    # What it ran with, defaults filled in (not the `{}`-ish params it was given), and a log of a successful job.
    ran_with = reward_job.effective_params
    assert ran_with["steps"] == SMALL["steps"] and ran_with["lr"] == 3e-4 and ran_with["rankings"] == {"records": 6}
    assert "out" not in ran_with and "sft" in ran_with
    assert "reward job" in reward_job.log_tail and f"step {SMALL['steps']}/{SMALL['steps']}" in reward_job.log_tail
    assert f"registered model version {reward.name} (promoted: now active)" in reward_job.log_tail

    rl_job = run(
        settings, factory, "rl", steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, gate_prompts=4
    )
    assert rl_job.status == JobStatus.succeeded, rl_job.error
    assert rl_job.effective_params["kl_coef"] == 0.5 and rl_job.effective_params["prompts"]["records"] > 0
    with factory() as db:
        policy = db.query(ModelVersion).filter_by(kind=ModelKind.policy).one()
        sft = db.query(ModelVersion).filter_by(kind=ModelKind.sft).one()
        assert policy.parent_id == sft.id and policy.training_data["reward_version_id"] == reward.id
        assert {"win_rate", "kl", "ppl_candidate", "gate"} <= set(policy.metrics)
        assert policy.metrics["gate_max_new_tokens"] == 8  # judged at the length it was trained for, not 64
        assert policy.metrics["gate_dialogues"] == REFERENCE_DIALOGUES  # the demo's held-out reference dialogues
        assert (policy.status == ModelStatus.active) == policy.metrics["promoted"]
        # The only reward model ever active trained it, so it judges too, and the gate's reason says so.
        assert policy.metrics["judge_version_id"] == reward.id and policy.metrics["judge_is_trainer"] is True
        assert f"judged by {reward.name} (its own trainer" in policy.metrics["gate"]
        assert reward.metrics["promoted"] is True and "promoted on the label count" in reward.metrics["gate"]

    evaluation = run(settings, factory, "evaluate", prompts=4)
    assert evaluation.status == JobStatus.succeeded, evaluation.error
    assert {"reward_mean", "kl"} <= set(evaluation.metrics[-1])
    assert evaluation.effective_params == {
        "prompts": 4,
        "version_id": policy.id if policy.status == ModelStatus.active else sft.id,
        "reference_version_id": sft.id,
        "reward_version_id": reward.id,
    }
    candidates = run(settings, factory, "candidates", sets=2, k=3, max_new_tokens=6)
    assert candidates.status == JobStatus.succeeded, candidates.error
    with factory() as db:
        fresh = db.query(CandidateSet).filter(CandidateSet.model_version_id.isnot(None)).all()
        assert len(fresh) == 2 and all(len(c.candidates) == 3 for c in fresh)

    for algo in ("dpo", "kto"):
        job = run(settings, factory, algo, **SMALL, gate_prompts=4)
        assert job.status == JobStatus.succeeded, job.error
        with factory() as db:
            offline = db.query(ModelVersion).filter_by(job_id=job.id).one()
            assert offline.metrics["gate_max_new_tokens"] == 64  # no sampling of its own: the gate's default
    with factory() as db:
        assert db.query(ModelVersion).filter_by(kind=ModelKind.policy).count() == 3
        assert db.query(ModelVersion).filter_by(kind=ModelKind.policy, status=ModelStatus.active).count() <= 1

    # SFT on the chats that allow training (the demo data left out): two conversations were collected above.
    job = run(settings, factory, "sft", steps=2, batch_size=2, include_demo=False)
    assert job.status == JobStatus.succeeded, job.error
    with factory() as db:
        version = db.query(ModelVersion).filter_by(name=f"sft-job{job.id}").one()
        assert version.status == ModelStatus.candidate and version.training_data["conversation_id"] > 0
        assert version.training_data["dialogues"] == 2
    # With the defaults the demo's dialogues are mixed in with the collected chats.
    job = run(settings, factory, "sft", steps=2, batch_size=2, demo_dialogues=8)
    assert job.status == JobStatus.succeeded, job.error
    with factory() as db:
        version = db.query(ModelVersion).filter_by(name=f"sft-job{job.id}").one()
        assert version.training_data["demo"] is True and version.training_data["dialogues"] == 2


def test_gate_decisions_on_worked_numbers() -> None:
    base = {"win_rate": 0.6, "kl": 1.0, "ppl_candidate": 2.0, "ppl_active": 2.0}
    limits = {"gate_margin": 0.05, "kl_budget": 5.0, "ppl_tolerance": 0.1}
    assert decide(base, **limits).promote
    assert "below" in decide({**base, "win_rate": 0.54}, **limits).reason
    assert "exceeds" in decide({**base, "kl": 5.5}, **limits).reason
    assert "regressed" in decide({**base, "ppl_candidate": 2.3}, **limits).reason
    assert decide({**base, "ppl_candidate": 2.19}, **limits).promote


def test_the_gate_measures_perplexity_on_reference_dialogues_never_on_users_chats() -> None:
    """Users' chats are the active policy's own samples, on which any other policy looks worse: the gate reads the
    demo's held-out questions with good answers (when the reference learned from the demo) and imported files."""
    demo_reference = ModelVersion(training_data={"data": "demo dialogues, seed 0", "demo": True, "demo_seed": 0})
    dialogues = reference_dialogues(demo_reference, ["/data/datasets/dialogues/imported.jsonl"])
    assert dialogues[0] == "/data/datasets/dialogues/imported.jsonl" and len(dialogues) == REFERENCE_DIALOGUES + 1
    world = World(0)
    for messages in dialogues[1:]:
        for user, answer in itertools.pairwise(messages):
            if answer["role"] == "assistant":
                assert split_of(user["content"]) == "heldout"
                assert world.gold_score([user], answer["content"]) > 0.7  # a good answer
    assert reference_dialogues(ModelVersion(training_data={"data": ["books.txt"]}), []) == []


def test_active_learning_the_reward_job_fits_an_ensemble_and_candidates_keep_the_most_disputed_sets(
    settings: Settings, factory
) -> None:
    """The reward job saves bootstrap heads beside its model and, with `disagreement`, scores the sets nobody has
    ranked; the candidates job then samples a pool and keeps the sets the heads dispute most, with their priority.
    With `random` (the default) sets come in prompt order with no priority, as before."""
    from pathlib import Path

    from ml.active import ENSEMBLE_FILE

    collect_labels(factory)
    with factory() as db:
        prompt = db.query(Prompt).filter(Prompt.split == Split.train).order_by(Prompt.id.desc()).first()
        waiting = annotation.create_set(
            db, prompt_id=prompt.id, answers=[("4", 1), ("Go away.", 2)], model_version_id=None, params={}
        ).id
        db.commit()
    job = run(settings, factory, "reward", active_learning="disagreement", **SMALL)
    assert job.status == JobStatus.succeeded, job.error
    with factory() as db:
        reward = db.query(ModelVersion).filter_by(kind=ModelKind.reward).one()
        assert (Path(reward.path) / ENSEMBLE_FILE).exists() and reward.metrics["ensemble_sets"] == 6
        assert reward.metrics["rescored_sets"] == 1 and 0.0 <= db.get(CandidateSet, waiting).priority <= 1.0
        before = {c.id for c in db.query(CandidateSet)}

    job = run(settings, factory, "candidates", active_learning="disagreement", sets=2, pool=5, k=3, max_new_tokens=6)
    assert job.status == JobStatus.succeeded, job.error
    with factory() as db:
        fresh = db.query(CandidateSet).filter(CandidateSet.id.not_in(before)).all()
        assert len(fresh) == 2 and all(c.priority is not None and 0.0 <= c.priority <= 1.0 for c in fresh)
        assert job.metrics[-1]["sets"] == 5  # all five of the pool were sampled, two kept
        before |= {c.id for c in fresh}

    assert settings.active_learning == "random"
    job = run(settings, factory, "candidates", sets=2, k=3, max_new_tokens=6)
    assert job.status == JobStatus.succeeded, job.error
    with factory() as db:
        fresh = db.query(CandidateSet).filter(CandidateSet.id.not_in(before)).order_by(CandidateSet.id).all()
        assert len(fresh) == 2 and all(c.priority is None for c in fresh)
        have = {c.prompt_id for c in db.query(CandidateSet).filter(CandidateSet.id.not_in({c.id for c in fresh}))}
        first = [p.id for p in db.query(Prompt).order_by(Prompt.id) if p.id not in have][:2]
        assert [c.prompt_id for c in fresh] == first  # the first prompts without a set, in id order

    job = run(settings, factory, "candidates", active_learning="uncertainty")
    assert job.status == JobStatus.failed and "active_learning must be one of random, disagreement" in job.error


def test_lora_jobs_record_base_and_adapter_and_the_promoted_policy_is_served(
    settings: Settings, factory, client
) -> None:
    """Reward and RL jobs with a `lora` parameter: the lineage names the adapter and the frozen base under it, the
    admin page shows both, and once promoted the policy (served merged) answers as base + adapter do."""
    collect_labels(factory)
    spec = {"rank": 4, "alpha": 8}
    assert run(settings, factory, "reward", **SMALL, lora=spec).status == JobStatus.succeeded
    rl_job = run(
        settings,
        factory,
        "rl",
        steps=2,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=8,
        gate_prompts=4,
        lr=3e-2,
        lora=spec,
    )
    assert rl_job.status == JobStatus.succeeded, rl_job.error
    with factory() as db:
        sft = db.query(ModelVersion).filter_by(kind=ModelKind.sft).one()
        reward = db.query(ModelVersion).filter_by(kind=ModelKind.reward).one()
        policy = db.query(ModelVersion).filter_by(kind=ModelKind.policy).one()
        assert (
            reward.training_data["adapter"]["rank"] == 4 and reward.training_data["adapter_base_version_id"] == sft.id
        )
        assert policy.training_data["adapter"]["targets"] == list(lora.TARGETS)
        assert policy.training_data["adapter_base_version_id"] == sft.id  # the trunk under it, also its KL reference
        model_versions.promote(db, version_id=policy.id)
        db.commit()
        policy_id, policy_path, sft_path = policy.id, policy.path, sft.path
    bad = run(settings, factory, "rl", steps=1, lora={"rank": 4, "dropout": 0.1})
    assert bad.status == JobStatus.failed and "unknown LoRA settings: dropout" in bad.error

    with client.app.state.session_factory() as db:
        make_user(db, "chief", Role.admin)
        db.commit()
    login(client, "chief")
    page = client.get(f"/admin/models/{policy_id}").text
    assert "LoRA adapter" in page and "rank 4, alpha 8 on q_proj" in page
    assert "frozen base under the LoRA adapter" in page and f'/admin/models/{sft.id}"' in page

    base, _ = load_checkpoint(sft_path)
    lora.load_adapter(base, Path(policy_path) / "adapter")
    served = InferenceService()
    served.load(policy_path)
    question = [{"role": "user", "content": "What is 2 plus 3?"}]
    text, _ = asyncio.run(collect(served, question, GREEDY))
    served.close()
    tokenizer = Tokenizer.load(policy_path)
    ids = tokenizer.render_prompt(question)
    stops = set(tokenizer.stop_token_ids)
    sample = Engine(base).generate(ids, n=1, max_new_tokens=GREEDY.max_tokens, temperature=0.0, stop_token_ids=stops)[0]
    assert text == clean(decode_text(tokenizer, sample.token_ids))  # whole characters, as served
    merged, _ = load_checkpoint(policy_path)  # what is served: the adapter merged into the base's weights
    with torch.no_grad():
        prompt = torch.tensor([ids + sample.token_ids])
        assert torch.allclose(merged(prompt)[0], base(prompt)[0], atol=1e-4)


def test_a_head_only_reward_job_keeps_the_trunk_and_records_the_setting(settings: Settings, factory) -> None:
    """`head_only` reaches the trainer through the job's parameters: the registered reward model's trunk is the SFT
    model's, unchanged, and the job page's effective parameters say how it trained."""
    import torch

    from ml.checkpoint import load_checkpoint

    collect_labels(factory)
    job = run(settings, factory, "reward", head_only=True, **{**SMALL, "lr": 1e-2})
    assert job.status == JobStatus.succeeded, job.error
    assert job.effective_params["head_only"] is True and job.effective_params["lora"] is None
    with factory() as db:
        reward = db.query(ModelVersion).filter_by(kind=ModelKind.reward).one()
        sft = db.get(ModelVersion, reward.parent_id)
        trained, _ = load_checkpoint(reward.path)
        base, _ = load_checkpoint(sft.path)
    trunk = {k: v for k, v in trained.state_dict().items() if not k.startswith("score_head")}
    assert trunk and all(torch.equal(v, base.state_dict()[k]) for k, v in trunk.items())
