!> Status codes shared by every pykd routine.
!!
!! Library code never stops the host program: each routine reports failure
!! through an integer status and, optionally, a message. Python maps the codes
!! to exceptions; a Fortran caller tests `stat /= PYKD_OK`. A caller that
!! passes no `stat` gets the message on standard error instead.
module pykd_status
  use iso_fortran_env, only: error_unit
  implicit none
  private
  public :: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, &
            PYKD_ERR_ALLOC, PYKD_ERR_IO, PYKD_ERR_FORMAT, set_status

  integer, parameter :: PYKD_OK = 0            !! success
  integer, parameter :: PYKD_ERR_ARG = 1       !! bad argument (size, range, option)
  integer, parameter :: PYKD_ERR_LABEL = 2     !! a class label outside [0, classes)
  integer, parameter :: PYKD_ERR_NONFINITE = 3 !! NaN or infinity where a finite value is needed
  integer, parameter :: PYKD_ERR_ALLOC = 4     !! allocation failed
  integer, parameter :: PYKD_ERR_IO = 5        !! file could not be opened or read
  integer, parameter :: PYKD_ERR_FORMAT = 6    !! file is not a valid pykd model

contains

  !> Report `code` and `msg` through the caller's optional `stat`/`errmsg`.
  !! Without `stat`, a failure is written to standard error so it is not lost.
  subroutine set_status(code, msg, stat, errmsg)
    integer, intent(in) :: code
    character(len=*), intent(in) :: msg
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    if (present(stat)) then
      stat = code
    else if (code /= PYKD_OK) then
      write (error_unit, '(a)') 'pykd: '//trim(msg)
    end if
    if (present(errmsg)) errmsg = msg
  end subroutine set_status

end module pykd_status
