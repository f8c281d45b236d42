"""CloudFormation rendering: a synthesized template's intrinsics turned into plain values. Pure.

The policy reviewer evaluates plain key-policy documents, but a synthesized (or hand-written) template
writes ARNs with intrinsic functions: ``Ref``, ``Fn::GetAtt``, ``Fn::Join``, ``Fn::Sub``, ``Fn::Select``,
``Fn::ImportValue``. This module owns turning them into strings:

* :func:`render_intrinsics` renders a value against a :class:`TemplateEnv` (the template's resources and
  parameters, the account and region): pseudo parameters become their values or a readable placeholder
  (``<AccountId>``), a parameter its ``Default``, an IAM role's or user's ``Fn::GetAtt Arn`` the ARN the
  evaluator can reason about (``arn:aws:iam::<AccountId>:role/<RoleName or LogicalId>``), and anything
  it cannot know a ``<...>`` placeholder. It is what ``nitrovault policy review`` and the synth-time CDK
  aspect (``infra/review_aspect.py``) run on a key policy before reviewing it.
* :func:`keys_from_template` is every ``AWS::KMS::Key``'s ``KeyPolicy``, rendered (a key without one gets
  the policy KMS applies by default).
* :func:`render_text` reads a synthesized *string* (a launch template's user data, a joined name) as text
  with each reference kept symbolic (``<Ref:X>``, ``<GetAtt:X.Attr>``), so tests can find in it exactly
  which resource a value points to.

Intrinsic function reference:
https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/intrinsic-function-reference.html
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_KEY_POLICY", "TemplateEnv", "keys_from_template", "render_intrinsics", "render_text"]

#: Pseudo parameters with one value in the commercial partition (the account and region come from the env).
_PSEUDO = {"AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com", "AWS::NoValue": ""}

#: What KMS applies to a key created without a policy: the account (hence IAM) gets ``kms:*``.
#: https://docs.aws.amazon.com/kms/latest/developerguide/key-policy-default.html
DEFAULT_KEY_POLICY: Mapping[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "Enable IAM User Permissions (KMS default)",
            "Effect": "Allow",
            "Principal": {"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}},
            "Action": "kms:*",
            "Resource": "*",
        }
    ],
}


@dataclass(frozen=True)
class TemplateEnv:
    """What intrinsics resolve against: the template's resources and parameters, the account and region."""

    resources: Mapping[str, Any]
    parameters: Mapping[str, Any]
    account: str | None
    region: str | None


def _ref(name: str, env: TemplateEnv) -> str:
    if name in _PSEUDO:
        return _PSEUDO[name]
    if name == "AWS::AccountId":
        return env.account or "<AccountId>"
    if name == "AWS::Region":
        return env.region or "<Region>"
    if name.startswith("AWS::"):
        return f"<{name[5:]}>"
    param = env.parameters.get(name)
    if isinstance(param, Mapping) and isinstance(param.get("Default"), str):
        return str(param["Default"])
    return f"<{name}>"


def _get_att(logical: str, attribute: str, env: TemplateEnv) -> str:
    resource = env.resources.get(logical)
    kind = resource.get("Type") if isinstance(resource, Mapping) else None
    props = resource.get("Properties", {}) if isinstance(resource, Mapping) else {}
    if attribute == "Arn" and kind in ("AWS::IAM::Role", "AWS::IAM::User"):
        noun = "role" if kind == "AWS::IAM::Role" else "user"
        name_key = "RoleName" if noun == "role" else "UserName"
        name = props.get(name_key) if isinstance(props, Mapping) else None
        rendered = render_intrinsics(name, env) if name is not None else logical
        account = env.account or "<AccountId>"
        return f"arn:aws:iam::{account}:{noun}/{rendered}"
    return f"<{logical}.{attribute}>"


def _sub(template: str, variables: Mapping[str, Any], env: TemplateEnv) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        if name in variables:
            return str(render_intrinsics(variables[name], env))
        if "." in name:
            logical, attribute = name.split(".", 1)
            return _get_att(logical, attribute, env)
        return _ref(name, env)

    return re.sub(r"\$\{([^}]+)\}", one, template)


def render_intrinsics(value: Any, env: TemplateEnv) -> Any:
    """Replace CloudFormation intrinsics with readable strings (``Ref AWS::AccountId`` -> the account or
    ``<AccountId>``; a role's ``Fn::GetAtt Arn`` -> ``arn:aws:iam::<AccountId>:role/<LogicalId>``)."""
    if isinstance(value, list):
        return [render_intrinsics(v, env) for v in value]
    if not isinstance(value, Mapping):
        return value
    if len(value) == 1:
        (name, arg), = value.items()
        if name == "Ref" and isinstance(arg, str):
            return _ref(arg, env)
        if name == "Fn::GetAtt":
            parts = arg.split(".", 1) if isinstance(arg, str) else list(arg)
            if len(parts) == 2:
                return _get_att(str(parts[0]), str(render_intrinsics(parts[1], env)), env)
        if name == "Fn::Join" and isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], list):
            return str(arg[0]).join(str(render_intrinsics(v, env)) for v in arg[1])
        if name == "Fn::Sub":
            if isinstance(arg, str):
                return _sub(arg, {}, env)
            if isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], Mapping):
                return _sub(str(arg[0]), arg[1], env)
        if name == "Fn::Select" and isinstance(arg, list) and len(arg) == 2:
            items = render_intrinsics(arg[1], env)
            if isinstance(items, list) and str(arg[0]).isdigit() and int(arg[0]) < len(items):
                return items[int(arg[0])]
        if name == "Fn::ImportValue":
            return f"<ImportValue:{render_intrinsics(arg, env)}>"
        if name.startswith("Fn::"):
            return f"<{name[4:]}>"
    return {k: render_intrinsics(v, env) for k, v in value.items()}


def keys_from_template(
    template: Mapping[str, Any], *, account: str | None = None, region: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Every ``AWS::KMS::Key``'s ``KeyPolicy`` as ``(logical id, rendered policy)``, in template order."""
    resources = template.get("Resources")
    if not isinstance(resources, Mapping):
        return []
    params = template.get("Parameters")
    env = TemplateEnv(resources, params if isinstance(params, Mapping) else {}, account, region)
    keys = []
    for logical, resource in resources.items():
        if not isinstance(resource, Mapping) or resource.get("Type") != "AWS::KMS::Key":
            continue
        props = resource.get("Properties")
        policy = props.get("KeyPolicy") if isinstance(props, Mapping) else None
        if policy is None:  # KMS then applies its default policy: root kms:*
            policy = DEFAULT_KEY_POLICY
        rendered = render_intrinsics(policy, env)
        keys.append((str(logical), rendered if isinstance(rendered, dict) else {"Statement": rendered}))
    return keys


def render_text(value: Any) -> str:
    """A synthesized string value as text: ``Fn::Base64`` unwrapped, ``Fn::Join`` joined, ``Ref X`` as
    ``<Ref:X>``, ``Fn::GetAtt [X, Attr]`` as ``<GetAtt:X.Attr>``, any other intrinsic as ``<token>``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Base64" in value:
        return render_text(value["Fn::Base64"])
    if isinstance(value, dict) and "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return str(sep).join(render_text(p) for p in parts)
    if isinstance(value, dict) and "Ref" in value:
        return f"<Ref:{value['Ref']}>"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        target = value["Fn::GetAtt"]
        logical, attribute = target.split(".", 1) if isinstance(target, str) else target
        return f"<GetAtt:{logical}.{attribute}>"
    return "<token>"
