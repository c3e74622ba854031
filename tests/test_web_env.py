"""The web environment: the corpus server (loopback only, stops), BM25 against hand-computed scores, snippets,
the user's corpora, the env's episode on scripted policy text, truncation, the tool-call budget, a hostile
policy's calls (refused without any request off the machine), and the web task's demonstrations replayed
against the env. The slow test at the end is recipes/web.yaml's measured gain."""

import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from rlpost.env import load_env
from rlpost.env.web import WebEnv
from rlpost.web import BM25, CorpusServer, Doc, WebClient, generate_world, load_corpus, tokenize
from rlpost.web.server import MAX_QUERY_CHARS, corpus_index, search_results

DOCS = [Doc("pets/cat", "cat", "cat sat"), Doc("pets/dog", "dog", "dog sat on cat"),
        Doc("pets/fish", "fish", "fish swim")]


@pytest.fixture
def corpus_file(tmp_path):
    """A JSONL corpus: a person's page, a town's page linking to its river, the river's page."""
    rows = [{"url": "wiki/Fipuk", "title": "Fipuk", "text": "Fipuk was a mason. Fipuk was born in Sipik in 1760."},
            {"url": "wiki/Sipik", "title": "Sipik", "text": "Sipik is a town. Sipik lies on the river Gufi."},
            {"url": "wiki/Gufi", "title": "Gufi", "text": "The Gufi is a river. It flows through Sipik."}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def served(corpus_file):
    with CorpusServer(load_corpus(corpus_file)) as server:
        yield corpus_file, server


def env(served, **options):
    corpus_file, server = served
    e = WebEnv(corpus=corpus_file, server_url=server.url, **options)
    e.reset({"prompt": "Which river flows where Fipuk was born?", "answer": "Gufi"})
    return e


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def test_bm25_scores_equal_the_hand_computed_ones():
    index = BM25(DOCS)  # terms (title + text): cat cat sat | dog dog sat on cat | fish fish swim; avgdl 11/3
    # idf(cat) = ln(1 + (3 - 2 + .5) / (2 + .5)) = ln 1.6 = 0.4700036
    # doc 0: tf 2, |d| 3: 0.4700036 * 2 * 2.5 / (2 + 1.5 * (.25 + .75 * 3 / (11/3)))  = 0.7131089
    # doc 1: tf 1, |d| 5: 0.4700036 * 1 * 2.5 / (1 + 1.5 * (.25 + .75 * 5 / (11/3)))  = 0.4039094
    got = index.search("cat", k=5)
    assert [i for i, _ in got] == [0, 1]
    assert got[0][1] == pytest.approx(0.7131089, abs=1e-6) and got[1][1] == pytest.approx(0.4039094, abs=1e-6)
    assert index.score("cat", 2) == 0.0
    # idf(swim) = ln(1 + 2.5 / 1.5) = 0.9808293; doc 2: tf 1, |d| 3: 0.9808293 * 2.5 / (1 + 1.2954545) = 1.0682299
    assert index.search("Swim!", k=5) == [(2, pytest.approx(1.0682299, abs=1e-6))]
    assert index.search("sat", k=1)[0][0] == 0  # a shorter page ranks first
    assert index.search("zebra") == [] and index.search("") == []
    tie = BM25([Doc("a", "x", "same words"), Doc("b", "x", "same words")])
    assert [i for i, _ in tie.search("same")] == [0, 1]  # ties in corpus order
    assert tokenize("Zerak was born in Molvo, 1843.") == ["zerak", "was", "born", "in", "molvo", "1843"]


def test_snippet_is_the_sentence_with_the_query_terms_cut_to_length():
    index = BM25([Doc("p", "Fipuk", "Fipuk was a mason. Fipuk was born in Sipik in 1760. He died.")])
    assert index.snippet(0, "fipuk born") == "Fipuk was born in Sipik in 1760."
    assert index.snippet(0, "fipuk born", chars=10) == "Fipuk was "
    assert index.snippet(0, "nothing") == "Fipuk was a mason."


def test_server_binds_loopback_on_an_ephemeral_port_answers_and_stops():
    with CorpusServer(DOCS) as server:
        host, port = server._server.server_address[:2]
        assert host == "127.0.0.1" and port > 0 and server.url == f"http://127.0.0.1:{port}"
        client = WebClient(server.url)
        assert [r["url"] for r in client.search("cat", k=5)] == ["pets/cat", "pets/dog"]
        assert client.search("cat", k=1)[0]["score"] == pytest.approx(0.7131089, abs=1e-5)
        assert client.page("pets/fish") == {"url": "pets/fish", "title": "fish", "text": "fish swim", "links": []}
        assert client.page("pets/zebra") is None
    assert not server.running and refused(port)
    assert not any(t.name == "rlpost-web-server" and t.is_alive() for t in __import__("threading").enumerate())


def test_server_stops_by_itself_when_idle_and_with_its_killed_process():
    server = CorpusServer(DOCS, idle_s=0.2).start()
    port = server._server.server_address[1]
    deadline = time.monotonic() + 20
    while server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.running and refused(port)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from rlpost.web import CorpusServer, Doc
        s = CorpusServer([Doc("a", "a", "b")]).start()
        print(s.url.rsplit(":", 1)[1], flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        assert not refused(port)
        child.kill()  # SIGKILL: no cleanup runs, and the server goes with its process
        child.wait(timeout=20)
        assert refused(port)
    finally:
        child.kill()
        child.wait()


def test_an_env_without_server_url_uses_the_shared_server_and_restarts_it_after_it_stopped(corpus_file):
    from rlpost.web import shared_server

    e = WebEnv(corpus=corpus_file)
    e.reset({"prompt": "Where was Fipuk born?", "answer": "Sipik"})
    server = shared_server(corpus_file)
    assert e.client.base_url == server.url and server.idle_s == 60.0
    port = server._server.server_address[1]
    server.stop()  # as after a minute without requests
    assert refused(port)
    s = e.step("<search>Fipuk born</search>")  # started again, on a new port
    assert "Fipuk was born in Sipik" in s.observation and server.running
    server.stop()


def test_users_corpus_from_a_folder_or_jsonl_with_errors_naming_the_file_and_line(tmp_path):
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "a.md").write_text("# Rivers of Norway\n\nThe Glomma is the longest.")
    (tmp_path / "notes" / "sub" / "b.txt").write_text("plain text page")
    (tmp_path / "notes" / "skip.bin").write_text("not a page")
    docs = load_corpus(str(tmp_path / "notes"))
    assert [(d.url, d.title) for d in docs] == [("a.md", "Rivers of Norway"), ("sub/b.txt", "plain text page")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"url": "x", "text": "fine"}\n{"url": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: .*string 'text'"):
        load_corpus(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"url": "x", "text": "a"}\n{"url": "x", "text": "b"}\n')
    with pytest.raises(ValueError, match="url 'x' is used by two pages"):
        load_corpus(str(dup))
    with pytest.raises(ValueError, match="not 'generated', a folder"):
        load_corpus(str(tmp_path / "missing"))


def test_a_jsonl_corpus_row_that_is_not_utf8_or_has_a_title_of_no_text_is_named_by_its_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"url": "x", "text": "fine"}\n{"url": "y", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl line 2: not UTF-8 text"):
        load_corpus(str(bad))
    listed = tmp_path / "listed.jsonl"
    listed.write_text('{"url": "x", "text": "a"}\n{"url": "y", "title": ["a", "b"], "text": "b"}\n')
    with pytest.raises(ValueError, match=r"listed.jsonl line 2: 'title' must be a string, got \['a', 'b'\]"):
        load_corpus(str(listed))
    numbered = tmp_path / "numbered.jsonl"
    numbered.write_text('{"url": 7, "title": "Seven", "text": "a"}\n')
    assert load_corpus(str(numbered)) == (Doc("7", "Seven", "a"),)


def test_episode_on_scripted_policy_text_searches_opens_and_scores_the_answer(served):
    assert load_env("web") is WebEnv
    e = env(served)
    s = e.step("I will look it up. <search>Fipuk born</search>")
    assert not s.done and s.reward == 0.0
    assert s.observation == "<result>Fipuk | wiki/Fipuk | Fipuk was born in Sipik in 1760.</result>"
    s = e.step("<search>Sipik river</search>")  # every page holds a term: the top 3, one a line
    assert s.observation == ("<result>Sipik | wiki/Sipik | Sipik lies on the river Gufi.\n"
                             "Gufi | wiki/Gufi | The Gufi is a river.\n"
                             "Fipuk | wiki/Fipuk | Fipuk was born in Sipik in 1760.</result>")
    s = e.step("<open>wiki/Sipik</open>")
    assert s.observation == "<result>Sipik\nSipik is a town. Sipik lies on the river Gufi.</result>"
    s = e.step("It is <answer>Gufi</answer>")
    assert s.done and s.reward == 1.0 and s.info == {"searches": 2, "opens": 1, "refused": 0, "calls": 3}
    assert env(served).step("<answer>Sipik</answer>").reward == 0.0
    assert env(served).step("Gufi").reward == 0.0  # no answer markers: no answer


def test_observations_are_cut_and_queries_too(served):
    e = env(served, max_obs_chars=12, max_query_chars=5)
    s = e.step("<open>wiki/Sipik</open>")
    assert s.observation == "<result>Sipik\nSipik </result>"
    assert e.observation_tokens == len("<result>") + 12 + len("</result>")
    sent = []
    e.client.search = lambda q, k, chars: sent.append(q) or []
    s = e.step("<search>" + "Fipuk " * 1000 + "</search>")
    assert sent == ["Fipuk"] and s.info["query_cut"] and s.observation == "<result>no results</result>"


def test_tool_calls_past_the_budget_end_the_episode_unscored(served):
    e = env(served, max_calls=2)
    assert not e.step("<search>Fipuk</search>").done
    assert not e.step("<search>Gufi</search>").done
    s = e.step("<search>Gufi</search> <answer>Gufi</answer>")  # a call is a call, answer or not
    assert s.done and s.reward == 0.0 and s.info["over_budget"] and s.info["calls"] == 2


def test_a_hostile_policys_calls_are_refused_without_a_request(served, monkeypatch):
    e = env(served)
    requests = []
    real_page = e.client.page
    e.client.page = lambda url: requests.append(url) or real_page(url)
    connections = []
    real_connect = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda addr, *a, **k: connections.append(addr[0])
                        or real_connect(addr, *a, **k))
    for url in ["http://example.com/", "https://en.wikipedia.org/wiki/Norway", "../../../../etc/passwd",
                "/etc/passwd", "file:///etc/passwd", "wiki/../../etc/passwd", "http://169.254.169.254/latest"]:
        s = e.step(f"<open>{url}</open>")
        assert s.observation == "<result>error: no such page in the corpus</result>" and not s.done
        e.calls = 0
    assert requests == [] and connections == []
    assert e.info["refused"] == 7 and e.info["opens"] == 0
    assert e.step("<search>   </search>").observation == "<result>error: empty query</result>"
    s = e.step("<search>" + "x" * 200_000 + "</search>")  # huge: cut before it is sent
    assert s.observation == "<result>no results</result>" and set(connections) <= {"127.0.0.1"}
    # the server itself: a url is a key of the corpus, never a path; queries are cut to MAX_QUERY_CHARS
    base = served[1].url
    for path in ["/page?url=../../etc/passwd", "/../../etc/passwd", "/page?url=/etc/passwd"]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=10)
        assert err.value.code == 404
    assert search_results(BM25(DOCS), "fish " * MAX_QUERY_CHARS)[0]["url"] == "pets/fish"


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True])
def test_a_timeout_that_is_not_a_positive_number_is_refused_when_the_run_is_configured(value):
    """It was taken as given, and failed every episode's first request (a socket refuses a negative timeout, and 0
    makes it non-blocking), or never timed out (inf)."""
    from rlpost.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="web env: timeout_s must be a positive number of seconds"):
        load_config("recipes/web.yaml", [f"task.env_options.timeout_s={value}"])
    with pytest.raises(ValueError, match=f"timeout_s must be a positive number of seconds, got {value!r}"):
        WebEnv(timeout_s=value)
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds, got '10'"):
        WebEnv(timeout_s="10")  # from a Python caller: not parsed for it


def test_two_tools_or_a_tool_and_the_answer_on_one_marker_are_refused(corpus_file):
    """With answer_open the search marker every answer was read as a search (the episode could never be scored);
    with one marker for both tools every search was read as an open."""
    with pytest.raises(ValueError, match="search_open and answer_open are both '<q>'"):
        WebEnv(corpus=corpus_file, search_open="<q>", search_close="</q>", answer_open="<q>", answer_close="</q>")
    with pytest.raises(ValueError, match="search_open and open_open are both '@'"):
        WebEnv(corpus=corpus_file, search_open="@", open_open="@")
    WebEnv(corpus=corpus_file, search_open="?", search_close="", open_open="@", open_close="", answer_open="")


def test_only_a_loopback_server_is_ever_talked_to(corpus_file):
    for url in ["http://example.com:8000", "http://10.0.0.1:80", "https://127.0.0.1:443", "http://0.0.0.0:80"]:
        with pytest.raises(ValueError, match="must be http on 127.0.0.1"):
            WebEnv(corpus=corpus_file, server_url=url)
    for url in ["http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"]:
        WebClient(url)


def test_generated_world_is_deterministic_and_every_fact_is_found_by_its_search():
    a, b = generate_world(0, n_people=50), generate_world(0, n_people=50)
    assert a.docs == b.docs and generate_world(1, n_people=50).docs != a.docs
    world, index = generate_world(0), corpus_index("generated", 0)
    for p in world.people[::7]:  # the searches the task's questions need put the fact in the top snippet
        assert f"born in {p.birthplace} " in search_results(index, f"{p.name} born", 1, 40)[0]["snippet"]
        river = world.towns[p.birthplace]
        assert search_results(index, f"{p.birthplace} river", 1, 40)[0]["snippet"].endswith(f"river {river}.")


def test_web_task_demonstrations_replay_against_the_env_and_are_right_half_the_time():
    from rlpost.config import load_config
    from rlpost.tasks import answer_match
    from rlpost.tasks.web import ENV_OPTIONS, web_task

    options = load_config("recipes/web.yaml").task.env_options
    assert options == ENV_OPTIONS
    task = web_task(num_eval=100, error_rate=0.5, num_train=600)
    assert not {r["person"] for r in task.eval_rows} & {r["person"] for r in task.train_rows}
    rewards, e = [], WebEnv(**options)
    for demo in task.demonstrations:
        e.reset(demo)
        seen, turns = [], [t["content"] for t in demo["completion"] if t["role"] == "assistant"]
        for turn in turns:
            s = e.step(turn)
            if s.done:
                break
            seen.append(s.observation)
        assert s.done and seen == [t["content"] for t in demo["completion"] if t["role"] == "tool"]
        assert all(c in e.alphabet for o in seen for c in o)
        rewards.append(s.reward)
        assert s.reward == answer_match(turns[-1], demo["answer"])
    assert 0.4 < sum(rewards) / len(rewards) < 0.65 and 0.4 < task.demonstrator_accuracy < 0.65
    assert {d["hops"] for d in task.demonstrations} == {1, 2}


@pytest.mark.slow
def test_web_recipe_rl_gains_twenty_points_over_sft(tmp_path):
    from rlpost.config import load_config
    from rlpost.run import train

    s = train(load_config("recipes/web.yaml", [f"out_dir={tmp_path}", "run_name=r"]))
    assert s["pass@1_rl"] >= s["pass@1_sft"] + 0.20


def test_a_redirect_is_refused_not_followed(corpus_file):
    """A loopback server_url that is not a corpus server and redirects (here to another loopback server) gets
    an error: the client follows no redirect, which could name any host."""
    import http.server
    import threading

    hits = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"results": []}')

        def log_message(self, *args):
            pass

    target = http.server.HTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirect = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    servers = [target, redirect]
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{redirect.server_address[1]}"
        with pytest.raises(urllib.error.URLError, match=r"redirect \(302\).*follows none"):
            WebClient(url).search("Fipuk born")
        e = WebEnv(corpus=corpus_file, server_url=url)
        e.reset({"prompt": "Where was Fipuk born?", "answer": "Sipik"})
        with pytest.raises(urllib.error.URLError, match="redirect"):
            e.step("<open>wiki/Fipuk</open>")
        assert hits == []
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_a_loopback_server_that_is_not_a_corpus_server_is_named_and_never_read_past_the_limit(corpus_file):
    """Binary bytes, HTML, JSON of another shape and an answer that never ends: each a ValueError naming the
    server, the endpoint and what came back (not a bare JSONDecodeError or KeyError), the endless one read no
    further than the client's max_bytes."""
    import http.server
    import threading

    answers = {"/binary": (200, b"\xff\xfe\x00\x01binary"), "/html": (404, b"<html>not found</html>"),
               "/shape": (200, b'{"hits": [1, 2]}'), "/links": (200, b'{"title": "t", "text": "x", "links": 3}')}
    sent = []

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            kind = self.path.split("/")[1]
            if kind == "endless":  # no Content-Length: the body ends when the connection does, here never
                self.send_response(200)
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"x" * 65536)
                        sent.append(65536)
                except OSError:
                    return
            code, body = answers["/" + kind]
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for kind, call, what in [("binary", "search", r"\(HTTP 200\) with b'\\xff\\xfe"),
                                 ("html", "page", r"\(HTTP 404\) with b'<html>not found</html>' \(not a JSON object"),
                                 ("shape", "search", r"\(HTTP 200\) with \{'hits': \[1, 2\]\}"),
                                 ("links", "page", r"\(HTTP 200\) with \{.*'links': 3\}")]:
            client = WebClient(f"{base}/{kind}")
            with pytest.raises(ValueError, match=f"web server at {base}/{kind} answered /{call} {what}"):
                client.search("Fipuk born") if call == "search" else client.page("wiki/Fipuk")
        with pytest.raises(ValueError, match="answered /search \\(HTTP 200\\) with more than 1000000 bytes"):
            WebClient(f"{base}/endless", max_bytes=1_000_000).search("Fipuk born")
        e = WebEnv(corpus=corpus_file, server_url=f"{base}/binary")
        e.reset({"prompt": "Where was Fipuk born?", "answer": "Sipik"})
        with pytest.raises(ValueError, match="not what a corpus server answers"):
            e.step("<open>wiki/Fipuk</open>")
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_that_trickles_in_ends_at_the_clients_timeout():
    """A server that sends its answer a byte at a time never makes one read wait timeout_s, so the socket's timeout
    never fired and the request (an abandoned step's thread with it) went on for as long as the server did: the
    whole answer now has timeout_s. The outcome does not depend on the machine's speed: the server never ends."""
    import http.server
    import threading

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.01)
            except OSError:
                return

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    raised = []

    def call():
        try:
            WebClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=0.5).search("Fipuk born")
        except Exception as e:  # noqa: BLE001 - what it raised is the test
            raised.append(e)

    try:
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(60)  # without the deadline it never returns
        assert not caller.is_alive(), "the client was still reading a minute later"
        assert isinstance(raised[0], TimeoutError), raised
        assert "still sending its answer to /search 0.5 s after the request" in str(raised[0])
    finally:
        server.shutdown()
        server.server_close()


def test_a_connection_that_stalls_is_dropped_rather_than_holding_a_thread(monkeypatch):
    from rlpost.web import server as web_server

    assert web_server._Handler.timeout is not None and web_server._Handler.timeout <= 60
    monkeypatch.setattr(web_server._Handler, "timeout", 0.3)
    with CorpusServer(DOCS) as server:
        stalled = socket.create_connection(("127.0.0.1", server._server.server_address[1]), timeout=20)
        stalled.sendall(b"GET /search?q=cat HTTP/1.1\r\n")  # a request line, then nothing more
        try:
            assert stalled.recv(1024) == b""  # the server hung up on it
        finally:
            stalled.close()
        assert [r["url"] for r in WebClient(server.url).search("cat", k=1)] == ["pets/cat"]


def test_search_scores_do_not_depend_on_the_process_string_hashing():
    """A set's order follows PYTHONHASHSEED and float sums their order: summed in set order, a many-term query's
    scores differed in their last bits from one process to the next (and near-ties could swap)."""
    code = textwrap.dedent("""
        from rlpost.web.bm25 import BM25
        from rlpost.web.corpus import generate_world
        index = BM25(generate_world(0, n_people=50).docs)
        q = "Zerak was born in Molvo river Tesh town people north 1843 worked a the is"
        print([(i, s.hex()) for i, s in index.search(q, 50)], [index.snippet(i, q) for i in range(0, 170, 7)])
    """)
    import os
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("0", "3")}
    assert len(out) == 1
