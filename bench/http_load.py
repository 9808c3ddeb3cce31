"""HTTP load: many concurrent annotators and chatters against a real `flywheel serve` process, then an audit of the
database. Annotators fetch tasks and submit rankings; chatters open conversations, chat with a tiny random model
(a few tokens per answer, so the model does not dominate) and thumb the answers up or down, changing and clearing
their votes. Every write the server acknowledged must be in the database exactly once, and nothing it did not
acknowledge may be half-written.

Run: .venv/bin/python bench/http_load.py                  (SQLite, the embedded default; about a minute)
     .venv/bin/python bench/http_load.py --db postgres    (a private schema on FLYWHEEL_TEST_POSTGRES_URL)
     --workers N (server processes, default 2), --annotators, --chatters, --duration: see --help
Last line: `ranking_writes_per_s: N lost=L p99_ms=P` (P: p99 latency of the ranking submission route).
"""

import argparse
import asyncio
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POSTGRES_URL = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RANKING_ROUTE = "POST /api/v1/annotation/sets/{id}/ranking"
# What counts against L in the last line.
LOST = (
    "rankings lost",
    "rankings doubled",
    "rankings half-written",
    "conversations lost",
    "answers lost",
    "answers half-written",
    "feedback lost",
)
UNCERTAIN = object()  # a vote whose request got no answer: the server may or may not have stored it
REASONS = ("correct", "helpful", "concise", "wrong", "unhelpful", "rambling", "rude", "unsafe", "other", None)


@dataclass
class Population:
    """What the load runs as: tokens by user name, user ids, and the candidate sets prepared before the start."""

    tokens: dict[str, str]
    user_ids: dict[str, int]
    set_ids: set[int]


@dataclass
class Ledger:
    """What the server acknowledged (2xx) and how long each request took, per route."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, dict[int | str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    rankings: dict[int, tuple[int, str, str, tuple]] = field(default_factory=dict)  # id -> (set, who, status, ranks)
    votes: dict[tuple[str, int], object] = field(default_factory=dict)  # (who, answer id) -> last value, None or ?
    conversations: set[int] = field(default_factory=set)
    answers: dict[int, tuple[int, str]] = field(default_factory=dict)  # answer id -> (user message id, content)
    unacknowledged: int = 0  # requests that failed without an answer (timeouts, dropped connections)
    measuring: bool = False
    rankings_measured: int = 0  # rankings acknowledged inside the measured window
    server_cpu_s: float = 0.0  # CPU seconds the server used inside the measured window
    client_cpu_s: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(path: Path) -> Path:
    """A random 2-layer model with a small trained tokenizer: answers cost little, so the database is what is tested."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.model import ModelConfig, Transformer
    from ml.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["Mira lives in Oslo.", "What is 3 plus 4? It is 7.", "Hello there!"] * 20, 300)
    torch.manual_seed(0)
    save_checkpoint(path, Transformer(ModelConfig.tiny(vocab_size=tokenizer.vocab_size, max_seq_len=512)), tokenizer)
    return path


def prepare(url: str, data_dir: Path, annotators: int, chatters: int, sets: int, k: int) -> Population:
    """Migrate, register the tiny model as served, create the people with their tokens, the prompts and the sets."""
    from sqlalchemy import select

    from app import migrate
    from app.db import make_engine, make_session_factory, transaction
    from app.models import ModelKind, ModelVersion, Prompt, PromptSource, Role
    from app.services import annotation, model_versions, prompts, tokens, users

    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    names = [(f"annotator{i:02d}", Role.annotator) for i in range(annotators)]
    names += [(f"chatter{i:02d}", Role.user) for i in range(chatters)]
    population = Population({}, {}, set())
    with transaction(factory) as session:
        version = ModelVersion(name="tiny", kind=ModelKind.sft, path=str(tiny_model(data_dir / "models" / "tiny")))
        session.add(version)
        session.flush()
        model_versions.promote(session, version_id=version.id)
        for name, role in names:
            user = users.create_user(session, username=name, password=secrets.token_urlsafe(12), role=role)
            population.tokens[name] = tokens.create_token(session, user=user, name="load")[1]
            population.user_ids[name] = user.id
        n_prompts = max(1, sets // 8)
        items = [
            ([{"role": "user", "content": f"Load question {i}: what is {i % 10} plus {i % 7}?"}], None)
            for i in range(n_prompts)
        ]
        prompts.add_prompts(session, items=items, source=PromptSource.imported)
        prompt_ids = list(session.scalars(select(Prompt.id).order_by(Prompt.id)))
        for i in range(sets):
            answers = [(f"Answer {j} to set {i}: it is {j + i % 9}.", 12) for j in range(k)]
            cset = annotation.create_set(
                session,
                prompt_id=prompt_ids[i % len(prompt_ids)],
                answers=answers,
                model_version_id=version.id,
                params={},
                seed=i,
            )
            population.set_ids.add(cset.id)
    engine.dispose()
    return population


async def timed(ledger: Ledger, route: str, request) -> httpx.Response | None:
    """Send one request, record its latency (while measuring) and any error; None when no answer came back."""
    start = time.perf_counter()
    try:
        response = await request
    except httpx.HTTPError as exc:
        ledger.errors[route][type(exc).__name__] += 1
        ledger.unacknowledged += 1
        return None
    if ledger.measuring:
        ledger.latencies[route].append(time.perf_counter() - start)
    if response.status_code >= 400:
        ledger.errors[route][response.status_code] += 1
    return response


def a_ranking(candidates: list[dict], rng: random.Random) -> dict:
    """Mostly full rankings (sometimes with ties), a few skips and flags, as annotators do."""
    roll = rng.random()
    if roll < 0.05:
        return {"status": "skipped", "time_spent_ms": rng.randrange(500, 5000)}
    if roll < 0.08:
        return {"status": "flagged", "flag_reason": "all unsafe", "time_spent_ms": rng.randrange(500, 5000)}
    ranks = [rng.randint(1, len(candidates)) for _ in candidates]
    ranking = [{"candidate_id": c["id"], "rank": r} for c, r in zip(candidates, ranks, strict=True)]
    return {"status": "ranked", "ranking": ranking, "time_spent_ms": rng.randrange(1000, 60000)}


async def annotate(client: httpx.AsyncClient, name: str, ledger: Ledger, stop: asyncio.Event, seed: int) -> None:
    """Fetch the next task, rank it, repeat until the time is up or nothing is left."""
    rng = random.Random(seed)
    while not stop.is_set():
        task = await timed(ledger, "GET /api/v1/annotation/next", client.get("/api/v1/annotation/next"))
        if task is None or task.status_code != 200:
            if task is not None and task.status_code == 204:
                return
            continue
        body = task.json()
        verdict = a_ranking(body["candidates"], rng)
        url = f"/api/v1/annotation/sets/{body['set_id']}/ranking"
        response = await timed(ledger, RANKING_ROUTE, client.post(url, json=verdict))
        if response is not None and response.status_code == 201:
            stored = response.json()
            ranks = tuple(sorted((e["candidate_id"], e["rank"]) for e in stored["ranking"]))
            ledger.rankings[stored["id"]] = (body["set_id"], name, stored["status"], ranks)


async def chat(
    client: httpx.AsyncClient, name: str, ledger: Ledger, stop: asyncio.Event, seed: int, max_tokens: int
) -> None:
    """Open a conversation, send a few messages, vote on each answer (sometimes changing or clearing the vote)."""
    rng = random.Random(seed)
    while not stop.is_set():
        created = await timed(ledger, "POST /api/v1/conversations", client.post("/api/v1/conversations", json={}))
        if created is None or created.status_code != 201:
            continue
        conversation = created.json()["id"]
        ledger.conversations.add(conversation)
        for turn in range(rng.randint(1, 4)):
            if stop.is_set():
                return
            body = {
                "content": f"Question {turn}: what is {rng.randrange(10)} plus {rng.randrange(10)}?",
                "max_tokens": max_tokens,
                "temperature": 1.0,
                "seed": rng.randrange(1 << 30),
            }
            url = f"/api/v1/conversations/{conversation}/messages"
            sent = await timed(ledger, "POST /api/v1/conversations/{id}/messages", client.post(url, json=body))
            if sent is None or sent.status_code != 201:
                continue
            exchange = sent.json()
            answer = exchange["answer"]["id"]
            ledger.answers[answer] = (exchange["user_message"]["id"], exchange["answer"]["content"])
            await vote(client, name, answer, ledger, rng)


async def vote(client: httpx.AsyncClient, name: str, answer: int, ledger: Ledger, rng: random.Random) -> None:
    """One to three votes on an answer; a fifth of the time the last step clears it."""
    url = f"/api/v1/messages/{answer}/feedback"
    for _ in range(rng.randint(1, 3)):
        value = rng.choice((1, -1))
        body = {"value": value, "reason": rng.choice(REASONS), "comment": rng.choice((None, "load test"))}
        response = await timed(ledger, "PUT /api/v1/messages/{id}/feedback", client.put(url, json=body))
        if response is None:
            ledger.votes[(name, answer)] = UNCERTAIN
        elif response.status_code == 200:
            ledger.votes[(name, answer)] = value
    if rng.random() < 0.2:
        response = await timed(ledger, "DELETE /api/v1/messages/{id}/feedback", client.delete(url))
        if response is None:
            ledger.votes[(name, answer)] = UNCERTAIN
        elif response.status_code == 204:
            ledger.votes[(name, answer)] = None


async def wait_until_serving(base: str, token: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until the server answers and has loaded the model."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                if (await client.get("/v1/models")).json().get("data"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the server did not come up with a model in time")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far, from /proc; 0 where there is no /proc."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        total += sum(cpu_seconds(int(child)) for child in children.read_text().split())
    return total


async def run_load(
    base: str, population: Population, args: argparse.Namespace, server_pid: int
) -> tuple[Ledger, float]:
    """All clients at once: a warm-up (not measured), then `duration` seconds measured; returns the ledger, seconds."""
    ledger, stop = Ledger(), asyncio.Event()
    clients = []
    jobs = []
    for i, (name, token) in enumerate(sorted(population.tokens.items())):
        client = httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            limits=httpx.Limits(max_connections=1),
        )
        clients.append(client)
        if name.startswith("annotator"):
            jobs.append(annotate(client, name, ledger, stop, seed=i))
        else:
            jobs.append(chat(client, name, ledger, stop, seed=i, max_tokens=args.max_tokens))
    tasks = [asyncio.create_task(job) for job in jobs]
    await asyncio.sleep(args.warmup)
    ledger.measuring = True
    acked_before = len(ledger.rankings)
    start, cpu_start, client_start = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
    await asyncio.sleep(args.duration)
    seconds = time.perf_counter() - start
    ledger.measuring = False
    ledger.server_cpu_s = cpu_seconds(server_pid) - cpu_start
    ledger.client_cpu_s = time.process_time() - client_start
    ledger.rankings_measured = len(ledger.rankings) - acked_before
    stop.set()
    await asyncio.gather(*tasks)
    for client in clients:
        await client.aclose()
    return ledger, seconds


def audit(url: str, ledger: Ledger, population: Population) -> dict[str, int]:
    """Compare the database with what the server acknowledged; count what is lost, doubled or half-written."""
    from app.db import make_engine, make_session_factory

    engine = make_engine(url)
    names = {uid: name for name, uid in population.user_ids.items()}
    try:
        with make_session_factory(engine)() as session:
            return {**audit_rankings(session, ledger, names, population), **audit_chat(session, ledger, names)}
    finally:
        engine.dispose()


def audit_rankings(session, ledger: Ledger, names: dict[int, str], population: Population) -> dict[str, int]:
    """Each acknowledged ranking is stored once, as acknowledged; every stored one names all its set's candidates."""
    from sqlalchemy import func, select

    from app.models import Candidate, CandidateSet, Ranking, RankingEntry

    entries: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for ranking_id, candidate_id, rank in session.execute(
        select(RankingEntry.ranking_id, RankingEntry.candidate_id, RankingEntry.rank)
    ):
        entries[ranking_id].append((candidate_id, rank))
    set_candidates: dict[int, set[int]] = defaultdict(set)
    for set_id, candidate_id in session.execute(select(Candidate.candidate_set_id, Candidate.id)):
        set_candidates[set_id].add(candidate_id)
    stored = {r.id: r for r in session.scalars(select(Ranking))}
    report = defaultdict(int)
    for ranking_id, (set_id, name, status, ranks) in ledger.rankings.items():
        row = stored.get(ranking_id)
        found = row and (row.candidate_set_id, names.get(row.annotator_id), row.status.value)
        report["rankings lost"] += found != (set_id, name, status) or tuple(sorted(entries[ranking_id])) != ranks
    for ranking_id, row in stored.items():
        report["rankings unacknowledged"] += ranking_id not in ledger.rankings
        whole = {c for c, _ in entries[ranking_id]} == set_candidates[row.candidate_set_id]
        report["rankings half-written"] += not whole if row.status.value == "ranked" else bool(entries[ranking_id])
    pairs = session.execute(select(Ranking.candidate_set_id, Ranking.annotator_id).distinct()).all()
    report["rankings doubled"] = len(stored) - len(pairs)
    sets = session.scalar(select(func.count(CandidateSet.id)))
    report["sets sampled during the run"] = sets - len(population.set_ids)
    return report


def audit_chat(session, ledger: Ledger, names: dict[int, str]) -> dict[str, int]:
    """Acknowledged conversations and answers are there as acknowledged, and each person's last acknowledged vote on
    an answer is the one stored (or none, after an acknowledged clear); no answer is left half-written."""
    from sqlalchemy import select

    from app.models import Conversation, Feedback, Message

    report = defaultdict(int)
    conversations = set(session.scalars(select(Conversation.id)))
    report["conversations lost"] = len(ledger.conversations - conversations)
    messages = {m.id: m for m in session.scalars(select(Message))}
    for answer_id, (user_message_id, content) in ledger.answers.items():
        answer = messages.get(answer_id)
        report["answers lost"] += answer is None or answer.content != content or user_message_id not in messages
    report["answers half-written"] = sum(m.finish_reason == "streaming" for m in messages.values())
    votes = {(names[f.user_id], f.message_id): f.value for f in session.scalars(select(Feedback))}
    for key, value in ledger.votes.items():
        if value is UNCERTAIN:  # a request that got no answer may or may not have landed
            report["votes uncertain"] += 1
        else:
            report["feedback lost"] += votes.get(key) != value
    report["feedback unacknowledged"] = sum(key not in ledger.votes for key in votes)
    return report


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else sum(values)


def print_report(ledger: Ledger, seconds: float, report: dict[str, int]) -> tuple[float, int, float]:
    """The table per route and the audit; returns (ranking writes/s, lost, ranking p99 ms)."""
    print(f"{'route':<46} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  errors")
    total = 0
    for route in sorted(set(ledger.latencies) | set(ledger.errors)):
        times = ledger.latencies.get(route, [])
        total += len(times)
        errors = ", ".join(f"{code}: {n}" for code, n in sorted(ledger.errors[route].items(), key=str)) or "-"
        p50, p99 = (percentile(times, 50) * 1000, percentile(times, 99) * 1000) if times else (0, 0)
        print(f"{route:<46} {len(times):>9} {len(times) / seconds:>8.1f} {p50:>8.1f} {p99:>8.1f}  {errors}")
    print(f"{'all routes':<46} {total:>9} {total / seconds:>8.1f}")
    print(f"requests without an answer: {ledger.unacknowledged}")
    print(
        f"CPU in the measured window: server {ledger.server_cpu_s:.1f} s ({ledger.server_cpu_s / seconds:.2f} cores, "
        f"{1000 * ledger.server_cpu_s / max(total, 1):.2f} ms a request), clients {ledger.client_cpu_s:.1f} s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"acknowledged: {len(ledger.rankings)} rankings, {len(ledger.answers)} answers, "
        f"{len(ledger.votes)} final votes (including warm-up and drain)"
    )
    print("audit: " + ", ".join(f"{key} {value}" for key, value in sorted(report.items())))
    lost = sum(report.get(key, 0) for key in LOST)
    ranking_times = ledger.latencies.get(RANKING_ROUTE, [])
    p99 = percentile(ranking_times, 99) * 1000 if ranking_times else float("nan")
    return ledger.rankings_measured / seconds, lost, p99


def postgres_schema() -> tuple[str, callable]:
    """A fresh schema on the PostgreSQL server; returns its URL and a function that drops it."""
    from sqlalchemy import create_engine, text

    from app.db import normalise_url

    base = normalise_url(POSTGRES_URL)
    schema = f"load_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}", drop


def serve(url: str, data_dir: Path, port: int, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    """`flywheel serve` as a child process, as people run it (without the training worker, and without the access log:
    a line per request, written to the log file, is not what is measured)."""
    env = {
        **os.environ,
        "FLYWHEEL_DATA_DIR": str(data_dir),
        "FLYWHEEL_DATABASE_URL": url,
        "FLYWHEEL_SECRET_KEY": secrets.token_urlsafe(40),
        "FLYWHEEL_MODEL_POLL_S": "1",
    }
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--no-worker",
        "--no-bootstrap",
        "--no-access-log",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
    ]
    with log_path.open("w") as log:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def describe(args: argparse.Namespace) -> str:
    return (
        f"flywheel serve --workers {args.workers} --no-worker --no-access-log on {args.db}: "
        f"{args.annotators} annotators, {args.chatters} chatters, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--annotators", type=int, default=16)
    parser.add_argument("--chatters", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--sets", type=int, default=4000, help="candidate sets prepared (3 rankings each)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="server processes (`flywheel serve --workers`): one a core of the 2-core reference machine",
    )
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per chat answer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        sqlite = (f"sqlite:///{data_dir / 'flywheel.db'}", lambda: None)
        url, drop = sqlite if args.db == "sqlite" else postgres_schema()
        try:
            started = time.perf_counter()
            population = prepare(url, data_dir, args.annotators, args.chatters, args.sets, k=4)
            print(
                f"prepared {len(population.tokens)} people and {args.sets} candidate sets on {args.db} "
                f"in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
            port, log_path = free_port(), Path(tmp) / "server.log"
            server = serve(url, data_dir, port, args, log_path)
            try:
                base = f"http://127.0.0.1:{port}"
                asyncio.run(wait_until_serving(base, next(iter(population.tokens.values())), server))
                print(describe(args))
                ledger, seconds = asyncio.run(run_load(base, population, args, server.pid))
            finally:
                server.terminate()
                server.wait(30)
            report = audit(url, ledger, population)
            rate, lost, p99 = print_report(ledger, seconds, report)
            if any(ledger.errors.values()):
                print("server log tail:\n" + "".join(log_path.read_text().splitlines(True)[-20:]), file=sys.stderr)
        finally:
            drop()
    print(f"ranking_writes_per_s: {rate:.0f} lost={lost} p99_ms={p99:.1f}")


if __name__ == "__main__":
    main()
