!> Quantizing a model: dense float32 layers become dense_int8 layers.
submodule (pykd_models) pykd_models_quant
  implicit none

contains

  !> Replace every dense float32 layer by a dense_int8 layer: symmetric int8
  !! weights with one scale per output channel (pykd_quant:quantize_weights,
  !! as pykd.quantize_int8(W, per_channel=True)). Without `calibration`, the
  !! layers quantize their input per sample at run time (dynamic). With
  !! `calibration(n_features, n)` (raw inputs, as predict takes), each layer
  !! stores one input scale, max|input| / 127 over the batch, its input being
  !! computed by the float32 model (static). Other kinds are kept as they
  !! are. On failure the model is unchanged.
  module subroutine pykd_quantize_model(model, stat, errmsg, calibration)
    class(pykd_model), intent(inout) :: model
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), intent(in), optional, contiguous :: calibration(:, :)  !! (n_features, n)
    integer(int64), allocatable :: table(:, :)
    real(real32), allocatable :: f32(:), x_scale(:)
    integer(int8), allocatable :: i8(:)
    integer(int64) :: nf, ni, n_in, n_out
    integer :: l, nl, ierr, code
    character(len=MSG_LEN) :: msg

    if (.not. model%ok) then
      call fail(PYKD_ERR_ARG, 'the model is not loaded')
      return
    end if
    nl = model%n_layers()
    do l = 1, nl
      if (model%table(COL_KIND, l) == KIND_DENSE .and. model%table(COL_N_IN, l) > MAX_IN) then
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
    ! New buffer lengths: a dense layer becomes scale, b, x_scale and q.
    table = model%table
    nf = 0; ni = 0
    do l = 1, nl
      n_in = table(COL_N_IN, l); n_out = table(COL_N_OUT, l)
      if (table(COL_KIND, l) == KIND_DENSE) then
        table(COL_KIND, l) = KIND_DENSE_INT8
        table(COL_F32_LEN, l) = 2 * n_out + 1
        table(COL_I8_LEN, l) = n_in * n_out
        table(COL_P1, l) = merge(QUANT_STATIC, QUANT_DYNAMIC, present(calibration))
      end if
      table(COL_F32_OFF, l) = nf
      table(COL_I8_OFF, l) = ni
      nf = nf + table(COL_F32_LEN, l)
      ni = ni + table(COL_I8_LEN, l)
    end do
    allocate (f32(max(nf, 1_int64)), i8(max(ni, 1_int64)), stat=ierr)
    if (ierr /= 0) then
      call fail(PYKD_ERR_ALLOC, 'cannot allocate '//str(4 * nf + ni)//' bytes')
      return
    end if
    f32 = 0
    i8 = 0
    do l = 1, nl
      call convert_layer(l, code, msg)
      if (code /= PYKD_OK) then
        call fail(code, msg)
        return
      end if
    end do
    call move_alloc(table, model%table)
    call move_alloc(f32, model%f32)
    call move_alloc(i8, model%i8)
    call set_status(PYKD_OK, '', stat, errmsg)

  contains

    !> Fill layer l's new slices: quantized from its dense slice, or copied.
    subroutine convert_layer(l, code, msg)
      integer, intent(in) :: l
      integer, intent(out) :: code
      character(len=*), intent(out) :: msg
      integer(int64) :: fo, io, old, nw
      associate (row => table(:, l))
        fo = row(COL_F32_OFF); io = row(COL_I8_OFF)
        old = model%table(COL_F32_OFF, l)
        code = PYKD_OK
        msg = ''
        if (model%table(COL_KIND, l) /= KIND_DENSE) then
          f32(fo + 1:fo + row(COL_F32_LEN)) = model%f32(old + 1:old + row(COL_F32_LEN))
          associate (o8 => model%table(COL_I8_OFF, l))
            i8(io + 1:io + row(COL_I8_LEN)) = model%i8(o8 + 1:o8 + row(COL_I8_LEN))
          end associate
          return
        end if
        nw = row(COL_N_IN) * row(COL_N_OUT)
        ! dense: W (n_in, n_out), b; dense_int8: scale, b, x_scale and q (n_in, n_out).
        call quantize_slice(int(row(COL_N_OUT)), int(row(COL_N_IN)), model%f32(old + 1), &
                            i8(io + 1), f32(fo + 1), code)
        if (code /= PYKD_OK) then
          msg = 'layer '//str(int(l, int64))//' has NaN or infinite weights'
          return
        end if
        f32(fo + row(COL_N_OUT) + 1:fo + 2 * row(COL_N_OUT)) = model%f32(old + nw + 1:old + nw + row(COL_N_OUT))
        f32(fo + 2 * row(COL_N_OUT) + 1) = x_scale(l)
      end associate
    end subroutine convert_layer

    subroutine fail(code, text)
      integer, intent(in) :: code
      character(len=*), intent(in) :: text
      call set_status(code, 'pykd_quantize_model: '//text, stat, errmsg)
    end subroutine fail

  end subroutine pykd_quantize_model

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
  !! every dense layer l (0 for the others), the input of layer l being the
  !! normalised batch (l = 1) or the float32 model's output of layer l - 1.
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
      if (model%table(COL_KIND, l) /= KIND_DENSE) cycle
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
      if (.not. ieee_is_finite(amax)) then
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
