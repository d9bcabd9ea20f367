"""What every spec section shares: the `Section` base model, the strict number types, and the helpers
that report several problems of one model at once.

Numbers are strict on purpose: YAML reads `seed: true` as a boolean and `.nan`/`.inf` as floats, and
pydantic would quietly take both as numbers. Every int field is an `Int` (no booleans, floats or
strings), every float field a `Float` (no booleans or strings; finite, as the `Section` config forbids
NaN and infinity), and every numeric field has an upper bound, shown in the JSON schema
(`starsctl schema`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Strict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["Float", "Int", "MAX_SEED", "Section", "cross_error", "raise_all"]

#: Largest seed: numpy, torch and `random` all take it, and it survives any JSON round trip.
MAX_SEED = 2**32 - 1


Int = Annotated[int, Strict()]
"""An integer field: integers only (not `true`, not `3.0`, not the string `"7"`)."""
Float = Annotated[float, Strict()]
"""A float field: numbers only (integers are fine; not `true`, not strings: the loader reads `3e-4`
as a number, see `stars.spec.loader`)."""


class Section(BaseModel):
    """Base of every spec model: unknown keys are errors, NaN and infinity are errors, and attribute
    docstrings are the field help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    @classmethod
    def unknown_key_message(cls, key: str, tag: str | None) -> str | None:
        """A better message than "unknown key" for `key`, which this model forbids (e.g. a key that
        belongs to another member of a union); None for the default message. `tag` is the union tag
        that selected this model, if any."""
        return None


def cross_error(loc: tuple[str | int, ...], message: str, value: Any = None) -> InitErrorDetails:
    """A problem found by a rule across fields, at `loc`, as pydantic error details."""
    return InitErrorDetails(
        type=PydanticCustomError("stars_cross", "{message}", {"message": message}), loc=loc, input=value
    )


def raise_all(title: str, errors: list[InitErrorDetails]) -> None:
    """Raise every problem in `errors` as one ValidationError (nothing if there are none)."""
    if errors:
        raise ValidationError.from_exception_data(title, errors)
