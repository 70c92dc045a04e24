!> Quantizing a model: every layer becomes a dense_int8 layer.
submodule (pykd_models) pykd_models_quant
  use pykd_int8_kernel, only: int8_pack, int8_packed_words
  implicit none

contains

  !> Every layer becomes a dense_int8 layer, as Python's
  !! pykd.quantize_model: symmetric int8 weights with one scale per output
  !! channel (pykd_quant:quantize_weights, as pykd.quantize_int8(W,
  !! per_channel=True)) of the layer's dense weights (other kinds are
  !! densified first); an int8 layer keeps its q and scale. Without
  !! `calibration`, every layer quantizes its input per sample at run time
  !! (dynamic). With `calibration(n_features, n)` (raw inputs, as predict
  !! takes), each layer stores one input scale, max|input| / 127 over the
  !! batch, its input being computed by the model as it was (static). On
  !! failure the model is unchanged.
  module subroutine pykd_quantize_model(model, stat, errmsg, calibration)
    class(pykd_model), intent(inout) :: model
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), intent(in), optional, contiguous :: calibration(:, :)  !! (n_features, n)
    integer(int64), allocatable :: table(:, :)
    real(real32), allocatable :: f32(:), x_scale(:)
    integer(int8), allocatable :: i8(:)
    integer(int32), allocatable :: i32(:)
    integer(int64) :: nf, ni, n32, n_in, n_out
    integer :: l, nl, ierr, code
    character(len=MSG_LEN) :: msg

    if (.not. model%ok) then
      call fail(PYKD_ERR_ARG, 'the model is not loaded')
      return
    end if
    nl = model%n_layers()
    do l = 1, nl
      if (model%table(COL_N_IN, l) > MAX_IN) then
        call fail(PYKD_ERR_ARG, 'layer '//str(int(l, int64))//' has '//str(model%table(COL_N_IN, l))// &
                  ' inputs; an int8 layer takes at most '//str(int(MAX_IN, int64))// &
                  ' (its int32 sums could overflow)')
        return
      end if
    end do
    allocate (x_scale(nl), source=0.0_real32)
    if (present(calibration)) then
      call calibrate(model, calibration, x_scale, code, msg)
      if (code /= PYKD_OK) then
        call fail(code, msg)
        return
      end if
    end if
    ! The int8 layout: f32 = scale, b, x_scale; i8 = q (n_in, n_out); i32 =
    ! the kernel's packed copy of q.
    allocate (table(N_FIELDS, nl))
    table = 0
    nf = 0; ni = 0; n32 = 0
    do l = 1, nl
      n_in = model%table(COL_N_IN, l); n_out = model%table(COL_N_OUT, l)
      table(COL_KIND:COL_N_OUT, l) = [int(KIND_DENSE_INT8, int64), model%table(COL_ACT, l), n_in, n_out]
      table(COL_F32_OFF:COL_I32_LEN, l) = [nf, 2 * n_out + 1, ni, n_in * n_out, &
                                           n32, int8_packed_words(n_in, n_out)]
      table(COL_P1, l) = merge(QUANT_STATIC, QUANT_DYNAMIC, present(calibration))
      nf = nf + 2 * n_out + 1
      ni = ni + n_in * n_out
      n32 = n32 + table(COL_I32_LEN, l)
    end do
    allocate (f32(max(nf, 1_int64)), i8(max(ni, 1_int64)), i32(max(n32, 1_int64)), stat=ierr)
    if (ierr /= 0) then
      call fail(PYKD_ERR_ALLOC, 'cannot allocate '//str(4 * nf + ni + 4 * n32)//' bytes')
      return
    end if
    f32 = 0
    i8 = 0
    i32 = 0
    do l = 1, nl
      call convert_layer(model, l, table(:, l), x_scale(l), f32, i8, code, msg)
      if (code /= PYKD_OK) then
        call fail(code, 'layer '//str(int(l, int64))//': '//msg)
        return
      end if
      call int8_pack(int(table(COL_N_IN, l)), int(table(COL_N_OUT, l)), i8(table(COL_I8_OFF, l) + 1), &
                     i32(table(COL_I32_OFF, l) + 1))
    end do
    call move_alloc(table, model%table)
    call move_alloc(f32, model%f32)
    call move_alloc(i8, model%i8)
    call move_alloc(i32, model%i32)
    call set_status(PYKD_OK, '', stat, errmsg)

  contains

    subroutine fail(code, text)
      integer, intent(in) :: code
      character(len=*), intent(in) :: text
      call set_status(code, 'pykd_quantize_model: '//text, stat, errmsg)
    end subroutine fail

  end subroutine pykd_quantize_model

  !> Layer l of `model` into its int8 slices of f32 and i8 (row: the new
  !! table column): scale, b, x_scale and q.
  subroutine convert_layer(model, l, row, x_scale, f32, i8, code, msg)
    type(pykd_model), intent(in) :: model
    integer, intent(in) :: l
    integer(int64), intent(in) :: row(N_FIELDS)
    real(real32), intent(in) :: x_scale
    real(real32), intent(inout) :: f32(*)
    integer(int8), intent(inout) :: i8(*)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    real(real32), allocatable :: w(:, :)
    integer(int64) :: fo, io, old, old8, len, n_in, n_out
    integer :: ierr

    fo = row(COL_F32_OFF); io = row(COL_I8_OFF)
    n_in = row(COL_N_IN); n_out = row(COL_N_OUT)
    old = model%table(COL_F32_OFF, l); old8 = model%table(COL_I8_OFF, l)
    len = model%table(COL_F32_LEN, l)
    code = PYKD_OK
    if (model%table(COL_KIND, l) == KIND_DENSE_INT8) then
      ! Kept: scale and b (the first 2 n_out of its f32 slice) and q.
      f32(fo + 1:fo + 2 * n_out) = model%f32(old + 1:old + 2 * n_out)
      i8(io + 1:io + n_in * n_out) = model%i8(old8 + 1:old8 + n_in * n_out)
    else
      if (model%table(COL_KIND, l) == KIND_DENSE) then
        call quantize_slice(int(n_out), int(n_in), model%f32(old + 1), i8(io + 1), f32(fo + 1), code)
      else
        allocate (w(n_out, n_in), stat=ierr)
        if (ierr /= 0) then
          code = PYKD_ERR_ALLOC
          msg = 'cannot allocate its dense weights'
          return
        end if
        call densify(model, l, w, code, msg)
        if (code /= PYKD_OK) return
        call quantize_slice(int(n_out), int(n_in), w, i8(io + 1), f32(fo + 1), code)
      end if
      if (code /= PYKD_OK) then
        msg = 'NaN or infinite weights'
        return
      end if
      ! Every float kind stores b last in its f32 slice (docs/model.md).
      f32(fo + n_out + 1:fo + 2 * n_out) = model%f32(old + len - n_out + 1:old + len)
    end if
    f32(fo + 2 * n_out + 1) = x_scale
  end subroutine convert_layer

  !> w(n_out, n_in) = the dense weights of layer l, of any float kind: its
  !! own forward (activation identity, b = 0) on the columns of the
  !! identity matrix, a chunk at a time. Exact for the kinds whose weights
  !! are stored values (sparse, codebook); low_rank gives U V as its two
  !! products compute it.
  subroutine densify(model, l, w, code, msg)
    type(pykd_model), intent(in) :: model
    integer, intent(in) :: l
    real(real32), intent(out), contiguous :: w(:, :)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    integer, parameter :: CHUNK = 256
    integer(int64) :: t(N_FIELDS, 1), old, len
    real(real32), allocatable :: f(:), eye(:, :), work(:)
    integer :: n_in, nc, c0, j, ierr, bad

    t(:, 1) = model%table(:, l)
    n_in = int(t(COL_N_IN, 1))
    old = t(COL_F32_OFF, 1); len = t(COL_F32_LEN, 1)
    t(COL_ACT, 1) = ACT_IDENTITY
    t(COL_F32_OFF, 1) = 0
    nc = min(CHUNK, n_in)
    allocate (f(max(len, 1_int64)), eye(n_in, nc), stat=ierr)
    if (ierr == 0) allocate (work(max(network_workspace_words(t, nc, 0), 1_int64)), stat=ierr)
    if (ierr /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate the workspace to densify it'
      return
    end if
    f(1:len) = model%f32(old + 1:old + len)
    f(len - t(COL_N_OUT, 1) + 1:len) = 0
    do c0 = 1, n_in, nc
      nc = min(nc, n_in - c0 + 1)
      eye = 0
      do j = 1, nc
        eye(c0 + j - 1, j) = 1
      end do
      call network_forward(t, f, model%i8, model%i32, [0.0_real32], [NORM_NONE, NORM_NONE], &
                           eye(:, 1:nc), 0, w(:, c0:c0 + nc - 1), work, code, bad, msg)
      if (code /= PYKD_OK) return
    end do
  end subroutine densify

  !> Per-output-channel quantization of one dense layer's weights, addressed
  !! in place through explicit shapes (no copy of the slice).
  subroutine quantize_slice(n_out, n_in, w, q, scale, code)
    integer, intent(in) :: n_out, n_in
    real(real32), intent(in) :: w(n_out, n_in)
    integer(int8), intent(out) :: q(n_out, n_in)
    real(real32), intent(out) :: scale(n_out)
    integer, intent(out) :: code
    call quantize_weights(w, q, scale, code)
  end subroutine quantize_slice

  !> x_scale(l) = max|input of layer l| / 127 over the calibration batch for
  !! every layer l, the input of layer l being the normalised batch (l = 1)
  !! or the model's output of layer l - 1.
  subroutine calibrate(model, x, x_scale, code, msg)
    type(pykd_model), intent(in) :: model
    real(real32), intent(in), contiguous :: x(:, :)
    real(real32), intent(out) :: x_scale(:)
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    real(real32), allocatable :: h(:, :), work(:)
    real(real32) :: amax
    integer(int64) :: words, n_in
    integer :: l, n, ierr, bad_layer

    x_scale = 0
    n = size(x, 2)
    code = PYKD_ERR_ARG
    if (size(x, 1) /= model%n_features .or. n < 1) then
      msg = 'calibration must be (n_features = '//str(int(model%n_features, int64))// &
            ', n) with n >= 1, got ('//str(size(x, 1, kind=int64))//', '//str(int(n, int64))//')'
      return
    end if
    if (.not. all(ieee_is_finite(x))) then
      code = PYKD_ERR_NONFINITE
      msg = 'calibration contains NaN or infinite values'
      return
    end if
    words = network_workspace_words(model%table, n, 0)
    allocate (work(max(words, 1_int64)), stat=ierr)
    if (ierr /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate the calibration workspace'
      return
    end if
    do l = 1, model%n_layers()
      n_in = model%table(COL_N_IN, l)
      if (allocated(h)) deallocate (h)
      allocate (h(n_in, n), stat=ierr)
      if (ierr /= 0) then
        code = PYKD_ERR_ALLOC
        msg = 'cannot allocate the calibration activations'
        return
      end if
      if (l == 1) then
        call normalise_input(model, x, h)
      else
        call network_forward(model%table, model%f32, model%i8, model%i32, model%norm, model%norm_kinds, &
                             x, l - 1, h, work, code, bad_layer, msg)
        if (code /= PYKD_OK) return
      end if
      amax = maxval(abs(h))
      ! maxval skips NaN (gfortran): test the activations themselves.
      if (.not. (ieee_is_finite(amax) .and. count(.not. (abs(h) <= huge(amax))) == 0)) then
        code = PYKD_ERR_NONFINITE
        msg = 'the input of layer '//str(int(l, int64))//' is not finite on the calibration batch'
        return
      end if
      ! As pykd_quant's scales: at least the smallest normal number, 1 for all zeros.
      x_scale(l) = merge(max(amax / 127, tiny(amax)), 1.0_real32, amax > 0)
    end do
    code = PYKD_OK
    msg = ''
  end subroutine calibrate

  !> h = (x - mean) / std with the model's input normalisation (or h = x).
  subroutine normalise_input(model, x, h)
    type(pykd_model), intent(in) :: model
    real(real32), intent(in) :: x(:, :)
    real(real32), intent(out) :: h(:, :)
    integer :: j, k
    k = size(x, 1)
    select case (model%norm_kinds(1))
    case (NORM_PER_FEATURE)
      do j = 1, size(x, 2)
        h(:, j) = (x(:, j) - model%norm(1:k)) / model%norm(k + 1:2 * k)
      end do
    case (NORM_SCALAR)
      h = (x - model%norm(1)) / model%norm(2)
    case default
      h = x
    end select
  end subroutine normalise_input

end submodule pykd_models_quant
