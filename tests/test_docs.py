"""The README and the documentation site (docs/, mkdocs.yml) hold together.

Fast and without MkDocs: every relative link in README.md and docs/*.md points at a file that exists, every
`#anchor` is a heading of the page it names (slugified as MkDocs' toc extension does), every image exists,
and docs/*.md and the nav of mkdocs.yml list the same pages. Links from docs/ must stay inside docs/: MkDocs
serves nothing else, so a file outside it (a recipe, a benchmark, a source file) is named as a code path in
backticks, never linked. The slow test runs the real `mkdocs build --strict`.
"""
import html
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slugify(text: str) -> str:
    """Python-Markdown's toc slugify (the one MkDocs uses): ASCII only, drop all but word characters,
    spaces and hyphens, lower case, runs of spaces and hyphens to one hyphen."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def heading_text(raw: str) -> str:
    """The text of a heading as toc sees it: inline code unwrapped, links reduced to their text,
    emphasis markers dropped, entities unescaped."""
    raw = _CODE_SPAN.sub(lambda m: m.group(2).strip(), raw)
    raw = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    raw = raw.replace("**", "").replace("*", "")
    return html.unescape(raw)


def _lines_outside_fences(text: str):
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield n, line


def anchors(text: str) -> set[str]:
    """The ids of a page's headings, with toc's _1, _2 ... for repeats."""
    ids: set[str] = set()
    for _, line in _lines_outside_fences(text):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = slugify(heading_text(m.group(2)))
        while slug in ids or not slug:
            c = re.match(r"^(.*)_([0-9]+)$", slug)
            slug = f"{c.group(1)}_{int(c.group(2)) + 1}" if c else f"{slug}_1"
        ids.add(slug)
    return ids


def links(text: str):
    """(line number, is_image, target) of every markdown link outside code."""
    for n, line in _lines_outside_fences(text):
        line = _CODE_SPAN.sub("", line)
        for m in _LINK.finditer(line):
            yield n, m.group(1) == "!", m.group(3)


def check(page: Path, root: Path, docs_dir: Path | None = None) -> list[str]:
    """Every problem with the links of `page`. With docs_dir, the page is served from it, so its relative
    links must resolve inside it."""
    errors = []
    text = page.read_text(encoding="utf-8")
    for n, is_image, target in links(text):
        where = f"{page.relative_to(root)}:{n}: {target!r}"
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        if target.startswith("/"):
            errors.append(f"{where}: absolute path; use a relative link")
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if docs_dir is not None and not dest.is_relative_to(docs_dir.resolve()):
            errors.append(f"{where}: outside {docs_dir.name}/, which MkDocs cannot serve; name it as a code path "
                          "in backticks instead")
            continue
        if not dest.is_file():
            errors.append(f"{where}: no such {'image' if is_image else 'file'} {dest.relative_to(root.resolve())}"
                          if dest.is_relative_to(root.resolve()) else f"{where}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md":
                errors.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                errors.append(f"{where}: no heading with the anchor #{anchor} in {dest.name}")
    return errors


def nav_pages(mkdocs_yml: Path) -> list[str]:
    def walk(item):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for v in item.values():
                yield from walk(v)
        elif isinstance(item, list):
            for v in item:
                yield from walk(v)
    config = yaml.safe_load(mkdocs_yml.read_text(encoding="utf-8"))
    return [p for p in walk(config["nav"]) if not _SCHEME.match(p)]


def docs_pages() -> list[Path]:
    return sorted(DOCS.glob("**/*.md"))


def test_links_anchors_and_images_resolve():
    errors = check(ROOT / "README.md", ROOT)
    for page in docs_pages():
        errors += check(page, ROOT, DOCS)
    assert not errors, "\n".join(errors)


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages(ROOT / "mkdocs.yml")
    pages = [str(p.relative_to(DOCS)) for p in docs_pages()]
    assert sorted(set(nav)) == sorted(nav), "a page is twice in the nav"
    assert not set(pages) - set(nav), f"docs pages missing from mkdocs.yml's nav: {sorted(set(pages) - set(nav))}"
    assert not set(nav) - set(pages), f"nav entries without a page: {sorted(set(nav) - set(pages))}"


def test_the_readme_and_the_home_page_map_every_page():
    nav = nav_pages(ROOT / "mkdocs.yml")
    readme = {t.partition("#")[0] for _, _, t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    home = {t.partition("#")[0] for _, _, t in links((DOCS / "index.md").read_text(encoding="utf-8"))}
    assert not {f"docs/{p}" for p in nav if p != "index.md"} - readme
    assert not {p for p in nav if p != "index.md"} - home


def test_the_readme_keeps_the_two_quickstart_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make run    # SFT on an imperfect demonstrator, then GRPO against the verifier" in readme
    assert "make test   # the fast test suite (what CI runs: bash .ci/run)" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("heading, slug", [
    # checked against the ids `mkdocs build` wrote for these headings
    ("Correcting stale rollouts (`algorithm.rollout_correction`)",
     "correcting-stale-rollouts-algorithmrollout_correction"),
    ("Preference optimisation: the DPO family", "preference-optimisation-the-dpo-family"),
    ("The math verifier (`task.reward: math`)", "the-math-verifier-taskreward-math"),
    ("Logging to TensorBoard and W&B", "logging-to-tensorboard-and-wb"),
    ("Sharded training (FSDP2)", "sharded-training-fsdp2"),
    ("Environments and verifiers: the archetype recipes", "environments-and-verifiers-the-archetype-recipes"),
    ("Sampled completions: `log.rollouts_every`", "sampled-completions-logrollouts_every"),
    ("Predicting throughput: `rlpost plan throughput`", "predicting-throughput-rlpost-plan-throughput"),
    ("Models, devices and rollout engines", "models-devices-and-rollout-engines"),
    ("Inputs / outputs — a → b", "inputs-outputs-a-b"),
])
def test_slugify_matches_mkdocs(heading, slug):
    assert slugify(heading_text(heading)) == slug


def test_anchors_equal_the_ids_python_markdown_gives_every_page():
    """Where Python-Markdown is installed (it comes with mkdocs), its toc extension is the reference."""
    markdown = pytest.importorskip("markdown", reason="Python-Markdown is not installed (pip install -e '.[docs]')")
    for page in docs_pages() + [ROOT / "README.md"]:
        text = page.read_text(encoding="utf-8")
        md = markdown.Markdown(extensions=["toc", "tables", "fenced_code"])
        md.convert(text)
        ids = set()
        def walk(tokens):
            for t in tokens:
                ids.add(t["id"])
                walk(t["children"])
        walk(md.toc_tokens)
        assert anchors(text) == ids, page.name


def test_the_checker_catches_broken_links(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Page A\n\n## The `x.y` part: one\n\n## Repeat\n\n## Repeat\n", encoding="utf-8")
    (tmp_path / "outside.yaml").write_text("k: 1\n", encoding="utf-8")
    good = ("# B\n\n[ok](a.md#the-xy-part-one) [again](a.md#repeat_1) [self](#b) [web](https://example.com)\n"
            "`[not a link](nowhere.md)`\n\n```\n[in code](nowhere.md)\n```\n")
    (docs / "b.md").write_text(good, encoding="utf-8")
    assert check(docs / "b.md", tmp_path, docs) == []
    bad = ("# C\n\n[bad anchor](a.md#the-x-y-part-one)\n[missing page](z.md)\n![missing image](pic.png)\n"
           "[outside](../outside.yaml)\n[no anchor here](#nope)\n")
    (docs / "c.md").write_text(bad, encoding="utf-8")
    errors = check(docs / "c.md", tmp_path, docs)
    assert len(errors) == 5, errors
    assert "no heading with the anchor #the-x-y-part-one in a.md" in errors[0]
    assert "no such file docs/z.md" in errors[1]
    assert "no such image docs/pic.png" in errors[2]
    assert "outside docs/" in errors[3]
    assert "#nope" in errors[4]
    # the same file linked from the repository root is fine there
    (tmp_path / "README.md").write_text("[recipe](outside.yaml) [page](docs/a.md#repeat)\n", encoding="utf-8")
    assert check(tmp_path / "README.md", tmp_path) == []


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    built = (tmp_path / "site" / "scaling" / "index.html").read_text(encoding="utf-8")
    assert 'id="correcting-stale-rollouts-algorithmrollout_correction"' in built
    assert (tmp_path / "site" / "report_screenshot.png").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "rlpost.batch.Batch" in api
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
