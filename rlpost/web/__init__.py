"""A local web to search and browse: a corpus of pages (generated, or the user's own), a BM25 index over it,
and a real HTTP server on 127.0.0.1 with a search and a page endpoint. The `web` environment
(rlpost/env/web.py) gives a policy `search(query)` and `open(url)` against it.

    from rlpost.web import CorpusServer, load_corpus
    with CorpusServer(load_corpus("generated")) as server:     # or a folder of .txt/.md, or a .jsonl file
        server.url                                          # http://127.0.0.1:<ephemeral port>

- corpus.py: `Doc` (url, title, text), the generated encyclopedia of invented people, towns and rivers
  (deterministic from a seed), and the user's corpora.
- bm25.py: the ranking (Okapi BM25) and snippets.
- server.py: the HTTP server (a thread of the caller's process, so it cannot outlive it) and the client.
"""

from rlpost.web.bm25 import BM25, tokenize
from rlpost.web.corpus import Doc, generate_world, load_corpus
from rlpost.web.server import CorpusServer, WebClient, shared_server

__all__ = ["BM25", "CorpusServer", "Doc", "WebClient", "generate_world", "load_corpus", "shared_server", "tokenize"]
