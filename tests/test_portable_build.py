"""The C files build without any x86 SIMD code (-DPYKD_NO_SIMD, what a
non-x86 CPU such as an aarch64 node compiles), and then every kernel runs its
portable path whatever PYKD_*_PATH asks for. The other tests run the
portable path forced at run time on this CPU; this one proves the SIMD code
can be left out of the build altogether."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
C_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "fortran").rglob("*.c"))
CC = shutil.which("gcc") or shutil.which("cc")
OBJDUMP = shutil.which("objdump")

pytestmark = pytest.mark.skipif(CC is None or OBJDUMP is None,
                                reason="needs gcc and objdump (gfortran brings both)")

# Each kernel's path-name function and the variable that forces a path.
PATHS = {"pykd_i8_path_name": ("PYKD_INT8_PATH", "avx512vnni"),
         "pykd_f32_path_name": ("PYKD_DENSE_PATH", "avx512"),
         "pykd_optim_path_name": ("PYKD_OPTIM_PATH", "avx512"),
         "pykd_cb_path_name": ("PYKD_CODEBOOK_PATH", "avx512"),
         "pykd_sp_path_name": ("PYKD_SPARSE_PATH", "avx512")}


def _compile(src, obj, *defines):
    cmd = [CC, "-c", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
           f"-I{ROOT / 'fortran' / 'kernels'}", *defines, str(ROOT / src), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"


def _vector_registers(obj):
    """Instructions of obj that use 256- or 512-bit registers."""
    text = subprocess.run([OBJDUMP, "-d", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    return [line for line in text.splitlines() if "%ymm" in line or "%zmm" in line]


def test_every_c_file_builds_without_simd(tmp_path):
    assert "fortran/kernels/pykd_int8_simd.c" in C_FILES
    for src in C_FILES:
        obj = tmp_path / (pathlib.Path(src).stem + ".o")
        _compile(src, obj, "-DPYKD_NO_SIMD")
        assert not _vector_registers(obj), f"{src}: AVX code in a -DPYKD_NO_SIMD build"


def test_the_check_sees_simd_code(tmp_path):
    """The same check finds the AVX-512 path in a normal build (so it can fail)."""
    obj = tmp_path / "int8.o"
    _compile("fortran/kernels/pykd_int8_simd.c", obj)
    assert any("%zmm" in line for line in _vector_registers(obj))


def test_portable_build_runs_the_portable_path(tmp_path):
    srcs = [s for s in C_FILES if s.startswith("fortran/kernels/")]
    objs = []
    for src in srcs:
        obj = tmp_path / (pathlib.Path(src).stem + ".o")
        _compile(src, obj, "-DPYKD_NO_SIMD")
        objs.append(str(obj))
    decls = "".join(f"void {f}(char *name, int len);\n" for f in PATHS)
    calls = "".join(f'    {f}(name, 16); printf("{f} %.16s\\n", name);\n' for f in PATHS)
    main = tmp_path / "main.c"
    main.write_text("#include <stdio.h>\n" + decls +
                    "int main(void)\n{\n    char name[16];\n" + calls + "    return 0;\n}\n")
    exe = tmp_path / "paths"
    res = subprocess.run([CC, "-O1", str(main), *objs, "-lm", "-o", str(exe)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, **{var: want for var, want in PATHS.values()})
    out = subprocess.run([str(exe)], capture_output=True, text=True, env=env, check=True).stdout
    got = dict(line.split() for line in out.splitlines())
    assert got == {f: "portable" for f in PATHS}, got
