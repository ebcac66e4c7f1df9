"""HTML: the page's main text under its ``h1``-``h6`` headings, without navigation, scripts,
forms or footers, and tables kept as rows.

Parsed with lxml. What a page marks as not content (``nav``, ``aside``, a page-level ``header``
or ``footer``, ARIA roles such as ``navigation``, classes such as ``cookie-banner``) is removed
first. A page that marks its content (``main``, ``role="main"``, one ``article``) is read from
there; any other is read through jusText (BSD), the boilerplate remover trafilatura falls back
on, in its language-independent mode (a clinic's pages are not all English), which drops what
is mostly links or too short to stand among boilerplate. Tables are taken out before jusText
(it would read each cell as a paragraph of its own) and put back, row by row, where they were.
"""

from __future__ import annotations

import re
from pathlib import Path

from localmed.errors import DocumentError
from localmed.retrieval.document import ParsedDocument, TextBuilder
from localmed.retrieval.text_reader import decode

DROPPED_TAGS = ("script", "style", "noscript", "template", "svg", "iframe", "form", "button",
                "select", "input", "textarea", "nav", "aside", "menu", "object", "embed",
                "canvas", "dialog", "head")
DROPPED_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu",
                 "menubar", "dialog", "alert"}
BOILERPLATE_NAMES = re.compile(
    r"(^|[-_\s])(nav|navbar|navigation|menu|footer|header|masthead|sidebar|breadcrumbs?|cookies?"
    r"|consent|banner|share|social|skip|advert|ads|promo|newsletter|related)([-_\s]|$)", re.I)
BLOCK_TAGS = {"p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dd", "dt",
              "pre", "blockquote", "figure", "figcaption", "caption", "address", "details",
              "summary", "header", "footer", "hr", "body", "center", "table", "tr", "td", "th"}
HEADINGS = {f"h{n}": n for n in range(1, 7)}
_TABLE_MARK = "\u2063table {}\u2063"
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([-\w.:]+)""", re.I)


def read_html(path: Path, data: bytes) -> ParsedDocument:
    import lxml.etree
    import lxml.html

    text, note = _decode(path, data)
    if not re.search(r"<\s*(html|body|p|div|h[1-6]|table|article|main)\b", text[:65536], re.I):
        raise DocumentError(path, "not HTML (no html, body or text elements)")
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", text)  # lxml refuses a declaration in a str
    try:
        root = lxml.html.document_fromstring(text)
    except (lxml.etree.ParserError, ValueError) as exc:
        raise DocumentError(path, f"damaged HTML ({exc})") from None
    _drop_boilerplate(root)
    tables = _take_tables(root)
    main = _main_element(root)
    items = _walk(main) if main is not None else _classify(root)
    builder = TextBuilder()
    headings: list[tuple[int, str]] = []
    for kind, level, content in items:
        if kind == "heading":
            while headings and headings[-1][0] >= level:
                headings.pop()
            headings.append((level, content))
            builder.add(content, tuple(t for _, t in headings[:-1]), "heading")
            continue
        heading = tuple(t for _, t in headings)
        for piece in re.split(r"(\u2063table \d+\u2063)", content):
            if mark := re.fullmatch(r"\u2063table (\d+)\u2063", piece):
                builder.add(tables[int(mark.group(1))], heading, "table")
            else:
                builder.add(piece, heading, kind)
    builder.blocks = [b for b in builder.blocks if b.kind != "heading"]
    return ParsedDocument("html", (builder.page(),), (note,) if note else ())


def _decode(path: Path, data: bytes) -> tuple[str, str]:
    """The page's text: by its ``<meta charset>`` where it has one, else as plain text is."""
    if match := _META_CHARSET.search(data[:4096]):
        name = match.group(1).decode("ascii", "replace")
        try:
            return data.decode(name).replace("\r\n", "\n"), ""
        except (LookupError, UnicodeDecodeError):
            pass
    return decode(path, data)


def _drop_boilerplate(root) -> None:
    for element in list(root.iter(*DROPPED_TAGS)):
        _remove(element)
    for element in list(root.iter()):
        if not isinstance(element.tag, str) or element.getparent() is None:
            continue
        role = (element.get("role") or "").lower()
        names = f"{element.get('class') or ''} {element.get('id') or ''}"
        landmark = element.tag in ("header", "footer") and not any(
            a.tag in ("article", "main", "section") for a in element.iterancestors())
        hidden = element.get("hidden") is not None or element.get("aria-hidden") == "true"
        if element.tag not in ("html", "body", "main", "article") and (
                role in DROPPED_ROLES or landmark or hidden or BOILERPLATE_NAMES.search(names)):
            _remove(element)


def _remove(element) -> None:
    """Take ``element`` out of the tree, keeping the text that followed it."""
    parent = element.getparent()
    if parent is None:
        return
    if element.tail and element.tail.strip():
        previous = element.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + " " + element.tail
        else:
            parent.text = (parent.text or "") + " " + element.tail
    parent.remove(element)


def _take_tables(root) -> list[str]:
    """Each table's rows as ``cell | cell`` lines, the table replaced by a marker paragraph."""
    import lxml.html

    tables = []
    for table in reversed(list(root.iter("table"))):
        if table.getparent() is None or any(a.tag == "table" for a in table.iterancestors()):
            continue
        rows = []
        for row in table.iter("tr"):
            cells = [" ".join(cell.text_content().split()) for cell in row
                     if isinstance(cell.tag, str) and cell.tag in ("td", "th")]
            if any(cells):
                rows.append(" | ".join(cells))
        marker = lxml.html.Element("p")
        marker.text = _TABLE_MARK.format(len(tables))
        marker.tail = table.tail
        tables.append("\n".join(rows))
        table.getparent().replace(table, marker)
    return tables


def _main_element(root):
    """Where the page says its content is: ``main``, ``role="main"``, or its one article."""
    for element in root.iter("main"):
        return element
    for element in root.iter():
        if isinstance(element.tag, str) and (element.get("role") or "").lower() == "main":
            return element
    articles = list(root.iter("article"))
    return articles[0] if len(articles) == 1 else None


def _walk(element) -> list[tuple[str, int, str]]:
    """(kind, heading level, text) of each block under ``element``, in reading order."""
    out: list[tuple[str, int, str]] = []
    buffer: list[str] = []

    def flush() -> None:
        text = " ".join("".join(buffer).split())
        buffer.clear()
        if text:
            out.append(("text", 0, text))

    def visit(node) -> None:
        tag = node.tag if isinstance(node.tag, str) else ""
        if tag in HEADINGS:
            flush()
            title = " ".join(node.text_content().split())
            if title:
                out.append(("heading", HEADINGS[tag], title))
        elif tag == "pre":
            flush()
            out.append(("code", 0, node.text_content().strip("\n")))
        else:
            block = tag in BLOCK_TAGS
            if block:
                flush()
                if tag == "li":
                    buffer.append("- ")
            if node.text and tag:
                buffer.append(node.text)
            for child in node:
                visit(child)
            if block or tag == "br":
                flush()
        if node.tail:
            buffer.append(node.tail)

    visit(element)
    flush()
    return out


def _classify(root) -> list[tuple[str, int, str]]:
    """jusText's reading of a page with no marked content: its headings, and the paragraphs
    it does not take for boilerplate (language-independent: no stop-word lists)."""
    import justext
    import lxml.html

    html = lxml.html.tostring(root, encoding="unicode")
    # jusText's lengths are for news articles (good: over 200 characters, and a page with no
    # good paragraph keeps nothing); a protocol's paragraphs and bullets are shorter: good
    # from 60 characters, short below 20.
    paragraphs = justext.justext(html, frozenset(), length_low=20, length_high=60,
                                 stopwords_low=0, stopwords_high=0)
    out: list[tuple[str, int, str]] = []
    for paragraph in paragraphs:
        tag = paragraph.dom_path.rsplit(".", 1)[-1]
        text = " ".join(paragraph.text.split())
        if paragraph.is_heading and tag in HEADINGS and text:
            out.append(("heading", HEADINGS[tag], text))
        elif "\u2063table" in text or not paragraph.is_boilerplate:
            out.append(("code" if tag == "pre" else "text", 0,
                        ("- " if tag == "li" else "") + text))
    return out
