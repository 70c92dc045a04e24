!> A minimal test harness for the Fortran-only tests: `check` records one
!! named assertion, `finish` prints the tally and sets the exit status.
module test_harness
  use iso_fortran_env, only: output_unit
  implicit none
  private
  public :: check, finish

  integer, save :: n_checks = 0, n_failed = 0

contains

  !> Record one check; a failure prints FAIL and is counted, never stops.
  subroutine check(ok, what)
    logical, intent(in) :: ok
    character(len=*), intent(in) :: what
    n_checks = n_checks + 1
    if (ok) then
      write (output_unit, '(a)') 'ok    '//what
    else
      write (output_unit, '(a)') 'FAIL  '//what
      n_failed = n_failed + 1
    end if
  end subroutine check

  !> Print the tally; exit with status 1 if any check failed (test programs
  !! may stop, the library never does).
  subroutine finish(suite)
    character(len=*), intent(in) :: suite
    if (n_failed > 0) then
      write (output_unit, '(i0,a,i0,a)') n_failed, ' of ', n_checks, ' '//suite//' checks failed'
      error stop 1
    end if
    write (output_unit, '(a,i0,a)') 'all ', n_checks, ' '//suite//' checks passed'
  end subroutine finish

end module test_harness
