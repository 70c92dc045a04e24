!> Every code shared with Python and the model file, once.
!!
!! The Python copy is pykd/_codes.py; tests/test_codes.py parses this file
!! and checks that the two agree.
module pykd_codes
  implicit none
  private
  public :: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC, &
            PYKD_ERR_IO, PYKD_ERR_FORMAT, PYKD_ERR_MPI
  public :: ACT_IDENTITY, ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_GELU, ACT_SILU, ACT_MAX
  public :: LOSS_CE, LOSS_KD, LOSS_MSE, LOSS_HUBER, LOSS_MSE_KD, LOSS_HUBER_KD, LOSS_MAX
  public :: KIND_DENSE, KIND_DENSE_INT8, KIND_SPARSE_CSR, KIND_LOW_RANK, KIND_CODEBOOK, &
            KIND_SPARSE_CODEBOOK, KIND_MAX
  public :: NORM_NONE, NORM_PER_FEATURE, NORM_SCALAR
  public :: QUANT_DYNAMIC, QUANT_STATIC
  public :: COL_KIND, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, COL_I8_OFF, &
            COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1, COL_P2, COL_P3, COL_P4, N_FIELDS
  public :: FORMAT_VERSION_MIN, FORMAT_VERSION

  ! Status of every routine (`stat`).
  integer, parameter :: PYKD_OK = 0            !! success
  integer, parameter :: PYKD_ERR_ARG = 1       !! bad argument (size, range, option)
  integer, parameter :: PYKD_ERR_LABEL = 2     !! a class label outside [0, classes)
  integer, parameter :: PYKD_ERR_NONFINITE = 3 !! NaN or infinity where a finite value is needed
  integer, parameter :: PYKD_ERR_ALLOC = 4     !! allocation failed
  integer, parameter :: PYKD_ERR_IO = 5        !! file could not be opened or read
  integer, parameter :: PYKD_ERR_FORMAT = 6    !! file is not a valid pykd model
  integer, parameter :: PYKD_ERR_MPI = 7       !! an MPI call failed, or the ranks disagree (a rank failed, diverged)

  ! Activations (file field `activation`).
  integer, parameter :: ACT_IDENTITY = 0 !! y = z
  integer, parameter :: ACT_RELU = 1     !! y = max(z, 0), NaN kept
  integer, parameter :: ACT_TANH = 2     !! y = tanh(z)
  integer, parameter :: ACT_SIGMOID = 3  !! y = 1 / (1 + exp(-z))
  integer, parameter :: ACT_GELU = 4     !! y = z * (1 + erf(z / sqrt(2))) / 2 (exact)
  integer, parameter :: ACT_SILU = 5     !! y = z * sigmoid(z)
  integer, parameter :: ACT_MAX = 5

  ! Losses of the fused training step (pykd_mlp).
  integer, parameter :: LOSS_CE = 0       !! cross-entropy on labels
  integer, parameter :: LOSS_KD = 1       !! Hinton distillation against teacher logits
  integer, parameter :: LOSS_MSE = 2      !! mean squared error on float targets
  integer, parameter :: LOSS_HUBER = 3    !! Huber (delta) on float targets
  integer, parameter :: LOSS_MSE_KD = 4   !! alpha MSE(s, y) + (1 - alpha) MSE(s, teacher outputs)
  integer, parameter :: LOSS_HUBER_KD = 5 !! the same with Huber
  integer, parameter :: LOSS_MAX = 5

  ! Layer kinds (file field `kind`).
  integer, parameter :: KIND_DENSE = 1           !! float32 weights
  integer, parameter :: KIND_DENSE_INT8 = 2      !! int8 weights, one scale per output
  integer, parameter :: KIND_SPARSE_CSR = 3      !! CSR weights (rows = inputs)
  integer, parameter :: KIND_LOW_RANK = 4        !! W = U V
  integer, parameter :: KIND_CODEBOOK = 5        !! packed indices into <= 256 centroids
  integer, parameter :: KIND_SPARSE_CODEBOOK = 6 !! CSR pattern, codebook values
  integer, parameter :: KIND_MAX = 6

  ! Normalisation (input and output).
  integer, parameter :: NORM_NONE = 0        !! values used as given
  integer, parameter :: NORM_PER_FEATURE = 1 !! one mean/std per feature (or output)
  integer, parameter :: NORM_SCALAR = 2      !! one mean/std for all

  ! How an int8 layer quantizes its input.
  integer, parameter :: QUANT_DYNAMIC = 0 !! one scale per sample, at run time
  integer, parameter :: QUANT_STATIC = 1  !! one stored scale per layer input

  ! Rows of the layer table `table(N_FIELDS, n_layers)` (docs/model.md).
  integer, parameter :: COL_KIND = 1, COL_ACT = 2, COL_N_IN = 3, COL_N_OUT = 4
  integer, parameter :: COL_F32_OFF = 5, COL_F32_LEN = 6, COL_I8_OFF = 7, COL_I8_LEN = 8
  integer, parameter :: COL_I32_OFF = 9, COL_I32_LEN = 10
  integer, parameter :: COL_P1 = 11, COL_P2 = 12, COL_P3 = 13, COL_P4 = 14
  integer, parameter :: N_FIELDS = 14

  ! Model file versions read; the last is written.
  integer, parameter :: FORMAT_VERSION_MIN = 1
  integer, parameter :: FORMAT_VERSION = 2
end module pykd_codes
