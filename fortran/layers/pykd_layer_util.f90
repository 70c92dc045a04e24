!> Helpers the layer kinds share: overflow-safe payload sizes, row checks,
!! finite checks, LSB-first bit streams (docs/format.md "Bit streams") and
!! the float32 product through BLAS.
!!
!! Byte offsets and bit positions are 0-based, as in docs/format.md.
module pykd_layer_util
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_KIND, COL_N_IN, COL_N_OUT, COL_F32_LEN, COL_I8_LEN, &
                        COL_I32_LEN, COL_P1
  use pykd_bytes, only: get_u32, str
  use pykd_blas, only: sgemm, sgemv
  use pykd_config, only: PAR_MIN_WORK
  use ieee_arithmetic, only: ieee_value, ieee_quiet_nan
  implicit none
  private
  public :: MAX_COUNT, take, read_count, sizes_ok, row_expect, nonfinite_count, negative_count, &
            get_bits, put_bits, fewest_bits, packed_bytes, gemm_nn, csr_ok, csr_product, nan_fill, &
            put_uint, get_uint

  !> Largest count field (docs/format.md): 2**31 - 1.
  integer(int64), parameter :: MAX_COUNT = huge(0_int32)

contains

  !> Reserve count * width more payload bytes (need += count * width) if
  !! they fit before `limit`; else false with a 'truncated' message. No
  !! product is formed before it is known to fit, so nothing overflows.
  logical function take(need, count, width, pos, limit, what, msg)
    integer(int64), intent(inout) :: need
    integer(int64), intent(in) :: count, pos, limit
    integer, intent(in) :: width
    character(len=*), intent(in) :: what
    character(len=*), intent(inout) :: msg
    integer(int64) :: room

    room = max(limit - pos - need, 0_int64)
    take = count >= 0 .and. count <= room / width
    if (take) then
      need = need + count * width
    else
      msg = 'truncated: '//what//' needs more bytes at offset '//str(pos + need)// &
            ' than the '//str(room)//' that remain'
    end if
  end function take

  !> The u32 count at pos + need (need advances by 4), at most MAX_COUNT.
  logical function read_count(buf, pos, need, limit, what, v, msg)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos, limit
    integer(int64), intent(inout) :: need
    character(len=*), intent(in) :: what
    integer(int64), intent(out) :: v
    character(len=*), intent(inout) :: msg

    v = 0
    read_count = take(need, 1_int64, 4, pos, limit, what, msg)
    if (.not. read_count) return
    v = get_u32(buf, pos + need - 4)
    read_count = v <= MAX_COUNT
    if (.not. read_count) msg = what//' = '//str(v)//' exceeds 2**31 - 1'
  end function read_count

  !> ok = 1 <= n_in, n_out <= MAX_COUNT.
  pure subroutine sizes_ok(row, ok, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    logical, intent(out) :: ok
    character(len=*), intent(inout) :: msg
    ok = row(COL_N_IN) >= 1 .and. row(COL_N_IN) <= MAX_COUNT .and. &
               row(COL_N_OUT) >= 1 .and. row(COL_N_OUT) <= MAX_COUNT
    if (.not. ok) msg = 'sizes '//str(row(COL_N_IN))//' x '//str(row(COL_N_OUT))// &
                              ' outside 1 .. 2**31 - 1'
  end subroutine sizes_ok

  !> ok = the row's slice lengths and kind parameters p1..p4 are the given ones.
  pure subroutine row_expect(row, f32_len, i8_len, i32_len, p, ok, msg)
    integer(int64), intent(in) :: row(N_FIELDS), f32_len, i8_len, i32_len, p(4)
    logical, intent(out) :: ok
    character(len=*), intent(inout) :: msg
    integer :: k

    ok = .false.
    if (row(COL_F32_LEN) /= f32_len) then
      msg = 'f32_len is '//str(row(COL_F32_LEN))//', the layout needs '//str(f32_len)
    else if (row(COL_I8_LEN) /= i8_len) then
      msg = 'i8_len is '//str(row(COL_I8_LEN))//', the layout needs '//str(i8_len)
    else if (row(COL_I32_LEN) /= i32_len) then
      msg = 'i32_len is '//str(row(COL_I32_LEN))//', the layout needs '//str(i32_len)
    else
      do k = 1, 4
        if (row(COL_P1 + k - 1) /= p(k)) then
          msg = 'p'//str(int(k, int64))//' is '//str(row(COL_P1 + k - 1))//', expected '//str(p(k))
          return
        end if
      end do
      ok = .true.
    end if
  end subroutine row_expect

  !> Number of NaN or inf entries (vectorizes, unlike all(ieee_is_finite())).
  pure integer(int64) function nonfinite_count(n, x)
    integer(int64), intent(in) :: n
    real(real32), intent(in) :: x(n)
    nonfinite_count = count(.not. (abs(x) <= huge(x)), kind=int64)
  end function nonfinite_count

  !> Number of entries < 0 (NaN is not counted).
  pure integer(int64) function negative_count(n, x)
    integer(int64), intent(in) :: n
    real(real32), intent(in) :: x(n)
    negative_count = count(x < 0, kind=int64)
  end function negative_count

  !> The w-bit field (w <= 32) at bit t of the stream starting at bytes(1).
  pure integer(int64) function get_bits(bytes, t, w)
    integer(int8), intent(in) :: bytes(*)
    integer(int64), intent(in) :: t
    integer, intent(in) :: w
    integer(int64) :: tt, byte
    integer :: got, sh, nb

    get_bits = 0
    got = 0
    tt = t
    do while (got < w)
      byte = iand(int(bytes(tt / 8 + 1), int64), 255_int64)
      sh = int(mod(tt, 8_int64))
      nb = min(8 - sh, w - got)
      get_bits = ior(get_bits, ishft(iand(ishft(byte, -sh), 2_int64**nb - 1), got))
      got = got + nb
      tt = tt + nb
    end do
  end function get_bits

  !> OR the low w bits (w <= 32) of v into the stream at bit t (the bits
  !! there must be zero).
  pure subroutine put_bits(bytes, t, v, w)
    integer(int8), intent(inout) :: bytes(*)
    integer(int64), intent(in) :: t, v
    integer, intent(in) :: w
    integer(int64) :: tt, part, b
    integer :: got, sh, nb

    got = 0
    tt = t
    do while (got < w)
      sh = int(mod(tt, 8_int64))
      nb = min(8 - sh, w - got)
      part = iand(ishft(v, -got), 2_int64**nb - 1)
      b = ior(iand(int(bytes(tt / 8 + 1), int64), 255_int64), ishft(part, sh))
      bytes(tt / 8 + 1) = int(b - merge(256_int64, 0_int64, b > 127), int8)
      got = got + nb
      tt = tt + nb
    end do
  end subroutine put_bits

  !> nbytes little-endian bytes of v at byte pos of buf; pos advances.
  pure subroutine put_uint(buf, pos, v, nbytes)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: v
    integer, intent(in) :: nbytes
    integer(int64) :: b
    integer :: m

    do m = 0, nbytes - 1
      b = iand(ishft(v, -8 * m), 255_int64)
      buf(pos + 1 + m) = int(b - merge(256_int64, 0_int64, b > 127), int8)
    end do
    pos = pos + nbytes
  end subroutine put_uint

  !> The unsigned little-endian integer of nbytes (<= 4) bytes at byte pos.
  pure integer(int64) function get_uint(buf, pos, nbytes)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos
    integer, intent(in) :: nbytes
    integer :: m

    get_uint = 0
    do m = nbytes - 1, 0, -1
      get_uint = ior(ishft(get_uint, 8), iand(int(buf(pos + 1 + m), int64), 255_int64))
    end do
  end function get_uint

  !> The fewest bits holding n_codes indices: any of 1..8 (pow2 false) or
  !! one of 1, 2, 4, 8 (pow2 true). n_codes in 1..256.
  pure integer function fewest_bits(n_codes, pow2)
    integer(int64), intent(in) :: n_codes
    logical, intent(in) :: pow2
    fewest_bits = 1
    do while (2_int64**fewest_bits < n_codes)
      fewest_bits = fewest_bits + 1
    end do
    if (pow2 .and. fewest_bits == 3) fewest_bits = 4
    if (pow2 .and. fewest_bits > 4) fewest_bits = 8
  end function fewest_bits

  !> ceil(count * bits / 8) without overflow (count < 2**62, bits <= 8).
  pure integer(int64) function packed_bytes(count, bits)
    integer(int64), intent(in) :: count
    integer, intent(in) :: bits
    packed_bytes = (count / 8) * bits + (mod(count, 8_int64) * bits + 7) / 8
  end function packed_bytes

  !> c = a b + beta c, a (m, k) with leading dimension m, b (k, n) with
  !! leading dimension ldb. One sample goes through sgemv, which streams `a`
  !! once (sgemm with n = 1 is several times slower).
  subroutine gemm_nn(m, n, k, a, b, ldb, beta, c)
    integer, intent(in) :: m, n, k, ldb
    real(real32), intent(in) :: a(m, *), b(ldb, *), beta
    real(real32), intent(inout) :: c(m, *)

    if (n == 1) then
      call sgemv('N', m, k, 1.0_real32, a, m, b, 1, beta, c, 1)
    else
      call sgemm('N', 'N', m, n, k, 1.0_real32, a, m, b, ldb, beta, c, m)
    end if
  end subroutine gemm_nn

  !> A CSR pattern (0-based indptr(n_in + 1), indices(nnz)) is valid:
  !! indptr(1) = 0, non-decreasing, indptr(n_in + 1) = nnz, indices in
  !! [0, n_out) and strictly increasing within a row. O(n_in + nnz).
  pure logical function csr_ok(n_in, n_out, nnz, indptr, indices)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    integer :: i
    integer(int64) :: k

    csr_ok = indptr(1) == 0 .and. indptr(n_in + 1) == nnz
    if (.not. csr_ok) return
    csr_ok = all(indptr(2:) >= indptr(:n_in)) .and. all(indices >= 0 .and. indices < n_out)
    if (.not. csr_ok) return
    do i = 1, n_in
      do k = int(indptr(i), int64) + 2, indptr(i + 1)
        if (indices(k) <= indices(k - 1)) then
          csr_ok = .false.
          return
        end if
      end do
    end do
  end function csr_ok

  !> y = W x for W (n_in, n_out) in CSR (rows = inputs, a valid pattern:
  !! csr_ok), scattering x(i) * values into the outputs of row i. A sample
  !! with a NaN or inf input gets NaN outputs (docs/model.md), as the dense
  !! product would. Samples split over threads above PAR_MIN_WORK entries;
  !! each sample is summed in the same order whatever the thread count.
  subroutine csr_product(n_in, n_out, n, nnz, indptr, indices, values, x, y)
    integer, intent(in) :: n_in, n_out, n
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(nnz), x(n_in, n)
    real(real32), intent(out) :: y(n_out, n)
    integer :: i, j
    integer(int64) :: k
    real(real32) :: xi

    !$omp parallel do schedule(static) private(i, k, xi) if(parallel: nnz * n >= PAR_MIN_WORK)
    do j = 1, n
      y(:, j) = 0
      if (nonfinite_count(int(n_in, int64), x(:, j)) > 0) then
        y(:, j) = ieee_value(xi, ieee_quiet_nan)
        cycle
      end if
      do i = 1, n_in
        xi = x(i, j)
        do k = int(indptr(i), int64) + 1, indptr(i + 1)
          y(indices(k) + 1, j) = y(indices(k) + 1, j) + xi * values(k)
        end do
      end do
    end do
    !$omp end parallel do
  end subroutine csr_product

  !> a = NaN (a forward that fails still leaves its output defined).
  subroutine nan_fill(m, a)
    integer(int64), intent(in) :: m
    real(real32), intent(out) :: a(m)
    a = ieee_value(1.0_real32, ieee_quiet_nan)
  end subroutine nan_fill

end module pykd_layer_util
