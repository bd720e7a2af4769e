"""Errors a user can act on. The CLI prints each as one line and exits with code 2."""


class EvomergeError(Exception):
    """Base of every error evomerge raises on purpose; its text is the whole message."""


class ConfigError(EvomergeError, ValueError):
    """The study config, a recipe file or a command-line argument is wrong."""


def refuse_unknown_keys(data: object, allowed: tuple[str, ...], what: str) -> None:
    """A ConfigError naming the first key of mapping `data` that is not in `allowed`."""
    unknown = sorted(set(data) - set(allowed))  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"{what} error: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


class ModelError(EvomergeError, ValueError):
    """A model reference cannot be resolved, or models cannot be merged with each other."""


class StudyError(EvomergeError, LookupError):
    """A study, trial or storage URL is missing or in the wrong state."""


class SearchError(EvomergeError, RuntimeError):
    """A search that cannot usefully go on: its first candidates all fail the same way."""


class Stopped(KeyboardInterrupt):
    """A stop asked for from outside (Ctrl-C, or SIGTERM from a cluster scheduler): the controller stops
    cleanly, as for Ctrl-C (it is a KeyboardInterrupt), and `evomerge resume` continues the study."""

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
