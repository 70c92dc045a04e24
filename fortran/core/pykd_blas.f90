!> Explicit interfaces to the reference BLAS routines pykd calls.
!!
!! An explicit interface (rather than `external`) lets the compiler check
!! argument kinds and keeps `fpm`'s `implicit-external = false` happy.
module pykd_blas
  use iso_fortran_env, only: real32
  implicit none
  private
  public :: sgemm, sgemv

  interface
    !> C = alpha * op(A) * op(B) + beta * C
    subroutine sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
      import :: real32
      character(len=1), intent(in) :: transa, transb
      integer, intent(in) :: m, n, k, lda, ldb, ldc
      real(real32), intent(in) :: alpha, beta
      real(real32), intent(in) :: a(lda, *), b(ldb, *)
      real(real32), intent(inout) :: c(ldc, *)
    end subroutine sgemm

    !> y = alpha * op(A) * x + beta * y
    subroutine sgemv(trans, m, n, alpha, a, lda, x, incx, beta, y, incy)
      import :: real32
      character(len=1), intent(in) :: trans
      integer, intent(in) :: m, n, lda, incx, incy
      real(real32), intent(in) :: alpha, beta
      real(real32), intent(in) :: a(lda, *), x(*)
      real(real32), intent(inout) :: y(*)
    end subroutine sgemv
  end interface

end module pykd_blas
