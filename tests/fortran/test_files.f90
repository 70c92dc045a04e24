!> Helpers the Fortran model tests share: deterministic numbers, whole-file
!! reads and writes, little-endian fields and a CRC fix-up for patched files.
module test_files
  use iso_fortran_env, only: real32, int8, int32, int64
  use pykd_crc32, only: crc32
  use pykd_random, only: uniform01
  implicit none
  private
  public :: uniforms, delete, read_all, write_all, fix_crc, put32, putf, get32, same_arrays

  interface get32
    module procedure get32_i32, get32_i64
  end interface get32

contains

  !> Deterministic numbers in [-amp, amp) (a hash of the index, see pykd_random).
  function uniforms(n, seed, amp) result(u)
    integer, intent(in) :: n
    integer(int64), intent(in) :: seed
    real(real32), intent(in) :: amp
    real(real32) :: u(n)
    integer(int64) :: i
    u = [(amp * (2 * uniform01(seed, i) - 1), i = 0, n - 1)]
  end function uniforms

  subroutine delete(path)
    character(len=*), intent(in) :: path
    integer :: u, ios
    open (newunit=u, file=path, status='old', iostat=ios)
    if (ios == 0) close (u, status='delete')
  end subroutine delete

  subroutine read_all(path, b)
    character(len=*), intent(in) :: path
    integer(int8), allocatable, intent(out) :: b(:)
    integer :: u, ios
    integer(int64) :: n
    allocate (b(0))
    open (newunit=u, file=path, access='stream', form='unformatted', status='old', action='read', iostat=ios)
    if (ios /= 0) return
    inquire (unit=u, size=n)
    deallocate (b)
    allocate (b(n))
    if (n > 0) read (u) b
    close (u)
  end subroutine read_all

  subroutine write_all(path, b)
    character(len=*), intent(in) :: path
    integer(int8), intent(in) :: b(:)
    integer :: u
    open (newunit=u, file=path, access='stream', form='unformatted', status='replace', action='write')
    if (size(b) > 0) write (u) b
    close (u)
  end subroutine write_all

  !> Recompute the CRC of a patched file so the damage is past the checksum.
  subroutine fix_crc(b)
    integer(int8), intent(inout) :: b(:)
    integer(int64) :: t
    t = size(b, kind=int64) - 12
    b(t + 1:t + 4) = transfer(crc32(b(1:t)), 0_int8, 4)
  end subroutine fix_crc

  !> Little-endian u32 fields (two's complement: -1 is 2**32 - 1) at pos; pos advances.
  subroutine put32(b, pos, values)
    integer(int8), intent(inout) :: b(:)
    integer(int64), intent(inout) :: pos
    integer, intent(in) :: values(:)
    integer :: i
    do i = 1, size(values)
      b(pos + 1:pos + 4) = transfer(int(values(i), int32), 0_int8, 4)
      pos = pos + 4
    end do
  end subroutine put32

  subroutine putf(b, pos, values)
    integer(int8), intent(inout) :: b(:)
    integer(int64), intent(inout) :: pos
    real(real32), intent(in) :: values(:)
    b(pos + 1:pos + 4 * size(values)) = transfer(values, 0_int8, 4 * size(values))
    pos = pos + 4 * size(values)
  end subroutine putf

  !> The u32 at byte offset pos (0-based).
  integer(int64) function get32_i64(b, pos)
    integer(int8), intent(in) :: b(:)
    integer(int64), intent(in) :: pos
    get32_i64 = iand(int(transfer(b(pos + 1:pos + 4), 0_int32), int64), int(z'FFFFFFFF', int64))
  end function get32_i64

  integer(int64) function get32_i32(b, pos)
    integer(int8), intent(in) :: b(:)
    integer, intent(in) :: pos
    get32_i32 = get32_i64(b, int(pos, int64))
  end function get32_i32

  !> Same size and the same bits.
  logical function same_arrays(a, b)
    real(real32), intent(in) :: a(:), b(:)
    same_arrays = size(a) == size(b)
    if (same_arrays) same_arrays = all(transfer(a, 0_int32, size(a)) == transfer(b, 0_int32, size(b)))
  end function same_arrays

end module test_files
