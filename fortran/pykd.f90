!> pykd: knowledge distillation and model compression kernels.
!!
!! The one module a Fortran program needs: `use pykd`. Array layout is
!! column-major with one sample per column, e.g. `x(features, n)`.
!! Models trained in Python load with `pykd_load_model` and run with
!! `pykd_predict` (see pykd_models and docs/fortran.md).
module pykd
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, &
                         PYKD_ERR_ALLOC, PYKD_ERR_IO, PYKD_ERR_FORMAT
  use pykd_config, only: ACT_IDENTITY, ACT_RELU, ACT_TANH
  use pykd_dense, only: dense_forward, dense_backward
  use pykd_softmax, only: softmax, log_softmax
  use pykd_loss, only: cross_entropy, kd_loss
  use pykd_optim, only: sgd_step, adam_step
  use pykd_prune, only: magnitude_mask
  use pykd_quant, only: quantize_weights, dequantize_weights, int8_matmul
  use pykd_mlp, only: train_config, LOSS_CE, LOSS_KD, OPT_SGD, OPT_ADAM, mlp_param_count, &
                      mlp_workspace_size, mlp_forward, mlp_train_step
  use pykd_models, only: pykd_model, pykd_layer, pykd_workspace, pykd_load_model, pykd_predict, &
                         pykd_save_model, pykd_free, pykd_model_from_params, pykd_quantize_model, &
                         LAYER_DENSE, LAYER_DENSE_INT8, NORM_NONE, NORM_PER_FEATURE, NORM_SCALAR, &
                         PYKD_FORMAT_VERSION
  implicit none
  private
  public :: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_LABEL, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC, &
            PYKD_ERR_IO, PYKD_ERR_FORMAT
  public :: ACT_IDENTITY, ACT_RELU, ACT_TANH
  public :: dense_forward, dense_backward, softmax, log_softmax, cross_entropy, kd_loss, &
            sgd_step, adam_step, magnitude_mask, quantize_weights, dequantize_weights, int8_matmul
  public :: train_config, LOSS_CE, LOSS_KD, OPT_SGD, OPT_ADAM, mlp_param_count, &
            mlp_workspace_size, mlp_forward, mlp_train_step
  public :: pykd_model, pykd_layer, pykd_workspace, pykd_load_model, pykd_predict, pykd_save_model, &
            pykd_free, pykd_model_from_params, pykd_quantize_model, LAYER_DENSE, LAYER_DENSE_INT8, &
            NORM_NONE, NORM_PER_FEATURE, NORM_SCALAR, PYKD_FORMAT_VERSION
end module pykd
