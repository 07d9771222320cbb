"""Errors whose message is meant for the user: what went wrong and what to do."""


class UserError(Exception):
    """A problem the user can fix; the message is shown as it is."""


class GpuBusyError(UserError):
    """The GPU is held by another job (e.g. a training run)."""


class GenerationCancelled(UserError):
    """The client that asked for a generation went away; it was stopped between steps."""
