!> network_forward with a C interface: the whole model's forward for C
!! callers, and the entry of pykd's lean Python binding (pykd/_lean.c), which
!! reaches it through the address the f2py shim gives
!! (network_forward_c_address). The arrays are the C-ordered ones of
!! docs/model.md: table (nl, N_FIELDS), x (n, n_in), y (n, n_out), i.e.
!! Fortran's table(N_FIELDS, nl), x(n_in, n), y(n_out, n); nothing is copied.
!! upto is 0 (all layers, the output normalisation undone). stat and
!! bad_layer as network_forward's (every argument is checked there).
module pykd_network_c
  use iso_c_binding, only: c_int, c_int8_t, c_int32_t, c_int64_t, c_float
  use pykd_codes, only: N_FIELDS
  use pykd_network, only: network_forward
  implicit none
  private
  public :: network_forward_c

contains

  subroutine network_forward_c(table, nl, f32, nf32, i8, ni8, i32, ni32, norm, nnorm, norm_kinds, &
                               x, n_in, n, y, n_out, work, nw, stat, bad_layer) &
      bind(c, name='pykd_network_forward_c')
    integer(c_int), value :: nl, n_in, n, n_out
    integer(c_int64_t), value :: nf32, ni8, ni32, nnorm, nw
    integer(c_int64_t), intent(in) :: table(N_FIELDS, nl)
    real(c_float), intent(in) :: f32(nf32), norm(nnorm), x(n_in, n)
    integer(c_int8_t), intent(in) :: i8(ni8)
    integer(c_int32_t), intent(in) :: i32(ni32)
    integer(c_int), intent(in) :: norm_kinds(2)
    real(c_float), intent(inout) :: y(n_out, n), work(nw)
    integer(c_int), intent(out) :: stat, bad_layer

    call network_forward(table, f32, i8, i32, norm, norm_kinds, x, 0, y, work, stat, bad_layer)
  end subroutine network_forward_c

end module pykd_network_c
