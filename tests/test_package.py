"""The package's shape, enforced: the import rule between the layers, formatting and lint by the tools, and the size
limits of docs/architecture.md (so CI keeps them)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "lightning_dq"
# what each layer may import from the package (itself included); lower layers never import higher ones
ALLOWED = {
    "nn": {"lightning_dq.errors", "lightning_dq.nn"},
    "data": {"lightning_dq.errors", "lightning_dq.nn", "lightning_dq.data"},
    "training": {"lightning_dq.errors", "lightning_dq.nn", "lightning_dq.data", "lightning_dq.training"},
    "reporting": {"lightning_dq.errors", "lightning_dq.nn", "lightning_dq.training", "lightning_dq.reporting"},
}
ALLOWED["codec"] = {"lightning_dq.errors", "lightning_dq.nn", "lightning_dq.codec"}  # a library beside the networks
for layer in ("data", "training", "reporting"):
    ALLOWED[layer].add("lightning_dq.codec")
ENTRY = {"codec/commands.py"}  # commands, like cli.py: they may import every layer
FOREIGN = dict.fromkeys(["nn", "codec"], {"lightning", "torchmetrics", "jsonargparse", "wandb"})  # no Trainer needed


def imports(path) -> set[str]:
    """Every module a file imports, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in ENTRY:
            continue
        for name in imports(path):
            top = name.split(".")[0]
            if top == "lightning_dq":
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED[layer]), f"{path}: imports {name}"
            assert top not in FOREIGN.get(layer, set()), f"{path}: the nn layer imports {name}"


def test_the_networks_import_without_lightning():
    script = "import sys, lightning_dq.nn.autoencoder, lightning_dq.nn.prior; print('lightning' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout == "False\n"


def test_code_is_formatted_and_lint_clean():
    folders = ["lightning_dq", "tests", "experiments", "benchmarks"]
    ruff = [sys.executable, "-m", "ruff"]
    formatted = subprocess.run([*ruff, "format", "--check", *folders], cwd=REPO, capture_output=True, text=True)
    assert formatted.returncode == 0, f"run `make format`:\n{formatted.stdout}{formatted.stderr}"
    lint = subprocess.run([*ruff, "check", *folders], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, f"run `make lint`:\n{lint.stdout}{lint.stderr}"


def test_size_limits():
    """docs/architecture.md: at most 4,200 lines outside the codec, no file over 450 lines, no class over 200 lines,
    at most 5 `# fmt: skip`, no pyplot backend switch and no host-syncing bincount in the package."""
    files = sorted(PACKAGE.rglob("*.py"))
    lines = {path: path.read_text().splitlines() for path in files}
    outside_codec = sum(len(v) for p, v in lines.items() if "codec" not in p.relative_to(PACKAGE).parts)
    assert outside_codec <= 4200, outside_codec
    for path, text in lines.items():
        assert len(text) <= 450, f"{path}: {len(text)} lines"
        for node in ast.walk(ast.parse("\n".join(text))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno < 200, f"{path}: class {node.name}"
    source = "\n".join("\n".join(v) for v in lines.values())
    assert source.count("# fmt: skip") <= 5
    assert "matplotlib.use" not in source and "bincount" not in source
