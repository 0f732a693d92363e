"""Random identifiers: a card's, a suggestion's, a rating's consult id, an audit row's."""

from __future__ import annotations

import os


def new_uuid() -> str:
    """A random (version 4, RFC 4122 variant) UUID as text, as ``str(uuid.uuid4())`` gives it,
    written from 16 random bytes without building a UUID object (a hook call makes five)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
