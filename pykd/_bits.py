"""Bit streams of the model file (docs/format.md, *Bit streams*), vectorized.

Bit ``t`` of a stream is bit ``t % 8`` (least significant first) of byte
``t // 8``; a stream is exactly ``ceil(bits used / 8)`` bytes and the unused
high bits of its last byte are 0.

* :func:`pack` / :func:`unpack`: fixed-width fields of 1 to 8 bits (the
  indices of a codebook layer, the codes of a sparse codebook layer).
* :func:`rice_encode` / :func:`rice_decode`: the Rice-coded position gaps of
  a sparse codebook layer; :func:`positions_to_gaps`,
  :func:`gaps_to_positions` and :func:`best_rice_k` go with them.

Every decoder here raises ``ValueError`` on a malformed stream (the model
reader turns it into ``ModelFormatError``); none of them loops per element
in Python, and none allocates more than a small multiple of its input.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "best_rice_k", "check_padding", "gaps_to_positions", "pack", "packed_len",
    "positions_to_gaps", "rice_decode", "rice_encode", "rice_nbits", "unpack",
]

#: Largest Rice parameter the format allows.
MAX_RICE_K = 31


def packed_len(count: int, bits: int) -> int:
    """Bytes of a stream of ``count`` fields of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def check_padding(packed: np.ndarray, nbits: int) -> None:
    """Raise ``ValueError`` unless ``packed`` is exactly ``ceil(nbits / 8)`` bytes
    with its unused high bits 0."""
    need = (int(nbits) + 7) // 8
    if packed.shape != (need,):
        raise ValueError(f"stream must be exactly {need} bytes for {nbits} bits, "
                         f"got {packed.size}")
    used = int(nbits) % 8
    if used and int(packed[-1]) >> used:
        raise ValueError(f"the unused high {8 - used} bits of the stream's last byte are not 0")


def pack(values, bits: int) -> np.ndarray:
    """Pack ``values`` (uint8, each ``< 2**bits``) into an LSB-first bit stream.

    Parameters
    ----------
    values : ndarray of uint8, 1-D
        The fields, in stream order.
    bits : int
        Field width, 1 to 8.

    Returns
    -------
    ndarray of uint8, shape (ceil(len(values) * bits / 8),)

    Raises
    ------
    TypeError
        If ``values`` is not a 1-D uint8 array.
    ValueError
        If ``bits`` is outside 1..8 or a value does not fit in ``bits`` bits.
    """
    bits = _check_bits(bits)
    if not isinstance(values, np.ndarray) or values.dtype != np.uint8 or values.ndim != 1:
        raise TypeError("values must be a 1-D numpy array of dtype uint8")
    if bits < 8 and values.size and int(values.max()) >> bits:
        raise ValueError(f"values must be < 2**{bits} = {1 << bits}, got {int(values.max())}")
    if bits == 8:
        return values.copy()
    # One byte per bit, then packbits: bits * len(values) bytes of scratch.
    stream = np.empty(values.size * bits, np.uint8)
    for m in range(bits):
        np.bitwise_and(values >> m, 1, out=stream[m::bits])
    return np.packbits(stream, bitorder="little")


def unpack(packed, bits: int, count: int) -> np.ndarray:
    """The ``count`` fields of ``bits`` bits in the LSB-first stream ``packed``.

    Parameters
    ----------
    packed : ndarray of uint8, 1-D, or bytes-like
        Exactly ``ceil(count * bits / 8)`` bytes, unused high bits 0.
    bits : int
        Field width, 1 to 8.
    count : int
        Number of fields.

    Returns
    -------
    ndarray of uint8, shape (count,)

    Raises
    ------
    ValueError
        If the length is not exactly right or the padding bits are not 0.
    """
    bits = _check_bits(bits)
    packed = np.frombuffer(packed, np.uint8) if not isinstance(packed, np.ndarray) else packed
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError("packed must be a 1-D uint8 array")
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    check_padding(packed, count * bits)
    if bits == 8:
        return packed.copy()
    out = np.zeros(count, np.uint8)
    if 8 % bits == 0:
        # Whole fields per byte: field m of every byte, by one shift each.
        per, mask = 8 // bits, np.uint8((1 << bits) - 1)
        for m in range(per):
            n = len(range(m, count, per))
            np.bitwise_and(packed[:n] >> np.uint8(m * bits), mask, out=out[m::per])
        return out
    stream = np.unpackbits(packed, bitorder="little")
    for m in range(bits):
        out |= stream[m : count * bits : bits] << np.uint8(m)
    return out


# --------------------------------------------------------------------------
# Rice codes of position gaps


def positions_to_gaps(positions) -> np.ndarray:
    """Gaps ``g_0 = p_0``, ``g_k = p_k - p_(k-1) - 1`` of strictly increasing
    positions ``p`` (int64, >= 0)."""
    p = np.asarray(positions, dtype=np.int64)
    if p.ndim != 1:
        raise ValueError("positions must be 1-D")
    if p.size == 0:
        return p.copy()
    gaps = np.empty_like(p)
    gaps[0] = p[0]
    np.subtract(p[1:], p[:-1], out=gaps[1:])
    gaps[1:] -= 1
    if (gaps < 0).any():
        raise ValueError("positions must be >= 0 and strictly increasing")
    return gaps


def gaps_to_positions(gaps) -> np.ndarray:
    """Inverse of :func:`positions_to_gaps`: ``p_k = sum(g_0..g_k) + k`` (int64)."""
    g = np.asarray(gaps, dtype=np.int64)
    return np.cumsum(g + 1) - 1


def rice_nbits(gaps, k: int) -> int:
    """Bits of the Rice code of ``gaps`` (int64, >= 0) with parameter ``k``."""
    g = np.asarray(gaps, dtype=np.int64)
    return int((g >> k).sum(dtype=np.int64)) + g.size * (k + 1)


def best_rice_k(gaps) -> int:
    """The Rice parameter (0..31) that codes ``gaps`` in the fewest bytes;
    ties go to the smallest ``k`` (the writers' canonical choice)."""
    g = np.asarray(gaps, dtype=np.int64)
    ks = np.arange(MAX_RICE_K + 1, dtype=np.int64)
    unary = np.zeros(ks.size, np.int64)          # sum(g >> k) for every k, 4096 gaps at a time
    for a in range(0, g.size, 4096):
        unary += (g[a : a + 4096, None] >> ks).sum(axis=0)
    nbytes = (unary + g.size * (ks + 1) + 7) // 8
    return int(np.argmin(nbytes))                # the first minimum: ties go to the smallest k


def rice_encode(gaps, k: int) -> tuple[np.ndarray, int]:
    """Rice-code ``gaps``: per gap ``g >> k`` one-bits, a zero-bit, then the low
    ``k`` bits of ``g``, least significant first.

    Parameters
    ----------
    gaps : array_like of int64, 1-D, each >= 0
    k : int
        Rice parameter, 0..31.

    Returns
    -------
    data : ndarray of uint8
        The stream, ``ceil(nbits / 8)`` bytes with zero padding.
    nbits : int
        Bits used.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= MAX_RICE_K:
        raise ValueError(f"rice_k must be an integer in 0..{MAX_RICE_K}, got {k!r}")
    k = int(k)
    g = np.asarray(gaps, dtype=np.int64)
    if g.ndim != 1 or (g.size and int(g.min()) < 0):
        raise ValueError("gaps must be a 1-D array of non-negative integers")
    q = g >> k
    lengths = q + (k + 1)
    ends = np.cumsum(lengths)                   # one past each code
    nbits = int(ends[-1]) if g.size else 0
    starts = ends - lengths
    term = starts + q                           # the terminating zero-bit
    # The unary one-bits as a running sum of +1 at each start, -1 at each terminator.
    step = np.zeros(nbits + 1, np.int8)
    has_ones = q > 0
    step[starts[has_ones]] = 1
    step[term[has_ones]] = -1
    stream = np.cumsum(step[:nbits], dtype=np.int8).view(np.uint8)
    for m in range(k):
        stream[term + 1 + m] = (g >> m) & 1
    return np.packbits(stream, bitorder="little"), nbits


def rice_decode(data, k: int, count: int, max_value: int) -> np.ndarray:
    """Decode ``count`` Rice-coded gaps (parameter ``k``) from ``data``.

    The positions they stand for (:func:`gaps_to_positions`) must all be
    ``< max_value``, and the stream must be exactly as long as the codes need
    (no whole unused byte, zero padding).

    Parameters
    ----------
    data : ndarray of uint8 or bytes-like
    k : int
        Rice parameter, 0..31.
    count : int
        Number of codes.
    max_value : int
        Bound on the decoded positions (exclusive).

    Returns
    -------
    ndarray of int64, shape (count,)
        The gaps.

    Raises
    ------
    ValueError
        If the stream runs out, a position is ``>= max_value``, the stream
        has a whole unused byte or nonzero padding bits.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= MAX_RICE_K:
        raise ValueError(f"rice_k must be an integer in 0..{MAX_RICE_K}, got {k!r}")
    k, count, max_value = int(k), int(count), int(max_value)
    data = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    nbits_avail = 8 * data.size
    if count == 0:
        if data.size:
            raise ValueError(f"position stream has {data.size} unused bytes (no codes)")
        return np.zeros(0, np.int64)
    if count * (k + 1) > nbits_avail:  # every code takes at least k + 1 bits
        raise ValueError(f"position stream runs out: {count} codes with rice_k = {k} need at "
                         f"least {count * (k + 1)} bits, the stream has {nbits_avail}")
    stream = np.unpackbits(data, bitorder="little")
    term = _terminators(stream, k, count)       # the zero-bit ending each code
    end = int(term[-1]) + 1 + k
    if end > nbits_avail:
        raise ValueError(f"position stream runs out in the last code's {k} low bits")
    # q_i = term_i - term_(i-1) - (k + 1), with term_(-1) = -(k + 1).
    gaps = np.empty(count, np.int64)
    gaps[0] = int(term[0]) + k + 1
    np.subtract(term[1:], term[:-1], out=gaps[1:], dtype=np.int64)
    gaps -= k + 1
    if int(gaps.max()) > (max_value - 1) >> k:
        raise ValueError(f"a decoded position is >= {max_value} (the number of weights)")
    gaps <<= k
    if k:
        term = term + 1                         # a copy: term may be a view of zeros
    for m in range(k):                          # the low k bits, least significant first
        gaps |= np.left_shift(stream[term], m, dtype=np.int64)
        term += 1
    del term
    # The last position is sum(gaps) + count - 1. Every gap is < 2**62; the float
    # sum guards the exact int64 sum against overflow.
    if float(np.sum(gaps, dtype=np.float64)) > 2.0**62 or \
            int(gaps.sum()) + count - 1 >= max_value:
        raise ValueError(f"a decoded position is >= {max_value} (the number of weights)")
    need = (end + 7) // 8
    if need != data.size:
        raise ValueError(f"position stream has {data.size - need} unused bytes after "
                         f"the last code")
    if stream[end:].any():
        raise ValueError("position stream's padding bits after the last code are not 0")
    return gaps


_CHUNK = 1 << 16  # bits per chunk when listing zero-bits: bounded scratch


def _terminators(stream: np.ndarray, k: int, count: int) -> np.ndarray:
    """Bit offsets (int32, or int64 for huge streams) of the zero-bits that end
    the first ``count`` codes.

    A code starts ``k + 1`` bits after the previous code's terminating zero-bit,
    so the terminators form a chain ``j -> next(j)`` over the zero-bits. For
    ``k = 0`` every zero-bit ends a code; otherwise the chain from the first
    zero-bit is listed by pointer doubling: ``O(z log count)`` work and
    ``O(z)`` memory for ``z`` zero-bits, with no per-code Python loop.
    """
    idx = np.int32 if stream.size < 2**31 - 64 else np.int64
    nz = stream.size - int(np.count_nonzero(stream))
    zeros = np.empty(nz, idx)
    at = 0
    for a in range(0, stream.size, _CHUNK):     # chunks: no int64 array of every offset
        z = np.flatnonzero(stream[a : a + _CHUNK] == 0)
        zeros[at : at + z.size] = z + a
        at += z.size
    if k == 0:
        if nz < count:
            raise ValueError(f"position stream runs out after {nz} of {count} codes")
        return zeros[:count]
    # jump[j]: the terminator of the code after the one that zero-bit j ends;
    # nz is the sentinel "no such zero-bit" and maps to itself.
    jump = np.empty(nz + 1, idx)
    for a in range(0, nz, _CHUNK):
        jump[a : min(a + _CHUNK, nz)] = np.searchsorted(zeros, zeros[a : a + _CHUNK] + idx(k + 1))
    jump[nz] = nz
    chain = np.zeros(1, idx)                    # the first code ends at the first zero-bit
    if nz == 0:
        chain[0] = nz
    # chain holds the first 2**l terminators and jump is next applied 2**l times.
    while chain.size < count and chain[-1] != nz:
        chain = np.concatenate((chain, jump[chain[: count - chain.size]]))
        if chain.size < count:
            jump = jump[jump]
    del jump
    if chain[-1] == nz:
        raise ValueError(f"position stream runs out before code {count} of {count}")
    return zeros[chain]
