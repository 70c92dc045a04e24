!> The activations of the model format, in place on a (m, n) block.
!!
!! Codes are ACT_* of pykd_codes. Every activation propagates NaN (a NaN
!! input gives a NaN output): relu is written as a comparison that keeps
!! NaN, since gfortran's max(y, 0) returns 0 for a NaN y.
!!
!! The loops take explicit-shape arrays (gfortran 12 loads assumed-shape
!! columns element by element inside OpenMP regions, docs/performance.md)
!! and split over columns only above PAR_MIN_WORK elements. Each element's
!! result depends on that element alone, so the bits do not depend on the
!! thread count.
module pykd_activation
  use iso_fortran_env, only: real32, int64
  use pykd_config, only: PAR_MIN_WORK
  use pykd_codes, only: ACT_IDENTITY, ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_GELU, ACT_SILU, ACT_MAX
  implicit none
  private
  public :: apply_activation, bias_activation, valid_activation

contains

  !> True for a known activation code.
  pure logical function valid_activation(act)
    integer(int64), intent(in) :: act
    valid_activation = act >= ACT_IDENTITY .and. act <= ACT_MAX
  end function valid_activation

  !> y = act(y) in place. An unknown code leaves y unchanged (callers
  !! validate codes first: valid_activation).
  subroutine apply_activation(act, m, n, y)
    integer, intent(in) :: act, m, n
    real(real32), intent(inout) :: y(m, n)
    integer :: j

    if (act == ACT_IDENTITY) return
    !$omp parallel do schedule(static) if(parallel: int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      call act_column(act, m, y(:, j))
    end do
    !$omp end parallel do
  end subroutine apply_activation

  !> y = act(y + b) in place, b added to every column, one pass.
  subroutine bias_activation(act, m, n, b, y)
    integer, intent(in) :: act, m, n
    real(real32), intent(in) :: b(m)
    real(real32), intent(inout) :: y(m, n)
    integer :: j

    !$omp parallel do schedule(static) if(parallel: int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      y(:, j) = y(:, j) + b
      call act_column(act, m, y(:, j))
    end do
    !$omp end parallel do
  end subroutine bias_activation

  !> One column. The select is on the activation code, once per column.
  !! tanh, exp and erf are called one element at a time (!GCC$ novector):
  !! under -fopenmp, gfortran vectorizes them with glibc's SIMD variants
  !! (libmvec, declared by the math-vector-fortran.h pre-include), whose bits
  !! differ from the scalar functions and between the SSE and AVX2 builds,
  !! so the baseline and avx2 builds (and Python and Fortran) would disagree.
  subroutine act_column(act, m, z)
    integer, intent(in) :: act, m
    real(real32), intent(inout) :: z(m)
    real(real32) :: e(m)
    integer :: i

    select case (act)
    case (ACT_RELU)
      ! z < 0 is false for NaN, so NaN is kept; -0.0 stays -0.0 (as np.maximum).
      z = merge(0.0_real32, z, z < 0)
    case (ACT_TANH)
      !GCC$ novector
      do i = 1, m
        z(i) = tanh(z(i))
      end do
    case (ACT_SIGMOID)
      z = sigmoid(m, z)
    case (ACT_GELU)
      !GCC$ novector
      do i = 1, m
        z(i) = 0.5_real32 * z(i) * (1 + erf(z(i) / sqrt(2.0_real32)))
      end do
    case (ACT_SILU)
      e = sigmoid(m, z)
      z = z * e
    end select
  end subroutine act_column

  !> 1 / (1 + exp(-z)) without overflow: exp of -|z| only, so for z << 0
  !! the result is e / (1 + e) with e tiny instead of 1 / (1 + inf).
  pure function sigmoid(m, z) result(s)
    integer, intent(in) :: m
    real(real32), intent(in) :: z(m)
    real(real32) :: s(m), e(m)
    integer :: i
    !GCC$ novector
    do i = 1, m
      e(i) = exp(-abs(z(i)))
    end do
    s = merge(1 / (1 + e), e / (1 + e), z >= 0)
    ! NaN: z >= 0 is false, e is NaN, so s = NaN / (1 + NaN) = NaN.
  end function sigmoid

end module pykd_activation
