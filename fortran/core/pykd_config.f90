!> Tuning constants shared by the kernels.
module pykd_config
  use pykd_codes, only: ACT_IDENTITY, ACT_RELU, ACT_TANH  ! re-exported for the kernels
  implicit none
  private
  public :: PAR_MIN_WORK, PAR_MIN_OPT, ACT_IDENTITY, ACT_RELU, ACT_TANH

  !> Below this many elements an elementwise loop runs on one thread. Waking
  !! the OpenMP team costs more than a small loop, and around a BLAS call an
  !! extra team only competes with BLAS's own threads for the cores: a
  !! 64 x 1200 bias/activation pass (77k elements) takes ~30 us on one core
  !! next to a 2 ms sgemm. Optimizer steps on millions of weights do split.
  integer, parameter :: PAR_MIN_WORK = 262144

  !> Optimizer steps do more per element (Adam: a square root and a
  !! division), so they split across threads from fewer elements.
  integer, parameter :: PAR_MIN_OPT = 32768

end module pykd_config
