!> Symmetric int8 quantization and the int8 x int8 -> int32 product.
!!
!! Rule (TFLite-style weights, zero point 0): scale = max|w| / 127 in float32
!! (at least tiny(1.0), the smallest normal number; 1 for an all-zero group), q = clamp(rint(w * (1/scale)), -127, 127)
!! with round half to even and the float32 reciprocal, as PyTorch does. The
!! range is symmetric, [-127, 127], so -q never overflows. Dequantization is
!! w ~ q * scale, with |w - q * scale| <= scale / 2.
!!
!! Weights `w(out, in)` (NumPy `W (in, out)`) get one scale per tensor or per
!! output channel (row of `w`). Activations `x(in, n)` are quantized per
!! sample (column) at run time, so a sample's result does not depend on the
!! rest of its batch.
module pykd_quant
  use iso_fortran_env, only: real32, int8, int16, int32, int64
  use pykd_config, only: PAR_MIN_WORK
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC, set_status
  implicit none
  private
  public :: quantize_weights, dequantize_weights, quantize_columns, quantize_columns_static, &
            quantize_columns16, int8_gemm, int8_matmul, rescale, QMAX, MAX_IN

  integer, parameter :: QMAX = 127
  !> Longest int8 dot product whose int32 sum cannot overflow: 131071 * 128**2 < 2**31.
  integer, parameter :: MAX_IN = 131071
  !> Samples per block of the int8 product: each weight column loaded is
  !! used for this many samples.
  integer, parameter :: BLOCK_N = 4

contains

  !> Round half to even for |x| < 2**22: adding 1.5 * 2**23 leaves no
  !! fraction bits, so the FPU's default rounding mode does the work. Valid
  !! without -ffast-math (which pykd is never built with).
  elemental real(real32) function rint_small(x)
    real(real32), intent(in) :: x
    real(real32), parameter :: magic = 12582912.0_real32
    rint_small = (x + magic) - magic
  end function rint_small

  !> Number of NaN or inf entries. Unlike all(ieee_is_finite(x)), which
  !! gfortran compiles to a scalar loop with an early exit, this vectorizes:
  !! the quantization of a 1200 x 1200 matrix spent 75% of its time there.
  pure integer function count_nonfinite(n, x)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(n)
    count_nonfinite = count(.not. (abs(x) <= huge(x)))
  end function count_nonfinite

  !> max |x| for finite x, through the bits: for x >= 0 the integer order of
  !! the bit patterns is the float order. maxval(abs(x)) stays a scalar loop
  !! (NaN rules); this one vectorizes. NaN or inf must be caught separately.
  pure real(real32) function abs_max(n, x)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(n)
    integer(int32) :: bits
    integer :: i

    bits = 0
    do i = 1, n
      bits = max(bits, iand(transfer(x(i), bits), huge(bits)))
    end do
    abs_max = transfer(bits, abs_max)
  end function abs_max

  !> scale = max|w| / 127, but at least the smallest normal float32 so that
  !! 1 / scale stays finite for tiny weights; 1 for an all-zero group.
  pure elemental real(real32) function scale_of(amax)
    real(real32), intent(in) :: amax
    scale_of = merge(max(amax / QMAX, tiny(amax)), 1.0_real32, amax > 0)
  end function scale_of

  !> q = quantized w; one scale per tensor (size(scale) == 1) or per row of
  !! `w` (size(scale) == size(w, 1), per output channel).
  subroutine quantize_weights(w, q, scale, stat, errmsg)
    real(real32), intent(in), contiguous :: w(:, :)     !! (out, in)
    integer(int8), intent(out), contiguous :: q(:, :)   !! (out, in)
    real(real32), intent(out) :: scale(:)               !! (1) or (out)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), allocatable :: amax(:), inv(:)
    integer :: k, n_out, ierr

    n_out = size(w, 1)
    if (any(shape(q) /= shape(w)) .or. (size(scale) /= 1 .and. size(scale) /= n_out)) then
      call set_status(PYKD_ERR_ARG, 'quantize_weights: inconsistent sizes', stat, errmsg)
      return
    end if
    allocate (amax(n_out), inv(n_out), stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, 'quantize_weights: cannot allocate workspace', stat, errmsg)
      return
    end if
    amax = 0
    do k = 1, size(w, 2)
      amax = max(amax, abs(w(:, k)))
    end do
    ! max() may drop a NaN, so test the data itself.
    if (count_nonfinite(size(w), w) > 0) then
      call set_status(PYKD_ERR_NONFINITE, 'quantize_weights: weights contain NaN or inf', stat, errmsg)
      return
    end if
    if (size(scale) == 1 .and. n_out > 0) then
      scale(1) = scale_of(maxval(amax))
      inv = 1 / scale(1)
    else
      scale = scale_of(amax)
      inv = 1 / scale
    end if
    call quantize_rows(n_out, size(w, 2), w, inv, q)
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine quantize_weights

  ! The OpenMP loops below take explicit-shape arrays: inside a parallel
  ! region gfortran 12 forgets that assumed-shape dummies are contiguous and
  ! loads them element by element (docs/performance.md).

  !> q = clamp(rint(w * inv), -QMAX, QMAX), inv per row.
  subroutine quantize_rows(m, n, w, inv, q)
    integer, intent(in) :: m, n
    real(real32), intent(in) :: w(m, n), inv(m)
    integer(int8), intent(out) :: q(m, n)
    integer :: k

    !$omp parallel do schedule(static) if(int(m, int64) * n >= PAR_MIN_WORK)
    do k = 1, n
      q(:, k) = int(min(max(rint_small(w(:, k) * inv), -real(QMAX, real32)), real(QMAX, real32)), int8)
    end do
    !$omp end parallel do
  end subroutine quantize_rows

  !> w = q * scale (per tensor if size(scale) == 1, else per row).
  subroutine dequantize_weights(q, scale, w, stat, errmsg)
    integer(int8), intent(in), contiguous :: q(:, :)  !! (out, in)
    real(real32), intent(in) :: scale(:)              !! (1) or (out)
    real(real32), intent(out), contiguous :: w(:, :)  !! (out, in)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg

    if (any(shape(q) /= shape(w)) .or. (size(scale) /= 1 .and. size(scale) /= size(q, 1))) then
      call set_status(PYKD_ERR_ARG, 'dequantize_weights: inconsistent sizes', stat, errmsg)
      return
    end if
    call dequantize_rows(size(q, 1), size(q, 2), size(scale), q, scale, w)
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine dequantize_weights

  !> w = q * scale; ns == 1: one scale, else one per row (ns == m).
  subroutine dequantize_rows(m, n, ns, q, scale, w)
    integer, intent(in) :: m, n, ns
    integer(int8), intent(in) :: q(m, n)
    real(real32), intent(in) :: scale(ns)
    real(real32), intent(out) :: w(m, n)
    integer :: k

    !$omp parallel do schedule(static) if(int(m, int64) * n >= PAR_MIN_WORK)
    do k = 1, n
      if (ns == 1) then
        w(:, k) = real(q(:, k), real32) * scale(1)
      else
        w(:, k) = real(q(:, k), real32) * scale(1:m)
      end if
    end do
    !$omp end parallel do
  end subroutine dequantize_rows

  !> Quantize each column (sample) of `x` with its own scale.
  subroutine quantize_columns(x, qx, sx, stat)
    real(real32), intent(in), contiguous :: x(:, :)    !! (in, n)
    integer(int8), intent(out), contiguous :: qx(:, :) !! (in, n)
    real(real32), intent(out) :: sx(:)                 !! (n)
    integer, intent(out) :: stat
    integer :: n_bad

    call quantize_cols(size(x, 1), size(x, 2), x, qx, sx, n_bad)
    stat = merge(PYKD_OK, PYKD_ERR_NONFINITE, n_bad == 0)
  end subroutine quantize_columns

  subroutine quantize_cols(m, n, x, qx, sx, n_bad)
    integer, intent(in) :: m, n
    real(real32), intent(in) :: x(m, n)
    integer(int8), intent(out) :: qx(m, n)
    real(real32), intent(out) :: sx(n)
    integer, intent(out) :: n_bad   !! columns with NaN or inf
    integer :: j
    real(real32) :: amax, inv

    n_bad = 0
    !$omp parallel do schedule(static) private(amax, inv) reduction(+:n_bad) &
    !$omp& if(int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      amax = maxval(abs(x(:, j)))
      if (count_nonfinite(m, x(:, j)) > 0) n_bad = n_bad + 1
      sx(j) = scale_of(amax)
      inv = 1 / sx(j)
      qx(:, j) = int(min(max(rint_small(x(:, j) * inv), -real(QMAX, real32)), real(QMAX, real32)), int8)
    end do
    !$omp end parallel do
  end subroutine quantize_cols

  !> Quantize every column (sample) of `x` with one given scale (static
  !! quantization from calibration): qx = clamp(rint(x * (1/x_scale)), -127, 127),
  !! the same rounding as quantize_columns. x_scale must be finite and > 0.
  !! stat: PYKD_OK, PYKD_ERR_NONFINITE (x has NaN/inf) or PYKD_ERR_ARG (x_scale).
  subroutine quantize_columns_static(x, x_scale, qx, stat)
    real(real32), intent(in), contiguous :: x(:, :)    !! (in, n)
    real(real32), intent(in) :: x_scale
    integer(int8), intent(out), contiguous :: qx(:, :) !! (in, n)
    integer, intent(out) :: stat
    integer :: n_bad

    if (.not. (x_scale > 0 .and. x_scale <= huge(x_scale)) .or. any(shape(qx) /= shape(x))) then
      stat = PYKD_ERR_ARG
      return
    end if
    call quantize_cols_static(size(x, 1), size(x, 2), x, 1 / x_scale, qx, n_bad)
    stat = merge(PYKD_OK, PYKD_ERR_NONFINITE, n_bad == 0)
  end subroutine quantize_columns_static

  subroutine quantize_cols_static(m, n, x, inv, qx, n_bad)
    integer, intent(in) :: m, n
    real(real32), intent(in) :: x(m, n), inv
    integer(int8), intent(out) :: qx(m, n)
    integer, intent(out) :: n_bad   !! columns with NaN or inf
    integer :: j

    n_bad = 0
    !$omp parallel do schedule(static) reduction(+:n_bad) if(int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      if (count_nonfinite(m, x(:, j)) > 0) n_bad = n_bad + 1
      ! Beyond 2**22 rint_small is inexact, but such values clamp to +-127 anyway.
      qx(:, j) = int(min(max(rint_small(x(:, j) * inv), -real(QMAX, real32)), real(QMAX, real32)), int8)
    end do
    !$omp end parallel do
  end subroutine quantize_cols_static

  !> The quantization of quantize_columns (x_scale == 0: one scale per
  !! sample) or quantize_columns_static (x_scale > 0), into int16 for the int8
  !! layer's product (pykd_int8_kernel): x16(ldx, n), rows m + 1 .. ldx zero.
  !! stat: PYKD_OK, PYKD_ERR_NONFINITE, or PYKD_ERR_ARG (x_scale < 0, inf or NaN).
  subroutine quantize_columns16(m, ldx, n, x, x_scale, x16, sx, stat)
    integer, intent(in) :: m, ldx, n
    real(real32), intent(in) :: x(m, n), x_scale
    integer(int16), intent(out) :: x16(ldx, n)
    real(real32), intent(out) :: sx(n)
    integer, intent(out) :: stat
    integer :: j, n_bad

    if (.not. (x_scale >= 0 .and. x_scale <= huge(x_scale)) .or. ldx < m) then
      stat = PYKD_ERR_ARG
      return
    end if
    n_bad = 0
    ! Small batches stay off OpenMP: even a region whose if() is false costs
    ! a team start in libgomp (a few microseconds per call in a time loop).
    if (int(m, int64) * n < PAR_MIN_WORK) then
      do j = 1, n
        if (column16(j)) n_bad = n_bad + 1
      end do
    else
      !$omp parallel do schedule(static) reduction(+:n_bad)
      do j = 1, n
        if (column16(j)) n_bad = n_bad + 1
      end do
      !$omp end parallel do
    end if
    stat = merge(PYKD_OK, PYKD_ERR_NONFINITE, n_bad == 0)

  contains

    !> Column j of x16 and sx(j); true if x(:, j) holds NaN or inf.
    logical function column16(j) result(bad)
      integer, intent(in) :: j
      real(real32) :: inv

      bad = count_nonfinite(m, x(:, j)) > 0
      if (x_scale > 0) then
        sx(j) = x_scale
      else
        sx(j) = scale_of(abs_max(m, x(:, j)))
      end if
      inv = 1 / sx(j)
      x16(1:m, j) = int(min(max(rint_small(x(:, j) * inv), -real(QMAX, real32)), real(QMAX, real32)), int16)
      x16(m + 1:ldx, j) = 0
    end function column16
  end subroutine quantize_columns16

  !> acc = qw qx, exactly, in int32. |acc| <= in * 128**2 must fit int32
  !! (int8 weights may hold -128), so in <= MAX_IN = 131071.
  subroutine int8_gemm(qw, qx, acc)
    integer(int8), intent(in), contiguous :: qw(:, :)   !! (out, in)
    integer(int8), intent(in), contiguous :: qx(:, :)   !! (in, n)
    integer(int32), intent(out), contiguous :: acc(:, :) !! (out, n)
    integer :: j0, j, k, nb

    ! BLOCK_N samples share each weight column while it is in registers/L1.
    !$omp parallel do schedule(static) private(j, k, nb) if(int(size(acc), int64) * size(qw, 2) >= 64 * PAR_MIN_WORK)
    do j0 = 1, size(qx, 2), BLOCK_N
      nb = min(BLOCK_N, size(qx, 2) - j0 + 1)
      acc(:, j0:j0 + nb - 1) = 0
      if (nb == BLOCK_N) then
        do k = 1, size(qw, 2)
          acc(:, j0) = acc(:, j0) + int(qw(:, k), int32) * qx(k, j0)
          acc(:, j0 + 1) = acc(:, j0 + 1) + int(qw(:, k), int32) * qx(k, j0 + 1)
          acc(:, j0 + 2) = acc(:, j0 + 2) + int(qw(:, k), int32) * qx(k, j0 + 2)
          acc(:, j0 + 3) = acc(:, j0 + 3) + int(qw(:, k), int32) * qx(k, j0 + 3)
        end do
      else
        do j = j0, j0 + nb - 1
          do k = 1, size(qw, 2)
            acc(:, j) = acc(:, j) + int(qw(:, k), int32) * qx(k, j)
          end do
        end do
      end if
    end do
    !$omp end parallel do
  end subroutine int8_gemm

  !> y = (qw quantize(x)) * (scale_w scale_x) + b: dynamic int8 inference.
  !! `acc` and `qx` are caller-owned workspaces.
  subroutine int8_matmul(x, qw, scale_w, b, y, qx, sx, acc, stat, errmsg)
    real(real32), intent(in), contiguous :: x(:, :)        !! (in, n)
    integer(int8), intent(in), contiguous :: qw(:, :)      !! (out, in)
    real(real32), intent(in) :: scale_w(:)                 !! (1) or (out)
    real(real32), intent(in) :: b(:)                       !! (out)
    real(real32), intent(out), contiguous :: y(:, :)       !! (out, n)
    integer(int8), intent(out), contiguous :: qx(:, :)     !! (in, n) workspace
    real(real32), intent(out) :: sx(:)                     !! (n) workspace
    integer(int32), intent(out), contiguous :: acc(:, :)   !! (out, n) workspace
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer :: n_out, n_in, n, st

    n_out = size(qw, 1); n_in = size(qw, 2); n = size(x, 2)
    if (size(x, 1) /= n_in .or. size(b) /= n_out .or. any(shape(y) /= [n_out, n]) &
        .or. any(shape(qx) /= [n_in, n]) .or. size(sx) /= n .or. any(shape(acc) /= [n_out, n]) &
        .or. (size(scale_w) /= 1 .and. size(scale_w) /= n_out) .or. n_in > MAX_IN) then
      call set_status(PYKD_ERR_ARG, 'int8_matmul: inconsistent sizes', stat, errmsg)
      return
    end if
    call quantize_columns(x, qx, sx, st)
    if (st /= PYKD_OK) then
      call set_status(st, 'int8_matmul: input contains NaN or inf', stat, errmsg)
      return
    end if
    call int8_gemm(qw, qx, acc)
    call rescale(n_out, n, size(scale_w), acc, scale_w, sx, b, y)
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine int8_matmul

  !> y = acc * (scale_w * sx(column)) + b; ns == 1: one weight scale.
  !! (Public: the dense_int8 layer kind rescales with it.)
  subroutine rescale(m, n, ns, acc, scale_w, sx, b, y)
    integer, intent(in) :: m, n, ns
    integer(int32), intent(in) :: acc(m, n)
    real(real32), intent(in) :: scale_w(ns), sx(n), b(m)
    real(real32), intent(out) :: y(m, n)
    integer :: j

    !$omp parallel do schedule(static) if(int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      if (ns == 1) then
        y(:, j) = real(acc(:, j), real32) * (scale_w(1) * sx(j)) + b
      else
        y(:, j) = real(acc(:, j), real32) * (scale_w(1:m) * sx(j)) + b
      end if
    end do
    !$omp end parallel do
  end subroutine rescale

end module pykd_quant
