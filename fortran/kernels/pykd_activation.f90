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
  public :: apply_activation, bias_activation, valid_activation, activation_backward

  !> Elements per block of the transcendental activations (scratch on the stack).
  integer, parameter :: ACT_BLOCK = 256

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
    ! Small batches stay off OpenMP: even a region whose if() is false costs
    ! a team start in libgomp (a few microseconds per call inside a time loop).
    if (int(m, int64) * n < PAR_MIN_WORK) then
      do j = 1, n
        call act_column(act, m, y(:, j))
      end do
      return
    end if
    !$omp parallel do schedule(static)
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

    if (int(m, int64) * n < PAR_MIN_WORK) then   ! as in apply_activation
      do j = 1, n
        y(:, j) = y(:, j) + b
        call act_column(act, m, y(:, j))
      end do
      return
    end if
    !$omp parallel do schedule(static)
    do j = 1, n
      y(:, j) = y(:, j) + b
      call act_column(act, m, y(:, j))
    end do
    !$omp end parallel do
  end subroutine bias_activation

  !> One column, in blocks of ACT_BLOCK elements so that the scratch is a
  !! fixed-size local (no allocation per column, whatever n_out).
  subroutine act_column(act, m, z)
    integer, intent(in) :: act, m
    real(real32), intent(inout) :: z(m)
    integer :: i0

    if (act == ACT_RELU) then
      ! z < 0 is false for NaN, so NaN is kept; -0.0 stays -0.0 (as np.maximum).
      z = merge(0.0_real32, z, z < 0)
      return
    end if
    do i0 = 1, m, ACT_BLOCK
      call act_chunk(act, min(ACT_BLOCK, m - i0 + 1), z(i0:))
    end do
  end subroutine act_column

  !> The transcendental activations on k <= ACT_BLOCK elements. tanh, exp
  !! and erf are called one element at a time (!GCC$ novector): under
  !! -fopenmp, gfortran vectorizes them with glibc's SIMD variants (libmvec,
  !! declared by the math-vector-fortran.h pre-include), whose bits differ
  !! from the scalar functions and between the SSE and AVX2 builds, so the
  !! baseline and avx2 builds (and Python and Fortran) would disagree.
  subroutine act_chunk(act, k, z)
    integer, intent(in) :: act, k
    real(real32), intent(inout) :: z(k)
    real(real32) :: e(ACT_BLOCK)
    integer :: i

    select case (act)
    case (ACT_TANH)
      !GCC$ novector
      do i = 1, k
        z(i) = tanh(z(i))
      end do
    case (ACT_GELU)
      !GCC$ novector
      do i = 1, k
        e(i) = erf(z(i) / sqrt(2.0_real32))
      end do
      z = 0.5_real32 * z * (1 + e(:k))
    case (ACT_SIGMOID, ACT_SILU)
      ! 1 / (1 + exp(-z)) without overflow: exp of -|z| only, so for z << 0
      ! it is e / (1 + e) with e tiny instead of 1 / (1 + inf). NaN: z >= 0
      ! is false and e is NaN, so the result is NaN.
      !GCC$ novector
      do i = 1, k
        e(i) = exp(-abs(z(i)))
      end do
      e(:k) = merge(1 / (1 + e(:k)), e(:k) / (1 + e(:k)), z >= 0)
      if (act == ACT_SILU) then
        z = z * e(:k)
      else
        z = e(:k)
      end if
    end select
  end subroutine act_chunk

  !> dy = dy * act'(z) in place, for y = act(z) of the forward pass: the
  !! training step's derivative of sigmoid (from y: y (1 - y)), gelu (exact:
  !! Phi(z) + z phi(z)) and silu (s (1 + z (1 - s)), s = sigmoid(z)); gelu
  !! and silu read the pre-activation z, sigmoid does not. Other codes leave
  !! dy unchanged (relu and tanh are fused in pykd_dense's act_grad). Each
  !! element depends on that element alone, so the bits do not depend on
  !! the thread count.
  subroutine activation_backward(act, m, n, y, z, dy)
    integer, intent(in) :: act, m, n
    real(real32), intent(in) :: y(m, n), z(m, n)
    real(real32), intent(inout) :: dy(m, n)
    integer :: i0, j, k

    if (act /= ACT_SIGMOID .and. act /= ACT_GELU .and. act /= ACT_SILU) return
    !$omp parallel do schedule(static) private(i0, k) if(parallel: int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      do i0 = 1, m, ACT_BLOCK
        k = min(ACT_BLOCK, m - i0 + 1)
        call grad_chunk(act, k, y(i0:i0 + k - 1, j), z(i0:i0 + k - 1, j), dy(i0:i0 + k - 1, j))
      end do
    end do
    !$omp end parallel do
  end subroutine activation_backward

  !> activation_backward on k <= ACT_BLOCK elements; exp and erf one
  !! element at a time for the reason given at act_chunk.
  subroutine grad_chunk(act, k, y, z, dy)
    integer, intent(in) :: act, k
    real(real32), intent(in) :: y(k), z(k)
    real(real32), intent(inout) :: dy(k)
    real(real32), parameter :: RSQRT_2PI = 0.398942280401432677939946_real32
    real(real32) :: e(ACT_BLOCK), s(ACT_BLOCK)
    integer :: i

    select case (act)
    case (ACT_SIGMOID)
      dy = dy * (y * (1 - y))
    case (ACT_GELU)
      !GCC$ novector
      do i = 1, k
        e(i) = erf(z(i) / sqrt(2.0_real32))
      end do
      !GCC$ novector
      do i = 1, k
        s(i) = exp(-0.5_real32 * z(i) * z(i))
      end do
      dy = dy * (0.5_real32 * (1 + e(:k)) + z * (RSQRT_2PI * s(:k)))
    case (ACT_SILU)
      ! sigmoid(z) as in act_chunk (no overflow for z << 0).
      !GCC$ novector
      do i = 1, k
        e(i) = exp(-abs(z(i)))
      end do
      s(:k) = merge(1 / (1 + e(:k)), e(:k) / (1 + e(:k)), z >= 0)
      dy = dy * (s(:k) * (1 + z * (1 - s(:k))))
    end select
  end subroutine grad_chunk

end module pykd_activation
