"""Errors whose message is meant for the user: what went wrong and what to do."""


class UserError(Exception):
    """A problem the user can fix; the message is shown as it is."""


class GpuBusyError(UserError):
    """The GPU is held by another job (e.g. a training run)."""


class GenerationCancelled(UserError):
    """The client that asked for a generation went away; it was stopped between steps."""


def shown_to_user(message: str | Exception, strings=None):
    """A ``gr.Error`` for a problem the user can fix: shown on the page, one line in the console, no traceback
    (Gradio prints a full traceback for every error otherwise). With the tab's live ``strings``
    (:class:`core.i18n.LiveStrings`) the English message is shown in the page's language; the log keeps English."""
    import logging

    import gradio as gr

    from core.i18n import shown_message

    logging.getLogger("lora_studio").info("refused: %s", message)
    return gr.Error(shown_message(message, strings), print_exception=False)
