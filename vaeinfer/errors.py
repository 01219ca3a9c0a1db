"""Typed errors. Each message says what was expected and what came."""


class VaeinferError(Exception):
    """Base class of every error vaeinfer raises on purpose."""


class BundleError(VaeinferError, ValueError):
    """A model bundle that is missing, malformed, tampered with or not supported."""


class InputError(VaeinferError, ValueError):
    """A call's input does not fit the model (shape, dtype, range, NaN, codes, batch size)."""


class OutputError(VaeinferError, RuntimeError):
    """A graph produced non-finite values; the result is refused instead of returned."""


class BackendError(VaeinferError, RuntimeError):
    """The requested backend cannot run here (no CUDA provider, no onnxruntime, no torch)."""


class UnknownBackendError(BackendError, ValueError):
    """A backend name that is not registered (`vaeinfer.backends.names()` lists the known ones)."""
