!> A simulation that trains its own surrogate in place, over MPI.
!!
!! The simulation: a 1-D reaction-diffusion equation (Fisher-KPP,
!! u_t = D u_xx + r u (1 - u)) on a periodic domain split across the ranks,
!! each rank owning N_LOCAL cells and exchanging one halo cell with each
!! neighbour per time step. The surrogate: an MLP 3-32-32-1 that learns the
!! update of a cell from its stencil (u_{i-1}, u_i, u_{i+1}) -> (u_i' - u_i)
!! / SCALE. Every time step, each rank trains on its own cells (its shard of
!! the global batch of N_LOCAL x ranks samples) with pykd_mpi_train_step,
!! which sums the gradients of all ranks, so every rank holds the same
!! network; no data leaves the rank that produced it. At the end the ranks'
!! parameter checksums are compared and rank 0 saves the model, which
!! Python loads with pykd.load_model.
!!
!!   mpirun -np 2 ./mpi_train [STEPS [MODEL.pykd]]
!!
!! The program stops with a non-zero code if the surrogate did not learn
!! (loss down by less than 10x) or the ranks diverged (a library never
!! stops the program; this example may).
program mpi_train
  use iso_fortran_env, only: real32, int32, int64, output_unit
  use mpi_f08, only: MPI_Comm, MPI_COMM_WORLD, MPI_Init, MPI_Finalize, MPI_Comm_rank, &
                     MPI_Comm_size, MPI_Sendrecv, MPI_REAL, MPI_STATUS_IGNORE, MPI_Wtime
  use pykd, only: train_config, pykd_model, mlp_param_count, mlp_workspace_size, &
                  pykd_mpi_train_step, pykd_mpi_checksum, pykd_model_from_params, pykd_save_model, &
                  pykd_free, LOSS_MSE, OPT_ADAM, ACT_TANH, ACT_IDENTITY, PYKD_OK
  implicit none
  integer, parameter :: N_LOCAL = 512
  real(real32), parameter :: ALPHA = 0.2, BETA = 0.05, SCALE = 0.05   !! D dt / dx^2, r dt
  integer, parameter :: sizes(4) = [3, 32, 32, 1], acts(3) = [ACT_TANH, ACT_TANH, ACT_IDENTITY]
  type(MPI_Comm) :: comm
  type(train_config) :: cfg
  type(pykd_model) :: model
  real(real32), allocatable :: u(:), un(:), p(:), g(:), m(:), v(:), work(:), x(:, :), y(:, :)
  integer(int64), allocatable :: labels(:)
  integer(int64) :: step
  integer(int32) :: crc
  integer :: rank, nranks, ierr, steps, i, t, stat, nc, np
  real(real32) :: loss, first_loss
  real(kind(1d0)) :: t0
  character(len=256) :: arg, out, msg

  call MPI_Init(ierr)
  comm = MPI_COMM_WORLD
  call MPI_Comm_rank(comm, rank, ierr)
  call MPI_Comm_size(comm, nranks, ierr)
  steps = 400
  out = ''
  if (command_argument_count() >= 1) then
    call get_command_argument(1, arg)
    read (arg, *) steps
  end if
  if (command_argument_count() >= 2) call get_command_argument(2, out)

  ! The rank's cells, 1 .. N_LOCAL, with halo cells 0 and N_LOCAL + 1.
  allocate (u(0:N_LOCAL + 1), un(0:N_LOCAL + 1))
  do i = 1, N_LOCAL
    u(i) = initial(rank * N_LOCAL + i, N_LOCAL * nranks)
  end do

  np = int(mlp_param_count(sizes, 0, 0))
  allocate (p(np), g(np), m(np), v(np), work(mlp_workspace_size(sizes, N_LOCAL, 0)))
  allocate (x(3, N_LOCAL), y(1, N_LOCAL), labels(1))
  do i = 1, np                                   ! the same initial weights on every rank
    p(i) = 0.3 * sin(1.7 * i)
  end do
  m = 0; v = 0
  cfg%loss = LOSS_MSE; cfg%optimizer = OPT_ADAM; cfg%lr = 3e-3

  t0 = MPI_Wtime()
  do t = 1, steps
    call halo(u)
    do i = 1, N_LOCAL                            ! one time step of the simulation
      un(i) = u(i) + ALPHA * (u(i + 1) - 2 * u(i) + u(i - 1)) + BETA * u(i) * (1 - u(i))
    end do
    x(1, :) = u(0:N_LOCAL - 1); x(2, :) = u(1:N_LOCAL); x(3, :) = u(2:N_LOCAL + 1)
    y(1, :) = (un(1:N_LOCAL) - u(1:N_LOCAL)) / SCALE
    step = t
    call pykd_mpi_train_step(comm, sizes, acts, p, g, m, v, x, labels, cfg, step, work, loss, nc, &
                             stat=stat, errmsg=msg, targets=y)
    if (stat /= PYKD_OK) call fail('training step: '//trim(msg))
    if (t == 1) first_loss = loss
    if (rank == 0 .and. (t == 1 .or. mod(t, 100) == 0)) &
      write (output_unit, '(a, i5, a, es10.3)') 'step ', t, '  loss ', loss
    u(1:N_LOCAL) = un(1:N_LOCAL)
    if (mod(t, 100) == 0) then                   ! the ranks never diverge: check
      call pykd_mpi_checksum(p, comm, crc, stat, msg)
      if (stat /= PYKD_OK) call fail(msg)
    end if
    if (all(u(1:N_LOCAL) > 0.999)) u(1:N_LOCAL) = [(initial(rank * N_LOCAL + i, N_LOCAL * nranks), &
                                                    i = 1, N_LOCAL)]  ! the front has filled the domain
  end do
  call pykd_mpi_checksum(p, comm, crc, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  if (rank == 0) then
    write (output_unit, '(a, i0, a, i0, a, f6.2, a, z8.8)') 'ranks ', nranks, ', samples per step ', &
      N_LOCAL * nranks, ', ', MPI_Wtime() - t0, ' s, parameter CRC-32 ', crc
    if (len_trim(out) > 0) then
      call pykd_model_from_params(sizes, acts, p, model, stat=stat, errmsg=msg, &
                                  metadata='{"source": "examples/mpi_train"}')
      if (stat == PYKD_OK) call pykd_save_model(model, trim(out), stat, msg)
      if (stat /= PYKD_OK) call fail(msg)
      write (output_unit, '(a)') 'saved '//trim(out)
      call pykd_free(model)
    end if
  end if
  if (.not. loss < first_loss / 10) call fail('the surrogate did not learn')
  call MPI_Finalize(ierr)

contains

  !> A smooth front and a bump: the state at global cell k of n.
  pure real(real32) function initial(k, n)
    integer, intent(in) :: k, n
    real(real32) :: s
    s = real(k, real32) / n
    initial = 0.5 * (1 - tanh(40 * (s - 0.2))) * merge(1.0, 0.0, s < 0.5) + 0.8 * exp(-((s - 0.7) * 30)**2)
  end function initial

  !> Periodic halo exchange with the left and right neighbours.
  subroutine halo(a)
    real(real32), intent(inout) :: a(0:)
    integer :: left, right, e
    left = modulo(rank - 1, nranks); right = modulo(rank + 1, nranks)
    call MPI_Sendrecv(a(N_LOCAL), 1, MPI_REAL, right, 1, a(0), 1, MPI_REAL, left, 1, comm, &
                      MPI_STATUS_IGNORE, e)
    call MPI_Sendrecv(a(1), 1, MPI_REAL, left, 2, a(N_LOCAL + 1), 1, MPI_REAL, right, 2, comm, &
                      MPI_STATUS_IGNORE, e)
  end subroutine halo

  subroutine fail(why)
    character(len=*), intent(in) :: why
    write (output_unit, '(a, i0, a)') 'rank ', rank, ': '//trim(why)
    error stop 1
  end subroutine fail

end program mpi_train
