!> The MPI build (-Dmpi=true), run by meson under `mpirun -np 1|2|3`: the
!! deterministic sum against its fixed association computed locally, the
!! parameter checksum against zlib's CRC-32 and a diverged rank, and the
!! data-parallel step against the one-process step mlp_train_step on the
!! whole global batch (every rank computes that reference itself): the same
!! bits with one rank, SGD parameters to 1e-4 relative after 20 steps with
!! more, every rank the same bits, a failing rank failing every rank.
program test_mpi
  use iso_fortran_env, only: real32, real64, int8, int32, int64
  use mpi_f08, only: MPI_Comm, MPI_COMM_WORLD, MPI_Init, MPI_Finalize, MPI_Comm_rank, &
                     MPI_Comm_size, MPI_Bcast, MPI_Allreduce, MPI_REAL, MPI_LOGICAL, MPI_LAND
  use pykd, only: train_config, mlp_param_count, mlp_workspace_size, mlp_train_step, &
                  pykd_mpi_sum, pykd_mpi_checksum, pykd_mpi_train_step, OPT_SGD, OPT_ADAM, &
                  LOSS_CE, PYKD_OK, PYKD_ERR_MPI, PYKD_ERR_LABEL
  use pykd_crc32, only: crc32
  use test_harness, only: check, finish
  implicit none
  type(MPI_Comm) :: comm
  integer :: rank, nranks, ierr
  character(len=16) :: tag

  call MPI_Init(ierr)
  comm = MPI_COMM_WORLD
  call MPI_Comm_rank(comm, rank, ierr)
  call MPI_Comm_size(comm, nranks, ierr)
  write (tag, '(a, i0, a, i0, a)') '[', rank, '/', nranks, '] '

  call test_sum()
  call test_checksum()
  call test_step(OPT_SGD, 0.0)
  call test_step(OPT_SGD, 0.2)
  call test_step(OPT_ADAM, 0.0)
  call test_failing_rank()
  call test_empty_shard()

  call MPI_Finalize(ierr)
  call finish('Fortran MPI')

contains

  !> A value of rank r at index i whose float32 sums round.
  elemental real(real32) function val(r, i)
    integer, intent(in) :: r
    integer(int64), intent(in) :: i
    val = real(sin(real(i, real64) * 0.7_real64 + r * 1.3_real64) * 10.0_real64**mod(i + r, 5_int64), real32)
  end function val

  !> The sum's association, written out: the partial sum of ranks lo .. hi - 1
  !! (hi - lo a power of two, clipped at nranks) is the left half's plus the right half's.
  recursive function tree(lo, width, i) result(s)
    integer, intent(in) :: lo, width
    integer(int64), intent(in) :: i
    real(real32) :: s
    if (width == 1) then
      s = val(lo, i)
    else if (lo + width / 2 >= nranks) then
      s = tree(lo, width / 2, i)
    else
      s = tree(lo, width / 2, i) + tree(lo + width / 2, width / 2, i)
    end if
  end function tree

  logical function all_ranks(ok)
    logical, intent(in) :: ok
    integer :: e
    call MPI_Allreduce(ok, all_ranks, 1, MPI_LOGICAL, MPI_LAND, comm, e)
  end function all_ranks

  !> Every rank holds exactly rank 0's bits of a.
  logical function same_bits(a)
    real(real32), intent(in) :: a(:)
    real(real32), allocatable :: r0(:)
    integer :: e
    integer :: i
    logical :: ok
    r0 = a
    call MPI_Bcast(r0, size(r0), MPI_REAL, 0, comm, e)
    ok = .true.
    do i = 1, size(a)
      ok = ok .and. transfer(a(i), 0_int32) == transfer(r0(i), 0_int32)
    end do
    same_bits = all_ranks(ok)
  end function same_bits

  subroutine test_sum()
    integer(int64), parameter :: n = 2_int64**20 + 37     ! two chunks
    real(real32), allocatable :: buf(:), want(:)
    integer(int64) :: i
    integer :: stat, width
    logical :: ok
    allocate (buf(n), want(n))
    width = 1
    do while (width < nranks)
      width = 2 * width
    end do
    do i = 1, n
      buf(i) = val(rank, i)
      want(i) = tree(0, width, i)
    end do
    call pykd_mpi_sum(buf, comm, stat)
    ok = stat == PYKD_OK
    do i = 1, n
      ok = ok .and. transfer(buf(i), 0_int32) == transfer(want(i), 0_int32)
    end do
    call check(all_ranks(ok), trim(tag)//'pykd_mpi_sum: the fixed tree association, bit for bit, over 2 chunks')
    call check(same_bits(buf), trim(tag)//'pykd_mpi_sum: every rank the same bits')
  end subroutine test_sum

  subroutine test_checksum()
    real(real32) :: p(1000)
    integer(int32) :: c
    integer :: stat, i
    character(len=200) :: msg
    p = [(real(i, real32) / 7, i = 1, 1000)]
    call pykd_mpi_checksum(p, comm, c, stat, msg)
    call check(all_ranks(stat == PYKD_OK .and. c == crc32(transfer(p, [0_int8]))), &
               trim(tag)//'pykd_mpi_checksum: equal ranks pass; zlib CRC-32 of the bytes')
    if (nranks > 1) then
      if (rank == nranks - 1) p(500) = nearest(p(500), 1.0)   ! one bit on the last rank
      call pykd_mpi_checksum(p, comm, c, stat, msg)
      call check(all_ranks(stat == PYKD_ERR_MPI .and. index(msg, 'diverged') > 0), &
                 trim(tag)//'pykd_mpi_checksum: one bit off on one rank fails every rank')
    end if
  end subroutine test_checksum

  !> The data: sample j of the global stream, features and label from j only.
  subroutine sample_batch(step, nb, x, y)
    integer, intent(in) :: step, nb
    real(real32), intent(out) :: x(:, :)
    integer(int64), intent(out) :: y(:)
    integer :: j, k
    do j = 1, nb
      do k = 1, size(x, 1)
        x(k, j) = real(sin(0.37_real64 * k + 1.1_real64 * (step * nb + j)), real32)
      end do
      y(j) = mod(step * 7 + j * 3, 4)
    end do
  end subroutine sample_batch

  subroutine test_step(optimizer, dropout)
    integer, intent(in) :: optimizer
    real(real32), intent(in) :: dropout
    integer, parameter :: sizes(4) = [12, 16, 8, 4], acts(3) = [1, 1, 0], nb = 30, steps = 20
    real(real32), allocatable :: p(:), g(:), s1(:), s2(:), w(:), rp(:), rg(:), rs1(:), rs2(:), rw(:)
    real(real32) :: x(12, nb), loss, rloss, lerr
    integer(int64) :: y(nb), step
    integer :: np, t, lo, hi, nc, rnc, stat, rstat, i
    type(train_config) :: cfg
    character(len=200) :: msg
    logical :: ok, loss_ok
    character(len=80) :: what

    cfg%loss = LOSS_CE; cfg%optimizer = optimizer; cfg%dropout = dropout; cfg%seed = 11
    cfg%lr = merge(0.05, 0.01, optimizer == OPT_SGD); cfg%momentum = 0.9
    np = int(mlp_param_count(sizes, 0, 0))
    allocate (p(np), g(np), s1(np), s2(np), rg(np), rs1(np), rs2(np))
    p = [(real(sin(0.3_real64 * i), real32) * 0.3, i = 1, np)]
    rp = p; s1 = 0; s2 = 0; rs1 = 0; rs2 = 0
    allocate (w(mlp_workspace_size(sizes, nb, 0)), rw(mlp_workspace_size(sizes, nb, 0)))
    ! Uneven shards: rank r holds rows lo .. hi of each batch of nb.
    lo = rank * nb / nranks + 1; hi = (rank + 1) * nb / nranks
    ok = .true.; loss_ok = .true.; lerr = 0
    do t = 1, steps
      step = t
      call sample_batch(t, nb, x, y)
      call mlp_train_step(sizes, acts, rp, rg, rs1, rs2, x, y, cfg, step, rw, rloss, rnc, stat=rstat)
      call pykd_mpi_train_step(comm, sizes, acts, p, g, s1, s2, x(:, lo:hi), y(lo:hi), cfg, step, w, &
                               loss, nc, stat=stat, errmsg=msg)
      ok = ok .and. stat == PYKD_OK .and. rstat == PYKD_OK .and. nc == rnc
      lerr = max(lerr, abs(loss - rloss) / abs(rloss))
    end do
    write (what, '(a, i0, a, f3.1)') 'step (optimizer ', optimizer, ', dropout ', dropout
    call check(all_ranks(ok), trim(tag)//trim(what)//'): 20 steps succeed, global n_correct')
    if (nranks == 1) then
      call check(all(transfer(p, [0_int32]) == transfer(rp, [0_int32])) .and. lerr == 0, &
                 trim(tag)//trim(what)//'): 1 rank = mlp_train_step bit for bit')
    else if (optimizer == OPT_SGD) then
      call check(all_ranks(maxval(abs(p - rp)) <= 1e-4 * maxval(abs(rp))), &
                 trim(tag)//trim(what)//'): SGD parameters within 1e-4 relative of 1 process')
    end if
    call check(all_ranks(lerr <= 1e-5), trim(tag)//trim(what)//'): losses within 1e-5 relative')
    call check(same_bits(p) .and. same_bits(s1) .and. same_bits(s2), &
               trim(tag)//trim(what)//'): params and optimizer state the same bits on every rank')
  end subroutine test_step

  subroutine test_failing_rank()
    integer, parameter :: sizes(3) = [6, 5, 3], acts(2) = [1, 0], nb = 8
    real(real32) :: p(53), g(53), s1(53), s2(53), w(mlp_workspace_size(sizes, nb, 0)), x(6, nb), loss, p0(53)
    integer(int64) :: y(nb)
    integer :: stat, nc, i, lo, hi
    type(train_config) :: cfg
    character(len=200) :: msg
    p = [(0.01 * i, i = 1, 53)]; p0 = p; s1 = 0; s2 = 0
    x = 0.5; y = 1
    if (rank == nranks - 1) y = 9                   ! a label outside the 3 classes
    lo = rank * nb / nranks + 1; hi = (rank + 1) * nb / nranks
    call pykd_mpi_train_step(comm, sizes, acts, p, g, s1, s2, x(:, lo:hi), y(lo:hi), cfg, 1_int64, w, &
                             loss, nc, stat=stat, errmsg=msg)
    call check(all_ranks(stat /= PYKD_OK .and. all(p == p0) .and. all(s1 == 0)), &
               trim(tag)//'a bad label on the last rank: every rank fails, nobody updates')
    if (nranks > 1 .and. rank == 0) call check(index(msg, 'rank') > 0, trim(tag)//'the message names the rank: '//trim(msg))
  end subroutine test_failing_rank

  subroutine test_empty_shard()
    integer, parameter :: sizes(3) = [6, 5, 3], acts(2) = [1, 0], nb = 8
    real(real32) :: p(53), g(53), s1(53), s2(53), w(mlp_workspace_size(sizes, nb, 0)), x(6, nb)
    real(real32) :: rp(53), rg(53), rs1(53), rs2(53), loss, rloss
    integer(int64) :: y(nb)
    integer :: stat, nc, rnc, i, n_mine
    type(train_config) :: cfg
    p = [(0.01 * i, i = 1, 53)]; rp = p; s1 = 0; s2 = 0; rs1 = 0; rs2 = 0
    x = reshape([(real(mod(i, 7), real32) / 7, i = 1, 6 * nb)], [6, nb])
    y = [(mod(i, 3), i = 1, nb)]
    n_mine = merge(nb, 0, rank == 0)               ! rank 0 holds the whole batch
    call mlp_train_step(sizes, acts, rp, rg, rs1, rs2, x, y, cfg, 1_int64, w, rloss, rnc)
    call pykd_mpi_train_step(comm, sizes, acts, p, g, s1, s2, x(:, 1:n_mine), y(1:n_mine), cfg, 1_int64, &
                             w, loss, nc, stat=stat)
    call check(all_ranks(stat == PYKD_OK .and. all(transfer(p, [0_int32]) == transfer(rp, [0_int32])) &
                         .and. loss == rloss .and. nc == rnc), &
               trim(tag)//'ranks with no samples: the bits of one process')
  end subroutine test_empty_shard

end program test_mpi
