!> Closures of the one-scale Lorenz-96 model: U_k as a function of the slow
!! stencil X_{k-2}..X_{k+2}. A closure is none (U = 0), a polynomial in X_k
!! (Wilks 2005's deterministic baseline) or a pykd network called through
!! `pykd_predict`, once per RK4 stage for all K slow variables (K columns of
!! 5 features: one batched call).
module l96_closure
  use iso_fortran_env, only: real32
  use l96, only: dp, slow_drift, stencil_features
  use pykd, only: pykd_model, pykd_workspace, pykd_load_model, pykd_predict, pykd_free, PYKD_OK, &
                  PYKD_ERR_ARG
  implicit none
  private

  integer, parameter, public :: CLOSURE_NONE = 0, CLOSURE_POLY = 1, CLOSURE_NET = 2
  integer, parameter, public :: N_POLY = 5   !! polynomial coefficients c0..c4

  type, public :: closure_t
    character(len=64) :: label = ''
    integer :: kind = CLOSURE_NONE
    real(dp) :: poly(0:N_POLY - 1) = 0     !! U = sum_i poly(i) X_k**i
    logical :: real32_entry = .false.      !! call pykd_predict with real32 arrays (else real64)
    type(pykd_model) :: net
  end type closure_t

  public :: closure_from_spec, closure_free, one_scale_tendency, one_scale_rk4_step

contains

  !> 'none', 'poly' (coefficients `poly`) or 'net:PATH' (a pykd model file
  !! of 5 inputs and 1 output). The label is the spec, or the file's name
  !! without directory and `.pykd` for a network.
  subroutine closure_from_spec(spec, poly, real32_entry, cl, stat, errmsg)
    character(len=*), intent(in) :: spec
    real(dp), intent(in) :: poly(0:N_POLY - 1)
    logical, intent(in) :: real32_entry
    type(closure_t), intent(out) :: cl
    integer, intent(out) :: stat
    character(len=*), intent(out) :: errmsg
    character(len=:), allocatable :: path
    integer :: slash, dot

    stat = PYKD_OK
    errmsg = ''
    cl%real32_entry = real32_entry
    select case (spec)
    case ('none')
      cl%kind = CLOSURE_NONE
      cl%label = 'none'
    case ('poly')
      cl%kind = CLOSURE_POLY
      cl%label = 'poly'
      cl%poly = poly
    case default
      if (len(spec) < 5 .or. spec(1:min(4, len(spec))) /= 'net:') then
        stat = PYKD_ERR_ARG
        errmsg = 'closure "'//spec//'": expected none, poly or net:PATH'
        return
      end if
      path = spec(5:)
      cl%kind = CLOSURE_NET
      call pykd_load_model(path, cl%net, stat, errmsg)
      if (stat /= PYKD_OK) return
      if (cl%net%n_features /= 5 .or. cl%net%n_outputs /= 1) then
        stat = PYKD_ERR_ARG
        write (errmsg, '(a, i0, a, i0, a)') path//': the closure needs 5 inputs and 1 output, the model has ', &
          cl%net%n_features, ' and ', cl%net%n_outputs, ''
        call pykd_free(cl%net)
        return
      end if
      slash = index(path, '/', back=.true.)
      dot = index(path, '.pykd', back=.true.)
      if (dot <= slash) dot = len(path) + 1
      cl%label = path(slash + 1:dot - 1)
    end select
  end subroutine closure_from_spec

  subroutine closure_free(cl)
    type(closure_t), intent(inout) :: cl
    if (cl%kind == CLOSURE_NET) call pykd_free(cl%net)
  end subroutine closure_free

  !> dX/dt of the one-scale model: the resolved drift plus the closure's U.
  !! `work` is the calling thread's own pykd workspace.
  subroutine one_scale_tendency(cl, f, x, dxdt, work, stat)
    type(closure_t), intent(in) :: cl
    real(dp), intent(in) :: f
    real(dp), intent(in) :: x(:)
    real(dp), intent(out) :: dxdt(:)
    type(pykd_workspace), intent(inout) :: work
    integer, intent(out) :: stat
    real(dp) :: feat(5, size(x)), u(1, size(x))
    real(real32) :: feat32(5, size(x)), u32(1, size(x))
    integer :: i

    stat = PYKD_OK
    call slow_drift(x, f, dxdt)
    select case (cl%kind)
    case (CLOSURE_POLY)
      ! Horner, highest coefficient first.
      u(1, :) = cl%poly(N_POLY - 1)
      do i = N_POLY - 2, 0, -1
        u(1, :) = u(1, :) * x + cl%poly(i)
      end do
      dxdt = dxdt + u(1, :)
    case (CLOSURE_NET)
      call stencil_features(x, feat)
      if (cl%real32_entry) then
        feat32 = real(feat, real32)
        call pykd_predict(cl%net, feat32, u32, stat, work=work)
        u = real(u32, dp)
      else
        call pykd_predict(cl%net, feat, u, stat, work=work)
      end if
      dxdt = dxdt + u(1, :)
    end select
  end subroutine one_scale_tendency

  !> One RK4 step of the one-scale model, in place: four closure calls.
  subroutine one_scale_rk4_step(cl, f, dt, x, work, stat)
    type(closure_t), intent(in) :: cl
    real(dp), intent(in) :: f, dt
    real(dp), intent(inout) :: x(:)
    type(pykd_workspace), intent(inout) :: work
    integer, intent(out) :: stat
    real(dp), dimension(size(x)) :: k1, k2, k3, k4
    integer :: s2, s3, s4

    call one_scale_tendency(cl, f, x, k1, work, stat)
    call one_scale_tendency(cl, f, x + 0.5_dp * dt * k1, k2, work, s2)
    call one_scale_tendency(cl, f, x + 0.5_dp * dt * k2, k3, work, s3)
    call one_scale_tendency(cl, f, x + dt * k3, k4, work, s4)
    if (stat == PYKD_OK) stat = s2
    if (stat == PYKD_OK) stat = s3
    if (stat == PYKD_OK) stat = s4
    x = x + (dt / 6.0_dp) * (k1 + 2.0_dp * k2 + 2.0_dp * k3 + k4)
  end subroutine one_scale_rk4_step

end module l96_closure
