!> Kind 2, `dense_int8`: int8 weights with one scale per output, int8
!! activations (dynamic: one scale per sample; static: the stored x_scale),
!! exact int32 sums, y = act(float(sum) * (scale * sx) + b).
!!
!! Slices (docs/model.md): f32 = [scale (n_out), b (n_out), x_scale (1)],
!! i8 = q (n_in, n_out) C order = q(n_out, n_in); i32 = the kernel's packed
!! copy of q (int8_pack; derived, never saved, rebuilt at load and checked
!! by check); p1 = quant mode.
!! Payload v2: quant u32, q i8[n_in n_out], scale f32[n_out], x_scale
!! f32[quant], b f32[n_out]. v1: q, scale, b (dynamic).
module pykd_layer_dense_int8
  use iso_fortran_env, only: int8, int32, int64, real32
  use iso_c_binding, only: c_loc, c_f_pointer
  use ieee_arithmetic, only: ieee_value, ieee_quiet_nan
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_OFF, COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1, QUANT_DYNAMIC, QUANT_STATIC, &
                        ACT_IDENTITY, ACT_RELU
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC
  use pykd_layer, only: pykd_layer_t
  use pykd_activation, only: apply_activation
  use pykd_quant, only: MAX_IN
  use pykd_int8_kernel, only: int8_dense_forward, int8_pack, int8_packed_words, int8_ldu
  use pykd_bytes, only: get_u32, get_f32, put_u32, put_f32, put_bytes, str
  use pykd_layer_util, only: take, read_count, sizes_ok, row_expect, nonfinite_count, negative_count
  implicit none
  private
  public :: dense_int8_layer_t

  type, extends(pykd_layer_t) :: dense_int8_layer_t
  contains
    procedure, nopass :: name => int8_name
    procedure, nopass :: forward => int8_forward
    procedure, nopass :: workspace_words => int8_workspace
    procedure, nopass :: scan_record => int8_scan
    procedure, nopass :: load_record => int8_load
    procedure, nopass :: record_bytes => int8_bytes
    procedure, nopass :: write_record => int8_write
    procedure, nopass :: check => int8_check
    procedure, nopass :: check_row => int8_check_row
  end type dense_int8_layer_t

contains

  pure function int8_name() result(s)
    character(len=:), allocatable :: s
    s = 'dense_int8'
  end function int8_name

  !> work = [sx f32 (n) | u bytes (ldu, n)], u = the quantized batch + 128,
  !! ldu = n_in rounded up to 4 (int8_ldu).
  pure integer(int64) function int8_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    int8_workspace = n + (int8_ldu(row(COL_N_IN)) * n + 3) / 4
  end function int8_workspace

  subroutine int8_forward(row, f32, i8, i32, n, x, y, work, stat)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(row(COL_N_IN), n)
    real(real32), intent(out) :: y(row(COL_N_OUT), n)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat
    integer(int8), pointer, contiguous :: u(:)
    integer(int64) :: off, n_out

    n_out = row(COL_N_OUT); off = row(COL_F32_OFF)
    call c_f_pointer(c_loc(work(n + 1)), u, [int8_ldu(row(COL_N_IN)) * n])
    call int8_run(int(row(COL_N_IN)), int(n_out), n, int(row(COL_P1)), i32(row(COL_I32_OFF) + 1), &
                  f32(off + 1), f32(off + n_out + 1), f32(off + 2 * n_out + 1), int(row(COL_ACT)), &
                  x, u, work, y, stat)
    ! relu is fused into the product's rescale; identity needs nothing.
    if (stat == PYKD_OK .and. row(COL_ACT) /= ACT_RELU .and. row(COL_ACT) /= ACT_IDENTITY) &
      call apply_activation(int(row(COL_ACT)), int(n_out), n, y)
  end subroutine int8_forward

  !> The fused kernel: quantize x, the exact int32 product on the packed
  !! weights, the rescale, bias and relu. On a non-finite input y is NaN and
  !! stat PYKD_ERR_NONFINITE (PYKD_ERR_ARG for a static x_scale that is not
  !! finite and > 0).
  subroutine int8_run(n_in, n_out, n, mode, packed, scale, b, x_scale, act, x, u, sx, y, stat)
    integer, intent(in) :: n_in, n_out, n, mode, act
    integer(int32), intent(in) :: packed(*)
    real(real32), intent(in) :: scale(n_out), b(n_out), x_scale, x(n_in, n)
    integer(int8), intent(inout) :: u(*)
    real(real32), intent(inout) :: sx(n), y(n_out, n)
    integer, intent(out) :: stat
    integer :: n_bad

    stat = PYKD_OK
    if (mode == QUANT_STATIC .and. .not. (x_scale >= tiny(x_scale) .and. x_scale <= huge(x_scale))) then
      stat = PYKD_ERR_ARG
    else
      call int8_dense_forward(n_in, n_out, n, packed, x, merge(x_scale, 0.0_real32, mode == QUANT_STATIC), &
                        scale, b, act, u, sx, y, n_bad)
      if (n_bad > 0) stat = PYKD_ERR_NONFINITE
    end if
    if (stat /= PYKD_OK) y = ieee_value(1.0_real32, ieee_quiet_nan)
  end subroutine int8_run

  subroutine int8_scan(version, buf, pos, limit, row, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: limit
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: need, quant, nw, n_out
    logical :: ok

    stat = PYKD_ERR_FORMAT
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    if (row(COL_N_IN) > MAX_IN) then
      msg = 'n_in = '//str(row(COL_N_IN))//' exceeds '//str(int(MAX_IN, int64))// &
            ', the most an int8 layer takes (its int32 sums could overflow)'
      return
    end if
    need = 0
    quant = QUANT_DYNAMIC
    if (version >= 2) then
      if (.not. read_count(buf, pos, need, limit, 'quant', quant, msg)) return
      if (quant /= QUANT_DYNAMIC .and. quant /= QUANT_STATIC) then
        msg = 'unknown quant mode '//str(quant)//' (0 dynamic, 1 static)'
        return
      end if
    end if
    nw = row(COL_N_IN) * row(COL_N_OUT); n_out = row(COL_N_OUT)
    if (.not. take(need, nw, 1, pos, limit, 'q', msg)) return
    if (.not. take(need, 2 * n_out + quant, 4, pos, limit, 'scale, x_scale and b', msg)) return
    row(COL_F32_LEN) = 2 * n_out + 1
    row(COL_I8_LEN) = nw
    row(COL_I32_LEN) = int8_packed_words(row(COL_N_IN), n_out)
    row(COL_P1:) = 0
    row(COL_P1) = quant
    pos = pos + need
    stat = PYKD_OK
  end subroutine int8_scan

  subroutine int8_load(version, buf, pos, row, f32, i8, i32, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(inout) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: off, oq, nw, n_out

    off = row(COL_F32_OFF); oq = row(COL_I8_OFF)
    nw = row(COL_I8_LEN); n_out = row(COL_N_OUT)
    if (version >= 2) pos = pos + 4
    i8(oq + 1:oq + nw) = buf(pos + 1:pos + nw)
    pos = pos + nw
    call get_f32(buf, pos, f32(off + 1), n_out)
    pos = pos + 4 * n_out
    f32(off + 2 * n_out + 1) = 0
    if (row(COL_P1) == QUANT_STATIC) then
      call get_f32(buf, pos, f32(off + 2 * n_out + 1), 1_int64)
      pos = pos + 4
    end if
    call get_f32(buf, pos, f32(off + n_out + 1), n_out)
    pos = pos + 4 * n_out
    call int8_values_ok(row, f32, i8, PYKD_ERR_FORMAT, stat, msg)
    ! The packed copy is derived from q: built here, never read from the file.
    if (stat == PYKD_OK) call int8_pack(int(row(COL_N_IN)), int(n_out), i8(oq + 1), &
                                        i32(row(COL_I32_OFF) + 1))
  end subroutine int8_load

  integer(int64) function int8_bytes(row, f32, i8, i32)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    int8_bytes = 4 + row(COL_N_IN) * row(COL_N_OUT) + 8 * row(COL_N_OUT) + 4 * row(COL_P1)
  end function int8_bytes

  subroutine int8_write(row, f32, i8, i32, buf, pos)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64) :: off, oq, n_out

    off = row(COL_F32_OFF); oq = row(COL_I8_OFF); n_out = row(COL_N_OUT)
    call put_u32(buf, pos, [row(COL_P1)])
    call put_bytes(buf, pos, i8(oq + 1:oq + row(COL_N_IN) * n_out))
    call put_f32(buf, pos, f32(off + 1), n_out)
    if (row(COL_P1) == QUANT_STATIC) call put_f32(buf, pos, f32(off + 2 * n_out + 1), 1_int64)
    call put_f32(buf, pos, f32(off + n_out + 1), n_out)
  end subroutine int8_write

  subroutine int8_check(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    call int8_check_row(row, stat, msg)
    if (stat == PYKD_OK) call int8_values_ok(row, f32, i8, PYKD_ERR_ARG, stat, msg)
    if (stat == PYKD_OK) call packed_ok(row, i8, i32, stat, msg)
  end subroutine int8_check

  !> The i32 slice is the packed copy of q (a stale copy would give wrong
  !! results silently). Its size is the row's, checked by check_row.
  subroutine packed_ok(row, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int32), allocatable :: want(:)
    integer(int64) :: o32, nw
    integer :: ierr

    o32 = row(COL_I32_OFF); nw = row(COL_I32_LEN)
    allocate (want(nw), stat=ierr)
    if (ierr /= 0) then
      stat = PYKD_ERR_ALLOC
      msg = 'cannot allocate '//str(4 * nw)//' bytes to check the packed weights'
      return
    end if
    call int8_pack(int(row(COL_N_IN)), int(row(COL_N_OUT)), i8(row(COL_I8_OFF) + 1), want)
    stat = PYKD_OK
    if (any(i32(o32 + 1:o32 + nw) /= want)) then
      stat = PYKD_ERR_ARG
      msg = 'the i32 slice is not the packed copy of q (repack after changing q)'
    end if
  end subroutine packed_ok

  pure subroutine int8_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    logical :: ok

    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    if (row(COL_N_IN) > MAX_IN) then
      msg = 'n_in = '//str(row(COL_N_IN))//' exceeds '//str(int(MAX_IN, int64))// &
            ', the most an int8 layer takes'
      return
    end if
    if (row(COL_P1) /= QUANT_DYNAMIC .and. row(COL_P1) /= QUANT_STATIC) then
      msg = 'unknown quant mode p1 = '//str(row(COL_P1))
      return
    end if
    call row_expect(row, 2 * row(COL_N_OUT) + 1, row(COL_N_IN) * row(COL_N_OUT), &
                    int8_packed_words(row(COL_N_IN), row(COL_N_OUT)), &
                    [row(COL_P1), 0_int64, 0_int64, 0_int64], ok, msg)
    if (ok) stat = PYKD_OK
  end subroutine int8_check_row

  !> q in [-127, 127], scale finite >= 0, x_scale finite > 0 (static) or 0
  !! (dynamic), b finite; else `code` with a message.
  subroutine int8_values_ok(row, f32, i8, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: off, oq, n_out
    real(real32) :: xs

    off = row(COL_F32_OFF); oq = row(COL_I8_OFF); n_out = row(COL_N_OUT)
    xs = f32(off + 2 * n_out + 1)
    stat = code
    if (any(i8(oq + 1:oq + row(COL_I8_LEN)) == -huge(0_int8) - 1_int8)) then
      msg = 'q contains -128 (int8 weights are in [-127, 127])'
    else if (nonfinite_count(n_out, f32(off + 1)) > 0) then
      msg = 'scale contains NaN or infinite values'
    else if (negative_count(n_out, f32(off + 1)) > 0) then
      msg = 'scale contains negative values'
    else if (row(COL_P1) == QUANT_STATIC .and. .not. (xs >= tiny(xs) .and. xs <= huge(xs))) then
      ! A subnormal x_scale has an infinite reciprocal (zero inputs -> NaN).
      msg = 'x_scale = '//trim(real_str(xs))//' (static quantization needs a finite x_scale '// &
            'of at least the smallest normal float32)'
    else if (row(COL_P1) == QUANT_DYNAMIC .and. xs /= 0) then
      msg = 'x_scale must be 0 for dynamic quantization'
    else if (nonfinite_count(n_out, f32(off + n_out + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
    else
      stat = PYKD_OK
    end if
  end subroutine int8_values_ok

  pure function real_str(v) result(s)
    real(real32), intent(in) :: v
    character(len=24) :: s
    write (s, '(g0)') v
  end function real_str

end module pykd_layer_dense_int8
