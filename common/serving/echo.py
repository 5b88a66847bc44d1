"""Echoing what a caller sent: every user string that reaches an error message or a log line goes through
`clip`, so a 20 MiB model name gives a short answer and a short log line, not 20 MiB of each."""

from __future__ import annotations

ECHO_CHARS = 64  # of one echoed value
LOG_ERROR_CHARS = 1024  # of an error message in the access log


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """`value` as text, cut to `limit` characters (marked with how much was left out); lone surrogates are
    escaped so the result always encodes."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}...(+{len(text) - limit} chars)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
