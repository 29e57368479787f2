"""Every ``python -m experiments.<cli> ...`` command in README.md and docs/ parses with
that CLI's own parser, so a documented flag can never drift from the code."""

import contextlib
import dataclasses
import glob
import importlib
import io
import os
import re
import shlex

import pytest
import tyro

from marl.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_commands() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, module, argv) for each command in a fenced bash/sh block."""
    files = [os.path.join(ROOT, "README.md")] + sorted(
        glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    )
    out = []
    for path in files:
        text = open(path).read()
        for block in re.finditer(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
            start = text[: block.start()].count("\n") + 2
            lines = block.group(1).replace("\\\n", " ").splitlines()
            i = 0
            while i < len(lines):
                line, first = lines[i], i
                while True:  # a quoted argument (JSON) may run over several lines
                    try:
                        shlex.split(line, comments=True)
                        break
                    except ValueError:
                        i += 1
                        if i >= len(lines):
                            raise AssertionError(f"{path}:{start + first}: unclosed quote") from None
                        line += " " + lines[i]
                i += 1
                m = re.search(r"python\S* -m (experiments\.\w+)(.*)", line)
                if m:
                    argv = shlex.split(m.group(2), comments=True)
                    for stop in ("|", "&&", ";", ">", "2>&1", "&"):
                        if stop in argv:
                            argv = argv[: argv.index(stop)]
                    out.append((os.path.relpath(path, ROOT), start + first, m.group(1), argv))
    return out


def _parser(module):
    if hasattr(module, "parse"):
        return module.parse
    classes = [
        v
        for k, v in vars(module).items()
        if k.endswith("Args") and dataclasses.is_dataclass(v) and v.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"{module.__name__}: no parse() and no single *Args dataclass"
    return lambda argv: tyro.cli(classes[0], args=argv)


COMMANDS = documented_commands()


def test_the_docs_document_commands():
    assert len(COMMANDS) >= 10
    assert {m for _, _, m, _ in COMMANDS} >= {
        "experiments.train",
        "experiments.sweep",
        "experiments.evaluate",
        "experiments.report",
    }


@pytest.mark.parametrize("path,line,module,argv", COMMANDS, ids=[f"{p}:{n}" for p, n, _, _ in COMMANDS])
def test_documented_command_parses(path, line, module, argv):
    parse = _parser(importlib.import_module(module))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse(argv)
        except ConfigError as e:  # a placeholder path (runs/<name>/best_config.json) is not a flag error
            assert _a_path_to_make(str(e.value)), f"{path}:{line}: `{module} {' '.join(argv)}`: {e}"
        except SystemExit as e:
            text = " ".join(err.getvalue().replace("│", " ").split())
            quoted = re.findall(r"invalid [\w.]+='([^']*)'", text)
            ok = e.code in (0, None) or (bool(quoted) and all(_a_path_to_make(q) for q in quoted))
            assert ok, f"{path}:{line}: `{module} {' '.join(argv)}` fails to parse:\n{err.getvalue()}"


def _a_path_to_make(value: str) -> bool:
    """A run or file that the documented workflow creates first (``runs/...``, a placeholder)."""
    return ("<" in value or "/" in value) and not os.path.exists(value)


def test_docs_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken link or a page missing from the site fails."""
    import subprocess
    import sys

    if not os.path.exists(os.path.join(ROOT, "mkdocs.yml")):
        pytest.fail("mkdocs.yml is missing")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "methods" / "emu" / "index.html").exists()


def test_docs_link_nothing_outside_the_repository():
    files = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "results", "**", "README.md"), recursive=True)
    for path in files:
        text = open(path).read()
        assert "../shared" not in text, path
        for target in re.findall(r"\]\(([^)#]+)", text):
            assert not target.startswith(("http://", "https://")), f"{path}: links outside the repository: {target}"
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            docs = os.path.join(ROOT, "docs")
            if not os.path.exists(resolved) and resolved.startswith(docs + os.sep):
                # the site serves results/ at its root, beside the docs pages
                resolved = os.path.join(ROOT, os.path.relpath(resolved, docs))
            assert resolved.startswith(ROOT) and os.path.exists(resolved), f"{path}: broken link {target}"


def test_notebooks_install_from_the_users_copy():
    """The install cell looks for an uploaded wheel or a clone (no hard-coded URL) and
    documents the accelerator build of the pinned jax."""
    for path in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")):
        text = open(path).read()
        assert "git+https://" not in text, path
        assert "marl_jax-*.whl" in text and "jax[{_accel}]" in text, path
