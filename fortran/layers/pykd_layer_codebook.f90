!> Kind 5, `codebook`: W[i, j] = centroids[index(i n_out + j)], the indices
!! packed `bits` (1, 2, 4 or 8) to a weight, LSB first.
!!
!! Slices (docs/model.md): f32 = [centroids (n_codes), b (n_out)], i8 =
!! packed (the file's bytes); p1 = n_codes, p2 = bits.
!! Payload v2: n_codes u32, bits u32, centroids f32[n_codes],
!! packed u8[ceil(n_in n_out bits / 8)], b f32[n_out].
!!
!! The forward runs pykd_codebook_kernel: it decodes the packed indices in
!! registers (small batches) or a panel at a time into an L1 buffer (larger
!! ones) and sums each output in input order with one fused multiply-add
!! per weight, so the bits depend neither on the batch, nor on the thread
!! count, nor on the CPU path (docs/performance.md, "Codebook layers"). The
!! whole float matrix is never built.
module pykd_layer_codebook
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_OFF, COL_I8_LEN, COL_I32_LEN, COL_P1, COL_P2, ACT_IDENTITY, ACT_RELU
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT
  use pykd_layer, only: pykd_layer_t
  use pykd_activation, only: apply_activation
  use pykd_codebook_kernel, only: codebook_product, codebook_workspace_words
  use pykd_bytes, only: get_f32, put_u32, put_f32, put_bytes, str
  use pykd_layer_util, only: take, read_count, sizes_ok, row_expect, nonfinite_count, fewest_bits, &
                             packed_bytes, nan_fill
  implicit none
  private
  public :: codebook_layer_t, codes_ok

  type, extends(pykd_layer_t) :: codebook_layer_t
  contains
    procedure, nopass :: name => cb_name
    procedure, nopass :: forward => cb_forward
    procedure, nopass :: workspace_words => cb_workspace
    procedure, nopass :: scan_record => cb_scan
    procedure, nopass :: load_record => cb_load
    procedure, nopass :: record_bytes => cb_bytes
    procedure, nopass :: write_record => cb_write
    procedure, nopass :: check => cb_check
    procedure, nopass :: check_row => cb_check_row
  end type codebook_layer_t

contains

  pure function cb_name() result(s)
    character(len=:), allocatable :: s
    s = 'codebook'
  end function cb_name

  !> Larger batches pack panels of x into the workspace.
  pure integer(int64) function cb_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    cb_workspace = codebook_workspace_words(n)
  end function cb_workspace

  !> y = act(w x + b). The kernel adds b and applies relu itself; other
  !! activations follow in one pass. An index >= n_codes reads a NaN table
  !! entry in the kernel, so the indices are checked (a full scan) only when
  !! an output came out NaN and the codes do not fill 2**bits.
  subroutine cb_forward(row, f32, i8, i32, n, x, y, work, stat)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(row(COL_N_IN), n)
    real(real32), intent(out) :: y(row(COL_N_OUT), n)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat
    integer(int64) :: o, n_codes, nw
    integer :: act, bits
    logical :: any_nan

    o = row(COL_F32_OFF); n_codes = row(COL_P1); bits = int(row(COL_P2)); act = int(row(COL_ACT))
    call codebook_product(bits, int(n_codes), int(row(COL_N_IN)), int(row(COL_N_OUT)), n, &
                          i8(row(COL_I8_OFF) + 1), row(COL_I8_LEN), f32(o + 1), f32(o + n_codes + 1), &
                          act == ACT_RELU, x, y, work, any_nan)
    stat = PYKD_OK
    nw = row(COL_N_IN) * row(COL_N_OUT)
    if (any_nan .and. n_codes < 2_int64**bits) then
      if (bad_index(bits, n_codes, i8(row(COL_I8_OFF) + 1), nw)) then
        stat = PYKD_ERR_ARG
        call nan_fill(row(COL_N_OUT) * n, y)
        return
      end if
    end if
    if (act /= ACT_IDENTITY .and. act /= ACT_RELU) &
      call apply_activation(act, int(row(COL_N_OUT)), n, y)
  end subroutine cb_forward

  !> Some index of the first nw in the packed stream is >= n_codes. With
  !! bits in {1, 2, 4, 8} no index straddles a byte.
  pure logical function bad_index(bits, n_codes, packed, nw)
    integer, intent(in) :: bits
    integer(int64), intent(in) :: n_codes, nw
    integer(int8), intent(in) :: packed(*)
    integer(int64) :: k, f, byte, mask, per

    mask = 2_int64**bits - 1; per = 8 / bits
    bad_index = .false.
    do k = 0, nw - 1, per
      byte = iand(int(packed(k / per + 1), int64), 255_int64)
      do f = 0, min(per, nw - k) - 1
        if (iand(ishft(byte, -int(f * bits)), mask) >= n_codes) then
          bad_index = .true.
          return
        end if
      end do
    end do
  end function bad_index

  subroutine cb_scan(version, buf, pos, limit, row, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: limit
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: need, n_codes, bits, nb
    logical :: ok

    stat = PYKD_ERR_FORMAT
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    need = 0
    if (.not. read_count(buf, pos, need, limit, 'n_codes', n_codes, msg)) return
    if (.not. read_count(buf, pos, need, limit, 'bits', bits, msg)) return
    call codes_ok(n_codes, bits, .true., ok, msg)
    if (.not. ok) return
    nb = packed_bytes(row(COL_N_IN) * row(COL_N_OUT), int(bits))
    if (.not. take(need, n_codes, 4, pos, limit, 'centroids', msg)) return
    if (.not. take(need, nb, 1, pos, limit, 'packed indices', msg)) return
    if (.not. take(need, row(COL_N_OUT), 4, pos, limit, 'b', msg)) return
    row(COL_F32_LEN) = n_codes + row(COL_N_OUT)
    row(COL_I8_LEN) = nb
    row(COL_I32_LEN) = 0
    row(COL_P1:) = 0
    row(COL_P1) = n_codes
    row(COL_P2) = bits
    pos = pos + need
    stat = PYKD_OK
  end subroutine cb_scan

  !> 1 <= n_codes <= 256 and bits the fewest (of 1, 2, 4, 8 if pow2, else
  !! of 1..8) with 2**bits >= n_codes. (Shared with sparse_codebook.)
  pure subroutine codes_ok(n_codes, bits, pow2, ok, msg)
    integer(int64), intent(in) :: n_codes, bits
    logical, intent(in) :: pow2
    logical, intent(out) :: ok
    character(len=*), intent(inout) :: msg
    ok = n_codes >= 1 .and. n_codes <= 256
    if (.not. ok) then
      msg = 'n_codes = '//str(n_codes)//' outside 1 .. 256'
      return
    end if
    ok = bits == fewest_bits(n_codes, pow2)
    if (.not. ok) msg = 'bits = '//str(bits)//' for '//str(n_codes)//' codes (must be '// &
                        str(int(fewest_bits(n_codes, pow2), int64))//')'
  end subroutine codes_ok

  subroutine cb_load(version, buf, pos, row, f32, i8, i32, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(inout) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oq, nc, nb

    o = row(COL_F32_OFF); oq = row(COL_I8_OFF); nc = row(COL_P1); nb = row(COL_I8_LEN)
    pos = pos + 8
    call get_f32(buf, pos, f32(o + 1), nc)
    pos = pos + 4 * nc
    i8(oq + 1:oq + nb) = buf(pos + 1:pos + nb)
    pos = pos + nb
    call get_f32(buf, pos, f32(o + nc + 1), row(COL_N_OUT))
    pos = pos + 4 * row(COL_N_OUT)
    call cb_values_ok(row, f32, i8, PYKD_ERR_FORMAT, stat, msg)
  end subroutine cb_load

  integer(int64) function cb_bytes(row, f32, i8, i32)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    cb_bytes = 8 + 4 * row(COL_P1) + packed_bytes(row(COL_N_IN) * row(COL_N_OUT), int(row(COL_P2))) &
               + 4 * row(COL_N_OUT)
  end function cb_bytes

  subroutine cb_write(row, f32, i8, i32, buf, pos)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64) :: o, oq

    o = row(COL_F32_OFF); oq = row(COL_I8_OFF)
    call put_u32(buf, pos, [row(COL_P1), row(COL_P2)])
    call put_f32(buf, pos, f32(o + 1), row(COL_P1))
    call put_bytes(buf, pos, i8(oq + 1:oq + row(COL_I8_LEN)))
    call put_f32(buf, pos, f32(o + row(COL_P1) + 1), row(COL_N_OUT))
  end subroutine cb_write

  subroutine cb_check(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    call cb_check_row(row, stat, msg)
    if (stat == PYKD_OK) call cb_values_ok(row, f32, i8, PYKD_ERR_ARG, stat, msg)
  end subroutine cb_check

  pure subroutine cb_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    logical :: ok

    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (ok) call codes_ok(row(COL_P1), row(COL_P2), .true., ok, msg)
    if (.not. ok) return
    call row_expect(row, row(COL_P1) + row(COL_N_OUT), &
                    packed_bytes(row(COL_N_IN) * row(COL_N_OUT), int(row(COL_P2))), 0_int64, &
                    [row(COL_P1), row(COL_P2), 0_int64, 0_int64], ok, msg)
    if (ok) stat = PYKD_OK
  end subroutine cb_check_row

  !> Centroids and b finite, every index < n_codes, the unused high bits
  !! of the last byte zero; else `code`.
  subroutine cb_values_ok(row, f32, i8, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: o, oq, nc, nw, used
    integer :: bits

    o = row(COL_F32_OFF); oq = row(COL_I8_OFF); nc = row(COL_P1); bits = int(row(COL_P2))
    nw = row(COL_N_IN) * row(COL_N_OUT)
    stat = code
    used = mod(mod(nw, 8_int64) * bits, 8_int64)   ! bits used in the last byte (0: all 8)
    if (nonfinite_count(nc, f32(o + 1)) > 0) then
      msg = 'centroids contain NaN or infinite values'
      return
    else if (nonfinite_count(row(COL_N_OUT), f32(o + nc + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
      return
    else if (used /= 0) then
      if (ishft(iand(int(i8(oq + row(COL_I8_LEN)), int64), 255_int64), -int(used)) /= 0) then
        msg = 'packed indices: the unused high bits of the last byte are not 0'
        return
      end if
    end if
    if (bad_index(bits, nc, i8(oq + 1), nw)) then
      msg = 'packed indices: an index is >= n_codes = '//str(nc)
      return
    end if
    stat = PYKD_OK
  end subroutine cb_values_ok

end module pykd_layer_codebook
