"""The key-policy reviewer: who can obtain plaintext key material, under which measurements? Pure.

Input is a parsed key policy (or a CloudFormation template's ``AWS::KMS::Key`` resources), optionally with
the image's :class:`~nitrovault.policy.manifest.PcrManifest`; output is a :class:`KeyReview` per key: one
:class:`Grant` row per (statement, principal, action) that can yield plaintext or escalate to it, and the
:class:`Finding` list. File and folder reading (JSON, YAML, ``cdk.out``) and the text/JSON/SARIF
renderings live in ``nitrovault.cli.review_cmd`` (the I/O shell); the synth-time CDK aspect in
``infra/review_aspect.py``.

How a claim is established:

1. **Static reading** of each ``Allow`` statement: which plaintext-yielding actions it covers (wildcards and
   ``NotAction`` included, :data:`PLAINTEXT_ACTIONS`), which principals, and how its
   ``kms:RecipientAttestation:*`` conditions are written (operator, set prefix, ``IfExists``, value shape).
2. **Proof with the evaluator** that the KMS emulator uses (:func:`~nitrovault.policy.evaluate_key_policy`):
   for every principal and action the reviewer builds the request KMS would build -- with the
   encryption context the statement itself demands, so the check is not vacuous -- and evaluates it
   (a) without an attestation document, (b) with *foreign* PCRs (:data:`PROBE_PCRS`, values no real image
   has), (c) with each manifest's PCRs, (d) with the statement's own PCRs. **Whether anyone obtains
   plaintext without attestation is decided by evaluation, not by shape**
   (:mod:`~nitrovault.policy.review.exposure`): a statement without attestation conditions is no
   exposure when a Deny (or any combination of statements) refuses every request it could allow without
   a document; an exposure is ``proved`` when the evaluator allowed a concrete request, and reported
   unproved only when the policy depends on keys the reviewer cannot rule out.
3. **Comparison** of the bound PCR values with the manifests, and the **accepted measurement sets**
   (one per release statement, :mod:`~nitrovault.policy.review.sets`): debug, malformed, unsigned.

Invariants:

* Reviewing never raises on a policy that :func:`~nitrovault.policy.parse_policy` accepts; a malformed
  policy raises :class:`~nitrovault.errors.PolicyError`.
* The policy of :func:`nitrovault.policy.build.model_key_policy` with a matching manifest has no finding.
* Account principals are assumed to delegate to IAM (the evaluator's worst case): a reviewer cannot see
  the account's IAM policies, so it must assume they allow.
* ``GenerateRandom`` is not reviewed: it takes no key, so no key policy governs it.
* Every finding's ``rule_id`` is in :data:`RULES`; its ``category`` is that rule's, one of the reviewer's
  fixed vocabulary (:data:`CATEGORIES`), and its severity is that rule's (raised under the rule's stated
  condition); severities are :data:`SEVERITIES` (low < medium < high < critical). Each category has one
  kind (:data:`CATEGORY_KINDS`): ``exposure`` (only real or un-ruled-out exposures), ``measurement-set``,
  ``construction``, ``recommendation`` (defence in depth, never above medium).
* An account principal or ``"*"`` on a statement that releases key material is a finding even with
  attestation conditions (attestation proves the code, not who runs it), unless caller conditions
  (``aws:PrincipalArn``, ``aws:PrincipalAccount``, ``kms:CallerAccount``) rule out, by evaluation, every
  identity nobody named.
* Key administrators are the principals of a management statement (disable / schedule deletion, no
  plaintext action). Only their ``PutKeyPolicy`` is break-glass; ``PutKeyPolicy`` to anyone else (an
  administrator that also uses the key included) and ``CreateGrant`` to anyone are escalations.
* **Service-mediated** use (``Decrypt`` / ``GenerateDataKey`` by a named role or user, in a statement with
  no attestation condition, pinned with ``StringEquals`` ``kms:ViaService`` to one regional endpoint of
  one service *and* with that service's own ``kms:EncryptionContext:aws:<service>:arn`` limited to named
  resources, as SSE-KMS on one S3 bucket): the service receives the key material, never the caller, so
  the row's verdict is ``service-mediated`` and it is no finding -- unless the evaluator allows the call
  *directly* (without the service), which is NV-PLAINTEXT-UNATTESTED, proved. The account root and
  ``"*"`` are never service-mediated; ``ReEncryptFrom``, ``DeriveSharedSecret`` and
  ``GenerateDataKeyPair`` never are.
* NV-NO-DENY (the defence-in-depth Deny of ``Decrypt`` without attestation) is not asked of an
  **at-rest key**: one with no attestation condition anywhere, in which every ``Allow`` yielding plaintext
  is service-mediated (above) or names only AWS service principals and covers neither ``CreateGrant``,
  ``PutKeyPolicy`` nor ``kms:*``. Such a key hands no key material to any caller, and that Deny would
  break the service it serves. A key with any attestation condition (a model key) always needs the Deny.

Where each part lives (read in this order):

* :mod:`~nitrovault.policy.review.catalogue`: the rules, each with its category and severity.
* :mod:`~nitrovault.policy.review.findings`: :class:`Finding`, :class:`Grant`, :class:`KeyReview`,
  :class:`Review`, and the collector every check reports into.
* :mod:`~nitrovault.policy.review.reading`: step 1, the static reading of a statement.
* :mod:`~nitrovault.policy.review.probes`: step 2, the evaluator's requests, the callers a principal
  covers, and :data:`PROBE_PCRS`.
* :mod:`~nitrovault.policy.review.exposure`: step 2's verdict, "is some such request allowed?", decided
  by evaluation in both directions.
* :mod:`~nitrovault.policy.review.statements`: statement-level checks (negations, attestation
  conditions, step 3's comparison with the manifest).
* :mod:`~nitrovault.policy.review.principals`: per-principal checks (escalation, the Grant rows and
  what the proofs show, administrators that can Decrypt).
* :mod:`~nitrovault.policy.review.sets`: step 3's accepted measurement sets.
* :mod:`~nitrovault.policy.review.denies`: the defence-in-depth Deny and the at-rest keys exempt from it.
* :mod:`~nitrovault.policy.review.review`: :func:`review_policy` and :func:`review_template`, running
  the checks in order.
* :mod:`nitrovault.policy.cfn`: CloudFormation intrinsics rendered into plain policy documents.

What this cannot prove: anything outside the key policy (IAM policies, grants already created, SCPs), and
whether the manifest describes the code you reviewed (that is the reproducible build's job).

Example::

    >>> from nitrovault.policy import parse_policy
    >>> review = review_policy({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    ...     "Principal": {"AWS": "arn:aws:iam::111122223333:root"}, "Action": "kms:*", "Resource": "*"}]},
    ...     key="default")
    >>> sorted({f.category for f in review.findings})  # doctest: +NORMALIZE_WHITESPACE
    ['context-unconstrained', 'escalation', 'plaintext-without-attestation', 'recommendation',
     'root-delegation']
"""

from nitrovault.policy.cfn import TemplateEnv, keys_from_template, render_intrinsics
from nitrovault.policy.review.catalogue import (
    CATEGORIES,
    CATEGORY_KINDS,
    KINDS,
    RULES,
    SEVERITIES,
    SEVERITY_ORDER,
    Kind,
    Rule,
    Severity,
)
from nitrovault.policy.review.findings import (
    Finding,
    Grant,
    KeyReview,
    MeasurementSet,
    Review,
    Verdict,
    reaching,
    worst,
)
from nitrovault.policy.review.probes import PROBE_PCRS
from nitrovault.policy.review.reading import ESCALATION_ACTIONS, PLAINTEXT_ACTIONS
from nitrovault.policy.review.review import review_policy, review_template

__all__ = [
    "CATEGORIES",
    "CATEGORY_KINDS",
    "ESCALATION_ACTIONS",
    "KINDS",
    "PLAINTEXT_ACTIONS",
    "PROBE_PCRS",
    "RULES",
    "SEVERITIES",
    "SEVERITY_ORDER",
    "Finding",
    "Grant",
    "KeyReview",
    "Kind",
    "MeasurementSet",
    "Review",
    "Rule",
    "Severity",
    "TemplateEnv",
    "Verdict",
    "keys_from_template",
    "reaching",
    "render_intrinsics",
    "review_policy",
    "review_template",
    "worst",
]
