"""The repo's kernels/ecserve_kernels/ installs as `ecserve_kernels`, so it and PyPI's unrelated
`kernels` package never shadow each other, in an installed environment or with the repository
root on sys.path."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path


def test_kernels_and_pypi_kernels_coexist(tmp_path: Path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("ORIGIN = 'pypi'\n")
    code = (
        "import kernels, ecserve_kernels, ecserve\n"
        "assert kernels.ORIGIN == 'pypi', kernels.__file__\n"
        "assert 'ecserve' in ecserve_kernels.__doc__, ecserve_kernels.__file__\n"
        "assert not hasattr(ecserve_kernels, 'ORIGIN')\n"
    )
    # Run outside the source tree, where an installed environment is what imports see.
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_repository_root_shadows_no_installed_package(tmp_path: Path):
    """`python -m pytest` and `python -c` put the working directory first on sys.path: run in the
    repository root, a folder there that is a package would hide the installed package of its
    name (kernels/ once hid PyPI's `kernels`, and transformers then failed to import it). Every
    folder or module there but ecserve/ (ours, meant to be imported from the tree) must lose to
    a package of the same name on PYTHONPATH."""
    root = Path(__file__).resolve().parents[1]
    # What `import NAME` could find there: a folder (package or namespace portion), a .py file.
    found = (p.name if p.is_dir() else p.stem if p.suffix == ".py" else "" for p in root.iterdir())
    names = sorted(n for n in found if n.isidentifier() and n != "ecserve")
    assert {"kernels", "tests", "bench", "protos", "deploy"} <= set(names), names
    for name in names:
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text("ORIGIN = 'site'\n")
    code = (
        "import importlib, sys\n"
        "lost = [(n, getattr(m, '__file__', None) or list(m.__path__)) for n in sys.argv[1:]\n"
        "        if getattr(m := importlib.import_module(n), 'ORIGIN', None) != 'site']\n"
        "assert not lost, f'the repository root shadows: {lost}'\n"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code, *names], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_distribution_installs_no_top_level_kernels():
    top_level = importlib.metadata.distribution("ecserve").read_text("top_level.txt") or ""
    assert sorted(top_level.split()) == ["ecserve", "ecserve_kernels"]
    assert importlib.metadata.entry_points(group="console_scripts", name="ecserve")


def test_every_subpackage_is_installed():
    """A package folder missing from pyproject's `packages` would be absent from the install."""
    import importlib
    from pathlib import Path

    import ecserve

    root = Path(__file__).resolve().parents[1] / "ecserve"
    installed = Path(ecserve.__file__).resolve().parent
    for init in sorted(root.rglob("__init__.py")):
        if "__pycache__" in init.parts:
            continue
        name = ".".join(("ecserve", *init.parent.relative_to(root).parts))
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().is_relative_to(installed), name


def test_triton_is_an_extra_not_a_requirement():
    """A CPU install stays lean (triton is about 1 GB and runs only on CUDA): the `gpu` extra
    names it, and PyTorch's CUDA wheels for Linux require it anyway."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in importlib.metadata.requires("ecserve") or []]
    core = {r.name for r in reqs if r.marker is None or "extra" not in str(r.marker)}
    assert "triton" not in core and "torch" in core
    gpu = [r for r in reqs if r.name == "triton" and r.marker and 'extra == "gpu"' in str(r.marker)]
    assert gpu, reqs
