"""pykd picks OpenBLAS's AVX-512 kernels where the system's OpenBLAS does not
know the CPU (pykd/_openblas.py)."""
import os
import subprocess
import sys

import pytest

from pykd import _openblas

SKX = {"fma", "avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_kernels_follow_the_flags():
    assert _openblas.kernels_for(frozenset(SKX)) == "SkylakeX"
    assert _openblas.kernels_for(frozenset(SKX | {"avx512_bf16"})) == "Cooperlake"
    for missing in sorted(SKX):
        assert _openblas.kernels_for(frozenset(SKX - {missing})) is None, missing
    assert _openblas.kernels_for(frozenset({"fma", "avx2"})) is None
    assert _openblas.kernels_for(frozenset()) is None


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert _openblas.cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    assert _openblas.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_loading_sets_the_variable_only_while_loading():
    env = {}
    with _openblas.loading(env, flags=frozenset(SKX | {"avx512_bf16"})):
        assert env == {"OPENBLAS_CORETYPE": "Cooperlake"}
    assert env == {}
    with pytest.raises(RuntimeError):
        with _openblas.loading(env, flags=frozenset(SKX)):
            raise RuntimeError
    assert env == {}
    env = {"OPENBLAS_CORETYPE": "Haswell"}  # the user's choice wins
    with _openblas.loading(env, flags=frozenset(SKX)):
        assert env == {"OPENBLAS_CORETYPE": "Haswell"}
    assert env == {"OPENBLAS_CORETYPE": "Haswell"}
    env = {}
    with _openblas.loading(env, flags=frozenset({"avx2", "fma"})):
        assert env == {}


def _fresh_import(env):
    code = ("import os, pykd, numpy as np; from pykd import _openblas; "
            "pykd.dense(np.ones((3, 2), np.float32), np.ones((2, 4), np.float32), np.zeros(4, np.float32)); "
            "print(_openblas.corename(), os.environ.get('OPENBLAS_CORETYPE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.fortran
def test_a_fresh_import_runs_the_kernels_the_cpu_allows():
    """On this machine, in a fresh process without OPENBLAS_CORETYPE: the
    extension's OpenBLAS runs the kernels kernels_for names (where it names
    any), and the variable is gone after the import."""
    if _openblas.corename() is None:
        pytest.skip("the extension's BLAS is not a shared libopenblas.so.0")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    core, left = _fresh_import(env)
    assert left == "None"
    want = _openblas.kernels_for(_openblas.cpu_flags())
    if want is not None:
        assert core == want
    env["OPENBLAS_CORETYPE"] = "Haswell"
    assert _fresh_import(env) == ["Haswell", "Haswell"]
