!> Counter-based random numbers for dropout.
!!
!! Each random number is a hash of (seed, step, layer, index), so a mask can
!! be regenerated in the backward pass instead of stored, is the same for any
!! thread count, and NumPy reproduces it bit for bit (pykd/_step.py).
!!
!! The hash is "lowbias32" (Wellons) on 32-bit values held in int64. Products
!! are split into 16-bit halves so that no intermediate exceeds 2**48: the
!! arithmetic never overflows, so no compiler flag (-fwrapv) is needed.
module pykd_random
  use iso_fortran_env, only: int64, real32
  implicit none
  private
  public :: hash32, stream_key, uniform01

  integer(int64), parameter :: MASK32 = 4294967295_int64 ! 2**32 - 1
  integer(int64), parameter :: MUL1 = 2146121005_int64   ! 0x7feb352d
  integer(int64), parameter :: MUL2 = 2221713035_int64   ! 0x846ca68b

contains

  !> (x * c) mod 2**32 for 0 <= x, c < 2**32, without overflow.
  pure elemental integer(int64) function mul32(x, c)
    integer(int64), intent(in) :: x, c
    mul32 = iand(iand(x, 65535_int64) * c + ishft(iand(ishft(x, -16) * c, 65535_int64), 16), MASK32)
  end function mul32

  !> lowbias32 hash of the low 32 bits of x; result in [0, 2**32).
  pure elemental integer(int64) function hash32(x) result(h)
    integer(int64), intent(in) :: x
    h = iand(x, MASK32)
    h = ieor(h, ishft(h, -16))
    h = mul32(h, MUL1)
    h = ieor(h, ishft(h, -15))
    h = mul32(h, MUL2)
    h = ieor(h, ishft(h, -16))
  end function hash32

  !> Key of the stream for one (seed, step, layer); layer < 64, step < 2**26
  !! distinct per seed (steps further apart repeat after 2**26 = 67M steps).
  pure integer(int64) function stream_key(seed, step, layer)
    integer(int64), intent(in) :: seed, step
    integer, intent(in) :: layer
    stream_key = hash32(ieor(hash32(ieor(seed, ishft(seed, -32))), &
                             hash32(iand(step, MASK32) * 64 + layer)))
  end function stream_key

  !> Uniform number in [0, 1) from the top 24 bits of hash32(key + i).
  pure elemental real(real32) function uniform01(key, i)
    integer(int64), intent(in) :: key, i
    uniform01 = real(ishft(hash32(key + i), -8), real32) * 2.0_real32**(-24)
  end function uniform01

end module pykd_random
