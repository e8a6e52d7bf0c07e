"""Packaging: setup.py maps kernels/ -> attn_fast.kernels and reference/ -> attn_fast.reference, both in a
built wheel and in an installed copy imported from outside the checkout."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_ALL = ("import attn_fast, attn_fast.kernels, attn_fast.kernels.aot, attn_fast.reference, attn_fast.nn; "
              "print(attn_fast.__file__); print(attn_fast.kernels.__file__); print(attn_fast.reference.__file__)")


def _has_build_tools():
    # by their metadata, not importlib.util.find_spec: setuptools' distutils hook takes a lookup of
    # "pip" for pip running, and then leaves stdlib distutils to the process, which breaks
    # torch.utils.cpp_extension (inductor's CPU compiles) in the tests after this one
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("setuptools"), version("pip")
    except PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not _has_build_tools():
        pytest.skip("pip and setuptools are needed to build a wheel")
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # build from a copy of the sources so the checkout gets no build/ or egg-info litter
    src = build / "src"
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"], check=True, capture_output=True, text=True).stdout.split()
    for f in files + [f for f in ("README.md", "setup.py") if f not in files]:
        dst = src / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(open(os.path.join(ROOT, f), "rb").read())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("attn_fast-*.whl")
    return whl


def test_wheel_holds_the_mapped_subpackages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("attn_fast/__init__.py", "attn_fast/kernels/__init__.py", "attn_fast/kernels/aot.py",
              "attn_fast/reference/__init__.py", "attn_fast/reference/attention.py", "attn_fast/ops/attention.py",
              "attn_fast/nn/__init__.py", "attn_fast/nn/squeeze_excite.py"):
        assert f in names, f"{f} missing from the wheel"
    assert not any(n.startswith(("kernels/", "reference/", "tests/", "bench/")) for n in names), \
        "top-level kernels/reference/tests/bench must not be installed"


def test_installed_copy_imports_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert all(p.startswith(str(target)) for p in out), out


def test_source_tree_imports_without_installing(tmp_path):
    """A checkout that was never installed still imports (the package maps its sibling folders)."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONNOUSERSITE="1")
    out = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.extend(%r); " % (
        [p for p in sys.path if p.endswith("site-packages") and "attn_fast" not in p],) + IMPORT_ALL],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert out == [os.path.join(ROOT, "attn_fast", "__init__.py"), os.path.join(ROOT, "kernels", "__init__.py"),
                   os.path.join(ROOT, "reference", "__init__.py")]


def test_editable_install_imports_from_any_folder(tmp_path):
    """Where attn_fast is installed editable (make test's .venv), it imports from any folder."""
    import json
    from importlib.metadata import distributions

    def editable(dist):
        url = dist.read_text("direct_url.json")
        return bool(url) and json.loads(url).get("dir_info", {}).get("editable", False)

    if not any(editable(d) for d in distributions(name="attn_fast")):
        pytest.skip("attn_fast is not installed editable in this environment (it runs from the source tree)")
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[1] == os.path.join(ROOT, "kernels", "__init__.py")
