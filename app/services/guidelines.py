"""The annotation guidelines: plain text that admins edit, kept in the data directory (shown escaped, never as HTML)."""

import os

from app.settings import Settings

DEFAULT = """Rank the answers from best to worst.

1. Correct first: an answer that states a wrong fact is worse than any correct one.
2. Then concise: say what was asked, without rambling or repeating.
3. Then polite: no rude or dismissive words.

Equal answers may share a rank (a tie). Skip (S) when you cannot judge; flag (F) when every answer is bad or unsafe.
Keys: 1–9 pick the next best answer, Shift+number ties it with the previous pick, Backspace undoes, Enter submits."""


def read(settings: Settings) -> str:
    path = settings.data_dir / "guidelines.txt"
    return path.read_text(encoding="utf-8") if path.exists() else DEFAULT


def write(settings: Settings, text: str) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "guidelines.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text.strip() + "\n", encoding="utf-8")
    os.replace(tmp, path)
