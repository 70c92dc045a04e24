!> Kind 3, `sparse_csr`: W in compressed sparse rows, rows being inputs.
!!
!! Slices (docs/model.md): f32 = [values (nnz), b (n_out)], i32 = [indptr
!! (n_in + 1), indices (nnz)] (0-based, as scipy); p1 = nnz.
!! Payload v2: nnz u32, index_bits u32 (8, 16, 32), indptr u32[n_in + 1],
!! indices u<index_bits>[nnz], values f32[nnz], b f32[n_out].
module pykd_layer_sparse_csr
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT
  use pykd_layer, only: pykd_layer_t
  use pykd_bytes, only: get_f32, put_u32, put_f32, str
  use pykd_layer_util, only: MAX_COUNT, take, read_count, sizes_ok, row_expect, nonfinite_count, &
                             csr_ok, nan_fill, put_uint, get_uint
  use pykd_sparse_kernel, only: sparse_forward, sparse_pattern_ok, sparse_workspace_words
  implicit none
  private
  public :: sparse_csr_layer_t, index_bytes

  type, extends(pykd_layer_t) :: sparse_csr_layer_t
  contains
    procedure, nopass :: name => csr_name
    procedure, nopass :: forward => csr_forward
    procedure, nopass :: workspace_words => csr_workspace
    procedure, nopass :: scan_record => csr_scan
    procedure, nopass :: load_record => csr_load
    procedure, nopass :: record_bytes => csr_bytes
    procedure, nopass :: write_record => csr_write
    procedure, nopass :: check => csr_check
    procedure, nopass :: check_row => csr_check_row
  end type sparse_csr_layer_t

contains

  pure function csr_name() result(s)
    character(len=:), allocatable :: s
    s = 'sparse_csr'
  end function csr_name

  !> Bytes per index that writers use: the narrowest of 1, 2, 4 holding n_out - 1.
  pure integer function index_bytes(n_out)
    integer(int64), intent(in) :: n_out
    index_bytes = 4
    if (n_out - 1 < 65536) index_bytes = 2
    if (n_out - 1 < 256) index_bytes = 1
  end function index_bytes

  !> The pattern is checked first (O(n_in + nnz), vectorized): a table
  !! built in memory with a bad index gives PYKD_ERR_ARG (y = NaN), never a
  !! stray write. The product's kernel depends on n (pykd_sparse_kernel).
  subroutine csr_forward(row, f32, i8, i32, n, x, y, work, stat)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(row(COL_N_IN), n)
    real(real32), intent(out) :: y(row(COL_N_OUT), n)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat
    integer(int64) :: nnz, o, oi
    integer :: n_in, n_out

    n_in = int(row(COL_N_IN)); n_out = int(row(COL_N_OUT)); nnz = row(COL_P1)
    o = row(COL_F32_OFF); oi = row(COL_I32_OFF)
    if (.not. sparse_pattern_ok(n_in, n_out, nnz, i32(oi + 1), i32(oi + n_in + 2))) then
      call nan_fill(row(COL_N_OUT) * n, y)
      stat = PYKD_ERR_ARG
      return
    end if
    call sparse_forward(n_in, n_out, n, nnz, i32(oi + 1), i32(oi + n_in + 2), f32(o + 1), i8, &
                        f32(o + 1), .false., int(row(COL_ACT)), f32(o + nnz + 1), x, y, work)
    stat = PYKD_OK
  end subroutine csr_forward

  pure integer(int64) function csr_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    csr_workspace = sparse_workspace_words(int(row(COL_N_IN)), int(row(COL_N_OUT)), n)
  end function csr_workspace

  subroutine csr_scan(version, buf, pos, limit, row, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: limit
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: need, nnz, bits, n_in, n_out
    logical :: ok

    stat = PYKD_ERR_FORMAT
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    n_in = row(COL_N_IN); n_out = row(COL_N_OUT)
    need = 0
    if (.not. read_count(buf, pos, need, limit, 'nnz', nnz, msg)) return
    if (.not. read_count(buf, pos, need, limit, 'index_bits', bits, msg)) return
    if (nnz > n_in * n_out) then
      msg = 'nnz = '//str(nnz)//' exceeds n_in * n_out = '//str(n_in * n_out)
      return
    end if
    if (.not. (bits == 8 .or. bits == 16 .or. bits == 32)) then
      msg = 'index_bits = '//str(bits)//' (must be 8, 16 or 32)'
      return
    end if
    if (bits < 32 .and. n_out - 1 >= 2_int64**bits) then
      msg = 'index_bits = '//str(bits)//' cannot hold the output index '//str(n_out - 1)
      return
    end if
    if (.not. take(need, n_in + 1, 4, pos, limit, 'indptr', msg)) return
    if (.not. take(need, nnz, int(bits / 8), pos, limit, 'indices', msg)) return
    if (.not. take(need, nnz + n_out, 4, pos, limit, 'values and b', msg)) return
    row(COL_F32_LEN) = nnz + n_out
    row(COL_I8_LEN) = 0
    row(COL_I32_LEN) = n_in + 1 + nnz
    row(COL_P1:) = 0
    row(COL_P1) = nnz
    pos = pos + need
    stat = PYKD_OK
  end subroutine csr_scan

  subroutine csr_load(version, buf, pos, row, f32, i8, i32, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(inout) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: nnz, nb, n_in, oi, k, v

    stat = PYKD_ERR_FORMAT
    n_in = row(COL_N_IN); nnz = row(COL_P1); oi = row(COL_I32_OFF)
    nb = get_uint(buf, pos + 4, 4) / 8
    pos = pos + 8
    do k = 0, n_in
      v = get_uint(buf, pos, 4)
      pos = pos + 4
      if (v > nnz) then
        msg = 'indptr['//str(k)//'] = '//str(v)//' exceeds nnz = '//str(nnz)
        return
      end if
      i32(oi + 1 + k) = int(v, int32)
    end do
    do k = 1, nnz
      v = get_uint(buf, pos, int(nb))
      pos = pos + nb
      ! Only 32-bit indices can exceed the int32 range; any such is >= n_out.
      i32(oi + n_in + 1 + k) = int(min(v, MAX_COUNT), int32)
    end do
    call get_f32(buf, pos, f32(row(COL_F32_OFF) + 1), nnz + row(COL_N_OUT))
    pos = pos + 4 * (nnz + row(COL_N_OUT))
    call csr_values_ok(row, f32, i32, PYKD_ERR_FORMAT, stat, msg)
  end subroutine csr_load

  integer(int64) function csr_bytes(row, f32, i8, i32)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    csr_bytes = 8 + 4 * (row(COL_N_IN) + 1) + row(COL_P1) * index_bytes(row(COL_N_OUT)) &
                + 4 * (row(COL_P1) + row(COL_N_OUT))
  end function csr_bytes

  subroutine csr_write(row, f32, i8, i32, buf, pos)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64) :: k, oi, nnz
    integer :: nb

    oi = row(COL_I32_OFF); nnz = row(COL_P1); nb = index_bytes(row(COL_N_OUT))
    call put_u32(buf, pos, [nnz, int(8 * nb, int64)])
    do k = 1, row(COL_N_IN) + 1
      call put_uint(buf, pos, int(i32(oi + k), int64), 4)
    end do
    do k = 1, nnz
      call put_uint(buf, pos, int(i32(oi + row(COL_N_IN) + 1 + k), int64), nb)
    end do
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + 1), nnz + row(COL_N_OUT))
  end subroutine csr_write

  subroutine csr_check(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    call csr_check_row(row, stat, msg)
    if (stat == PYKD_OK) call csr_values_ok(row, f32, i32, PYKD_ERR_ARG, stat, msg)
  end subroutine csr_check

  pure subroutine csr_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: nnz
    logical :: ok

    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    nnz = row(COL_P1)
    if (nnz < 0 .or. nnz > min(MAX_COUNT, row(COL_N_IN) * row(COL_N_OUT))) then
      msg = 'nnz = p1 = '//str(nnz)//' outside 0 .. min(2**31 - 1, n_in * n_out)'
      return
    end if
    call row_expect(row, nnz + row(COL_N_OUT), 0_int64, row(COL_N_IN) + 1 + nnz, &
                    [nnz, 0_int64, 0_int64, 0_int64], ok, msg)
    if (ok) stat = PYKD_OK
  end subroutine csr_check_row

  !> The CSR pattern (csr_ok), finite values and b; else `code`.
  subroutine csr_values_ok(row, f32, i32, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oi, nnz
    integer :: n_in

    o = row(COL_F32_OFF); oi = row(COL_I32_OFF); nnz = row(COL_P1); n_in = int(row(COL_N_IN))
    stat = code
    if (.not. csr_ok(n_in, int(row(COL_N_OUT)), nnz, i32(oi + 1), i32(oi + n_in + 2))) then
      msg = 'bad CSR pattern: indptr must start at 0, not decrease and end at nnz = '//str(nnz)// &
            '; indices must be < n_out = '//str(row(COL_N_OUT))//' and increase within a row'
    else if (nonfinite_count(nnz, f32(o + 1)) > 0) then
      msg = 'values contain NaN or infinite values'
    else if (nonfinite_count(row(COL_N_OUT), f32(o + nnz + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
    else
      stat = PYKD_OK
    end if
  end subroutine csr_values_ok

end module pykd_layer_sparse_csr
