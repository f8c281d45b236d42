"""Exposure by evaluation: can a request that a statement would allow actually obtain key material? Pure.

The question for one ``Allow`` statement *S*, one principal label, one action and one **mode** -- no
attestation document (``pcrs=None``), or a document with *S*'s own measurements
(:func:`~nitrovault.policy.review.probes.accepted_pcrs`) -- is "is some request of this mode that S
could allow allowed by the whole policy?". It is answered per caller
(:func:`~nitrovault.policy.review.probes.callers`), in this order:

1. **S cannot apply.** *S* reduced to its clauses on caller keys (:data:`~reading.CALLER_KEYS`) and, without
   a document, attestation keys -- every other clause dropped, so the reduced statement matches at least
   what *S* matches -- does not match: no request of this mode from this caller satisfies *S*. Ruled out
   (whatever another statement allows is that statement's finding, not *S*'s).
2. **Witness.** The request KMS would build: the caller, the action, the encryption context *S* demands,
   the other keys *S* pins to one value (``aws:SourceVpc``, ``kms:ViaService``, ``aws:PrincipalOrgID`` ...:
   a request that carries them is one a caller can make; caller keys stay derived from the caller), the
   mode's PCRs. Allowed by the policy -> exposed, **proved**.
3. **A Deny refuses every such request.** A ``Deny`` whose every clause is on a *determined* key (a caller
   key; an attestation key when there is no document, for all are then absent, or one *S* pins when there
   is; a key *S* pins to one value, :func:`~reading.pinned_values`) and that matches the request made of
   those values alone: every request of this mode that *S* allows carries exactly those values, so that
   Deny refuses them all. Ruled out.
4. **Counter-witness.** Else each ``Deny`` that refused the witness depends on keys the caller chooses; the
   reviewer gives them values that make its clauses false (the value a negated operator excludes, a value
   where ``Null`` asks for absence, the other boolean, a value beside an ``...IfExists``) and asks again.
   Allowed -> exposed, **proved**.
5. Else **not ruled out**: exposed, not proved. The verdict depends on condition keys the reviewer does not
   model, or on values it cannot enumerate; a reviewer must assume the worst (:attr:`Outcome.depends_on`
   names the keys, never values).

Soundness: steps 1 and 3 only rule a request out by facts that hold for every request of the mode, so "not
exposed" is never a guess; steps 2 and 4 only call a request allowed when the evaluator allowed a concrete
one. What remains is reported, unproved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from nitrovault.policy.conditions import ConditionClause
from nitrovault.policy.evaluate import Statement
from nitrovault.policy.review.probes import Caller, Prober
from nitrovault.policy.review.reading import CALLER_KEYS, is_attestation_key, pinned_values

__all__ = ["Outcome", "probe", "witness_extra"]

_CONTEXT_PREFIX = "kms:encryptioncontext:"
_OTHER = "nitrovault-review-other"


@dataclass(frozen=True)
class Outcome:
    """The answer for one statement, principal, action and mode."""

    #: a caller for whom the evaluator allowed a concrete request (exposed, proved)
    proved: Caller | None = None
    #: a caller not ruled out (the proved one, or one whose verdict the reviewer could not decide)
    open: Caller | None = None
    #: for an unproved exposure: the condition keys the verdict depends on (names, never values)
    depends_on: tuple[str, ...] = ()
    #: labels of the Deny statements that ruled requests out (step 3)
    refused_by: tuple[str, ...] = ()
    #: for a proved exposure: the condition keys the allowed request carried besides the encryption
    #: context the statement demands (names, never values)
    witness: tuple[str, ...] = ()

    @property
    def exposed(self) -> bool:
        return self.open is not None


def _determined(statement: Statement, pcrs: Mapping[int, bytes] | None) -> tuple[set[str], dict[str, str]]:
    """The keys whose value every request of the mode that ``statement`` allows has (module step 3), and
    the values of those ``statement`` pins that are not attestation keys."""
    pinned = pinned_values(statement)
    keys = set(CALLER_KEYS) | {k for k in pinned if pcrs is not None or not is_attestation_key(k)}
    values = {k: v for k, v in pinned.items() if not is_attestation_key(k) and k not in CALLER_KEYS}
    return keys, values


def witness_extra(statement: Statement) -> dict[str, str]:
    """The keys besides the encryption context that ``statement`` pins, for the witness request (module
    step 2): never caller keys (derived from the caller), attestation keys (the mode's) or the context."""
    return {
        k: v for k, v in pinned_values(statement).items()
        if k not in CALLER_KEYS and not is_attestation_key(k) and not k.startswith(_CONTEXT_PREFIX)
    }


def _is_determined(key: str, keys: set[str], pcrs: Mapping[int, bytes] | None) -> bool:
    key = key.lower()
    return key in keys or (pcrs is None and is_attestation_key(key))


def _falsify(clause: ConditionClause) -> str | None:
    """A value of ``clause``'s key that makes it false, or None when only absence (or no value) does."""
    if clause.base == "Null":
        return _OTHER if "true" in clause.values else None
    if clause.set_operator is not None:
        return None
    if clause.base == "Bool":
        return "false" if "true" in clause.values else "true"
    if clause.negated:
        return clause.values[0].replace("*", "x").replace("?", "x")
    if clause.if_exists and clause.base.startswith(("String", "Arn")):
        return _OTHER
    return None


def probe(
    prober: Prober,
    statement: Statement,
    context: Mapping[str, str],
    action: str,
    who: Sequence[Caller],
    pcrs: Mapping[int, bytes] | None,
) -> Outcome:
    """Decide the mode for every caller (module docstring); the first proved caller wins."""
    keys, pinned = _determined(statement, pcrs)
    witness = witness_extra(statement)
    reduced = replace(
        statement,
        conditions=tuple(
            c for c in statement.conditions
            if c.key.lower() in CALLER_KEYS or (pcrs is None and is_attestation_key(c.key))
        ),
    )
    denies = [s for s in prober.policy.statements if s.effect == "Deny"]
    open_caller: Caller | None = None
    depends: set[str] = set()
    refused: dict[str, None] = {}
    for caller in who:
        if not prober.statement_matches(reduced, action, caller.arn, {}, pcrs):  # 1. S cannot apply
            continue
        if prober.decide(action, caller.arn, context, pcrs, witness).allowed:  # 2. witness
            return Outcome(caller, caller, witness=tuple(witness))
        universal = [
            d for d in denies
            if all(_is_determined(c.key, keys, pcrs) for c in d.conditions)
            and prober.statement_matches(d, action, caller.arn, {}, pcrs, pinned)
        ]
        if universal:  # 3. a Deny refuses every such request
            refused.update({d.label: None for d in universal})
            continue
        matched = [
            d for d in denies if prober.statement_matches(d, action, caller.arn, context, pcrs, witness)
        ]
        counter = dict(context)
        extra: dict[str, str] = dict(witness)
        for d in matched:  # 4. counter-witness
            for c in d.conditions:
                value = None if _is_determined(c.key, keys, pcrs) else _falsify(c)
                if value is None:
                    continue
                key = c.key.lower()
                if key.startswith(_CONTEXT_PREFIX):
                    name = c.key[len(_CONTEXT_PREFIX):]
                    if all(k.lower() != name.lower() for k in counter):  # key names are case-insensitive
                        counter[name] = value
                else:
                    extra.setdefault(key, value)
        changed = extra != witness or counter != context
        if changed and prober.decide(action, caller.arn, counter, pcrs, extra).allowed:
            added = {*extra, *(f"{_CONTEXT_PREFIX}{k}" for k in counter if k not in context)}
            return Outcome(caller, caller, witness=tuple(sorted(added)))
        if open_caller is None:  # 5. not ruled out
            open_caller = caller
        depends.update(
            c.key for c in statement.conditions if not _is_determined(c.key, keys, pcrs)
        )
        depends.update(
            c.key for d in matched for c in d.conditions if not _is_determined(c.key, keys, pcrs)
        )
    return Outcome(None, open_caller, tuple(sorted(depends, key=str.lower)), tuple(refused))
