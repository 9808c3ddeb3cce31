"""Database rows → training data, in the JSONL formats that TRL and `ml/examples.py` read.

- dialogues (`messages`): the visible thread of every chat that allows training, and imported dialogues;
- rankings (`prompt`/`answers`/`ranking`): one record per annotator ranking (ties kept), for the reward model;
  asked for one split, only rankings of that split's prompts (training jobs read `train`: rankings of `heldout`
  prompts are the held-out human labels every reward model is scored on, never trained on);
- pairs (`prompt`/`chosen`/`rejected`): every ordered pair of every ranking, for DPO and TRL's trainers;
- thumbs (`prompt`/`completion`/`label`): each thumbs up/down with the context it answered, for KTO and the RM;
  asked for one split, only thumbs whose context is a prompt of that split (its Prompt row's, else `split_for`), so
  that a held-out prompt's labels never reach training through a chat either;
- raw rankings: per-annotator records with ids, statuses and timing, for audits and agreement studies.

Everything here reads only live rows: what a person withdrew (app/services/withdrawal.py) is gone from all of them
at the commit that withdrew it. Each export also returns the highest row id it read, which model versions record in
their TrainingData.
"""

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Invalid
from app.models import (
    Candidate,
    CandidateSet,
    Conversation,
    Feedback,
    Message,
    MessageRole,
    Prompt,
    Ranking,
    RankingEntry,
    RankingStatus,
    Split,
    User,
)
from app.services.chat import STREAMING, visible_thread
from app.services.prompts import content_hash, split_for
from app.services.training_data import Rows

KINDS = ("dialogues", "rankings", "pairs", "thumbs", "raw-rankings", "prompts")


@dataclass
class Export:
    records: list[dict[str, Any]] = field(default_factory=list)
    last_id: int = 0  # the highest row id read: a version trained on these rows records it
    sets: list[int] = field(default_factory=list)  # rankings: each record's candidate set (several annotators')

    def rows(self) -> Rows:
        return Rows(self.last_id, len(self.records))


def _conversation_messages(session: Session, conversation_id: int) -> list[Message]:
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
    return list(session.scalars(query))


def dialogues(session: Session) -> Export:
    out, last = Export(), 0
    for conversation in session.scalars(select(Conversation).where(Conversation.allow_training.is_(True))):
        messages = [
            {"role": m.role.value, "content": m.content}
            for m, _ in visible_thread(_conversation_messages(session, conversation.id))
            if m.finish_reason != STREAMING and m.content
        ]
        if any(m["role"] == "assistant" for m in messages):
            out.records.append({"messages": messages})
            last = max(last, conversation.id)
    out.last_id = last
    return out


def _rankings(session: Session, split: Split | None = None) -> Iterator[tuple[Ranking, Prompt, list, dict, str | None]]:
    query = (
        select(Ranking, Prompt, User.username)
        .join(CandidateSet, CandidateSet.id == Ranking.candidate_set_id)
        .join(Prompt, Prompt.id == CandidateSet.prompt_id)
        .outerjoin(User, User.id == Ranking.annotator_id)  # NULL: an annotator whose account was deleted
        .order_by(Ranking.id)
    )
    if split is not None:
        query = query.where(Prompt.split == split)
    rows = session.execute(query).all()
    set_ids = {r.candidate_set_id for r, _, _ in rows}
    candidates: dict[int, list[Candidate]] = defaultdict(list)
    for c in session.scalars(
        select(Candidate).where(Candidate.candidate_set_id.in_(set_ids)).order_by(Candidate.position)
    ):
        candidates[c.candidate_set_id].append(c)
    entries: dict[int, dict[int, int]] = defaultdict(dict)
    ranking_ids = [r.id for r, _, _ in rows]
    for e in session.scalars(select(RankingEntry).where(RankingEntry.ranking_id.in_(ranking_ids))):
        entries[e.ranking_id][e.candidate_id] = e.rank
    for ranking, prompt, username in rows:
        yield ranking, prompt, candidates[ranking.candidate_set_id], entries[ranking.id], username


def rankings(session: Session, split: Split | None = None) -> Export:
    """K-wise rankings (ties kept) of non-empty answers; skipped and flagged sets carry no order."""
    out, last = Export(), 0
    for ranking, prompt, cands, ranks, _ in _rankings(session, split):
        if ranking.status != RankingStatus.ranked:
            continue
        kept = [c for c in cands if c.content.strip() and c.id in ranks]
        if len({ranks[c.id] for c in kept}) < 2:
            continue  # everything tied (or one answer left): no comparison to learn from
        out.records.append(
            {"prompt": prompt.messages, "answers": [c.content for c in kept], "ranking": [ranks[c.id] for c in kept]}
        )
        out.sets.append(ranking.candidate_set_id)
        last = max(last, ranking.id)
    out.last_id = last
    return out


def pairs(session: Session, split: Split | None = None) -> Export:
    """Every (better, worse) pair of every ranking, in TRL's conversational preference format."""
    base = rankings(session, split)
    out = Export(last_id=base.last_id)
    for record in base.records:
        answers, ranks = record["answers"], record["ranking"]
        for i, a in enumerate(answers):
            for j, b in enumerate(answers):
                if ranks[i] < ranks[j]:
                    out.records.append(
                        {
                            "prompt": record["prompt"],
                            "chosen": [{"role": "assistant", "content": a}],
                            "rejected": [{"role": "assistant", "content": b}],
                        }
                    )
    return out


def _context_splits(session: Session, contexts: list[list[dict[str, str]]]) -> list[Split]:
    """The split of each context: its Prompt row's when it became one (an import may set it), else the hash's."""
    hashes = [content_hash(c) for c in contexts]
    known = dict(
        session.execute(select(Prompt.content_hash, Prompt.split).where(Prompt.content_hash.in_(hashes))).all()
    )
    return [known.get(h) or split_for(c) for h, c in zip(hashes, contexts, strict=True)]


def thumbs(session: Session, split: Split | None = None) -> Export:
    """Thumbs on answers in chats that allow training, each with the context it answered (of one split if asked)."""
    out, ids = Export(), []
    rows = session.execute(
        select(Feedback, Message)
        .join(Message, Message.id == Feedback.message_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.allow_training.is_(True))
        .order_by(Feedback.id)
    ).all()
    threads: dict[int, list[Message]] = {}
    for vote, message in rows:
        if not message.content.strip():
            continue
        if message.conversation_id not in threads:
            threads[message.conversation_id] = _conversation_messages(session, message.conversation_id)
        context = [
            {"role": m.role.value, "content": m.content}
            for m, _ in visible_thread([x for x in threads[message.conversation_id] if x.id < message.id])
            if m.content and m.finish_reason != STREAMING
        ]
        if not context or context[-1]["role"] != MessageRole.user.value:
            continue
        out.records.append(
            {
                "prompt": context,
                "completion": [{"role": "assistant", "content": message.content}],
                "label": vote.value > 0,
            }
        )
        ids.append(vote.id)
    if split is not None:
        keep = [s == split for s in _context_splits(session, [r["prompt"] for r in out.records])]
        out.records = [r for r, k in zip(out.records, keep, strict=True) if k]
        ids = [i for i, k in zip(ids, keep, strict=True) if k]
    out.last_id = max(ids, default=0)
    return out


def raw_rankings(session: Session) -> Export:
    out, last = Export(), 0
    for ranking, prompt, cands, ranks, username in _rankings(session):
        out.records.append(
            {
                "ranking_id": ranking.id,
                "set_id": ranking.candidate_set_id,
                "annotator": username,
                "status": ranking.status.value,
                "flag_reason": ranking.flag_reason,
                "time_spent_ms": ranking.time_spent_ms,
                "created_at": ranking.created_at.isoformat(),
                "prompt": prompt.messages,
                "split": prompt.split.value,
                "candidates": [
                    {"id": c.id, "label": "ABCDEFGHI"[c.position], "content": c.content, "rank": ranks.get(c.id)}
                    for c in cands
                ],
            }
        )
        last = max(last, ranking.id)
    out.last_id = last
    return out


def prompt_records(session: Session, split: Split | None = None) -> Export:
    query = select(Prompt).order_by(Prompt.id)
    if split is not None:
        query = query.where(Prompt.split == split)
    out, last = Export(), 0
    for p in session.scalars(query):
        out.records.append({"messages": p.messages, "split": p.split.value})
        last = p.id
    out.last_id = last
    return out


def export(session: Session, kind: str) -> Export:
    if kind not in KINDS:
        raise Invalid(f"kind must be one of: {', '.join(KINDS)}")
    builders = {
        "dialogues": dialogues,
        "rankings": rankings,
        "pairs": pairs,
        "thumbs": thumbs,
        "raw-rankings": raw_rankings,
        "prompts": prompt_records,
    }
    return builders[kind](session)


def jsonl_lines(session: Session, kind: str) -> Iterator[str]:
    """The export of `kind` as JSONL lines (read now, so a bad kind fails before any response starts)."""
    records = export(session, kind).records
    return (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
