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


def heredoc(script: str, path: str) -> str:
    """The file ``script`` writes at ``path`` (a heredoc it must write exactly once)."""
    head = f"cat > {path} <<'NITROVAULT_EOF'\n"
    assert script.count(head) == 1, f"{path} is not written exactly once"
    return script.split(head, 1)[1].split("\nNITROVAULT_EOF", 1)[0]


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

    def user_data(self) -> str:
        """The hosts' boot script, ``{"Ref": X}`` rendered as ``<Ref:X>``."""
        from nitrovault.policy.cfn import render_text

        (template,) = self.of_type("AWS::EC2::LaunchTemplate").values()
        return render_text(template["Properties"]["LaunchTemplateData"]["UserData"])

    def boot_file(self, path: str) -> str:
        """The file the boot script writes at ``path``."""
        return heredoc(self.user_data(), path)

    def model_key(self) -> tuple[str, dict[str, Any]]:
        """The model key's logical id and resource (the one key whose policy is the model key's)."""
        (found,) = [(k, r) for k, r in self.of_type("AWS::KMS::Key").items()
                    if r["Properties"]["KeyPolicy"].get("Id") == "nitrovault-model-key"]
        return found
