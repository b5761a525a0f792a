"""Class labels as users type them (`--labels`), read once for every command: the sampling CLIs of distill and the
runtime's generate and golden commands."""

from .errors import UserError


def parse_labels(spec: str | None, n: int, num_classes: int | None, what: str = "model") -> list[int] | None:
    """'cycle' (or nothing) -> 0, 1, ..., K-1, 0, ...; '3,5' -> 3, 5, 3, 5, ... (n of them); None for an
    unconditional `what` (which takes no labels)."""
    if not num_classes:
        if spec not in (None, "none", "cycle"):
            raise UserError(f"this {what} is unconditional; leave out --labels")
        return None
    if spec in (None, "cycle"):
        return [i % num_classes for i in range(n)]
    try:
        ids = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--labels must be 'cycle' or comma-separated class ids, got {spec!r}") from None
    if not ids:
        raise UserError("--labels is empty")
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise UserError(f"class label {bad[0]} is out of range; this {what} has classes 0..{num_classes - 1}")
    return [ids[i % len(ids)] for i in range(n)]
