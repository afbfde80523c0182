"""The README and the guides in docs/: a short landing page that links every guide, a site that
builds with no warning, and every command a page shows checked against the code, one mechanism for
all pages: each command is parsed by the parser of the tool it names (a renamed or removed flag
fails the page that shows it), the files it names exist, and each `cac-exp run` on the repository's
specs is run as a dry run (its plan is resolved, configs included). The README's walkthrough is
run in full by tests/test_walkthrough.py."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
WALKTHROUGH_MODEL = "my_segformer.py"  # the walkthrough's own config, written by its test


def page_commands(page: str) -> list[list[str]]:
    """The commands of a page's ``bash`` blocks as argv lists (continuations joined, comments dropped)."""
    text = (ROOT / page).read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


_TOOLS = ("cac-exp", "python", "make", "bash")


def inline_commands(page: str) -> list[list[str]]:
    """The commands a page shows inline (`` `cac-exp run ...` ``, `` `python benchmarks/x.py ...` ``),
    outside its fenced blocks; ``a|b`` in an argument is two commands."""
    text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
    out = []
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())
        if not span.startswith(tuple(t + " " for t in _TOOLS)):
            continue
        argv = shlex.split(span)
        variants = [argv]
        for i, arg in enumerate(argv):
            if "|" in arg and not arg.startswith("-"):
                variants = [argv[:i] + [choice] + argv[i + 1:] for choice in arg.split("|")]
        out += variants
    return out


def _guides() -> list[str]:
    """The guide pages the site's nav lists (its home and the generated reports aside)."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = [next(iter(item.values())) for item in nav]
    return [p for p in pages if isinstance(p, str) and p != "index.md"]


def test_readme_is_short_and_links_every_guide():
    """Every guide linked, and every anchor the README links (mkdocs does not build the README) is a
    heading of its page, as mkdocs names headings."""
    from markdown.extensions.toc import slugify

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)[#)]", readme))
    assert set(_guides()) <= linked, set(_guides()) - linked
    for page in linked:
        assert (ROOT / "docs" / page).is_file(), page
    for page, anchor in re.findall(r"\]\(docs/([\w-]+\.md)#([\w-]+)\)", readme):
        headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / page).read_text(), re.M)
        assert anchor in {slugify(h.strip(), "-") for h in headings}, f"README links docs/{page}#{anchor}: no such heading"


def test_site_builds_with_no_warning(tmp_path):
    """`make docs` (`mkdocs build --strict`): a broken link or anchor, a page missing from the nav, a
    snippet that cannot be found all fail the build. Not `-q`: it silences the warnings `--strict` counts."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "WARNING" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    page = (tmp_path / "site" / "your-model.html").read_text()
    assert WALKTHROUGH_MODEL in page and "--8&lt;--" not in page  # the README's walkthrough, included


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _check_paths(argv: list[str], page: str) -> None:
    """Spec and script paths a command names exist in the repository (walkthrough files aside)."""
    for arg in argv:
        if re.match(r"^(ablations|experiments|analysis|tsne|benchmarks)/[\w./-]+\.(yaml|py|sh)$", arg):
            assert (ROOT / arg).is_file(), f"{page}: {' '.join(argv)} names {arg}, which does not exist"


def check_command(argv: list[str], page: str) -> None:
    """Parse a page's command with its tool's own parser; a non-zero parse is the page's failure."""
    shown = " ".join(argv)
    _check_paths(argv, page)
    if argv[0] == "make":
        assert set(argv[1:]) <= _make_targets(), f"{page}: `{shown}` names no Makefile target"
        return
    if argv[0] == "cac-exp" and len(argv) == 2:  # the command named in prose: it must exist
        from cac_cli.commands import COMMANDS

        assert argv[1] in COMMANDS, f"{page}: `{shown}`: cac-exp has no command {argv[1]!r}"
        return
    if argv[0] in ("python", "bash") and re.match(r"^benchmarks/[\w./-]+\.(py|sh)$", argv[1]):
        # a benchmark script: it exists (checked above) and has every flag the page passes it
        source = (ROOT / argv[1]).read_text()
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source or f"'{flag}'" in source or f"{flag})" in source, \
                f"{page}: `{shown}`: {argv[1]} has no option {flag}"
        return
    if argv[0] == "cac-exp":
        from cac.cli import build_parser
        parser, args = build_parser(), argv[1:]
    elif argv[:2] == ["python", "analysis/make_tables.py"]:
        from analysis.make_tables import build_parser
        parser, args = build_parser(), argv[2:]
    elif argv[:2] == ["python", "tsne/make_tsne.py"]:
        from tsne.make_tsne import build_parser
        parser, args = build_parser(), argv[2:]
    elif argv[0] == "mlflow":  # MLflow's click CLI: the sub-command's options parsed, nothing run
        import click
        from mlflow.cli import cli

        command = cli.get_command(click.Context(cli), argv[1])
        assert command is not None, f"{page}: `{shown}`: mlflow has no command {argv[1]!r}"
        try:
            command.make_context(argv[1], argv[2:])
        except click.ClickException as err:
            raise AssertionError(f"{page}: `{shown}` does not parse ({err.format_message()})") from None
        return
    else:
        raise AssertionError(f"{page}: `{shown}`: no parser known for this command; add one to tests/test_docs.py")
    try:
        parser.parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"{page}: `{shown}` does not parse (exit {exit_.code})") from None


def _dry_runnable(argv: list[str]) -> bool:
    """`cac-exp run` on the repository's specs, with nothing from outside (a user's config, a server)."""
    return (argv[:2] == ["cac-exp", "run"] and WALKTHROUGH_MODEL not in argv
            and not any("://" in a for a in argv) and "--executor" not in argv)


@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_parses(page, capsys):
    """Fenced and inline commands alike."""
    commands = page_commands(page) + inline_commands(page)
    for argv in commands:
        check_command(argv, page)


@pytest.mark.parametrize("page", PAGES)
def test_every_run_command_of_the_page_plans(page, workspace, capsys):
    """Each `cac-exp run` the page shows, as a dry run: the spec loads, the rows and presets exist,
    every config resolves (paper presets included), nothing trains."""
    from cac.cli import main

    for argv in filter(_dry_runnable, page_commands(page)):
        args = argv[1:] + (["--dry-run"] if "--dry-run" not in argv else [])
        args = [str(ROOT / a) if (ROOT / a).is_file() else a for a in args]
        code = main(args + ["--tracking-uri", f"sqlite:///{workspace / 'mlflow.db'}"])
        out = capsys.readouterr()
        assert code == 0, f"{page}: `{' '.join(argv)}` exited {code}: {out.err[-1000:]}"
        assert "plan:" in out.out or "timed-or-warm-up inferences" in out.out  # a training or a benchmark spec


def test_a_renamed_flag_fails_the_page_that_shows_it(monkeypatch):
    """The check can fail: with `--smoke` renamed in the parser, the pages that show it fail."""
    import cac_cli.commands as options

    real = options.add_run_options

    def renamed(parser, *, training: bool = True) -> None:
        real(parser, training=training)
        for action in parser._actions:
            if "--smoke" in action.option_strings:
                action.option_strings = ["--tiny-run"]
                parser._option_string_actions.pop("--smoke")
                parser._option_string_actions["--tiny-run"] = action
    monkeypatch.setattr(options, "add_run_options", renamed)
    shown = [p for p in PAGES if any("--smoke" in argv for argv in page_commands(p))]
    assert shown
    for page in shown:
        with pytest.raises(AssertionError, match="does not parse"):
            for argv in page_commands(page):
                check_command(argv, page)
