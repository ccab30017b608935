"""Reading the dashboard's HTML in tests: table rows, header columns, links, as a reader sees them."""

from __future__ import annotations

import dataclasses
import html.parser
import re
from html import unescape
from typing import Any


@dataclasses.dataclass
class Cell:
    classes: str
    text: str = ""
    value: str | None = None  # data-value: the raw metric behind a formatted number
    links: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Row:
    record_id: str
    cells: list[Cell]


@dataclasses.dataclass
class Page:
    headers: list[str]  # data-column of each header cell of the results table
    sorted_header: tuple[str, str] | None  # (column, aria-sort) of the sorted one
    header_links: dict[str, str]
    rows: list[Row]
    links: dict[str, str]  # data-pager name -> href
    ids: dict[str, str]  # element id -> its text

    def column(self, name: str) -> list[Cell]:
        index = self.headers.index(name)
        return [row.cells[index] for row in self.rows]

    @property
    def record_ids(self) -> list[str]:
        return [row.record_id for row in self.rows]


VOID_ELEMENTS = frozenset({"input", "img", "br", "meta", "link", "hr", "source", "wbr"})


class _PageParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page([], None, {}, [], {}, {})
        self._in_results = False
        self._header: str | None = None
        self._cell: Cell | None = None
        self._id_stack: list[tuple[str, str]] = []  # (tag, id) of open elements with an id
        self._id_text: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes: dict[str, Any] = {name: value or "" for name, value in attrs}
        if "id" in attributes and tag not in VOID_ELEMENTS:
            self._id_stack.append((tag, attributes["id"]))
            self._id_text[attributes["id"]] = []
        if tag == "table" and attributes.get("id") == "results-table":
            self._in_results = True
        elif tag == "th" and self._in_results and "data-column" in attributes:
            self._header = attributes["data-column"]
            self.page.headers.append(self._header)
            if attributes.get("aria-sort") in ("ascending", "descending"):
                self.page.sorted_header = (self._header, attributes["aria-sort"])
        elif tag == "a" and self._header is not None:
            self.page.header_links[self._header] = attributes["href"]
        elif tag == "tr" and self._in_results and "data-record-id" in attributes:
            self.page.rows.append(Row(attributes["data-record-id"], []))
        elif tag == "td" and self._in_results and self.page.rows:
            self._cell = Cell(attributes.get("class", ""), value=attributes.get("data-value"))
            self.page.rows[-1].cells.append(self._cell)
        elif tag == "a" and self._cell is not None:
            self._cell.links.append(attributes["href"])
        if tag == "a" and "data-pager" in attributes:
            self.page.links[attributes["data-pager"]] = attributes["href"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_results = False
        elif tag == "th":
            self._header = None
        elif tag == "td":
            self._cell = None
        if self._id_stack and self._id_stack[-1][0] == tag:
            _, element_id = self._id_stack.pop()
            self.page.ids[element_id] = "".join(self._id_text[element_id]).strip()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.text += data
        for _, element_id in self._id_stack:
            self._id_text[element_id].append(data)


def parse_page(text: str) -> Page:
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    for row in parser.page.rows:
        for cell in row.cells:
            cell.text = " ".join(cell.text.split())
    return parser.page


def table_rows(markup: str, table_id: str) -> list[str]:
    """The body rows (as markup) of the table with this id."""
    table = re.search(rf'<table[^>]* id="{table_id}">.*?</table>', markup, re.S)
    assert table is not None, markup[-3000:]
    return re.findall(r"<tr[^>]*>.*?</tr>", table.group(0).split("<tbody>", 1)[1], re.S)


def text_of(markup: str) -> str:
    """The text a reader sees in some markup, its runs of white space made one space."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", markup)).split())
