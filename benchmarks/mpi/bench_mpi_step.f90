!> Timing driver of benchmarks/bench_mpi.py (the MPI build, -Dmpi=true):
!! training steps of the teacher 784-1200-1200-10 or the student
!! 784-200-200-10 at a global batch of 64 on Fashion-MNIST-shaped random
!! data (Adam, cross-entropy).
!!
!!   bench_mpi_step teacher|student STEPS single    one process: mlp_train_step
!!   mpirun -np N bench_mpi_step teacher|student STEPS mpi
!!
!! `mpi` times each step's three parts on every rank (the shard gradient
!! mlp_gradient, the sum pykd_mpi_sum of the gradients, the update
!! mlp_apply_update: what pykd_mpi_train_step does, minus its small
!! collectives) and the whole pykd_mpi_train_step on alternate steps.
!! Prints one line of medians in milliseconds (rank 0).
program bench_mpi_step
  use iso_fortran_env, only: real32, real64, int32, int64, output_unit
  use mpi_f08, only: MPI_Comm, MPI_COMM_WORLD, MPI_Init, MPI_Finalize, MPI_Comm_rank, &
                     MPI_Comm_size, MPI_Wtime, MPI_Barrier
  use pykd, only: train_config, mlp_param_count, mlp_workspace_size, mlp_train_step, &
                  pykd_mpi_sum, pykd_mpi_train_step, pykd_mpi_checksum, PYKD_OK
  use pykd_mlp, only: mlp_gradient, mlp_apply_update
  implicit none
  integer, parameter :: NB = 64, WARM = 3
  type(MPI_Comm) :: comm
  type(train_config) :: cfg
  integer, allocatable :: sizes(:), acts(:)
  real(real32), allocatable :: p(:), g(:), m(:), v(:), work(:), x(:, :)
  integer(int64), allocatable :: y(:)
  real(real64), allocatable :: t_grad(:), t_sum(:), t_upd(:), t_step(:), t_one(:)
  integer(int64) :: step
  integer(int32) :: crc
  integer :: rank, nranks, ierr, steps, t, lo, hi, n, stat, nc, i, k, ng, nt
  real(real32) :: loss
  real(real64) :: t0, t1, t2
  character(len=32) :: net, mode, arg

  call MPI_Init(ierr)
  comm = MPI_COMM_WORLD
  call MPI_Comm_rank(comm, rank, ierr)
  call MPI_Comm_size(comm, nranks, ierr)
  call get_command_argument(1, net)
  call get_command_argument(2, arg)
  read (arg, *) steps
  call get_command_argument(3, mode)
  if (net == 'teacher') then
    sizes = [784, 1200, 1200, 10]
  else
    sizes = [784, 200, 200, 10]
  end if
  acts = [1, 1, 0]
  lo = rank * NB / nranks + 1; hi = (rank + 1) * NB / nranks
  n = hi - lo + 1
  if (mode == 'single') then
    lo = 1; hi = NB; n = NB
  end if
  k = int(mlp_param_count(sizes, 0, 0))
  allocate (p(k), g(k), m(k), v(k), x(784, n), y(n), work(mlp_workspace_size(sizes, n, 0)))
  do i = 1, k
    p(i) = 0.05 * sin(0.37 * i)
  end do
  m = 0; v = 0
  allocate (t_grad(steps), t_sum(steps), t_upd(steps), t_step(steps), t_one(steps))
  ng = 0; nt = 0
  do t = 1, steps + WARM
    call fill(t, x, y)
    step = t
    call MPI_Barrier(comm, ierr)
    t0 = MPI_Wtime()
    if (mode == 'single') then
      call mlp_train_step(sizes, acts, p, g, m, v, x, y, cfg, step, work, loss, nc, stat=stat)
      t1 = MPI_Wtime()
      if (t > WARM) then
        nt = nt + 1; t_one(nt) = t1 - t0
      end if
    else if (mod(t, 2) == 0) then
      call mlp_gradient(sizes, acts, p, g, x, y, cfg, step, work, loss, nc, stat=stat, n_global=NB, &
                        first=int(lo - 1, int64))
      t1 = MPI_Wtime()
      call pykd_mpi_sum(g, comm, stat)
      t2 = MPI_Wtime()
      call mlp_apply_update(p, g, m, v, cfg, step, stat=stat)
      if (t > WARM) then
        ng = ng + 1
        t_grad(ng) = t1 - t0; t_sum(ng) = t2 - t1; t_upd(ng) = MPI_Wtime() - t2
      end if
    else
      call pykd_mpi_train_step(comm, sizes, acts, p, g, m, v, x, y, cfg, step, work, loss, nc, stat=stat)
      t1 = MPI_Wtime()
      if (t > WARM) then
        nt = nt + 1; t_one(nt) = t1 - t0
      end if
    end if
    if (stat /= PYKD_OK) error stop 'bench_mpi_step: a step failed'
  end do
  if (mode /= 'single') then
    call pykd_mpi_checksum(p, comm, crc, stat)
    if (stat /= PYKD_OK) error stop 'bench_mpi_step: the ranks diverged'
  end if
  if (rank == 0) then
    if (mode == 'single') then
      write (output_unit, '(a, f10.3)') 'step_ms', 1e3 * median(t_one(1:nt))
    else
      write (output_unit, '(a, f10.3, a, f10.3, a, f10.3, a, f10.3, a, f10.3)') 'step_ms', &
        1e3 * median(t_one(1:nt)), ' grad_ms', 1e3 * median(t_grad(1:ng)), ' sum_ms', &
        1e3 * median(t_sum(1:ng)), ' update_ms', 1e3 * median(t_upd(1:ng)), ' parts_ms', &
        1e3 * median(t_grad(1:ng) + t_sum(1:ng) + t_upd(1:ng))
    end if
  end if
  call MPI_Finalize(ierr)

contains

  !> Rows lo .. hi of global batch t: pixel values in [0, 1), labels 0-9.
  subroutine fill(t, xs, ys)
    integer, intent(in) :: t
    real(real32), intent(out) :: xs(:, :)
    integer(int64), intent(out) :: ys(:)
    integer :: j, f, gj
    do j = 1, size(xs, 2)
      gj = (t - 1) * NB + lo + j - 1
      do f = 1, 784
        xs(f, j) = real(modulo(0.6180339887_real64 * (gj * 784 + f), 1.0_real64) - 0.5, real32)
      end do
      ys(j) = mod(gj * 7, 10)
    end do
  end subroutine fill

  real(real64) function median(a)
    real(real64), intent(in) :: a(:)
    real(real64) :: s(size(a)), tmp
    integer :: i, j
    s = a
    do i = 2, size(s)                 ! insertion sort: a few hundred values
      tmp = s(i); j = i - 1
      do while (j >= 1)
        if (s(j) <= tmp) exit
        s(j + 1) = s(j); j = j - 1
      end do
      s(j + 1) = tmp
    end do
    median = s((size(s) + 1) / 2)
    if (mod(size(s), 2) == 0) median = 0.5 * (s(size(s) / 2) + s(size(s) / 2 + 1))
  end function median

end program bench_mpi_step
