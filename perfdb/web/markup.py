"""HTML that is safe by construction: every value put into a template is escaped unless it is
already Markup, so a test name or a tag can never inject HTML."""

from __future__ import annotations

import html
from collections.abc import Iterable


class Markup(str):
    """A string of HTML that is already safe to send as is."""

    __slots__ = ()

    def join_markup(self, parts: Iterable[object]) -> Markup:
        return Markup(str.join(self, (escape(part) for part in parts)))


def escape(value: object) -> Markup:
    """Escape a value for HTML text or a quoted attribute; Markup passes through."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def render(template: str, **values: object) -> Markup:
    """Fill `{name}` placeholders in an HTML template, escaping every value that is not Markup."""
    return Markup(template.format(**{name: escape(value) for name, value in values.items()}))


def concat(parts: Iterable[object]) -> Markup:
    """Markup for a sequence of parts (escaping those that are not Markup)."""
    return Markup("").join_markup(parts)


def json_data_block(element_id: str, data: bytes) -> Markup:
    """A JSON document in the page, for its script to read instead of fetching it. Every `<` is
    written as its JSON escape (it can only occur inside strings), so no `</script>` or comment
    opener in a test name can end the block early."""
    text = data.decode().replace("<", "\\u003c")
    return Markup(render('<script type="application/json" id="{id}">', id=element_id) + text + "</script>")
