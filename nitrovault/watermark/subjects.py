"""Naming the subject behind a leak: one exact test per listed subject, Bonferroni over the list.

With per-subject output marks (``protection.watermark.<kind>.per_subject``), the enclave keys each
subject's marks by its own key (:func:`nitrovault.watermark.keys.derive_subject_key`). Given outputs found
in the wild (or a surrogate's), the owner tests every subject on a list:
:func:`nitrovault.watermark.embedding.trace_embedding_subjects` and
:func:`nitrovault.watermark.text.trace_text_subjects` compute each subject's one-sided p-value under
"H0: these outputs do not depend on subject s's key", and :func:`name_subject` makes the decision.

Decision (:func:`name_subject`): ``N`` subjects, raw p-values ``p_s``; the corrected p-value is
``min(1, N * min_s p_s)`` (Bonferroni: the chance that **any** listed subject is named when none of them
produced the outputs is at most the threshold, whatever the dependence between the tests). The subject
of the smallest ``p_s`` is named when its corrected p-value is at most the threshold (default
:data:`DEFAULT_TRACE_THRESHOLD`); otherwise none is. P-values are carried as ``log10`` (an exact test on
a few hundred outputs easily goes below 1e-308, where a float underflows to zero).

A subject that is not on the list cannot be named (it is not tested): the list is the owner's (every
subject ever issued a token, say); a longer list costs ``log10(N)`` in the threshold, nothing else.

Example::

    >>> name_subject({"alice": -12.0, "bob": -0.3}, threshold=1e-6, rows=10).subject
    'alice'
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nitrovault.errors import ConfigError

#: corrected p-value at or below which a subject is named (the family-wise false-naming rate)
DEFAULT_TRACE_THRESHOLD = 1e-6


@dataclass(frozen=True)
class SubjectTrace:
    """The outcome of tracing outputs to one of ``N`` listed subjects."""

    #: the named subject, or None when no corrected p-value reaches the threshold
    subject: str | None
    #: Bonferroni-corrected p-value of the best subject: ``min(1, N * p_min)``
    p_value: float
    #: ``log10`` of :attr:`p_value` (exact where the float underflows)
    log10_p_value: float
    #: every listed subject's raw (uncorrected) one-sided p-value, as ``log10``
    log10_p_values: Mapping[str, float]
    threshold: float
    #: outputs that entered the test (embeddings: rows carrying a trigger; text: scored token pairs)
    rows: int

    @property
    def p_values(self) -> dict[str, float]:
        """Raw p-values (0.0 where they underflow a float: use :attr:`log10_p_values` there)."""
        return {s: 10.0 ** v for s, v in self.log10_p_values.items()}

    def as_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "p_value": self.p_value, "log10_p_value": self.log10_p_value,
                "threshold": self.threshold, "rows": self.rows, "subjects": len(self.log10_p_values),
                "log10_p_values": dict(self.log10_p_values)}


def check_subjects(subjects: Sequence[str]) -> list[str]:
    """``subjects`` as a list, or :class:`ConfigError`: empty list, empty subject, duplicates."""
    listed = list(subjects)
    if not listed:
        raise ConfigError("the subject list is empty")
    if any(not isinstance(s, str) or not s for s in listed):
        raise ConfigError("every listed subject must be a non-empty string")
    repeated = sorted(s for s, n in Counter(listed).items() if n > 1)
    if repeated:
        raise ConfigError(f"subjects listed more than once: {', '.join(repeated[:5])}")
    return listed


def name_subject(log10_p: Mapping[str, float], *, threshold: float = DEFAULT_TRACE_THRESHOLD,
                 rows: int) -> SubjectTrace:
    """Bonferroni over the listed subjects' raw ``log10`` p-values (module docstring)."""
    if not log10_p:
        raise ConfigError("the subject list is empty")
    if not 0 < threshold < 1:
        raise ConfigError("the trace threshold must be in (0, 1)")
    best = min(log10_p, key=lambda s: (log10_p[s], s))  # ties: the first in sorted order, deterministic
    corrected = min(0.0, math.log10(len(log10_p)) + log10_p[best])
    named = best if corrected <= math.log10(threshold) else None
    return SubjectTrace(subject=named, p_value=10.0 ** corrected, log10_p_value=corrected,
                        log10_p_values=dict(log10_p), threshold=threshold, rows=rows)
