"""Error types. `InputError` means the user gave something we cannot use
(bad file, bad config value); the CLI turns it into exit code 2 with the
message alone, since the message already names the input and the fix."""


class DpsynthError(Exception):
    """Base class of dpsynth's own errors (exit code 1 unless a subclass says)."""


class InputError(DpsynthError, ValueError):
    """Bad user input: a file, a URI or a config value. The message names it."""


class ConfigError(InputError):
    """A config field is unknown or has an invalid value."""


class TrainingDiverged(DpsynthError):
    """Training produced non-finite values (exit code 1). The message names the
    step, the last good checkpoint kept in the work folder and what to change;
    the diverged state is never checkpointed or published."""
