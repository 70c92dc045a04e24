"""The codes are defined once per language: pykd/_codes.py and
fortran/core/pykd_codes.f90. This test parses the Fortran file and checks
that both copies agree, entry by entry, in both directions."""
import os
import re

import pytest

from pykd import _codes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTRAN = os.path.join(REPO, "fortran", "core", "pykd_codes.f90")


def fortran_parameters():
    with open(FORTRAN) as f:
        text = f.read()
    params = {}
    for stmt in re.findall(r"integer, parameter ::([^\n!]*)", text):
        for name, value in re.findall(r"(\w+)\s*=\s*(-?\d+)", stmt):
            params[name] = int(value)
    return params


F = fortran_parameters()


def group(prefix, exclude=()):
    return {k[len(prefix):]: v for k, v in F.items() if k.startswith(prefix) and k not in exclude}


def test_the_fortran_file_was_parsed():
    assert len(F) > 40


def test_status_codes_agree():
    got = group("PYKD_ERR_")
    got["OK"] = F["PYKD_OK"]
    assert got == _codes.STATUS


def test_activation_codes_agree():
    assert {k.lower(): v for k, v in group("ACT_", exclude=("ACT_MAX",)).items()} == _codes.ACTIVATIONS
    assert F["ACT_MAX"] == max(_codes.ACTIVATIONS.values())


def test_kind_codes_agree():
    assert {k.lower(): v for k, v in group("KIND_", exclude=("KIND_MAX",)).items()} == _codes.KINDS
    assert F["KIND_MAX"] == max(_codes.KINDS.values())


def test_norm_and_quant_codes_agree():
    assert {k.lower(): v for k, v in group("NORM_").items()} == _codes.NORMS
    assert {k.lower(): v for k, v in group("QUANT_").items()} == _codes.QUANT_MODES


def test_loss_codes_agree():
    assert {k.lower(): v for k, v in group("LOSS_", exclude=("LOSS_MAX",)).items()} == _codes.LOSSES
    assert F["LOSS_MAX"] == max(_codes.LOSSES.values())


def test_table_columns_agree():
    cols = {k.lower(): v - 1 for k, v in group("COL_").items()}   # Fortran rows are 1-based
    assert cols == _codes.COL
    assert F["N_FIELDS"] == _codes.N_FIELDS == len(_codes.TABLE_FIELDS)


def test_format_versions_agree():
    assert (F["FORMAT_VERSION_MIN"], F["FORMAT_VERSION"]) == (min(_codes.FORMAT_VERSIONS),
                                                              _codes.FORMAT_VERSION)


@pytest.mark.parametrize("path", ["pykd", "fortran"])
def test_no_bare_status_comparisons(path):
    """Python never writes `stat == 3`: it names the code."""
    bad = []
    for root, _, files in os.walk(os.path.join(REPO, path)):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    for i, line in enumerate(f, 1):
                        if re.search(r"\bstat\w*\s*[!=]=\s*[1-9]\b", line):
                            bad.append(f"{name}:{i}: {line.strip()}")
    assert not bad, "bare status numbers:\n" + "\n".join(bad)


def test_the_c_kernels_copies_of_the_activation_codes_agree():
    """The C kernels fuse identity and relu and keep their own copies of
    those two codes (an enum or a #define); each copy must be Fortran's."""
    found = 0
    kernels = os.path.join(REPO, "fortran", "kernels")
    for name in sorted(os.listdir(kernels)):
        if not name.endswith(".c"):
            continue
        with open(os.path.join(kernels, name)) as f:
            text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)   # not the comments
        copies = re.findall(r"\b(ACT_[A-Z]+)\s*=\s*(\d+)", text)
        copies += re.findall(r"#define\s+(ACT_[A-Z]+)\s+(\d+)", text)
        for code, value in copies:
            assert F[code] == int(value), (name, code, value)
            found += 1
    assert found >= 3    # pykd_dense_simd.c's two, pykd_int8_simd.c's one
