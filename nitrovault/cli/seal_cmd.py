"""``nitrovault seal`` and ``nitrovault inspect`` (placeholder: filled in by the sealed-format work)."""


def seal() -> None:
    raise NotImplementedError


def inspect() -> None:
    raise NotImplementedError
