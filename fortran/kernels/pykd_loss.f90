!> Classification and regression losses with their gradients, fused in one pass.
!!
!! Logits are stored one sample per column, `z(classes, n)`; labels are
!! 0-based class indices. Losses are batch means (sum over classes, mean over
!! samples), and gradients are those of the batch mean. With `n_mean` (>= n)
!! the batch is a shard of a larger one: sums are divided by n_mean instead
!! of n, so the per-sample gradients are those of the whole batch and the
!! shards' losses add up to its loss (data-parallel training, issue 16).
!!
!! Hinton distillation loss, with p(z; T) = softmax(z / T):
!!
!!     loss = alpha * CE(p(s; 1), y) + (1 - alpha) * T**2 * KL(p(t; T) || p(s; T))
!!
!! alpha weights the hard-label term (as in the seed PyTorch example) and
!! T**2 keeps the soft term's gradient on the scale of the hard one.
!! d loss / d s = alpha/n (p(s;1) - onehot(y)) + (1 - alpha) T/n (p(s;T) - p(t;T)).
!!
!! Regression (`regression_loss`), outputs s(n_out, n), targets y(n_out, n),
!! means over all n * n_out elements (PyTorch's "mean" reduction):
!!
!!     MSE:   l(r) = r**2
!!     Huber: l(r) = r**2 / 2 if |r| <= delta, else delta (|r| - delta / 2)
!!     loss  = alpha * mean l(s - y) + (1 - alpha) * mean l(s - t)
!!
!! with teacher outputs t for distillation (alpha = 1 without a teacher).
module pykd_loss
  use iso_fortran_env, only: real32, real64, int64
  use ieee_arithmetic, only: ieee_is_finite
  use pykd_config, only: PAR_MIN_WORK
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, &
                         PYKD_ERR_ALLOC, set_status
  implicit none
  private
  public :: cross_entropy, kd_loss, regression_loss

contains

  !> Mean cross-entropy of softmax(z) against `labels`, and d loss / d z.
  subroutine cross_entropy(z, labels, loss, dz, stat, errmsg, n_mean)
    real(real32), intent(in), contiguous :: z(:, :)        !! (classes, n) logits
    integer(int64), intent(in) :: labels(:)                !! (n), in [0, classes)
    real(real32), intent(out) :: loss
    real(real32), intent(out), contiguous, optional :: dz(:, :) !! (classes, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer, intent(in), optional :: n_mean                !! divisor of the mean (default n)
    ! alpha = 1 makes kd_loss exactly the cross-entropy; the teacher is unused.
    call fused(z, z, labels, 1.0_real32, 1.0_real32, loss, dz, stat, errmsg, 'cross_entropy', n_mean)
  end subroutine cross_entropy

  !> Hinton distillation loss (see the module header) and d loss / d s.
  subroutine kd_loss(s, t, labels, temperature, alpha, loss, ds, stat, errmsg, n_mean)
    real(real32), intent(in), contiguous :: s(:, :)        !! (classes, n) student logits
    real(real32), intent(in), contiguous :: t(:, :)        !! (classes, n) teacher logits
    integer(int64), intent(in) :: labels(:)                !! (n), in [0, classes)
    real(real32), intent(in) :: temperature                !! T > 0
    real(real32), intent(in) :: alpha                      !! weight of the hard term, in [0, 1]
    real(real32), intent(out) :: loss
    real(real32), intent(out), contiguous, optional :: ds(:, :) !! (classes, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer, intent(in), optional :: n_mean                !! divisor of the mean (default n)
    call fused(s, t, labels, temperature, alpha, loss, ds, stat, errmsg, 'kd_loss', n_mean)
  end subroutine kd_loss

  subroutine fused(s, t, labels, temp, alpha, loss, ds, stat, errmsg, name, n_mean)
    real(real32), intent(in), contiguous :: s(:, :), t(:, :)
    integer(int64), intent(in) :: labels(:)
    real(real32), intent(in) :: temp, alpha
    real(real32), intent(out) :: loss
    real(real32), intent(out), contiguous, optional :: ds(:, :)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    character(len=*), intent(in) :: name
    integer, intent(in), optional :: n_mean
    real(real64), allocatable :: per_sample(:)
    integer :: n, c, j, ierr, nm

    c = size(s, 1); n = size(s, 2)
    loss = 0
    nm = n
    if (present(n_mean)) nm = n_mean
    if (size(t, 1) /= c .or. size(t, 2) /= n .or. size(labels) /= n .or. c < 1 .or. n < 1 &
        .or. nm < n) then
      call set_status(PYKD_ERR_ARG, name//': inconsistent sizes (or n_mean < n)', stat, errmsg)
      return
    end if
    if (present(ds)) then
      if (size(ds, 1) /= c .or. size(ds, 2) /= n) then
        call set_status(PYKD_ERR_ARG, name//': gradient has the wrong shape', stat, errmsg)
        return
      end if
    end if
    if (.not. (temp > 0 .and. ieee_is_finite(temp))) then
      call set_status(PYKD_ERR_ARG, name//': temperature must be finite and > 0', stat, errmsg)
      return
    end if
    if (.not. (alpha >= 0 .and. alpha <= 1)) then
      call set_status(PYKD_ERR_ARG, name//': alpha must lie in [0, 1]', stat, errmsg)
      return
    end if
    if (any(labels < 0 .or. labels >= c)) then
      call set_status(PYKD_ERR_LABEL, name//': a label lies outside [0, classes)', stat, errmsg)
      return
    end if
    allocate (per_sample(n), stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, name//': cannot allocate workspace', stat, errmsg)
      return
    end if

    ! Per-sample losses are summed serially afterwards, so the result does
    ! not depend on how OpenMP split the samples.
    !$omp parallel do schedule(static) if(size(s) >= PAR_MIN_WORK)
    do j = 1, n
      if (present(ds)) then
        call kd_column(s(:, j), t(:, j), int(labels(j)) + 1, temp, alpha, nm, per_sample(j), ds(:, j))
      else
        call kd_column(s(:, j), t(:, j), int(labels(j)) + 1, temp, alpha, nm, per_sample(j))
      end if
    end do
    !$omp end parallel do

    loss = real(sum(per_sample) / nm, real32)
    if (ieee_is_finite(loss)) then
      call set_status(PYKD_OK, '', stat, errmsg)
    else
      call set_status(PYKD_ERR_NONFINITE, name//': loss is not finite (NaN or inf in the logits)', &
                      stat, errmsg)
    end if
  end subroutine fused

  !> Loss of one sample and, optionally, its gradient (already divided by n,
  !! the divisor of the batch mean).
  pure subroutine kd_column(s, t, y, temp, alpha, n, loss, ds)
    real(real32), intent(in) :: s(:), t(:)
    integer, intent(in) :: y             !! 1-based label
    real(real32), intent(in) :: temp, alpha
    integer, intent(in) :: n
    real(real64), intent(out) :: loss
    real(real32), intent(out), optional :: ds(:)
    real(real32) :: smax, tmax, lse1, lse_s, lse_t, logq, logp, p
    real(real64) :: e1, es, et, kl, w_hard, w_soft
    integer :: i
    logical :: soft

    soft = alpha < 1
    tmax = 0; lse_s = 0; lse_t = 0
    ! maxval skips NaN (gfortran), but a NaN logit makes its exp sum NaN, so the
    ! loss is NaN and `fused` rejects it (PYKD_ERR_NONFINITE), as today.
    smax = maxval(s)
    e1 = 0
    ! exp one element at a time in every loop here: vectorized, gfortran calls
    ! glibc's SIMD expf, whose bits differ between the baseline and avx2 builds.
    !GCC$ novector
    do i = 1, size(s)
      e1 = e1 + exp(s(i) - smax)
    end do
    lse1 = real(log(e1), real32)
    loss = 0
    ! Each term only when its weight is non-zero: 0 * inf would give NaN.
    if (alpha > 0) loss = alpha * (-(s(y) - smax - lse1))
    w_hard = real(alpha, real64) / n
    w_soft = real(1 - alpha, real64) * temp / n
    kl = 0
    if (soft) then
      tmax = maxval(t)
      es = 0; et = 0
      !GCC$ novector
      do i = 1, size(s)
        es = es + exp((s(i) - smax) / temp)
        et = et + exp((t(i) - tmax) / temp)
      end do
      lse_s = real(log(es), real32); lse_t = real(log(et), real32)
    end if

    if (present(ds)) then
      !GCC$ novector
      do i = 1, size(s)
        ds(i) = real(w_hard * exp(s(i) - smax - lse1), real32)
      end do
    end if
    if (soft) then
      !GCC$ novector
      do i = 1, size(s)
        logq = (s(i) - smax) / temp - lse_s
        logp = (t(i) - tmax) / temp - lse_t
        p = exp(logp)
        kl = kl + p * (logp - logq)
        if (present(ds)) ds(i) = ds(i) + real(w_soft * (exp(logq) - p), real32)
      end do
      loss = loss + real(1 - alpha, real64) * temp**2 * kl
    end if
    if (present(ds)) ds(y) = ds(y) - real(w_hard, real32)
  end subroutine kd_column

  !> Regression loss (MSE, or Huber with `huber`), optionally distilled
  !! against teacher outputs `t` with weight 1 - alpha (see the module header),
  !! and d loss / d s.
  subroutine regression_loss(s, y, huber, delta, loss, ds, t, alpha, stat, errmsg, n_mean)
    real(real32), intent(in), contiguous :: s(:, :)        !! (n_out, n) student outputs
    real(real32), intent(in), contiguous :: y(:, :)        !! (n_out, n) targets
    logical, intent(in) :: huber                           !! Huber instead of MSE
    real(real32), intent(in) :: delta                      !! Huber threshold > 0
    real(real32), intent(out) :: loss
    real(real32), intent(out), contiguous, optional :: ds(:, :) !! (n_out, n)
    real(real32), intent(in), contiguous, optional :: t(:, :)   !! (n_out, n) teacher outputs
    real(real32), intent(in), optional :: alpha            !! weight of the target term, in [0, 1]
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer, intent(in), optional :: n_mean                !! samples of the mean (default n)
    real(real64), allocatable :: per_sample(:)
    real(real32) :: a, w_y, w_t
    integer :: n, c, j, ierr, nm

    c = size(s, 1); n = size(s, 2)
    loss = 0
    a = 1
    if (present(alpha)) a = alpha
    nm = n
    if (present(n_mean)) nm = n_mean
    if (size(y, 1) /= c .or. size(y, 2) /= n .or. c < 1 .or. n < 1 .or. nm < n) then
      call set_status(PYKD_ERR_ARG, 'regression_loss: targets and outputs differ in shape (or n_mean < n)', &
                      stat, errmsg)
      return
    end if
    if (present(t)) then
      if (size(t, 1) /= c .or. size(t, 2) /= n) then
        call set_status(PYKD_ERR_ARG, 'regression_loss: teacher outputs have the wrong shape', stat, errmsg)
        return
      end if
    end if
    if (present(ds)) then
      if (size(ds, 1) /= c .or. size(ds, 2) /= n) then
        call set_status(PYKD_ERR_ARG, 'regression_loss: gradient has the wrong shape', stat, errmsg)
        return
      end if
    end if
    if (.not. (a >= 0 .and. a <= 1) .or. (a < 1 .and. .not. present(t))) then
      call set_status(PYKD_ERR_ARG, 'regression_loss: alpha must lie in [0, 1] (1 without a teacher)', &
                      stat, errmsg)
      return
    end if
    if (huber .and. .not. (delta > 0 .and. ieee_is_finite(delta))) then
      call set_status(PYKD_ERR_ARG, 'regression_loss: Huber delta must be finite and > 0', stat, errmsg)
      return
    end if
    allocate (per_sample(n), stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, 'regression_loss: cannot allocate workspace', stat, errmsg)
      return
    end if
    ! Gradient weights of the two terms (d mean / d s folds 1/(n c) in).
    w_y = real(real(a, real64) / (real(nm, real64) * c), real32)
    w_t = real(real(1 - a, real64) / (real(nm, real64) * c), real32)

    ! Per-sample sums, then a serial total: the bits do not depend on threads.
    !$omp parallel do schedule(static) if(size(s) >= PAR_MIN_WORK)
    do j = 1, n
      per_sample(j) = 0
      if (present(ds)) ds(:, j) = 0
      if (a > 0) call reg_column(s(:, j), y(:, j), huber, delta, a, w_y, per_sample(j), ds, j)
      if (a < 1) call reg_column(s(:, j), t(:, j), huber, delta, 1 - a, w_t, per_sample(j), ds, j)
    end do
    !$omp end parallel do

    loss = real(sum(per_sample) / (real(nm, real64) * c), real32)
    if (ieee_is_finite(loss)) then
      call set_status(PYKD_OK, '', stat, errmsg)
    else
      call set_status(PYKD_ERR_NONFINITE, 'regression_loss: loss is not finite (NaN or inf in outputs '// &
                      'or targets)', stat, errmsg)
    end if
  end subroutine regression_loss

  !> Adds weight * sum l(s - y) of one sample to acc, and w * l'(s - y) to ds(:, j).
  pure subroutine reg_column(s, y, huber, delta, weight, w, acc, ds, j)
    real(real32), intent(in) :: s(:), y(:)
    logical, intent(in) :: huber
    real(real32), intent(in) :: delta, weight, w
    real(real64), intent(inout) :: acc
    real(real32), intent(inout), contiguous, optional :: ds(:, :)
    integer, intent(in) :: j
    real(real32) :: r
    real(real64) :: part
    integer :: i
    part = 0
    do i = 1, size(s)
      r = s(i) - y(i)
      if (.not. huber) then
        part = part + real(r, real64)**2
        if (present(ds)) ds(i, j) = ds(i, j) + w * (2 * r)
      else if (abs(r) <= delta) then
        part = part + 0.5_real64 * real(r, real64)**2
        if (present(ds)) ds(i, j) = ds(i, j) + w * r
      else
        part = part + real(delta, real64) * (abs(real(r, real64)) - 0.5_real64 * delta)
        if (present(ds)) ds(i, j) = ds(i, j) + w * sign(delta, r)
      end if
    end do
    acc = acc + weight * part
  end subroutine reg_column

end module pykd_loss
