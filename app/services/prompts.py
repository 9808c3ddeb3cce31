"""Prompts to be answered and ranked: imported (JSONL), from the demo world, or from chats that allow training."""

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Invalid
from app.models import Conversation, Message, MessageRole, Prompt, PromptSource, Split
from app.services.chat import STREAMING, visible_thread
from app.services.text import clean as clean_text

MAX_PROMPT_MESSAGES = 50
ROLES = {"system", "user", "assistant"}


def content_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def split_for(messages: list[dict[str, str]], heldout_fraction: float = 0.2) -> Split:
    """A stable split from the text itself, so the same prompt lands on the same side on every server."""
    digest = int(content_hash(messages)[:8], 16)
    return Split.heldout if digest / 0xFFFFFFFF < heldout_fraction else Split.train


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A prompt is a list of {role, content} turns ending with a user turn."""
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_PROMPT_MESSAGES:
        raise Invalid(f"{where}: `messages` must be a list of 1–{MAX_PROMPT_MESSAGES} turns")
    clean = []
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise Invalid(f"{where}: each turn needs a role (system/user/assistant) and a text content")
        if not turn["content"].strip():
            raise Invalid(f"{where}: a turn has empty content")
        clean.append({"role": turn["role"], "content": clean_text(turn["content"])})
    if clean[-1]["role"] != "user":
        raise Invalid(f"{where}: the last turn must be the user's")
    return clean


def add_prompts(
    session: Session, *, items: Iterable[tuple[list[dict[str, str]], Split | None]], source: PromptSource
) -> int:
    """Insert prompts not seen before; returns how many were new."""
    existing = set(session.scalars(select(Prompt.content_hash)))
    added = 0
    for messages, split in items:
        digest = content_hash(messages)
        if digest in existing:
            continue
        existing.add(digest)
        session.add(Prompt(messages=messages, content_hash=digest, source=source, split=split or split_for(messages)))
        added += 1
    session.flush()
    return added


def import_jsonl(session: Session, *, text: str) -> int:
    """One prompt per line: {"messages": [...]} (optionally "split"), or {"prompt": "text"}. All or nothing."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Invalid(f"line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise Invalid(f"line {number}: expected an object")
        messages = record.get("messages")
        if messages is None and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        split = record.get("split")
        if split is not None and split not in {"train", "heldout"}:
            raise Invalid(f"line {number}: split must be train or heldout")
        items.append((validate_messages(messages, f"line {number}"), Split(split) if split else None))
    if not items:
        raise Invalid("no prompts in the file")
    return add_prompts(session, items=items, source=PromptSource.imported)


def _conversations_with_new_turns(session: Session) -> list[int]:
    """Chats that allow training and have a user turn that is not a prompt yet: only these need reading."""
    has_prompt = exists().where(Prompt.source_message_id == Message.id)
    query = (
        select(Message.conversation_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.allow_training.is_(True), Message.role == MessageRole.user, ~has_prompt)
        .distinct()
        .order_by(Message.conversation_id)
    )
    return list(session.scalars(query))


def _untaken_turns(session: Session, conversation_id: int) -> dict[str, tuple[Message, list[dict[str, str]]]]:
    """{content hash: (user turn, its context)} for the chat's user turns that are not a prompt yet."""
    messages = list(
        session.scalars(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))
    )
    ids = [m.id for m in messages]
    done = set(session.scalars(select(Prompt.source_message_id).where(Prompt.source_message_id.in_(ids))))
    context: list[dict[str, str]] = []
    new: dict[str, tuple[Message, list[dict[str, str]]]] = {}
    for message, _ in visible_thread(messages):
        if message.finish_reason == STREAMING or not message.content:
            continue
        context.append({"role": message.role.value, "content": message.content})
        if message.role == MessageRole.user and message.id not in done:
            new.setdefault(content_hash(context), (message, list(context)))
    known = set(session.scalars(select(Prompt.content_hash).where(Prompt.content_hash.in_(list(new)))))
    return {digest: item for digest, item in new.items() if digest not in known}


def sync_chat_prompts(session: Session) -> int:
    """Turn user turns of chats that allow training into prompts (their context up to that turn).

    Reads only the chats with a turn that is not a prompt yet (a chat whose training was switched off and on again
    is read again: its prompts were withdrawn, so they come back as new prompts with no rankings), and inserts each
    prompt on its own savepoint: two annotators asking for work at the same moment both sync, and the one that loses
    a race skips that prompt.

    A withdrawal (app/services/withdrawal.py) committing meanwhile must not leave a prompt behind. On PostgreSQL the
    chat is read under a share lock that the withdrawal's row lock waits for (or that waits for it); on SQLite, where
    writers take turns, the chat is read again after the inserts, which see any withdrawal committed before them.
    """
    added = 0
    for conversation_id in _conversations_with_new_turns(session):
        allowed = select(Conversation.allow_training).where(Conversation.id == conversation_id)
        if not session.scalar(allowed.with_for_update(read=True)):
            continue
        inserted: list[int] = []
        for digest, (message, turns) in _untaken_turns(session, conversation_id).items():
            prompt = Prompt(
                messages=turns,
                content_hash=digest,
                source=PromptSource.chat,
                source_message_id=message.id,
                split=split_for(turns),
            )
            try:
                with session.begin_nested():
                    session.add(prompt)
                inserted.append(prompt.id)
            except IntegrityError:  # the same prompt, inserted by a concurrent request
                continue
        if inserted and not session.scalar(allowed):  # withdrawn while this read the chat
            session.execute(delete(Prompt).where(Prompt.id.in_(inserted)))
            continue
        added += len(inserted)
    return added
