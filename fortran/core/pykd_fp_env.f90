!> Flush-to-zero of float results for the training steps, on every thread
!! that may run a part of one: this thread and the OpenMP pool's (the
!! OpenMP build of OpenBLAS runs its products on the same pool). See
!! pykd_fp_env.c for why; no-ops where the CPU has no MXCSR.
module pykd_fp_env
  use iso_c_binding, only: c_int
  !$ use omp_lib, only: omp_in_parallel
  implicit none
  private
  public :: flush_denormals_begin, flush_denormals_end

  interface
    integer(c_int) function c_ftz_get() bind(c, name='pykd_ftz_get')
      import :: c_int
    end function c_ftz_get
    subroutine c_ftz_set(on) bind(c, name='pykd_ftz_set')
      import :: c_int
      integer(c_int), value :: on
    end subroutine c_ftz_set
  end interface

contains

  !> From here to flush_denormals_end(prev), subnormal float results are 0
  !! on this thread and the OpenMP pool's (inside a parallel region, on this
  !! thread only: the products there run on it alone). prev: this thread's
  !! mode before, for flush_denormals_end.
  subroutine flush_denormals_begin(prev)
    integer(c_int), intent(out) :: prev
    prev = c_ftz_get()
    call set_all(1_c_int)
  end subroutine flush_denormals_begin

  !> Every thread back to `prev`. The pool's threads are set, not restored:
  !! a thread the pool started during the step inherited the flushing mode.
  subroutine flush_denormals_end(prev)
    integer(c_int), intent(in) :: prev
    call set_all(prev)
  end subroutine flush_denormals_end

  subroutine set_all(on)
    integer(c_int), intent(in) :: on
    logical :: inner
    inner = .false.
    !$ inner = omp_in_parallel()
    if (inner) then
      call c_ftz_set(on)
      return
    end if
    ! The whole pool: a team of omp_get_max_threads(), the caller included.
    !$omp parallel
    call c_ftz_set(on)
    !$omp end parallel
  end subroutine set_all

end module pykd_fp_env
