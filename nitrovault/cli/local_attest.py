"""``nitrovault local attest`` (placeholder: filled in by the local NSM work)."""


def attest() -> None:
    raise NotImplementedError
