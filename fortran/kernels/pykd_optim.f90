!> Optimizer steps, in place, on one flat parameter buffer.
!!
!! A model keeps every weight and bias in one contiguous buffer, so a step is
!! a single pass over memory. An optional mask (0 = pruned) keeps pruned
!! entries, and their optimizer state, exactly zero.
!! Conventions follow PyTorch's SGD (no dampening) and Adam (L2 weight decay
!! added to the gradient; bias-corrected moments).
module pykd_optim
  use iso_fortran_env, only: real32, real64, int8, int32, int64
  use pykd_config, only: PAR_MIN_OPT
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, set_status
  use iso_c_binding, only: c_int, c_int64_t, c_float, c_char
  !$ use omp_lib, only: omp_get_num_threads, omp_get_thread_num, omp_in_parallel
  implicit none
  private
  public :: sgd_step, adam_step, optim_path_name

  interface
    !> fortran/kernels/pykd_optim_simd.c: Adam on p(1:n), on this thread.
    subroutine c_adam(n, p, g, m, v, step, inv, b1, b2, eps, wd) bind(c, name='pykd_adam_plain')
      import :: c_int64_t, c_float
      integer(c_int64_t), value :: n
      real(c_float), intent(inout) :: p(*), m(*), v(*)
      real(c_float), intent(in) :: g(*)
      real(c_float), value :: step, inv, b1, b2, eps, wd
    end subroutine c_adam
    subroutine c_path_name(name, len) bind(c, name='pykd_optim_path_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_path_name
  end interface

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
    integer(int64) :: n

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
      call sgd_masked(n, p, g, vel, lr, momentum, weight_decay, mask)
    else
      call sgd_plain(n, p, g, vel, lr, momentum, weight_decay)
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
    integer(int64) :: n
    real(real32) :: step_size, inv_sqrt_bc2

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

    if (present(mask)) then
      call adam_masked(n, p, g, m, v, step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay, mask)
    else
      call adam_plain(n, p, g, m, v, step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay)
    end if
  end subroutine adam_step

  ! How the loops are written, and why (gfortran 12, measured): inside an
  ! OpenMP region gfortran forgets that an assumed-shape dummy is contiguous and
  ! vectorizes with element-by-element gathers (Adam ran 4x slower), and it
  ! leaves a merge of two values as a branch. So the loops take explicit-shape
  ! arrays, and masked entries are cleared with a bitwise AND.

  subroutine sgd_plain(n, p, g, vel, lr, momentum, weight_decay)
    integer(int64), intent(in) :: n
    real(real32), intent(inout) :: p(n), vel(n)
    real(real32), intent(in) :: g(n), lr, momentum, weight_decay
    integer(int64) :: i

    !$omp parallel do simd schedule(static) if(parallel: n >= PAR_MIN_OPT)
    do i = 1, n
      vel(i) = momentum * vel(i) + (g(i) + weight_decay * p(i))
      p(i) = p(i) - lr * vel(i)
    end do
    !$omp end parallel do simd
  end subroutine sgd_plain

  subroutine sgd_masked(n, p, g, vel, lr, momentum, weight_decay, mask)
    integer(int64), intent(in) :: n
    real(real32), intent(inout) :: p(n), vel(n)
    real(real32), intent(in) :: g(n), lr, momentum, weight_decay
    integer(int8), intent(in) :: mask(n)
    integer(int64) :: i
    integer(int32) :: keep
    real(real32) :: vi

    !$omp parallel do simd schedule(static) private(keep, vi) if(parallel: n >= PAR_MIN_OPT)
    do i = 1, n
      keep = merge(-1_int32, 0_int32, mask(i) /= 0)
      vi = momentum * vel(i) + (g(i) + weight_decay * p(i))
      vel(i) = keep_bits(vi, keep)
      p(i) = keep_bits(p(i) - lr * vi, keep)
    end do
    !$omp end parallel do simd
  end subroutine sgd_masked

  !> Each thread's share of the buffer goes to pykd_optim_simd.c (a CPU
  !! path chosen at run time: AVX-512, AVX2 or portable, the same bits as
  !! the Fortran loop of adam_masked). Small buffers, and calls from inside
  !! a parallel region, stay off OpenMP: even a region whose if() is false
  !! starts a team in libgomp.
  subroutine adam_plain(n, p, g, m, v, step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay)
    integer(int64), intent(in) :: n
    real(real32), intent(inout) :: p(n), m(n), v(n)
    real(real32), intent(in) :: g(n), step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay
    integer(int64) :: lo, hi
    logical :: serial

    serial = n < PAR_MIN_OPT
    !$ serial = serial .or. omp_in_parallel()  ! a tile of the training step
    if (serial) then
      call c_adam(n, p, g, m, v, step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay)
      return
    end if
    !$omp parallel private(lo, hi)
    call my_share(n, lo, hi)
    if (hi >= lo) call c_adam(hi - lo + 1, p(lo), g(lo), m(lo), v(lo), step_size, inv_sqrt_bc2, &
                              beta1, beta2, eps, weight_decay)
    !$omp end parallel
  end subroutine adam_plain

  !> This thread's share lo:hi of 1:n, in whole 64-byte lines (hi < lo: none),
  !! as schedule(static) would cut it.
  subroutine my_share(n, lo, hi)
    integer(int64), intent(in) :: n
    integer(int64), intent(out) :: lo, hi
    integer(int64) :: lines, per, extra, me, nth

    nth = 1; me = 0
    !$ nth = omp_get_num_threads(); me = omp_get_thread_num()
    lines = (n + 15) / 16
    per = lines / nth; extra = mod(lines, nth)
    lo = (me * per + min(me, extra)) * 16 + 1
    hi = min(n, lo - 1 + (per + merge(1_int64, 0_int64, me < extra)) * 16)
  end subroutine my_share

  !> The name of Adam's CPU path in this process (pykd_optim_simd.c).
  function optim_path_name() result(name)
    character(len=16) :: name
    character(kind=c_char) :: buf(16)
    call c_path_name(buf, 16_c_int)   ! blank-padded by the C side
    name = transfer(buf, name)
  end function optim_path_name

  subroutine adam_masked(n, p, g, m, v, step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay, &
                         mask)
    integer(int64), intent(in) :: n
    real(real32), intent(inout) :: p(n), m(n), v(n)
    real(real32), intent(in) :: g(n), step_size, inv_sqrt_bc2, beta1, beta2, eps, weight_decay
    integer(int8), intent(in) :: mask(n)
    integer(int64) :: i
    integer(int32) :: keep
    real(real32) :: gi, mi, vi, one_b1, one_b2

    one_b1 = 1 - beta1; one_b2 = 1 - beta2
    !$omp parallel do simd schedule(static) private(keep, gi, mi, vi) if(parallel: n >= PAR_MIN_OPT)
    do i = 1, n
      keep = merge(-1_int32, 0_int32, mask(i) /= 0)
      gi = g(i) + weight_decay * p(i)
      mi = beta1 * m(i) + one_b1 * gi
      vi = beta2 * v(i) + one_b2 * gi * gi
      p(i) = keep_bits(p(i) - step_size * mi / (sqrt(vi) * inv_sqrt_bc2 + eps), keep)
      m(i) = keep_bits(mi, keep)
      v(i) = keep_bits(vi, keep)
    end do
    !$omp end parallel do simd
  end subroutine adam_masked

  !> x where keep has all bits set (-1), +0.0 where keep is 0.
  elemental real(real32) function keep_bits(x, keep)
    real(real32), intent(in) :: x
    integer(int32), intent(in) :: keep
    keep_bits = transfer(iand(transfer(x, keep), keep), x)
  end function keep_bits

end module pykd_optim
