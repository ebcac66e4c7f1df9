"""Retrieval over the clinic's own documents: ``localmed docs``, ``chat --docs``, ``serve --docs``.

One place for all of it, bottom to top:

- :mod:`.parse` and its readers (:mod:`.pdf_reader`, :mod:`.html_reader`, :mod:`.docx_reader`,
  :mod:`.text_reader`): a file's text, page by page, cut into blocks under their headings, each
  block a span of that text;
- :mod:`.chunk`: blocks into passages (a guideline's section, split only where it is long);
- :mod:`.store`: one SQLite file per index (files, passages, FTS5, vectors);
- :mod:`.indexer`: a folder kept in step with its index, file by file;
- :mod:`.embedder`: vectors from llama.cpp's embedding mode, in an engine process;
- :mod:`.search`: BM25, dense and their reciprocal-rank fusion;
- :mod:`.grounding`: passages into a prompt, and a reply's citations checked against them.

A passage knows its file, page, heading path and character span from the moment it is cut, so a
citation is a lookup, not a search. Chat and serve use this package; nothing below them does.
"""
