"""Secrets never leave the driver in what it records or prints: MLflow params, tags, run names and the logged config,
and the console (log lines, the summary, errors and tracebacks).

What counts as a secret:

* the value of a key that names one (``password``, ``token``, ``secret``, ``access_key``...: :data:`SECRET_HINTS`), in
  ``key=value`` overrides, ``key: value`` lines of the config and URL query parameters (a presigned URL's signature);
* the password of a URI (``scheme://user:password@host``: a database, a tracking server with basic auth);
* values shaped like well-known credentials wherever they stand (:data:`TOKEN_SHAPES`: AWS access key ids, GitHub,
  Hugging Face, Slack and OpenAI tokens, JWTs, ``Bearer``/``Basic`` authorisations);
* the value of every environment variable of this process whose name names a secret (``MLFLOW_TRACKING_PASSWORD``,
  ``AWS_SECRET_ACCESS_KEY``, ``RAY_AUTH_TOKEN``...), wherever it appears: a credential the pipeline reads from the
  environment cannot come back out in a config value, an error message or a URI.

Each becomes ``***``. :func:`redact` does it to text; :func:`redact_console` to everything the process writes to
its stdout and stderr (Hydra's own errors included), :func:`install_console_filter` to every log record the driver's
handlers write (Hydra's log file too).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

SECRET_HINTS = (
    "password", "passwd", "secret", "token", "key_id", "access_key", "api_key", "apikey", "private_key",
    "credential", "signature", "authorization",
)  # fmt: skip
MASK = "***"
MIN_ENV_SECRET_LEN = 6  # shorter environment values (a "0", a "true") are not worth hiding and would mangle text
_HINT = "|".join(SECRET_HINTS)
# scheme://user:password@host -> scheme://user:***@host
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^/\s:@]*):[^/\s@]+@")
# key: value / key=value at the start of a line (the config, one override)
_SECRET_LINE = re.compile(rf"(?im)^(?P<key>\s*[+~]*[\w.-]*(?:{_HINT})[\w.-]*\s*[:=]\s*)\S.*$")
# ?key=value / &key=value in a URL (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, access_token...)
_SECRET_QUERY = re.compile(rf"(?i)(?P<key>[?&](?:[\w.-]*(?:{_HINT})[\w.-]*|sig)=)[^&\s#'\"]+")
TOKEN_SHAPES = (
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",  # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
    r"\bhf_[A-Za-z0-9]{30,}\b",  # Hugging Face
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b",  # Slack
    r"\bsk-[A-Za-z0-9_-]{20,}\b",  # OpenAI and others
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b",  # a JWT
    r"(?<=\b[Bb]earer )[A-Za-z0-9._~+/=-]{8,}",
    r"(?<=\b[Bb]asic )[A-Za-z0-9+/=]{8,}",
)
_TOKENS = re.compile("|".join(f"(?:{shape})" for shape in TOKEN_SHAPES))


def is_secret_key(key: str) -> bool:
    """Whether a config key, parameter or variable name names a secret."""
    return any(hint in key.lower() for hint in SECRET_HINTS)


def environment_secrets(environ: os._Environ | dict[str, str] | None = None) -> list[str]:
    """The values of the environment variables whose names name a secret, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_key(k) and len(v) >= MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every secret of the module docstring replaced by ``***``."""
    for value in environment_secrets():
        text = text.replace(value, MASK)
    text = _URI_PASSWORD.sub(rf"\g<head>:{MASK}@", text)
    text = _SECRET_QUERY.sub(rf"\g<key>{MASK}", text)
    text = _TOKENS.sub(MASK, text)
    return _SECRET_LINE.sub(rf"\g<key>{MASK}", text)


def redact_value(key: str, value: Any) -> str:
    """A parameter's value as it may be recorded: all of it hidden when its key names a secret."""
    return MASK if is_secret_key(key) else redact(str(value))


def redact_overrides(overrides: list[str]) -> str:
    """Hydra's command-line overrides as one string, each ``key=value`` redacted on its own."""
    return " ".join(redact(o) for o in overrides)


class RedactingFilter(logging.Filter):
    """Redacts a log record's message (arguments and any traceback folded in) before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_console_filter(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger Hydra configures), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class RedactingStream:
    """A text stream that redacts what is written to it before passing it on (everything else is the stream's)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def redact_console() -> None:
    """Redact everything this process writes to stdout and stderr from now on (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
