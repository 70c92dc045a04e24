!> Counter-based random numbers for dropout.
!!
!! Each random number is a hash of (seed, step, layer, index), so a mask can
!! be regenerated in the backward pass instead of stored, is the same for any
!! thread count, and NumPy can reproduce it bit for bit (pykd/_step.py).
!! The hash is SplitMix64; it relies on wrapping 64-bit integer arithmetic,
!! so pykd is compiled with -fwrapv.
module pykd_random
  use iso_fortran_env, only: int64, real32
  implicit none
  private
  public :: splitmix64, stream_key, uniform01

  integer(int64), parameter :: GOLDEN = -7046029254386353131_int64 ! 0x9E3779B97F4A7C15
  integer(int64), parameter :: MIX1 = -4658895280553007687_int64   ! 0xBF58476D1CE4E5B9
  integer(int64), parameter :: MIX2 = -7723592293110705685_int64   ! 0x94D049BB133111EB

contains

  !> SplitMix64 output function of the state `x` (advanced by GOLDEN first).
  pure elemental integer(int64) function splitmix64(x) result(z)
    integer(int64), intent(in) :: x
    z = x + GOLDEN
    z = ieor(z, ishft(z, -30)) * MIX1
    z = ieor(z, ishft(z, -27)) * MIX2
    z = ieor(z, ishft(z, -31))
  end function splitmix64

  !> Key of the stream for one (seed, step, layer); layer < 64.
  pure integer(int64) function stream_key(seed, step, layer)
    integer(int64), intent(in) :: seed, step
    integer, intent(in) :: layer
    stream_key = splitmix64(ieor(seed, splitmix64(step * 64 + layer)))
  end function stream_key

  !> Uniform number in [0, 1) from the top 24 bits of splitmix64(key + i).
  pure elemental real(real32) function uniform01(key, i)
    integer(int64), intent(in) :: key, i
    uniform01 = real(ishft(splitmix64(key + i), -40), real32) * 2.0_real32**(-24)
  end function uniform01

end module pykd_random
