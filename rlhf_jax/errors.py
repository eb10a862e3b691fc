"""The one exception type for mistakes a user can fix (bad config, bad data, missing path).

`rlhf_jax.main` prints a `UserError` as a single line on stderr and exits non-zero, without a
traceback. Messages name what is wrong and where: the flag, config key, file and line.
"""


class UserError(Exception):
  """An error caused by the user's input rather than by a bug in rlhf-jax."""


def where(path, line=None) -> str:
  """Formats a location for error messages: `path` or `path:line`."""
  return f"{path}:{line}" if line is not None else str(path)
