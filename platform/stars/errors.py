"""The one user-error base class of the platform.

A `UserError` is a problem with what the user asked for (a spec field, a missing file, a checkpoint that
is not one, an unknown run to compare), not a bug. `starsctl` prints its message without a traceback
and exits with code 2 (`stars.cli`); every other exception exits 1 with its traceback. Library code
raises a subclass that says where the problem is (`stars.spec.SpecError`, `EvalInputError`, ...).

No project imports: every layer may raise these.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Something the user can fix: reported as one or more plain lines, exit code 2."""

    def lines(self) -> list[str]:
        """What to print, one problem per line."""
        return str(self).splitlines() or [type(self).__name__]
