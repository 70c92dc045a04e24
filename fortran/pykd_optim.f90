!> Optimizer steps, in place, on one flat parameter buffer.
!!
!! A model keeps every weight and bias in one contiguous buffer, so a step is
!! a single pass over memory. An optional mask (0 = pruned) keeps pruned
!! entries, and their optimizer state, exactly zero.
!! Conventions follow PyTorch's SGD (no dampening) and Adam (L2 weight decay
!! added to the gradient; bias-corrected moments).
module pykd_optim
  use iso_fortran_env, only: real32, real64, int8, int64
  use pykd_config, only: PAR_MIN_OPT
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, set_status
  implicit none
  private
  public :: sgd_step, adam_step

contains

  !> v = momentum v + (g + wd p);  p = p - lr v
  subroutine sgd_step(p, g, vel, lr, momentum, weight_decay, mask, stat, errmsg)
    real(real32), intent(inout), contiguous :: p(:)   !! parameters
    real(real32), intent(in), contiguous :: g(:)      !! gradients
    real(real32), intent(inout), contiguous :: vel(:) !! momentum buffer
    real(real32), intent(in) :: lr, momentum, weight_decay
    integer(int8), intent(in), contiguous, optional :: mask(:) !! 0 = pruned
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int64) :: i, n
    real(real32) :: gi

    n = size(p, kind=int64)
    if (size(g, kind=int64) /= n .or. size(vel, kind=int64) /= n) then
      call set_status(PYKD_ERR_ARG, 'sgd_step: params, grads and velocity differ in size', stat, errmsg)
      return
    end if
    if (present(mask)) then
      if (size(mask, kind=int64) /= n) then
        call set_status(PYKD_ERR_ARG, 'sgd_step: mask differs in size from params', stat, errmsg)
        return
      end if
    end if
    call set_status(PYKD_OK, '', stat, errmsg)

    if (present(mask)) then
      !$omp parallel do simd schedule(static) private(gi) if(n >= PAR_MIN_OPT)
      do i = 1, n
        gi = g(i) + weight_decay * p(i)
        vel(i) = merge(momentum * vel(i) + gi, 0.0_real32, mask(i) /= 0)
        p(i) = merge(p(i) - lr * vel(i), 0.0_real32, mask(i) /= 0)
      end do
      !$omp end parallel do simd
    else
      !$omp parallel do simd schedule(static) private(gi) if(n >= PAR_MIN_OPT)
      do i = 1, n
        gi = g(i) + weight_decay * p(i)
        vel(i) = momentum * vel(i) + gi
        p(i) = p(i) - lr * vel(i)
      end do
      !$omp end parallel do simd
    end if
  end subroutine sgd_step

  !> Adam with bias correction (step counts from 1):
  !! m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g**2;
  !! p = p - lr/(1-b1**step) * m / (sqrt(v)/sqrt(1-b2**step) + eps)
  subroutine adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, mask, stat, errmsg)
    real(real32), intent(inout), contiguous :: p(:)  !! parameters
    real(real32), intent(in), contiguous :: g(:)     !! gradients
    real(real32), intent(inout), contiguous :: m(:)  !! first moment
    real(real32), intent(inout), contiguous :: v(:)  !! second moment
    integer(int64), intent(in) :: step               !! 1 for the first step
    real(real32), intent(in) :: lr, beta1, beta2, eps, weight_decay
    integer(int8), intent(in), contiguous, optional :: mask(:) !! 0 = pruned
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int64) :: i, n
    real(real32) :: step_size, inv_sqrt_bc2, gi, one_b1, one_b2

    n = size(p, kind=int64)
    if (size(g, kind=int64) /= n .or. size(m, kind=int64) /= n .or. size(v, kind=int64) /= n) then
      call set_status(PYKD_ERR_ARG, 'adam_step: params, grads, m and v differ in size', stat, errmsg)
      return
    end if
    if (present(mask)) then
      if (size(mask, kind=int64) /= n) then
        call set_status(PYKD_ERR_ARG, 'adam_step: mask differs in size from params', stat, errmsg)
        return
      end if
    end if
    if (step < 1) then
      call set_status(PYKD_ERR_ARG, 'adam_step: step must be >= 1', stat, errmsg)
      return
    end if
    call set_status(PYKD_OK, '', stat, errmsg)

    ! Bias corrections in double precision: 1 - 0.999**step loses digits in float32.
    step_size = real(lr / (1 - real(beta1, real64)**step), real32)
    inv_sqrt_bc2 = real(1 / sqrt(1 - real(beta2, real64)**step), real32)
    one_b1 = 1 - beta1; one_b2 = 1 - beta2

    if (present(mask)) then
      !$omp parallel do simd schedule(static) private(gi) if(n >= PAR_MIN_OPT)
      do i = 1, n
        gi = g(i) + weight_decay * p(i)
        m(i) = merge(beta1 * m(i) + one_b1 * gi, 0.0_real32, mask(i) /= 0)
        v(i) = merge(beta2 * v(i) + one_b2 * gi * gi, 0.0_real32, mask(i) /= 0)
        p(i) = merge(p(i) - step_size * m(i) / (sqrt(v(i)) * inv_sqrt_bc2 + eps), 0.0_real32, &
                     mask(i) /= 0)
      end do
      !$omp end parallel do simd
    else
      !$omp parallel do simd schedule(static) private(gi) if(n >= PAR_MIN_OPT)
      do i = 1, n
        gi = g(i) + weight_decay * p(i)
        m(i) = beta1 * m(i) + one_b1 * gi
        v(i) = beta2 * v(i) + one_b2 * gi * gi
        p(i) = p(i) - step_size * m(i) / (sqrt(v(i)) * inv_sqrt_bc2 + eps)
      end do
      !$omp end parallel do simd
    end if
  end subroutine adam_step

end module pykd_optim
