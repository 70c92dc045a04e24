!> Read MNIST-style IDX files (Fashion-MNIST) for the examples, and a
!! command-line helper they share.
!!
!! Fortran cannot read gzip, so the files must be unpacked first
!! (`gunzip -k`, see run.sh). IDX headers are big-endian: a magic number
!! 0x0000TTDD (TT = 0x08 for unsigned bytes, DD = number of dimensions), then
!! one 32-bit size per dimension, then the data in C order.
module fmnist_idx
  use iso_fortran_env, only: int8, int32, int64, real32
  implicit none
  private
  public :: read_images, read_labels, argument

contains

  !> Images scaled to [0, 1] (as pykd.data does: float32 pixel / 255), one
  !! image per column: x(rows * cols, n).
  subroutine read_images(path, x, stat, errmsg)
    character(len=*), intent(in) :: path
    real(real32), allocatable, intent(out) :: x(:, :)
    integer, intent(out) :: stat
    character(len=*), intent(out) :: errmsg
    integer(int8), allocatable :: raw(:, :)
    integer(int64) :: dims(3)
    integer :: u

    call open_idx(path, 3, u, dims, stat, errmsg)
    if (stat /= 0) return
    allocate (raw(dims(2) * dims(3), dims(1)))
    read (u, iostat=stat) raw
    close (u)
    if (stat /= 0) then
      errmsg = path//': truncated image data'
      return
    end if
    ! Bytes are unsigned: iand(.., 255) undoes the sign of int8.
    x = real(iand(int(raw, int32), 255_int32), real32) / 255.0_real32
  end subroutine read_images

  !> Labels as int64 class indices (0-based), as pykd's training routines want.
  subroutine read_labels(path, y, stat, errmsg)
    character(len=*), intent(in) :: path
    integer(int64), allocatable, intent(out) :: y(:)
    integer, intent(out) :: stat
    character(len=*), intent(out) :: errmsg
    integer(int8), allocatable :: raw(:)
    integer(int64) :: dims(1)
    integer :: u

    call open_idx(path, 1, u, dims, stat, errmsg)
    if (stat /= 0) return
    allocate (raw(dims(1)))
    read (u, iostat=stat) raw
    close (u)
    if (stat /= 0) then
      errmsg = path//': truncated label data'
      return
    end if
    y = iand(int(raw, int64), 255_int64)
  end subroutine read_labels

  !> Open an IDX file of unsigned bytes with `ndim` dimensions; leave the
  !! unit positioned at the data.
  subroutine open_idx(path, ndim, u, dims, stat, errmsg)
    character(len=*), intent(in) :: path
    integer, intent(in) :: ndim
    integer, intent(out) :: u
    integer(int64), intent(out) :: dims(ndim)
    integer, intent(out) :: stat
    character(len=*), intent(out) :: errmsg
    integer(int8) :: head(4 * (ndim + 1))
    integer(int64) :: file_size
    integer :: k

    errmsg = ''
    open (newunit=u, file=path, access='stream', form='unformatted', status='old', &
          action='read', iostat=stat)
    if (stat /= 0) then
      errmsg = path//': cannot open (unpack the .gz first: gunzip -k)'
      return
    end if
    read (u, iostat=stat) head
    if (stat == 0 .and. (any(head(1:2) /= 0_int8) .or. head(3) /= 8 .or. head(4) /= ndim)) stat = 1
    if (stat /= 0) then
      errmsg = path//': not an IDX file of unsigned bytes with the expected dimensions'
      close (u)
      return
    end if
    do k = 1, ndim
      dims(k) = big_endian_u32(head(4 * k + 1:4 * k + 4))
    end do
    inquire (unit=u, size=file_size)
    if (file_size /= 4 * (ndim + 1) + product(dims)) then
      stat = 1
      errmsg = path//': file size does not match its header'
      close (u)
    end if
  end subroutine open_idx

  pure integer(int64) function big_endian_u32(b)
    integer(int8), intent(in) :: b(4)
    integer :: k
    big_endian_u32 = 0
    do k = 1, 4
      big_endian_u32 = 256 * big_endian_u32 + iand(int(b(k), int64), 255_int64)
    end do
  end function big_endian_u32

  !> Command-line argument i, whatever its length.
  function argument(i) result(s)
    integer, intent(in) :: i
    character(len=:), allocatable :: s
    integer :: length
    call get_command_argument(i, length=length)
    allocate (character(len=length) :: s)
    call get_command_argument(i, s)
  end function argument

end module fmnist_idx
