"""What each job type does, run inside the worker's child process: build inputs, call an `ml/` trainer, report.

A handler takes a JobContext and returns a JobOutput naming the model directory it wrote; the worker (the parent
process) registers that directory as a model version only after the handler returned, so a crash or a cancel never
leaves a half-written model registered.
"""

import random
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.jobs import gate, watching
from app.jobs.bootstrap import run_bootstrap
from app.jobs.context import JobContext, JobOutput
from app.models import ModelKind, ModelVersion, Split
from app.services import datasets, model_versions
from app.services.training_data import TrainingData


def _params(ctx: JobContext, allowed: set[str]) -> dict[str, Any]:
    unknown = set(ctx.params) - allowed
    if unknown:
        raise ValueError(f"unknown parameters for this job: {', '.join(sorted(unknown))}")
    return dict(ctx.params)


def run_pretrain(ctx: JobContext) -> JobOutput:
    """Pretrain a base model on the demo corpus (or files on the server) with ml.train.pretrain."""
    from ml.train import pretrain
    from ml.train.pretrain import PretrainConfig

    allowed = {f.name for f in fields(PretrainConfig)} - {"out", "resume", "progress"}
    out = ctx.model_dir("base")
    params = _params(ctx, allowed)
    if isinstance(params.get("data"), str):  # {"data": "notes.txt"}: one source, not a list of its letters
        params["data"] = [params["data"]]
    config = PretrainConfig(out=str(out), **params)
    metrics = ctx.train(pretrain.train, config)
    return JobOutput(
        model_kind="base",
        model_dir=str(out),
        metrics=_reported(ctx, metrics),
        training_data=TrainingData(corpus=[str(d) for d in config.data]),
    )


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}


def _reported(ctx: JobContext, metrics: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics, with the rows a trainer or the gate skipped (ml.screen: `skipped_<reason>` counts and a
    `skipped` line naming the reasons and a few rows) also written to the job's log, where an admin looks first."""
    counts = {k: v for k, v in metrics.items() if "skipped_" in k and isinstance(v, int)}
    lines = [
        f"{who}{metrics[key]}\n" for key, who in (("skipped", ""), ("gate_skipped", "the gate ")) if metrics.get(key)
    ]
    if counts:
        ctx.report(metrics=counts, log="".join(lines))
    return _plain(metrics)


def _version(session: Session, params: dict[str, Any], key: str, kinds: tuple[ModelKind, ...]) -> ModelVersion:
    """The version named by params[key], else the active one of the first kind that has one."""
    if params.get(key) is not None:
        return model_versions.get_version(session, version_id=int(params.pop(key)))
    params.pop(key, None)
    for kind in kinds:
        version = model_versions.active(session, kind=kind)
        if version is not None:
            return version
    raise ValueError(f"no active {' or '.join(k.value for k in kinds)} model: train or promote one first")


def _trainer_params(params: dict[str, Any], config_type: type, fixed: set[str]) -> dict[str, Any]:
    allowed = {f.name for f in fields(config_type)} - fixed
    unknown = set(params) - allowed - set(gate.GATE_DEFAULTS) - set(gate.GATE_SAMPLING)  # the gate reads those
    if unknown:
        raise ValueError(f"unknown parameters for this job: {', '.join(sorted(unknown))}")
    return {k: v for k, v in params.items() if k in allowed}


def _adapter_lineage(out: Path, candidates: list[ModelVersion]) -> dict[str, Any]:
    """A LoRA-trained model's lineage: its adapter's settings and which version's frozen weights it sits on (one of
    `candidates`, found by the base directory its saved adapter names); {} for a model trained in full."""
    from ml.checkpoint import ADAPTER_DIR, load_checkpoint_metadata
    from ml.lora import adapter_base

    spec = load_checkpoint_metadata(out).get("lora")
    if not spec:
        return {}
    base = adapter_base(out / ADAPTER_DIR)
    found = next((v.id for v in candidates if base is not None and Path(v.path).resolve() == base), None)
    return {"adapter": spec, "adapter_base_version_id": found}


def _dialogue_files(ctx: JobContext) -> list[str]:
    folder = ctx.data_dir / "datasets" / "dialogues"
    return sorted(str(p) for p in folder.iterdir() if not p.name.endswith(".tmp")) if folder.exists() else []


def run_sft(ctx: JobContext) -> JobOutput:
    """Fine-tune the active base model on chats that allow training, imported dialogues and (optionally) the demo's."""
    from ml.train import sft
    from ml.train.sft import SFTConfig, demo_dialogues

    params = dict(ctx.params)
    include_demo = bool(params.pop("include_demo", True))
    with ctx.session() as session:
        base = _version(session, params, "base_version_id", (ModelKind.base,))
        chats = datasets.dialogues(session)
    files = _dialogue_files(ctx)
    collected = files + chats.records
    if not collected and not include_demo:
        raise ValueError("no dialogues to train on: import some or allow the demo data")
    out = ctx.model_dir("sft")
    config = SFTConfig(
        base=base.path,
        out=str(out),
        data=["demo"],
        **_trainer_params(params, SFTConfig, {"base", "out", "data", "resume", "progress"}),
    )
    if collected:  # the trainer takes "demo" alone or records and files: mix the demo in as records
        config.data = (demo_dialogues(config) if include_demo else []) + collected
    metrics = ctx.train(sft.train, config)
    lineage = TrainingData(
        dialogues=chats.rows(),
        files=files,
        demo=include_demo,
        demo_seed=config.demo_seed,
        **_adapter_lineage(out, [base]),
    )
    return JobOutput(
        "sft", str(out), _reported(ctx, metrics), base.id, lineage, promote=bool(ctx.params.get("promote"))
    )


def run_reward(ctx: JobContext) -> JobOutput:
    """Train a reward model from the train-split rankings and thumbs; the reward gate decides whether it becomes the
    active one (the held-out split's rankings are what it is scored on). Beside it go the bootstrap heads of active
    learning (ml/active.py, one pass of the trunk over the rankings), and with `active_learning=disagreement` every set
    nobody has ranked yet gets the new ensemble's disagreement as priority."""
    from ml.active import MODES, fit_reward_ensemble
    from ml.train import reward
    from ml.train.reward import RewardConfig

    params = dict(ctx.params)
    mode = params.pop("active_learning", "random")
    if mode not in MODES:
        raise ValueError(f"active_learning must be one of {', '.join(MODES)}, got {mode!r}")
    with ctx.session() as session:
        sft_version = _version(session, params, "sft_version_id", (ModelKind.sft,))
        rankings, thumbs = datasets.rankings(session, Split.train), datasets.thumbs(session, Split.train)
        heldout = datasets.rankings(session, Split.heldout)
        active = model_versions.active(session, kind=ModelKind.reward)
    if not rankings.records and not thumbs.records:
        raise ValueError("no rankings or thumbs yet: annotate or rate some answers first")
    out = ctx.model_dir("reward")
    config = RewardConfig(
        sft=sft_version.path,
        out=str(out),
        rankings=rankings.records,
        thumbs=thumbs.records,
        **_trainer_params(params, RewardConfig, {"sft", "out", "rankings", "thumbs", "resume", "progress"}),
    )
    metrics = ctx.train(reward.train, config)
    try:  # the active-learning heads are an aid: a row they cannot read must not cost the reward model
        metrics["ensemble_sets"] = fit_reward_ensemble(out, rankings.records, seed=config.seed)
    except ValueError as exc:
        metrics["ensemble_sets"] = 0
        ctx.report(log=f"no active-learning ensemble: {exc}\n")
    if mode == "disagreement" and metrics["ensemble_sets"]:
        metrics["rescored_sets"] = _rescore_open_sets(ctx, out)
    labels = len(rankings.records) + len(thumbs.records)
    result = _reward_gate(ctx, out, labels, heldout, active)
    metrics = {**_reported(ctx, metrics), **result.metrics, "gate": result.reason, "promoted": result.promote}
    lineage = TrainingData(
        rankings=rankings.rows(),
        thumbs=thumbs.rows(),
        baseline_version_id=active.id if active else None,
        **_adapter_lineage(out, [sft_version]),
    )
    return JobOutput("reward", str(out), metrics, sft_version.id, lineage, promote=result.promote)


def _reward_gate(
    ctx: JobContext, out: Path, labels: int, heldout: datasets.Export, active: ModelVersion | None
) -> gate.GateResult:
    """Score the new reward model and the active one on today's held-out rankings, then apply the reward gate."""
    ctx.report(log=f"scoring on {len(heldout.records)} held-out rankings (and the active reward model with it)\n")
    candidate = gate.score_reward_model(str(out), heldout.records, heldout.sets)
    baseline = gate.score_reward_model(active.path, heldout.records, heldout.sets) if active else None
    result = gate.decide_reward(labels=labels, min_labels=ctx.reward_min_labels, candidate=candidate, active=baseline)
    for prefix, interval in (("heldout", candidate), ("active_heldout", baseline)):
        if interval is not None:
            numbers = {"acc": interval.estimate, "acc_low": interval.low, "acc_high": interval.high}
            numbers.update(pairs=interval.trials, sets=interval.groups)
            result.metrics.update({f"{prefix}_{k}": v for k, v in numbers.items()})
    if active is not None:
        result.metrics["baseline_version_id"] = active.id
    return result


def _rescore_open_sets(ctx: JobContext, reward_dir: Path) -> int:
    """Priority = the new ensemble's disagreement, for every candidate set that has no ranking yet; one transaction."""
    from sqlalchemy import select

    from app.models import CandidateSet, Prompt, Ranking
    from ml.active import EnsembleScorer

    scorer = EnsembleScorer.load(reward_dir)
    with ctx.session() as session, session.begin():
        ranked = select(Ranking.candidate_set_id)
        query = select(CandidateSet, Prompt.messages).join(Prompt, Prompt.id == CandidateSet.prompt_id)
        open_sets = session.execute(query.where(CandidateSet.id.not_in(ranked))).all()
        if scorer is None or not open_sets:
            return 0
        sets = [(messages, [c.content for c in cset.candidates]) for cset, messages in open_sets]
        for (cset, _), priority in zip(open_sets, scorer.disagreement(sets), strict=True):
            cset.priority = priority
    return len(open_sets)


def reference_dialogues(reference: ModelVersion, files: list[str]) -> list[Any]:
    """What the gate measures perplexity on (its first REFERENCE_DIALOGUES): dialogues no policy wrote. The imported
    dialogue `files` first, then, when the reference learned from the demo world, good answers to the demo's held-out
    questions. Never users' chats: those are the active policy's own samples, on which any other policy looks worse,
    so they would favour the incumbent."""
    from ml.demo.world import World

    data = TrainingData.from_json(reference.training_data)
    held_out = (
        World(data.demo_seed or 0).sft_dialogues(gate.REFERENCE_DIALOGUES, bad_fraction=0.0, split="heldout")
        if data.learned_from_demo
        else []
    )
    return files + held_out


def _gate(
    ctx: JobContext, out: Path, policy: ModelVersion, params: dict[str, Any], trainer_id: int | None
) -> gate.GateResult:
    """The policy gate, judged by a reward model that did not train the candidate (`trainer_id`: the one an RL
    policy was trained against; None for DPO/KTO): model_versions.judge_for. When no other reward model was ever
    active (the first turn of the flywheel), the trainer judges, and the reason says so."""
    with ctx.session() as session:
        reference = _version(session, {}, "", (ModelKind.sft,))
        judge = model_versions.judge_for(session, trainer_id=trainer_id)
        judge = judge or (model_versions.get_version(session, version_id=trainer_id) if trainer_id else None)
        heldout = [r["messages"] for r in datasets.prompt_records(session, Split.heldout).records]
    if judge is None:
        raise ValueError("no active reward model to judge the new policy: train or promote one first")
    dialogues = reference_dialogues(reference, _dialogue_files(ctx))
    if not heldout:
        raise ValueError("no held-out prompts to evaluate the new policy on")
    known = {*gate.GATE_DEFAULTS, *gate.GATE_SAMPLING}
    settings = {**gate.GATE_DEFAULTS, **{k: v for k, v in params.items() if k in known}}
    ctx.report(log=f"evaluating the candidate against the active policy on held-out prompts, judged by {judge.name}\n")
    result = gate.evaluate_candidate(str(out), policy.path, reference.path, judge.path, heldout, dialogues, settings)
    own = judge.id == trainer_id
    note = " (its own trainer: no other reward model was ever active)" if own else ""
    result.reason += f"; judged by {judge.name}{note}"
    result.metrics.update(judge_version_id=judge.id, judge_is_trainer=own)
    return result


# The rl job's KL penalty when none is given (the automatic rule gives none). Stronger than the trainer's own 0.05: a
# reward model trained on what people labelled so far is wrong off that data, and the demo experiment's sweep found
# 0.5 best (README, "The demo experiment").
RL_KL_COEF = 0.5


def run_rl(ctx: JobContext) -> JobOutput:
    """RL of the served policy against the active reward model, then the gate decides whether to promote it."""
    from ml.train import rl
    from ml.train.rl import RLConfig

    params = {"kl_coef": RL_KL_COEF, **ctx.params}
    with ctx.session() as session:
        policy = _version(session, params, "policy_version_id", (ModelKind.policy, ModelKind.sft))
        reference = _version(session, params, "reference_version_id", (ModelKind.sft,))
        reward = _version(session, params, "reward_version_id", (ModelKind.reward,))
        train_prompts = datasets.prompt_records(session, Split.train)
        every = watching.watch_every(params, int(params.get("steps", RLConfig.steps)))
        watch = watching.build_watch(
            session, reference=reference, trainer=reward, every=every, tokenizer_dir=policy.path
        )
    if not train_prompts.records:
        raise ValueError("no training prompts: import prompts or seed the demo pool")
    params.pop("watch_every", None)
    out = ctx.model_dir("policy")
    config = RLConfig(
        policy=policy.path,
        out=str(out),
        reward_model=reward.path,
        reference=reference.path,
        prompts=train_prompts.records,
        **_trainer_params(params, RLConfig, {"policy", "out", "reward_model", "reference", "prompts", "progress"}),
    )
    ctx.record_params(
        config, policy_version_id=policy.id, reference_version_id=reference.id, reward_version_id=reward.id
    )
    if ctx.nproc > 1:
        ctx.report(log=f"rl trains in one process: its rollouts do not run under DDP (asked for {ctx.nproc})\n")
    metrics = rl.train(config, on_progress=watching.flag_logger(ctx, watch) if watch else ctx.on_progress, watch=watch)
    result = _gate(ctx, out, policy, ctx.params, reward.id)
    metrics = {**_reported(ctx, {**metrics, **result.metrics}), "gate": result.reason, "promoted": result.promote}
    lineage = TrainingData(
        prompts=train_prompts.rows(),
        reward_version_id=reward.id,
        reference_version_id=reference.id,
        judge_version_id=result.metrics["judge_version_id"],
        **_adapter_lineage(out, [policy, reference]),
    )
    return JobOutput("policy", str(out), metrics, policy.id, lineage, promote=result.promote)


def run_preferences(ctx: JobContext, algo: str) -> JobOutput:
    """Offline DPO (from ranking pairs) or KTO (from thumbs) of the served policy, then the gate."""
    from ml.train import dpo
    from ml.train.dpo import DPOConfig

    params = dict(ctx.params)
    with ctx.session() as session:
        policy = _version(session, params, "policy_version_id", (ModelKind.policy, ModelKind.sft))
        rankings, thumbs = datasets.rankings(session, Split.train), datasets.thumbs(session, Split.train)
    data = {"rankings": rankings.records} if algo == "dpo" else {"thumbs": thumbs.records}
    if not next(iter(data.values())):
        raise ValueError(f"no {'rankings' if algo == 'dpo' else 'thumbs'} to train {algo.upper()} on")
    out = ctx.model_dir("policy")
    config = DPOConfig(
        policy=policy.path,
        out=str(out),
        algo=algo,
        **data,
        **_trainer_params(params, DPOConfig, {"policy", "out", "algo", "rankings", "thumbs", "resume", "progress"}),
    )
    metrics = ctx.train(dpo.train, config)
    result = _gate(ctx, out, policy, ctx.params, None)
    metrics = {**_reported(ctx, {**metrics, **result.metrics}), "gate": result.reason, "promoted": result.promote}
    rows = {"rankings": rankings.rows()} if algo == "dpo" else {"thumbs": thumbs.rows()}
    lineage = TrainingData(
        **rows, judge_version_id=result.metrics["judge_version_id"], **_adapter_lineage(out, [policy])
    )
    return JobOutput("policy", str(out), metrics, policy.id, lineage, promote=result.promote)


HANDLERS: dict[str, Callable[[JobContext], JobOutput]] = {
    "pretrain": run_pretrain,
    "sft": run_sft,
    "reward": run_reward,
    "rl": run_rl,
    "dpo": lambda ctx: run_preferences(ctx, "dpo"),
    "kto": lambda ctx: run_preferences(ctx, "kto"),
}


def run_candidates(ctx: JobContext) -> JobOutput:
    """Pre-sample candidate sets (K answers each) for prompts that have none, so annotators never wait.

    With active learning (param `active_learning`, by default FLYWHEEL_ACTIVE_LEARNING, set to `disagreement`) it
    samples sets for `pool` such prompts (default 3 x `sets`) and keeps the `sets` that the reward model's ensemble
    (ml/active.py, fit by the reward job) disputes most, each with its disagreement as its priority. Without an
    ensemble yet it does what `random` does: the first prompts in id order, every sampled set kept.
    """
    from ml.active import MODES, choose

    params = dict(ctx.params)
    sets, k = int(params.pop("sets", 20)), int(params.pop("k", 4))
    max_new_tokens = int(params.pop("max_new_tokens", 96))
    mode, pool = params.pop("active_learning", "random"), params.pop("pool", None)
    if mode not in MODES:
        raise ValueError(f"active_learning must be one of {', '.join(MODES)}, got {mode!r}")
    with ctx.session() as session:
        policy = _version(session, params, "policy_version_id", (ModelKind.policy, ModelKind.sft))
        scorer = _ensemble_scorer(session, params) if mode == "disagreement" else None
        waiting = _prompts_without_sets(session)
    if params:
        raise ValueError(f"unknown parameters for this job: {', '.join(sorted(params))}")
    chosen = dict(sets=sets, k=k, max_new_tokens=max_new_tokens, active_learning=mode, pool=pool)
    ctx.record_params(chosen, policy_version_id=policy.id)
    model, tokenizer = _load_policy(policy)
    todo, skipped = _fitting(
        waiting, tokenizer, model.config.max_seq_len, max_new_tokens, pool or 3 * sets if scorer else sets
    )
    store = partial(_store_set, ctx, policy, max_new_tokens)  # (prompt_id, answers, priority=None)
    sampled = _sample_sets(ctx, model, tokenizer, todo, k, max_new_tokens, on_set=None if scorer else store)
    if scorer is None:
        return JobOutput(metrics=_reported(ctx, {"sets": len(sampled), **skipped}))
    priorities = scorer.disagreement([(messages, [a for a, _ in answers]) for _, messages, answers in sampled])
    keep = choose(priorities, sets, set(), "disagreement", random.Random(ctx.job_id))
    for i in keep:
        store(sampled[i][0], sampled[i][2], priorities[i])
    chosen = [priorities[i] for i in keep]
    metrics = {"sets": len(keep), "pool": len(sampled), "priority_mean": sum(chosen) / max(len(chosen), 1)}
    return JobOutput(metrics=_reported(ctx, {**metrics, **skipped}))


def _prompts_without_sets(session: Session) -> list[tuple[int, list[dict[str, str]]]]:
    from sqlalchemy import select

    from app.models import CandidateSet, Prompt

    have = select(CandidateSet.prompt_id)
    query = select(Prompt).where(Prompt.id.not_in(have)).order_by(Prompt.id)
    return [(p.id, p.messages) for p in session.scalars(query)]


def _ensemble_scorer(session: Session, params: dict[str, Any]) -> Any:
    """The active (or named) reward model's ensemble, or None when there is no reward model or it has none."""
    from ml.active import EnsembleScorer

    try:
        reward = _version(session, params, "reward_version_id", (ModelKind.reward,))
    except ValueError:
        return None
    return EnsembleScorer.load(reward.path)


def _load_policy(policy: ModelVersion) -> tuple[Any, Any]:
    from ml.checkpoint import load_checkpoint
    from ml.tokenizer import Tokenizer

    return load_checkpoint(policy.path)[0], Tokenizer.load(policy.path)


def _fitting(
    waiting: list[tuple[int, list[dict[str, str]]]], tokenizer: Any, max_seq_len: int, max_new_tokens: int, limit: int
) -> tuple[list[tuple[int, list[dict[str, str]]]], dict[str, int]]:
    """The first `limit` waiting prompts that leave room to answer. A prompt too long for the policy (or malformed)
    is skipped and counted, and the next one taken instead, so it never blocks the queue; none fits: an error."""
    from ml.screen import prompt_fits, screen, skip_metrics

    fits = prompt_fits(tokenizer, max_seq_len, max_new_tokens)
    screened = screen([m for _, m in waiting], "prompt", fits, names=[f"prompt {i}" for i, _ in waiting], limit=limit)
    todo = [(waiting[i][0], p.messages) for i, p in zip(screened.kept_at, screened.kept, strict=True)]
    if waiting and not todo:
        screened.require()
    return todo, skip_metrics(screened)


def _sample_sets(
    ctx: JobContext,
    model: Any,
    tokenizer: Any,
    todo: list[tuple[int, list[dict[str, str]]]],
    k: int,
    max_new_tokens: int,
    on_set: Callable[..., Any] | None,
) -> list[tuple[int, list[dict[str, str]], list[tuple[str, int]]]]:
    """K answers of the policy to each prompt (temperature 1, top-p 0.95), each set handed to `on_set` as it is done."""
    from ml.engine import Engine
    from ml.textstream import decode_text

    engine, stops = Engine(model), set(tokenizer.stop_token_ids)
    out = []
    for i, (prompt_id, messages) in enumerate(todo):
        samples = engine.generate(
            tokenizer.render_prompt(messages),
            n=k,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            top_p=0.95,
            stop_token_ids=stops,
            seed=ctx.job_id * 1000 + i,
        )
        answers = [(decode_text(tokenizer, s.token_ids).strip(), len(s.token_ids)) for s in samples]
        out.append((prompt_id, messages, answers))
        if on_set is not None:
            on_set(prompt_id, answers)
        ctx.report(progress=(i + 1) / len(todo), metrics={"step": i + 1, "sets": i + 1})
    return out


def _store_set(
    ctx: JobContext,
    policy: ModelVersion,
    max_new_tokens: int,
    prompt_id: int,
    answers: list[tuple[str, int]],
    priority: float | None = None,
) -> None:
    """One set, in its own transaction: annotators can start on it while the job samples the next."""
    from app.services import annotation

    with ctx.session() as session, session.begin():
        annotation.create_set(
            session,
            prompt_id=prompt_id,
            answers=answers,
            model_version_id=policy.id,
            params={"temperature": 1.0, "top_p": 0.95, "max_tokens": max_new_tokens},
            priority=priority,
        )


def run_evaluate(ctx: JobContext) -> JobOutput:
    """Measure a policy (default: the served one) against the SFT reference under the active reward model."""
    from ml.checkpoint import load_checkpoint
    from ml.engine import Sampling
    from ml.evaluate import policy_reward_and_kl
    from ml.screen import MIN_ANSWER_TOKENS, prompt_fits, screen, skip_metrics
    from ml.tokenizer import Tokenizer
    from ml.train.reward import RewardModel

    params = dict(ctx.params)
    n_prompts = int(params.pop("prompts", 48))
    with ctx.session() as session:
        policy = _version(session, params, "version_id", (ModelKind.policy, ModelKind.sft))
        reference = _version(session, params, "reference_version_id", (ModelKind.sft,))
        reward = _version(session, params, "reward_version_id", (ModelKind.reward,))
        heldout = [r["messages"] for r in datasets.prompt_records(session, Split.heldout).records]
    if params:
        raise ValueError(f"unknown parameters for this job: {', '.join(sorted(params))}")
    if not heldout:
        raise ValueError("no held-out prompts to evaluate on")
    chosen = dict(prompts=n_prompts, version_id=policy.id, reference_version_id=reference.id)
    ctx.record_params(chosen, reward_version_id=reward.id)
    model, _ = load_checkpoint(policy.path)
    ref, _ = load_checkpoint(reference.path)
    tokenizer = Tokenizer.load(policy.path)
    fits = prompt_fits(tokenizer, min(model.config.max_seq_len, ref.config.max_seq_len), MIN_ANSWER_TOKENS)
    screened = screen(heldout, "prompt", fits, limit=n_prompts)  # a prompt too long to answer is skipped, counted
    prompts = [p.messages for p in screened.require()]
    result = policy_reward_and_kl(
        model, ref, tokenizer, prompts, RewardModel.load(reward.path), sampling=Sampling(temperature=0.7)
    )
    ctx.report(progress=1.0, metrics={"step": 1, **result}, log=f"{policy.name}: {result}\n")
    return JobOutput(metrics=_reported(ctx, {**result, **skip_metrics(screened)}))


HANDLERS.update({"candidates": run_candidates, "evaluate": run_evaluate, "bootstrap": run_bootstrap})
