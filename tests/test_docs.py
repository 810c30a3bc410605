"""The documentation site cannot drift from the code.

* Every ``python`` and ``bash`` block of every page under ``docs/`` runs: the blocks of one page in
  order, in one namespace, in a fresh folder (``bilevel …`` lines through the real command line,
  in-process; ``python FILE.py …`` lines with ``runpy``). A text block marked ``output`` must
  appear in what the block before it printed.
* A block is marked by an HTML comment on the line above its fence, ``<!-- docs-test: … -->``:
  ``slow`` (runs with ``--runslow``), ``data`` (needs ``../shared/data``; runs with ``--runslow``
  and skips with a reason without the data), ``manual: REASON`` (never run here: installs, GPUs,
  several nodes, hours-long reproductions), ``exit=N`` (the expected exit code of its commands),
  ``file=PATH`` (a yaml/toml/text block written to PATH for the blocks after it), ``output``.
  Unmarked blocks must not depend on marked ones: the default suite runs them alone.
* Every ``bilevel`` command on the site, run or not, is parsed against the current command line
  (option names, values, choices, strategies), and every ``python benchmarks/….py --flag`` names
  a script that exists and has that flag.
* ``mkdocs build --strict`` succeeds (broken links, missing references, docstring warnings fail
  it), and the built API reference documents every name in the ``__all__`` of the public modules.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import _find_data_root

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ ]*$",
                   re.M | re.S)
MARK = re.compile(r"<!--\s*docs-test:\s*(?P<spec>.*?)\s*-->\s*$")
RUN_LANGS = {"python", "bash"}
# the public surface whose __all__ the API reference must document (CONTRIBUTING.md)
PUBLIC = ["bilevel", "bilevel.hypergrad", "bilevel.linsolve", "bilevel.dynamics", "bilevel.qp", "bilevel.data",
          "bilevel.models", "bilevel.train", "bilevel.options", "bilevel.registry", "bilevel.learner", "bilevel.io",
          "bilevel.stochastic", "bilevel.hpo", "bilevel.cli"]


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        info = m.group("info").strip().strip("{}").lstrip(".")
        lang = info.split()[0] if info else ""
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marks: dict[str, str] = {}
        mark = MARK.search(before)
        if mark:
            spec = mark.group("spec")
            if spec.startswith("manual"):
                marks["manual"] = spec.partition(":")[2].strip()
                if not marks["manual"]:
                    raise AssertionError(f"{page}:{line}: `manual` needs a reason (docs-test: manual: REASON)")
            else:
                for word in spec.replace(",", " ").split():
                    key, _, value = word.partition("=")
                    if key not in ("slow", "data", "exit", "file", "output"):
                        raise AssertionError(f"{page}:{line}: unknown docs-test mark {key!r}")
                    marks[key] = value
        body = "\n".join(l[len(m.group("indent")):] for l in m.group("body").splitlines())
        out.append(Block(page, line, lang, body, marks))
    return out


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def _strip_comment(line: str) -> str:
    """``line`` without a trailing `` # comment`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def commands(body: str) -> list[str]:
    """Shell lines of a bash block: continuations joined, comments and blank lines dropped, simple
    ``for X in a b; do …; done`` loops expanded."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out: list[str] = []
    variables: dict[str, str] = {}
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = _strip_comment(line)
        for name, value in variables.items():
            line = line.replace(f"${{{name}}}", value).replace(f"${name}", value)
        assign = re.fullmatch(r"(\w+)=(.*)", line)
        if assign and len(shlex.split(assign.group(2))) <= 1:  # VAR="..." (one shell word; not VAR=x cmd …)
            variables[assign.group(1)] = "".join(shlex.split(assign.group(2)))
            continue
        loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+?);? done", line)
        if loop:
            var, values, cmd = loop.groups()
            for value in values.split():
                out += [c.strip().replace(f"${var}", value).replace(f"${{{var}}}", value) for c in cmd.split(";")]
        else:
            out += [c.strip() for c in line.split(" && ")]
    return out


# --------------------------------------------------------------------------- running pages
class Page:
    """Runs the blocks of one page in one namespace, in a fresh working folder."""

    def __init__(self, workdir: Path) -> None:
        self.module = types.ModuleType("docs_page")  # a real module: dataclasses and pickling look classes up
        self.ns: dict = self.module.__dict__
        self.workdir = workdir
        self.last_output: str | None = ""

    def run(self, block: Block) -> None:
        if block.lang not in RUN_LANGS:
            if "file" in block.marks:
                path = self.workdir / block.marks["file"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.body + "\n")
            if "output" in block.marks and self.last_output is not None:  # None: the block it shows was not run
                missing = [l for l in block.body.splitlines() if l.strip() and "…" not in l and l.strip() not in self.last_output]
                assert not missing, f"{block.where}: the shown output is not what the code printed; missing {missing}\n" \
                                    f"printed:\n{self.last_output}"
            return
        buf = io.StringIO()
        with warnings.catch_warnings(record=True):  # what a page's code warns is the page's business
            warnings.simplefilter("always")
            if block.lang == "python":
                with contextlib.redirect_stdout(buf):
                    sys.modules["docs_page"] = self.module
                    try:
                        exec(compile(block.body, block.where, "exec", dont_inherit=True), self.ns)
                    finally:
                        del sys.modules["docs_page"]
            else:
                for cmd in commands(block.body):
                    buf.write(self.shell(cmd, block))
        self.last_output = buf.getvalue()

    def shell(self, cmd: str, block: Block) -> str:
        from bilevel.cli import main

        args = shlex.split(cmd)
        expected = int(block.marks.get("exit", "0") or 0)
        if args[0] == "bilevel":
            r = CliRunner().invoke(main, args[1:], prog_name="bilevel")
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                raise AssertionError(f"{block.where}: `{cmd}` raised {r.exception!r}\n{r.output}") from r.exception
            assert r.exit_code == expected, f"{block.where}: `{cmd}` exited {r.exit_code}, not {expected}:\n{r.output}"
            assert "Traceback" not in r.output, r.output
            return r.output
        if args[0] in ("python", "python3") and args[1].endswith(".py"):
            buf = io.StringIO()
            argv = sys.argv
            sys.argv = args[1:]
            try:
                with contextlib.redirect_stdout(buf):
                    runpy.run_path(args[1], run_name="__main__")
            except SystemExit as e:
                assert (e.code or 0) == expected, f"{block.where}: `{cmd}` exited {e.code}"
            finally:
                sys.argv = argv
            return buf.getvalue()
        raise AssertionError(f"{block.where}: cannot run `{cmd}` here; use a bilevel or python command, "
                             "or mark the block `<!-- docs-test: manual: REASON -->`")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder laid out like a checkout: examples/ and benchmarks/ beside, ../shared/data above."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("examples", "benchmarks"):
        (work / name).symlink_to(REPO / name)
    data = _find_data_root()
    if data is not None:
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(data)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(REPO))
    from bilevel import registry

    threads, learners = torch.get_num_threads(), registry.learner_names()
    yield work
    torch.set_num_threads(threads)
    for name in set(registry.learner_names()) - set(learners):  # learners a page registered
        registry.unregister_learner(name)


def _page_id(p: Path) -> str:
    return str(p.relative_to(DOCS))


RUNNABLE = [p for p in pages() if any(b.lang in RUN_LANGS for b in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_page_code_runs(page, workdir):
    runner = Page(workdir)
    for block in blocks(page):
        if not ({"slow", "data", "manual"} & block.marks.keys()):
            runner.run(block)
        elif block.lang in RUN_LANGS:
            runner.last_output = None


SLOW_PAGES = [p for p in RUNNABLE if any({"slow", "data"} & b.marks.keys() for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=_page_id)
def test_page_code_runs_with_its_slow_blocks(page, workdir):
    page_blocks = blocks(page)
    if any("data" in b.marks for b in page_blocks) and _find_data_root() is None:
        pytest.skip("real data not found: set BILEVEL_DATA_ROOT or place it in ../shared/data")
    runner = Page(workdir)
    for block in page_blocks:
        if "manual" not in block.marks:
            runner.run(block)
        elif block.lang in RUN_LANGS:
            runner.last_output = None


# --------------------------------------------------------------------------- commands that are not run
def _leaf(args: list[str]) -> tuple[click.Command, list[str], str]:
    from bilevel.cli import main

    cmd: click.Command = main
    path = "bilevel"
    ctx = click.Context(main, info_name="bilevel")
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"`{path} {args[0]}` is not a command"
        path, cmd, args = f"{path} {args[0]}", sub, args[1:]
        ctx = click.Context(cmd, info_name=cmd.name, parent=ctx)
    return cmd, args, path


def check_command(args: list[str], where: str, values: bool = True) -> None:
    """Option names, and the values that do not depend on files, checked against the current CLI."""
    cmd, rest, path = _leaf(args)
    ctx = click.Context(cmd, info_name=cmd.name)
    params = {name: p for p in cmd.params for name in (*p.opts, *p.secondary_opts)}
    i = 0
    while i < len(rest):
        tok = rest[i]
        i += 1
        if not tok.startswith("-") or tok in ("-h", "--help"):
            continue
        name, eq, value = tok.partition("=")
        assert name in params, f"{where}: `{path}` has no option {name}"
        p = params[name]
        if isinstance(p, click.Option) and (p.is_flag or p.count):
            continue
        if not eq:
            assert i < len(rest), f"{where}: {name} needs a value"
            value = rest[i]
            i += 1
        if not values or "$" in value or isinstance(p.type, (click.Path, click.File)) or name == "--config":
            continue
        try:
            p.type.convert(value, p, ctx)
        except click.BadParameter as e:
            raise AssertionError(f"{where}: `{path} {name} {value}`: {e.format_message()}") from None


def check_script(args: list[str], where: str) -> None:
    script = REPO / args[1]
    assert script.is_file(), f"{where}: {args[1]} does not exist"
    text = script.read_text()
    for tok in args[2:]:
        if tok.startswith("--"):
            flag = tok.split("=")[0]
            assert f'"{flag}"' in text or f"'{flag}'" in text, f"{where}: {args[1]} has no option {flag}"


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_every_command_matches_the_cli(page):
    for block in blocks(page):
        if block.lang != "bash":
            continue
        for cmd in commands(block.body):
            args = shlex.split(cmd)
            prog = 0
            while prog < len(args) and re.fullmatch(r"\w+=\S*", args[prog]):  # VAR=value prefixes
                prog += 1
            args = args[prog:]
            if args[:3] == ["python", "-m", "bilevel.cli"]:
                args = ["bilevel", *args[3:]]
            if args and args[0] == "torchrun":
                at = args.index("bilevel.cli") if "bilevel.cli" in args else None
                assert at is not None, f"{block.where}: torchrun without -m bilevel.cli"
                args = ["bilevel", *args[at + 1:]]
            if args and args[0] == "bilevel":
                check_command(args[1:], block.where, values=block.marks.get("exit", "0") in ("", "0"))
            elif len(args) > 1 and args[0] in ("python", "python3") and args[1].endswith(".py"):
                check_script(args, block.where)


# --------------------------------------------------------------------------- the site
def _have_mkdocs() -> str | None:
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            __import__(mod)
        except ImportError:
            return mod
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = _have_mkdocs()
    if missing:
        pytest.skip(f"{missing} is not installed: pip install -e \".[test]\" (or \".[docs]\") to build the site")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    return out


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()


def _anchors(site: Path) -> set[str]:
    ids: set[str] = set()
    for html in (site / "reference").rglob("*.html"):
        ids |= set(re.findall(r'id="([\w.]+)"', html.read_text()))
    return ids


def test_api_reference_documents_the_public_surface(site):
    """Every name in the ``__all__`` of a public module has an anchor: under that module, under its
    defining module, or under another documented module that exports the same object."""
    import importlib
    import pkgutil

    import learners

    ids = _anchors(site)
    names = PUBLIC + ["bilevel.solve", "bilevel.problem", "bilevel.evaluation", "bilevel.parallel",
                      "bilevel.distributed", "bilevel.stochastic.benchopt", "learners"]
    names += [f"learners.{m.name}" for m in pkgutil.iter_modules(learners.__path__)]
    modules = {n: importlib.import_module(n) for n in names}
    missing = []
    for name in PUBLIC + [n for n in names if n.startswith("learners.")]:
        mod = modules[name]
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr)
            if attr.startswith("__") or isinstance(obj, types.ModuleType):
                continue
            where = {f"{name}.{attr}", f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"}
            where |= {f"{n}.{attr}" for n, m in modules.items() if getattr(m, attr, None) is obj}
            if not where & ids:
                missing.append(f"{name}.{attr}")
    assert not missing, ("the API reference (docs/reference/) does not document these public names; add their "
                         f"module to a reference page: {missing}")


def test_front_page_reaches_the_decision_guide_and_the_core_api(site):
    html = (site / "index.html").read_text()
    hrefs = re.findall(r'href="([^"]+)"', html)
    for target in ("concepts/choosing-a-strategy/", "#bilevel.solve.solve", "#bilevel.hypergrad.Implicit",
                   "#bilevel.qp.solve_qp"):
        assert any(h.endswith(target) or target in h for h in hrefs), f"the front page does not link to {target}"
    ids = _anchors(site)
    assert {"bilevel.solve.solve", "bilevel.hypergrad.Implicit", "bilevel.qp.solve_qp"} <= ids


def test_readme_is_short_and_links_into_the_site():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150, len(readme.splitlines())
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"
