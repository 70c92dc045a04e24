"""Packaging: one version, the distribution name, the copies of the version
that cannot read meson.build, the build the tests run, and what ``import
pykd`` does to the environment."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest

import pykd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = "pykd-distill"


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


def meson_version():
    m = re.search(r"^project\([^)]*?version:\s*'([^']+)'", read("meson.build"), re.M | re.S)
    assert m, "meson.build: no version in project()"
    return m.group(1)


def test_version_is_semver():
    assert re.fullmatch(r"\d+\.\d+\.\d+", meson_version())


def test_pyproject_reads_the_version_from_meson():
    project = tomllib.loads(read("pyproject.toml"))["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert project["name"] == DIST
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]


def test_fpm_version_matches_meson():
    fpm = tomllib.loads(read("fpm.toml"))
    assert fpm["version"] == meson_version()
    assert fpm["license"] == "MIT"


def test_cmake_files_name_no_other_version():
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in (".git", "build", ".venv", "dist")]
        for name in files:
            if name == "CMakeLists.txt" or name.endswith(".cmake"):
                text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                for v in re.findall(r"\bVERSION\s+(\d+\.\d+\.\d+)", text):
                    if not re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+" + re.escape(v), text):
                        assert v == meson_version(), (name, v)


def test_installed_version_and_metadata():
    assert pykd.__version__ == meson_version()
    try:
        assert importlib.metadata.version(DIST) == meson_version()
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the installed pykd has no {DIST} metadata: it was built before the rename; "
                    "reinstall it (pip install . in the checkout)")


def test_pkg_config_file_carries_the_version(tmp_path):
    """meson writes the .pc file at setup time, from project()'s version."""
    pytest.importorskip("mesonbuild")
    if not shutil.which("gfortran") or not shutil.which("pkg-config"):
        pytest.skip("gfortran or pkg-config missing")
    build = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "mesonbuild.mesonmain", "setup", str(build),
                           "-Dpython=false"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    pc = (build / "meson-private" / "pykd.pc").read_text()
    assert re.search(r"^Version: (.+)$", pc, re.M).group(1) == meson_version()


def test_license_and_changelog():
    lic = read("LICENSE")
    assert lic.startswith("MIT License") and "the pykd developers" in lic
    log = read("CHANGELOG.md")
    assert "## [Unreleased]" in log


def test_readme_installs_the_right_distribution():
    readme = read("README.md")
    # `pip install pykd` would fetch an unrelated WinDbg extension.
    assert not re.search(r"pip install\s+(-\S+\s+)*pykd(?![-\w])", readme)
    assert DIST in readme
    assert "pkg-config" in readme and "gfortran" in readme


@pytest.mark.skipif(not os.environ.get("PYKD_TEST_BUILD"),
                    reason="not run by `make test` (PYKD_TEST_BUILD unset)")
def test_make_test_runs_the_test_build():
    from pykd import _build_config
    site = os.path.realpath(os.environ["PYKD_TEST_BUILD"])
    assert os.path.realpath(pykd.__file__).startswith(site + os.sep), pykd.__file__
    assert _build_config.copy_report is True


def test_release_venv_is_not_the_test_build():
    """The .venv that `make demo` gives users holds a release build."""
    venv_py = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(venv_py):
        pytest.skip("no .venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYKD_TEST_BUILD")}
    proc = subprocess.run([venv_py, "-c", "from pykd import _build_config as b; print(b.copy_report)"],
                          cwd="/", env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip("no pykd build in .venv (`make demo` or `make setup` installs it)")
    if os.environ.get("PYKD_TEST_BUILD"):  # under `make test`, .venv must be the release build
        assert proc.stdout.strip() == "False"


OMP_PROBE = ("import os, pykd; print(os.environ.get('OMP_WAIT_POLICY'), "
             "os.environ.get('GOMP_SPINCOUNT'))")


def run_probe(code, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYKD_NO_OMP_DEFAULTS")}
    clean.update(env)
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True,
                          text=True, timeout=120, cwd="/")


@pytest.mark.parametrize("value, sets", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_omp_defaults_opt_out(value, sets):
    proc = run_probe(OMP_PROBE, PYKD_NO_OMP_DEFAULTS=value)
    assert proc.returncode == 0, proc.stderr
    policy, spin = proc.stdout.split()
    assert ((policy, spin) != ("None", "None")) == sets
    if sets:  # exactly one of the two
        assert (policy == "None") != (spin == "None")


def test_source_checkout_without_build_says_so():
    import importlib.machinery
    pkg = os.path.join(ROOT, "pykd")
    if any(os.path.exists(os.path.join(pkg, "_fkernels" + s))
           for s in importlib.machinery.EXTENSION_SUFFIXES) or \
            os.path.exists(os.path.join(pkg, "_build_config.py")):
        pytest.skip("this source tree holds a build")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import numpy as np, pykd\n"
            "print(pykd.__version__)\n"
            "try:\n"
            "    pykd.dense(np.ones((1, 2), np.float32), np.ones((2, 2), np.float32),"
            " np.zeros(2, np.float32))\n"
            "except ImportError as e:\n"
            "    print(e)\n") % ROOT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    version, message = proc.stdout.split("\n", 1)
    assert version == meson_version()
    assert "is not built" in message and "source checkout" in message
    assert "pip install ." in message and "pkg-config" in message
    assert "circular" not in message


def test_benchmark_results_record_no_machine_paths():
    """Results files name paths relative to the repository (or from
    site-packages/ on), never the home or checkout of the machine they ran on."""
    bench = os.path.join(ROOT, "benchmarks")
    sys.path.insert(0, bench)
    try:
        import harness
    finally:
        sys.path.remove(bench)
    assert harness.portable_path(os.path.join(bench, "plots", "x.png")) == "benchmarks/plots/x.png"
    assert harness.portable_path("/opt/py/lib/python3.11/site-packages/numpy.libs/a.so") == \
        "site-packages/numpy.libs/a.so"
    assert harness.portable_path("/usr/lib/x86_64-linux-gnu/libgomp.so.1") == \
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    for name in sorted(os.listdir(bench)):
        if name.endswith(".json"):
            text = open(os.path.join(bench, name), encoding="utf-8").read()
            bad = re.findall(r'"((?:/root|/home|/work|/tmp)/[^"]*)"', text)
            assert not bad, (name, bad)
