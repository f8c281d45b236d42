"""AWS key-policy evaluation, shared by the local KMS emulator and the policy reviewer. Pure.

See :mod:`nitrovault.policy.evaluate` for the decision rules and :mod:`nitrovault.policy.conditions` for
the condition operators; ``docs/policy-evaluation.md`` lists where we deviate from AWS.
"""

from nitrovault.policy.conditions import OPERATOR_NAMES, ConditionClause, ContextValue, SetOperator
from nitrovault.policy.evaluate import (
    Decision,
    Policy,
    PrincipalSet,
    RequestContext,
    Statement,
    build_request_context,
    evaluate_key_policy,
    parse_policy,
)

__all__ = [
    "OPERATOR_NAMES",
    "ConditionClause",
    "ContextValue",
    "Decision",
    "Policy",
    "PrincipalSet",
    "RequestContext",
    "SetOperator",
    "Statement",
    "build_request_context",
    "evaluate_key_policy",
    "parse_policy",
]
