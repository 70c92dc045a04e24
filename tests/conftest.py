"""Make the tests run against the *installed* pykd (with its compiled extension).

Running ``python -m pytest`` from the repository root puts the root on
``sys.path``, so ``import pykd`` would pick up the source tree, which has no
compiled ``_fkernels`` extension (meson builds it into site-packages). When
that is the case, the repository root is dropped from ``sys.path`` before
pykd is imported. Tests marked ``fortran`` fail with a clear message if the
extension still cannot be imported; the pure-Python modules (``pykd.data``,
``pykd.modelfile``) work either way.
"""
import glob
import os
import signal
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_HINT = (
    "the pykd Fortran extension (pykd._fkernels) is not importable; build and install it with\n"
    "    cd {repo} && pip install --no-build-isolation -Csetup-args=-Dcopy_report=true "
    "-Cbuild-dir=build/py . -q\n"
    "and run the tests from /tmp (or keep the repository root off sys.path)."
).format(repo=REPO)


def _source_tree_has_extension():
    return bool(glob.glob(os.path.join(REPO, "pykd", "_fkernels*.so"))
                or glob.glob(os.path.join(REPO, "pykd", "_fkernels*.pyd")))


def _is_repo_root(entry):
    try:
        return os.path.realpath(entry or os.getcwd()) == os.path.realpath(REPO)
    except OSError:  # pragma: no cover
        return False


if not _source_tree_has_extension():
    sys.path[:] = [p for p in sys.path if not _is_repo_root(p)]
    mod = sys.modules.get("pykd")
    if mod is not None and os.path.realpath(getattr(mod, "__file__", "") or "").startswith(
            os.path.realpath(os.path.join(REPO, "pykd"))):
        for name in [n for n in sys.modules if n == "pykd" or n.startswith("pykd.")]:
            del sys.modules[name]

import pykd  # noqa: E402  (after the sys.path fix above)

try:
    from pykd import _fkernels  # noqa: F401,E402
    FORTRAN_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - only without a build
    FORTRAN_IMPORT_ERROR = exc

# The Fortran programs, MPI ranks and CLI runs the tests start must run the
# OpenBLAS kernels this process runs: importing pykd picks AVX-512 kernels
# where the system's OpenBLAS does not know the CPU (pykd/_openblas.py), and
# a Fortran program only gets them from OPENBLAS_CORETYPE (docs/fortran.md).
if FORTRAN_IMPORT_ERROR is None and "OPENBLAS_CORETYPE" not in os.environ:
    from pykd import _openblas  # noqa: E402
    _core = _openblas.corename()
    if _core:
        os.environ["OPENBLAS_CORETYPE"] = _core


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fortran: the test needs the compiled pykd._fkernels extension")


def pytest_report_header(config):
    where = os.path.dirname(pykd.__file__)
    ext = "ok" if FORTRAN_IMPORT_ERROR is None else f"MISSING ({FORTRAN_IMPORT_ERROR})"
    return f"pykd imported from {where}; Fortran extension: {ext}"


@pytest.fixture(autouse=True)
def _require_fortran_extension(request):
    if request.node.get_closest_marker("fortran") is not None and FORTRAN_IMPORT_ERROR is not None:
        pytest.fail(INSTALL_HINT + f"\n(import error: {FORTRAN_IMPORT_ERROR})", pytrace=False)


@pytest.fixture(autouse=True)
def _sigint_enabled():
    """Ctrl-C tests need SIGINT delivered. A shell starts background jobs (and
    so, sometimes, CI) with SIGINT ignored, and fit rightly keeps it ignored;
    give each test the interactive default, and children inherit it."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
