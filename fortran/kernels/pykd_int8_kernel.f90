!> The int8 layer's kernel on the CPU's fastest exact path, chosen at run
!! time (fortran/kernels/pykd_int8_simd.c): portable, avx2, avxvnni or
!! avx512vnni. Every path gives the same bits; PYKD_INT8_PATH forces one.
!!
!! The weights are pre-packed once per model (int8_pack: 4 inputs x 16
!! outputs per 64 bytes, plus the column sums of the +128 offset trick);
!! the activations are quantized per call into u = qx + 128 (bytes).
module pykd_int8_kernel
  use iso_c_binding, only: c_int, c_int8_t, c_int32_t, c_int64_t, c_float, c_char
  use iso_fortran_env, only: int64
  !$ use omp_lib, only: omp_get_num_threads, omp_get_thread_num, omp_get_max_threads, omp_in_parallel
  implicit none
  private
  public :: int8_dense_forward, int8_gemm_product, int8_pack, int8_packed_words, int8_ldu, &
            int8_path_name

  !> Multiply-adds below which the product stays on one thread.
  integer(int64), parameter :: PAR_MIN_MACS = 100000
  !> Batches from this size split their samples between the threads;
  !! smaller ones (but not one sample) split the output groups.
  integer, parameter :: SPLIT_SAMPLES_MIN = 8

  interface
    integer(c_int) function c_path() bind(c, name='pykd_i8_path')
      import :: c_int
    end function c_path
    subroutine c_path_name(name, len) bind(c, name='pykd_i8_path_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_path_name
    integer(c_int64_t) function c_packed_words(n_out, n_in) bind(c, name='pykd_i8_packed_words')
      import :: c_int, c_int64_t
      integer(c_int), value :: n_out, n_in
    end function c_packed_words
    subroutine c_pack(n_out, n_in, q, packed) bind(c, name='pykd_i8_pack')
      import :: c_int, c_int8_t, c_int32_t
      integer(c_int), value :: n_out, n_in
      integer(c_int8_t), intent(in) :: q(*)
      integer(c_int32_t), intent(out) :: packed(*)
    end subroutine c_pack
    integer(c_int) function c_quantize(path, n_in, ldu, x, s0, s1, x_scale, u, sx) &
        bind(c, name='pykd_i8_quantize')
      import :: c_int, c_int8_t, c_float
      integer(c_int), value :: path, n_in, ldu, s0, s1
      real(c_float), intent(in) :: x(*)
      real(c_float), value :: x_scale
      integer(c_int8_t), intent(inout) :: u(*)
      real(c_float), intent(inout) :: sx(*)
    end function c_quantize
    subroutine c_dense(path, n_out, n_in, packed, u, ldu, s0, s1, g0, g1, scale, sx, b, act, y) &
        bind(c, name='pykd_i8_dense')
      import :: c_int, c_int8_t, c_int32_t, c_float
      integer(c_int), value :: path, n_out, n_in, ldu, s0, s1, g0, g1, act
      integer(c_int32_t), intent(in) :: packed(*)
      integer(c_int8_t), intent(in) :: u(*)
      real(c_float), intent(in) :: scale(*), sx(*), b(*)
      real(c_float), intent(inout) :: y(*)
    end subroutine c_dense
    subroutine c_gemm(path, n_out, n_in, packed, u, ldu, s0, s1, g0, g1, acc) &
        bind(c, name='pykd_i8_gemm')
      import :: c_int, c_int8_t, c_int32_t
      integer(c_int), value :: path, n_out, n_in, ldu, s0, s1, g0, g1
      integer(c_int32_t), intent(in) :: packed(*)
      integer(c_int8_t), intent(in) :: u(*)
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

  !> int32 words of the packed copy of an (n_out, n_in) q: 16 ceil(n_out / 16)
  !! (1 + ceil(n_in / 4)); 0 for sizes below 1.
  pure integer(int64) function int8_packed_words(n_in, n_out)
    integer(int64), intent(in) :: n_in, n_out
    int8_packed_words = 0
    if (n_in >= 1 .and. n_out >= 1) &
      int8_packed_words = 16 * ((n_out + 15) / 16) * (1 + (n_in + 3) / 4)
  end function int8_packed_words

  !> Bytes per sample of the quantized batch u: n_in rounded up to 4.
  pure integer(int64) function int8_ldu(n_in)
    integer(int64), intent(in) :: n_in
    int8_ldu = (n_in + 3) / 4 * 4
  end function int8_ldu

  !> packed = the kernel's layout of q (pykd_int8_simd.c), int8_packed_words.
  subroutine int8_pack(n_in, n_out, q, packed)
    integer, intent(in) :: n_in, n_out
    integer(c_int8_t), intent(in) :: q(n_out, n_in)
    integer(c_int32_t), intent(out) :: packed(*)
    if (c_packed_words(n_out, n_in) /= int8_packed_words(int(n_in, int64), int(n_out, int64))) return
    call c_pack(n_out, n_in, q, packed)
  end subroutine int8_pack

  !> Whether a product is worth a team of threads: not for one sample or a
  !! small product (waking the team costs more than it saves, and one
  !! sample stays on the calling thread: no 1 ms p99 from a descheduled
  !! thread), not with one thread, and not inside a parallel region (the
  !! network may run each thread on its own samples; a nested region would
  !! be inactive but still cost a team start).
  logical function use_team(n, n_in, n_out)
    integer, intent(in) :: n, n_in, n_out
    use_team = n > 1 .and. int(n_in, int64) * n_out * n >= PAR_MIN_MACS
    !$ if (use_team) use_team = omp_get_max_threads() > 1 .and. .not. omp_in_parallel()
  end function use_team

  !> y(j, s) = real(sum_i q(j, i) qx(i, s)) * (scale(j) * sx(s)) + b(j), then
  !! relu if act is ACT_RELU (other codes: the caller applies them); qx and
  !! sx are x quantized with x_scale (static, > 0) or per sample (0). u and
  !! sx are the caller's scratch: u(int8_ldu(n_in), n) bytes, sx(n).
  !! n_bad: samples holding NaN or inf (y is then meaningless there).
  subroutine int8_dense_forward(n_in, n_out, n, packed, x, x_scale, scale, b, act, u, sx, y, n_bad)
    integer, intent(in) :: n_in, n_out, n, act
    integer(c_int32_t), intent(in) :: packed(*)
    real(c_float), intent(in) :: x(n_in, n), x_scale, scale(n_out), b(n_out)
    integer(c_int8_t), intent(inout) :: u(*)
    real(c_float), intent(inout) :: sx(n), y(n_out, n)
    integer, intent(out) :: n_bad
    integer(c_int) :: path, ldu, ng
    integer :: k, nt, s0, s1, g0, g1, chunk

    path = c_path()
    ldu = int(int8_ldu(int(n_in, int64)))
    ng = (n_out + 15) / 16
    n_bad = 0
    if (.not. use_team(n, n_in, n_out)) then
      ! No OpenMP region: even an inactive one costs a team start in libgomp.
      n_bad = c_quantize(path, n_in, ldu, x, 0, n, x_scale, u, sx)
      call c_dense(path, n_out, n_in, packed, u, ldu, 0, n, 0, ng, scale, sx, b, act, y)
    else if (n >= SPLIT_SAMPLES_MIN) then
      ! Chunks of samples, each quantized and multiplied by the thread that
      ! takes it (its bytes of u stay in L1). Dynamic: on a shared machine
      ! a descheduled thread's chunks go to the other one.
      chunk = chunk_of(n)
      !$omp parallel do schedule(dynamic, 1) private(s0, s1) reduction(+:n_bad)
      do k = 0, (n - 1) / chunk
        s0 = k * chunk; s1 = min(n, s0 + chunk)
        n_bad = n_bad + c_quantize(path, n_in, ldu, x, s0, s1, x_scale, u, sx)
        call c_dense(path, n_out, n_in, packed, u, ldu, s0, s1, 0, ng, scale, sx, b, act, y)
      end do
      !$omp end parallel do
    else
      n_bad = c_quantize(path, n_in, ldu, x, 0, n, x_scale, u, sx)
      !$omp parallel private(k, nt, g0, g1)
      nt = 1; k = 0
      !$ nt = omp_get_num_threads(); k = omp_get_thread_num()
      g0 = k * ng / nt; g1 = (k + 1) * ng / nt
      if (g1 > g0) call c_dense(path, n_out, n_in, packed, u, ldu, 0, n, g0, g1, scale, sx, b, act, y)
      !$omp end parallel
    end if
  end subroutine int8_dense_forward

  !> acc(j, s) = sum_i q(j, i) qx(i, s), exact in int32, for any int8 q and
  !! qx given as u(int8_ldu(n_in), n) = qx + 128 (pykd.int8_gemm).
  subroutine int8_gemm_product(n_in, n_out, n, packed, u, acc)
    integer, intent(in) :: n_in, n_out, n
    integer(c_int32_t), intent(in) :: packed(*)
    integer(c_int8_t), intent(in) :: u(*)
    integer(c_int32_t), intent(inout) :: acc(n_out, n)
    integer(c_int) :: path, ldu, ng
    integer :: k, s0, s1, chunk

    path = c_path()
    ldu = int(int8_ldu(int(n_in, int64)))
    ng = (n_out + 15) / 16
    if (.not. use_team(n, n_in, n_out)) then
      call c_gemm(path, n_out, n_in, packed, u, ldu, 0, n, 0, ng, acc)
      return
    end if
    chunk = chunk_of(n)
    !$omp parallel do schedule(dynamic, 1) private(s0, s1)
    do k = 0, (n - 1) / chunk
      s0 = k * chunk; s1 = min(n, s0 + chunk)
      call c_gemm(path, n_out, n_in, packed, u, ldu, s0, s1, 0, ng, acc)
    end do
    !$omp end parallel do
  end subroutine int8_gemm_product

  !> Samples per chunk of a split batch: 24 (two 12-sample tiles), or a
  !! quarter of a small batch.
  pure integer function chunk_of(n)
    integer, intent(in) :: n
    chunk_of = min(24, (n + 3) / 4)
  end function chunk_of

end module pykd_int8_kernel
