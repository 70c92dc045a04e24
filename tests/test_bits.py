"""Tests for pykd._bits: the bit streams of the model format (docs/format.md).

The references are hand-computed bytes and a string-of-bits implementation
of the spec ("bit t of the stream is bit t % 8 of byte t // 8").
"""

import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykd import _bits


def bits_to_bytes(s):
    """A string of '0'/'1' (bit 0 first) as the stream's bytes, zero padded."""
    s += "0" * (-len(s) % 8)
    return bytes(int(s[i : i + 8][::-1], 2) for i in range(0, len(s), 8))


def ref_pack(values, bits):
    return bits_to_bytes("".join(format(int(v), f"0{bits}b")[::-1] for v in values))


def ref_rice(gaps, k):
    s = "".join("1" * (g >> k) + "0" + "".join(str((g >> m) & 1) for m in range(k))
                for g in map(int, gaps))
    return bits_to_bytes(s), len(s)


U8 = np.uint8


# --------------------------------------------------------------------------
# Fixed-width fields


@pytest.mark.parametrize("bits, values, expected", [
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0x8D, 0x01]),
    (2, [3, 0, 1, 2], [0x93]),
    (2, [0, 1, 2, 2, 1, 0], [0xA4, 0x01]),           # the codebook example of test_modelfile
    (3, [5, 3, 7], [0xDD, 0x01]),
    (4, [0xA, 0x5, 0xF], [0x5A, 0x0F]),
    (5, [31, 1], [0x3F, 0x00]),
    (6, [0x3F, 0x2A], [0xBF, 0x0A]),
    (7, [0x7F, 0x00, 0x01], [0x7F, 0x40, 0x00]),
    (8, [0, 255, 17], [0, 255, 17]),
    (3, [], []),
])
def test_pack_hand_computed(bits, values, expected):
    values = np.array(values, U8)
    packed = _bits.pack(values, bits)
    assert packed.dtype == U8 and packed.tolist() == expected
    assert packed.size == _bits.packed_len(values.size, bits)
    out = _bits.unpack(packed, bits, values.size)
    assert out.dtype == U8 and out.tolist() == values.tolist()
    assert out.flags.owndata and out.flags.c_contiguous
    assert _bits.unpack(bytes(expected), bits, values.size).tolist() == values.tolist()


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_matches_reference(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    packed = _bits.pack(np.array(values, U8), bits)
    assert packed.tobytes() == ref_pack(values, bits)
    assert _bits.unpack(packed, bits, len(values)).tolist() == values


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"values must be < 2\*\*3 = 8, got 8"):
        _bits.pack(np.array([1, 8], U8), 3)
    with pytest.raises(TypeError, match="uint8"):
        _bits.pack(np.array([1, 2], np.int8), 3)
    with pytest.raises(TypeError, match="1-D"):
        _bits.pack(np.zeros((2, 2), U8), 3)
    for bits in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
            _bits.pack(np.zeros(3, U8), bits)


@pytest.mark.parametrize("packed, bits, count, match", [
    ([0x93], 2, 5, "exactly 2 bytes for 10 bits, got 1"),
    ([0x93, 0x00], 2, 4, "exactly 1 bytes for 8 bits, got 2"),
    ([0xDD, 0x03], 3, 3, "the unused high 7 bits of the stream's last byte are not 0"),
    ([0x10], 4, 1, "the unused high 4 bits"),
    ([0x80], 1, 7, "the unused high 1 bits"),
    ([], 1, 1, "exactly 1 bytes for 1 bits, got 0"),
])
def test_unpack_rejects_bad_streams(packed, bits, count, match):
    with pytest.raises(ValueError, match=match):
        _bits.unpack(np.array(packed, U8), bits, count)


# --------------------------------------------------------------------------
# Rice codes


def test_positions_and_gaps():
    assert _bits.positions_to_gaps([1, 3, 8]).tolist() == [1, 1, 4]
    assert _bits.gaps_to_positions([1, 1, 4]).tolist() == [1, 3, 8]
    assert _bits.positions_to_gaps([0, 1, 2]).tolist() == [0, 0, 0]
    assert _bits.positions_to_gaps([]).size == 0 and _bits.gaps_to_positions([]).size == 0
    for bad in ([3, 3], [4, 2], [-1, 5]):
        with pytest.raises(ValueError, match="strictly increasing"):
            _bits.positions_to_gaps(bad)


@pytest.mark.parametrize("gaps, k, expected, nbits", [
    ([1, 1, 4], 1, [0x3A], 8),       # "01" "01" "1100"
    ([0], 0, [0x00], 1),
    ([3], 0, [0x07], 4),             # "1110"
    ([5], 2, [0x05], 4),             # "10" then 01 -> "1010"
    ([0, 9], 3, [0x50, 0x00], 9),    # "0000" "10" "100"
    ([], 5, [], 0),
    ([2**40], 31, [0xFF] * 64 + [0] * 4, 2**9 + 1 + 31),
])
def test_rice_hand_computed(gaps, k, expected, nbits):
    data, n = _bits.rice_encode(np.array(gaps, np.int64), k)
    assert data.dtype == U8 and n == nbits
    assert data.tolist() == expected
    assert data.tobytes() == ref_rice(gaps, k)[0]
    assert _bits.rice_nbits(gaps, k) == nbits
    got = _bits.rice_decode(data, k, len(gaps), 2**62)
    assert got.dtype == np.int64 and got.tolist() == gaps


@pytest.mark.parametrize("gaps, k", [
    ([1, 1, 4], 1), ([], 0), ([0] * 9, 0), ([0], 0), ([2], 0), ([255], 5),
])
def test_best_rice_k_hand_computed(gaps, k):
    # [255]: k=0 32 bytes; k=4 3 bytes; k=5..8 2 bytes (a tie: the smallest wins).
    assert _bits.best_rice_k(np.array(gaps, np.int64)) == k


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=40), st.integers(0, 31))
def test_rice_matches_reference(gaps, k):
    data, nbits = _bits.rice_encode(np.array(gaps, np.int64), k)
    assert (data.tobytes(), nbits) == ref_rice(gaps, k)
    assert _bits.rice_decode(data, k, len(gaps), sum(gaps) + len(gaps)).tolist() == gaps
    sizes = [len(ref_rice(gaps, kk)[0]) for kk in range(32)]
    assert _bits.best_rice_k(np.array(gaps, np.int64)) == sizes.index(min(sizes))


@pytest.mark.parametrize("data, k, count, max_value, match", [
    ([0xFF], 0, 1, 100, "runs out after 0 of 1 codes"),
    ([0xFF], 2, 1, 100, "runs out before code 1 of 1"),
    ([0x3A], 1, 5, 100, "runs out: 5 codes with rice_k = 1 need at least 10 bits"),
    ([0x3A], 1, 4, 100, "runs out"),
    ([0x00], 9, 1, 100, "runs out: 1 codes with rice_k = 9 need at least 10 bits"),
    ([0xFF, 0x0F], 4, 1, 10**6, "runs out in the last code's 4 low bits"),
    ([0x3A], 1, 3, 8, "a decoded position is >= 8"),       # positions 1, 3, 8
    ([0x07], 0, 1, 3, "a decoded position is >= 3"),       # gap 3
    ([0x3A, 0x00], 1, 3, 100, "1 unused bytes after the last code"),
    ([0x17], 0, 1, 100, "padding bits after the last code are not 0"),
    ([0x00], 0, 0, 100, "1 unused bytes"),
    ([0x00], 32, 1, 100, "rice_k must be an integer in 0..31"),
    ([0x00], -1, 1, 100, "rice_k must be"),
])
def test_rice_decode_rejects_bad_streams(data, k, count, max_value, match):
    with pytest.raises(ValueError, match=match):
        _bits.rice_decode(np.array(data, U8), k, count, max_value)


def test_rice_decode_long_unary_runs():
    ones = np.full(2**12, 0xFF, U8)
    ones[-1] = 0x7F  # one code of 2**15 - 1 one-bits, then its zero-bit
    with pytest.raises(ValueError, match="a decoded position is >= 1000"):
        _bits.rice_decode(ones, 0, 1, 1000)
    assert _bits.rice_decode(ones, 0, 1, 2**15).tolist() == [2**15 - 1]
    with pytest.raises(ValueError, match="runs out in the last code's 31 low bits"):
        _bits.rice_decode(ones, 31, 1, 2**62)
    # q << k is bounded before the shift: 2**15 - 1 ones with k = 31 from a
    # stream whose low bits are present.
    data = np.concatenate([ones, np.zeros(4, U8)])
    assert _bits.rice_decode(data, 31, 1, 2**62).tolist() == [(2**15 - 1) << 31]
    with pytest.raises(ValueError, match="a decoded position is >= "):
        _bits.rice_decode(data, 31, 1, 2**40)


def test_rice_decode_random_garbage_only_raises_value_error():
    rng = np.random.default_rng(0)
    decoded = 0
    for trial in range(3000):
        data = rng.integers(0, 256, rng.integers(0, 24)).astype(U8)
        if trial % 4 == 0:
            data[:] = rng.choice([0x00, 0xFF, 0x55, 0x01], data.size)
        k, count = int(rng.integers(0, 32)), int(rng.integers(0, 200))
        max_value = int(rng.choice([1, 7, 1000, 2**40, 2**62]))
        try:
            gaps = _bits.rice_decode(data, k, count, max_value)
        except ValueError:
            continue
        decoded += 1  # a valid stream: it must re-encode to the same bytes
        if count:
            assert _bits.gaps_to_positions(gaps)[-1] < max_value
        assert _bits.rice_encode(gaps, k)[0].tobytes() == data.tobytes()
    assert decoded > 0


@pytest.mark.parametrize("fill, k, count", [
    (0x00, 0, 8 * 2**17),          # valid: 1M zero gaps
    (0x00, 3, 2 * 2**17),          # valid
    (0xAA, 1, 4 * 2**17),          # chains through every other zero
    (0xFF, 0, 2**17),              # no terminator at all
    (0x01, 7, 2**17),
])
def test_rice_decode_time_and_memory_are_bounded(fill, k, count):
    data = np.full(2**17, fill, U8)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        _bits.rice_decode(data, k, count, 2**62)
    except ValueError:
        pass
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 160 * data.size + 2**20, peak / data.size
    assert elapsed < 5, elapsed


def test_encode_decode_a_realistic_layer_quickly():
    rng = np.random.default_rng(1)
    n = 784 * 200
    positions = np.sort(rng.choice(n, n // 10, replace=False))
    gaps = _bits.positions_to_gaps(positions)
    k = _bits.best_rice_k(gaps)
    data, nbits = _bits.rice_encode(gaps, k)
    assert k == 3 and nbits == _bits.rice_nbits(gaps, k) and data.size == -(-nbits // 8)
    assert data.size < positions.size * 6 / 8  # about 5.3 bits per non-zero at 10%
    t0 = time.perf_counter()
    got = _bits.rice_decode(data, k, gaps.size, n)
    assert time.perf_counter() - t0 < 1
    assert np.array_equal(_bits.gaps_to_positions(got), positions)
