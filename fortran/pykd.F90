!> pykd: knowledge distillation and model compression kernels.
!!
!! The one module a Fortran program needs: `use pykd`. Array layout is
!! column-major with one sample per column, e.g. `x(features, n)`.
!! Models trained in Python load with `pykd_load_model` and run with
!! `pykd_predict` (see pykd_models and docs/fortran.md).
!! The MPI build (meson -Dmpi=true, which defines PYKD_MPI) also exports the
!! data-parallel training of pykd_parallel (docs/distributed.md).
module pykd
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, &
                         PYKD_ERR_ALLOC, PYKD_ERR_IO, PYKD_ERR_FORMAT, PYKD_ERR_MPI
  use pykd_config, only: ACT_IDENTITY, ACT_RELU, ACT_TANH
  use pykd_dense, only: dense_forward, dense_backward
  use pykd_softmax, only: softmax, log_softmax
  use pykd_loss, only: cross_entropy, kd_loss, regression_loss
  use pykd_optim, only: sgd_step, adam_step
  use pykd_prune, only: magnitude_mask
  use pykd_quant, only: quantize_weights, dequantize_weights, int8_matmul
  use pykd_mlp, only: train_config, LOSS_CE, LOSS_KD, LOSS_MSE, LOSS_HUBER, LOSS_MSE_KD, LOSS_HUBER_KD, &
                      OPT_SGD, OPT_ADAM, mlp_param_count, &
                      mlp_workspace_size, mlp_forward, mlp_train_step, mlp_gradient, mlp_apply_update
  use pykd_models, only: pykd_model, pykd_workspace, pykd_load_model, pykd_predict, &
                         pykd_save_model, pykd_free, pykd_model_from_params, pykd_model_from_arrays, &
                         pykd_quantize_model
  use pykd_network, only: network_forward, network_workspace_words
  use pykd_int8_kernel, only: int8_pack, int8_packed_words
  use pykd_layer, only: pykd_layer_t
  use pykd_layer_factory, only: new_layer
  use pykd_activation, only: apply_activation
  use pykd_codes, only: ACT_SIGMOID, ACT_GELU, ACT_SILU, KIND_DENSE, KIND_DENSE_INT8, KIND_SPARSE_CSR, &
                        KIND_LOW_RANK, KIND_CODEBOOK, KIND_SPARSE_CODEBOOK, NORM_NONE, NORM_PER_FEATURE, &
                        NORM_SCALAR, QUANT_DYNAMIC, QUANT_STATIC, FORMAT_VERSION_MIN, FORMAT_VERSION, &
                        N_FIELDS, COL_KIND, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_OFF, COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1, COL_P2, COL_P3, COL_P4
#ifdef PYKD_MPI
  use pykd_parallel, only: pykd_mpi_sum, pykd_mpi_checksum, pykd_mpi_train_step
#endif
  implicit none
  private
  public :: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC, &
            PYKD_ERR_IO, PYKD_ERR_FORMAT, PYKD_ERR_MPI
  public :: ACT_IDENTITY, ACT_RELU, ACT_TANH
  public :: dense_forward, dense_backward, softmax, log_softmax, cross_entropy, kd_loss, regression_loss, &
            sgd_step, adam_step, magnitude_mask, quantize_weights, dequantize_weights, int8_matmul
  public :: train_config, LOSS_CE, LOSS_KD, LOSS_MSE, LOSS_HUBER, LOSS_MSE_KD, LOSS_HUBER_KD, &
            OPT_SGD, OPT_ADAM, mlp_param_count, &
            mlp_workspace_size, mlp_forward, mlp_train_step, mlp_gradient, mlp_apply_update
  public :: pykd_model, pykd_workspace, pykd_load_model, pykd_predict, pykd_save_model, &
            pykd_free, pykd_model_from_params, pykd_model_from_arrays, pykd_quantize_model
  public :: network_forward, network_workspace_words, pykd_layer_t, new_layer, apply_activation
  public :: int8_pack, int8_packed_words
  public :: ACT_SIGMOID, ACT_GELU, ACT_SILU, KIND_DENSE, KIND_DENSE_INT8, KIND_SPARSE_CSR, &
            KIND_LOW_RANK, KIND_CODEBOOK, KIND_SPARSE_CODEBOOK, NORM_NONE, NORM_PER_FEATURE, &
            NORM_SCALAR, QUANT_DYNAMIC, QUANT_STATIC, FORMAT_VERSION_MIN, FORMAT_VERSION, &
            N_FIELDS, COL_KIND, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
            COL_I8_OFF, COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1, COL_P2, COL_P3, COL_P4
#ifdef PYKD_MPI
  public :: pykd_mpi_sum, pykd_mpi_checksum, pykd_mpi_train_step
#endif
end module pykd
