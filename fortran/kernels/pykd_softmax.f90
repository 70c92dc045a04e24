!> Softmax and log-softmax with temperature, one sample per column.
!!
!! p = softmax(z / T). Stable for any finite logits and T > 0: the column
!! maximum is subtracted *before* dividing by T, so (z - max z) / T <= 0 and
!! exp never overflows, even at |z| = 1e4 with T = 0.05.
module pykd_softmax
  use iso_fortran_env, only: real32, real64
  use ieee_arithmetic, only: ieee_is_finite
  use pykd_config, only: PAR_MIN_WORK
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_NONFINITE, set_status
  implicit none
  private
  public :: softmax, log_softmax, softmax_column, log_softmax_column

contains

  !> log p = (z - max z) / T - log(sum(exp((z - max z) / T))) for one sample.
  !! Returns the log-sum-exp term in `lse`; `ok` is false if the result is
  !! not finite (NaN or +inf among the logits, or every logit -inf).
  pure subroutine log_softmax_column(z, t, logp, ok)
    real(real32), intent(in) :: z(:)
    real(real32), intent(in) :: t
    real(real32), intent(out) :: logp(:)
    logical, intent(out) :: ok
    real(real32) :: zmax, lse
    real(real64) :: acc
    integer :: i

    ! maxval skips NaN (gfortran), but a NaN logit still makes its exp and the
    ! sum NaN, so such a column is reported through `ok`, never hidden.
    zmax = maxval(z)
    logp = (z - zmax) / t
    ! exp one element at a time (see softmax_column); the sum stays in order.
    acc = 0
    !GCC$ novector
    do i = 1, size(z)
      acc = acc + real(exp(logp(i)), real64)
    end do
    lse = real(log(acc), real32)
    logp = logp - lse
    ok = ieee_is_finite(lse) .and. ieee_is_finite(zmax)
  end subroutine log_softmax_column

  !> p = softmax(z / T) for one sample.
  pure subroutine softmax_column(z, t, p, ok)
    real(real32), intent(in) :: z(:)
    real(real32), intent(in) :: t
    real(real32), intent(out) :: p(:)
    logical, intent(out) :: ok
    real(real32) :: zmax, total
    integer :: i

    zmax = maxval(z)
    ! One element at a time: vectorized, gfortran calls glibc's SIMD expf,
    ! whose bits differ between the baseline and avx2 builds.
    !GCC$ novector
    do i = 1, size(z)
      p(i) = exp((z(i) - zmax) / t)
    end do
    total = real(sum(real(p, real64)), real32)
    p = p / total
    ok = ieee_is_finite(total) .and. ieee_is_finite(zmax)
  end subroutine softmax_column

  !> p(:, j) = softmax(z(:, j) / T) for every sample j.
  subroutine softmax(z, t, p, stat, errmsg)
    real(real32), intent(in), contiguous :: z(:, :)  !! (classes, n)
    real(real32), intent(in) :: t                     !! temperature, > 0
    real(real32), intent(out), contiguous :: p(:, :) !! (classes, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    call rowwise(z, t, p, .false., stat, errmsg)
  end subroutine softmax

  !> logp(:, j) = log_softmax(z(:, j) / T) for every sample j.
  subroutine log_softmax(z, t, logp, stat, errmsg)
    real(real32), intent(in), contiguous :: z(:, :)     !! (classes, n)
    real(real32), intent(in) :: t                        !! temperature, > 0
    real(real32), intent(out), contiguous :: logp(:, :) !! (classes, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    call rowwise(z, t, logp, .true., stat, errmsg)
  end subroutine log_softmax

  subroutine rowwise(z, t, out, take_log, stat, errmsg)
    real(real32), intent(in), contiguous :: z(:, :)
    real(real32), intent(in) :: t
    real(real32), intent(out), contiguous :: out(:, :)
    logical, intent(in) :: take_log
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer :: j, n_bad
    logical :: ok

    if (size(z, 1) /= size(out, 1) .or. size(z, 2) /= size(out, 2) .or. size(z, 1) < 1) then
      call set_status(PYKD_ERR_ARG, 'softmax: inconsistent sizes', stat, errmsg)
      return
    end if
    if (.not. (t > 0 .and. ieee_is_finite(t))) then
      call set_status(PYKD_ERR_ARG, 'softmax: temperature must be finite and > 0', stat, errmsg)
      return
    end if
    n_bad = 0
    !$omp parallel do schedule(static) private(ok) reduction(+:n_bad) if(size(z) >= PAR_MIN_WORK)
    do j = 1, size(z, 2)
      if (take_log) then
        call log_softmax_column(z(:, j), t, out(:, j), ok)
      else
        call softmax_column(z(:, j), t, out(:, j), ok)
      end if
      if (.not. ok) n_bad = n_bad + 1
    end do
    !$omp end parallel do
    if (n_bad > 0) then
      call set_status(PYKD_ERR_NONFINITE, 'softmax: logits contain NaN or +inf (or a row is all -inf)', &
                      stat, errmsg)
    else
      call set_status(PYKD_OK, '', stat, errmsg)
    end if
  end subroutine rowwise

end module pykd_softmax
