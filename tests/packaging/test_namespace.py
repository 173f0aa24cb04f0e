"""Installed, cimlab is one import name: no top-level ``host``, ``chip_sim`` or ``firmware_bridge``."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # from another folder, so the repository root is not on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_public_api_imports_from_cimlab(tmp_path: Path) -> None:
    proc = _run(
        "from cimlab import Chip, open_link, MacroSpec, CimError, MacErrorModel\n"
        "import cimlab.driver, cimlab.links, cimlab.firmware_bridge.spec\n"
        "assert Chip is cimlab.driver.Chip and open_link is cimlab.links.open_link\n"
        "assert MacroSpec is cimlab.firmware_bridge.spec.MacroSpec\n",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_no_top_level_folder_names_are_importable(tmp_path: Path) -> None:
    proc = _run(
        "import importlib.util, json\n"
        "print(json.dumps([n for n in ('host', 'chip_sim', 'firmware_bridge') if importlib.util.find_spec(n)]))\n",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_the_contract_loads_without_host_code_or_torch(tmp_path: Path) -> None:
    proc = _run(
        "import sys, json, cimlab.firmware_bridge.bridge, cimlab.chip_sim\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('cimlab.driver', 'cimlab.links', 'torch')))))\n",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_pyproject_lists_every_package_folder() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, path in tool["package-dir"].items():  # sibling folders: none maps inside another
        for init in (ROOT / path).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / path).parts]))
    assert found == set(tool["packages"])
