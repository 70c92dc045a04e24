!> Status codes shared by every pykd routine.
!!
!! Library code never stops the host program: each routine reports failure
!! through an integer status (the codes live in pykd_codes and are re-exported
!! here) and, optionally, a message. Python maps the codes to exceptions; a
!! Fortran caller tests `stat /= PYKD_OK`. A caller that passes no `stat` gets
!! the message on standard error instead.
module pykd_status
  use iso_fortran_env, only: error_unit
  use pykd_codes, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, &
                        PYKD_ERR_ALLOC, PYKD_ERR_IO, PYKD_ERR_FORMAT, PYKD_ERR_MPI
  implicit none
  private
  public :: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, &
            PYKD_ERR_ALLOC, PYKD_ERR_IO, PYKD_ERR_FORMAT, PYKD_ERR_MPI, set_status

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
