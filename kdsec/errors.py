"""Errors a user can cause. Each carries one line that names the problem and the fix."""


class KdsecError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits 1."""


class ConfigError(KdsecError):
    """A config file is missing, unreadable, or has an unknown key or a bad value."""


class DataError(KdsecError):
    """A dataset is missing or corrupt."""


class TrainingError(KdsecError):
    """Training diverged (NaN/inf loss) or could not start."""


class IntegrityError(KdsecError):
    """An encrypted artifact failed authentication: wrong key or tampered bytes."""


class KeyMaterialError(KdsecError):
    """An encryption key is missing or malformed."""
