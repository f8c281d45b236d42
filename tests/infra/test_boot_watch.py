"""Boots are visible: the attested-Decrypt metric filter, its alarm, the trail and the context keys."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk.assertions import Match, Template
from synth_context import BASE_CONTEXT, Synth

from infra.app import build_app, props_from_context
from nitrovault.errors import ConfigError


def _boot_filter(template: Template) -> dict[str, Any]:
    filters = [
        r["Properties"]
        for r in template.find_resources("AWS::Logs::MetricFilter").values()
        if r["Properties"]["MetricTransformations"][0]["MetricName"] == "AttestedModelKeyDecrypts"
    ]
    assert len(filters) == 1
    return filters[0]


def _boot_alarm(template: Template) -> dict[str, Any]:
    alarms = [
        r["Properties"]
        for r in template.find_resources("AWS::CloudWatch::Alarm").values()
        if r["Properties"].get("MetricName") == "AttestedModelKeyDecrypts"
    ]
    assert len(alarms) == 1
    return alarms[0]


def _pattern_text(pattern: Any) -> str:
    if isinstance(pattern, str):
        return pattern
    sep, parts = pattern["Fn::Join"]
    return sep.join(p if isinstance(p, str) else "<token>" for p in parts)


def test_filter_matches_attested_model_key_decrypt(synth: Synth) -> None:
    props = _boot_filter(synth.template)
    text = _pattern_text(props["FilterPattern"])
    assert '$.eventSource = "kms.amazonaws.com"' in text
    assert '$.eventName = "Decrypt"' in text
    assert "$.additionalEventData.recipient.attestationDocumentModuleId = *" in text
    assert "$.resources[0].ARN" in text
    # the ARN is the model key's, by reference
    model_key = [
        k
        for k, r in synth.of_type("AWS::KMS::Key").items()
        if r["Properties"]["KeyPolicy"].get("Id") == "nitrovault-model-key"
    ]
    assert {"Fn::GetAtt": [model_key[0], "Arn"]} in props["FilterPattern"]["Fn::Join"][1]
    assert props["MetricTransformations"][0]["MetricNamespace"] == "nitrovault"


def test_alarm_threshold_period_and_action(synth: Synth) -> None:
    alarm = _boot_alarm(synth.template)
    assert alarm["Threshold"] == 12  # 3 x the ASG's max size (4)
    assert alarm["Period"] == 3600
    assert alarm["Statistic"] == "Sum"
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    topics = list(synth.of_type("AWS::SNS::Topic"))
    assert alarm["AlarmActions"] == [{"Ref": topics[0]}]


def test_trail_records_management_reads_into_an_encrypted_group(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::CloudTrail::Trail",
        {
            "IsLogging": True,
            "EventSelectors": Match.array_with([Match.object_like({"ReadWriteType": "ReadOnly"})]),
            "CloudWatchLogsLogGroupArn": Match.any_value(),
        },
    )
    synth.template.has_resource_properties(
        "AWS::Logs::LogGroup", {"LogGroupName": "/nitrovault/cloudtrail", "KmsKeyId": Match.any_value()}
    )
    outputs = synth.template.to_json()["Outputs"]
    assert outputs["BootMetricName"]["Value"] == "nitrovault/AttestedModelKeyDecrypts"
    assert "BootAlarmName" in outputs


def test_context_overrides_threshold_and_uses_existing_trail() -> None:
    _, stack = build_app(
        {**BASE_CONTEXT, "bootAlarmThreshold": "5", "cloudTrailLogGroup": "org-trail", "nag": "false"}
    )
    template = Template.from_stack(stack)
    assert _boot_alarm(template)["Threshold"] == 5
    assert _boot_filter(template)["LogGroupName"] == "org-trail"
    template.resource_count_is("AWS::CloudTrail::Trail", 0)


@pytest.mark.parametrize("bad", ["0", "-2", "lots", "1.5"])
def test_bad_threshold_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="bootAlarmThreshold"):
        props_from_context({**BASE_CONTEXT, "bootAlarmThreshold": bad})
