"""An image rollout against the local KMS emulator, through the enclave's own key-release code.

A model key whose policy (``nitrovault.policy.build.model_key_policy``) holds the old and the new image's
measurement sets: an enclave of either image (a fake NSM attestation document with its PCRs) gets the
data key through ``enclave_app.key_release.release_data_key`` (``KmsClient`` over boto3, ``Decrypt`` with
a ``Recipient``, the CMS envelope opened with the ephemeral key), and the key is the sealer's (the sealed
header's key commitment verifies). An enclave mixing the two images' PCRs is refused in the overlap.
After ``PutKeyPolicy`` with the new set only, the old image is refused and the new one still gets it. The
first deploy's key (no set at all) releases to nobody until the image's set is put, under the same ARN.
A signer set (PCR8) lets in a third image signed with the same certificate, and no other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from enclave_app.config import EnclaveConfig
from enclave_app.key_release import release_data_key
from nitrovault.envelope import SealedHeader, SealedModel, seal_file
from nitrovault.errors import KeyAccessDeniedError
from nitrovault.kms import AwsCredentials, KmsClient, kms_client_from_env
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.kms import KmsEmulator, parse_principals
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm
from nitrovault.policy.build import model_key_policy

ACCOUNT = "111122223333"
REGION = "us-east-1"
ADMIN, SEALER, ENCLAVE = (f"arn:aws:iam::{ACCOUNT}:role/{n}" for n in ("admin", "sealer", "enclave-host"))
PRINCIPALS = {
    "AKIDADMIN": {"secret": "admin-secret", "arn": ADMIN},
    "AKIDSEALER": {"secret": "sealer-secret", "arn": SEALER},
    "AKIDENCLAVE": {"secret": "enclave-secret", "arn": ENCLAVE},
}
CONTEXT = {"model": "resnet", "version": "7"}
SIGNING = b"\x8a" * 48
OLD = {0: b"\xa0" * 48, 1: b"\xa1" * 48, 2: b"\xa2" * 48, 8: SIGNING}
NEW = {0: b"\xb0" * 48, 1: b"\xb1" * 48, 2: b"\xb2" * 48, 8: SIGNING}
MIXED = {**NEW, 0: OLD[0]}  # PCR0 of the old image, PCR1 and PCR2 of the new one


@dataclass
class Kms:
    emulator: KmsEmulator
    url: str

    def client(self, akid: str) -> KmsClient:
        """The production adapter (``kms_client_from_env``, ``KmsClient``) as one of the principals."""
        credentials = AwsCredentials(akid, PRINCIPALS[akid]["secret"])
        return KmsClient(kms_client_from_env(REGION, self.url, credentials))

    def admin(self) -> Any:
        return kms_client_from_env(REGION, self.url, AwsCredentials("AKIDADMIN", "admin-secret"))


@dataclass(frozen=True)
class Model:
    key_arn: str
    data_key: bytes
    sealed: SealedModel

    @property
    def header(self) -> SealedHeader:
        return self.sealed.header


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory, pki: LocalPki) -> Iterator[Kms]:
    emulator = KmsEmulator(tmp_path_factory.mktemp("kms"), pki.root, parse_principals(PRINCIPALS), REGION,
                           max_document_age=timedelta(minutes=5))
    try:
        yield Kms(emulator, emulator.serve("127.0.0.1", 0).endpoint_url)
    finally:
        emulator.shutdown()


def policy(**sets: Any) -> str:
    return json.dumps(model_key_policy(account_id=ACCOUNT, admin_arns=[ADMIN], sealer_arns=[SEALER],
                                       enclave_role_arns=[ENCLAVE], encryption_context=CONTEXT, **sets))


def sealed_model(kms: Kms, tmp_path: Path, **sets: Any) -> Model:
    """A key with the given sets' policy, and a model the sealer sealed under it (as `nitrovault seal`)."""
    arn = str(kms.admin().create_key(Policy=policy(**sets))["KeyMetadata"]["Arn"])
    data_key = kms.client("AKIDSEALER").generate_data_key(arn, encryption_context=CONTEXT)
    assert isinstance(data_key.plaintext, bytearray)
    save_file({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(tmp_path / "model.safetensors"))
    seal_file(tmp_path / "model.safetensors", tmp_path / "model.sealed", data_key=data_key.plaintext,
              wrapped_key=data_key.ciphertext_blob, key_id=data_key.key_id, encryption_context=CONTEXT)
    return Model(arn, bytes(data_key.plaintext), SealedModel.open(tmp_path / "model.sealed"))


def put_policy(kms: Kms, model: Model, **sets: Any) -> None:
    kms.admin().put_key_policy(KeyId=model.key_arn, PolicyName="default", Policy=policy(**sets))


def boot(kms: Kms, pki: LocalPki, model: Model, pcrs: dict[int, bytes]) -> bytearray:
    """An enclave with ``pcrs`` runs its key release (enclave_app.key_release) against the emulator."""
    config = EnclaveConfig.from_mapping({
        "model_id": "resnet", "model_version": "7", "handler": "generic:mlp-classifier",
        "kms_key_arn": model.key_arn, "region": REGION, "encryption_context": CONTEXT,
        "sealed_digest": model.header.digest.hex(), "kms_ca_bundle": amazon_trust_services_pem(),
    })
    nsm = Nsm(LocalNsmDevice(pki, pcrs=pcrs))
    data_key, _ = release_data_key(config, model.header, nsm=nsm, kms=kms.client("AKIDENCLAVE"))
    return data_key


def gets_the_key(kms: Kms, pki: LocalPki, model: Model, pcrs: dict[int, bytes]) -> bool:
    try:
        data_key = boot(kms, pki, model, pcrs)
    except KeyAccessDeniedError as exc:
        # refused by the key policy, not because the document failed verification ("failed step: ...")
        assert exc.code == "AccessDeniedException" and "kms:Decrypt" in str(exc), exc
        assert "failed step" not in str(exc), exc
        return False
    assert bytes(data_key) == model.data_key  # the plaintext opened from CiphertextForRecipient
    model.sealed.verify_key(data_key)  # and the sealed header commits to it
    return True


def test_overlap_both_images_get_the_key_a_mix_does_not(kms: Kms, pki: LocalPki, tmp_path: Path) -> None:
    model = sealed_model(kms, tmp_path, pcr_sets=[OLD, NEW])
    assert gets_the_key(kms, pki, model, OLD)
    assert gets_the_key(kms, pki, model, NEW)
    assert not gets_the_key(kms, pki, model, MIXED)
    assert not gets_the_key(kms, pki, model, {**OLD, 2: NEW[2]})


def test_after_the_roll_only_the_new_image_gets_the_key(kms: Kms, pki: LocalPki, tmp_path: Path) -> None:
    model = sealed_model(kms, tmp_path, pcr_sets=[OLD, NEW])
    assert gets_the_key(kms, pki, model, OLD)
    put_policy(kms, model, pcr_sets=[NEW])
    assert not gets_the_key(kms, pki, model, OLD)
    assert gets_the_key(kms, pki, model, NEW)
    assert not gets_the_key(kms, pki, model, MIXED)


def test_first_deploy_key_releases_to_nobody_until_the_image_is_added(
    kms: Kms, pki: LocalPki, tmp_path: Path
) -> None:
    # phase 1: the key exists (the sealer could seal under it, its ARN is in the config) but no set
    model = sealed_model(kms, tmp_path, pcr_sets=[])
    assert not gets_the_key(kms, pki, model, OLD)
    # phase 2: the image's set is added to the same key; the ARN the config names is unchanged
    put_policy(kms, model, pcr_sets=[OLD])
    assert gets_the_key(kms, pki, model, OLD)
    assert not gets_the_key(kms, pki, model, NEW)


def test_a_signer_set_lets_in_images_signed_with_the_same_certificate(
    kms: Kms, pki: LocalPki, tmp_path: Path
) -> None:
    model = sealed_model(kms, tmp_path, pcr_sets=[NEW], signer_sets=[{8: SIGNING}])
    third = {0: b"\xc0" * 48, 1: b"\xc1" * 48, 2: b"\xc2" * 48, 8: SIGNING}
    assert gets_the_key(kms, pki, model, third)
    assert not gets_the_key(kms, pki, model, {**third, 8: b"\x8b" * 48})  # another signing certificate
    assert not gets_the_key(kms, pki, model, {i: v for i, v in third.items() if i != 8})  # unsigned
