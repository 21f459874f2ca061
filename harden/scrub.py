"""The one scrubber every outgoing message passes through: the active Hub token and URL credentials become `***`.

Why one place: a token reaches text by many roads (a server or proxy that echoes the Authorization header in its
error, `HF_ENDPOINT=https://user:pass@host`, a prompt URL with credentials, a recipe copied into report.json), and
messages leave by many doors (errors on the terminal, progress logs, report.json, the model card). Every HardenError
scrubs its message and hint when it is made, the CLI scrubs what it prints, and the export scrubs the report.
"""

from __future__ import annotations

import base64
import os
import re
import sys

MASK = "***"
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]+@")  # scheme://user:pass@host -> scheme://***@host
_AUTH_HEADER = re.compile(r"(?i)\b(authorization|proxy-authorization)(['\"]?\s*[:=]\s*['\"]?)(bearer|basic|token)?"
                          r"\s*[^\s'\",;]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")  # the shape of a Hugging Face user access token
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """A secret this process uses besides the environment's (e.g. `push_export(token=...)`): scrub it too."""
    if value and len(value) >= 4:
        _registered.add(value)


def active_secrets() -> list[str]:
    """The token huggingface_hub would send (env or `hf auth login`), URL passwords of HF_ENDPOINT, and registered
    ones; longest first so that a secret containing another is masked whole."""
    found = set(_registered)
    found.update(os.environ[name] for name in _TOKEN_VARS if os.environ.get(name))
    if "huggingface_hub" in sys.modules:  # only then can its stored token have been sent anywhere
        try:
            from huggingface_hub.utils import get_token

            found.add(get_token() or "")
        except Exception:  # noqa: BLE001 - a broken token store must not break error reporting
            pass
    endpoint = os.environ.get("HF_ENDPOINT", "")
    match = re.match(r"(?i)[a-z][a-z0-9+.-]*://([^/?#@\s]+)@", endpoint)
    if match:  # user:password -> the password; a lone user part is a token (https://TOKEN@host)
        user, _, password = match.group(1).partition(":")
        found.add(password or user)
        found.add(base64.b64encode(match.group(1).encode()).decode())  # as a Basic Authorization header sends it
    return sorted((s for s in found if s and len(s) >= 4), key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` without the active secrets, URL userinfo, Authorization header values or anything token-shaped."""
    if not text:
        return text
    text = str(text)
    for secret in active_secrets():
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) + " " if m.group(3) else "") + MASK,
                            text)
    return _HF_TOKEN.sub(MASK, text)


def scrub_data(value):
    """`scrub` applied to every string (keys included) of a JSON-like structure; other values unchanged."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_data(k): scrub_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_data(v) for v in value)
    return value
