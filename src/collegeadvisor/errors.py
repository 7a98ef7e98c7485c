"""User-facing errors: one line, naming the file, line or setting, never a traceback."""


class AdvisorError(Exception):
    """An error the CLI prints as one line and exits non-zero on."""


class DataError(AdvisorError):
    """Bad input data: the message names file:line."""


class TemplateError(AdvisorError):
    """A chat template that cannot be split into turns, or ends turns with the wrong token."""


class ModelError(AdvisorError):
    """A base model or adapter that cannot be found or does not match."""


class ManifestError(AdvisorError):
    """A run directory whose manifest is missing, incomplete or mismatched."""


class TrainingError(AdvisorError):
    """Training stopped by a guard (NaN/Inf, loss collapse)."""


def missing_dependency(package: str, extra: str = "") -> AdvisorError:
    """The one-line install hint for an optional dependency that is not importable."""
    hint = f"pip install '{package}'" if not extra else f"pip install 'collegeadvisor[{extra}]'"
    return AdvisorError(f"the Python package '{package}' is not installed; install it with: {hint}")
