"""Runtime settings that admins change while Flywheel runs, kept in the `app_settings` table.

Today that is the automatic retraining rule. The environment (`FLYWHEEL_AUTO_RETRAIN_AFTER`) gives the default; once
an admin sets a value on the admin page or through `PATCH /api/v1/settings`, the row wins. The workers read it at
every poll, so a change takes effect without restarting anything.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app.errors import Invalid
from app.models import AppSetting, User, utcnow
from app.services import jobs

AUTO_RETRAIN_AFTER = "auto_retrain_after"
MAX_AUTO_RETRAIN_AFTER = 1_000_000


@dataclass
class RetrainRule:
    """The automatic retraining rule as it stands, with where it came from (for the admin page and the API)."""

    auto_retrain_after: int  # 0: off
    source: str  # "database" (an admin set it) or "environment" (FLYWHEEL_AUTO_RETRAIN_AFTER)
    updated_at: datetime | None
    updated_by: str | None
    labels_since_last_reward_model: int


def auto_retrain_after(session: Session, *, default: int) -> int:
    """The threshold in force: the admin's value if one was set, else the environment's `default`."""
    row = session.get(AppSetting, AUTO_RETRAIN_AFTER, populate_existing=True)
    return int(row.value) if row is not None else default


def retrain_rule(session: Session, *, default: int) -> RetrainRule:
    row = session.get(AppSetting, AUTO_RETRAIN_AFTER, populate_existing=True)
    return RetrainRule(
        auto_retrain_after=int(row.value) if row is not None else default,
        source="database" if row is not None else "environment",
        updated_at=row.updated_at if row is not None else None,
        updated_by=row.updated_by.username if row is not None and row.updated_by is not None else None,
        labels_since_last_reward_model=jobs.labels_since_last_reward_model(session),
    )


def parse_threshold(text: str) -> int:
    """A form field's text → the threshold; the message says what is accepted (shown beside the field)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise Invalid("the number of labels must be a whole number (0 turns automatic retraining off)") from None
    return value


def set_auto_retrain_after(session: Session, *, value: int, user: User | None) -> AppSetting:
    """Store the threshold (0 = off) and who set it; the caller commits. Negative or absurd values are refused with a
    message rather than clamped, so the admin sees what was stored."""
    if not 0 <= value <= MAX_AUTO_RETRAIN_AFTER:
        raise Invalid(f"the number of labels must be between 0 (off) and {MAX_AUTO_RETRAIN_AFTER}")
    row = session.get(AppSetting, AUTO_RETRAIN_AFTER)
    if row is None:
        row = AppSetting(key=AUTO_RETRAIN_AFTER, value=value)
        session.add(row)
    row.value = value
    row.updated_by = user
    row.updated_at = utcnow()  # also when the value is unchanged: the row says when it was last confirmed
    session.flush()
    return row
