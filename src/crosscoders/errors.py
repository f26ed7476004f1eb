"""User-facing errors: each names the problem and the fix, in one line."""


class CrosscodersError(ValueError):
    """Bad input or state that the user can fix; the message says how."""


class ConfigError(CrosscodersError):
    """A config field has a bad value or type, or an unknown key was given."""


class DataError(CrosscodersError):
    """Activations or a data file are malformed (shape, dtype, NaN/inf, empty)."""


class TrainingDiverged(CrosscodersError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
