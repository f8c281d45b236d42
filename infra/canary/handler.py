"""The identity canary: try ``kms:Decrypt`` on the model key from outside any enclave, and say so loudly
if it ever works.

Run by a schedule in the deployed account with a role whose IAM policy *allows* ``kms:Decrypt`` on the
model key, so only the key policy stands in the way: an ``AccessDeniedException`` is the expected,
healthy answer; a successful decrypt is a policy breach.

Outcomes, published as metrics in the ``nitrovault`` namespace (one datum each, every run):

* ``CanaryDenied`` = 1: KMS refused with ``AccessDeniedException`` (the policy holds);
* ``CanaryDecryptSucceeded`` = 1: KMS released plaintext to a caller outside any enclave (alarm);
* ``CanaryInconclusive`` = 1: any other answer (bad ciphertext, throttling, network), which proves
  nothing either way.

Invariants: the plaintext of a successful decrypt is never logged, returned or published, only the fact
that it was obtained; the log line and return value carry the outcome and the KMS error code only.
Only the standard library and boto3 (present in the Lambda runtime) are imported.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

NAMESPACE = "nitrovault"
DENIED = "denied"
BREACH = "breach"
INCONCLUSIVE = "inconclusive"
#: Used when no real sealed-blob ciphertext is configured: a well-formed-looking but unknown blob.
DUMMY_CIPHERTEXT = b"\x01\x02\x02\x00" + bytes(160)
_METRICS = {DENIED: "CanaryDenied", BREACH: "CanaryDecryptSucceeded", INCONCLUSIVE: "CanaryInconclusive"}


@dataclass(frozen=True)
class ProbeResult:
    outcome: str  # DENIED | BREACH | INCONCLUSIVE
    error_code: str | None = None


def probe(kms: Any, *, key_arn: str, ciphertext: bytes, encryption_context: dict[str, str]) -> ProbeResult:
    """One ``Decrypt`` attempt; never raises for an AWS answer."""
    try:
        kms.decrypt(KeyId=key_arn, CiphertextBlob=ciphertext, EncryptionContext=encryption_context)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        return ProbeResult(DENIED if code == "AccessDeniedException" else INCONCLUSIVE, code)
    except BotoCoreError as exc:
        return ProbeResult(INCONCLUSIVE, type(exc).__name__)
    # The response (with its plaintext) is dropped unread.
    return ProbeResult(BREACH)


def metric_data(result: ProbeResult) -> list[dict[str, Any]]:
    """The three outcome metrics: 1 for what happened, 0 for the others."""
    return [
        {"MetricName": name, "Value": 1.0 if outcome == result.outcome else 0.0, "Unit": "Count"}
        for outcome, name in _METRICS.items()
    ]


def publish(cloudwatch: Any, result: ProbeResult, namespace: str = NAMESPACE) -> None:
    cloudwatch.put_metric_data(Namespace=namespace, MetricData=metric_data(result))


def run(kms: Any, cloudwatch: Any, env: dict[str, str]) -> dict[str, Any]:
    """Probe with the configuration in ``env``, publish the metrics, return a non-secret summary."""
    blob_b64 = env.get("CANARY_CIPHERTEXT_B64", "")
    ciphertext = base64.b64decode(blob_b64) if blob_b64 else DUMMY_CIPHERTEXT
    context = json.loads(env.get("CANARY_ENCRYPTION_CONTEXT", "{}"))
    result = probe(kms, key_arn=env["MODEL_KEY_ARN"], ciphertext=ciphertext, encryption_context=context)
    publish(cloudwatch, result, env.get("METRIC_NAMESPACE", NAMESPACE))
    summary = {"outcome": result.outcome, "error_code": result.error_code, "dummy_blob": not blob_b64}
    print(json.dumps(summary))  # one structured line for CloudWatch Logs
    return summary


def handler(event: object, context: object) -> dict[str, Any]:
    """Lambda entry point."""
    return run(boto3.client("kms"), boto3.client("cloudwatch"), dict(os.environ))
