"""Credentials stay in the process that was given them: every URL cac shows or records is its public
form, and every line it writes can be scrubbed of the secrets it has seen.

A lab's stores are shared: a tracking server, a PostgreSQL database for a sweep's workers. Their URLs
carry passwords (``postgresql://user:PASSWORD@host/db``), tokens (``https://TOKEN@host/repo.git``, a
CI clone's remote) or keys in their query (``?password=``, ``?token=``). What cac records (MLflow tags
and params, work-dir files, reports, logs, console lines, job files) is read by everyone who can read
the store, so it holds :func:`public_url` of each, and the identity of a store (which store a unit's
work dir belongs to) is its public URL: a rotated password is still the same store.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["public_url", "scrub", "remember", "with_credentials", "SECRET_QUERY_KEYS"]

# Query parameters that carry a secret (libpq's ``password``, signed URLs' ``sig``, API tokens, keys).
SECRET_QUERY_KEYS = re.compile(r"pass(word|wd)?$|^pwd$|token|secret|key$|^key|signature|^sig$|credential|^auth",
                               re.IGNORECASE)
# Environment variables whose values are secrets (MLFLOW_TRACKING_PASSWORD, PGPASSWORD, AWS_SECRET_ACCESS_KEY,
# MLFLOW_TRACKING_TOKEN, ..._API_KEY): never written, and scrubbed from any line that quotes one.
# A name is secret by one of its words (split at "_"), not by a substring: mmseg's tokenizer sets
# TOKENIZERS_PARALLELISM=false, and a substring match made every "false" in every record "***".
_SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PWD", "PASS", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS"}
_SECRET_ENDINGS = ("PASSWORD", "PASSWD", "TOKEN", "SECRET")  # PGPASSWORD, APITOKEN
_NOT_SECRET = {"true", "false", "yes", "no", "on", "off", "none", "null"}  # a flag's value, whatever its name
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"`<>]+")
_SEEN: set[str] = set()  # secrets met in URLs this process was given (see remember)
_MIN_SECRET = 4  # shorter values (a user name "ci", "1") would scrub ordinary words


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError:  # an unparseable URL (a bad port, brackets): nothing to separate
        return None


def public_url(url: Optional[str]) -> str:
    """``url`` without its credentials: the user information (user and password: a token is often the
    user part) and the query parameters that name a secret are dropped; a path, a ``sqlite:///`` or
    ``journal:///`` file and an scp-like git remote (``git@host:repo``) stay as they are."""
    if not url:
        return url or ""
    parts = _split(url)
    if parts is None or not parts.scheme or len(parts.scheme) == 1:  # a path (or a Windows drive)
        return url
    userinfo, at, netloc = parts.netloc.rpartition("@")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if not SECRET_QUERY_KEYS.search(k)]
    if not at and len(kept) == len(pairs):
        return url  # nothing secret: the URL exactly as given
    query = urlencode(kept, safe="/:,")
    # assembled by hand: urlunsplit drops an empty authority ("sqlite:////abs" -> "sqlite://abs")
    slashes = "//" if url[len(parts.scheme) + 1:].startswith("//") else ""
    return (f"{parts.scheme}:{slashes}{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _secrets_of(url: str) -> set[str]:
    """The secret pieces of ``url``: its user information (whole, and the password alone) and the
    values of its secret query parameters."""
    from urllib.parse import unquote

    parts = _split(url)
    if parts is None:
        return set()
    out: set[str] = set()
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, _, password = userinfo.partition(":")
        out |= {userinfo, unquote(userinfo), password, unquote(password)}
        if not password:  # a bare token as the user part (https://TOKEN@host)
            out |= {user, unquote(user)}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if SECRET_QUERY_KEYS.search(key):
            out |= {value}
    return {s for s in out if len(s) >= _MIN_SECRET}


def remember(*urls: Optional[str]) -> None:
    """Note the secrets of ``urls`` (the stores this process was given), so :func:`scrub` removes
    them from any line that quotes them outside a URL (a driver's error message, say)."""
    for url in urls:
        if url:
            _SEEN.update(_secrets_of(url))


def secret_env_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret (MLFLOW_TRACKING_TOKEN, PGPASSWORD,
    AWS_SECRET_ACCESS_KEY, LAB_API_KEY; not TOKENIZERS_PARALLELISM or KEYBOARD_LAYOUT)."""
    words = name.upper().split("_")
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_ENDINGS) for w in words)


def _env_secrets() -> set[str]:
    return {v for k, v in os.environ.items()
            if secret_env_name(k) and len(v) >= _MIN_SECRET and v.lower() not in _NOT_SECRET}


def scrub(text: str) -> str:
    """``text`` with every URL in it made public and every known secret (:func:`remember`, and the
    values of secret environment variables) replaced by ``***``."""
    if not text:
        return text
    text = _URL.sub(lambda m: public_url(m.group(0)), text)
    for secret in sorted(_SEEN | _env_secrets(), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def with_credentials(public: Optional[str], candidates: Iterable[Optional[str]]) -> Optional[str]:
    """The first of ``candidates`` whose public form is ``public`` (a job given a public URL in its
    pickle finds the full one in the environment it inherited), else ``public`` itself."""
    if not public:
        return public
    for url in candidates:
        if url and public_url(url) == public_url(public):
            return url
    return public
