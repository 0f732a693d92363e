"""The app's secrets, all derived from one (CDS_SMART_SESSION_SECRET, or else derived from the
audit hash key): the signature of the session cookie, the per-session CSRF token, and the key
that encrypts what the EHR granted.

The cookie carries a random session id and its signature; the database row is keyed by a hash
of that id, and the grant in it is encrypted under a key derived from the secret *and* the id:
reading the table (even with the secret) gives no usable access token without the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken

from cds_service.settings import Settings


def session_secret(settings: Settings, audit_key: str) -> str:
    """CDS_SMART_SESSION_SECRET, or one derived from the audit hash key (a secret every
    deployment has: production requires it, development keeps a random one in the data
    directory, shared by the workers), so the app needs no secret of its own to run."""
    if settings.smart_session_secret:
        return settings.smart_session_secret
    return hmac.new(audit_key.encode(), b"cds-smart-app-session", hashlib.sha256).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class SessionKeys:
    """Signs and checks session cookies; derives CSRF tokens and grant keys per session."""

    def __init__(self, secret: str):
        self._root = hashlib.sha256(secret.encode()).digest()

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._root, f"{purpose}\x1f{value}".encode(), hashlib.sha256).digest()

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def row_key(session_id: str) -> str:
        """The database key of a session: a hash, so the table holds no usable cookie."""
        return hashlib.sha256(session_id.encode()).hexdigest()

    def cookie(self, session_id: str) -> str:
        return f"{session_id}.{_b64(self._mac('cookie', session_id))}"

    def session_id(self, cookie: str | None) -> str | None:
        """The session id of a cookie whose signature holds, else None."""
        if not cookie or len(cookie) > 200 or "." not in cookie:
            return None
        session_id, _, signature = cookie.rpartition(".")
        expected = _b64(self._mac("cookie", session_id))
        return session_id if hmac.compare_digest(signature, expected) else None

    def csrf(self, session_id: str) -> str:
        return _b64(self._mac("csrf", session_id))

    def csrf_ok(self, session_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf(session_id))

    def _fernet(self, session_id: str) -> Fernet:
        return Fernet(base64.urlsafe_b64encode(self._mac("grant", session_id)))

    def seal(self, session_id: str, plain: bytes) -> str:
        return self._fernet(session_id).encrypt(plain).decode()

    def open(self, session_id: str, sealed: str) -> bytes | None:
        """The plain bytes, or None when they were not sealed for this session and secret."""
        try:
            return self._fernet(session_id).decrypt(sealed.encode())
        except (InvalidToken, ValueError):
            return None

    def seal_launch(self, plain: bytes) -> str:
        """A launch's state for its cookie (encrypted and signed: the PKCE verifier is in it)."""
        return Fernet(base64.urlsafe_b64encode(self._mac("launch", ""))).encrypt(plain).decode()

    def open_launch(self, sealed: str | None, seconds: int) -> bytes | None:
        """The launch sealed here at most ``seconds`` ago, else None."""
        if not sealed or len(sealed) > 8000:
            return None
        try:
            return Fernet(base64.urlsafe_b64encode(self._mac("launch", ""))).decrypt(
                sealed.encode(), ttl=seconds)
        except (InvalidToken, ValueError):
            return None
