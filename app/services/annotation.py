"""Annotation: hand out the next candidate set to rank, take rankings, measure agreement between annotators.

Each set is ranked by `per_set` distinct annotators; nobody sees a set twice; the sets with the fewest rankings go
first, and among them the oldest, or with active learning the one the reward ensemble disputes most (`priority`).
A ranking names every candidate of its set exactly once (equal ranks are ties) and lands whole or not at all.
"""

import itertools
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, bindparam, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound
from app.models import Candidate, CandidateSet, Prompt, Ranking, RankingEntry, RankingStatus, User, utcnow
from app.services.text import clean, clean_optional

MAX_FLAG_REASON = 200
MAX_TIME_SPENT_MS = 24 * 3600 * 1000
DELETED_ANNOTATOR = "(deleted account)"  # whose rankings stay, anonymised (app/services/users.py)
FLOOR_SLACK = 64  # sets a walk may pass before next_set_id looks for a higher floor


_sets, _candidates, _prompts = CandidateSet.__table__, Candidate.__table__, Prompt.__table__
_rankings, _entries = Ranking.__table__, RankingEntry.__table__


def _next_set_queries() -> tuple[Select, Select, Select]:
    """From set id `floor` on: the oldest set with exactly `level` rankings that `annotator_id` has not ranked; and
    the oldest set with at most `level` rankings (the next floor of that level). Then the set with exactly `level`
    rankings, not ranked by `annotator_id`, of the highest priority (unscored sets last, then the oldest)."""
    count = select(func.count()).select_from(_rankings).where(_rankings.c.candidate_set_id == _sets.c.id)
    count = count.scalar_subquery()
    mine = exists().where(
        _rankings.c.candidate_set_id == _sets.c.id, _rankings.c.annotator_id == bindparam("annotator_id")
    )
    after = _sets.c.id >= bindparam("floor")
    first = select(_sets.c.id).order_by(_sets.c.id).limit(1)
    by_priority = select(_sets.c.id).order_by(_sets.c.priority.desc().nulls_last(), _sets.c.id).limit(1)
    return (
        first.where(after, count == bindparam("level"), ~mine),
        first.where(after, count <= bindparam("level")),
        by_priority.where(count == bindparam("level"), ~mine),
    )


# The statements of the annotation loop are built once, as Core: building one (and its cache key) on every request,
# and the ORM's handling of its results, cost more CPU than SQLite spent running it.
_NEXT_SET, _LEVEL_FLOOR, _NEXT_BY_PRIORITY = _next_set_queries()
_TASK = (
    select(
        _prompts.c.id,
        _prompts.c.messages,
        _candidates.c.id.label("candidate_id"),
        _candidates.c.position,
        _candidates.c.content,
    )
    .join_from(_candidates, _sets, _sets.c.id == _candidates.c.candidate_set_id)
    .join(_prompts, _prompts.c.id == _sets.c.prompt_id)
    .where(_candidates.c.candidate_set_id == bindparam("set_id"))
    .order_by(_candidates.c.position)
)
_TASK_PROMPT = (
    select(_prompts.c.id, _prompts.c.messages)
    .join_from(_prompts, _sets, _sets.c.prompt_id == _prompts.c.id)
    .where(_sets.c.id == bindparam("set_id"))
)
_SET_CANDIDATES = select(_candidates.c.id).where(_candidates.c.candidate_set_id == bindparam("set_id"))
_MY_RANKING = select(_rankings.c.id).where(
    _rankings.c.candidate_set_id == bindparam("set_id"), _rankings.c.annotator_id == bindparam("annotator_id")
)
_INSERT_RANKING = _rankings.insert().returning(_rankings.c.id)


def next_set_id(
    session: Session,
    *,
    annotator_id: int,
    per_set: int,
    floors: dict[int, int] | None = None,
    by_priority: bool = False,
) -> int | None:
    """The id of the existing set that most needs this annotator: not ranked by them, fewest rankings, oldest.

    Asked one level at a time (sets with no ranking yet, then with one, …): each query walks the sets in id order
    through the rankings' indexes and stops at the first match, where one query ordering every set by its count of
    rankings would count them all on every request for work.

    That walk still passes every older set that has more rankings, a cost that grew with every ranking. `floors`
    (kept by the caller between calls, {level: set id}) remembers per level a set id below which every set has more
    than `level` rankings; as rankings are only ever added, that stays true, and the walk starts there. The answer is
    the same as without floors whenever that holds; the caller drops them now and then, and before concluding that
    there is no set at all.

    `by_priority` (active learning): within a level, the set of the highest `priority` first. That order is not the
    sets' id order, so no floor applies and each level's query reads every set's count of rankings.
    """
    if by_priority:
        for level in range(per_set):
            set_id = session.execute(_NEXT_BY_PRIORITY, {"level": level, "annotator_id": annotator_id}).scalar()
            if set_id is not None:
                return set_id
        return None
    floors = {} if floors is None else floors
    for level in range(per_set):
        floor = floors.get(level, 0)
        params = {"level": level, "annotator_id": annotator_id, "floor": floor}
        set_id = session.execute(_NEXT_SET, params).scalar()
        if set_id is None:
            continue
        if level == 0:  # a set with no ranking is nobody's: every set before it has one
            floors[0] = set_id
        elif set_id - floor > FLOOR_SLACK:  # it walked past many sets: find how far the level's floor has moved
            floors[level] = session.execute(_LEVEL_FLOOR, params).scalar() or floor
        return set_id
    return None


def prompt_needing_candidates(session: Session, *, annotator: User) -> Prompt | None:
    """A prompt with the fewest candidate sets that this annotator has not ranked yet."""
    sets = select(CandidateSet.prompt_id, func.count().label("n")).group_by(CandidateSet.prompt_id).subquery()
    seen = (
        select(CandidateSet.prompt_id)
        .join(Ranking, Ranking.candidate_set_id == CandidateSet.id)
        .where(Ranking.annotator_id == annotator.id)
    )
    query = (
        select(Prompt)
        .outerjoin(sets, sets.c.prompt_id == Prompt.id)
        .where(Prompt.id.not_in(seen))
        .order_by(func.coalesce(sets.c.n, 0), Prompt.id)
        .limit(1)
    )
    return session.scalar(query)


def create_set(
    session: Session,
    *,
    prompt_id: int,
    answers: list[tuple[str, int | None]],
    model_version_id: int | None,
    params: dict,
    seed: int | None = None,
    priority: float | None = None,
) -> CandidateSet:
    """Store K answers in a random order (positions are what annotators see as A, B, C…); `priority` is the reward
    ensemble's disagreement on them, when active learning scored them."""
    if len(answers) < 2:
        raise Invalid("a candidate set needs at least two answers")
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    cset = CandidateSet(prompt_id=prompt_id, model_version_id=model_version_id, params=params, priority=priority)
    session.add(cset)
    session.flush()
    for position, index in enumerate(order):
        text, tokens = answers[index]
        session.add(Candidate(candidate_set_id=cset.id, position=position, content=clean(text), token_count=tokens))
    session.flush()
    session.refresh(cset)
    return cset


@dataclass(frozen=True)
class Task:
    """What an annotator is shown: the set, its prompt's turns and its candidates as (id, position, content)."""

    set_id: int
    prompt_id: int
    messages: list[dict[str, str]]
    candidates: list[tuple[int, int, str]]


def load_task(session: Session, *, set_id: int) -> Task:
    """One query (the candidates with their set's prompt): this runs on every request for work."""
    rows = session.execute(_TASK, {"set_id": set_id}).all()
    if rows:
        return Task(set_id, rows[0].id, rows[0].messages, [(r.candidate_id, r.position, r.content) for r in rows])
    prompt = session.execute(_TASK_PROMPT, {"set_id": set_id}).one_or_none()  # a set with no candidates, or none
    if prompt is None:
        raise NotFound(f"candidate set {set_id} not found")
    return Task(set_id, prompt.id, prompt.messages, [])


def get_set(session: Session, *, set_id: int) -> CandidateSet:
    cset = session.get(CandidateSet, set_id)
    if cset is None:
        raise NotFound(f"candidate set {set_id} not found")
    return cset


def dense_ranks(ranks: dict[int, int]) -> dict[int, int]:
    """{candidate: rank} with any positive ranks → 1, 2, 3… keeping order and ties."""
    levels = {r: i + 1 for i, r in enumerate(sorted(set(ranks.values())))}
    return {c: levels[r] for c, r in ranks.items()}


def validate_ranks(set_id: int, ids: list[int], entries: list[tuple[int, int]]) -> dict[int, int]:
    """{candidate: dense rank}; every candidate of the set (`ids`) exactly once, ranks from 1."""
    named = [candidate_id for candidate_id, _ in entries]
    repeated = sorted({c for c in named if named.count(c) > 1})
    if repeated:
        raise Invalid(f"candidate {repeated[0]} is ranked more than once")
    foreign = sorted(set(named) - set(ids))
    if foreign:
        raise Invalid(f"candidate {foreign[0]} is not in set {set_id}")
    missing = sorted(set(ids) - set(named))
    if missing:
        raise Invalid(f"candidate {missing[0]} of set {set_id} has no rank")
    if any(rank < 1 for _, rank in entries):
        raise Invalid("ranks start at 1 (best)")
    return dense_ranks(dict(entries))


@dataclass(frozen=True)
class StoredRanking:
    """What submit_ranking wrote: the ranking row's fields and its entries (candidate id, dense rank)."""

    id: int
    candidate_set_id: int
    status: RankingStatus
    time_spent_ms: int | None
    created_at: datetime
    entries: list[tuple[int, int]]


def submit_ranking(
    session: Session,
    *,
    annotator: User,
    set_id: int,
    status: RankingStatus,
    entries: list[tuple[int, int]],
    flag_reason: str | None = None,
    time_spent_ms: int | None = None,
) -> StoredRanking:
    """One annotator's verdict: ranked (every candidate once), skipped, or flagged (all bad or unsafe).

    The ranking and its entries are two plain INSERTs in the caller's transaction, which commits both or neither:
    this is the hottest write of the service, and on SQLite writers take turns, so everything that can be checked
    is checked by reads before the first write (no savepoint, no ORM unit of work while others wait). Two requests
    for the same set and annotator at the same moment still meet the unique constraint: the loser gets a Conflict
    and its transaction is to be rolled back.
    """
    ids = list(session.scalars(_SET_CANDIDATES, {"set_id": set_id}))
    if not ids:  # a set always has candidates: none means there is no such set
        raise NotFound(f"candidate set {set_id} not found")
    status = RankingStatus(status)
    ranks = validate_ranks(set_id, ids, entries) if status == RankingStatus.ranked else {}
    if status != RankingStatus.ranked and entries:
        raise Invalid(f"a {status.value} set takes no ranks")
    if flag_reason is not None and len(flag_reason) > MAX_FLAG_REASON:
        raise Invalid(f"a flag reason may have at most {MAX_FLAG_REASON} characters")
    if time_spent_ms is not None and not 0 <= time_spent_ms <= MAX_TIME_SPENT_MS:
        raise Invalid("time_spent_ms must be between 0 and one day")
    if session.scalar(_MY_RANKING, {"set_id": set_id, "annotator_id": annotator.id}) is not None:
        raise Conflict(f"you have already ranked set {set_id}")
    row = {
        "candidate_set_id": set_id,
        "annotator_id": annotator.id,
        "status": status,
        "created_at": utcnow(),
        "flag_reason": clean_optional(flag_reason) if status == RankingStatus.flagged else None,
        "time_spent_ms": time_spent_ms,
    }
    try:
        ranking_id = session.execute(_INSERT_RANKING, row).scalar_one()
    except IntegrityError as exc:
        raise Conflict(f"you have already ranked set {set_id}") from exc
    if ranks:
        session.execute(
            _entries.insert(), [{"ranking_id": ranking_id, "candidate_id": c, "rank": r} for c, r in ranks.items()]
        )
    stored = sorted(ranks.items(), key=lambda item: (item[1], item[0]))
    return StoredRanking(ranking_id, set_id, status, time_spent_ms, row["created_at"], stored)


def kendall_tau_b(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-b between two rankings of the same items (lower = better; ties allowed); None if undefined."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0:
            ties_a += 1
        if db == 0:
            ties_b += 1
        if da * db > 0:
            concordant += 1
        elif da * db < 0:
            discordant += 1
    pairs = len(a) * (len(a) - 1) // 2
    denominator = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return None if denominator == 0 else (concordant - discordant) / denominator


@dataclass
class Agreement:
    overall: float | None
    per_annotator: dict[str, tuple[float, int]]  # username -> (mean tau to consensus, rankings counted)
    sets_compared: int


def agreement(session: Session) -> Agreement:
    """Kendall's tau of each ranking to its set's consensus (mean rank over the set's annotators)."""
    rows = session.execute(
        select(Ranking.id, Ranking.candidate_set_id, User.username, RankingEntry.candidate_id, RankingEntry.rank)
        .join(RankingEntry, RankingEntry.ranking_id == Ranking.id)
        .outerjoin(User, User.id == Ranking.annotator_id)
        .where(Ranking.status == RankingStatus.ranked)
    ).all()
    by_set: dict[int, dict[tuple[int, str], dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for ranking_id, set_id, username, candidate_id, rank in rows:
        by_set[set_id][(ranking_id, username or DELETED_ANNOTATOR)][candidate_id] = rank
    taus: dict[str, list[float]] = defaultdict(list)
    compared = 0
    for rankings in by_set.values():
        if len(rankings) < 2:
            continue
        compared += 1
        candidates = sorted(next(iter(rankings.values())))
        consensus = [sum(r[c] for r in rankings.values()) / len(rankings) for c in candidates]
        for (_, username), ranks in rankings.items():
            tau = kendall_tau_b([ranks[c] for c in candidates], consensus)
            if tau is not None:
                taus[username].append(tau)
    per_annotator = {u: (sum(t) / len(t), len(t)) for u, t in sorted(taus.items())}
    everything = [t for ts in taus.values() for t in ts]
    overall = sum(everything) / len(everything) if everything else None
    return Agreement(overall, per_annotator, compared)


@dataclass(frozen=True)
class AnnotatorProgress:
    left: int  # sets that still need rankings and that this annotator has not ranked (new ones are sampled on demand)
    done_today: int  # rankings, skips and flags by this annotator since midnight UTC


def annotator_progress(
    session: Session, *, annotator_id: int, per_set: int, now: datetime | None = None
) -> AnnotatorProgress:
    """The annotator's counters: tasks left for them and what they did today."""
    count = select(func.count()).select_from(_rankings).where(_rankings.c.candidate_set_id == _sets.c.id)
    mine = exists().where(_rankings.c.candidate_set_id == _sets.c.id, _rankings.c.annotator_id == annotator_id)
    open_sets = select(func.count()).select_from(_sets).where(count.scalar_subquery() < per_set, ~mine)
    midnight = (now or utcnow()).replace(hour=0, minute=0, second=0, microsecond=0)
    today = select(func.count()).where(Ranking.annotator_id == annotator_id, Ranking.created_at >= midnight)
    return AnnotatorProgress(session.scalar(open_sets) or 0, session.scalar(today) or 0)
