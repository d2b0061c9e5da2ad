"""Secrets never land in a store: credentials inside URLs are masked before a URL is recorded.

Storage options (``key``, ``secret``, tokens for ``s3://``...) are never part of the recorded config at all
(``RunConfig.identity`` leaves them out); what remains are URLs that carry credentials themselves:
``https://user:password@host/...`` and pre-signed URLs (``?X-Amz-Signature=...``, ``?token=...``). Every URL
or message written into the store's attributes, its ``path`` and ``error`` arrays, or the evaluation's files
goes through :func:`redact`; the actors still read the real URL.
"""
from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s?#]+@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<name>[?&][^=&\s]*(?:signature|token|secret|credential|password|passwd|sig|key)[^=&\s]*=)[^&\s#]*")


def redact(text: str) -> str:
    """``text`` with the user-info of URLs and the values of secret-looking query parameters masked."""
    if not text or "://" not in text and "?" not in text:
        return text
    return _SECRET_QUERY.sub(rf"\g<name>{MASK}", _USERINFO.sub(rf"\g<scheme>{MASK}@", text))
