!> The int8 layer's product on the CPU's fastest exact path, chosen at run
!! time (fortran/kernels/pykd_int8_simd.c): portable, avx2, avxvnni or
!! avx512vnni. Every path gives the same bits; PYKD_INT8_PATH forces one.
module pykd_int8_kernel
  use iso_c_binding, only: c_int, c_int8_t, c_int16_t, c_int32_t, c_float, c_char
  use iso_fortran_env, only: int64
  !$ use omp_lib, only: omp_get_num_threads, omp_get_thread_num
  implicit none
  private
  public :: int8_dense_product, int8_gemm_product, int8_path_name

  !> Multiply-adds below which the product stays on one thread.
  integer(int64), parameter :: PAR_MIN_MACS = 100000
  !> Samples per unit of work given to a thread (large batches); a thread's
  !! range of outputs (small batches) is a multiple of OUTPUTS_ALIGN.
  integer, parameter :: SAMPLES_PER_TASK = 4, OUTPUTS_ALIGN = 16

  interface
    integer(c_int) function c_path() bind(c, name='pykd_i8_path')
      import :: c_int
    end function c_path
    subroutine c_path_name(name, len) bind(c, name='pykd_i8_path_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_path_name
    subroutine c_dense(path, n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y) &
        bind(c, name='pykd_i8_dense')
      import :: c_int, c_int8_t, c_int16_t, c_float
      integer(c_int), value :: path, n_out, n_in, ldx, s0, s1, j0, j1, act
      integer(c_int8_t), intent(in) :: q(*)
      integer(c_int16_t), intent(in) :: x(*)
      real(c_float), intent(in) :: scale(*), sx(*), b(*)
      real(c_float), intent(inout) :: y(*)
    end subroutine c_dense
    subroutine c_gemm(path, n_out, n_in, q, x, ldx, s0, s1, j0, j1, acc) &
        bind(c, name='pykd_i8_gemm')
      import :: c_int, c_int8_t, c_int16_t, c_int32_t
      integer(c_int), value :: path, n_out, n_in, ldx, s0, s1, j0, j1
      integer(c_int8_t), intent(in) :: q(*)
      integer(c_int16_t), intent(in) :: x(*)
      integer(c_int32_t), intent(inout) :: acc(*)
    end subroutine c_gemm
  end interface

contains

  !> The name of the path the int8 product runs on in this process.
  function int8_path_name() result(name)
    character(len=16) :: name
    character(kind=c_char) :: buf(16)
    call c_path_name(buf, 16_c_int)   ! blank-padded by the C side
    name = transfer(buf, name)
  end function int8_path_name

  !> y(j, s) = real(sum_i q(j, i) x(i, s)) * (scale(j) * sx(s)) + b(j), the
  !! sum exact in int32, then relu if act is ACT_RELU (other codes: none
  !! here, the caller applies them). x is the quantized batch as int16,
  !! x(ldx, n), ldx even, x(n_in + 1, :) = 0 when n_in is odd.
  subroutine int8_dense_product(n_in, n_out, n, ldx, q, x, scale, sx, b, act, y)
    integer, intent(in) :: n_in, n_out, n, ldx, act
    integer(c_int8_t), intent(in) :: q(n_out, n_in)
    integer(c_int16_t), intent(in) :: x(ldx, n)
    real(c_float), intent(in) :: scale(n_out), sx(n), b(n_out)
    real(c_float), intent(inout) :: y(n_out, n)
    integer(c_int32_t) :: none(1)

    call split(.false., n_in, n_out, n, ldx, q, x, scale, sx, b, act, y, none)
  end subroutine int8_dense_product

  !> acc(j, s) = sum_i q(j, i) x(i, s), exact in int32, for any int8 q and
  !! x (as int16, laid out as for int8_dense_product): pykd.int8_gemm.
  subroutine int8_gemm_product(n_in, n_out, n, ldx, q, x, acc)
    integer, intent(in) :: n_in, n_out, n, ldx
    integer(c_int8_t), intent(in) :: q(n_out, n_in)
    integer(c_int16_t), intent(in) :: x(ldx, n)
    integer(c_int32_t), intent(inout) :: acc(n_out, n)
    real(c_float) :: none(1)

    call split(.true., n_in, n_out, n, ldx, q, x, none, none, none, 0, none, acc)
  end subroutine int8_gemm_product

  !> The threads' split of either product. Threads take blocks of samples,
  !! or of outputs for a small batch; integer sums make the split invisible
  !! in the bits. One sample stays on the calling thread: waking the team
  !! cost more than it saved at the student's sizes and gave the 1 ms p99
  !! (docs/performance.md).
  subroutine split(want_raw, n_in, n_out, n, ldx, q, x, scale, sx, b, act, y, raw)
    logical, intent(in) :: want_raw
    integer, intent(in) :: n_in, n_out, n, ldx, act
    integer(c_int8_t), intent(in) :: q(*)
    integer(c_int16_t), intent(in) :: x(*)
    real(c_float), intent(in) :: scale(*), sx(*), b(*)
    real(c_float), intent(inout) :: y(*)
    integer(c_int32_t), intent(inout) :: raw(*)
    integer(c_int) :: path
    integer :: k, n_tasks, nt, chunk
    logical :: par

    path = c_path()
    if (n == 1) then
      call part(0, 1, 0, n_out)
      return
    end if
    par = int(n_in, int64) * n_out * n >= PAR_MIN_MACS
    if (.not. par) then
      ! One range, no OpenMP region: even one whose if() is false costs a
      ! team start in libgomp. Every sample and output is computed alike
      ! whatever the split, so the bits are the same.
      call part(0, n, 0, n_out)
      return
    end if
    if (n >= 2 * SAMPLES_PER_TASK) then
      n_tasks = (n + SAMPLES_PER_TASK - 1) / SAMPLES_PER_TASK
      !$omp parallel do schedule(static)
      do k = 0, n_tasks - 1
        call part(k * SAMPLES_PER_TASK, min((k + 1) * SAMPLES_PER_TASK, n), 0, n_out)
      end do
      !$omp end parallel do
    else
      ! One contiguous range of outputs per thread, a multiple of 16 wide.
      !$omp parallel private(k, nt, chunk)
      nt = 1; k = 0
      !$ nt = omp_get_num_threads(); k = omp_get_thread_num()
      chunk = ((n_out + nt - 1) / nt + OUTPUTS_ALIGN - 1) / OUTPUTS_ALIGN * OUTPUTS_ALIGN
      if (k * chunk < n_out) call part(0, n, k * chunk, min((k + 1) * chunk, n_out))
      !$omp end parallel
    end if

  contains

    subroutine part(s0, s1, j0, j1)
      integer, intent(in) :: s0, s1, j0, j1
      if (want_raw) then
        call c_gemm(path, n_out, n_in, q, x, ldx, s0, s1, j0, j1, raw)
      else
        call c_dense(path, n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y)
      end if
    end subroutine part

  end subroutine split

end module pykd_int8_kernel
