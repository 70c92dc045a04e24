!> Test driver for tests/test_fortran_fuzz.py: load model files, report.
!!
!!     load_cli LIST
!!
!! LIST holds one model path per line. For each, one line on standard
!! output, flushed at once (so that a crash names its file):
!!
!!     <stat> <bytes> <path>
!!
!! `stat` is pykd_load_model's status; `bytes` the memory the loaded
!! model's arrays take (0 when the load failed), which the fuzzer checks
!! against the format's limit of 64 x the file size + 64 KiB.
program load_cli
  use iso_fortran_env, only: int64, output_unit, error_unit
  use pykd, only: pykd_model, pykd_load_model, PYKD_OK
  implicit none
  type(pykd_model) :: model
  character(len=4096) :: path
  character(len=:), allocatable :: list
  integer :: u, ios, stat, length
  integer(int64) :: bytes

  if (command_argument_count() /= 1) then
    write (error_unit, '(a)') 'usage: load_cli LIST'
    error stop 2
  end if
  call get_command_argument(1, length=length)
  allocate (character(len=length) :: list)
  call get_command_argument(1, list)
  open (newunit=u, file=list, status='old', action='read', iostat=ios)
  if (ios /= 0) then
    write (error_unit, '(a)') 'load_cli: cannot open '//list
    error stop 2
  end if
  do
    read (u, '(a)', iostat=ios) path
    if (ios /= 0) exit
    if (path == '') cycle
    call pykd_load_model(trim(path), model, stat)
    bytes = 0
    if (stat == PYKD_OK) bytes = 8 * size(model%table, kind=int64) + 4 * size(model%f32, kind=int64) &
                                 + size(model%i8, kind=int64) + 4 * size(model%i32, kind=int64) &
                                 + 4 * size(model%norm, kind=int64) + len(model%metadata, kind=int64)
    write (output_unit, '(i0,1x,i0,1x,a)') stat, bytes, trim(path)
    flush (output_unit)
  end do
  close (u)
end program load_cli
