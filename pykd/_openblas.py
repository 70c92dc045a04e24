"""OpenBLAS's kernels on AVX-512 CPUs that its build does not know.

A DYNAMIC_ARCH OpenBLAS picks its kernels once, when it loads, from the CPU
model. A build older than the CPU falls back to its oldest x86-64 kernels:
Debian 12's OpenBLAS 0.3.21 runs "Prescott" (SSE3, no FMA) on an Intel
Xeon of family 6 model 207, and its sgemm is 4-5x slower there than with the
SkylakeX kernels the CPU can run (21 against 84-104 GFLOP/s at the teacher's
and student's shapes, one core).

So while pykd's extension loads its OpenBLAS, ``OPENBLAS_CORETYPE`` names the
AVX-512 kernels OpenBLAS itself picks on the AVX-512 CPUs it knows:
"Cooperlake" with AVX512-BF16 (0.3.21's choice on AMD Zen 4 and Intel
Sapphire Rapids), else "SkylakeX". So on those CPUs nothing changes, not
even a bit: the two run different sgemm blockings, and 90% of a 1200 x 64 x
784 product's outputs differ between them. (With OPENBLAS_VERBOSE=2, 0.3.21
prints "Core not found: Cooperlake" before it loads the Cooperlake kernels;
threadpoolctl and ``openblas_get_corename`` confirm them.) The variable is
removed again once the extension has loaded: NumPy's OpenBLAS (loaded
before) and child processes do not see it. A user's ``OPENBLAS_CORETYPE`` wins, and CPUs
without AVX-512 (which this OpenBLAS knows) are left alone.
"""
import contextlib
import ctypes
import os

# What OpenBLAS's SkylakeX kernels use.
_SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma", "avx2"})


def cpu_flags(path="/proc/cpuinfo"):
    """The first CPU's feature flags (an empty set where the file is missing,
    as on other operating systems)."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def kernels_for(flags):
    """The OpenBLAS core name pykd asks for on a CPU with these flags, or
    None (leave OpenBLAS's own choice)."""
    if not _SKYLAKEX_FLAGS <= flags:
        return None
    return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"


@contextlib.contextmanager
def loading(environ=os.environ, flags=None):
    """Around the import that loads OpenBLAS: sets ``OPENBLAS_CORETYPE`` for
    it (see the module's docstring) and removes it afterwards."""
    name = None
    if "OPENBLAS_CORETYPE" not in environ:
        name = kernels_for(cpu_flags() if flags is None else flags)
    if name is None:
        yield
        return
    environ["OPENBLAS_CORETYPE"] = name
    try:
        yield
    finally:
        environ.pop("OPENBLAS_CORETYPE", None)


def corename():
    """The kernels of the OpenBLAS that pykd's extension loaded ("SkylakeX",
    "Prescott", ...), or None when no OpenBLAS with that name is loaded."""
    try:
        fn = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LOCAL).openblas_get_corename
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode("ascii", "replace")
