"""The package's shape: imports go one way, the runtime stays torch- and onnx-free, nobody reads
another module's private attributes. Checked on the source, so a regression fails here first."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vae_deploy"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """vae_deploy modules that ``name`` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(name.split(".")[: -node.level] + [node.module])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_cycle_inside_the_package() -> None:
    modules = _modules()
    known = set(modules)
    # the package's own __init__ only re-exports lazily; it is not a dependency of anything
    graph = {n: _imports(n, t, known) - {"vae_deploy"} for n, t in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def _private_reads(tree: ast.Module, allowed_bases: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vae_deploy"):
            found += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in allowed_bases:
                continue
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "examples", "vae_deploy"])
def test_nobody_reads_another_modules_private_attributes(folder: str) -> None:
    problems = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        bad = _private_reads(ast.parse(path.read_text(), str(path)), {"self", "cls"})
        if bad:
            problems[str(path.relative_to(REPO))] = bad
    assert not problems, problems


def test_runtime_imports_neither_torch_nor_onnx(mlp_onnx_export: Path) -> None:
    code = (
        "import sys\nfrom vae_deploy import VAERuntime\n"
        f"rt = VAERuntime({str(mlp_onnx_export)!r}, 'cpu')\n"
        "x = rt.sample(5, seed=0); rt.encode(x); rt.reconstruct(x)\n"
        "import vae_deploy.sample, vae_deploy.images\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxscript', 'safetensors', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\nprint('ok', x.shape)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok (5, 1, 28, 28)")


def test_cli_help_and_sample_need_no_torch(mlp_onnx_export: Path, tmp_path: Path) -> None:
    """The runtime-only commands import neither torch nor onnx (what a plain `pip install` gives)."""
    out = tmp_path / "s.npy"
    code = (
        "import sys\nfrom vae_deploy.cli import main\n"
        f"rc = main(['sample', {str(mlp_onnx_export)!r}, '-n', '3', '--seed', '1', '--out', {str(out)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxscript', 'safetensors') if m in sys.modules)\n"
        "assert rc == 0 and not heavy, (rc, heavy)\nprint('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()
