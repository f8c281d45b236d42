"""``nitrovault local kms`` (placeholder: filled in by the KMS emulator work)."""


def kms() -> None:
    raise NotImplementedError
