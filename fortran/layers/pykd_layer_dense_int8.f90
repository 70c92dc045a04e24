!> Kind 2, `dense_int8`: int8 weights with one scale per output, int8
!! activations (dynamic: one scale per sample; static: the stored x_scale),
!! exact int32 sums, y = act(float(sum) * (scale * sx) + b).
!!
!! Slices (docs/model.md): f32 = [scale (n_out), b (n_out), x_scale (1)],
!! i8 = q (n_in, n_out) C order = q(n_out, n_in); p1 = quant mode.
!! Payload v2: quant u32, q i8[n_in n_out], scale f32[n_out], x_scale
!! f32[quant], b f32[n_out]. v1: q, scale, b (dynamic).
module pykd_layer_dense_int8
  use iso_fortran_env, only: int8, int16, int32, int64, real32
  use iso_c_binding, only: c_loc, c_f_pointer
  use ieee_arithmetic, only: ieee_value, ieee_quiet_nan
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_OFF, COL_I8_LEN, COL_I32_LEN, COL_P1, QUANT_DYNAMIC, QUANT_STATIC, &
                        ACT_IDENTITY, ACT_RELU
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT, PYKD_ERR_NONFINITE
  use pykd_layer, only: pykd_layer_t
  use pykd_activation, only: apply_activation
  use pykd_quant, only: quantize_columns16, MAX_IN
  use pykd_int8_kernel, only: int8_dense_product
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

  !> work = [sx f32 (n) | x16 int16 (ldx, n)], ldx = n_in rounded up to even.
  pure integer(int64) function int8_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    int8_workspace = n + (ldx_of(row(COL_N_IN)) * n + 1) / 2
  end function int8_workspace

  !> Rows of the int16 batch: even, so the product reads inputs in pairs.
  pure integer(int64) function ldx_of(n_in)
    integer(int64), intent(in) :: n_in
    ldx_of = n_in + mod(n_in, 2_int64)
  end function ldx_of

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
    integer(int16), pointer, contiguous :: x16(:, :)
    integer(int64) :: off, n_out, ldx

    n_out = row(COL_N_OUT); off = row(COL_F32_OFF); ldx = ldx_of(row(COL_N_IN))
    call c_f_pointer(c_loc(work(n + 1)), x16, [ldx, int(n, int64)])
    call int8_run(int(row(COL_N_IN)), int(n_out), n, int(ldx), int(row(COL_P1)), &
                  i8(row(COL_I8_OFF) + 1), f32(off + 1), f32(off + n_out + 1), &
                  f32(off + 2 * n_out + 1), int(row(COL_ACT)), x, x16, work, y, stat)
    ! relu is fused into the product's rescale; identity needs nothing.
    if (stat == PYKD_OK .and. row(COL_ACT) /= ACT_RELU .and. row(COL_ACT) /= ACT_IDENTITY) &
      call apply_activation(int(row(COL_ACT)), int(n_out), n, y)
  end subroutine int8_forward

  !> Quantize x (to int16), the exact int32 product, the rescale and bias.
  !! On a non-finite input y is NaN and stat PYKD_ERR_NONFINITE (PYKD_ERR_ARG
  !! for a static x_scale that is not finite and > 0).
  subroutine int8_run(n_in, n_out, n, ldx, mode, q, scale, b, x_scale, act, x, x16, sx, y, stat)
    integer, intent(in) :: n_in, n_out, n, ldx, mode, act
    integer(int8), intent(in) :: q(n_out, n_in)
    real(real32), intent(in) :: scale(n_out), b(n_out), x_scale, x(n_in, n)
    integer(int16), intent(out) :: x16(ldx, n)
    real(real32), intent(out) :: sx(n), y(n_out, n)
    integer, intent(out) :: stat

    if (mode == QUANT_STATIC .and. .not. x_scale > 0) then
      stat = PYKD_ERR_ARG
    else
      call quantize_columns16(n_in, ldx, n, x, merge(x_scale, 0.0_real32, mode == QUANT_STATIC), &
                              x16, sx, stat)
    end if
    if (stat /= PYKD_OK) then
      y = ieee_value(1.0_real32, ieee_quiet_nan)
      return
    end if
    call int8_dense_product(n_in, n_out, n, ldx, q, x16, scale, sx, b, act, y)
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
    row(COL_I32_LEN) = 0
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
  end subroutine int8_check

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
    call row_expect(row, 2 * row(COL_N_OUT) + 1, row(COL_N_IN) * row(COL_N_OUT), 0_int64, &
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
    else if (row(COL_P1) == QUANT_STATIC .and. .not. (xs > 0 .and. xs <= huge(xs))) then
      msg = 'x_scale = '//trim(real_str(xs))//' (static quantization needs a finite x_scale > 0)'
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
