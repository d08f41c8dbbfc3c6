"""Errors and the bad-record policy of the data pipeline.

Every problem with user input raises :class:`DataError` with the file (or URL), the line
and the field where it was found. With ``data.bad_records: skip`` a bad *record* is
counted instead (:class:`BadRecords`) and the counts end up in the dataset manifest;
problems with whole files (missing, empty, unreachable) are always errors.
"""

from __future__ import annotations

from collections import Counter


from ckf_dist.errors import DataError  # noqa: E402  (re-exported)


def where(path: str, line: int | None = None, field: str | None = None) -> str:
    """``path:line: field 'x'`` location prefix for error messages."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field {field!r}"
    return text


class BadRecords:
    """Applies ``data.bad_records`` ("error" or "skip") and counts what was skipped."""

    MAX_EXAMPLES = 10

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"bad_records: expected 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.by_reason: Counter[str] = Counter()
        self.examples: list[str] = []

    def bad(self, reason: str, message: str) -> None:
        """Report one bad record: raise under "error", count it under "skip"."""
        if self.policy == "error":
            raise DataError(f"{message} (set data.bad_records=skip to skip and count such records)")
        self.by_reason[reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(message)

    def merge(self, other: "BadRecords") -> None:
        """Add the counts and examples of records ``other`` skipped (later in the input than ours)."""
        self.by_reason.update(other.by_reason)
        self.examples += other.examples[:self.MAX_EXAMPLES - len(self.examples)]

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def report(self) -> dict:
        """JSON-able summary for the manifest."""
        return {"policy": self.policy, "skipped": self.skipped, "by_reason": dict(self.by_reason), "examples": list(self.examples)}
