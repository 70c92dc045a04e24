!> Kind 1, `dense`: float32 W and b.
!!
!! Slices (docs/model.md): f32 = [W (n_in, n_out) C order = w(n_out, n_in), b (n_out)].
!! Payload (v1 and v2 alike): W f32[n_in * n_out], b f32[n_out].
module pykd_layer_dense
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_LEN, COL_I32_LEN, COL_P1
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT
  use pykd_layer, only: pykd_layer_t
  use pykd_activation, only: apply_activation
  use pykd_bytes, only: get_f32, put_f32
  use pykd_layer_util, only: take, sizes_ok, row_expect, nonfinite_count
  use pykd_codes, only: ACT_IDENTITY, ACT_RELU
  use iso_c_binding, only: c_int, c_float, c_char, c_long
  implicit none
  private
  public :: dense_layer_t, dense_rows, one_sample_product, batch_product, batch_product_words, &
            dense_path_name, dense_tile_name

  interface
    !> fortran/kernels/pykd_dense_simd.c: y(j0+1:j1) of one sample, bias and
    !! identity/relu fused, on the calling thread (no OpenMP, no BLAS).
    subroutine c_gemv(n_out, n_in, w, x, j0, j1, b, act, y) bind(c, name='pykd_f32_gemv')
      import :: c_int, c_float
      integer(c_int), value :: n_out, n_in, j0, j1, act
      real(c_float), intent(in) :: w(*), x(*), b(*)
      real(c_float), intent(inout) :: y(*)
    end subroutine c_gemv
    subroutine c_path_name(name, len) bind(c, name='pykd_f32_path_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_path_name
    subroutine c_gemm_tile_name(name, len) bind(c, name='pykd_f32_gemm_tile_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_gemm_tile_name
    subroutine c_gemv_nobias(n_out, n_in, w, x, j0, j1, y) bind(c, name='pykd_f32_gemv_nobias')
      import :: c_int, c_float
      integer(c_int), value :: n_out, n_in, j0, j1
      real(c_float), intent(in) :: w(*), x(*)
      real(c_float), intent(inout) :: y(*)
    end subroutine c_gemv_nobias
    !> fortran/kernels/pykd_dense_gemm.c: y = act(w x + b) for n samples, one
    !! fused multiply-add per term in input order on every path (bias and
    !! identity/relu fused); work: a panel of W (GEMM_PANEL_OUTPUTS x n_in).
    subroutine c_gemm(n_out, n_in, n, w, x, b, act, y, work, work_words) &
        bind(c, name='pykd_f32_gemm')
      import :: c_int, c_float, c_long
      integer(c_int), value :: n_out, n_in, n, act
      real(c_float), intent(in) :: w(*), x(*), b(*)
      real(c_float), intent(inout) :: y(*), work(*)
      integer(c_long), value :: work_words
    end subroutine c_gemm
    !> The words of work pykd_f32_gemm packs into for n_in inputs.
    pure integer(c_long) function c_gemm_words(n_in) bind(c, name='pykd_f32_gemm_words')
      import :: c_int, c_long
      integer(c_int), value :: n_in
    end function c_gemm_words
  end interface

  !> From 2 samples the layer runs pykd_dense_gemm.c (sgemm before), on the
  !! calling thread: every batch of 2 or more gives each sample the same
  !! bits, whatever the batch size, the slice a thread takes or the thread
  !! count (docs/performance.md, "Batch 256").
  integer, parameter :: GEMM_MIN_BATCH = 2

  type, extends(pykd_layer_t) :: dense_layer_t
  contains
    procedure, nopass :: name => dense_name
    procedure, nopass :: forward => dense_forward
    procedure, nopass :: workspace_words => dense_workspace
    procedure, nopass :: scan_record => dense_scan
    procedure, nopass :: load_record => dense_load
    procedure, nopass :: record_bytes => dense_bytes
    procedure, nopass :: write_record => dense_write
    procedure, nopass :: check => dense_check
    procedure, nopass :: check_row => dense_check_row
  end type dense_layer_t

contains

  !> The CPU path of the one-sample product in this process (portable, avx2
  !! or avx512; PYKD_DENSE_PATH forces one the CPU has).
  function dense_path_name() result(name)
    character(len=16) :: name
    character(kind=c_char) :: buf(16)
    call c_path_name(buf, 16_c_int)   ! blank-padded by the C side
    name = transfer(buf, name)
  end function dense_path_name

  !> The avx512 batch product's tile in this process ("4x6" or "8x3";
  !! PYKD_DENSE_TILE forces one).
  function dense_tile_name() result(name)
    character(len=16) :: name
    character(kind=c_char) :: buf(16)
    call c_gemm_tile_name(buf, 16_c_int)
    name = transfer(buf, name)
  end function dense_tile_name

  pure function dense_name() result(s)
    character(len=:), allocatable :: s
    s = 'dense'
  end function dense_name

  !> y = act(w x + b): one sample through pykd_f32_gemv on this thread (no
  !! BLAS or OpenMP wake-up); more through pykd_f32_gemm on this thread
  !! (bits independent of the batch size and the thread count).
  subroutine dense_forward(row, f32, i8, i32, n, x, y, work, stat)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(in) :: n
    real(real32), intent(in) :: x(row(COL_N_IN), n)
    real(real32), intent(out) :: y(row(COL_N_OUT), n)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat
    integer :: n_in, n_out
    integer(int64) :: off

    n_in = int(row(COL_N_IN)); n_out = int(row(COL_N_OUT)); off = row(COL_F32_OFF)
    stat = PYKD_OK
    if (n == 1) then
      call dense_rows(row, f32, x, 0, n_out, y)
      return
    end if
    call c_gemm(int(n_out, c_int), int(n_in, c_int), int(n, c_int), f32(off + 1), x, &
                f32(off + row(COL_N_IN) * n_out + 1), int(row(COL_ACT), c_int), y, work, &
                int(dense_workspace(row, n), c_long))
    if (row(COL_ACT) /= ACT_IDENTITY .and. row(COL_ACT) /= ACT_RELU) &
      call apply_activation(int(row(COL_ACT)), n_out, n, y)
  end subroutine dense_forward

  !> Outputs j0+1 .. j1 of one sample, y(j) = act(sum_i w(j, i) x(i) + b(j)),
  !! summed in input order (the bits do not depend on the range a thread
  !! takes). Thread-safe; the caller's threads may split the outputs.
  subroutine dense_rows(row, f32, x, j0, j1, y)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    real(real32), intent(in) :: x(row(COL_N_IN))
    integer, intent(in) :: j0, j1
    real(real32), intent(inout) :: y(row(COL_N_OUT))
    integer(int64) :: off
    integer :: act

    if (j1 <= j0) return
    off = row(COL_F32_OFF); act = int(row(COL_ACT))
    call c_gemv(int(row(COL_N_OUT), c_int), int(row(COL_N_IN), c_int), f32(off + 1), x, &
                int(j0, c_int), int(j1, c_int), f32(off + row(COL_N_IN) * row(COL_N_OUT) + 1), &
                int(act, c_int), y)
    if (act /= ACT_IDENTITY .and. act /= ACT_RELU) call apply_activation(act, j1 - j0, 1, y(j0 + 1:j1))
  end subroutine dense_rows

  !> y = act(w x + b) for one sample on this thread (pykd_f32_gemv; bits
  !! as dense_rows), or y = w x without b (then act is ignored). For other
  !! kinds' factors (low_rank).
  subroutine one_sample_product(n_out, n_in, w, x, y, b, act)
    integer, intent(in) :: n_out, n_in
    real(real32), intent(in) :: w(n_out, n_in), x(n_in)
    real(real32), intent(inout) :: y(n_out)
    real(real32), intent(in), optional :: b(n_out)
    integer, intent(in), optional :: act

    if (.not. present(b)) then
      call c_gemv_nobias(int(n_out, c_int), int(n_in, c_int), w, x, 0_c_int, int(n_out, c_int), y)
      return
    end if
    call c_gemv(int(n_out, c_int), int(n_in, c_int), w, x, 0_c_int, int(n_out, c_int), b, &
                int(act, c_int), y)
    if (act /= ACT_IDENTITY .and. act /= ACT_RELU) call apply_activation(act, n_out, 1, y)
  end subroutine one_sample_product

  !> y = act(w x + b) for n samples through pykd_f32_gemm (one FMA per term
  !! in input order: the bits of dense_forward's batches; identity and relu
  !! fused, any other code bias only). work: batch_product_words(n_in)
  !! words. For other kinds' factors (low_rank).
  subroutine batch_product(n_out, n_in, n, w, x, b, act, y, work)
    integer, intent(in) :: n_out, n_in, n, act
    real(real32), intent(in) :: w(*), x(*), b(*)
    real(real32), intent(inout) :: y(*), work(*)

    call c_gemm(int(n_out, c_int), int(n_in, c_int), int(n, c_int), w, x, b, int(act, c_int), &
                y, work, c_gemm_words(int(n_in, c_int)))
  end subroutine batch_product

  pure integer(int64) function batch_product_words(n_in)
    integer, intent(in) :: n_in
    batch_product_words = int(c_gemm_words(int(max(n_in, 0), c_int)), int64)
  end function batch_product_words

  !> pykd_f32_gemm's panel of W from GEMM_MIN_BATCH samples, else nothing.
  pure integer(int64) function dense_workspace(row, n)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: n
    dense_workspace = 0
    if (n >= GEMM_MIN_BATCH) &
      dense_workspace = int(c_gemm_words(int(max(row(COL_N_IN), 0_int64), c_int)), int64)
  end function dense_workspace

  subroutine dense_scan(version, buf, pos, limit, row, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: limit
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: need, nf
    logical :: ok

    stat = PYKD_ERR_FORMAT
    call sizes_ok(row, ok, msg)
    if (.not. ok) return
    need = 0
    nf = row(COL_N_IN) * row(COL_N_OUT) + row(COL_N_OUT)
    if (.not. take(need, nf, 4, pos, limit, 'W and b', msg)) return
    row(COL_F32_LEN) = nf
    row(COL_I8_LEN) = 0
    row(COL_I32_LEN) = 0
    row(COL_P1:) = 0
    pos = pos + need
    stat = PYKD_OK
  end subroutine dense_scan

  subroutine dense_load(version, buf, pos, row, f32, i8, i32, stat, msg)
    integer, intent(in) :: version
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(inout) :: pos
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer(int32), intent(inout) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: nf

    nf = row(COL_F32_LEN)
    call get_f32(buf, pos, f32(row(COL_F32_OFF) + 1), nf)
    pos = pos + 4 * nf
    call dense_values_ok(row, f32, PYKD_ERR_FORMAT, stat, msg)
  end subroutine dense_load

  integer(int64) function dense_bytes(row, f32, i8, i32)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    dense_bytes = 4 * (row(COL_N_IN) * row(COL_N_OUT) + row(COL_N_OUT))
  end function dense_bytes

  subroutine dense_write(row, f32, i8, i32, buf, pos)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(inout) :: pos
    call put_f32(buf, pos, f32(row(COL_F32_OFF) + 1), row(COL_N_IN) * row(COL_N_OUT) + row(COL_N_OUT))
  end subroutine dense_write

  subroutine dense_check(row, f32, i8, i32, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer(int8), intent(in) :: i8(*)
    integer(int32), intent(in) :: i32(*)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    call dense_check_row(row, stat, msg)
    if (stat == PYKD_OK) call dense_values_ok(row, f32, PYKD_ERR_ARG, stat, msg)
  end subroutine dense_check

  pure subroutine dense_check_row(row, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    logical :: ok
    stat = PYKD_ERR_ARG
    call sizes_ok(row, ok, msg)
    if (ok) call row_expect(row, row(COL_N_IN) * row(COL_N_OUT) + row(COL_N_OUT), 0_int64, 0_int64, &
                            [0_int64, 0_int64, 0_int64, 0_int64], ok, msg)
    if (ok) stat = PYKD_OK
  end subroutine dense_check_row

  !> W and b finite; else `code` with a message.
  subroutine dense_values_ok(row, f32, code, stat, msg)
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: f32(*)
    integer, intent(in) :: code
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    integer(int64) :: off, nw

    off = row(COL_F32_OFF); nw = row(COL_N_IN) * row(COL_N_OUT)
    stat = code
    if (nonfinite_count(nw, f32(off + 1)) > 0) then
      msg = 'W contains NaN or infinite values'
    else if (nonfinite_count(row(COL_N_OUT), f32(off + nw + 1)) > 0) then
      msg = 'b contains NaN or infinite values'
    else
      stat = PYKD_OK
    end if
  end subroutine dense_values_ok

end module pykd_layer_dense
