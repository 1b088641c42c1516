"""Errors that mean "the user's input is wrong": the entry point prints them as one line."""


class MasklabError(Exception):
    """Base of the errors the entry point reports without a traceback."""


class ConfigError(MasklabError, ValueError):
    """One or more config values are invalid; the message names every key at fault."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


class DataError(MasklabError):
    """The data (a path, a file, a tokenizer) cannot be used."""


def raise_if_any(errors: list[str]) -> None:
    if errors:
        raise ConfigError(errors)
