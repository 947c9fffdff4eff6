"""Packaging: ``python -m build`` makes an sdist and, from it, a wheel; the wheel installs into a fresh
virtual environment and imports there (not from this checkout). Skipped when ``build`` is missing
(it is in the ``[test]`` extra)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import dif_attention

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("build", reason="`build` is not installed (pip install build, or the [test] extra)")
pytest.importorskip("setuptools", reason="the no-isolation build needs setuptools (in the [test] extra)")


def source_files() -> list[str]:
    """What a fresh clone has: tracked files plus new, not-ignored ones (or the package dir without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        keep = ("pyproject.toml", "README.md", "LICENSE")
        return list(keep) + [str(p.relative_to(ROOT)) for p in (ROOT / "dif_attention").rglob("*")
                             if p.is_file() and "__pycache__" not in p.parts]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    for f in source_files():
        if f.startswith(("runs/", "notes/", "benchmarks/", "examples/", "tests/", "tools/", "docs/")):
            continue  # not part of the package; keeps the copy small
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    out = tmp / "dist"
    # no isolation: build with the setuptools already installed (CI may have no index access)
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    return tmp, src, wheels[0], sdists[0]


def test_wheel_contents(dists):
    _, src, wheel, _ = dists
    version = dif_attention.__version__
    assert wheel.name.startswith(f"dif_attention-{version}-") and wheel.name.endswith("-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {str(p.relative_to(src)).replace(os.sep, "/") for p in (src / "dif_attention").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert package <= names, f"missing from the wheel: {sorted(package - names)}"
    assert "dif_attention/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/", "tools/")) for n in names)
    assert not any("compile_check" in n for n in names)  # developer tools stay outside the wheel
    dist_info = f"dif_attention-{version}.dist-info"
    assert any(n.startswith(f"{dist_info}/") and n.endswith("LICENSE") for n in names), "license file"
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert f"Version: {version}" in meta  # single-sourced from dif_attention.__version__
    for extra in ("triton", "examples", "test"):
        assert f"Provides-Extra: {extra}" in meta
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    runtime = sorted(r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires if "extra ==" not in r)
    assert runtime == ["einops", "numpy", "torch"]


def test_sdist_contents(dists):
    _, _, _, sdist = dists
    root = sdist.name[: -len(".tar.gz")]
    names = set(tarfile.open(sdist).getnames())
    for f in ("pyproject.toml", "README.md", "LICENSE", "dif_attention/__init__.py", "dif_attention/py.typed"):
        assert f"{root}/{f}" in names, f


def test_wheel_installs_and_imports_in_a_fresh_venv(dists):
    tmp, _, wheel, _ = dists
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # torch/einops/numpy come from the interpreter running the tests (a virtualenv or the system Python):
    # a .pth line adds their folders (a venv's --system-site-packages would see the *base* interpreter's
    # packages, not an active virtualenv's). Folders added this way do not run their own .pth files, so an
    # editable install of this checkout stays invisible. --no-deps keeps the install offline and fast.
    import einops
    import numpy
    import torch
    dep_dirs = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (torch, einops, numpy)})
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site).mkdir(parents=True, exist_ok=True)
    (Path(site) / "test_deps.pth").write_text("\n".join(dep_dirs) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = (
        "import dif_attention as d, torch\n"
        "m = d.DecoupledAttention(8, 2, attr_dims={'cat': 4})\n"
        "y = m(torch.randn(1, 3, 8), attrs={'cat': torch.randn(1, 3, 4)}, pos=torch.randn(3, 8), is_causal=True)\n"
        "from dif_attention.models import SASRec, SASRecF, NOVA, DIFSASRec, BERT4Rec, DIFBERT4Rec, build_model\n"
        "t = torch.tensor([[0, 0], [1, 0], [2, 1], [1, 2]])\n"
        "net = build_model('DIFSASRec', num_items=3, item_tables={'cat': t}, num_classes={'cat': 3}, dim=8, heads=2)\n"
        "assert net(torch.tensor([[1, 2, 0]])).shape == (1, 3, 8)\n"
        "print(d.__file__, d.__version__, tuple(y.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(python), "-c", probe], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    location, version, shape = run.stdout.split(maxsplit=2)
    assert Path(location).resolve().is_relative_to(venv.resolve()), f"imported {location}, not the wheel"
    assert version == dif_attention.__version__
    assert shape.strip() == "(1, 3, 8)"
