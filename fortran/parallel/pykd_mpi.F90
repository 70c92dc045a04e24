#ifdef PYKD_MPI
!> Data-parallel training over MPI (issue 16): the MPI build of the library
!! (`meson setup -Dpython=false -Dmpi=true`, which defines PYKD_MPI; without
!! it this file compiles to nothing, so fpm and the default build need no MPI).
!!
!! Every rank holds the same parameters and optimizer state and trains on
!! its shard of each global batch: `pykd_mpi_train_step` computes the
!! shard's gradient (`mlp_gradient`), sums the gradients of all ranks with
!! `pykd_mpi_sum` and applies the same update on every rank
!! (`mlp_apply_update`), so the ranks stay identical bit for bit.
!!
!! Why not MPI_Allreduce: the standard does not promise that every rank gets
!! the same bits (an implementation may add the contributions in a different
!! order on each rank, e.g. in recursive doubling or a ring, and float sums
!! depend on the order), nor that the order is the same from run to run. The
!! sum here adds in a fixed binomial tree over the ranks' numbers on rank 0
!! (the association depends only on the number of ranks), then broadcasts
!! rank 0's bits.
module pykd_parallel
  use iso_fortran_env, only: real32, int8, int32, int64
  use mpi_f08, only: MPI_Comm, MPI_Datatype, MPI_Status, MPI_Comm_rank, MPI_Comm_size, MPI_Send, &
                     MPI_Recv, MPI_Bcast, MPI_Allreduce, MPI_Allgather, MPI_Exscan, MPI_REAL, &
                     MPI_INTEGER, MPI_INTEGER8, MPI_2INTEGER, MPI_SUM, MPI_MAXLOC, MPI_SUCCESS, &
                     MPI_STATUS_IGNORE
  use pykd_crc32, only: crc32_init, crc32_update, crc32_final
  use pykd_mlp, only: train_config, mlp_gradient, mlp_apply_update
  use pykd_status, only: PYKD_OK, PYKD_ERR_ALLOC, PYKD_ERR_MPI, set_status
  implicit none
  private
  public :: pykd_mpi_sum, pykd_mpi_checksum, pykd_mpi_train_step

  !> Elements per message of the sum (4 MiB of float32): bounds the receive
  !! buffer and keeps counts far below MPI's 32-bit limit.
  integer, parameter :: CHUNK = 2**20
  integer, parameter :: TAG_SUM = 7301

contains

  !> buf = the sum of buf over the ranks of comm, the same bits on every
  !! rank and in every run with the same number of ranks: a binomial tree to
  !! rank 0 (at distance d = 1, 2, 4, ..., rank r with mod(r, 2d) = 0 adds
  !! the partial sum of rank r + d to its own, own first), then MPI_Bcast.
  !! Collective: every rank of comm calls it with the same size(buf).
  subroutine pykd_mpi_sum(buf, comm, stat, errmsg)
    real(real32), intent(inout), contiguous :: buf(:)
    type(MPI_Comm), intent(in) :: comm
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), allocatable :: recv(:)
    integer(int64) :: lo, hi
    integer :: rank, nranks, d, ierr, cnt

    call MPI_Comm_rank(comm, rank, ierr)
    if (ierr == MPI_SUCCESS) call MPI_Comm_size(comm, nranks, ierr)
    if (ierr /= MPI_SUCCESS) then
      call set_status(PYKD_ERR_MPI, 'pykd_mpi_sum: MPI_Comm_rank/size failed', stat, errmsg)
      return
    end if
    if (nranks > 1) then
      allocate (recv(min(int(CHUNK, int64), size(buf, kind=int64))), stat=ierr)
      if (ierr /= 0) then
        call set_status(PYKD_ERR_ALLOC, 'pykd_mpi_sum: cannot allocate the receive buffer', stat, errmsg)
        return
      end if
    end if
    ierr = MPI_SUCCESS
    lo = 1
    do while (lo <= size(buf, kind=int64) .and. ierr == MPI_SUCCESS)
      hi = min(lo + CHUNK - 1, size(buf, kind=int64))
      cnt = int(hi - lo + 1)
      d = 1
      do while (d < nranks .and. ierr == MPI_SUCCESS)
        if (mod(rank, 2 * d) == d) then
          call MPI_Send(buf(lo:hi), cnt, MPI_REAL, rank - d, TAG_SUM, comm, ierr)
          exit                          ! this rank's partial sum has been handed on
        else if (mod(rank, 2 * d) == 0 .and. rank + d < nranks) then
          call MPI_Recv(recv(1:cnt), cnt, MPI_REAL, rank + d, TAG_SUM, comm, MPI_STATUS_IGNORE, ierr)
          buf(lo:hi) = buf(lo:hi) + recv(1:cnt)
        end if
        d = 2 * d
      end do
      if (ierr == MPI_SUCCESS .and. nranks > 1) call MPI_Bcast(buf(lo:hi), cnt, MPI_REAL, 0, comm, ierr)
      lo = hi + 1
    end do
    if (ierr /= MPI_SUCCESS) then
      call set_status(PYKD_ERR_MPI, 'pykd_mpi_sum: an MPI send, receive or broadcast failed', stat, errmsg)
      return
    end if
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine pykd_mpi_sum

  !> CRC-32 of the bytes of params on this rank (zlib.crc32 of the float32
  !! array's bytes, so Python computes the same number), compared across
  !! the ranks of comm: a rank whose checksum differs from rank 0's is
  !! PYKD_ERR_MPI on every rank, the message naming the first such rank.
  !! Collective; call it at every epoch and before saving.
  subroutine pykd_mpi_checksum(params, comm, checksum, stat, errmsg)
    real(real32), intent(in), contiguous :: params(:)
    type(MPI_Comm), intent(in) :: comm
    integer(int32), intent(out) :: checksum
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int32), allocatable :: all(:)
    integer(int64) :: lo, hi
    integer :: nranks, ierr, r
    character(len=160) :: msg

    checksum = crc32_init()
    lo = 1
    do while (lo <= size(params, kind=int64))   ! 1 MiB at a time: no copy of params
      hi = min(lo + CHUNK / 4 - 1, size(params, kind=int64))
      call crc32_update(checksum, transfer(params(lo:hi), [0_int8]))
      lo = hi + 1
    end do
    checksum = crc32_final(checksum)
    call MPI_Comm_size(comm, nranks, ierr)
    if (ierr /= MPI_SUCCESS) then
      call set_status(PYKD_ERR_MPI, 'pykd_mpi_checksum: MPI_Comm_size failed', stat, errmsg)
      return
    end if
    allocate (all(0:nranks - 1))
    call MPI_Allgather(checksum, 1, MPI_INTEGER, all, 1, MPI_INTEGER, comm, ierr)
    if (ierr /= MPI_SUCCESS) then
      call set_status(PYKD_ERR_MPI, 'pykd_mpi_checksum: MPI_Allgather failed', stat, errmsg)
      return
    end if
    do r = 1, nranks - 1
      if (all(r) /= all(0)) then
        write (msg, '(a, i0, a, z8.8, a, z8.8, a)') 'pykd_mpi_checksum: the ranks diverged: rank ', r, &
          ' holds parameters with CRC-32 ', all(r), ', rank 0 ', all(0), ''
        call set_status(PYKD_ERR_MPI, trim(msg), stat, errmsg)
        return
      end if
    end do
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine pykd_mpi_checksum

  !> One data-parallel training step over the ranks of comm. Each rank
  !! passes its shard x(sizes(1), n_r) of the global batch (shards in rank
  !! order: rank r holds samples first_r + 1 .. first_r + n_r, first_r the
  !! sum of the smaller ranks' n), with its labels / teacher / targets /
  !! hint targets; the other arguments are those of mlp_train_step and are
  !! the same on every rank. The step computes the shard gradient
  !! (mlp_gradient, whose loss and gradient are the shard's share of the
  !! global batch mean), sums loss and gradients with pykd_mpi_sum and
  !! applies the optimizer update (mlp_apply_update), so params, state1 and
  !! state2 stay the same bits on every rank. `loss` and `n_correct` are the
  !! global batch's, on every rank. If any rank fails (bad argument,
  !! non-finite loss), no rank updates and every rank returns the highest
  !! status of any rank (its own message, or one naming the failing rank).
  !! A rank may hold no samples (n_r = 0) if another holds some.
  subroutine pykd_mpi_train_step(comm, sizes, acts, params, grads, state1, state2, x, labels, cfg, &
                                 step, work, loss, n_correct, teacher, hint_target, mask, stat, &
                                 errmsg, targets)
    type(MPI_Comm), intent(in) :: comm
    integer, intent(in) :: sizes(:), acts(:)
    real(real32), intent(inout), contiguous, target :: params(:), grads(:), state1(:), state2(:)
    real(real32), intent(in), contiguous, target :: x(:, :)
    integer(int64), intent(in) :: labels(:)
    type(train_config), intent(in) :: cfg
    integer(int64), intent(in) :: step
    real(real32), intent(inout), contiguous, target :: work(:)
    real(real32), intent(out) :: loss
    integer, intent(out) :: n_correct
    real(real32), intent(in), contiguous, optional :: teacher(:, :)
    real(real32), intent(in), contiguous, optional :: hint_target(:, :)
    integer(int8), intent(in), contiguous, optional :: mask(:)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), intent(in), contiguous, optional :: targets(:, :)
    character(len=256) :: msg
    integer :: st, ierr, n_local, n_global, rank, worst(2), mine(2), nc
    integer(int64) :: n8, first
    real(real32) :: lsum(1)

    loss = 0; n_correct = 0
    n_local = size(x, 2)
    n8 = n_local
    call MPI_Comm_rank(comm, rank, ierr)
    if (ierr == MPI_SUCCESS) call MPI_Allreduce(n_local, n_global, 1, MPI_INTEGER, MPI_SUM, comm, ierr)
    first = 0
    if (ierr == MPI_SUCCESS) call MPI_Exscan(n8, first, 1, MPI_INTEGER8, MPI_SUM, comm, ierr)
    if (ierr /= MPI_SUCCESS) then
      call set_status(PYKD_ERR_MPI, 'pykd_mpi_train_step: MPI failed sharing the shard sizes', stat, errmsg)
      return
    end if
    if (rank == 0) first = 0                    ! MPI_Exscan leaves rank 0's result undefined

    msg = ''
    st = PYKD_OK
    if (n_local > 0) then
      call mlp_gradient(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
                        teacher, hint_target, st, msg, targets, n_global=n_global, first=first)
    else if (n_global == 0) then
      st = PYKD_ERR_MPI
      msg = 'pykd_mpi_train_step: the global batch is empty (every rank passed 0 samples)'
    else
      grads = 0                                 ! this rank adds nothing to the sum
    end if

    ! Agree on success before anyone updates: the highest status, and the
    ! lowest rank that has it.
    mine = [st, rank]
    call MPI_Allreduce(mine, worst, 1, MPI_2INTEGER, MPI_MAXLOC, comm, ierr)
    if (ierr /= MPI_SUCCESS) then
      call set_status(PYKD_ERR_MPI, 'pykd_mpi_train_step: MPI_Allreduce of the status failed', stat, errmsg)
      return
    end if
    if (worst(1) /= PYKD_OK) then
      if (st == PYKD_OK) write (msg, '(a, i0, a, i0, a)') 'pykd_mpi_train_step: rank ', worst(2), &
        ' failed (status ', worst(1), '); no rank updated its parameters'
      call set_status(worst(1), trim(msg), stat, errmsg)
      return
    end if

    lsum(1) = loss
    call pykd_mpi_sum(lsum, comm, st, msg)
    nc = n_correct                              ! send and receive buffers must differ
    if (st == PYKD_OK) call MPI_Allreduce(nc, n_correct, 1, MPI_INTEGER, MPI_SUM, comm, ierr)
    if (st == PYKD_OK .and. ierr /= MPI_SUCCESS) then
      st = PYKD_ERR_MPI
      msg = 'pykd_mpi_train_step: MPI_Allreduce of the correct counts failed'
    end if
    if (st == PYKD_OK) call pykd_mpi_sum(grads, comm, st, msg)
    if (st /= PYKD_OK) then
      call set_status(st, trim(msg), stat, errmsg)
      return
    end if
    loss = lsum(1)
    call mlp_apply_update(params, grads, state1, state2, cfg, step, mask, stat, errmsg)
  end subroutine pykd_mpi_train_step

end module pykd_parallel
#endif
