!> Kind 3, `sparse_csr`: W in compressed sparse rows, rows being inputs.
!!
!! Slices (docs/model.md): f32 = [values (nnz), plane values (16 p2), b
!! (n_out)] (b last, as every float kind), i8 = [plane counts (cells), plane indices (16 p2)] (both empty
!! when p2 = 0), i32 = [indptr (n_in + 1), indices (nnz)] (0-based, as
!! scipy); p1 = nnz, p2 = planes. The planes (pykd_sparse_kernel) are
!! derived from the CSR: built at load (when planes_kept), never saved, and
!! checked against a rebuild by check; one sample runs on them.
!! Payload v2: nnz u32, index_bits u32 (8, 16, 32), indptr u32[n_in + 1],
!! indices u<index_bits>[nnz], values f32[nnz], b f32[n_out].
module pykd_layer_sparse_csr
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT
  use pykd_layer, only: pykd_layer_t
  use pykd_bytes, only: get_f32, put_u32, put_f32, str
  use pykd_codes, only: COL_P2, COL_I8_OFF
  use pykd_status, only: PYKD_ERR_ALLOC
  use pykd_layer_util, only: MAX_COUNT, take, read_count, sizes_ok, row_expect, nonfinite_count, &
                             csr_ok, nan_fill, put_uint, get_uint
  use pykd_sparse_kernel, only: sparse_forward, sparse_pattern_ok, sparse_workspace_words, &
                                plane_cells, plane_count, planes_kept, planes_build, planes_check, planes_forward, &
                                planes_for, &
                                PLANE_LANES, PLANE_MIN_NNZ
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
    procedure, nopass :: f32_lead => planes_lead
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

  !> With planes (p2 > 0), one sample (and up to PLANE_MAX_BATCH: planes_for)
  !! runs on them alone: the kernel reads
  !! no CSR, and the planes' counts are checked to add up to p2, so no
  !! table can make it read or write out of bounds. Otherwise the pattern
  !! is checked first (O(n_in + nnz), vectorized; on Zen 5 longer than the
  !! planes' product): a table built in memory with a bad index gives
  !! PYKD_ERR_ARG (y = NaN), never a stray write. The product's kernel
  !! depends on n (pykd_sparse_kernel).
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
    integer(int64) :: nnz, o, oi, o8, cells
    integer :: n_in, n_out
    logical :: ok

    n_in = int(row(COL_N_IN)); n_out = int(row(COL_N_OUT)); nnz = row(COL_P1)
    o = row(COL_F32_OFF); oi = row(COL_I32_OFF)
    if (row(COL_P2) > 0 .and. planes_for(n)) then
      o8 = row(COL_I8_OFF); cells = plane_cells(row(COL_N_IN), row(COL_N_OUT))
      call planes_forward(n_in, n_out, n, row(COL_P2), i8(o8 + 1), i8(o8 + cells + 1), &
                          f32(o + nnz + 1), int(row(COL_ACT)), f32(o + nnz + PLANE_LANES * row(COL_P2) + 1), &
                          x, y, ok)
      stat = PYKD_OK
      if (ok) return
      call nan_fill(row(COL_N_OUT) * n, y)
      stat = PYKD_ERR_ARG
      return
    end if
    if (.not. sparse_pattern_ok(n_in, n_out, nnz, i32(oi + 1), i32(oi + n_in + 2))) then
      call nan_fill(row(COL_N_OUT) * n, y)
      stat = PYKD_ERR_ARG
      return
    end if
    call sparse_forward(n_in, n_out, n, nnz, i32(oi + 1), i32(oi + n_in + 2), f32(o + 1), i8, &
                        f32(o + 1), .false., int(row(COL_ACT)), f32(o + nnz + PLANE_LANES * row(COL_P2) + 1), &
                        x, y, work)
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
    row(COL_P1:) = 0
    row(COL_P1) = nnz
    if (.not. scan_planes(buf, pos + 8, n_in, n_out, nnz, bits / 8, row(COL_P2), msg)) then
      stat = PYKD_ERR_ALLOC
      return
    end if
    call set_lengths(row)
    pos = pos + need
    stat = PYKD_OK
  end subroutine csr_scan

  !> The planes a file's pattern (at buf(p + 1), not yet checked: counted
  !! as plane_count does) will have once loaded, or 0 if it keeps none.
  !! False when the scratch (bounded by the bytes the file holds) cannot
  !! be allocated.
  logical function scan_planes(buf, p, n_in, n_out, nnz, nb, n_planes, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: p, n_in, n_out, nnz, nb
    integer(int64), intent(out) :: n_planes
    character(len=*), intent(inout) :: msg
    integer(int32), allocatable :: indptr(:), indices(:)
    integer(int64) :: k
    integer :: ierr

    n_planes = 0
    ok = .true.
    if (nnz < PLANE_MIN_NNZ) return
    allocate (indptr(n_in + 1), indices(nnz), stat=ierr)
    ok = ierr == 0
    if (ok) then
      do k = 0, n_in
        indptr(k + 1) = int(min(get_uint(buf, p + 4 * k, 4), nnz), int32)
      end do
      do k = 1, nnz
        indices(k) = int(min(get_uint(buf, p + 4 * (n_in + 1) + nb * (k - 1), int(nb)), MAX_COUNT), int32)
      end do
      n_planes = plane_count(int(n_in), int(n_out), nnz, indptr, indices)
      ok = n_planes >= 0
    end if
    if (.not. ok) then
      msg = 'cannot allocate '//str(4 * (n_in + 1 + nnz))//' bytes to count the planes'
      return
    end if
    if (.not. planes_kept(n_in, n_out, nnz, n_planes)) n_planes = 0
  end function scan_planes

  !> The slice lengths for nnz = p1 and p2 planes.
  pure subroutine set_lengths(row)
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer(int64) :: f32_len, i8_len, i32_len
    call lengths(row, f32_len, i8_len, i32_len)
    row(COL_F32_LEN) = f32_len
    row(COL_I8_LEN) = i8_len
    row(COL_I32_LEN) = i32_len
  end subroutine set_lengths

  pure subroutine lengths(row, f32_len, i8_len, i32_len)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer(int64), intent(out) :: f32_len, i8_len, i32_len
    integer(int64) :: np
    np = row(COL_P2)
    f32_len = row(COL_P1) + row(COL_N_OUT) + PLANE_LANES * np
    i8_len = 0
    if (np > 0) i8_len = plane_cells(row(COL_N_IN), row(COL_N_OUT)) + PLANE_LANES * np
    i32_len = row(COL_N_IN) + 1 + row(COL_P1)
  end subroutine lengths

  !> Build the planes of a checked row (p2 > 0) into its slices.
  subroutine build_planes(row, f32, i8, i32, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oi, o8, nnz, cells, np
    integer :: n_in

    stat = PYKD_OK
    np = row(COL_P2)
    if (np == 0) return
    o = row(COL_F32_OFF); oi = row(COL_I32_OFF); o8 = row(COL_I8_OFF); nnz = row(COL_P1)
    n_in = int(row(COL_N_IN)); cells = plane_cells(row(COL_N_IN), row(COL_N_OUT))
    call planes_build(n_in, int(row(COL_N_OUT)), nnz, i32(oi + 1), i32(oi + n_in + 2), np, &
                      i8(o8 + 1:o8 + cells), i8(o8 + cells + 1), f32(o + nnz + 1), stat, values=f32(o + 1))
    if (stat /= 0) then
      stat = code
      msg = 'p2 = '//str(np)//' is not the number of planes of the pattern (or no memory to build them)'
    end if
  end subroutine build_planes

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
    call get_f32(buf, pos, f32(row(COL_F32_OFF) + 1), nnz)
    call get_f32(buf, pos + 4 * nnz, f32(row(COL_F32_OFF) + nnz + PLANE_LANES * row(COL_P2) + 1), row(COL_N_OUT))
    pos = pos + 4 * (nnz + row(COL_N_OUT))
    call csr_values_ok(row, f32, i32, PYKD_ERR_FORMAT, stat, msg)
    ! The planes are derived from the CSR: built here, never read from the file.
    if (stat == PYKD_OK) call build_planes(row, f32, i8, i32, PYKD_ERR_FORMAT, stat, msg)
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
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + 1), nnz)
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + nnz + PLANE_LANES * row(COL_P2) + 1), row(COL_N_OUT))
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
    if (stat == PYKD_OK) call planes_ok(row, f32, i8, i32, stat, msg)
  end subroutine csr_check

  !> p2 is 0 or the planes the pattern keeps, and the slices hold exactly
  !! the planes (a stale copy would give wrong results silently).
  subroutine planes_ok(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oi, o8, nnz, np, cells
    integer :: n_in

    stat = PYKD_OK
    np = row(COL_P2)
    if (np == 0) return
    o = row(COL_F32_OFF); oi = row(COL_I32_OFF); o8 = row(COL_I8_OFF); nnz = row(COL_P1)
    n_in = int(row(COL_N_IN)); cells = plane_cells(row(COL_N_IN), row(COL_N_OUT))
    call planes_check(n_in, int(row(COL_N_OUT)), nnz, i32(oi + 1), i32(oi + n_in + 2), np, &
                      i8(o8 + 1:o8 + cells), i8(o8 + cells + 1), f32(o + nnz + 1), stat, msg, &
                      values=f32(o + 1))
    if (stat /= PYKD_OK) msg = 'p2: '//msg
  end subroutine planes_ok

  pure subroutine csr_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: nnz
    logical :: ok
    integer(int64) :: f32_len, i8_len, i32_len

    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    nnz = row(COL_P1)
    if (nnz < 0 .or. nnz > min(MAX_COUNT, row(COL_N_IN) * row(COL_N_OUT))) then
      msg = 'nnz = p1 = '//str(nnz)//' outside 0 .. min(2**31 - 1, n_in * n_out)'
      return
    end if
    if (row(COL_P2) < 0 .or. 2 * row(COL_P2) > nnz .or. (row(COL_P2) > 0 .and. nnz < PLANE_MIN_NNZ)) then
      msg = 'planes = p2 = '//str(row(COL_P2))//' outside 0 .. nnz / 2'
      return
    end if
    call lengths(row, f32_len, i8_len, i32_len)
    call row_expect(row, f32_len, i8_len, i32_len, [nnz, row(COL_P2), 0_int64, 0_int64], ok, msg)
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
    else if (nonfinite_count(row(COL_N_OUT), f32(o + nnz + PLANE_LANES * row(COL_P2) + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
    else
      stat = PYKD_OK
    end if
  end subroutine csr_values_ok

  !> The planes' values start after the nnz values: the loader aligns them.
  pure integer(int64) function planes_lead(row)
    integer(int64), intent(in) :: row(N_FIELDS)
    planes_lead = row(COL_P1)
  end function planes_lead

end module pykd_layer_sparse_csr
