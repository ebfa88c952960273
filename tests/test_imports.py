"""The package's import structure: every module imports on its own (as the first moex module of
a fresh interpreter), no import cycle, no package importing one above it (tools/imports.py)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import imports  # noqa: E402

FRESH = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m.split('.')[0] in ('moex', 'checkpoints_convert')]:
        del sys.modules[m]                  # each module is the first of the package imported
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f'{name}: {type(e).__name__}: {e}')
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = [m for m in imports.modules() if not m.endswith("__main__")]
    assert "moex.cli" in names and "moex.experiments.efficiency" in names
    done = subprocess.run([sys.executable, "-c", FRESH, *names], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_cycle_and_no_upward_import():
    report = imports.analyse()
    assert report["cycles"] == [] and report["upward"] == []
    assert report["modules"] > 50


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    """The check itself can fail: a package where a low module imports the CLI and back."""
    for pkg in imports.PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "moex" / "config.py").write_text("from moex.cli import main\n")
    (tmp_path / "moex" / "cli.py").write_text("def main():\n    from moex import config\n")
    report = imports.analyse(tmp_path)
    assert report["cycles"] == [["moex.cli", "moex.config"]]
    assert report["upward"] == ["moex.config:1 imports moex.cli"]
    assert report["function_level_imports"] == 1
