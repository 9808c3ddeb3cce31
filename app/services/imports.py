"""Admin data import: prompts go into the database; dialogues and corpus text become files the trainers read."""

import os
import secrets
from pathlib import Path

from sqlalchemy.orm import Session

from app.errors import Invalid
from app.services import prompts
from app.settings import Settings

MAX_IMPORT_BYTES = 50 * 1024 * 1024
IMPORT_KINDS = ("prompts", "dialogues", "corpus")


def datasets_dir(settings: Settings) -> Path:
    return settings.data_dir / "datasets"


def _save(settings: Settings, kind: str, name: str, data: bytes) -> Path:
    folder = datasets_dir(settings) / kind
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(name).name) or "upload"
    path = folder / f"{secrets.token_hex(4)}-{safe}"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def import_file(session: Session, settings: Settings, *, kind: str, filename: str, data: bytes) -> str:
    """Validate and store one upload; returns a one-line summary. A bad record rejects the whole file."""
    if kind not in IMPORT_KINDS:
        raise Invalid(f"kind must be one of: {', '.join(IMPORT_KINDS)}")
    if len(data) > MAX_IMPORT_BYTES:
        raise Invalid(f"files may be at most {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(f"{filename}: not UTF-8 text") from exc
    if kind == "prompts":
        return f"{prompts.import_jsonl(session, text=text)} new prompts"
    if kind == "dialogues":
        from ml.examples import load_dialogues

        lines = [line for line in text.splitlines() if line.strip()]
        try:
            dialogues = load_dialogues([_json(line, f"{filename}:{i}") for i, line in enumerate(lines, start=1)])
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        path = _save(settings, "dialogues", filename or "dialogues.jsonl", data)
        return f"{len(dialogues)} dialogues saved as {path.name}"
    if not text.strip():
        raise Invalid(f"{filename}: the file is empty")
    path = _save(settings, "corpus", filename or "corpus.txt", data)
    return f"{len(text.split())} words of corpus saved as {path.name}"


def _json(line: str, where: str):
    import json

    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise Invalid(f"{where}: not JSON ({exc.msg})") from exc
