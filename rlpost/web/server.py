"""The corpus's HTTP server on 127.0.0.1, and its client.

    GET /search?q=<query>&k=<n>&chars=<snippet length>
        -> {"results": [{"url", "title", "snippet", "score"}, ...]}      (BM25, best first)
    GET /page?url=<a page's url in the corpus>
        -> {"url", "title", "text", "links"}, or 404 {"error": ...}

The server answers from the corpus it holds in memory: a url is a key of that corpus, never a path it
opens or an address it connects to, so no request reaches the file system or the network. It binds
127.0.0.1 on an ephemeral port and serves from a daemon thread of the process that started it: it stops
with `stop()` (or the end of the `with` block), after `idle_s` seconds without a request when given one,
and with that process in any case, also when the process is killed (a thread cannot outlive it, so there is
nothing for rlpost/reaper.py to reap). Queries are cut to MAX_QUERY_CHARS, results to MAX_RESULTS.

`shared_server(source, seed)` is the one server of a corpus per process that environments use when they
are given no server_url: started on first use, stopped after a minute without requests (and started
again by the next use).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlpost.web.bm25 import BM25
from rlpost.web.corpus import Doc, load_corpus

MAX_QUERY_CHARS = 1000
MAX_RESULTS = 20
MAX_SNIPPET_CHARS = 1000
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # the most a client reads of one answer (a corpus server's longest page and more)


def search_results(index: BM25, query: str, k: int = 5, chars: int = 160) -> list[dict]:
    """What /search answers, computed in-process (task demonstrations replay exactly what the server says)."""
    query = query[:MAX_QUERY_CHARS]
    return [{"url": index.docs[i].url, "title": index.docs[i].title, "snippet": index.snippet(i, query, chars),
             "score": round(score, 6)} for i, score in index.search(query, max(0, min(k, MAX_RESULTS)))]


@lru_cache(maxsize=8)
def corpus_index(source: str = "generated", seed: int = 0) -> BM25:
    """The BM25 index of load_corpus(source, seed), built once per process."""
    return BM25(load_corpus(source, seed))


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    timeout = 30  # seconds a connection may sit without sending its request or reading the answer: then it is
    # dropped, rather than holding its thread until the process ends

    def log_message(self, format, *args):  # noqa: A002 - http.server's name; requests are not logged
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.last_request = time.monotonic()
        parsed = urllib.parse.urlsplit(self.path)
        args = {k: v[0] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        try:
            if parsed.path == "/search":
                k = int(args.get("k", 5))
                chars = max(0, min(int(args.get("chars", 160)), MAX_SNIPPET_CHARS))
                self._send(200, {"results": search_results(self.server.index, args.get("q", ""), k, chars)})
            elif parsed.path == "/page":
                doc = self.server.pages.get(args.get("url", ""))
                if doc is None:
                    self._send(404, {"error": "no such page in the corpus"})
                else:
                    self._send(200, {"url": doc.url, "title": doc.title, "text": doc.text, "links": list(doc.links)})
            else:
                self._send(404, {"error": "endpoints: /search?q=...&k=..., /page?url=..."})
        except ValueError as e:
            self._send(400, {"error": f"bad argument: {e}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, index: BM25):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.index, self.pages = index, {d.url: d for d in index.docs}
        self.last_request = time.monotonic()


class CorpusServer:
    """The corpus's HTTP server (see the module docstring); a context manager.

        with CorpusServer(docs) as server:      # docs: a list of Doc, or a BM25 index over them
            WebClient(server.url).search("zerak born")
    """

    def __init__(self, docs: list[Doc] | tuple[Doc, ...] | BM25, idle_s: float | None = None):
        self.index = docs if isinstance(docs, BM25) else BM25(docs)
        self.idle_s = idle_s
        self._server: _Server | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the corpus server is not running: call start() or use it in a `with` block")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "CorpusServer":
        """Serve (nothing happens when it is serving already); a start counts as a request for `idle_s`."""
        with self._lock:
            if self._server is None:
                self._server = _Server(self.index)
                threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                 name="rlpost-web-server").start()
                if self.idle_s is not None:
                    threading.Thread(target=self._stop_when_idle, args=(self._server,), daemon=True,
                                     name="rlpost-web-idle").start()
            self._server.last_request = time.monotonic()
        return self

    def _stop_when_idle(self, server: _Server) -> None:
        while self._server is server:
            time.sleep(min(self.idle_s, 1.0))
            if time.monotonic() - server.last_request >= self.idle_s:
                self._stop(server, idle=True)

    def _stop(self, server: _Server | None, idle: bool = False) -> None:
        with self._lock:  # held until the socket is closed: `running` is False only once nothing listens
            if server is None or self._server is not server:
                return
            if idle and time.monotonic() - server.last_request < self.idle_s:
                return  # a request came in meanwhile
            server.shutdown()
            server.server_close()
            self._server = None

    def stop(self) -> None:
        """Stop serving and close the socket (nothing happens when it is not running)."""
        self._stop(self._server)

    def __enter__(self) -> "CorpusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_shared: dict[tuple[str, int], CorpusServer] = {}
_shared_lock = threading.Lock()


def shared_server(source: str = "generated", seed: int = 0, idle_s: float = 60.0) -> CorpusServer:
    """This process's running server of corpus (source, seed), started when there is none (or it stopped
    after `idle_s` seconds without requests)."""
    with _shared_lock:
        server = _shared.get((source, seed))
        if server is None:
            server = _shared[(source, seed)] = CorpusServer(corpus_index(source, seed), idle_s=idle_s)
        return server.start()


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error, never followed: it could name any host (a loopback server_url that is not a corpus
    server would otherwise send the policy's query off the machine)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.URLError(f"the web server at {req.full_url!r} answered a redirect ({code}) to {newurl!r}; "
                                    "rlpost follows none: point env_options.server_url at a CorpusServer")


class WebClient:
    """Talks to a CorpusServer, and only to one on this machine: `base_url` must be http on a loopback address
    (127.0.0.1, ::1, localhost); anything else is a ValueError before any connection. Proxies from the
    environment (http_proxy) are ignored and redirects refused, so a request never leaves the machine. An
    answer is read up to `max_bytes`; one that is longer, not JSON, or not the shape a CorpusServer answers is
    a ValueError naming the server, the endpoint and what came back; one still coming `timeout_s` after the
    request, a TimeoutError."""

    def __init__(self, base_url: str, timeout_s: float = 10.0, max_bytes: int = MAX_ANSWER_BYTES):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not _is_loopback(parts.hostname):
            raise ValueError(f"web server url {base_url!r}: the corpus server must be http on 127.0.0.1 (or another "
                             "loopback address); rlpost never sends a policy's requests off this machine")
        self.base_url, self.timeout_s, self.max_bytes = base_url.rstrip("/"), timeout_s, max_bytes
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def _bad(self, path: str, code: int, what: str) -> ValueError:
        return ValueError(f"the web server at {self.base_url} answered {path} (HTTP {code}) with {what}, not what a "
                          "corpus server answers: point env_options.server_url at a CorpusServer")

    def _read(self, answer, path: str, deadline: float) -> bytes:
        """The answer's body, up to max_bytes + 1 bytes, read by the chunk as it comes: one that still comes
        `timeout_s` after the request was sent is a TimeoutError (each wait is bounded by `timeout_s` already, but a
        server that sends a byte at a time never makes one wait that long)."""
        read = getattr(answer, "read1", answer.read)
        data = bytearray()
        while len(data) <= self.max_bytes:
            chunk = read(min(65536, self.max_bytes + 1 - len(data)))
            if not chunk:
                break
            data += chunk
            if time.monotonic() > deadline and len(data) <= self.max_bytes:
                raise TimeoutError(f"the web server at {self.base_url} was still sending its answer to {path} "
                                   f"{self.timeout_s:g} s after the request (timeout_s), {len(data)} bytes so far")
        return bytes(data)

    def _get(self, path: str, **args) -> tuple[int, dict]:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(args)}"
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._opener.open(url, timeout=self.timeout_s) as r:
                code, data = r.status, self._read(r, path, deadline)
        except urllib.error.HTTPError as e:
            code, data = e.code, self._read(e, path, deadline) or b"{}"
        if len(data) > self.max_bytes:
            raise self._bad(path, code, f"more than {self.max_bytes} bytes")
        try:
            body = json.loads(data)
        except ValueError:  # not JSON, or not UTF-8
            body = None
        if not isinstance(body, dict):
            raise self._bad(path, code, f"{data[:80]!r}{' ...' if len(data) > 80 else ''} (not a JSON object)")
        return code, body

    def search(self, query: str, k: int = 5, chars: int = 160) -> list[dict]:
        """/search: the top k results [{url, title, snippet, score}]."""
        code, body = self._get("/search", q=query[:MAX_QUERY_CHARS], k=k, chars=chars)
        results = body.get("results")
        if code != 200 or not isinstance(results, list) or not all(
                isinstance(h, dict) and all(isinstance(h.get(f), str) for f in ("url", "title", "snippet"))
                for h in results):
            raise self._bad("/search", code, repr(body)[:200])
        return results

    def page(self, url: str) -> dict | None:
        """/page: {url, title, text, links}, or None when the corpus has no such page."""
        code, body = self._get("/page", url=url)
        if code == 404:
            return None
        links = body.get("links")
        if code != 200 or not all(isinstance(body.get(f), str) for f in ("title", "text")) or \
                not isinstance(links, list) or not all(isinstance(link, str) for link in links):
            raise self._bad("/page", code, repr(body)[:200])
        return body
