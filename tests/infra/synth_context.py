"""The context every infra test synthesizes with (a placeholder account, explicit AZs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SAMPLE_MANIFEST = HERE / "pcr-manifest.sample.json"
ACCOUNT = "111122223333"
REGION = "us-east-1"
BASE_CONTEXT = {
    "pcrManifest": str(SAMPLE_MANIFEST),
    "account": ACCOUNT,
    "region": REGION,
    "availabilityZones": f"{REGION}a,{REGION}b,{REGION}c",
    "modelId": "resnet",
    "modelVersion": "7",
}


@dataclass(frozen=True)
class Synth:
    app: Any
    stack: Any
    template: Any  # aws_cdk.assertions.Template
    outdir: Path

    @property
    def resources(self) -> dict[str, Any]:
        return dict(self.template.to_json()["Resources"])

    def of_type(self, kind: str) -> dict[str, Any]:
        return {k: v for k, v in self.resources.items() if v["Type"] == kind}
