"""Documents for ``localmed docs``, written by the libraries people write them with: PDFs by
reportlab (text layers, outlines, a password, a scan with no text), DOCX by python-docx, HTML
pages with the navigation and footers real pages have, Markdown; and PubMedQA's abstracts
written out as such a folder for the tests and ``benchmarks/grounded.py``.
"""

from __future__ import annotations

import html
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.tiny_models import SHARED

PUBMEDQA = SHARED / "benchmarks" / "pubmedqa.jsonl"


@dataclass(frozen=True)
class Section:
    heading: str
    paragraphs: tuple[str, ...]


def write_pdf(path: Path, sections: Sequence[Section], *, password: str | None = None,
              title: str = "Clinical guideline") -> Path:
    """A PDF whose sections flow over pages, each heading an outline entry (bookmark)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    styles = getSampleStyleSheet()

    class Document(SimpleDocTemplate):
        def afterFlowable(self, flowable) -> None:  # reportlab's hook, by its name
            if isinstance(flowable, Paragraph) and flowable.style.name == "Heading2":
                key = f"s{id(flowable)}"
                self.canv.bookmarkPage(key)
                self.canv.addOutlineEntry(flowable.getPlainText(), key, level=0)

    doc = Document(str(path), pagesize=A4, title=title, encrypt=password)
    story = []
    for section in sections:
        story.append(Paragraph(html.escape(section.heading), styles["Heading2"]))
        for paragraph in section.paragraphs:
            story.append(Paragraph(html.escape(paragraph), styles["BodyText"]))
            story.append(Spacer(1, 4))
    doc.build(story)
    return path


def write_scanned_pdf(path: Path) -> Path:
    """A PDF of one page that is a picture only (what a scanner makes): no text layer."""
    from PIL import Image as PILImage
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    picture = PILImage.new("RGB", (200, 100), (250, 250, 245))
    for x in range(20, 180):
        picture.putpixel((x, 50), (10, 10, 10))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    buffer.seek(0)
    sheet = canvas.Canvas(str(path))
    sheet.drawImage(ImageReader(buffer), 72, 600, 400, 200)
    sheet.showPage()
    sheet.save()
    return path


def write_docx(path: Path, sections: Sequence[Section], table: list[list[str]] | None = None
               ) -> Path:
    import docx

    document = docx.Document()
    for section in sections:
        document.add_heading(section.heading, level=2)
        for paragraph in section.paragraphs:
            document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                grid.cell(r, c).text = cell
    document.save(str(path))
    return path


def write_html(path: Path, sections: Sequence[Section], *, main: bool = True) -> Path:
    """A hospital intranet page: navigation, a cookie banner, the sections (in ``<main>``, or
    loose in ``<div>``s with ``main=False``), a footer."""
    nav = ('<nav><ul><li><a href="/">Home</a></li><li><a href="/guidelines">Guidelines</a></li>'
           '<li><a href="/contact">Contact the pharmacy</a></li></ul></nav>')
    links = " | ".join(f'<a href="/p{n}">Related protocol {n}</a>' for n in range(8))
    body = "".join(f"<h2>{html.escape(s.heading)}</h2>" + "".join(
        f"<p>{html.escape(p)}</p>" for p in s.paragraphs) for s in sections)
    content = f"<main>{body}</main>" if main else f'<div class="content">{body}</div>'
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Guidelines</title>"
            f"<script>var tracking = 'do not index me';</script></head><body>{nav}"
            f"<div class='cookie-banner'>This site uses cookies to remember your settings.</div>"
            f"{content}<div class='related'>{links}</div>"
            f"<footer>© 2026 St Elsewhere Hospital. Intranet use only. Privacy notice.</footer>"
            "</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def write_markdown(path: Path, sections: Sequence[Section], title: str = "Protocols") -> Path:
    parts = [f"# {title}\n"]
    for section in sections:
        parts.append(f"## {section.heading}\n")
        parts += [f"{p}\n" for p in section.paragraphs]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def zip_bomb_docx(path: Path, inflated: int = 300 * 2**20) -> Path:
    """A file named .docx whose one member inflates from ~300 KB to ``inflated`` bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            block = b"\0" * 2**20
            for _ in range(inflated // len(block)):
                member.write(block)
    return path


# --- PubMedQA as a folder of documents ------------------------------------------------------------

@dataclass(frozen=True)
class Abstract:
    pmid: str
    question: str
    conclusion: str
    paragraphs: tuple[str, ...]
    answer_idx: str
    options: dict[str, str]


def pubmedqa(limit: int | None = None) -> list[Abstract]:
    """PubMedQA's test set: each abstract's paragraphs (its context), its question and its
    conclusion (``answer_rationale``, not part of the context)."""
    out = []
    for line in PUBMEDQA.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        *context, question = row["question"].strip().split("\n")
        out.append(Abstract(str(row["realidx"]), question.strip(), row["answer_rationale"],
                            tuple(p.strip() for p in context if p.strip()), row["answer_idx"],
                            row["options"]))
        if limit is not None and len(out) >= limit:
            break
    return out


KINDS = ("pdf", "html", "md", "docx")


def heading(abstract: Abstract) -> str:
    return f"Study {abstract.pmid}"


def write_corpus(folder: Path, abstracts: Sequence[Abstract], per_file: int = 5
                 ) -> dict[str, tuple[str, frozenset[int] | None]]:
    """The abstracts as a folder of PDF, HTML, Markdown and DOCX files in turn, ``per_file``
    to a file, each a section under its own heading; where each one is: its file (relative)
    and, in a PDF, the pages it is on (read back by PDFium)."""
    folder.mkdir(parents=True, exist_ok=True)
    where: dict[str, tuple[str, frozenset[int] | None]] = {}
    for n in range(0, len(abstracts), per_file):
        group = abstracts[n:n + per_file]
        kind = KINDS[(n // per_file) % len(KINDS)]
        name = f"{kind}/bulletin-{n // per_file + 1:03d}.{kind}"
        (folder / kind).mkdir(exist_ok=True)
        sections = [Section(heading(a), a.paragraphs) for a in group]
        path = folder / name
        if kind == "pdf":
            write_pdf(path, sections)
            for abstract, pages in zip(group, pdf_pages(path, group), strict=True):
                where[abstract.pmid] = (name, pages)
        else:
            {"html": write_html, "md": write_markdown, "docx": write_docx}[kind](path, sections)
            for abstract in group:
                where[abstract.pmid] = (name, None)
    return where


def pdf_pages(path: Path, group: Sequence[Abstract]) -> list[frozenset[int]]:
    """The pages (from 1) each abstract's text is on, found by PDFium."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    texts = []
    for i in range(len(pdf)):
        textpage = pdf[i].get_textpage()
        texts.append(" ".join(textpage.get_text_range().split()))
    pdf.close()
    out = []
    for abstract in group:
        body = " ".join(" ".join(abstract.paragraphs).split())
        probes = [body[:40], body[len(body) // 2:len(body) // 2 + 40], body[-40:]]
        pages = {i + 1 for i, text in enumerate(texts) for probe in probes
                 if " ".join(probe.split()[1:-1]) in text}
        out.append(frozenset(pages))
    return out
