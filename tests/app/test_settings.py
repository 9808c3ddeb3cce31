"""Settings: env vars, defaults, the secret key rules."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_env_vars_set_every_knob(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_SIGNUP_MODE", "invite-only")
    monkeypatch.setenv("FLYWHEEL_PORT", "9001")
    monkeypatch.setenv("FLYWHEEL_HOST", "0.0.0.0")
    settings = Settings()
    assert settings.signup_mode.value == "invite-only" and settings.port == 9001 and settings.host == "0.0.0.0"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'flywheel.db'}"


def test_secret_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path).resolved_secret_key()
    assert len(first) >= 32
    assert Settings(data_dir=tmp_path).resolved_secret_key() == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("key", ["changeme", "secret", "short-but-random"])
def test_weak_secret_key_is_refused_outside_development(key: str) -> None:
    with pytest.raises(ValidationError, match="weak"):
        Settings(secret_key=key)
    assert Settings(secret_key=key, environment="development").secret_key == key


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(port=70000)
    with pytest.raises(ValidationError):
        Settings(signup_mode="whenever")
