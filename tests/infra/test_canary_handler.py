"""The identity canary's logic, against botocore's Stubber (no network, no AWS)."""

from __future__ import annotations

import base64
import json

import boto3
import pytest
from botocore.stub import Stubber

from infra.canary import handler

KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BLOB = b"\x01\x02\x02\x00real-looking-ciphertext"
ENV = {
    "MODEL_KEY_ARN": KEY_ARN,
    "CANARY_CIPHERTEXT_B64": base64.b64encode(BLOB).decode(),
    "CANARY_ENCRYPTION_CONTEXT": json.dumps({"model": "resnet", "version": "7"}),
}
SECRET = b"\x42" * 32


def _clients() -> tuple[object, Stubber, object, Stubber]:
    kms = boto3.client("kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    cw = boto3.client("cloudwatch", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    return kms, Stubber(kms), cw, Stubber(cw)


def _expect_metrics(stub: Stubber, outcome: str) -> None:
    names = {
        "denied": "CanaryDenied",
        "breach": "CanaryDecryptSucceeded",
        "inconclusive": "CanaryInconclusive",
    }
    stub.add_response(
        "put_metric_data",
        {},
        {
            "Namespace": "nitrovault",
            "MetricData": [
                {"MetricName": name, "Value": 1.0 if key == outcome else 0.0, "Unit": "Count"}
                for key, name in names.items()
            ],
        },
    )


def _expect_decrypt_params() -> dict[str, object]:
    return {
        "KeyId": KEY_ARN,
        "CiphertextBlob": BLOB,
        "EncryptionContext": {"model": "resnet", "version": "7"},
    }


def test_access_denied_is_the_healthy_answer(capsys: pytest.CaptureFixture[str]) -> None:
    kms, kstub, cw, cstub = _clients()
    kstub.add_client_error("decrypt", "AccessDeniedException", expected_params=_expect_decrypt_params())
    _expect_metrics(cstub, "denied")
    with kstub, cstub:
        summary = handler.run(kms, cw, ENV)
    kstub.assert_no_pending_responses()
    cstub.assert_no_pending_responses()
    assert summary == {"outcome": "denied", "error_code": "AccessDeniedException", "dummy_blob": False}
    assert json.loads(capsys.readouterr().out)["outcome"] == "denied"


def test_a_successful_decrypt_is_a_breach_and_the_plaintext_goes_nowhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    kms, kstub, cw, cstub = _clients()
    kstub.add_response(
        "decrypt",
        {"KeyId": KEY_ARN, "Plaintext": SECRET, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
        _expect_decrypt_params(),
    )
    _expect_metrics(cstub, "breach")
    with kstub, cstub:
        summary = handler.run(kms, cw, ENV)
    cstub.assert_no_pending_responses()
    assert summary["outcome"] == "breach"
    out = capsys.readouterr().out
    for form in (SECRET.hex(), base64.b64encode(SECRET).decode(), repr(SECRET)):
        assert form not in out and form not in repr(summary)


@pytest.mark.parametrize("code", ["InvalidCiphertextException", "ThrottlingException", "NotFoundException"])
def test_other_errors_are_inconclusive_not_ok(code: str) -> None:
    kms, kstub, cw, cstub = _clients()
    kstub.add_client_error("decrypt", code)
    _expect_metrics(cstub, "inconclusive")
    with kstub, cstub:
        summary = handler.run(kms, cw, ENV)
    cstub.assert_no_pending_responses()
    assert summary["outcome"] == "inconclusive" and summary["error_code"] == code


def test_without_a_configured_blob_a_dummy_is_tried() -> None:
    kms, kstub, cw, cstub = _clients()
    kstub.add_client_error(
        "decrypt",
        "AccessDeniedException",
        expected_params={
            "KeyId": KEY_ARN,
            "CiphertextBlob": handler.DUMMY_CIPHERTEXT,
            "EncryptionContext": {},
        },
    )
    _expect_metrics(cstub, "denied")
    with kstub, cstub:
        summary = handler.run(kms, cw, {"MODEL_KEY_ARN": KEY_ARN})
    assert summary["dummy_blob"] is True


def test_metric_data_marks_exactly_one_outcome() -> None:
    for outcome in (handler.DENIED, handler.BREACH, handler.INCONCLUSIVE):
        values = [d["Value"] for d in handler.metric_data(handler.ProbeResult(outcome))]
        assert sorted(values) == [0.0, 0.0, 1.0]
