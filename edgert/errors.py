"""The edgert exception tree.

Every error a user can see derives from :class:`EdgertError`. Third-party errors (onnxruntime,
LiteRT, cryptography, paho, pyserial, OS errors) are converted at the boundary where they occur,
so callers only ever need ``except EdgertError``. Each error carries a message that says what was
wrong and, where one exists, a ``hint`` that says what to do next. The CLI maps each class to an
exit code in one place (:data:`EXIT_CODES`).

Tree::

    EdgertError
    ├── ConfigError            bad profile/config file, unknown profile, bad option value
    ├── ModelError             model file missing, unreadable, corrupt, wrong format
    ├── BackendError           a backend cannot be imported or failed at run time
    ├── InputError             inference inputs do not match the model's signature
    ├── SecurityError
    │   ├── IntegrityError     decryption or verification failed (opaque on purpose)
    │   ├── KeyFileError       missing key, loose permissions, wrong key type
    │   ├── RollbackError      install of a version lower than the highest installed
    │   └── SignatureError     package unsigned or its origin signature does not verify
    │       └── UntrustedSignerError  valid signature by a publisher this device does not trust
    ├── StoreError             model store state problems (unknown model/version, disk full)
    ├── ServeError
    │   └── OverloadedError    admission control refused the request (retry later)
    ├── SyncError              MQTT connection, TLS, ACL, spool problems
    └── ProvisionError         serial provisioning protocol problems
"""

from __future__ import annotations

__all__ = [
    "EXIT_CODES",
    "BackendError",
    "ConfigError",
    "EdgertError",
    "InputError",
    "IntegrityError",
    "KeyFileError",
    "ModelError",
    "OverloadedError",
    "ProvisionError",
    "RollbackError",
    "SecurityError",
    "ServeError",
    "SignatureError",
    "StoreError",
    "SyncError",
    "UnknownModelError",
    "UntrustedSignerError",
    "exit_code_for",
]


class EdgertError(Exception):
    """Base class of every user-facing edgert error."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class ConfigError(EdgertError):
    """A configuration or device profile is invalid or cannot be found."""


class ModelError(EdgertError):
    """A model file is missing, unreadable, corrupt or of an unsupported format."""


class BackendError(EdgertError):
    """An inference backend is unavailable or failed while running."""


class InputError(EdgertError):
    """Inference inputs do not match what the model expects."""


class SecurityError(EdgertError):
    """Base class for key, encryption, signature and anti-rollback failures."""


class IntegrityError(SecurityError):
    """Decryption or verification failed.

    Deliberately opaque: the message never says which byte or which check failed, so it cannot
    be used as an oracle.
    """


class KeyFileError(SecurityError):
    """A key file is missing, has loose permissions or holds the wrong key type."""


class RollbackError(SecurityError):
    """Refused to install a version lower than the highest one installed."""


class SignatureError(SecurityError):
    """A package is unsigned, or its origin signature does not verify."""


class UntrustedSignerError(SignatureError):
    """A package's signature verifies, but its signer is not a publisher this device trusts."""


class StoreError(EdgertError):
    """The model store cannot complete an operation (unknown model, disk full, ...)."""


class ServeError(EdgertError):
    """The serving daemon cannot complete a request."""


class UnknownModelError(ServeError):
    """No model, cascade or version of that name is served (HTTP 404; the one class for it)."""


class OverloadedError(ServeError):
    """Admission control refused the request; the caller should retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float = 1.0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class SyncError(EdgertError):
    """MQTT connection, TLS, authorisation or spool problem."""


class ProvisionError(EdgertError):
    """Serial provisioning protocol failure."""


#: CLI exit codes, most specific class first. 1 is reserved for unexpected crashes.
EXIT_CODES: tuple[tuple[type[EdgertError], int], ...] = (
    (ConfigError, 2),
    (ModelError, 3),
    (InputError, 4),
    (BackendError, 5),
    (IntegrityError, 6),
    (KeyFileError, 7),
    (RollbackError, 8),
    (UntrustedSignerError, 17),
    (SignatureError, 16),
    (SecurityError, 9),
    (StoreError, 10),
    (OverloadedError, 11),
    (ServeError, 12),
    (SyncError, 13),
    (ProvisionError, 14),
    (EdgertError, 15),
)


def exit_code_for(exc: BaseException) -> int:
    """Return the CLI exit code for an exception (1 for anything that is not an EdgertError)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1
