!> Tuning constants shared by the kernels.
module pykd_config
  implicit none
  private
  public :: PAR_MIN_WORK, ACT_IDENTITY, ACT_RELU, ACT_TANH

  !> Below this many elements an elementwise loop runs on one thread: waking
  !! the OpenMP team costs more than the loop itself (64 x 10 logits).
  integer, parameter :: PAR_MIN_WORK = 32768

  integer, parameter :: ACT_IDENTITY = 0 !! y = z
  integer, parameter :: ACT_RELU = 1     !! y = max(z, 0)
  integer, parameter :: ACT_TANH = 2     !! y = tanh(z)
end module pykd_config
