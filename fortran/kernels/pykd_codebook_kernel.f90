!> The codebook layer's product on the CPU's fastest path, chosen at run time
!! (fortran/kernels/pykd_codebook_simd.c): portable, avx2 or avx512. Every path,
!! batch size and thread count gives the same bits (one fused multiply-add
!! per weight, in input order, on every path); PYKD_CODEBOOK_PATH forces one.
module pykd_codebook_kernel
  use iso_c_binding, only: c_int, c_int8_t, c_int64_t, c_float, c_char
  use iso_fortran_env, only: int64
  !$ use omp_lib, only: omp_get_num_threads, omp_get_thread_num, omp_get_max_threads, omp_in_parallel
  implicit none
  private
  public :: codebook_product, codebook_path_name, codebook_workspace_words

  !> Multiply-adds below which the product stays on one thread: larger
  !! batches split samples, small ones outputs. The small-batch split waits
  !! for a second thread for a few microseconds of work each, which on a
  !! loaded machine cost milliseconds (a descheduled worker), so it needs
  !! about 100 us of work per thread.
  integer(int64), parameter :: PAR_MIN_MACS = 100000, PAR_MIN_MACS_SMALL = 2000000
  !> Batches above SMALL_BATCH split samples over threads (a multiple of
  !! SAMPLES_ALIGN each: the microkernel's width); smaller ones split outputs
  !! (a multiple of OUTPUTS_ALIGN each: one vector).
  integer, parameter :: SMALL_BATCH = 4, SAMPLES_ALIGN = 6, OUTPUTS_ALIGN = 8
  !> Input rows per panel (at most the C file's KC): larger batches pack
  !! that many rows of x at a time into the workspace.
  integer, parameter :: PANEL_ROWS = 256

  interface
    integer(c_int) function c_path() bind(c, name='pykd_cb_path')
      import :: c_int
    end function c_path
    subroutine c_path_name(name, len) bind(c, name='pykd_cb_path_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_path_name
    integer(c_int) function c_product(path, bits, n_codes, n_in, n_out, packed, nbytes, &
                                      centroids, b, relu, x, ldx, s0, s1, j0, j1, y, kc, work) &
        bind(c, name='pykd_cb_product')
      import :: c_int, c_int8_t, c_int64_t, c_float
      integer(c_int), value :: path, bits, n_codes, n_in, n_out, relu, ldx, s0, s1, j0, j1, kc
      integer(c_int64_t), value :: nbytes
      integer(c_int8_t), intent(in) :: packed(*)
      real(c_float), intent(in) :: centroids(*), b(*), x(*)
      real(c_float), intent(inout) :: y(*), work(*)
    end function c_product
  end interface

contains

  !> The name of the path the codebook product runs on in this process.
  function codebook_path_name() result(name)
    character(len=16) :: name
    character(kind=c_char) :: buf(16)
    call c_path_name(buf, 16_c_int)   ! blank-padded by the C side
    name = transfer(buf, name)
  end function codebook_path_name

  !> float32 words of `work` that codebook_product needs for n samples.
  pure integer(int64) function codebook_workspace_words(n)
    integer, intent(in) :: n
    codebook_workspace_words = 0
    if (n > SMALL_BATCH) codebook_workspace_words = &
      int((n + SAMPLES_ALIGN - 1) / SAMPLES_ALIGN, int64) * SAMPLES_ALIGN * PANEL_ROWS
  end function codebook_workspace_words

  !> y(j, s) = sum_i w(j, i) x(i, s) + b(j), then relu when `relu`, with
  !! w(j, i) = centroids(index(i n_out + j)) from the packed stream
  !! (nbytes bytes). any_nan: an output before the activation is NaN.
  subroutine codebook_product(bits, n_codes, n_in, n_out, n, packed, nbytes, centroids, b, relu, &
                              x, y, work, any_nan)
    integer, intent(in) :: bits, n_codes, n_in, n_out, n
    integer(int64), intent(in) :: nbytes
    integer(c_int8_t), intent(in) :: packed(nbytes)
    real(c_float), intent(in) :: centroids(n_codes), b(n_out), x(n_in, n)
    logical, intent(in) :: relu
    real(c_float), intent(inout) :: y(n_out, n)
    !> codebook_workspace_words(n) words; a thread's samples s0.. use the
    !! words from s0 PANEL_ROWS on.
    real(c_float), intent(inout) :: work(*)
    logical, intent(out) :: any_nan
    integer(c_int) :: path, r, nan
    integer :: k, nt, chunk, lo, hi
    logical :: par

    path = c_path()
    r = merge(1_c_int, 0_c_int, relu)
    par = int(n_in, int64) * n_out * n >= merge(PAR_MIN_MACS_SMALL, PAR_MIN_MACS, n <= SMALL_BATCH)
    !$ par = par .and. omp_get_max_threads() > 1 .and. .not. omp_in_parallel()   ! a nested region would be inactive
    nan = 0
    if (.not. par) then
      ! No OpenMP region at all: libgomp builds a team even for a region
      ! whose if() is false (~1500 instructions, a third of a small layer's
      ! batch-1 product).
      nan = c_product(path, bits, n_codes, n_in, n_out, packed, nbytes, centroids, b, r, x, n_in, &
                      0, n, 0, n_out, y, PANEL_ROWS, work)
      any_nan = nan /= 0
      return
    end if
    !$omp parallel if(par) private(k, nt, chunk, lo, hi) reduction(max: nan)
    nt = 1; k = 0
    !$ nt = omp_get_num_threads(); k = omp_get_thread_num()
    if (n > SMALL_BATCH) then
      chunk = ((n + nt - 1) / nt + SAMPLES_ALIGN - 1) / SAMPLES_ALIGN * SAMPLES_ALIGN
      lo = min(k * chunk, n); hi = min(lo + chunk, n)
      if (hi > lo) nan = c_product(path, bits, n_codes, n_in, n_out, packed, nbytes, centroids, b, &
                                   r, x, n_in, lo, hi, 0, n_out, y, PANEL_ROWS, &
                                   work(int(lo, int64) * PANEL_ROWS + 1))
    else
      chunk = ((n_out + nt - 1) / nt + OUTPUTS_ALIGN - 1) / OUTPUTS_ALIGN * OUTPUTS_ALIGN
      lo = min(k * chunk, n_out); hi = min(lo + chunk, n_out)
      nan = c_product(path, bits, n_codes, n_in, n_out, packed, nbytes, centroids, b, r, x, n_in, &
                      0, n, lo, hi, y, PANEL_ROWS, work)
    end if
    !$omp end parallel
    any_nan = nan /= 0
  end subroutine codebook_product

end module pykd_codebook_kernel
