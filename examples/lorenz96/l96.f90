!> The Lorenz-96 models of the example (Lorenz 1996; the setup of Wilks 2005
!! and Gagne et al. 2020): no pykd here, only the physics and RK4.
!!
!! Two-scale model, K slow variables X_k and J fast variables Y_{j,k} per slow
!! one, all periodic (the fast ones as one ring of J*K: Y_{J+1,k} = Y_{1,k+1}):
!!
!!   dX_k/dt     = -X_{k-1} (X_{k-2} - X_{k+1}) - X_k + F + U_k,
!!   U_k         = -(h c / b) sum_j Y_{j,k}                      (the subgrid tendency)
!!   dY_{j,k}/dt = -c b Y_{j+1,k} (Y_{j+2,k} - Y_{j-1,k}) - c Y_{j,k} + (h c / b) X_k
!!
!! The one-scale model keeps only X and replaces U_k by a closure of the
!! stencil X_{k-2}..X_{k+2} (the caller supplies U for each RK4 stage).
module l96
  use iso_fortran_env, only: real64
  implicit none
  private

  integer, parameter, public :: dp = real64

  !> Parameters of the two-scale system (defaults: K = 8, J = 32, F = 20, h = 1, b = c = 10).
  type, public :: l96_params
    integer :: k = 8
    integer :: j = 32
    real(dp) :: f = 20.0_dp
    real(dp) :: h = 1.0_dp
    real(dp) :: b = 10.0_dp
    real(dp) :: c = 10.0_dp
  end type l96_params

  public :: slow_drift, subgrid_tendency, two_scale_tendency, two_scale_rk4_step, stencil_features

contains

  !> The resolved part of dX/dt: -X_{k-1}(X_{k-2} - X_{k+1}) - X_k + F (no U).
  pure subroutine slow_drift(x, f, dxdt)
    real(dp), intent(in) :: x(:)
    real(dp), intent(in) :: f
    real(dp), intent(out) :: dxdt(:)
    integer :: k, n, km2, km1, kp1

    n = size(x)
    do k = 1, n
      km2 = modulo(k - 3, n) + 1
      km1 = modulo(k - 2, n) + 1
      kp1 = modulo(k, n) + 1
      dxdt(k) = -x(km1) * (x(km2) - x(kp1)) - x(k) + f
    end do
  end subroutine slow_drift

  !> U_k = -(h c / b) sum_j Y_{j,k}, y(j + (k-1) J).
  pure subroutine subgrid_tendency(p, y, u)
    type(l96_params), intent(in) :: p
    real(dp), intent(in) :: y(:)
    real(dp), intent(out) :: u(:)
    integer :: k

    do k = 1, p%k
      u(k) = -(p%h * p%c / p%b) * sum(y((k - 1) * p%j + 1:k * p%j))
    end do
  end subroutine subgrid_tendency

  !> Tendencies of the two-scale system for x(K) and y(J*K).
  pure subroutine two_scale_tendency(p, x, y, dxdt, dydt)
    type(l96_params), intent(in) :: p
    real(dp), intent(in) :: x(:), y(:)
    real(dp), intent(out) :: dxdt(:), dydt(:)
    real(dp) :: u(p%k), cb, coupling
    integer :: i, n, k

    call slow_drift(x, p%f, dxdt)
    call subgrid_tendency(p, y, u)
    dxdt = dxdt + u
    n = size(y)
    cb = p%c * p%b
    coupling = p%h * p%c / p%b
    ! The ring wraps at its ends only: the interior needs no modulo.
    do i = 2, n - 2
      dydt(i) = -cb * y(i + 1) * (y(i + 2) - y(i - 1)) - p%c * y(i)
    end do
    dydt(1) = -cb * y(2) * (y(3) - y(n)) - p%c * y(1)
    dydt(n - 1) = -cb * y(n) * (y(1) - y(n - 2)) - p%c * y(n - 1)
    dydt(n) = -cb * y(1) * (y(2) - y(n - 1)) - p%c * y(n)
    do k = 1, p%k
      dydt((k - 1) * p%j + 1:k * p%j) = dydt((k - 1) * p%j + 1:k * p%j) + coupling * x(k)
    end do
  end subroutine two_scale_tendency

  !> One classical RK4 step of the two-scale system, in place.
  pure subroutine two_scale_rk4_step(p, dt, x, y)
    type(l96_params), intent(in) :: p
    real(dp), intent(in) :: dt
    real(dp), intent(inout) :: x(:), y(:)
    real(dp), dimension(size(x)) :: kx1, kx2, kx3, kx4
    real(dp), dimension(size(y)) :: ky1, ky2, ky3, ky4

    call two_scale_tendency(p, x, y, kx1, ky1)
    call two_scale_tendency(p, x + 0.5_dp * dt * kx1, y + 0.5_dp * dt * ky1, kx2, ky2)
    call two_scale_tendency(p, x + 0.5_dp * dt * kx2, y + 0.5_dp * dt * ky2, kx3, ky3)
    call two_scale_tendency(p, x + dt * kx3, y + dt * ky3, kx4, ky4)
    x = x + (dt / 6.0_dp) * (kx1 + 2.0_dp * kx2 + 2.0_dp * kx3 + kx4)
    y = y + (dt / 6.0_dp) * (ky1 + 2.0_dp * ky2 + 2.0_dp * ky3 + ky4)
  end subroutine two_scale_rk4_step

  !> feat(:, k) = (X_{k-2}, X_{k-1}, X_k, X_{k+1}, X_{k+2}), periodic: the
  !! network's input, one column (sample) per slow variable.
  pure subroutine stencil_features(x, feat)
    real(dp), intent(in) :: x(:)
    real(dp), intent(out) :: feat(:, :)   !! (5, size(x))
    integer :: k, d, n

    n = size(x)
    do k = 1, n
      do d = -2, 2
        feat(d + 3, k) = x(modulo(k + d - 1, n) + 1)
      end do
    end do
  end subroutine stencil_features

end module l96
