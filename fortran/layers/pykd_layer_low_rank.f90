!> Kind 4, `low_rank`: W = U V, run as two thin products.
!!
!! Slices (docs/model.md): f32 = [U (n_in, r) = u(r, n_in), V (r, n_out) =
!! v(n_out, r), b (n_out)]; p1 = r.
!! Payload v2: rank u32, U f32[n_in r], V f32[r n_out], b f32[n_out].
module pykd_layer_low_rank
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_LEN, COL_I32_LEN, COL_P1
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT
  use pykd_layer, only: pykd_layer_t
  use pykd_codes, only: ACT_IDENTITY, ACT_RELU
  use pykd_activation, only: apply_activation
  use pykd_layer_dense, only: one_sample_product, batch_product, batch_product_words
  use pykd_bytes, only: get_f32, put_u32, put_f32, str
  use pykd_layer_util, only: MAX_COUNT, take, read_count, sizes_ok, row_expect, nonfinite_count
  implicit none
  private
  public :: low_rank_layer_t

  type, extends(pykd_layer_t) :: low_rank_layer_t
  contains
    procedure, nopass :: name => lr_name
    procedure, nopass :: forward => lr_forward
    procedure, nopass :: workspace_words => lr_workspace
    procedure, nopass :: scan_record => lr_scan
    procedure, nopass :: load_record => lr_load
    procedure, nopass :: record_bytes => lr_bytes
    procedure, nopass :: write_record => lr_write
    procedure, nopass :: check => lr_check
    procedure, nopass :: check_row => lr_check_row
  end type low_rank_layer_t

contains

  pure function lr_name() result(s)
    character(len=:), allocatable :: s
    s = 'low_rank'
  end function lr_name

  !> t = u x (r, n) in work, then y = act(v t + b). From 2 samples both
  !! products are pykd_f32_gemm's (dense's batch bits: no BLAS, the same
  !! bits for any batch, slice or thread count). t gets a zero bias: an FMA
  !! chain from +0 is never -0, so adding +0 changes no bit.
  subroutine lr_forward(row, f32, i8, i32, n, x, y, work, stat)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(row(COL_N_IN), n)
    real(real32), intent(out) :: y(row(COL_N_OUT), n)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat
    integer(int64) :: o, nu, nv, nt
    integer :: n_in, n_out, r, act

    n_in = int(row(COL_N_IN)); n_out = int(row(COL_N_OUT)); r = int(row(COL_P1))
    o = row(COL_F32_OFF); nu = row(COL_N_IN) * r; nv = row(COL_N_OUT) * r
    act = int(row(COL_ACT))
    stat = PYKD_OK
    if (n == 1) then   ! on this thread, no BLAS or OpenMP wake-up (as dense)
      call one_sample_product(r, n_in, f32(o + 1), x, work)
      call one_sample_product(n_out, r, f32(o + nu + 1), work, y, f32(o + nu + nv + 1), act)
      return
    end if
    ! work: t (r, n), r zeros, the product's panel
    nt = int(r, int64) * n
    work(nt + 1:nt + r) = 0
    call batch_product(r, n_in, n, f32(o + 1), x, work(nt + 1), ACT_IDENTITY, work, &
                       work(nt + r + 1))
    call batch_product(n_out, r, n, f32(o + nu + 1), work, f32(o + nu + nv + 1), act, y, &
                       work(nt + r + 1))
    if (act /= ACT_IDENTITY .and. act /= ACT_RELU) call apply_activation(act, n_out, n, y)
  end subroutine lr_forward

  pure integer(int64) function lr_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    integer(int64) :: r
    r = max(row(COL_P1), 0_int64)
    lr_workspace = r * n
    if (n >= 2) lr_workspace = lr_workspace + r + &
      batch_product_words(int(max(row(COL_N_IN), r)))
  end function lr_workspace

  subroutine lr_scan(version, buf, pos, limit, row, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: limit
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: need, r
    logical :: ok

    stat = PYKD_ERR_FORMAT
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    need = 0
    if (.not. read_count(buf, pos, need, limit, 'rank', r, msg)) return
    if (r < 1) then
      msg = 'rank = 0 (must be >= 1)'
      return
    end if
    if (.not. take(need, row(COL_N_IN) * r, 4, pos, limit, 'U', msg)) return
    if (.not. take(need, r * row(COL_N_OUT), 4, pos, limit, 'V', msg)) return
    if (.not. take(need, row(COL_N_OUT), 4, pos, limit, 'b', msg)) return
    row(COL_F32_LEN) = (need - 4) / 4
    row(COL_I8_LEN) = 0
    row(COL_I32_LEN) = 0
    row(COL_P1:) = 0
    row(COL_P1) = r
    pos = pos + need
    stat = PYKD_OK
  end subroutine lr_scan

  subroutine lr_load(version, buf, pos, row, f32, i8, i32, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(inout) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg

    call get_f32(buf, pos + 4, f32(row(COL_F32_OFF) + 1), row(COL_F32_LEN))
    pos = pos + 4 + 4 * row(COL_F32_LEN)
    call lr_values_ok(row, f32, PYKD_ERR_FORMAT, stat, msg)
  end subroutine lr_load

  integer(int64) function lr_bytes(row, f32, i8, i32)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    lr_bytes = 4 + 4 * (row(COL_P1) * (row(COL_N_IN) + row(COL_N_OUT)) + row(COL_N_OUT))
  end function lr_bytes

  subroutine lr_write(row, f32, i8, i32, buf, pos)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    call put_u32(buf, pos, [row(COL_P1)])
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + 1), &
                 row(COL_P1) * (row(COL_N_IN) + row(COL_N_OUT)) + row(COL_N_OUT))
  end subroutine lr_write

  subroutine lr_check(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    call lr_check_row(row, stat, msg)
    if (stat == PYKD_OK) call lr_values_ok(row, f32, PYKD_ERR_ARG, stat, msg)
  end subroutine lr_check

  pure subroutine lr_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: r
    logical :: ok

    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    r = row(COL_P1)
    if (r < 1 .or. r > MAX_COUNT) then
      msg = 'rank = p1 = '//str(r)//' outside 1 .. 2**31 - 1'
      return
    end if
    call row_expect(row, r * row(COL_N_IN) + r * row(COL_N_OUT) + row(COL_N_OUT), 0_int64, 0_int64, &
                    [r, 0_int64, 0_int64, 0_int64], ok, msg)
    if (ok) stat = PYKD_OK
  end subroutine lr_check_row

  !> U, V and b finite; else `code`.
  subroutine lr_values_ok(row, f32, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, nu, nv

    o = row(COL_F32_OFF); nu = row(COL_N_IN) * row(COL_P1); nv = row(COL_N_OUT) * row(COL_P1)
    stat = code
    if (nonfinite_count(nu, f32(o + 1)) > 0) then
      msg = 'U contains NaN or infinite values'
    else if (nonfinite_count(nv, f32(o + nu + 1)) > 0) then
      msg = 'V contains NaN or infinite values'
    else if (nonfinite_count(row(COL_N_OUT), f32(o + nu + nv + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
    else
      stat = PYKD_OK
    end if
  end subroutine lr_values_ok

end module pykd_layer_low_rank
