"""`rlpost report` and `log.rollouts_every` on real tiny runs: rollouts.jsonl holds every N-th step's samples
and a resume cuts it back to its checkpoint; the report is one self-contained HTML page with valid figures,
every section present or saying why it is empty, on finished, killed, RL-less and reward-model runs.
The slow test opens the page in a real headless Chromium over the DevTools protocol."""

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from html.parser import HTMLParser

import pytest

from rlpost.checkpoint import list_checkpoints
from rlpost.cli import main
from rlpost.report import build_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["sft.steps=24", "sft.batch_size=32", "sft.save_every=0", "rl.steps=8", "rl.eval_every=3",
        "rl.save_every=2", "rl.keep_checkpoints=0", "task.num_eval=30", "rollout.prompts_per_step=4",
        "rollout.k=4", "eval.samples_per_prompt=2", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
        "threads=1", "log.rollouts_every=2", "algorithm.rollout_correction=tis"]
SECTIONS = ("reward", "supervised", "dynamics", "time", "memory", "correction", "data", "gold", "env", "samples",
            "config", "profile")  # in the page's order
FIGURES = ("reward", "supervised", "dynamics", "time", "memory", "correction")  # gold: a reward model; env: task.env
CHROMIUM = "/usr/bin/chromium"


def train(tmp, name, *extra):
    assert main(["train", *TINY, *extra, f"out_dir={tmp}", f"run_name={name}"]) == 0
    return os.path.join(tmp, name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run with rollouts every 2 steps and the TIS correction (so the histogram exists)."""
    return train(tmp_path_factory.mktemp("report"), "tiny")


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def rl_metrics(run_dir):
    return {m["step"]: m for m in lines(os.path.join(run_dir, "metrics.jsonl")) if m["stage"] == "rl"}


class Page(HTMLParser):
    """The tags, attributes and section ids of an HTML page."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.imgs, self.urls, self.sections = [], [], [], {}
        self._section = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
            if self._section:
                self.sections[self._section]["imgs"] += 1
        if tag == "section":
            self._section = a["id"]
            self.sections[self._section] = {"imgs": 0}
        self.urls += [v for k, v in a.items() if k in ("src", "href") and v is not None]


def read_page(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text, Page(text)


def assert_self_contained(page: Page):
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    for url in page.urls:
        assert not re.match(r"(?i)^\s*(https?:|//|ftp:)", url), url
    assert page.imgs and all(i["src"].startswith("data:image/png;base64,") for i in page.imgs)


def assert_png_has_content(data: bytes):
    import io

    import numpy as np
    from matplotlib.image import imread

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600, pixels.shape
    rgb = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert rgb.std() > 10  # not blank
    assert len(np.unique(rgb, axis=0)) > 50  # lines, text, colours: more than a few flat areas


# ---------------------------------------------------------------------------- rollouts.jsonl

def test_rollouts_jsonl_holds_every_sample_of_every_nth_step(run):
    records = lines(os.path.join(run, "rollouts.jsonl"))
    metrics = rl_metrics(run)
    assert sorted({r["step"] for r in records}) == [2, 4, 6, 8]
    assert len(records) == 4 * 4 * 4  # steps x prompts_per_step x k
    for r in records:
        assert set(r) >= {"step", "prompt", "completion", "reward", "finish_reason", "policy_version",
                          "old_logp_mean", "old_logp_min", "response_len", "answer"}
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["completion"], str)
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["response_len"] <= 6
        assert r["old_logp_min"] <= r["old_logp_mean"] <= 0
        assert r["policy_version"] == r["step"] - 1  # colocated: sampled by the weights of the step before
    for step in (2, 4, 6, 8):  # the same samples the step's metrics were computed from
        mine = [r for r in records if r["step"] == step]
        assert sum(r["reward"] for r in mine) / len(mine) == pytest.approx(metrics[step]["reward/mean"])
        assert sum(r["response_len"] for r in mine) / len(mine) == pytest.approx(
            metrics[step]["rollout/response_len_mean"])


def test_a_resume_drops_the_rollouts_written_after_its_checkpoint(run, tmp_path):
    """Resume from step_4 of a copy of the finished run (a half-written line at the end, as a kill leaves):
    the lines of steps 6 and 8 are dropped and sampled again, so the file equals the uninterrupted one."""
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    for name in ("final", "step_6"):
        shutil.rmtree(os.path.join(copy, "checkpoints", name))
    assert list_checkpoints(copy)[-1].name == "step_4"
    path = os.path.join(copy, "rollouts.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 9, "prompt": "cut sh')
    assert main(["train", "--resume", copy]) == 0
    with open(os.path.join(run, "rollouts.jsonl")) as a, open(path) as b:
        assert a.read() == b.read()  # bit-identical on CPU, nothing duplicated, the half line gone
    assert [m["step"] for m in lines(os.path.join(copy, "metrics.jsonl")) if m["stage"] == "rl"] == list(range(1, 9))


def test_trim_rollouts_keeps_whole_lines_up_to_the_step(tmp_path):
    from rlpost.stages.rl import trim_rollouts

    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}')  # the last one lost only its newline
    assert trim_rollouts(str(tmp_path), 3) == 0 and path.read_text().endswith('{"step": 3}\n')
    path.write_text(path.read_text() + '{"step": 4, "prom')
    assert trim_rollouts(str(tmp_path), 1) == 3 and path.read_text() == '{"step": 1}\n'


# ---------------------------------------------------------------------------- the report

def test_report_is_one_self_contained_page_with_every_section(run, tmp_path):
    assert main(["report", run]) == 0
    out = os.path.join(run, "report", "index.html")
    text, page = read_page(out)
    assert_self_contained(page)
    assert set(page.sections) == set(SECTIONS)
    for key in FIGURES:  # each figure is in its section, and the PNG beside the page is the same image
        assert page.sections[key]["imgs"] == 1, key
        png = open(os.path.join(run, "report", f"{key}.png"), "rb").read()
        assert_png_has_content(png)
        img = next(i for i in page.imgs if i["id"] == f"fig-{key}")
        assert base64.b64decode(img["src"].split(",", 1)[1]) == png
    assert page.sections["gold"]["imgs"] == 0 and "the RL reward was the verifier itself" in text
    assert "algorithm.rollout_correction=tis" in text
    # the samples table: best and worst of each kept step, the config and the summary
    for step in (2, 4, 6, 8):
        assert f"class='step'>{step}<br>" in text
    assert "best 1" in text and "worst 1" in text and "rollout_correction: tis" in text
    assert "pass@1_rl" in text and "8 of 8" in text
    # --out elsewhere: the PNGs go beside it
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", run, "--out", str(other)]) == 0
    assert other.exists() and all((other.parent / f"{k}.png").exists() for k in FIGURES)


def test_every_rl_step_logs_each_roles_memory_peak_and_the_report_shows_them(run):
    """The tiny CPU run (GRPO with a reference and the TIS correction): mem/peak_<role> (peak RSS, reset per
    role) for every role that ran, plausible for this process (more than the interpreter alone, less than
    the machine), and the report's memory section draws them and tabulates the largest per role."""
    from rlpost.report import RunData, memory_keys

    metrics = rl_metrics(run)
    assert sorted(metrics) == list(range(1, 9))
    for m in metrics.values():
        for role in ("rollout", "reward", "reference", "advantages", "train", "sync"):
            assert 20 < m[f"mem/peak_{role}"] < 64 * 1024, (role, m[f"mem/peak_{role}"])
        assert "mem/peak_critic" not in m  # GRPO has no critic: a role that did not run has no peak
        assert "gpu/util" not in m         # CPU run
    # (that each role's peak is its own, reset as it starts, is tests/test_memory_metrics.py's: this tiny
    # model's roles all peak within a few MiB of the libraries' resident pages)
    data = RunData.load(run)
    assert list(memory_keys(data).values()) == ["rollout", "reward", "reference", "advantages", "train", "sync"]
    text, page = read_page(build_report(run))
    assert page.sections["memory"]["imgs"] == 1 and "id='memory-table'" in text
    table = text.split("id='memory-table'")[1].split("</table>")[0]
    for role in ("rollout", "reward", "reference", "advantages", "train", "sync"):
        top = max(m[f"mem/peak_{role}"] for m in metrics.values())
        assert f"<td>{role}</td><td>mem/peak_{role}</td><td><b>{top:,.0f}</b></td>" in table


def test_the_memory_section_names_a_peak_so_far_and_gpu_util(run, tmp_path):
    """A CPU that cannot reset its peak logs mem/peak_so_far_<role>; a GPU run adds gpu/util: both are drawn
    and explained."""
    copy = str(tmp_path / "sofar")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    out = []
    for m in lines(os.path.join(copy, "metrics.jsonl")):
        if m["stage"] == "rl":
            m = {k.replace("mem/peak_", "mem/peak_so_far_"): v for k, v in m.items()}
            m["gpu/util"] = 40.0 + m["step"]
        out.append(json.dumps(m) + "\n")
    with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
        f.writelines(out)
    text, page = read_page(build_report(copy))
    assert page.sections["memory"]["imgs"] == 1
    assert "mem/peak_so_far_train" in text and "peak so far" in text and "gpu/util, NVML" in text
    assert_png_has_content(open(os.path.join(copy, "report", "memory.png"), "rb").read())


def test_completions_are_html_escaped_and_profile_traces_linked(run, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with open(os.path.join(copy, "rollouts.jsonl"), "a") as f:
        f.write(json.dumps({"step": 10, "prompt": "<b>bold</b> & co", "completion": "<script>alert(1)</script>",
                            "reward": 1.0, "finish_reason": "stop", "policy_version": 9, "old_logp_mean": -0.5,
                            "old_logp_min": -1.0, "response_len": 3}) + "\n")
    os.makedirs(os.path.join(copy, "profile"))
    with open(os.path.join(copy, "profile", "step_3.json"), "w") as f:
        json.dump({"traceEvents": []}, f)
    text, page = read_page(build_report(copy))
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in text
    assert "../profile/step_3.json" in page.urls
    assert_self_contained(page)


def test_a_killed_run_with_nulls_and_a_cut_line_still_reports(run, tmp_path):
    """Killed after RL step 5: no summary.json, no later lines, a half-written last line, null metrics."""
    copy = str(tmp_path / "killed")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "report", "summary.json"))
    kept = []
    for m in lines(os.path.join(copy, "metrics.jsonl")):
        if m["stage"] == "rl" and m["step"] > 5 or m.get("after") == "rl":
            continue
        if m["stage"] == "rl" and m["step"] == 3:
            m.update({"loss/kl_ref": None, "train/entropy": None, "rollout/logp_mismatch_max": None})
        kept.append(json.dumps(m) + "\n")
    with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
        f.writelines(kept + ['{"stage": "rl", "step": 6, "reward/me'])
    text, page = read_page(build_report(copy))
    assert set(page.sections) == set(SECTIONS) and "5 of 8" in text and "no summary.json" in text
    for key in FIGURES:
        assert_png_has_content(open(os.path.join(copy, "report", f"{key}.png"), "rb").read())


def test_the_data_section_draws_the_signal_density_the_pool_and_the_sources(run, tmp_path):
    """A run that recycled prompts and mixed two sources (its lines and config as such a run writes them):
    the histogram, the pool and each source's reward are drawn; the tiny run, which did neither, says so."""
    import yaml

    text, page = read_page(build_report(run))
    assert page.sections["data"]["imgs"] == 0 and "rl.recycle_every was 0" in text
    copy = str(tmp_path / "mixed")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    out = []
    for m in lines(os.path.join(copy, "metrics.jsonl")):
        if m["stage"] == "rl":
            m.update({"data/set_aside": m["step"] % 3, "data/recycled": float(m["step"] % 3 == 0),
                      **{f"data/pq_hist_{b}": 0.2 for b in range(5)}, "reward/gsm": 0.5, "reward/arithmetic": 0.1})
        out.append(json.dumps(m) + "\n")
    with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
        f.writelines(out)
    with open(os.path.join(copy, "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["task"]["sources"] = [{"file": "data/gsm.parquet", "weight": 2}, {"task": "arithmetic"}]
    with open(os.path.join(copy, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    text, page = read_page(build_report(copy))
    assert page.sections["data"]["imgs"] == 1 and "mean reward (task.sources)" in text
    assert_png_has_content(open(os.path.join(copy, "report", "data.png"), "rb").read())


def test_a_run_without_rl_says_so_in_every_rl_section(tmp_path):
    run_dir = train(tmp_path, "sft_only", "rl.steps=0")
    text, page = read_page(build_report(run_dir))
    assert set(page.sections) == set(SECTIONS)
    assert text.count("the run had no RL stage (rl.steps=0)") >= 5  # dynamics, time, correction, gold, samples
    assert page.sections["reward"]["imgs"] == 1  # pass@1 after SFT is still drawn
    assert page.sections["supervised"]["imgs"] == 1 and "SFT (sft): the demonstrations" in text  # not empty
    assert_png_has_content(open(os.path.join(run_dir, "report", "supervised.png"), "rb").read())
    assert not os.path.exists(os.path.join(run_dir, "rollouts.jsonl"))
    assert_self_contained(page)


@pytest.mark.parametrize("overrides, planned", [
    (["rl.steps=30"], 30),
    (["rl.steps=30", "stages=[sft, eval, rl, eval, rl, eval]"], 60),
    (["rl.steps=30", "stages=[sft, rl, {rl: {rl.steps: 5}}, {eval: {eval.samples_per_prompt: 2}}]"], 35),
])
def test_the_planned_rl_steps_count_each_rl_stage_with_its_own_settings(overrides, planned):
    from rlpost.config import load_config, to_dict
    from rlpost.report import RunData

    assert RunData("run", config=to_dict(load_config(None, overrides))).planned_rl_steps() == planned
    unreadable = {"rl": {"steps": 30}, "stages": ["rl", {"rl": {"nope": 1}}]}
    assert RunData("run", config=unreadable).planned_rl_steps() is None


def test_gold_vs_proxy_is_drawn_when_a_reward_model_is_the_rl_reward(tmp_path):
    run_dir = train(tmp_path, "rm", "rl.steps=4", "rl.eval_every=0", "reward_model.train=true",
                    "reward_model.pairs=64", "reward_model.eval_pairs=32", "reward_model.epochs=1",
                    "algorithm.rollout_correction=none")
    assert all("gold_reward" in r for r in lines(os.path.join(run_dir, "rollouts.jsonl")))
    text, page = read_page(build_report(run_dir))
    assert page.sections["gold"]["imgs"] == 1 and "reward hacking" in text
    assert_png_has_content(open(os.path.join(run_dir, "report", "gold.png"), "rb").read())
    assert page.sections["correction"]["imgs"] == 1  # the mismatch is drawn; the histogram's absence is explained
    assert "No importance-weight histogram: the run had no rollout correction" in text


def test_errors_name_the_problem(tmp_path, monkeypatch, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "not an rlpost run directory" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    assert main(["report", str(tmp_path)]) == 1
    assert "pip install 'rlpost[report]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a real browser

class DevTools:
    """A minimal Chrome DevTools Protocol client: one websocket (RFC 6455) over a plain socket, stdlib only."""

    def __init__(self, ws_url: str, timeout: float = 60):
        u = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._exact(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id, self.events = 0, []

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            out += chunk
        return out

    def _send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        if n < 126:
            length = bytes([0x80 | n])  # 0x80: the client masks every frame
        elif n < 65536:
            length = bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            length = bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x81]) + length + mask + masked)  # 0x81: a final text frame

    def _receive(self) -> dict:
        message = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0x9, 0xA):  # ping / pong: not part of a message
                continue
            message += payload
            if b0 & 0x80:
                return json.loads(message)

    def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self._send(json.dumps(msg))
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            for e in self.events:
                if e.get("method") == method:
                    self.events.remove(e)
                    return e
            self.events.append(self._receive())
        raise TimeoutError(method)


def open_in_chromium(browser: DevTools, path: str) -> dict:
    """Load a file in a fresh tab; returns its images, console errors, requested URLs and a screenshot."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime", "Log", "Page", "Network"):
        browser.call(f"{domain}.enable", session)
    browser.call("Emulation.setDeviceMetricsOverride", session, width=1280, height=1000, deviceScaleFactor=1,
                 mobile=False)
    browser.events.clear()
    browser.call("Page.navigate", session, url="file://" + os.path.abspath(path))
    browser.wait_for("Page.loadEventFired")
    images = json.loads(browser.call("Runtime.evaluate", session, returnByValue=True, expression=(
        "JSON.stringify([...document.images].map(i => ({id: i.id, complete: i.complete, "
        "width: i.naturalWidth, height: i.naturalHeight})))"))["result"]["value"])
    sections = browser.call("Runtime.evaluate", session, returnByValue=True, expression=(
        "[...document.querySelectorAll('section')].map(s => s.id)"))["result"]["value"]
    shot = browser.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": 1280, "height": 1500, "scale": 0.6})
    browser.call("Runtime.evaluate", session, expression="1")  # drain the events sent before this reply
    events = [e for e in browser.events if e.get("sessionId") == session]
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    urls = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    browser.call("Target.closeTarget", targetId=target)
    return {"images": images, "sections": sections, "errors": errors, "urls": urls,
            "screenshot": base64.b64decode(shot["data"])}


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with its DevTools endpoint on 127.0.0.1 (a port it picks), and a client to it."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium (Debian's package) to run the browser test")
    profile = tmp_path / "chromium-profile"
    with open(tmp_path / "chromium.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 "--no-first-run",
                                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        port_file = profile / "DevToolsActivePort"
        t0 = time.time()
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert proc.poll() is None, (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]
            assert time.time() - t0 < 60, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        browser = DevTools(f"ws://127.0.0.1:{port}{path}")
        yield browser
        browser.sock.close()
    finally:  # this test's own browser process, by its id
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(run, chromium, tmp_path):
    """Chromium loads the page with no console error and no request beyond file: and data: URLs, and every
    figure decodes (naturalWidth > 0). A broken page first proves the checks would notice. The screenshot
    goes to tmp (or to RLPOST_REPORT_SCREENSHOT, e.g. docs/report_screenshot.png)."""
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><img id='bad' src='data:image/png;base64,AAAA'>"
                      "<script>console.error('boom')</script></body></html>")
    seen = open_in_chromium(chromium, str(broken))
    assert seen["images"] == [{"id": "bad", "complete": True, "width": 0, "height": 0}] and seen["errors"]

    seen = open_in_chromium(chromium, build_report(run))
    assert seen["errors"] == []
    assert seen["sections"] == list(SECTIONS)
    assert {i["id"] for i in seen["images"]} == {f"fig-{k}" for k in FIGURES}
    assert all(i["complete"] and i["width"] > 600 and i["height"] > 200 for i in seen["images"]), seen["images"]
    assert seen["urls"] and all(u.startswith(("file:", "data:")) for u in seen["urls"]), seen["urls"]
    shot = seen["screenshot"]
    assert_png_has_content(shot)
    assert len(shot) < 300_000
    target = os.environ.get("RLPOST_REPORT_SCREENSHOT") or str(tmp_path / "report_screenshot.png")
    with open(os.path.join(ROOT, target) if not os.path.isabs(target) else target, "wb") as f:
        f.write(shot)


# ---------------------------------------------------------------------------- environments, SFT / preference, status

def test_a_multi_turn_run_reports_its_episodes_turn_by_turn(tmp_path):
    """A tiny calculator run (recipes/tool_calculator.yaml): rollouts.jsonl keeps each episode's turns, consistent
    with the step's env/* metrics, and the report draws the environment section and shows the turns."""
    run_dir = str(tmp_path / "calc")
    assert main(["train", os.path.join(ROOT, "recipes", "tool_calculator.yaml"), *TINY, "rl.steps=4",
                 "rl.eval_every=0", "rl.save_every=0", "eval.samples_per_prompt=1", "task.num_eval=20",
                 "algorithm.rollout_correction=none", f"out_dir={tmp_path}", "run_name=calc"]) == 0
    metrics = rl_metrics(run_dir)
    records = lines(os.path.join(run_dir, "rollouts.jsonl"))
    assert {r["step"] for r in records} == {2, 4} and len(records) == 2 * 16
    for step in (2, 4):
        kept = [r for r in records if r["step"] == step]
        assert all(1 <= len(r["turns"]) <= 2 for r in kept)
        m = metrics[step]
        assert sum(len(r["turns"]) for r in kept) / len(kept) == pytest.approx(m["env/turns"])
        assert sum(r["env_tokens"] for r in kept) / len(kept) == pytest.approx(m["env/env_tokens"])
        assert sum(r["env_info"]["calls"] for r in kept) / len(kept) == pytest.approx(m["env/tool_calls"])
        for r in kept:  # the turns are the completion, and the policy's tokens the trained ones
            assert "".join(t["policy"] + (t["observation"] or "") for t in r["turns"]) == r["completion"]
            assert r["policy_tokens"] == r["response_len"]
            assert sum(t["reward"] for t in r["turns"]) == pytest.approx(r["reward"])
    text, page = read_page(build_report(run_dir))
    assert set(page.sections) == set(SECTIONS) and page.sections["env"]["imgs"] == 1
    assert "task.env=calculator" in text and "[turn 1: " in text
    assert_png_has_content(open(os.path.join(run_dir, "report", "env.png"), "rb").read())
    from rlpost.report import RunData, turn_rewards

    first = turn_rewards(RunData.load(run_dir))[1]
    assert first[0] == [2, 4] and first[1][0] == pytest.approx(
        sum(r["turns"][0]["reward"] for r in records if r["step"] == 2) / 16)


def test_the_environment_section_says_why_it_is_empty(run, tmp_path):
    text, page = read_page(build_report(run))
    assert page.sections["env"]["imgs"] == 0 and "No environment: the task has no task.env" in text


def test_preference_and_sft_curves_are_drawn_from_their_metrics_lines(run, tmp_path):
    """A run that is in (or only had) SFT and a preference stage is not an empty page: sft/nll per SFT stage,
    the preference loss and its margin and accuracy per step, the held-out pairs' loss."""
    copy = str(tmp_path / "pref")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "report", "rollouts.jsonl"))
    kept = [m for m in lines(os.path.join(copy, "metrics.jsonl")) if m["stage"] == "sft"]
    for step in range(1, 21):
        kept.append({"stage": "preference", "step": step, "train/loss": 0.7 - 0.01 * step,
                     "pref/reward_margin": 0.02 * step, "pref/accuracy": 0.5 + 0.01 * step})
    kept.append({"stage": "preference_eval", "step": 20, "eval/loss": 0.6})
    with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    os.remove(os.path.join(copy, "summary.json"))
    from rlpost.report import RunData

    data = RunData.load(copy)
    assert list(data.stage_lines("sft/nll")) == ["sft"]
    assert [m["step"] for m in data.stage_lines("train/loss", preference=True)["preference"]] == list(range(1, 21))
    text, page = read_page(build_report(copy))
    assert page.sections["supervised"]["imgs"] == 1
    assert "SFT (sft)" in text and "preference (preference)" in text and "pref/reward_margin" in text
    png = open(os.path.join(copy, "report", "supervised.png"), "rb").read()
    assert_png_has_content(png)
    from matplotlib.image import imread
    import io

    assert imread(io.BytesIO(png), format="png").shape[1] > 1100  # three panels: SFT, loss, margin


def _resumed_copy(run, tmp_path):
    """The finished run as a resume of an interrupted one leaves it while it runs: summary.json says
    interrupted, and metrics.jsonl was written after it."""
    copy = str(tmp_path / "resumed")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    summary = json.load(open(os.path.join(copy, "summary.json")))
    summary["status"] = f"interrupted (SIGTERM); continue with `rlpost train --resume {copy}`"
    with open(os.path.join(copy, "summary.json"), "w") as f:
        json.dump(summary, f)
    t = time.time()
    os.utime(os.path.join(copy, "summary.json"), (t - 60, t - 60))
    os.utime(os.path.join(copy, "metrics.jsonl"), (t - 5, t - 5))
    return copy


def test_a_resumed_run_in_progress_is_not_labelled_interrupted(run, tmp_path):
    from rlpost.report import RECENT_S, RunData, run_status

    copy = _resumed_copy(run, tmp_path)
    data = RunData.load(copy)
    status = run_status(data)
    assert status.startswith("running (last write 5 s ago; summary.json is from before it: interrupted"), status
    text, _ = read_page(build_report(copy))
    assert "status</td><td><b>running (last write" in text
    # no write for long, no process: it stopped without writing a summary (a kill), and says how to continue
    stale = run_status(data, now=time.time() + 2 * RECENT_S)
    assert stale.startswith("stopped without a summary (killed?)") and "--resume" in stale
    # a summary written after the last line is the run's own word
    os.utime(os.path.join(copy, "summary.json"))
    assert run_status(data).startswith("interrupted (SIGTERM)")
    summary_ok = json.load(open(os.path.join(run, "summary.json")))["status"]
    assert run_status(RunData.load(run)) == summary_ok == "ok"


def test_a_live_resume_process_of_the_run_is_running_however_old_its_last_write(run, tmp_path):
    from rlpost.report import RECENT_S, RunData, run_status

    copy = _resumed_copy(run, tmp_path)
    # a process whose command line is `... rlpost train --resume <the run, relative to its cwd>`; it ends by itself
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "rlpost", "train", "--resume",
                             os.path.basename(copy)], cwd=str(tmp_path))
    try:
        deadline = time.time() + 30
        status = run_status(RunData.load(copy), now=time.time() + 2 * RECENT_S)
        while not status.startswith("running (process") and time.time() < deadline:  # until its argv is there
            time.sleep(0.1)
            status = run_status(RunData.load(copy), now=time.time() + 2 * RECENT_S)
        assert status.startswith(f"running (process {proc.pid}, resumed; summary.json is from before it"), status
        assert run_status(RunData.load(run)) == "ok"  # another run's process is not this one's
    finally:
        proc.kill()
        proc.wait()


def test_a_line_that_is_not_utf8_is_skipped_like_a_cut_one_and_the_page_is_written(tmp_path):
    """A metrics.jsonl or config.yaml with a byte that is not UTF-8 failed the whole report with a bare
    UnicodeDecodeError, where a line cut short by a kill is skipped."""
    from rlpost.report import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"stage": "rl", "step": 1}\n{"stage": "rl", "step": 2, "x": "\xff"}\n[1]\n{bad\n'
                     b'{"stage": "rl", "step": 3}\n{"stage": "rl", "st')
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3]
    (tmp_path / "config.yaml").write_bytes(b"- a list\n- caf\xe9\n")  # not UTF-8, and not a mapping either
    path.write_bytes(b'{"stage": "rl", "step": 1, "reward/mean": 0.5}\n')
    pytest.importorskip("matplotlib")
    assert os.path.isfile(build_report(str(tmp_path)))
