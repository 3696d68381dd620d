"""The package layout (issue 16): ``fastdistill.training`` is the loop's machinery, the published methods live in
``fastdistill.methods`` and the demo in ``fastdistill.apps``. The old module paths and names keep working (users'
scripts and YAML configs name them) and are the same objects as the new ones, and nothing in training/ besides
those aliases and its ``__init__``'s re-exports depends on methods/ or apps/."""

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastdistill.apps
import fastdistill.methods
import fastdistill.training

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "fastdistill" / "training"

# old path -> new path
MOVED = {
    "fastdistill.training.noisy_teacher": "fastdistill.methods.noisy_teacher",
    "fastdistill.training.weak_teacher": "fastdistill.methods.weak_teacher",
    "fastdistill.training.init": "fastdistill.methods.init",
    "fastdistill.training.demo": "fastdistill.apps.demo",
}
SHIMS = {old.rsplit(".", 1)[1] + ".py" for old in MOVED}


@pytest.mark.parametrize("old, new", MOVED.items())
def test_old_module_path_is_the_new_module(old, new):
    module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__name__ == new
    parent, _, child = old.rpartition(".")
    if child != "demo":  # the demo is imported on use, as before
        assert getattr(importlib.import_module(parent), child) is module


def test_old_paths_imported_first_in_a_fresh_process():
    """Aliasing must not depend on import order: the old paths first, as an old script or config does."""
    code = textwrap.dedent(f"""
        import importlib
        moved = {MOVED!r}
        old = {{o: importlib.import_module(o) for o in moved}}
        from fastdistill.training.demo import make_student, paired_ci, single_thread
        from fastdistill.training.noisy_teacher import margin, systematic_sample
        from fastdistill.training.init import uniform_selection
        new = {{o: importlib.import_module(n) for o, n in moved.items()}}
        assert all(old[o] is new[o] for o in moved), old
        import fastdistill.apps, fastdistill.apps.demo, fastdistill.methods.noisy_teacher, fastdistill.methods.init
        assert make_student is fastdistill.apps.demo.make_student
        assert (paired_ci, single_thread) == (fastdistill.apps.paired_ci, fastdistill.apps.single_thread)
        assert margin is fastdistill.methods.noisy_teacher.margin
        assert systematic_sample is fastdistill.methods.noisy_teacher.systematic_sample
        assert uniform_selection is fastdistill.methods.init.uniform_selection
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-4000:]


def test_training_names_are_the_methods_names():
    """Every name fastdistill.training exported before the move still resolves; the methods' are the same objects."""
    for name in fastdistill.training.__all__:
        assert hasattr(fastdistill.training, name), name
    assert set(fastdistill.methods.__all__) <= set(fastdistill.training.__all__)
    for name in fastdistill.methods.__all__:
        assert getattr(fastdistill.training, name) is getattr(fastdistill.methods, name), name


def test_config_factories_resolve_by_old_and_new_path():
    """``factory: "fastdistill.training.demo:make_student"`` in an existing config names the same function."""
    for attr in ("digits_datasets", "make_student", "trained_teacher"):
        old = getattr(importlib.import_module("fastdistill.training.demo"), attr)
        assert old is getattr(importlib.import_module("fastdistill.apps.demo"), attr)


def test_demo_shares_one_definition_of_the_helpers():
    from fastdistill.apps import demo

    assert demo.single_thread is fastdistill.apps.single_thread
    assert demo.paired_ci is fastdistill.apps.paired_ci


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` counts as a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _depends_on(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def test_training_does_not_depend_on_methods_or_apps():
    files = sorted(p.name for p in TRAINING.glob("*.py"))
    assert SHIMS <= set(files)
    for name in files:
        imported = _imported_modules(TRAINING / name, "fastdistill.training")
        methods, apps = _depends_on(imported, "fastdistill.methods"), _depends_on(imported, "fastdistill.apps")
        if name == "__init__.py":
            assert not apps, apps  # the re-exports come from fastdistill.methods only
        elif name in SHIMS:
            new = MOVED["fastdistill.training." + name[:-3]]
            assert methods | apps <= {new.rsplit(".", 1)[0], new}, (name, methods | apps)
        else:
            assert not methods and not apps, (name, methods | apps)


def test_shims_are_only_the_alias():
    """A shim holds a docstring naming the new module and the sys.modules alias, nothing else."""
    for name in SHIMS:
        source = (TRAINING / name).read_text()
        tree = ast.parse(source)
        new = MOVED["fastdistill.training." + name[:-3]]
        assert new in (ast.get_docstring(tree) or ""), name
        assert "sys.modules[__name__]" in source and len(tree.body) == 4, name
