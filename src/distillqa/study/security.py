"""The study server's secrets: the admin password hash, signed cookies, CSRF tokens, keyed rater
hashes for exports, spreadsheet-safe cells, and a per-client rate limiter.

Every keyed value comes from the study's own random `secret.key` (written by `study create`), so
a token, cookie or export hash from one study means nothing in another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

from distillqa.errors import ConfigError

MIN_PASSWORD_LENGTH = 8
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # about 16 MiB and 50 ms per check: slow for guessing, fine for a login


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"admin password: must be at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    _, n, r, p, salt, digest = stored.split("$")
    given = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(given.hex(), digest)


class Keys:
    """Everything derived from the study's secret key."""

    def __init__(self, secret: bytes):
        self.secret = secret

    def mac(self, purpose: str, value: str, length: int = 32) -> str:
        return hmac.new(self.secret, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()[:length]

    def sign(self, value: str) -> str:
        return f"{value}.{self.mac('cookie', value)}"

    def unsign(self, signed: str | None) -> str | None:
        """The value of a signed cookie, or None if it is missing or was not signed with this key."""
        if not signed or "." not in signed:
            return None
        value, mac = signed.rsplit(".", 1)
        return value if hmac.compare_digest(mac, self.mac("cookie", value)) else None

    def csrf_token(self, session: str) -> str:
        """Bound to the signed session cookie, so a page of another site cannot know it."""
        return self.mac("csrf", session)

    def csrf_ok(self, session: str | None, token: str | None) -> bool:
        return bool(session and token) and hmac.compare_digest(token, self.csrf_token(session))

    def rater_token(self, number: int) -> str:
        """A per-rater link token, checkable without storing it: the number and its MAC."""
        return f"{number}-{self.mac('rater-link', str(number), 20)}"

    def rater_token_number(self, token: str) -> int | None:
        number, _, _ = token.partition("-")
        if not number.isdigit() or len(number) > 9:
            return None
        return int(number) if hmac.compare_digest(token, self.rater_token(int(number))) else None

    def rater_hash(self, external_id: str) -> str:
        """What exports say instead of a platform id: stable within this study, meaningless without its key."""
        return "r-" + self.mac("rater-export", external_id, 16)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell):
    """A text cell that a spreadsheet would run as a formula gets a leading apostrophe; other cells are unchanged."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


class RateLimiter:
    """Token buckets per client key: `rate` requests a second on average, bursts of up to `burst`."""

    MAX_KEYS = 100_000  # forget idle clients beyond this, so a flood of new keys cannot fill memory

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last update)
        self.lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            if len(self.buckets) > self.MAX_KEYS:
                self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < self.burst / self.rate}
            tokens, last = self.buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1
            self.buckets[key] = (tokens - 1 if allowed else tokens, now)
            return allowed

    def retry_after(self) -> int:
        return max(1, round(1 / self.rate))
