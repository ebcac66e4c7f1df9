"""What ``localmed docs`` reads from files written by the tools people write them with
(reportlab, python-docx, hand-made HTML and Markdown), and the one line it says for each file it
cannot read."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from localmed.errors import DocumentError
from localmed.retrieval.chunk import Chunker, fixed_chunks, section_chunks
from localmed.retrieval.parse import parse
from tests.documents import (
    Section,
    write_docx,
    write_html,
    write_markdown,
    write_pdf,
    write_scanned_pdf,
    zip_bomb_docx,
)

SEPSIS = Section("Sepsis: first hour", (
    "Give broad-spectrum antibiotics within one hour of recognising septic shock.",
    "Measure lactate, and take blood cultures before the first dose where this causes no "
    "delay."))
FLUIDS = Section("Fluids", ("Give 30 mL/kg of crystalloid within three hours for "
                            "hypotension or a lactate of 4 mmol/L or more.",))
DOSES = [["drug", "adult dose"], ["ceftriaxone", "2 g IV once daily"],
         ["meropenem", "1 g IV every 8 hours"]]


def read(path: Path):
    return parse(path, path.read_bytes())


def spans_hold(document) -> None:
    """Every block and passage is the very text of its page at its span."""
    for page in document.pages:
        for block in page.blocks:
            assert page.text[block.start:block.end].strip()
    for chunk in section_chunks(document) + fixed_chunks(document):
        page = next(p for p in document.pages if p.number == chunk.page)
        assert page.text[chunk.start:chunk.end] == chunk.text


class TestReaders:
    def test_pdf_pages_and_outline_headings(self, tmp_path: Path):
        # enough text to flow onto a second page, each section an outline entry
        long = Section("Antibiotic choice", tuple(f"Paragraph {n}: " + "Reassess the choice "
                                                  "of antibiotic daily. " * 12
                                                  for n in range(12)))
        doc = read(write_pdf(tmp_path / "sepsis.pdf", [SEPSIS, FLUIDS, long]))
        assert doc.kind == "pdf" and len(doc.pages) >= 2
        assert [p.number for p in doc.pages] == list(range(1, len(doc.pages) + 1))
        first = doc.pages[0]
        within = [b.heading for b in first.blocks]
        assert ("Sepsis: first hour",) in within and ("Fluids",) in within
        text = first.text[first.blocks[0].start:first.blocks[0].end]
        assert "within one hour" in " ".join(text.split())
        # a heading found part-way down a page starts there
        fluids = next(b for b in first.blocks if b.heading == ("Fluids",))
        assert first.text[fluids.start:].startswith("Fluids")
        # the later page is under the last heading of the page before it
        assert doc.pages[-1].blocks[0].heading == ("Antibiotic choice",)
        spans_hold(doc)

    def test_docx_headings_and_table(self, tmp_path: Path):
        doc = read(write_docx(tmp_path / "ward.docx", [SEPSIS, FLUIDS], table=DOSES))
        page, = doc.pages
        assert page.number is None
        kinds = {(b.heading, b.kind) for b in page.blocks}
        assert (("Sepsis: first hour",), "text") in kinds
        table = next(b for b in page.blocks if b.kind == "table")
        assert page.text[table.start:table.end].splitlines() == [
            "drug | adult dose", "ceftriaxone | 2 g IV once daily", "meropenem | 1 g IV every 8 hours"]
        spans_hold(doc)

    @pytest.mark.parametrize("main", [True, False], ids=["main-element", "jusText"])
    def test_html_main_text_only(self, tmp_path: Path, main: bool):
        doc = read(write_html(tmp_path / "page.html", [SEPSIS, FLUIDS], main=main))
        text = doc.pages[0].text
        assert "within one hour" in text and "30 mL/kg" in text
        for boilerplate in ("Contact the pharmacy", "cookies", "tracking", "Related protocol",
                            "Privacy notice"):
            assert boilerplate not in text, boilerplate
        headings = {b.heading for b in doc.pages[0].blocks}
        assert headings == {("Sepsis: first hour",), ("Fluids",)}
        spans_hold(doc)

    def test_html_table_rows(self, tmp_path: Path):
        rows = "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in DOSES)
        path = tmp_path / "doses.html"
        path.write_text(f"<html><body><main><h1>Doses</h1><table>{rows}</table></main>"
                        "</body></html>", encoding="utf-8")
        doc = read(path)
        block, = doc.pages[0].blocks
        assert block.kind == "table" and block.heading == ("Doses",)
        assert doc.pages[0].text[block.start:block.end].splitlines()[1] == \
            "ceftriaxone | 2 g IV once daily"

    def test_markdown_spans_are_the_file(self, tmp_path: Path):
        path = write_markdown(tmp_path / "notes.md", [SEPSIS, FLUIDS], title="Ward notes")
        with path.open("a", encoding="utf-8") as fh:
            fh.write("\n| drug | dose |\n|---|---|\n| ceftriaxone | 2 g |\n\n```\n# not a "
                     "heading\n```\n")
        doc = read(path)
        text = path.read_text(encoding="utf-8")
        assert doc.pages[0].text == text
        blocks = doc.pages[0].blocks
        assert blocks[0].heading == ("Ward notes", "Sepsis: first hour")
        assert {b.kind for b in blocks} == {"text", "table", "code"}
        assert all(b.heading[-1] != "not a heading" for b in blocks)
        spans_hold(doc)

    def test_text_in_another_encoding(self, tmp_path: Path):
        path = tmp_path / "cp1252.txt"
        path.write_bytes("Paracétamol 1 g toutes les six heures; dose maximale 4 g par "
                         "jour chez l’adulte.".encode("cp1252"))
        doc = read(path)
        assert "Paracétamol" in doc.pages[0].text and "l’adulte" in doc.pages[0].text
        assert doc.notes and "not UTF-8" in doc.notes[0]
        bom = tmp_path / "utf16.txt"
        bom.write_bytes(codecs.BOM_UTF16_LE + "Dose: 5 mg/kg".encode("utf-16-le"))
        assert read(bom).pages[0].text == "Dose: 5 mg/kg"


class TestChunks:
    def test_sections_never_cross_a_heading_or_a_page(self, tmp_path: Path):
        doc = read(write_markdown(tmp_path / "g.md", [SEPSIS, FLUIDS]))
        chunks = section_chunks(doc, 1000)
        assert [c.heading[-1] for c in chunks] == ["Sepsis: first hour", "Fluids"]
        assert "within one hour" in chunks[0].text and "Measure lactate" in chunks[0].text

    def test_a_long_section_is_cut_at_sentence_ends(self, tmp_path: Path):
        sentences = " ".join(f"Sentence {n} says something about dosing." for n in range(60))
        doc = read(write_markdown(tmp_path / "long.md", [Section("Long", (sentences,))]))
        chunks = section_chunks(doc, 300)
        assert len(chunks) > 5 and all(len(c.text) <= 300 for c in chunks)
        assert all(c.text.endswith(".") for c in chunks)

    def test_gpt4all_recipe_is_512_characters_of_words(self, tmp_path: Path):
        doc = read(write_markdown(tmp_path / "g.md", [SEPSIS, FLUIDS] * 6))
        chunks = fixed_chunks(doc, 512)
        assert all(len(c.text) <= 512 for c in chunks) and len(chunks) > 1
        assert all(c.heading == () for c in chunks)
        assert Chunker.parse("fixed:512").chunks(doc) == chunks


class TestBadFiles:
    """Each one line naming the file and what is wrong with it."""

    def refused(self, path: Path) -> str:
        with pytest.raises(DocumentError) as caught:
            read(path)
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message
        return message

    def test_encrypted_pdf(self, tmp_path: Path):
        path = write_pdf(tmp_path / "locked.pdf", [SEPSIS], password="ward7")
        assert "encrypted" in self.refused(path)

    def test_scanned_pdf(self, tmp_path: Path):
        assert "no text layer (scanned?); localmed does not OCR" in \
            self.refused(write_scanned_pdf(tmp_path / "scan.pdf"))

    def test_truncated_pdf(self, tmp_path: Path):
        whole = write_pdf(tmp_path / "whole.pdf", [SEPSIS, FLUIDS]).read_bytes()
        path = tmp_path / "cut.pdf"
        path.write_bytes(whole[:len(whole) // 3])
        assert "damaged" in self.refused(path)

    def test_binary_named_pdf(self, tmp_path: Path):
        path = tmp_path / "photo.pdf"
        path.write_bytes(bytes(range(256)) * 40)
        assert "not a PDF" in self.refused(path)

    def test_empty_file(self, tmp_path: Path):
        path = tmp_path / "empty.md"
        path.write_bytes(b"")
        assert self.refused(path).endswith("empty file")

    def test_binary_text_file(self, tmp_path: Path):
        path = tmp_path / "notes.txt"
        path.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
        assert "binary data, not text" in self.refused(path)

    def test_docx_zip_bomb(self, tmp_path: Path):
        path = zip_bomb_docx(tmp_path / "bomb.docx")
        assert path.stat().st_size < 2 * 2**20
        assert "zip bomb" in self.refused(path)

    def test_docx_that_is_no_zip(self, tmp_path: Path):
        path = tmp_path / "letter.docx"
        path.write_text("Dear colleague, …", encoding="utf-8")
        assert "not a DOCX" in self.refused(path)

    def test_html_that_is_no_html(self, tmp_path: Path):
        path = tmp_path / "export.html"
        path.write_bytes(b"\0\1\2" * 100)
        assert "binary data" in self.refused(path) or "not HTML" in self.refused(path)
