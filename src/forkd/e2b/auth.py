"""Keys and tokens of the E2B surface. The control plane's ``X-API-KEY`` is compared (constant time)
with the daemon's token, or the key of ``--e2b-key-file``. Each sandbox's envd access token
(``envdAccessToken``, checked on ``X-Access-Token``) is an HMAC of its id under a secret: the API key
when there is one (so tokens survive a daemon restart with the sandboxes), else a random secret of
this process. Neither is ever logged."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from forkd.errors import ValidationError

#: forkd sandbox ids are ``sb-`` + 16 hex digits; E2B's are lowercase alphanumerics (``[a-z0-9]+``),
#: which a dash would break in E2B's host-based routing: the E2B id is the forkd id without ``sb-``.
E2B_ID = re.compile(r"[a-z0-9]{1,61}")
FORKD_PREFIX = "sb-"


def to_e2b_id(sid: str) -> str:
    return sid[len(FORKD_PREFIX):] if sid.startswith(FORKD_PREFIX) else sid


def to_forkd_id(e2b_id: str) -> str:
    """The forkd id of an E2B id; ValidationError for one that cannot be (checked before any lookup)."""
    if not E2B_ID.fullmatch(e2b_id):
        raise ValidationError(f"invalid sandbox id {e2b_id[:80]!r}: expected lowercase letters and digits")
    return FORKD_PREFIX + e2b_id


class Keys:
    def __init__(self, api_key: bytes | None) -> None:
        self.api_key = api_key
        self._secret = hashlib.sha256(b"forkd-e2b-envd:" + api_key).digest() if api_key else secrets.token_bytes(32)

    def api_key_ok(self, given: str | None) -> bool:
        """True when no key is configured (a loopback-only daemon without a token), or ``given`` is it."""
        if self.api_key is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.api_key)

    def access_token(self, sid: str) -> str:
        return hmac.new(self._secret, sid.encode(), hashlib.sha256).hexdigest()[:40]

    def access_token_ok(self, sid: str, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.access_token(sid).encode())
