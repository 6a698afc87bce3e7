"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserInputError(ValueError):
    """Bad input from the user (prompt, config value, path). The message names the fix."""
