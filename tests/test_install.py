"""A fresh machine: locked dependencies, and no repo-root folder shadowing a PyPI package.

transformers (5.25+) imports Hugging Face's `kernels` package at load time. When Python runs from
the repository root, the root is first on sys.path and our `kernels/` folder (installed as
physkern.kernels) must not be taken for it. These checks run in subprocesses from the root, the
way `python -m pytest` and `python -c` run there.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _run_from_root(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not NAME==VERSION"
            pins[_normal(name)] = version
    return pins


def test_transformers_and_physkern_import_from_repo_root():
    hf_kernels = md.distribution("kernels")  # transformers depends on it: installed in the venv
    proc = _run_from_root(
        "import transformers.modeling_utils, physkern, physkern.research.attention, physkern.ops\n"
        "import kernels, physkern.kernels.codebook_matmul as cm\n"
        "print(kernels.__file__)\nprint(cm.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_file, ours = proc.stdout.split()
    assert Path(hf_file).resolve().is_relative_to(Path(hf_kernels.locate_file("")).resolve())
    assert Path(hf_file).resolve() != ROOT / "kernels" / "__init__.py"
    assert Path(ours).resolve() == ROOT / "kernels" / "codebook_matmul.py"


def test_root_kernels_folder_is_not_a_top_level_package_without_hf_kernels():
    # Hide every site-packages: `import kernels` must then fail as if the folder were not there.
    proc = _run_from_root(
        "import sys\n"
        "sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('not found', exc.name, 'kernels' in sys.modules)\n"
        "else:\n"
        "    print('imported', kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["not", "found", "kernels", "False"]


def test_pytest_collects_from_repo_root_without_safe_path():
    proc = _run_from_root("", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_install.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "test_pytest_collects_from_repo_root_without_safe_path" in proc.stdout


def test_every_installed_package_is_locked_at_its_version():
    # Only what is installed in the environment's site-packages: once imported, setuptools puts
    # its own vendored copies (setuptools/_vendor/*.dist-info) on sys.path; those are not
    # installed packages.
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    pins = _lock()
    off = []
    for dist in md.distributions(path=sorted(site)):
        name = _normal(dist.metadata["Name"])
        if name == "physkern":
            continue
        if pins.get(name) != dist.version:
            off.append(f"{name}=={dist.version} (lock: {pins.get(name, 'absent')})")
    assert not off, ("installed but not as requirements.lock says (run `make lock` or reinstall "
                     f"with `make install`): {sorted(off)}")


def test_every_declared_dependency_is_locked():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra, reqs in project["optional-dependencies"].items():
        declared += [r for r in reqs if not r.startswith("physkern")]
    pins = _lock()
    missing = [r for r in declared if _normal(re.split(r"[<>=!~\[; ]", r, 1)[0]) not in pins]
    assert not missing, f"declared in pyproject.toml but not in requirements.lock: {missing}"


@pytest.mark.parametrize("name", ["torch", "triton", "transformers"])
def test_core_pins_match_the_wheels_ci_uses(name):
    # torch must be the CPU wheel on local disk (an unpinned torch pulls a multi-GB CUDA build).
    pins = _lock()
    assert name in pins
    if name == "torch":
        assert pins[name].endswith("+cpu"), pins[name]


def test_setup_lists_every_package():
    # setup.py names its packages explicitly: a new sub-package left out would be missing from
    # a non-editable install although every test here passes against the source tree.
    import ast
    setup = ast.parse((ROOT / "setup.py").read_text())
    listed = next(set(ast.literal_eval(kw.value)) for node in ast.walk(setup)
                  if isinstance(node, ast.Call) for kw in node.keywords if kw.arg == "packages")
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "physkern").rglob("__init__.py")} | {"physkern.kernels"}
    assert found == listed, f"setup.py packages differ from the tree: {sorted(found ^ listed)}"
