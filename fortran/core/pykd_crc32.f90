!> CRC-32 as in zlib, gzip and PNG (the model file's checksum).
!!
!! Reflected IEEE polynomial 0xEDB88320, initial value and final XOR
!! 0xFFFFFFFF; crc32 of the ASCII bytes "123456789" is 0xCBF43926.
!! Values are held in `integer(int32)` as bit patterns: a CRC with the top bit
!! set is negative, which is harmless because only bitwise intrinsics (ieor,
!! iand, shiftr: a logical shift) touch it. Compare CRCs with `==`, never `<`.
module pykd_crc32
  use iso_fortran_env, only: int8, int32, int64
  implicit none
  private
  public :: crc32_init, crc32_update, crc32_final, crc32

  integer :: i
  !> 0xEDB88320 as a signed 32-bit bit pattern.
  integer(int32), parameter :: POLY = -306674912_int32
  ! The 256-entry table as a compile-time constant: entry k is k shifted
  ! right eight times, XOR-ing in POLY whenever a 1 bit falls out. A constant
  ! needs no initialisation at run time, so concurrent callers are safe.
  integer(int32), parameter :: T0(0:255) = [(i, i = 0, 255)]
  integer(int32), parameter :: T1(0:255) = merge(ieor(shiftr(T0, 1), POLY), shiftr(T0, 1), btest(T0, 0))
  integer(int32), parameter :: T2(0:255) = merge(ieor(shiftr(T1, 1), POLY), shiftr(T1, 1), btest(T1, 0))
  integer(int32), parameter :: T3(0:255) = merge(ieor(shiftr(T2, 1), POLY), shiftr(T2, 1), btest(T2, 0))
  integer(int32), parameter :: T4(0:255) = merge(ieor(shiftr(T3, 1), POLY), shiftr(T3, 1), btest(T3, 0))
  integer(int32), parameter :: T5(0:255) = merge(ieor(shiftr(T4, 1), POLY), shiftr(T4, 1), btest(T4, 0))
  integer(int32), parameter :: T6(0:255) = merge(ieor(shiftr(T5, 1), POLY), shiftr(T5, 1), btest(T5, 0))
  integer(int32), parameter :: T7(0:255) = merge(ieor(shiftr(T6, 1), POLY), shiftr(T6, 1), btest(T6, 0))
  integer(int32), parameter :: TABLE(0:255) = merge(ieor(shiftr(T7, 1), POLY), shiftr(T7, 1), btest(T7, 0))

contains

  !> Running value to start a CRC with (0xFFFFFFFF).
  pure integer(int32) function crc32_init()
    crc32_init = not(0_int32)
  end function crc32_init

  !> Feed `bytes` into a running CRC started by crc32_init.
  pure subroutine crc32_update(crc, bytes)
    integer(int32), intent(inout) :: crc
    integer(int8), intent(in) :: bytes(:)
    integer(int64) :: k
    do k = 1, size(bytes, kind=int64)
      ! int() sign-extends a negative byte; iand(.., 255) keeps its low 8 bits.
      crc = ieor(TABLE(iand(ieor(crc, int(bytes(k), int32)), 255_int32)), shiftr(crc, 8))
    end do
  end subroutine crc32_update

  !> The CRC of everything fed so far.
  pure integer(int32) function crc32_final(crc)
    integer(int32), intent(in) :: crc
    crc32_final = not(crc)
  end function crc32_final

  !> CRC-32 of `bytes` in one call (zlib.crc32(bytes) as a bit pattern).
  pure integer(int32) function crc32(bytes)
    integer(int8), intent(in) :: bytes(:)
    integer(int32) :: c
    c = crc32_init()
    call crc32_update(c, bytes)
    crc32 = crc32_final(c)
  end function crc32

end module pykd_crc32
