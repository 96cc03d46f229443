"""A wheel built from the tree ships every file the package reads at run time, and the installed package (not
the tree) runs the quickstart in a fresh venv.

The files the package reads are its modules and, by name, ``RUNTIME_FILES`` (read through the installed
module, below); every other non-Python file inside a package folder of the tree must ship too. The pinned
autotune picks (``kernels/tuned_configs.json``) are only committed after a GPU run, so the test builds from a
copy of the tree and writes a pinned-config file there when the tree has none: the wheel must carry it by
pyproject.toml's declaration, not by the accident of a file being present.

The fresh venv has no packages of its own; a ``.pth`` file puts this interpreter's site-packages after its
own, for torch (``venv --system-site-packages`` would give the base interpreter's, which has no torch). A
``.pth`` line adds a folder without running the ``.pth`` files in it, so the tree's editable install there is
not active. Everything runs from an empty working directory with PYTHONPATH unset.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")           # Python >= 3.11

# files the package reads by name: installed package -> paths inside it
RUNTIME_FILES = {"rhythm_kernels": ["tuned_configs.json"]}
PINNED = {"format": 1, "entries": [{"gpu": "test-wheel GPU", "kernel": "stats", "head_dim": 64, "dtype": "bfloat16",
                                    "mode": "HAS_V=False", "len_key": 1024,
                                    "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}]}

PROBE = """
import json, sys
import rhythm, rhythm_kernels
from rhythm_kernels import tuned_configs
print(json.dumps({"prefix": sys.prefix, "rhythm": rhythm.__file__, "rhythm_kernels": rhythm_kernels.__file__,
                  "configs": tuned_configs.configs_path(), "entries": tuned_configs.load_entries()}))
"""


def _package_dirs() -> dict[str, str]:
    """{installed package: folder in the tree} for the top-level packages (pyproject.toml's package-dir)."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["setuptools"]["package-dir"])


def _copy_tree(dest: Path, package_dirs: dict[str, str]) -> None:
    """What a wheel is built from: the build files and the package folders (no caches)."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for folder in set(package_dirs.values()):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _data_files(tree: Path, package_dirs: dict[str, str]) -> dict[str, list[str]]:
    """{installed package: every non-Python file under its folder in the tree, relative to it}."""
    found = {}
    for package, folder in package_dirs.items():
        base = tree / folder
        found[package] = sorted(str(p.relative_to(base)) for p in base.rglob("*")
                                if p.is_file() and p.suffix not in (".py", ".pyc"))
    return found


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def test_wheel_ships_runtime_files_and_runs_quickstart(tmp_path):
    package_dirs = _package_dirs()
    src, wheels, venv, cwd = (tmp_path / name for name in ("src", "wheels", "venv", "cwd"))
    for folder in (src, wheels, cwd):
        folder.mkdir()
    _copy_tree(src, package_dirs)
    pinned = src / package_dirs["rhythm_kernels"] / "tuned_configs.json"
    if not pinned.exists():
        pinned.write_text(json.dumps(PINNED))
    expected_entries = json.loads(pinned.read_text())["entries"]
    data = _data_files(src, package_dirs)
    for package, names in RUNTIME_FILES.items():
        assert set(names) <= set(data[package]), f"{package}: {names} not in the tree copy"

    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "RHYTHM_TRITON_CONFIGS", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # 1. the wheel holds every data file of the tree
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w",
          str(wheels)], cwd, env)
    (wheel,) = wheels.glob("attention_rhythm-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"{package}/{name}" for package, names in data.items() for name in names
               if f"{package}/{name}" not in members]
    assert not missing, f"the wheel lacks files the package has in the tree: {missing}"

    # 2. a fresh venv with only the wheel installed (torch and the rest from this interpreter, after it)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd, env)
    python = venv / "bin" / "python"
    own = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd,
                    env).stdout.strip())
    (own / "shared_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)], cwd, env)

    # 3. the installed package is what runs, and it finds its files
    probe = json.loads(_run([str(python), "-c", PROBE], cwd, env).stdout.strip().splitlines()[-1])
    for package in ("rhythm", "rhythm_kernels"):
        assert Path(probe[package]).is_relative_to(own), f"{package} imported from {probe[package]}, not the venv"
    assert Path(probe["configs"]).is_relative_to(own) and Path(probe["configs"]).exists(), probe["configs"]
    assert probe["entries"] == expected_entries
    for package, names in data.items():
        for name in names:
            assert (own / package / name).is_file(), f"{package}/{name} is not installed"

    # 4. the quickstart and the console script, from the installed package
    done = _run([str(python), "-m", "rhythm.quickstart", "--length", "256", "--response-start", "64"], cwd, env)
    assert "worst |torch - oracle|" in done.stdout, done.stdout
    assert "usage" in _run([str(venv / "bin" / "rhythm"), "--help"], cwd, env).stdout.lower()
