!> The "truth": integrates the two-scale Lorenz-96 system with RK4 and writes
!! the training data and the test trajectory. No pykd needed.
!!
!!   l96_truth truth.nml
!!
!! After `spinup_mtu` model time units (MTU) it samples (X, U) every
!! `train_every` steps for `train_mtu` MTU (training data), then, on the same
!! trajectory, every `test_every` steps for `test_mtu` MTU (the test
!! trajectory: forecast initial states, verification and climate). Output,
!! in `out_dir`, raw little-endian float64 in C order:
!!   train_X.f64, train_U.f64  (n_train, K)
!!   test_X.f64,  test_U.f64   (n_test, K)
!!   state0.f64                (K + J*K): x then y at the first training sample
!!   truth.json                sizes, parameters, intervals and the cost per MTU
program l96_truth
  use iso_fortran_env, only: int64, error_unit
  use omp_lib, only: omp_get_wtime
  use l96, only: dp, l96_params, two_scale_rk4_step, subgrid_tendency
  implicit none
  type(l96_params) :: p
  integer :: k = 8, j = 32, train_every = 20, test_every = 5, seed = 1
  real(dp) :: f = 20, h = 1, b = 10, c = 10, dt = 0.001_dp
  real(dp) :: spinup_mtu = 10, train_mtu = 400, test_mtu = 300
  character(len=512) :: out_dir = '.'
  namelist /truth/ k, j, f, h, b, c, dt, spinup_mtu, train_mtu, test_mtu, train_every, &
                   test_every, seed, out_dir
  real(dp), allocatable :: x(:), y(:), tx(:, :), tu(:, :), ex(:, :), eu(:, :), state0(:)
  integer :: n_train, n_test, i
  integer(int64) :: n_spin
  real(dp) :: t0, t_train, t_test

  call read_namelist()
  p = l96_params(k=k, j=j, f=f, h=h, b=b, c=c)
  n_spin = nint(spinup_mtu / dt, int64)
  n_train = int(nint(train_mtu / (dt * train_every)))
  n_test = int(nint(test_mtu / (dt * test_every)))
  allocate (x(k), y(j * k), tx(k, n_train), tu(k, n_train), ex(k, n_test), eu(k, n_test))
  call initial_state(seed, f, x, y)

  do i = 1, int(n_spin)
    call two_scale_rk4_step(p, dt, x, y)
  end do
  state0 = [x, y]
  t0 = omp_get_wtime()
  call sample(n_train, train_every, tx, tu)
  t_train = omp_get_wtime() - t0
  t0 = omp_get_wtime()
  call sample(n_test, test_every, ex, eu)
  t_test = omp_get_wtime() - t0

  call write_f64('train_X.f64', tx)
  call write_f64('train_U.f64', tu)
  call write_f64('test_X.f64', ex)
  call write_f64('test_U.f64', eu)
  call write_f64('state0.f64', reshape(state0, [size(state0), 1]))
  call write_json()
  write (*, '(a, i0, a, i0, a, f0.1, a)') 'l96_truth: ', n_train, ' training and ', n_test, &
    ' test samples of K slow variables; two-scale model ', &
    1e3_dp * (t_train + t_test) / (train_mtu + test_mtu), ' ms per MTU (1 thread)'

contains

  subroutine read_namelist()
    character(len=512) :: path, msg
    integer :: u, ios

    if (command_argument_count() /= 1) then
      write (error_unit, '(a)') 'usage: l96_truth truth.nml'
      error stop 2
    end if
    call get_command_argument(1, path)
    open (newunit=u, file=trim(path), status='old', action='read', iostat=ios, iomsg=msg)
    if (ios /= 0) then
      write (error_unit, '(a)') 'l96_truth: '//trim(msg)
      error stop 2
    end if
    read (u, nml=truth, iostat=ios, iomsg=msg)
    close (u)
    if (ios /= 0) then
      write (error_unit, '(a)') 'l96_truth: '//trim(path)//': '//trim(msg)
      error stop 2
    end if
    if (k < 5 .or. j < 3 .or. dt <= 0 .or. train_every < 1 .or. test_every < 1 &
        .or. spinup_mtu < 0 .or. train_mtu < dt * train_every .or. test_mtu < dt * test_every) then
      write (error_unit, '(a)') 'l96_truth: '//trim(path)// &
        ': need k >= 5, j >= 3, dt > 0, *_every >= 1, spinup_mtu >= 0 and at least one sample per segment'
      error stop 2
    end if
  end subroutine read_namelist

  !> A fixed, compiler-independent start: X near F/4 with a deterministic
  !! spread, small fast variables (the spin-up forgets it).
  pure subroutine initial_state(seed, f, x, y)
    integer, intent(in) :: seed
    real(dp), intent(in) :: f
    real(dp), intent(out) :: x(:), y(:)
    integer :: i

    do i = 1, size(x)
      x(i) = 0.25_dp * f + f * (fraction_of(i * 0.6180339887_dp * seed) - 0.5_dp)
    end do
    do i = 1, size(y)
      y(i) = 0.01_dp * (fraction_of(i * 0.7548776662_dp * seed) - 0.5_dp)
    end do
  end subroutine initial_state

  pure real(dp) function fraction_of(v)
    real(dp), intent(in) :: v
    fraction_of = v - floor(v)
  end function fraction_of

  !> Record (X, U) now, then every `every` steps: n samples.
  subroutine sample(n, every, sx, su)
    integer, intent(in) :: n, every
    real(dp), intent(out) :: sx(:, :), su(:, :)
    integer :: s, i

    do s = 1, n
      sx(:, s) = x
      call subgrid_tendency(p, y, su(:, s))
      do i = 1, every
        call two_scale_rk4_step(p, dt, x, y)
      end do
    end do
  end subroutine sample

  subroutine write_f64(name, a)
    character(len=*), intent(in) :: name
    real(dp), intent(in) :: a(:, :)
    integer :: u, ios
    character(len=512) :: msg

    open (newunit=u, file=trim(out_dir)//'/'//name, access='stream', form='unformatted', &
          status='replace', action='write', iostat=ios, iomsg=msg)
    if (ios == 0) write (u, iostat=ios, iomsg=msg) a
    if (ios /= 0) then
      write (error_unit, '(a)') 'l96_truth: '//trim(out_dir)//'/'//name//': '//trim(msg)
      error stop 2
    end if
    close (u)
  end subroutine write_f64

  subroutine write_json()
    integer :: u

    open (newunit=u, file=trim(out_dir)//'/truth.json', status='replace', action='write')
    write (u, '(a)') '{'
    write (u, '(a, i0, a, i0, a)') '  "K": ', k, ', "J": ', j, ','
    write (u, '(4(a, es23.16), a)') '  "F": ', f, ', "h": ', h, ', "b": ', b, ', "c": ', c, ','
    write (u, '(a, es23.16, a, es23.16, a)') '  "dt": ', dt, ', "spinup_mtu": ', spinup_mtu, ','
    write (u, '(a, i0, a, es23.16, a)') '  "n_train": ', n_train, ', "train_interval": ', &
      dt * train_every, ','
    write (u, '(a, i0, a, es23.16, a)') '  "n_test": ', n_test, ', "test_interval": ', &
      dt * test_every, ','
    write (u, '(a, es23.16, a)') '  "seconds_per_mtu": ', (t_train + t_test) / (train_mtu + test_mtu), ','
    write (u, '(a)') '  "threads": 1'
    write (u, '(a)') '}'
    close (u)
  end subroutine write_json

end program l96_truth
