"""Choosing in a Gradio dropdown from a browser test, checked: a click on an option can be lost while the
page is still settling (a loaded machine), and an action sent then would carry the old value."""

from __future__ import annotations


def choose_option(page, elem_id: str, name: str, *, tries: int = 3) -> None:
    """Open the dropdown ``#elem_id``, click the option ``name`` and wait until the field shows it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    field = page.locator(f"#{elem_id} input").first
    for _ in range(tries):
        field.click()
        page.get_by_role("option", name=name, exact=True).click()
        try:
            page.wait_for_function(
                "([selector, name]) => document.querySelector(selector)?.value === name",
                arg=[f"#{elem_id} input", name],
                timeout=5_000,
            )
            return
        except PlaywrightTimeout:  # the click was lost: choose again
            continue
    raise AssertionError(f"the dropdown #{elem_id} does not show {name!r} after {tries} tries")
