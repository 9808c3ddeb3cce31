"""All of Flywheel's knobs in one place; every field is read from an env var `FLYWHEEL_<NAME>`.

Nothing here is read at import time: `Settings()` is built by the app factory and the CLI, so tests can pass their own.
"""

import os
import secrets
from enum import StrEnum
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Keys that appear in docs, examples and tutorials; a server using one of them can have its cookies forged.
WEAK_SECRET_KEYS = frozenset({"", "changeme", "change-me", "secret", "dev", "development", "flywheel", "please-change"})
MIN_SECRET_KEY_LENGTH = 32
SECRET_KEY_FILE = "secret_key"


class Environment(StrEnum):
    development = "development"
    production = "production"


class SignupMode(StrEnum):
    open = "open"
    invite_only = "invite-only"


class ActiveLearning(StrEnum):
    random = "random"
    disagreement = "disagreement"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_file=None, extra="ignore")

    environment: Environment = Field(Environment.production, description="`development` relaxes the secret key check.")
    data_dir: Path = Field(Path("./data"), description="Where the SQLite file, models and the secret key live.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file under the data dir.")
    secret_key: str | None = Field(None, description="Signs session cookies; generated into the data dir if unset.")
    signup_mode: SignupMode = Field(SignupMode.open, description="`open` or `invite-only` (admins create accounts).")
    host: str = Field("127.0.0.1", description="Address `flywheel serve` binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port `flywheel serve` binds.")
    session_max_age_s: int = Field(14 * 24 * 3600, gt=0, description="Lifetime of a login session.")
    login_max_failures: int = Field(5, gt=0, description="Failed logins per window before an account/address waits.")
    login_window_s: int = Field(300, gt=0, description="The window of the login rate limit, in seconds.")
    max_prompt_tokens: int = Field(1024, gt=0, description="Longest conversation (in tokens) a model is asked about.")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer (in tokens).")
    max_streams_per_user: int = Field(4, gt=0, description="Answers one person may have generating at once.")
    max_batch: int = Field(16, gt=0, description="Requests decoded together in one batch.")
    kv_cache_mb: float = Field(
        2048,
        gt=0,
        description="KV-cache memory the answers in flight may hold; past it new "
        "answers wait for room (never an out-of-memory crash).",
    )
    prefill_chunk: int = Field(
        512,
        gt=0,
        description="Prompt tokens prefilled per decoding step (long prompts never "
        "stall the answers already streaming).",
    )
    model_poll_s: float = Field(3.0, gt=0, description="How often each server checks for a newly active model.")
    device: str = Field("cpu", description="Where the served model runs: cpu or cuda.")
    torch_threads: int = Field(1, ge=0, description="CPU threads for serving (0: torch's default, one per core).")
    candidates_per_set: int = Field(4, ge=2, le=9, description="K: answers sampled for annotators to rank.")
    candidate_temperature: float = Field(
        1.0, ge=0, le=2, description="Sampling temperature of candidate answers (lower it for a small real model)."
    )
    candidate_top_p: float = Field(0.95, gt=0, le=1, description="Nucleus (top-p) of candidate answers.")
    candidate_max_tokens: int = Field(96, gt=0, description="Longest candidate answer (in tokens).")
    annotations_per_set: int = Field(3, ge=1, description="Distinct annotators who rank each candidate set.")
    active_learning: ActiveLearning = Field(
        ActiveLearning.random,
        description="`disagreement`: the candidates job picks, and annotators first get, the sets a reward "
        "ensemble disputes most; `random`: prompts in id order, sets oldest first.",
    )
    max_body_bytes: int = Field(1024 * 1024, gt=0, description="Largest request body (uploads: 60 MiB).")
    auto_retrain_after: int = Field(0, ge=0, description="Enqueue reward + RL after this many new labels; 0 = off.")
    reward_min_labels: int = Field(
        20, ge=0, description="Labels (training rankings + thumbs) a new reward model needs to become active by itself."
    )
    cookie_secure: bool | None = Field(
        None, description="Force the Secure cookie flag; default: when the request is HTTPS."
    )

    @model_validator(mode="after")
    def _check_secret_key(self) -> "Settings":
        if self.secret_key is None or self.environment == Environment.development:
            return self
        if self.secret_key.strip().lower() in WEAK_SECRET_KEYS or len(self.secret_key) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(
                f"FLYWHEEL_SECRET_KEY is weak: use at least {MIN_SECRET_KEY_LENGTH} random characters "
                "(or unset it to have one generated into the data directory)"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'flywheel.db').resolve()}"

    def resolved_secret_key(self) -> str:
        """The configured key, or one generated once and kept in the data directory so sessions survive restarts."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / SECRET_KEY_FILE
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{SECRET_KEY_FILE}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(secrets.token_urlsafe(48))
        tmp.chmod(0o600)
        try:  # link() refuses to overwrite: when two processes race, both end up reading the one that won
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_text().strip()
