"""Passwords (argon2), login sessions, API tokens, CSRF tokens and the login rate limit.

Secrets never reach the database in clear: session ids and API tokens are stored as SHA-256 hashes, passwords as argon2.
"""

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeSerializer

from app.models import utcnow

API_TOKEN_PREFIX = "fw_"
SESSION_COOKIE = "flywheel_session"
CSRF_COOKIE = "flywheel_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

_hasher = PasswordHasher()
# A real hash of an unguessable password: verifying against it when the user does not exist costs the same time,
# so response timing does not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class CookieSigner:
    """Signs cookie values with the secret key, so a tampered or forged cookie is rejected before any lookup."""

    CACHE_SIZE = 4096

    def __init__(self, secret_key: str, salt: str = "flywheel-cookie") -> None:
        # A different salt per purpose: a value signed for one use never verifies for another.
        self._serializer = URLSafeSerializer(secret_key, salt=salt)
        # Every request of a browser or API client carries the same CSRF cookie, and checking its signature (key
        # derivation, HMAC, base64, JSON) was a tenth of a request's CPU. The answer depends on the value alone (these
        # signatures carry no timestamp), so it is remembered; the cache is emptied when full, so junk cannot grow it.
        self._unsigned: dict[str, str | None] = {}

    def sign(self, value: str) -> str:
        return self._serializer.dumps(value)

    def unsign(self, signed: str | None) -> str | None:
        if not signed:
            return None
        try:
            return self._unsigned[signed]
        except KeyError:
            pass
        try:
            value = self._serializer.loads(signed)
        except BadSignature:
            value = None
        value = value if isinstance(value, str) else None
        if len(self._unsigned) >= self.CACHE_SIZE:
            self._unsigned.clear()
        self._unsigned[signed] = value
        return value


@dataclass(frozen=True)
class NewSession:
    token: str
    token_hash: str
    csrf_token: str
    expires_at: datetime


def new_session(max_age_s: int) -> NewSession:
    token = secrets.token_urlsafe(32)
    return NewSession(token, sha256_hex(token), secrets.token_urlsafe(32), utcnow() + timedelta(seconds=max_age_s))


class LoginRateLimiter:
    """Sliding-window count of failed logins per username and per client address, in process memory.

    Kept out of the database on purpose: a failed login must change nothing there. With several server processes
    each keeps its own window, so the effective limit is multiplied by the process count.
    """

    def __init__(
        self, max_failures: int, window_s: float, address_factor: int = 4, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.address_factor = address_factor  # one address (an office, a NAT) may host several people
        self.clock = clock  # tests pass a fake one to step through the window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, username: str, address: str) -> int:
        """Seconds to wait before another try is allowed; 0 when allowed now."""
        now = self.clock()
        with self._lock:
            waits = []
            for key, limit in (
                (f"u:{username.lower()}", self.max_failures),
                (f"a:{address}", self.max_failures * self.address_factor),
            ):
                times = self._recent(key, now)
                if len(times) >= limit:
                    waits.append(times[0] + self.window_s - now)
            return max(1, int(max(waits)) + 1) if waits else 0

    def record_failure(self, username: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key in (f"u:{username.lower()}", f"a:{address}"):
                self._recent(key, now).append(now)

    def reset(self, username: str) -> None:
        with self._lock:
            self._failures.pop(f"u:{username.lower()}", None)
