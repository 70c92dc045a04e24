"""The repaired wheel (`make wheel`) installs into a clean venv and runs with
the system's OpenBLAS, libgfortran, libgomp and libquadmath out of sight.

`make test-wheel` builds the wheel and runs this file with PYKD_WHEEL set
(CI does); without it the tests skip. As root, the probe runs in a private
mount namespace (``unshare -m``) in which the system's copies of those
libraries are hidden (an empty tmpfs over the OpenBLAS directories, an empty
file over each library), so a wheel that still needed them would fail to
import. In every case the probe reads /proc/self/maps: each of those
libraries must be mapped from the wheel's own ``pykd_distill.libs``. Runs
with ``--noconftest`` (it does not import pykd itself).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

WHEEL = os.environ.get("PYKD_WHEEL", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBDIR = "/usr/lib/x86_64-linux-gnu"
HIDDEN_DIRS = [f"{LIBDIR}/openblas-pthread", f"{LIBDIR}/openblas-openmp"]
HIDDEN_LIBS = ["libgfortran.so.5", "libgomp.so.1", "libquadmath.so.0", "libopenblas.so.0",
               "libblas.so.3", "liblapack.so.3"]
BUNDLED = ("libopenblas", "libgfortran", "libgomp", "libquadmath")

pytestmark = pytest.mark.skipif(not WHEEL, reason="PYKD_WHEEL unset: `make test-wheel` "
                                "builds the wheel and runs these tests")


def meson_version():
    with open(os.path.join(ROOT, "meson.build"), encoding="utf-8") as fh:
        return re.search(r"^project\([^)]*?version:\s*'([^']+)'", fh.read(), re.M | re.S).group(1)


def clean_env():
    drop = ("PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYKD_TEST_BUILD",
            "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYKD_NO_OMP_DEFAULTS", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop}


def can_hide():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def hidden(cmd, scratch):
    """``cmd`` in a mount namespace without the system's copies of the bundled libraries."""
    empty = os.path.join(scratch, "empty")
    open(empty, "w").close()
    lines = ["set -e"]
    for d in HIDDEN_DIRS:
        if os.path.isdir(d):
            lines.append(f"mount -t tmpfs none {d}")
    for name in HIDDEN_LIBS:
        real = os.path.realpath(os.path.join(LIBDIR, name))
        if os.path.isfile(real) and not any(real.startswith(d + "/") for d in HIDDEN_DIRS):
            lines.append(f"mount --bind {empty} {real}")
    lines.append('exec "$@"')
    return ["unshare", "-m", "sh", "-c", "\n".join(lines), "sh", *cmd]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    assert os.path.isfile(WHEEL), f"PYKD_WHEEL={WHEEL!r} is not a file"
    d = tmp_path_factory.mktemp("wheel-venv")
    # The base interpreter, not this venv: no system or .venv site-packages.
    subprocess.run([sys.executable, "-m", "venv", str(d / "venv")], check=True, env=clean_env(),
                   timeout=300)
    py = str(d / "venv" / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", WHEEL],
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return py, str(d)


def test_wheel_is_repaired_and_tagged():
    name = os.path.basename(WHEEL)
    m = re.fullmatch(r"pykd_distill-(.+?)-cp\d+-cp\d+-manylinux_2_(\d+)_x86_64\.whl", name)
    assert m, name
    assert m.group(1) == meson_version()
    with zipfile.ZipFile(WHEEL) as z:
        libs = [os.path.basename(n) for n in z.namelist() if n.startswith("pykd_distill.libs/")]
        meta = z.read(f"pykd_distill-{m.group(1)}.dist-info/METADATA").decode()
    for lib in BUNDLED:
        assert any(n.startswith(lib) for n in libs), (lib, libs)
    assert "Name: pykd-distill" in meta and "License-Expression: MIT" in meta
    # glibc 2.36 here: the tag claims no newer glibc than the machine that built it.
    glibc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout
    minor = int(re.search(r"2\.(\d+)", glibc).group(1))
    assert int(m.group(2)) <= minor


PROBE = r"""
import json, os, sys
import numpy as np
import pykd, threadpoolctl
from pykd import _fkernels
rng = np.random.default_rng(0)
m = pykd.MLP([20, 32, 5], seed=0)
x = rng.standard_normal((64, 20)).astype(np.float32)
ref = m.forward(x, backend="numpy")
y = m.forward(x)
W = rng.standard_normal((20, 8)).astype(np.float32)
d = pykd.dense(x, W, np.zeros(8, np.float32), "relu")
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if ".so" in line})
blas = [p for p in threadpoolctl.threadpool_info()
        if p["internal_api"] == "openblas" and "scipy_openblas" not in p["filepath"]]
print(json.dumps({"file": pykd.__file__, "ext": _fkernels.__file__, "version": pykd.__version__,
                  "err": float(np.abs(y - ref).max()),
                  "dense_err": float(np.abs(d - np.maximum(x @ W, 0)).max()),
                  "maps": maps, "blas": blas, "spin": os.environ.get("GOMP_SPINCOUNT"),
                  "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def run_in_venv(venv, args):
    py, scratch = venv
    cmd = [py, *args]
    if can_hide():
        cmd = hidden(cmd, scratch)
    return subprocess.run(cmd, env=clean_env(), cwd=scratch, capture_output=True, text=True,
                          timeout=300)


def test_forward_pass_uses_only_the_wheels_libraries(venv):
    proc = run_in_venv(venv, ["-c", PROBE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    site = os.path.dirname(os.path.dirname(info["file"]))
    assert site.startswith(venv[1]), info["file"]
    libs = os.path.join(site, "pykd_distill.libs") + os.sep
    assert info["version"] == meson_version()
    assert info["err"] < 1e-5 and info["dense_err"] < 1e-4
    for lib in BUNDLED:
        # NumPy's and SciPy's wheels bring their own copies (numpy.libs/...):
        # every copy must come from a wheel in the venv, one from ours.
        mapped = [p for p in info["maps"] if os.path.basename(p).startswith(lib)]
        assert any(p.startswith(libs) for p in mapped), (lib, mapped)
        assert all(p.startswith(site + os.sep) for p in mapped), (lib, mapped)
    # The bundled OpenBLAS is the OpenMP build when the build machine had it:
    # then one thread pool, and import pykd set the matching wait policy.
    assert len(info["blas"]) == 1 and info["blas"][0]["filepath"].startswith(libs)
    if info["blas"][0]["threading_layer"] == "openmp":
        assert (info["spin"], info["policy"]) == ("10000", None)
    else:
        assert (info["spin"], info["policy"]) == (None, "passive")


def test_ldd_resolves_to_the_wheels_libs(venv):
    proc = run_in_venv(venv, ["-c", "import pykd._fkernels as f; print(f.__file__)"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ext = proc.stdout.strip()
    cmd = ["ldd", ext]
    if can_hide():
        cmd = hidden(cmd, venv[1])
    out = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=60).stdout
    assert "not found" not in out, out
    libs = os.path.join(os.path.dirname(os.path.dirname(ext)), "pykd_distill.libs") + os.sep
    for lib in BUNDLED:
        line = [ln for ln in out.splitlines() if ln.strip().startswith(lib)]
        assert line and " => " in line[0], (lib, out)
        path = os.path.normpath(line[0].split(" => ")[1].split(" (")[0])
        assert path.startswith(libs), (lib, out)


def test_console_script(venv):
    py, scratch = venv
    proc = run_in_venv(venv, [os.path.join(os.path.dirname(py), "pykd"), "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pykd {meson_version()}"
