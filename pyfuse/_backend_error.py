class BackendError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""
