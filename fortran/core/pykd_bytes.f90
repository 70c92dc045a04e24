!> Little-endian fields in a byte buffer: the model file's building blocks.
!!
!! Offsets are 0-based byte offsets into `buf(1:)`, as in docs/format.md.
!! Fields are not aligned in the file, hence the copies through transfer.
!! A big-endian host swaps bytes on the fly.
module pykd_bytes
  use iso_fortran_env, only: int8, int32, int64, real32
  implicit none
  private
  public :: BIG_ENDIAN, to_bytes, swapped, get_u32, get_u64, get_f32, put_bytes, put_u32, &
            put_u64, put_f32, str

  logical, parameter :: BIG_ENDIAN = transfer(1_int32, 0_int8) == 0_int8

contains

  !> The bytes of a string.
  pure function to_bytes(s) result(b)
    character(len=*), intent(in) :: s
    integer(int8) :: b(len(s))
    b = transfer(s, 0_int8, len(s))
  end function to_bytes

  !> Groups of `width` bytes (4 or 8) in file order (little-endian) from/to host order.
  pure function swapped(bytes, width) result(b)
    integer(int8), intent(in) :: bytes(:)
    integer, intent(in), optional :: width
    integer(int8) :: b(size(bytes))
    integer(int64) :: i
    integer :: w
    b = bytes
    if (.not. BIG_ENDIAN) return
    w = 4
    if (present(width)) w = width
    do i = 1, size(b, kind=int64) - w + 1, w
      b(i:i + w - 1) = bytes(i + w - 1:i:-1)
    end do
  end function swapped

  !> The u32 at byte offset `pos`, as a non-negative int64.
  pure integer(int64) function get_u32(buf, pos)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos
    get_u32 = iand(int(transfer(swapped(buf(pos + 1:pos + 4)), 0_int32), int64), int(z'FFFFFFFF', int64))
  end function get_u32

  !> The u64 at byte offset `pos`; values of 2**63 and above come out negative.
  pure integer(int64) function get_u64(buf, pos)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos
    get_u64 = transfer(swapped(buf(pos + 1:pos + 8), 8), 0_int64)
  end function get_u64

  !> out(1:m) = the m float32 values at byte offset `pos`.
  pure subroutine get_f32(buf, pos, out, m)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos, m
    real(real32), intent(out) :: out(*)
    if (m <= 0) return
    if (BIG_ENDIAN) then
      out(1:m) = transfer(swapped(buf(pos + 1:pos + 4 * m)), 0.0_real32, m)
    else
      out(1:m) = transfer(buf(pos + 1:pos + 4 * m), 0.0_real32, m)
    end if
  end subroutine get_f32

  !> buf(pos+1 : pos+size(bytes)) = bytes; pos advances.
  pure subroutine put_bytes(buf, pos, bytes)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int8), intent(in) :: bytes(:)
    buf(pos + 1:pos + size(bytes, kind=int64)) = bytes
    pos = pos + size(bytes, kind=int64)
  end subroutine put_bytes

  !> Little-endian u32 fields (values in [0, 2**32)); pos advances.
  pure subroutine put_u32(buf, pos, values)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: values(:)
    integer(int8) :: b(8)
    integer :: i
    ! The low four bytes of each int64, so values >= 2**31 (a CRC) need no
    ! out-of-range conversion to int32.
    do i = 1, size(values)
      b = transfer(values(i), 0_int8, 8)
      if (BIG_ENDIAN) then
        call put_bytes(buf, pos, b(8:5:-1))
      else
        call put_bytes(buf, pos, b(1:4))
      end if
    end do
  end subroutine put_u32

  pure subroutine put_u64(buf, pos, value)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: value
    call put_bytes(buf, pos, swapped(transfer(value, 0_int8, 8), 8))
  end subroutine put_u64

  !> m little-endian float32 values; pos advances.
  pure subroutine put_f32(buf, pos, values, m)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    real(real32), intent(in) :: values(*)
    integer(int64), intent(in) :: m
    if (m <= 0) return
    call put_bytes(buf, pos, swapped(transfer(values(1:m), 0_int8, 4 * m)))
  end subroutine put_f32

  pure function str(i) result(s)
    integer(int64), intent(in) :: i
    character(len=:), allocatable :: s
    character(len=24) :: tmp
    write (tmp, '(i0)') i
    s = trim(tmp)
  end function str

end module pykd_bytes
