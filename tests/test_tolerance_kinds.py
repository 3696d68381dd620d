"""Every call of tolerances.assert_close in the tests names a kind the table has ("loss", "grad", "mi_grad"). The
GPU test files run only on a GPU: a wrong kind there (a label in its place) would fail the first GPU run with a
KeyError before anything is compared, so the calls are checked here, from the source."""

import ast
from pathlib import Path

from tolerances import TOLERANCES

KINDS = set(next(iter(TOLERANCES.values())))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "assert_close":
            yield node


def test_assert_close_kinds():
    files = [p for p in sorted(Path(__file__).parent.glob("test_*.py")) if "from tolerances import" in p.read_text()]
    assert any("gpu" in p.name for p in files), "no GPU test file found: the check would be empty"
    bad, checked = [], 0
    for path in files:
        for call in _calls(path):
            keyword = next((k.value for k in call.keywords if k.arg == "kind"), None)
            kind = call.args[3] if len(call.args) > 3 else keyword
            if isinstance(kind, ast.Constant):
                checked += 1
                if kind.value not in KINDS:
                    bad.append(f"{path.name}:{call.lineno}: kind {kind.value!r}")
            elif kind is not None and not isinstance(kind, ast.Name):  # a variable passed through a helper is fine
                bad.append(f"{path.name}:{call.lineno}: kind is {ast.unparse(kind)}, not a literal of {sorted(KINDS)}")
    assert checked > 20, checked
    assert not bad, "\n".join(bad)
