!> Ensemble forecasts and climate runs of the one-scale Lorenz-96 model with
!! each closure (none, a polynomial, pykd networks), verified against the
!! two-scale truth; and the cost per model time unit (MTU) of each, with the
!! two-scale model's alongside. No Python at run time.
!!
!!   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 l96_forecast forecast.nml
!!
!! The members run in an OpenMP loop, each thread with its own
!! pykd_workspace; every RK4 stage of a member calls the network once for its
!! K slow variables (5 x K inputs). Inputs, from `truth_dir` (l96_truth):
!! test_X.f64 (the test trajectory, sampled every dt) and state0.f64 (a
!! two-scale state, for timing the two-scale model). Outputs, in `out_dir`,
!! raw little-endian float64 in C order:
!!   forecast_<label>.f64  (n_members, n_leads, K): X at each lead
!!   climate_<label>.f64   (climate_members, n_records, K)
!!   forecast.json         RMSE per lead, blow-ups, timings
program l96_forecast
  use iso_fortran_env, only: int64, error_unit
  use omp_lib, only: omp_get_wtime, omp_get_thread_num, omp_get_max_threads
  use l96, only: dp, l96_params, two_scale_rk4_step
  use l96_closure, only: closure_t, closure_from_spec, closure_free, one_scale_rk4_step, N_POLY
  use pykd, only: pykd_workspace, PYKD_OK, PYKD_ERR_NONFINITE
  implicit none
  integer, parameter :: MAX_CLOSURES = 16, MAX_LEADS = 32
  real(dp), parameter :: BLOW_UP = 1e3_dp   !! |X| beyond this: the member has diverged
  ! namelist /forecast/
  character(len=512) :: truth_dir = '.', out_dir = '.'
  character(len=512) :: closures(MAX_CLOSURES) = ''
  real(dp) :: poly(0:N_POLY - 1) = 0
  integer :: k = 8, j = 32, n_members = 100, member_stride = 200, climate_members = 2
  integer :: lead_steps(MAX_LEADS) = 0, climate_every = 10, timing_repeats = 5
  real(dp) :: f = 20, h = 1, b = 10, c = 10, dt = 0.005_dp, test_interval = 0.005_dp
  real(dp) :: dt_truth = 0.001_dp, climate_spinup_mtu = 5, climate_mtu = 50, timing_mtu = 1
  logical :: real32_entry = .false.
  namelist /forecast/ truth_dir, out_dir, closures, poly, k, j, f, h, b, c, dt, test_interval, &
                      dt_truth, n_members, member_stride, lead_steps, climate_members, &
                      climate_spinup_mtu, climate_mtu, climate_every, timing_mtu, &
                      timing_repeats, real32_entry

  type(closure_t), allocatable :: cls(:)
  type(pykd_workspace), allocatable :: work(:)
  real(dp), allocatable :: truth(:, :), state0(:), fc(:, :, :), clim(:, :, :)
  real(dp), allocatable :: rmse(:, :), ens_s(:), clim_s(:), cpu_mtu(:, :), wall_mtu(:, :), two_cpu(:), two_wall(:)
  integer, allocatable :: blown(:)
  integer :: n_cl, n_leads, n_test, i_cl, r, n_threads
  character(len=512) :: msg
  integer :: stat

  call read_namelist()
  n_threads = omp_get_max_threads()
  allocate (work(0:n_threads - 1))
  call read_truth()
  allocate (cls(n_cl))
  do i_cl = 1, n_cl
    call closure_from_spec(trim(closures(i_cl)), poly, real32_entry, cls(i_cl), stat, msg)
    if (stat /= PYKD_OK) call die(trim(msg))
  end do
  allocate (rmse(n_leads, n_cl), ens_s(n_cl), clim_s(n_cl), blown(n_cl), &
            cpu_mtu(timing_repeats, n_cl), wall_mtu(timing_repeats, n_cl), &
            two_cpu(timing_repeats), two_wall(timing_repeats))

  do i_cl = 1, n_cl
    call run_ensemble(cls(i_cl), fc, blown(i_cl), ens_s(i_cl))
    call verify(fc, rmse(:, i_cl))
    call write_f64('forecast_'//trim(cls(i_cl)%label)//'.f64', fc)
    call run_climate(cls(i_cl), clim, clim_s(i_cl))
    call write_f64('climate_'//trim(cls(i_cl)%label)//'.f64', clim)
  end do
  ! Cost per MTU: one member on one thread, the closures (and the two-scale
  ! model) alternating within each repeat, so a load change hits all alike.
  do r = 1, timing_repeats
    do i_cl = 1, n_cl
      call time_one_scale(cls(i_cl), cpu_mtu(r, i_cl), wall_mtu(r, i_cl))
    end do
    call time_two_scale(two_cpu(r), two_wall(r))
  end do
  call report()
  do i_cl = 1, n_cl
    call closure_free(cls(i_cl))
  end do

contains

  subroutine die(text)
    character(len=*), intent(in) :: text
    write (error_unit, '(a)') 'l96_forecast: '//text
    error stop 2
  end subroutine die

  subroutine read_namelist()
    character(len=512) :: path
    integer :: u, ios

    if (command_argument_count() /= 1) call die('usage: l96_forecast forecast.nml')
    call get_command_argument(1, path)
    open (newunit=u, file=trim(path), status='old', action='read', iostat=ios, iomsg=msg)
    if (ios /= 0) call die(trim(msg))
    read (u, nml=forecast, iostat=ios, iomsg=msg)
    close (u)
    if (ios /= 0) call die(trim(path)//': '//trim(msg))
    n_cl = count(closures /= '')
    n_leads = count(lead_steps > 0)
    if (n_cl == 0 .or. any(closures(n_cl + 1:) /= '')) &
      call die(trim(path)//': closures must list at least one closure, without gaps')
    if (n_leads == 0 .or. any(lead_steps(n_leads + 1:) /= 0)) &
      call die(trim(path)//': lead_steps must list at least one lead, without gaps')
    if (n_leads > 1) then
      if (any(lead_steps(2:n_leads) <= lead_steps(1:n_leads - 1))) &
        call die(trim(path)//': lead_steps must increase')
    end if
    if (abs(test_interval - dt) > 1e-9_dp * dt) &
      call die(trim(path)//': dt must equal the truth sampling interval test_interval')
    if (k < 5 .or. n_members < 1 .or. member_stride < 1 .or. climate_members < 0 .or. &
        climate_every < 1 .or. timing_repeats < 1 .or. timing_mtu <= 0 .or. climate_mtu < 0 &
        .or. climate_spinup_mtu < 0 .or. dt <= 0 .or. dt_truth <= 0) &
      call die(trim(path)//': need k >= 5, n_members, member_stride, climate_every, '// &
               'timing_repeats >= 1, dt, dt_truth, timing_mtu > 0, climate_* >= 0')
  end subroutine read_namelist

  !> test_X.f64 (its length gives n_test) and state0.f64.
  subroutine read_truth()
    integer(int64) :: bytes
    integer :: u, ios

    call read_f64(trim(truth_dir)//'/test_X.f64', bytes, u)
    if (bytes <= 0 .or. mod(bytes, 8_int64 * k) /= 0) call die(trim(truth_dir)//'/test_X.f64: not K float64 columns')
    n_test = int(bytes / (8_int64 * k))
    allocate (truth(k, n_test))
    read (u, iostat=ios, iomsg=msg) truth
    close (u)
    if (ios /= 0) call die(trim(truth_dir)//'/test_X.f64: '//trim(msg))
    if (1 + (n_members - 1) * member_stride + lead_steps(n_leads) > n_test) &
      call die('the test trajectory is too short for n_members, member_stride and the last lead')
    call read_f64(trim(truth_dir)//'/state0.f64', bytes, u)
    if (bytes /= 8_int64 * k * (1 + j)) call die(trim(truth_dir)//'/state0.f64: not K + J*K float64')
    allocate (state0(k * (1 + j)))
    read (u, iostat=ios, iomsg=msg) state0
    close (u)
    if (ios /= 0) call die(trim(truth_dir)//'/state0.f64: '//trim(msg))
  end subroutine read_truth

  subroutine read_f64(path, bytes, u)
    character(len=*), intent(in) :: path
    integer(int64), intent(out) :: bytes
    integer, intent(out) :: u
    integer :: ios

    open (newunit=u, file=path, access='stream', form='unformatted', status='old', &
          action='read', iostat=ios, iomsg=msg)
    if (ios /= 0) call die(trim(msg))
    inquire (unit=u, size=bytes)
  end subroutine read_f64

  !> Member m starts from truth sample 1 + (m - 1) * member_stride and is
  !! recorded at each lead; a diverged member is NaN from then on.
  subroutine run_ensemble(cl, out, n_blown, seconds)
    type(closure_t), intent(in) :: cl
    real(dp), allocatable, intent(out) :: out(:, :, :)
    integer, intent(out) :: n_blown
    real(dp), intent(out) :: seconds
    integer :: m, step, il, st, tid, bad_stat
    real(dp) :: x(k), t0

    allocate (out(k, n_leads, n_members))
    n_blown = 0
    bad_stat = PYKD_OK
    t0 = omp_get_wtime()
    !$omp parallel do schedule(dynamic) default(shared) private(m, step, il, st, tid, x) &
    !$omp reduction(+:n_blown) reduction(max:bad_stat)
    do m = 1, n_members
      tid = omp_get_thread_num()
      x = truth(:, 1 + (m - 1) * member_stride)
      il = 1
      do step = 1, lead_steps(n_leads)
        call one_scale_rk4_step(cl, f, dt, x, work(tid), st)
        if (st /= PYKD_OK .and. st /= PYKD_ERR_NONFINITE) bad_stat = max(bad_stat, st)
        if (st /= PYKD_OK .or. .not. all(abs(x) < BLOW_UP)) then
          out(:, il:, m) = ieee_nan()
          n_blown = n_blown + 1
          exit
        end if
        if (step == lead_steps(il)) then
          out(:, il, m) = x
          il = il + 1
        end if
      end do
    end do
    !$omp end parallel do
    seconds = omp_get_wtime() - t0
    if (bad_stat /= PYKD_OK) call die(trim(cl%label)//': pykd_predict failed during the forecasts')
  end subroutine run_ensemble

  !> RMSE over all members that did not diverge and all k, per lead.
  subroutine verify(out, err)
    real(dp), intent(in) :: out(:, :, :)
    real(dp), intent(out) :: err(:)
    integer :: m, il, n_ok
    real(dp) :: acc

    do il = 1, n_leads
      acc = 0
      n_ok = 0
      do m = 1, n_members
        if (all(abs(out(:, il, m)) < BLOW_UP)) then
          acc = acc + sum((out(:, il, m) - truth(:, 1 + (m - 1) * member_stride + lead_steps(il)))**2)
          n_ok = n_ok + 1
        end if
      end do
      err(il) = sqrt(acc / max(1, n_ok * k))
      if (n_ok == 0) err(il) = ieee_nan()
    end do
  end subroutine verify

  !> Long runs from the members' initial states: spin-up, then X every
  !! `climate_every` steps.
  subroutine run_climate(cl, out, seconds)
    type(closure_t), intent(in) :: cl
    real(dp), allocatable, intent(out) :: out(:, :, :)
    real(dp), intent(out) :: seconds
    integer :: m, step, st, tid, n_spin, n_rec, bad_stat
    real(dp) :: x(k), t0
    logical :: alive

    n_spin = nint(climate_spinup_mtu / dt)
    n_rec = nint(climate_mtu / (dt * climate_every))
    allocate (out(k, n_rec, climate_members))
    bad_stat = PYKD_OK
    t0 = omp_get_wtime()
    !$omp parallel do schedule(dynamic) default(shared) private(m, step, st, tid, x, alive) &
    !$omp reduction(max:bad_stat)
    do m = 1, climate_members
      tid = omp_get_thread_num()
      x = truth(:, 1 + mod((m - 1) * member_stride, n_test))
      out(:, :, m) = ieee_nan()
      alive = .true.
      do step = 1, n_spin + n_rec * climate_every
        call one_scale_rk4_step(cl, f, dt, x, work(tid), st)
        if (st /= PYKD_OK .and. st /= PYKD_ERR_NONFINITE) bad_stat = max(bad_stat, st)
        alive = st == PYKD_OK .and. all(abs(x) < BLOW_UP)
        if (.not. alive) exit
        if (step > n_spin .and. mod(step - n_spin, climate_every) == 0) &
          out(:, (step - n_spin) / climate_every, m) = x
      end do
    end do
    !$omp end parallel do
    seconds = omp_get_wtime() - t0
    if (bad_stat /= PYKD_OK) call die(trim(cl%label)//': pykd_predict failed during the climate run')
  end subroutine run_climate

  subroutine time_one_scale(cl, cpu, wall)
    type(closure_t), intent(in) :: cl
    real(dp), intent(out) :: cpu, wall
    real(dp) :: x(k), w0
    real :: c0, c1
    integer :: step, st

    x = truth(:, 1)
    w0 = omp_get_wtime()
    call cpu_time(c0)
    do step = 1, nint(timing_mtu / dt)
      call one_scale_rk4_step(cl, f, dt, x, work(0), st)
    end do
    call cpu_time(c1)
    wall = (omp_get_wtime() - w0) / timing_mtu
    cpu = real(c1 - c0, dp) / timing_mtu
  end subroutine time_one_scale

  subroutine time_two_scale(cpu, wall)
    real(dp), intent(out) :: cpu, wall
    type(l96_params) :: p
    real(dp) :: x(k), y(j * k), w0
    real :: c0, c1
    integer :: step

    p = l96_params(k=k, j=j, f=f, h=h, b=b, c=c)
    x = state0(1:k)
    y = state0(k + 1:)
    w0 = omp_get_wtime()
    call cpu_time(c0)
    do step = 1, nint(timing_mtu / dt_truth)
      call two_scale_rk4_step(p, dt_truth, x, y)
    end do
    call cpu_time(c1)
    wall = (omp_get_wtime() - w0) / timing_mtu
    cpu = real(c1 - c0, dp) / timing_mtu
  end subroutine time_two_scale

  pure real(dp) function median(v)
    real(dp), intent(in) :: v(:)
    real(dp) :: s(size(v)), t
    integer :: a, z

    s = v
    do a = 2, size(s)   ! insertion sort: a handful of repeats
      t = s(a)
      z = a - 1
      do while (z >= 1)
        if (s(z) <= t) exit
        s(z + 1) = s(z)
        z = z - 1
      end do
      s(z + 1) = t
    end do
    median = 0.5_dp * (s((size(s) + 1) / 2) + s(size(s) / 2 + 1))
  end function median

  function ieee_nan() result(v)
    use, intrinsic :: ieee_arithmetic, only: ieee_value, ieee_quiet_nan
    real(dp) :: v
    v = ieee_value(v, ieee_quiet_nan)
  end function ieee_nan

  subroutine write_f64(name, a)
    character(len=*), intent(in) :: name
    real(dp), intent(in) :: a(:, :, :)
    integer :: u, ios

    open (newunit=u, file=trim(out_dir)//'/'//name, access='stream', form='unformatted', &
          status='replace', action='write', iostat=ios, iomsg=msg)
    if (ios == 0) write (u, iostat=ios, iomsg=msg) a
    if (ios /= 0) call die(trim(out_dir)//'/'//name//': '//trim(msg))
    close (u)
  end subroutine write_f64

  !> forecast.json, and one line per closure on standard output.
  subroutine report()
    integer :: u, il, ic
    character(len=32) :: num

    write (*, '(a, i0, a, i0, a, *(1x, f0.3))') 'l96_forecast: ', n_members, ' members, ', n_threads, &
      ' threads; RMSE of X at leads (MTU)', lead_steps(1:n_leads) * dt
    do ic = 1, n_cl
      write (*, '(2x, a16, *(1x, f7.3))', advance='no') cls(ic)%label, rmse(:, ic)
      write (*, '(a, i0, a, f0.3, a)') '   blown up ', blown(ic), ', ', 1e3_dp * median(cpu_mtu(:, ic)), &
        ' ms CPU per MTU'
    end do
    write (*, '(2x, a16, a, f0.3, a)') 'two-scale', ' (truth) ', 1e3_dp * median(two_cpu), ' ms CPU per MTU'

    open (newunit=u, file=trim(out_dir)//'/forecast.json', status='replace', action='write')
    write (u, '(a, i0, a, i0, a, i0, a, i0, a, i0, a)') '{"threads": ', n_threads, ', "n_members": ', &
      n_members, ', "member_stride": ', member_stride, ', "climate_members": ', climate_members, &
      ', "climate_every": ', climate_every, ','
    write (u, '(a, es23.16, a, es23.16, a, es23.16, a, es23.16, a, i0, a)') ' "dt": ', dt, &
      ', "dt_truth": ', dt_truth, ', "climate_mtu": ', climate_mtu, ', "timing_mtu": ', timing_mtu, &
      ', "timing_repeats": ', timing_repeats, ','
    write (u, '(a)', advance='no') ' "real32_entry": '//merge('true ', 'false', real32_entry)
    write (u, '(a)', advance='no') ', "lead_steps": ['
    write (u, '(*(i0, :, ", "))', advance='no') lead_steps(1:n_leads)
    write (u, '(a)') '],'
    write (u, '(a)') ' "two_scale": {"cpu_seconds_per_mtu": '//fmt(median(two_cpu))// &
      ', "wall_seconds_per_mtu": '//fmt(median(two_wall))//'},'
    write (u, '(a)') ' "closures": ['
    do ic = 1, n_cl
      write (u, '(a)', advance='no') '  {"label": "'//trim(cls(ic)%label)//'", "spec": "'// &
        trim(closures(ic))//'", "rmse": ['
      do il = 1, n_leads
        num = fmt(rmse(il, ic))
        write (u, '(a)', advance='no') trim(num)
        if (il < n_leads) write (u, '(a)', advance='no') ', '
      end do
      write (u, '(a, i0, a)', advance='no') '], "n_blown_up": ', blown(ic), ', "ensemble_seconds": '// &
        fmt(ens_s(ic))//', "climate_seconds": '//fmt(clim_s(ic))
      write (u, '(a)', advance='no') ', "cpu_seconds_per_mtu": '//fmt(median(cpu_mtu(:, ic)))// &
        ', "wall_seconds_per_mtu": '//fmt(median(wall_mtu(:, ic)))//'}'
      if (ic < n_cl) write (u, '(a)') ','
    end do
    write (u, '(a)') ''
    write (u, '(a)') ' ]}'
    close (u)
  end subroutine report

  !> A JSON number (NaN, which JSON lacks, as null).
  function fmt(v) result(s)
    use, intrinsic :: ieee_arithmetic, only: ieee_is_nan
    real(dp), intent(in) :: v
    character(len=:), allocatable :: s
    character(len=32) :: buf

    if (ieee_is_nan(v)) then
      s = 'null'
    else
      write (buf, '(es23.16)') v
      s = trim(adjustl(buf))
    end if
  end function fmt

end program l96_forecast
