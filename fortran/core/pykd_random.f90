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
  use iso_fortran_env, only: int32, int64, real32, real64
  use pykd_config, only: PAR_MIN_OPT
  implicit none
  private
  public :: hash32, stream_key, uniform01, dropout_fill

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

  !> m(i) = 1/(1-p) if uniform01(key, i - 1) >= p, else 0, for i = 1..n.
  !!
  !! Written to vectorize (8 hashes at a time with AVX2): explicit-shape m
  !! (see pykd_optim), no branch, the int64 -> float conversion through int32
  !! (AVX2 has no vector int64 -> float), and hash32 inlined, for which the
  !! build passes -fno-semantic-interposition (with -fPIC gfortran does not
  !! inline a public module function).
  subroutine dropout_fill(n, m, key, p)
    integer(int64), intent(in) :: n, key
    real(real32), intent(out) :: m(n)
    real(real32), intent(in) :: p
    integer(int64) :: i, threshold
    real(real32) :: keep_scale

    keep_scale = 1 / (1 - p)
    ! uniform01 = h / 2**24 with an integer h in [0, 2**24), and p * 2**24 is
    ! exact, so (uniform01 >= p) == (h >= threshold).
    threshold = ceiling(real(p, real64) * 2**24, int64)
    !$omp parallel do simd schedule(static) if(parallel: n >= PAR_MIN_OPT)
    do i = 1, n
      ! 1 - (sign bit of h - threshold): 1 where kept, 0 where dropped.
      m(i) = keep_scale * real(int(1 - ishft(ishft(hash32(key + i - 1), -8) - threshold, -63), &
                                   int32), real32)
    end do
    !$omp end parallel do simd
  end subroutine dropout_fill

end module pykd_random
