"""Error types. Raised at the edge with a message a user can act on; rendered once by the CLI."""

from __future__ import annotations


class OvernightError(Exception):
    """An expected failure with a message that says what went wrong and what to do."""

    exit_code = 1


class ConfigError(OvernightError):
    """Bad input or configuration: overnight.toml, flags, the repository's state."""

    exit_code = 2


class IntegrityHalt(OvernightError):
    """The loop stopped because what ran is not what was committed."""

    exit_code = 3
