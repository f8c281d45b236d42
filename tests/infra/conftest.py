"""Synthesize the CDK app once per session (jsii starts slowly) and share the results.

The app is built exactly as ``python -m infra.app`` builds it (cdk-nag included), from the sample PCR
manifest beside this file, for a placeholder account with explicit AZs so the template is deployable
as written.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")

from synth_context import BASE_CONTEXT, Synth


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    from aws_cdk.assertions import Template

    from infra.app import build_app

    outdir = tmp_path_factory.mktemp("cdk.out")
    app, stack = build_app(BASE_CONTEXT, outdir=str(outdir))
    app.synth()
    return Synth(app=app, stack=stack, template=Template.from_stack(stack), outdir=outdir)
