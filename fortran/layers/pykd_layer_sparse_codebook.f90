!> Kind 6, `sparse_codebook` (Deep Compression's storage): the CSR pattern
!! of the non-zero weights, each weight a centroid index.
!!
!! Slices (docs/model.md): f32 = [centroids (n_codes), plane values (16
!! p4), b (n_out)] (b last, as every float kind), i8 = [codes (nnz, one
!! unsigned code per byte), plane counts (cells), plane indices (16 p4)]
!! (the planes empty when p4 = 0), i32 = [indptr (n_in + 1), indices
!! (nnz)]; p1 = nnz, p2 = n_codes, p3 = bits, p4 = planes. The planes are
!! sparse_csr's (pykd_sparse_kernel) with the decoded values
!! centroids(codes + 1): built at load (when planes_kept), never saved,
!! checked against a rebuild by check; one sample runs on them.
!! Payload v2: nnz, n_codes, bits, rice_k, pos_bytes (u32 each), centroids
!! f32[n_codes], positions u8[pos_bytes] (Rice-coded gaps of the flat
!! positions i n_out + j), codes u8[ceil(nnz bits / 8)], b f32[n_out].
!! The loader decodes the positions into the CSR arrays; the writer
!! encodes them with the rice_k that gives the fewest bytes.
module pykd_layer_sparse_codebook
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_OFF, COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1, COL_P2, COL_P3, COL_P4
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT, PYKD_ERR_ALLOC
  use pykd_layer, only: pykd_layer_t
  use pykd_bytes, only: get_f32, put_u32, put_f32, str
  use pykd_layer_util, only: MAX_COUNT, take, read_count, sizes_ok, row_expect, nonfinite_count, &
                             packed_bytes, get_bits, put_bits, get_uint, csr_ok, nan_fill
  use pykd_sparse_kernel, only: sparse_forward, sparse_pattern_ok, sparse_workspace_words, &
                                plane_cells, plane_count, planes_kept, planes_build, planes_check, &
                                planes_forward, planes_for, PLANE_LANES, PLANE_MIN_NNZ
  use pykd_layer_codebook, only: codes_ok
  implicit none
  private
  public :: sparse_codebook_layer_t, rice_plan

  !> Longest positions stream (pos_bytes is a u32).
  integer(int64), parameter :: MAX_POS_BYTES = 4294967295_int64
  !> Bit counts saturate here (far beyond MAX_POS_BYTES * 8), so no sum overflows.
  integer(int64), parameter :: BIT_CAP = 2_int64**40

  type, extends(pykd_layer_t) :: sparse_codebook_layer_t
  contains
    procedure, nopass :: name => sc_name
    procedure, nopass :: forward => sc_forward
    procedure, nopass :: workspace_words => sc_workspace
    procedure, nopass :: scan_record => sc_scan
    procedure, nopass :: load_record => sc_load
    procedure, nopass :: record_bytes => sc_bytes
    procedure, nopass :: write_record => sc_write
    procedure, nopass :: check => sc_check
    procedure, nopass :: f32_lead => planes_lead
    procedure, nopass :: check_row => sc_check_row
  end type sparse_codebook_layer_t

contains

  pure function sc_name() result(s)
    character(len=:), allocatable :: s
    s = 'sparse_codebook'
  end function sc_name

  !> The product's scratch (pykd_sparse_kernel): the entries are read
  !! through their codes, never decoded as a whole.
  pure integer(int64) function sc_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    sc_workspace = sparse_workspace_words(int(row(COL_N_IN)), int(row(COL_N_OUT)), n)
  end function sc_workspace

  !> With planes (p4 > 0), one sample (and up to PLANE_MAX_BATCH:
  !! planes_for) runs on them alone, as sparse_csr's: no codes, no CSR
  !! read, the planes' counts checked to add up to p4. Otherwise the codes
  !! (< n_codes) and the pattern are checked (O(nnz), vectorized), then
  !! the CSR product reads centroids(codes + 1); its kernel depends on n
  !! (pykd_sparse_kernel). Planes, scatter and panel give the same bits.
  subroutine sc_forward(row, f32, i8, i32, n, x, y, work, stat)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(row(COL_N_IN), n)
    real(real32), intent(out) :: y(row(COL_N_OUT), n)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat
    integer(int64) :: nnz, o, oi, oq, nc, np, ob, cells
    integer :: n_in, n_out
    logical :: ok

    n_in = int(row(COL_N_IN)); n_out = int(row(COL_N_OUT)); nnz = row(COL_P1); nc = row(COL_P2)
    np = row(COL_P4)
    o = row(COL_F32_OFF); oi = row(COL_I32_OFF); oq = row(COL_I8_OFF)
    ob = o + nc + PLANE_LANES * np        ! b
    if (np > 0 .and. planes_for(n)) then
      cells = plane_cells(row(COL_N_IN), row(COL_N_OUT))
      call planes_forward(n_in, n_out, n, np, i8(oq + nnz + 1), i8(oq + nnz + cells + 1), f32(o + nc + 1), &
                          int(row(COL_ACT)), f32(ob + 1), x, y, ok)
      stat = PYKD_OK
      if (ok) return
      call nan_fill(row(COL_N_OUT) * n, y)
      stat = PYKD_ERR_ARG
      return
    end if
    stat = PYKD_ERR_ARG
    if (codes_below(nnz, i8(oq + 1), nc)) then
      if (sparse_pattern_ok(n_in, n_out, nnz, i32(oi + 1), i32(oi + n_in + 2))) stat = PYKD_OK
    end if
    if (stat /= PYKD_OK) then
      call nan_fill(row(COL_N_OUT) * n, y)
      return
    end if
    call sparse_forward(n_in, n_out, n, nnz, i32(oi + 1), i32(oi + n_in + 2), f32(o + 1), &
                        i8(oq + 1), f32(o + 1), .true., int(row(COL_ACT)), &
                        f32(ob + 1), x, y, work)
  end subroutine sc_forward

  !> Every code (an unsigned byte) is < nc. The largest code as a signed
  !! maximum of code - 128 (a byte maxval vectorizes; widening each code
  !! to compare it cost as much as the batch-1 product).
  pure logical function codes_below(nnz, codes, nc)
    integer(int64), intent(in) :: nnz, nc
    integer(int8), intent(in) :: codes(nnz)
    integer(int8), parameter :: FLIP = -127_int8 - 1_int8
    codes_below = .true.
    if (nnz > 0) codes_below = int(maxval(ieor(codes, FLIP)), int64) + 128 < nc
  end function codes_below

  subroutine sc_scan(version, buf, pos, limit, row, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: limit
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: need, f(5)
    logical :: ok
    integer :: k
    character(len=9), parameter :: FIELD(5) = [character(len=9) :: 'nnz', 'n_codes', 'bits', 'rice_k', &
                                              'pos_bytes']

    stat = PYKD_ERR_FORMAT
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    need = 0
    do k = 1, 5
      if (.not. read_count(buf, pos, need, limit, trim(FIELD(k)), f(k), msg)) return
    end do
    call codes_ok(f(2), f(3), .false., ok, msg)
    if (.not. ok) return
    if (f(1) > row(COL_N_IN) * row(COL_N_OUT)) then
      msg = 'nnz = '//str(f(1))//' exceeds n_in * n_out = '//str(row(COL_N_IN) * row(COL_N_OUT))
    else if (f(4) > 31) then
      msg = 'rice_k = '//str(f(4))//' (must be 0 .. 31)'
    else if (f(1) > 8 * f(5) / (f(4) + 1)) then
      ! Each position takes at least rice_k + 1 bits: this bounds nnz (and
      ! the arrays decoded from it) by the bytes present.
      msg = str(f(1))//' positions cannot fit in pos_bytes = '//str(f(5))//' with rice_k = '//str(f(4))
    else
      ok = take(need, f(2), 4, pos, limit, 'centroids', msg)
      if (ok) ok = take(need, f(5), 1, pos, limit, 'positions', msg)
      if (ok) ok = take(need, packed_bytes(f(1), int(f(3))), 1, pos, limit, 'codes', msg)
      if (ok) ok = take(need, row(COL_N_OUT), 4, pos, limit, 'b', msg)
      if (.not. ok) return
      row(COL_P1:) = 0
      row(COL_P1:COL_P3) = f(1:3)
      if (.not. scan_planes(buf, pos + 20 + 4 * f(2), f(5), int(f(4)), row, row(COL_P4), msg)) then
        stat = PYKD_ERR_ALLOC
        return
      end if
      call set_lengths(row)
      pos = pos + need
      stat = PYKD_OK
    end if
  end subroutine sc_scan

  !> The planes the file's pattern (Rice-coded positions at buf(p + 1), not
  !! yet checked) will have once loaded, or 0 if it keeps none (or the
  !! stream is bad: the loader then reports it). False when the scratch
  !! (bounded by the positions the stream can hold) cannot be allocated.
  logical function scan_planes(buf, p, pos_bytes, rice_k, row, n_planes, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: p, pos_bytes, row(N_FIELDS)
    integer, intent(in) :: rice_k
    integer(int64), intent(out) :: n_planes
    character(len=*), intent(inout) :: msg
    integer(int32), allocatable :: indptr(:), indices(:)
    integer(int64) :: nnz, n_in, n_out
    integer :: ierr
    logical :: good
    character(len=200) :: why

    n_planes = 0
    ok = .true.
    nnz = row(COL_P1); n_in = row(COL_N_IN); n_out = row(COL_N_OUT)
    if (nnz < PLANE_MIN_NNZ) return
    allocate (indptr(n_in + 1), indices(nnz), stat=ierr)
    ok = ierr == 0
    if (ok) then
      call rice_decode(buf, p, pos_bytes, rice_k, n_in, n_out, nnz, indptr, indices, good, why)
      if (.not. good) return
      n_planes = plane_count(int(n_in), int(n_out), nnz, indptr, indices)
      ok = n_planes >= 0
    end if
    if (.not. ok) then
      msg = 'cannot allocate '//str(4 * (n_in + 1 + nnz))//' bytes to count the planes'
      return
    end if
    if (.not. planes_kept(n_in, n_out, nnz, n_planes)) n_planes = 0
  end function scan_planes

  !> The slice lengths for nnz = p1, n_codes = p2 and p4 planes.
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
    np = row(COL_P4)
    f32_len = row(COL_P2) + PLANE_LANES * np + row(COL_N_OUT)
    i8_len = row(COL_P1)
    if (np > 0) i8_len = i8_len + plane_cells(row(COL_N_IN), row(COL_N_OUT)) + PLANE_LANES * np
    i32_len = row(COL_N_IN) + 1 + row(COL_P1)
  end subroutine lengths

  !> The planes' arguments of a row: offsets of b (ob), of the plane values
  !! (ov) and counts (o8) and the number of cells.
  pure subroutine plane_offsets(row, ob, ov, o8, cells)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer(int64), intent(out) :: ob, ov, o8, cells
    ov = row(COL_F32_OFF) + row(COL_P2)
    ob = ov + PLANE_LANES * row(COL_P4)
    o8 = row(COL_I8_OFF) + row(COL_P1)
    cells = plane_cells(row(COL_N_IN), row(COL_N_OUT))
  end subroutine plane_offsets

  !> Build the planes of a checked row (p4 > 0) into its slices.
  subroutine build_planes(row, f32, i8, i32, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: ob, ov, o8, cells, oi, np
    integer :: n_in

    stat = PYKD_OK
    np = row(COL_P4)
    if (np == 0) return
    call plane_offsets(row, ob, ov, o8, cells)
    oi = row(COL_I32_OFF); n_in = int(row(COL_N_IN))
    call planes_build(n_in, int(row(COL_N_OUT)), row(COL_P1), i32(oi + 1), i32(oi + n_in + 2), np, &
                      i8(o8 + 1:o8 + cells), i8(o8 + cells + 1), f32(ov + 1), stat, &
                      codes=i8(row(COL_I8_OFF) + 1), centroids=f32(row(COL_F32_OFF) + 1))
    if (stat /= 0) then
      stat = code
      msg = 'p4 = '//str(np)//' is not the number of planes of the pattern (or no memory to build them)'
    end if
  end subroutine build_planes

  !> p4 is 0 or the planes the pattern keeps, and the slices hold exactly
  !! the planes of the pattern and centroids(codes + 1).
  subroutine planes_ok(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: ob, ov, o8, cells, oi, np
    integer :: n_in

    stat = PYKD_OK
    np = row(COL_P4)
    if (np == 0) return
    call plane_offsets(row, ob, ov, o8, cells)
    oi = row(COL_I32_OFF); n_in = int(row(COL_N_IN))
    call planes_check(n_in, int(row(COL_N_OUT)), row(COL_P1), i32(oi + 1), i32(oi + n_in + 2), np, &
                      i8(o8 + 1:o8 + cells), i8(o8 + cells + 1), f32(ov + 1), stat, msg, &
                      codes=i8(row(COL_I8_OFF) + 1), centroids=f32(row(COL_F32_OFF) + 1))
    if (stat /= PYKD_OK) msg = 'p4: '//msg
  end subroutine planes_ok

  subroutine sc_load(version, buf, pos, row, f32, i8, i32, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(inout) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oi, nnz, nc, rice_k, pos_bytes
    logical :: ok

    stat = PYKD_ERR_FORMAT
    o = row(COL_F32_OFF); oi = row(COL_I32_OFF); nnz = row(COL_P1); nc = row(COL_P2)
    rice_k = get_uint(buf, pos + 12, 4); pos_bytes = get_uint(buf, pos + 16, 4)
    pos = pos + 20
    call get_f32(buf, pos, f32(o + 1), nc)
    pos = pos + 4 * nc
    call rice_decode(buf, pos, pos_bytes, int(rice_k), row(COL_N_IN), row(COL_N_OUT), nnz, &
                     i32(oi + 1), i32(oi + row(COL_N_IN) + 2), ok, msg)
    if (.not. ok) return
    pos = pos + pos_bytes
    call get_codes(buf, pos, nnz, int(row(COL_P3)), i8(row(COL_I8_OFF) + 1), ok, msg)
    if (.not. ok) return
    pos = pos + packed_bytes(nnz, int(row(COL_P3)))
    call get_f32(buf, pos, f32(o + nc + PLANE_LANES * row(COL_P4) + 1), row(COL_N_OUT))
    pos = pos + 4 * row(COL_N_OUT)
    call sc_values_ok(row, f32, i8, i32, PYKD_ERR_FORMAT, stat, msg)
    ! The planes are derived from the pattern and codes: built here, never read from the file.
    if (stat == PYKD_OK) call build_planes(row, f32, i8, i32, PYKD_ERR_FORMAT, stat, msg)
  end subroutine sc_load

  !> Decode nnz Rice-coded gaps from the nbytes at byte `start` into a CSR
  !! pattern. Every loop is bounded by the stream's length, and no position
  !! may reach n_in n_out, so a corrupt stream is rejected, never followed.
  subroutine rice_decode(buf, start, nbytes, k, n_in, n_out, nnz, indptr, indices, ok, msg)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: start, nbytes, n_in, n_out, nnz
    integer, intent(in) :: k
    integer(int32), intent(out) :: indptr(n_in + 1), indices(nnz)
    logical, intent(out) :: ok
    character(len=*), intent(inout) :: msg
    integer(int64) :: t, t_end, prev, q, room, p, e, r

    t = 8 * start; t_end = 8 * (start + nbytes)
    prev = -1; r = 0
    indptr(1) = 0
    ok = .false.
    do e = 1, nnz
      room = n_in * n_out - 2 - prev   ! the largest gap that stays inside W
      q = 0
      do
        if (t >= t_end) then
          msg = 'positions: the stream ends inside position '//str(e - 1)
          return
        end if
        t = t + 1
        if (.not. btest(buf((t - 1) / 8 + 1), int(mod(t - 1, 8_int64)))) exit
        q = q + 1
        if (room < 0 .or. q > ishft(room, -k)) then
          msg = 'positions: position '//str(e - 1)//' lies beyond n_in * n_out'
          return
        end if
      end do
      if (room < 0) then
        msg = 'positions: position '//str(e - 1)//' lies beyond n_in * n_out'
        return
      else if (t + k > t_end) then
        msg = 'positions: the stream ends inside position '//str(e - 1)
        return
      end if
      p = prev + 1 + ishft(q, k) + get_bits(buf, t, k)
      t = t + k
      if (p > n_in * n_out - 1) then
        msg = 'positions: position '//str(e - 1)//' lies beyond n_in * n_out'
        return
      end if
      do while (r < p / n_out)
        r = r + 1
        indptr(r + 1) = int(e - 1, int32)
      end do
      indices(e) = int(mod(p, n_out), int32)
      prev = p
    end do
    indptr(r + 2:) = int(nnz, int32)
    call stream_end_ok(buf, start, nbytes, t - 8 * start, 'positions', ok, msg)
  end subroutine rice_decode

  !> A stream of `used` bits fills exactly ceil(used / 8) = nbytes bytes and
  !! the unused high bits of its last byte are 0.
  subroutine stream_end_ok(buf, start, nbytes, used, what, ok, msg)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: start, nbytes, used
    character(len=*), intent(in) :: what
    logical, intent(out) :: ok
    character(len=*), intent(inout) :: msg

    ok = (used + 7) / 8 == nbytes
    if (.not. ok) then
      msg = what//': '//str(nbytes)//' bytes, but the stream uses '//str((used + 7) / 8)
      return
    end if
    if (mod(used, 8_int64) /= 0) then
      ok = ishft(iand(int(buf(start + nbytes), int64), 255_int64), -int(mod(used, 8_int64))) == 0
      if (.not. ok) msg = what//': the unused high bits of the last byte are not 0'
    end if
  end subroutine stream_end_ok

  !> nnz codes of `bits` bits at byte pos into codes(1:nnz), one per byte.
  subroutine get_codes(buf, pos, nnz, bits, codes, ok, msg)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos, nnz
    integer, intent(in) :: bits
    integer(int8), intent(out) :: codes(nnz)
    logical, intent(out) :: ok
    character(len=*), intent(inout) :: msg
    integer(int64) :: e, c

    do e = 1, nnz
      c = get_bits(buf, 8 * pos + (e - 1) * bits, bits)
      codes(e) = int(c - merge(256_int64, 0_int64, c > 127), int8)
    end do
    call stream_end_ok(buf, pos, packed_bytes(nnz, bits), nnz * bits, 'codes', ok, msg)
  end subroutine get_codes

  !> The rice_k giving the fewest bytes for the row's positions (ties: the
  !! smallest k) and the stream's length in bits (BIT_CAP or more: too long).
  subroutine rice_plan(row, i32, k_best, nbits)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: k_best
    integer(int64), intent(out) :: nbits
    integer(int64) :: sums(0:31), prev, g, oi, n_in, kk, e
    integer :: k, i

    oi = row(COL_I32_OFF); n_in = row(COL_N_IN)
    sums = 0
    prev = -1
    do i = 0, int(n_in) - 1
      do e = int(i32(oi + i + 1), int64) + 1, i32(oi + i + 2)
        g = i * row(COL_N_OUT) + i32(oi + n_in + 1 + e) - prev - 1
        prev = g + prev + 1
        do k = 0, 31
          sums(k) = min(sums(k) + ishft(g, -k), BIT_CAP)
        end do
      end do
    end do
    k_best = 0
    do k = 0, 31
      kk = k
      sums(k) = sums(k) + row(COL_P1) * (kk + 1)
      if ((sums(k) + 7) / 8 < (sums(k_best) + 7) / 8) k_best = k
    end do
    nbits = sums(k_best)
  end subroutine rice_plan

  integer(int64) function sc_bytes(row, f32, i8, i32)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int64) :: nbits
    integer :: k

    call rice_plan(row, i32, k, nbits)
    sc_bytes = 20 + 4 * row(COL_P2) + (nbits + 7) / 8 + packed_bytes(row(COL_P1), int(row(COL_P3))) &
               + 4 * row(COL_N_OUT)
  end function sc_bytes

  subroutine sc_write(row, f32, i8, i32, buf, pos)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64) :: nbits, nb, e, c
    integer :: k, bits

    call rice_plan(row, i32, k, nbits)
    nb = (nbits + 7) / 8
    bits = int(row(COL_P3))
    call put_u32(buf, pos, [row(COL_P1), row(COL_P2), row(COL_P3), int(k, int64), nb])
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + 1), row(COL_P2))
    call put_positions(row, i32, k, buf, pos, nb)
    pos = pos + nb
    nb = packed_bytes(row(COL_P1), bits)
    buf(pos + 1:pos + nb) = 0
    do e = 1, row(COL_P1)
      c = iand(int(i8(row(COL_I8_OFF) + e), int64), 255_int64)
      call put_bits(buf, 8 * pos + (e - 1) * bits, c, bits)
    end do
    pos = pos + nb
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + row(COL_P2) + PLANE_LANES * row(COL_P4) + 1), row(COL_N_OUT))
  end subroutine sc_write

  !> The Rice codes of the gaps, into the nb zeroed bytes at byte pos.
  subroutine put_positions(row, i32, k, buf, pos, nb)
    integer(int64), intent(in) :: row(N_FIELDS), pos, nb
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: k
    integer(int8), intent(inout) :: buf(:)
    integer(int64) :: prev, g, oi, n_in, t, e, q
    integer :: i

    oi = row(COL_I32_OFF); n_in = row(COL_N_IN)
    buf(pos + 1:pos + nb) = 0
    t = 8 * pos
    prev = -1
    do i = 0, int(n_in) - 1
      do e = int(i32(oi + i + 1), int64) + 1, i32(oi + i + 2)
        g = i * row(COL_N_OUT) + i32(oi + n_in + 1 + e) - prev - 1
        prev = g + prev + 1
        do q = 1, ishft(g, -k)
          call put_bits(buf, t, 1_int64, 1)
          t = t + 1
        end do
        t = t + 1   ! the terminating zero bit
        call put_bits(buf, t, g, k)
        t = t + k
      end do
    end do
  end subroutine put_positions

  subroutine sc_check(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: nbits
    integer :: k

    call sc_check_row(row, stat, msg)
    if (stat == PYKD_OK) call sc_values_ok(row, f32, i8, i32, PYKD_ERR_ARG, stat, msg)
    if (stat == PYKD_OK) call planes_ok(row, f32, i8, i32, stat, msg)
    if (stat /= PYKD_OK) return
    call rice_plan(row, i32, k, nbits)
    if ((nbits + 7) / 8 > MAX_POS_BYTES) then
      stat = PYKD_ERR_ARG
      msg = 'the positions stream would exceed 2**32 - 1 bytes'
    end if
  end subroutine sc_check

  pure subroutine sc_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: nnz, f32_len, i8_len, i32_len
    logical :: ok

    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (ok) call codes_ok(row(COL_P2), row(COL_P3), .false., ok, msg)
    if (.not. ok) return
    nnz = row(COL_P1)
    if (nnz < 0 .or. nnz > min(MAX_COUNT, row(COL_N_IN) * row(COL_N_OUT))) then
      msg = 'nnz = p1 = '//str(nnz)//' outside 0 .. min(2**31 - 1, n_in * n_out)'
      return
    end if
    if (row(COL_P4) < 0 .or. 2 * row(COL_P4) > nnz .or. (row(COL_P4) > 0 .and. nnz < PLANE_MIN_NNZ)) then
      msg = 'planes = p4 = '//str(row(COL_P4))//' outside 0 .. nnz / 2'
      return
    end if
    call lengths(row, f32_len, i8_len, i32_len)
    call row_expect(row, f32_len, i8_len, i32_len, [nnz, row(COL_P2), row(COL_P3), row(COL_P4)], ok, msg)
    if (ok) stat = PYKD_OK
  end subroutine sc_check_row

  !> The CSR pattern, codes < n_codes, centroids and b finite; else `code`.
  subroutine sc_values_ok(row, f32, i8, i32, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oi, oq, nnz, nc
    integer :: n_in

    o = row(COL_F32_OFF); oi = row(COL_I32_OFF); oq = row(COL_I8_OFF)
    nnz = row(COL_P1); nc = row(COL_P2); n_in = int(row(COL_N_IN))
    stat = code
    if (.not. csr_ok(n_in, int(row(COL_N_OUT)), nnz, i32(oi + 1), i32(oi + n_in + 2))) then
      msg = 'bad CSR pattern: indptr must start at 0, not decrease and end at nnz = '//str(nnz)// &
            '; indices must be < n_out = '//str(row(COL_N_OUT))//' and increase within a row'
    else if (any(iand(int(i8(oq + 1:oq + nnz), int64), 255_int64) >= nc)) then
      msg = 'codes: a code is >= n_codes = '//str(nc)
    else if (nonfinite_count(nc, f32(o + 1)) > 0) then
      msg = 'centroids contain NaN or infinite values'
    else if (nonfinite_count(row(COL_N_OUT), f32(o + nc + PLANE_LANES * row(COL_P4) + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
    else
      stat = PYKD_OK
    end if
  end subroutine sc_values_ok

  !> The planes' values start after the n_codes centroids: the loader aligns them.
  pure integer(int64) function planes_lead(row)
    integer(int64), intent(in) :: row(N_FIELDS)
    planes_lead = row(COL_P2)
  end function planes_lead

end module pykd_layer_sparse_codebook
