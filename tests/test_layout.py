"""The architecture, enforced: who may import whom, and a dispatcher that never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"schemas": {"dispatcher", "worker", "torch", "diffusers", "transformers"},
             "dispatcher": {"worker", "torch", "diffusers", "transformers"},
             "worker": {"dispatcher"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_layout_allows(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        wrong = imported_packages(path) & FORBIDDEN[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_importing_the_whole_dispatcher_and_its_cli_never_imports_torch() -> None:
    modules = [p.stem for p in (ROOT / "dispatcher").glob("*.py") if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import dispatcher.{m}\n" for m in modules)
            + "from dispatcher.cli import cli\n"
            + "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'worker') if m in sys.modules)\n"
            + "print(','.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "", f"importing the dispatcher pulled in {done.stdout.strip()}"


def test_kiln_help_lists_every_command_without_importing_torch() -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nfrom dispatcher.cli import cli\n"
            "result = CliRunner().invoke(cli, ['--help'])\n"
            "assert result.exit_code == 0 and '  worker ' in result.output, result.output\n"
            "print(','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"`kiln --help` imported {done.stdout.strip()}"
