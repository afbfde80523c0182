"""The package layout is the architecture: layers import only downwards, no module cycles (counting
imports inside functions too), and no private name crosses a module boundary."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cac", "analysis", "tsne", "cac_cli")
# Lower layers first; a module may import its own layer or any layer before it.
# The command line (cac.cli) composes them all, the reports included.
LAYERS = ["cac_cli.commands", "cac.errors", "cac.core", "cac.functional", "cac.synthetic", "cac.data", "cac.mmseg", "cac.exp",
          "cac.bench", "cac", "analysis.tables", "analysis.figures", "analysis.efficiency", "tsne", "analysis.make_tables",
          "cac.cli", "cac_cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported project module, names) for every import in the file, at any depth."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] not in PACKAGES:
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` is an import of the submodule
            subs = [n for n in names if f"{mod}.{n}" in known]
            out += [(f"{mod}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest:
                out.append((mod, rest))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for mod, _ in _imports(path, name, known):
            while mod not in known and "." in mod:
                mod = mod.rsplit(".", 1)[0]
            if mod in known and mod != name:
                deps.add(mod)
        graph[name] = deps
    return graph


def _layer(mod: str) -> int:
    best = -1
    for i, prefix in enumerate(LAYERS):
        if (mod == prefix or mod.startswith(prefix + ".")) and (best < 0 or len(prefix) > len(LAYERS[best])):
            best = i
    return best


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_import_downwards():
    """cac.core never imports mmseg or the experiment layer; data never imports mmseg; and so on. The
    package root ``cac`` is a layer of its own above cac.bench (importing it imports cac.mmseg and
    re-exports the core): a lower module that imports it reaches upper layers through it."""
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "upward imports: " + ", ".join(sorted(bad))


def test_core_and_data_do_not_import_mmseg_or_mmengine():
    for path in [*(ROOT / "cac" / "core").rglob("*.py"), *(ROOT / "cac" / "data").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("mmseg", "mmengine", "mmcv") for n in names), path


def test_no_private_name_crosses_modules():
    mods = _modules()
    known = set(mods)
    files = {**mods, **{f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py")},
             **{f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}}
    bad = []
    for name, path in files.items():
        for mod, names in _imports(path, name, known):
            bad += [f"{name} imports {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "; ".join(bad)


def test_every_module_imports_in_dependency_order():
    """All modules in one fresh interpreter, each after the modules it imports: a module that needs
    something it does not import itself, or a runtime cycle, fails here."""
    graph = _graph()
    order: list[str] = []
    seen: set[str] = set()

    def visit(node: str) -> None:
        if node in seen:
            return
        seen.add(node)
        for dep in sorted(graph[node]):
            visit(dep)
        order.append(node)

    for node in sorted(graph):
        visit(node)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a new interpreter from the repository root (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_import_cac_alone_registers_the_plugin():
    """``custom_imports=['cac']`` is all an mmseg config has: ``import cac`` must register CACHead,
    the tracking hook and the dataset by itself (a fresh interpreter, nothing else imported)."""
    code = ("import cac\nfrom mmseg.registry import DATASETS, HOOKS, MODELS\n"
            "assert MODELS.get('CACHead') is not None and HOOKS.get('TrackingHook') is not None\n"
            "assert DATASETS.get('ContextScenesDataset') is not None\n"
            "assert cac.mmseg.__name__ == 'cac.mmseg'\n")
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cac_exp_help_imports_neither_torch_nor_cac():
    """``cac-exp --help``, every sub-command's ``--help`` (``cac-exp data tiny --help`` too) and a usage
    error answer from ``cac_cli`` alone: torch and mmseg take seconds to import; a help that needs them
    is a new user's first wait."""
    from cac_cli.commands import COMMANDS

    helps = [["--help"], ["frob"], [], ["run", "spec.yaml", "--preset"]] + [[c, "--help"] for c in COMMANDS] + \
        [["data", "tiny", "--help"], ["data", "context-scenes", "--help"]]
    code = ("import sys, cac_cli\n"
            f"for argv in {helps!r}:\n"
            "    try:\n        cac_cli.main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'cac', 'mmseg', 'mmengine', 'numpy'}))\n")
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out[-1] == "[]", out[-1]
    assert [line for line in out if line.startswith("exit")] == ["exit 0", "exit 2", "exit 2", "exit 2"] + \
        ["exit 0"] * (len(COMMANDS) + 2)
    assert "invalid choice: 'frob'" in proc.stderr
    assert "quick | bench | paper (default: quick)" in proc.stdout  # --preset lists its choices
    assert "--executor {inline,local,slurm}" in proc.stdout and "--json" in proc.stdout


def test_light_command_tables_agree_with_the_registries():
    """The names the light command line shows are those of the registries they stand for: the
    built-in presets, the real datasets, the generated data's sizes, the executors and CAC's profiles;
    and every handler a command names exists."""
    import importlib

    from cac.core.classifier import PROFILES
    from cac.data import context_scenes
    from cac.data.real import REAL_DATASETS
    from cac.mmseg.presets import PRESETS
    from cac_cli import commands

    assert set(commands.PRESETS) <= set(PRESETS) and {"quick", "bench", "paper"} == set(commands.PRESETS)
    assert list(commands.DATASETS) == list(REAL_DATASETS)
    assert list(commands.SCENE_SIZES) == list(context_scenes.PRESETS)
    assert set(commands.CAC_PROFILES) <= set(PROFILES)
    parser = commands.build_parser()
    handlers = set()

    def walk(p) -> None:
        handlers.update(v for k, v in p._defaults.items() if k == "handler")
        for action in p._actions:
            if isinstance(action, type(parser._subparsers._group_actions[0])):
                for child in action.choices.values():
                    walk(child)

    walk(parser)
    assert len(handlers) == len(commands.COMMANDS) - 1 + 7  # data's seven sub-commands
    for ref in handlers:
        module, name = ref.split(":")
        assert callable(getattr(importlib.import_module(module), name)), ref
