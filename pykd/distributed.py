"""Data-parallel training over MPI: a thin layer on mpi4py (docs/distributed.md).

mpi4py is imported only when a communicator is asked for, so pykd works
without it. :class:`Comm` wraps an mpi4py communicator with what pykd
needs, every collective nonblocking and polled against a deadline of
``timeout`` seconds (``--mpi-timeout``, default 60):

- :meth:`Comm.sum`: an in-place sum of a float32 buffer that gives every
  rank the same bits: a reduce to rank 0 along a fixed binary tree of
  point-to-point messages (so the order of the additions depends on the
  number of ranks only, not on MPI's algorithms or timing), then a
  broadcast of rank 0's result;
- :meth:`Comm.agree`: run a function on every rank; if it raises on any
  rank, every rank raises the first failing rank's exception (a bad
  argument on one rank fails on every rank with the same message);
- :meth:`Comm.check_same`: a checksum of buffers compared across ranks (a
  mismatch is :class:`RanksDivergedError` on every rank);
- :meth:`Comm.on_root`: run a function (a file write) on rank 0 only, its
  failure raised on every rank;
- faults: a collective that does not complete within ``timeout`` prints a
  message naming the rank and the operation and aborts the job with exit
  code :data:`EXIT_TIMEOUT` (3); :meth:`Comm.abort` ends the job at once
  with a message, for an exception only one rank saw.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time

import numpy as np

__all__ = ["Comm", "DEFAULT_TIMEOUT", "EXIT_ERROR", "EXIT_TIMEOUT", "MPIUnavailableError",
           "RanksDivergedError", "batch_shard", "from_environment", "launched_by_mpi", "launched_rank",
           "shard",
           "soft_labels"]

#: Seconds a collective may wait for the other ranks before the job aborts.
DEFAULT_TIMEOUT = 60.0
#: Exit code of a job aborted because a collective timed out.
EXIT_TIMEOUT = 3
#: Exit code of a job aborted because one rank raised (the others cannot know).
EXIT_ERROR = 1
#: Environment variables by which launchers tell a process its job size:
#: Open MPI, MPICH/Hydra and Intel MPI, MVAPICH, Slurm's srun with PMI.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
#: Bytes per rank of an agreement (an exception's pickle, or a small value).
_AGREE_BYTES = 8192
#: Tag of the point-to-point messages of Comm.sum's reduction tree.
_SUM_TAG = 27183


class MPIUnavailableError(RuntimeError):
    """Launched by an MPI launcher, but mpi4py cannot be imported."""


class RanksDivergedError(RuntimeError):
    """The ranks' parameters (or settings) differ: a rank diverged."""


def launched_by_mpi(environ=None):
    """The job size (>= 1) an MPI launcher set in the environment, or None
    when this process was not started by one (see ``SIZE_VARIABLES``)."""
    environ = os.environ if environ is None else environ
    for name in SIZE_VARIABLES:
        value = environ.get(name)
        if value is not None:
            try:
                return max(int(value), 1)
            except ValueError:
                continue
    return None


def launched_rank(environ=None):
    """This process's rank as the MPI launcher set it (0 without one)."""
    environ = os.environ if environ is None else environ
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK"):
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MPIUnavailableError(
            f"this process was started by an MPI launcher but mpi4py cannot be imported "
            f"({e}); install it against the system's MPI (pip install --no-binary mpi4py "
            "mpi4py, after apt-get install libopenmpi-dev) or run without mpirun") from None
    return MPI


def from_environment(timeout=DEFAULT_TIMEOUT):
    """A :class:`Comm` on ``MPI.COMM_WORLD`` when launched by mpirun (or
    another MPI launcher), else None. Imports mpi4py only in the first case."""
    if launched_by_mpi() is None:
        return None
    return Comm(_mpi().COMM_WORLD, timeout=timeout)


def shard(n, rank, size):
    """The contiguous share ``slice(lo, hi)`` of rank ``rank`` among ``size``
    ranks of ``n`` items: ``lo = rank * n // size`` (sizes differ by at most
    one; a rank may get none when n < size)."""
    return slice(rank * n // size, (rank + 1) * n // size)


def _exception_bytes(err):
    """A pickle of ``err`` that unpickles, at most _AGREE_BYTES - 16 long."""
    for candidate in (err, RuntimeError(f"{type(err).__name__}: {err}"[:_AGREE_BYTES // 2])):
        try:
            blob = pickle.dumps(candidate)
            pickle.loads(blob)
        except Exception:
            continue
        if len(blob) <= _AGREE_BYTES - 16:
            return blob
    return pickle.dumps(RuntimeError(type(err).__name__))


class Comm:
    """An mpi4py communicator with deterministic sums, agreements,
    checksums and timeouts (see the module docstring).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        Typically ``MPI.COMM_WORLD``; every rank of it must make the same
        calls in the same order.
    timeout : float
        Seconds any collective waits before the job is aborted with exit
        code :data:`EXIT_TIMEOUT`.
    """

    def __init__(self, comm, timeout=DEFAULT_TIMEOUT):
        if isinstance(comm, Comm):
            comm = comm.comm
        timeout = float(timeout)
        if not (timeout > 0 and np.isfinite(timeout)):
            raise ValueError(f"the MPI timeout must be a finite number of seconds > 0, got "
                             f"{timeout}")
        self.MPI = _mpi()
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = timeout
        #: Collectives entered so far: 0 means every other rank waits in (or
        #: heads for) its first one, an agreement, so an error can still be
        #: shared with :meth:`check` instead of aborting the job.
        self.collectives = 0
        self._partial = None          # Comm.sum's receive buffer, kept between steps

    @property
    def is_root(self):
        return self.rank == 0

    def __repr__(self):
        return f"Comm(rank {self.rank} of {self.size}, timeout {self.timeout:g} s)"

    # -- faults
    def _say(self, text):
        print(f"pykd: rank {self.rank} of {self.size}: {text}", file=sys.stderr, flush=True)

    def abort(self, message, code=EXIT_ERROR):
        """Print ``message`` (naming this rank) and end the whole job with
        exit code ``code`` (MPI_Abort): for an error the other ranks cannot
        see, which would otherwise leave them waiting."""
        self._say(message)
        sys.stderr.flush()
        sys.stdout.flush()
        self.comm.Abort(int(code))

    def _wait(self, request, what):
        """Complete ``request``, polling; abort with EXIT_TIMEOUT after ``timeout`` s."""
        self.collectives += 1
        start = time.monotonic()
        deadline = start + self.timeout
        polls, slow = 0, False
        while not request.Test():
            polls += 1
            if slow or polls & 63 == 0:
                now = time.monotonic()
                if now > deadline:
                    self.abort(f"{what} did not complete within the MPI timeout of "
                               f"{self.timeout:g} s (--mpi-timeout): another rank died, hangs "
                               "or is elsewhere in the program; aborting the job",
                               EXIT_TIMEOUT)
                # Test() drives MPI's progress (a large message moves in
                # fragments), so poll busily at first; a rank that waits for
                # a slower one then yields its core between polls.
                slow = now - start > 0.05
                if slow:
                    time.sleep(1e-4)

    # -- collectives
    def sum(self, buf, what="the gradient sum"):
        """Sum the C-contiguous float32 (or float64) buffer ``buf`` over the
        ranks, in place; every rank ends with the same bits. Returns ``buf``.

        The reduction is a binomial tree of point-to-point messages: in round
        k = 1, 2, 4, ... rank r with r % 2k == 0 adds the partial sum of rank
        r + k to its own (``own + theirs``), so rank 0's result is the same
        tree of additions for a given number of ranks, however MPI schedules
        the messages; rank 0 then broadcasts it. (MPI_Allreduce promises
        neither the order nor the same bits on every rank, and Open MPI's
        nonblocking MPI_Ireduce was ten times slower than this on 9.6 MB.)
        """
        if self.size == 1:
            return buf
        partial = self._partial
        if partial is None or partial.shape != buf.shape or partial.dtype != buf.dtype:
            partial = self._partial = np.empty_like(buf)
        r, k = self.rank, 1
        while k < self.size:
            if r % (2 * k):                      # send the partial sum up, done
                self._wait(self.comm.Isend(buf, dest=r - k, tag=_SUM_TAG), what)
                break
            if r + k < self.size:
                self._wait(self.comm.Irecv(partial, source=r + k, tag=_SUM_TAG), what)
                np.add(buf, partial, out=buf)
            k *= 2
        self._wait(self.comm.Ibcast(buf, root=0), what + " (broadcast)")
        return buf

    def barrier(self, what="a barrier"):
        """Wait until every rank got here (or abort after ``timeout``)."""
        if self.size > 1:
            self._wait(self.comm.Ibarrier(), what)

    def _allgather_bytes(self, blob, what):
        """Every rank's ``blob`` (<= _AGREE_BYTES - 8 bytes), in rank order."""
        send = np.zeros(_AGREE_BYTES, np.uint8)
        send[:8] = np.frombuffer(np.int64(len(blob)).tobytes(), np.uint8)
        send[8:8 + len(blob)] = np.frombuffer(blob, np.uint8)
        recv = np.empty((self.size, _AGREE_BYTES), np.uint8)
        self._wait(self.comm.Iallgather(send, recv), what)
        out = []
        for row in recv:
            k = int(row[:8].view(np.int64)[0])
            out.append(row[8:8 + k].tobytes())
        return out

    def check(self, error=None, value=None, what="agreeing on the run's arguments"):
        """The agreement collective: every rank passes the exception it met
        (or None). If any rank failed, every rank raises the exception of the
        lowest failing rank (marked ``exc.mpi_collective = True``, with
        ``exc.mpi_rank``). Otherwise returns rank 0's ``value`` (small and
        picklable) on every rank."""
        if error is not None:
            blob = b"E" + _exception_bytes(error)
        else:
            blob = b"V" + pickle.dumps(value if self.rank == 0 else None)
            if len(blob) > _AGREE_BYTES - 16:
                raise ValueError("Comm.check: the value is too large to agree on")
        if self.size == 1:
            parts = [blob]
        else:
            parts = self._allgather_bytes(blob, what)
        for r, part in enumerate(parts):
            if part[:1] == b"E":
                exc = error if r == self.rank else pickle.loads(part[1:])
                exc.mpi_collective = True
                exc.mpi_rank = r
                raise exc
        return pickle.loads(parts[0][1:])

    def agree(self, fn, *args, what="agreeing on the run's arguments", **kw):
        """``fn(*args, **kw)`` on every rank; if it raises on any rank, every
        rank raises the lowest failing rank's exception (see :meth:`check`).
        Returns this rank's result."""
        try:
            result = fn(*args, **kw)
        except Exception as e:
            self.check(e, what=what)
            raise                               # not reached: check raises
        self.check(None, what=what)
        return result

    def on_root(self, fn, *args, what="a write on rank 0", **kw):
        """``fn(*args, **kw)`` on rank 0 only (writing a file); its failure
        is raised on every rank. Returns rank 0's result on every rank
        (small and picklable), or None."""
        err, value = None, None
        if self.rank == 0:
            try:
                value = fn(*args, **kw)
            except Exception as e:
                err = e
        return self.check(err, value, what=what)

    def digest(self, *buffers):
        """A 16-byte BLAKE2b checksum of the buffers' bytes."""
        h = hashlib.blake2b(digest_size=16)
        for b in buffers:
            h.update(memoryview(np.ascontiguousarray(b)).cast("B"))
        return h.digest()

    def check_same(self, *buffers, what="the parameters"):
        """Compare a checksum of ``buffers`` across the ranks; a mismatch is
        :class:`RanksDivergedError` on every rank, naming the ranks that
        differ from rank 0."""
        if self.size == 1:
            return
        mine = self.digest(*buffers)
        parts = self._allgather_bytes(mine, f"comparing {what} across ranks")
        bad = [r for r, d in enumerate(parts) if d != parts[0]]
        if bad:
            err = RanksDivergedError(
                f"{what} differ across MPI ranks (rank{'s' if len(bad) > 1 else ''} "
                f"{', '.join(map(str, bad))} against rank 0): the ranks diverged, or were "
                "given different inputs; every rank must get the same data, model and "
                "settings")
            err.mpi_collective = True
            raise err

    def allgather_rows(self, local, bounds, what="gathering rows"):
        """One array of every rank's rows on every rank: ``local`` holds rows
        ``bounds[rank]`` (a slice) of the result, float32 or float64."""
        n_total = max(b.stop for b in bounds)
        out = np.empty((n_total,) + local.shape[1:], local.dtype)
        if self.size == 1:
            out[...] = local
            return out
        row = int(np.prod(local.shape[1:], dtype=np.int64))
        counts = [(b.stop - b.start) * row for b in bounds]
        displs = [b.start * row for b in bounds]
        dtype = self.MPI.FLOAT if local.dtype == np.float32 else self.MPI.DOUBLE
        self._wait(self.comm.Iallgatherv(local, [out, counts, displs, dtype]), what)
        return out


def batch_shard(n, batch_size, rank, size):
    """Rank ``rank``'s contiguous share of ``n`` rows cut at multiples of
    ``batch_size`` (so its batches are those one process would run, and
    give the same bits)."""
    b = shard(-(-n // batch_size), rank, size)
    return slice(min(b.start * batch_size, n), min(b.stop * batch_size, n))


def soft_labels(comm, teacher, X, *, batch_size=4096, backend=None, out=None):
    """Teacher logits of ``X`` (unscaled), each rank computing its share
    (:func:`batch_shard`); the same bits as one process.

    With ``out=None`` the shares are gathered into one (n, classes) float32
    array, returned on every rank. With ``out`` a path, they are written
    into one ``.npy`` file and never gathered: rank 0 creates a temporary
    ``.npy`` beside ``out`` (header and size, memory-mapped), every rank
    writes its rows into it through a memory map, and after all have flushed
    rank 0 fsyncs it and renames it over ``out`` (the ranks must share the
    file system). Returns the shape then.
    """
    comm = comm if isinstance(comm, Comm) else Comm(comm)
    n = X.shape[0]
    bounds = [batch_shard(n, batch_size, r, comm.size) for r in range(comm.size)]
    mine = bounds[comm.rank]

    def compute(dst):
        for s in range(mine.start, mine.stop, batch_size):
            e = min(s + batch_size, mine.stop)
            dst[s - mine.start:e - mine.start] = teacher.forward(
                X[s:e], batch_size=batch_size, backend=backend)

    if out is None:
        local = np.empty((mine.stop - mine.start, teacher.n_outputs), np.float32)
        comm.agree(compute, local, what="computing the soft labels")
        return comm.allgather_rows(local, bounds, what="gathering the soft labels")
    shape = (n, teacher.n_outputs)
    tmp = comm.on_root(_create_npy, out, shape, what="creating the soft-label file on rank 0")
    try:
        def write_mine():
            mm = np.lib.format.open_memmap(tmp, mode="r+")
            if mm.shape != shape or mm.dtype != np.float32:
                raise OSError(f"{tmp}: the file rank 0 created has shape {mm.shape}, not "
                              f"{shape} (do the ranks share the file system?)")
            compute(mm[mine])
            mm.flush()
            del mm
        comm.agree(write_mine, what="writing the soft labels")
        comm.on_root(_publish, tmp, out, what="renaming the soft-label file on rank 0")
    except BaseException:
        if comm.is_root:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    return shape


def _create_npy(path, shape):
    """A temporary float32 .npy of ``shape`` beside ``path`` (header, then
    the rows, their space allocated); returns its name."""
    from . import io as _io
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _io.remove_stale_tmp(path)
    while True:     # the name pattern of pykd.io.atomic_write, so stale files get removed
        tmp = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        if not os.path.exists(tmp):
            break
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    mm.flush()
    del mm
    return tmp


def _publish(tmp, path):
    """fsync ``tmp``, rename it over ``path`` and fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
