"""The client's README example stays valid Python against the package's real names."""

from __future__ import annotations

import ast
from pathlib import Path

import tidings_client

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"


def test_the_readme_example_compiles_and_imports_real_names() -> None:
    example = README.read_text().split("```python", 1)[1].split("```", 1)[0]
    tree = ast.parse(example)
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "tidings_client" for alias in node.names]
    assert imported and all(name in tidings_client.__all__ for name in imported)
    compile(tree, str(README), "exec")
