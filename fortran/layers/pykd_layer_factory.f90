!> The one map from a kind code to its type: the only `select case` on a
!! layer kind in pykd. Adding a kind is one module and one `case` here.
module pykd_layer_factory
  use iso_fortran_env, only: int32, int64
  use pykd_codes, only: KIND_DENSE, KIND_DENSE_INT8, KIND_SPARSE_CSR, KIND_LOW_RANK, &
                        KIND_CODEBOOK, KIND_SPARSE_CODEBOOK
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG
  use pykd_layer, only: pykd_layer_t
  use pykd_layer_dense, only: dense_layer_t
  use pykd_layer_dense_int8, only: dense_int8_layer_t
  use pykd_layer_sparse_csr, only: sparse_csr_layer_t
  use pykd_layer_low_rank, only: low_rank_layer_t
  use pykd_layer_codebook, only: codebook_layer_t
  use pykd_layer_sparse_codebook, only: sparse_codebook_layer_t
  implicit none
  private
  public :: new_layer

  !> call new_layer(kind, layer, stat): `layer` becomes an object of the
  !! kind's type; stat is PYKD_OK, or PYKD_ERR_ARG for an unknown code
  !! (layer is then not allocated). The kind types have no components, so
  !! this costs one small allocation.
  interface new_layer
    module procedure new_layer_i32, new_layer_i64
  end interface new_layer

contains

  subroutine new_layer_i64(kind, layer, stat)
    integer(int64), intent(in) :: kind
    class(pykd_layer_t), allocatable, intent(out) :: layer
    integer, intent(out) :: stat

    stat = PYKD_OK
    select case (kind)
    case (KIND_DENSE)
      allocate (dense_layer_t :: layer)
    case (KIND_DENSE_INT8)
      allocate (dense_int8_layer_t :: layer)
    case (KIND_SPARSE_CSR)
      allocate (sparse_csr_layer_t :: layer)
    case (KIND_LOW_RANK)
      allocate (low_rank_layer_t :: layer)
    case (KIND_CODEBOOK)
      allocate (codebook_layer_t :: layer)
    case (KIND_SPARSE_CODEBOOK)
      allocate (sparse_codebook_layer_t :: layer)
    case default
      stat = PYKD_ERR_ARG
    end select
  end subroutine new_layer_i64

  subroutine new_layer_i32(kind, layer, stat)
    integer(int32), intent(in) :: kind
    class(pykd_layer_t), allocatable, intent(out) :: layer
    integer, intent(out) :: stat
    call new_layer_i64(int(kind, int64), layer, stat)
  end subroutine new_layer_i32

end module pykd_layer_factory
