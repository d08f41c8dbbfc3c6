"""Keep credentials out of configs and out of what ``ckf submit`` prints.

Two jobs: :func:`find_secrets` refuses a run config (or runtime_env file) that carries a
credential, because configs are uploaded to the cluster, stored in checkpoints and shown
in the dashboard; :class:`Redactor` masks the values of credentials the user passed
through with ``--env`` (and any secret-looking variable of the local environment) in every
line of job output that we print.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

MASK = "****"

# Names of keys / environment variables whose value is a credential. Matched against the
# last component of a dotted key (``train.extra_env.AWS_SECRET_ACCESS_KEY``). Plain
# ``token`` is left out on purpose: tokenizer settings such as ``pad_token`` are not secrets.
_SECRET_NAME = re.compile(
    r"(^|[_.\-])("
    r"secret|secrets|secret[_-]?key|secret[_-]?access[_-]?key|client[_-]?secret|"
    r"password|passwd|pwd|passphrase|"
    r"api[_-]?key|apikey|access[_-]?key|access[_-]?key[_-]?id|private[_-]?key|"
    r"session[_-]?token|auth[_-]?token|access[_-]?token|refresh[_-]?token|bearer[_-]?token|"
    r"hf[_-]?token|huggingface[_-]?token|github[_-]?token|wandb[_-]?api[_-]?key|"
    r"credential|credentials|connection[_-]?string"
    r")$",
    re.IGNORECASE,
)

# Values that are credentials whatever key holds them.
_SECRET_VALUE = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "a GitHub token"),
    (re.compile(r"\b[a-z][a-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@"), "a URL with a password in it"),
]


def is_secret_name(name: str) -> bool:
    """True when a key or environment variable name says that its value is a credential."""
    return bool(_SECRET_NAME.search(str(name)))


def _walk(node: object, prefix: str) -> Iterable[tuple[str, object]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key, v
            yield from _walk(v, key)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            key = f"{prefix}[{i}]"
            yield key, v
            yield from _walk(v, key)


def find_secrets(data: object) -> list[str]:
    """Dotted keys of ``data`` (a parsed config) that hold a credential, with the reason."""
    found = []
    for key, value in _walk(data, ""):
        if isinstance(value, (Mapping, list, tuple)) or value in (None, "", False):
            continue
        last = re.split(r"[.\[]", key)[-1]
        if is_secret_name(last):
            found.append(f"{key} (its name says it holds a credential)")
            continue
        if isinstance(value, str):
            for pattern, what in _SECRET_VALUE:
                if pattern.search(value):
                    found.append(f"{key} (its value looks like {what})")
                    break
    return found


def local_secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the local environment variables whose names say they are credentials."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if is_secret_name(k) and v]


class Redactor:
    """Replaces known secret values with ``****`` in streamed text, across chunk boundaries.

    Log chunks are split anywhere; a secret cut in two would slip through a per-chunk
    replace, so :meth:`feed` only releases text up to the last complete line.
    """

    def __init__(self, secrets: Iterable[str] = ()):
        # Short values would mask ordinary words ("1", "us"), so only values of 4+ chars.
        values = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None
        self._pending = ""

    def __call__(self, text: str) -> str:
        """Mask a complete piece of text."""
        text = self._pattern.sub(MASK, text) if self._pattern else text
        for pattern, _ in _SECRET_VALUE[:4]:
            text = pattern.sub(MASK, text)
        return text

    def feed(self, chunk: str) -> str:
        """Mask a streamed chunk; returns the complete lines seen so far (the rest waits)."""
        self._pending += chunk
        cut = self._pending.rfind("\n") + 1
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self(ready)

    def flush(self) -> str:
        """Mask and return whatever is left after the stream ended."""
        rest, self._pending = self._pending, ""
        return self(rest)
