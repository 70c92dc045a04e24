!> Fortran-only tests of the model API (pykd_models): building from MLP
!! parameters and from arrays, the file layout byte by byte, save/load round
!! trips, version-1 files, int8 quantization (dynamic and static), bad files,
!! errors without `stat`, concurrent predictions, and a small distillation
!! run. The layer kinds' own round trips are in test_kinds.f90.
!! Files are written to the working directory and removed afterwards.
program test_model
  use iso_fortran_env, only: real32, real64, int8, int32, int64
  use ieee_arithmetic, only: ieee_is_nan, ieee_value, ieee_positive_inf, ieee_quiet_nan, ieee_rint
  !$ use omp_lib, only: omp_get_thread_num, omp_get_max_threads
  use pykd
  use iso_c_binding, only: c_loc, c_intptr_t
  use pykd_crc32, only: crc32
  use pykd_random, only: uniform01
  use test_harness, only: check, finish
  use test_files, only: uniforms, delete, read_all, write_all, fix_crc, put32, putf, get32, same_arrays
  implicit none

  integer, parameter :: SIZES(4) = [12, 16, 8, 5], ACTS(3) = [ACT_RELU, ACT_TANH, ACT_IDENTITY]
  integer, parameter :: RELUS(3) = [ACT_RELU, ACT_RELU, ACT_IDENTITY]
  character(len=*), parameter :: FILE = 'test_model_tmp.pykd', BAD = 'test_model_bad.pykd', &
                                 AGAIN = 'test_model_again.pykd'
  real(real32), allocatable :: params(:)

  params = uniforms(int(mlp_param_count(SIZES, 0, 0)), 1_int64, 0.6)

  call test_crc32()
  call test_from_params()
  call test_output_norm()
  call test_layout()
  call test_round_trip()
  call test_version1()
  call test_int8()
  call test_static_int8()
  call test_from_arrays()
  call test_every_kind()
  call test_bad_files()
  call test_truncation_everywhere()
  call test_not_regular()
  call test_errors()
  call test_concurrent()
  call test_distill()
  call test_split_step()
  call delete(FILE)
  call delete(BAD)
  call delete(AGAIN)

  call finish('Fortran model')

contains

  subroutine test_crc32()
    character(len=9), parameter :: DIGITS = '123456789'
    integer(int32), parameter :: EXPECT = int(int(z'CBF43926', int64) - 2_int64**32, int32)
    call check(crc32(transfer(DIGITS, 0_int8, 9)) == EXPECT, 'crc32("123456789") = 0xCBF43926')
    call check(crc32([integer(int8) ::]) == 0, 'crc32 of no bytes = 0')
  end subroutine test_crc32

  !> A model built from MLP parameters predicts exactly what mlp_forward does
  !! on the normalised input; the accessors describe it.
  subroutine test_from_params()
    type(pykd_model) :: m
    real(real32) :: x(12, 37), xn(12, 37), ref(5, 37), logits(5, 37), mean(12), std(12)
    integer :: stat, j

    x = reshape(uniforms(size(x), 2_int64, 3.0), shape(x))
    mean = uniforms(12, 3_int64, 0.5)
    std = 1.5 + uniforms(12, 4_int64, 1.0)
    do j = 1, size(x, 2)
      xn(:, j) = (x(:, j) - mean) / std
    end do
    call mlp_forward(SIZES, ACTS, params, xn, ref, stat=stat)
    call pykd_model_from_params(SIZES, ACTS, params, m, mean, std, '{"origin": "test"}', stat=stat)
    call check(stat == PYKD_OK .and. m%ok .and. all(m%norm_kinds == [NORM_PER_FEATURE, NORM_NONE]), &
               'from_params builds a model')
    call check(m%n_layers() == 3 .and. m%layer_kind(1) == 'dense' .and. m%layer_kind(4) == '' &
               .and. m%layer_activation(2) == 'tanh' .and. all(m%layer_sizes() == SIZES) &
               .and. m%n_params() == size(params), 'accessors: n_layers, layer_kind, layer_activation, '// &
               'layer_sizes, n_params')
    call check(same_arrays(m%f32, params) .and. all(m%table(COL_F32_OFF, :) == [0, 208, 344]), &
               'from_params: f32 is the flat MLP buffer, the table points into it')
    call pykd_predict(m, x, logits, stat)
    ! mlp_forward (the training kernels) may vectorize tanh with glibc's SIMD
    ! variants; network_forward calls the scalar function (pykd_activation).
    call check(stat == PYKD_OK .and. maxval(abs(logits - ref)) <= 1e-6 * maxval(abs(ref)), &
               'predict = mlp_forward on normalised input')
    call m%predict(x, logits, stat)
    call check(stat == PYKD_OK .and. maxval(abs(logits - ref)) <= 1e-6 * maxval(abs(ref)), 'type-bound predict')
    ! mlp_forward's products are OpenBLAS's sgemm, whose summation order
    ! depends on the kernels OpenBLAS picks for the CPU (Prescott's SSE3
    ! kernels, no FMA, on CPUs it does not know); predict's are pykd's own.
    ! So the two agree to rounding, not bit for bit.
    call pykd_model_from_params(SIZES, [ACT_RELU, ACT_RELU, ACT_IDENTITY], params, m, mean, std, stat=stat)
    call mlp_forward(SIZES, [ACT_RELU, ACT_RELU, ACT_IDENTITY], params, xn, ref, stat=stat)
    call pykd_predict(m, x, logits, stat)
    call check(stat == PYKD_OK .and. maxval(abs(logits - ref)) <= 1e-6 * maxval(abs(ref)), &
               'relu model: predict = mlp_forward to rounding')
    ! sigmoid, gelu and silu: mlp_forward (the training step's forward) runs
    ! pykd_activation, the inference kernel.
    call pykd_model_from_params(SIZES, [ACT_GELU, ACT_SILU, ACT_SIGMOID], params, m, mean, std, stat=stat)
    call mlp_forward(SIZES, [ACT_GELU, ACT_SILU, ACT_SIGMOID], params, xn, ref, stat=stat)
    call pykd_predict(m, x, logits, stat)
    call check(stat == PYKD_OK .and. maxval(abs(logits - ref)) <= 1e-6 .and. all(ref > 0 .and. ref < 1), &
               'gelu/silu/sigmoid model: predict = mlp_forward to rounding')
    call m%free()
    call check(.not. m%ok .and. .not. allocated(m%table) .and. m%n_layers() == 0, 'free releases the model')
    call pykd_model_from_params(SIZES, ACTS, params(2:), m, stat=stat)
    call check(stat == PYKD_ERR_ARG .and. .not. m%ok, 'from_params rejects a wrong parameter count')
    call pykd_model_from_params(SIZES, [1, 2, 9], params, m, stat=stat)
    call check(stat == PYKD_ERR_ARG .and. .not. m%ok, 'from_params rejects an unknown activation')
    call pykd_model_from_params(SIZES, ACTS, params, m, mean, -std, stat=stat)
    call check(stat == PYKD_ERR_ARG, 'from_params rejects std <= 0')
    call pykd_model_from_params(SIZES, ACTS, params, m, metadata='[1]', stat=stat)
    call check(stat == PYKD_ERR_ARG .and. index(m%errmsg, 'JSON object') > 0, &
               'from_params rejects metadata that is not a JSON object: '//trim(m%errmsg))
  end subroutine test_from_params

  !> Output normalisation: predict returns y * std + mean, in physical units.
  subroutine test_output_norm()
    type(pykd_model) :: m, r
    real(real32) :: x(12, 9), ref(5, 9), logits(5, 9), om(5), os(5), back(5, 9)
    integer :: stat, j
    character(len=256) :: msg

    x = reshape(uniforms(size(x), 21_int64, 1.0), shape(x))
    om = uniforms(5, 22_int64, 10.0)
    os = 2 + uniforms(5, 23_int64, 1.0)
    ! The reference: the same model without output normalisation.
    call pykd_model_from_params(SIZES, RELUS, params, m, stat=stat)
    call pykd_predict(m, x, ref, stat)
    do j = 1, 9
      ref(:, j) = ref(:, j) * os + om
    end do
    call pykd_model_from_params(SIZES, RELUS, params, m, out_mean=om, out_std=os, stat=stat, errmsg=msg)
    call check(stat == PYKD_OK .and. all(m%norm_kinds == [NORM_NONE, NORM_PER_FEATURE]), &
               'per-output normalisation: '//trim(msg))
    call pykd_predict(m, x, logits, stat)
    call check(stat == PYKD_OK .and. all(logits == ref), 'predict undoes the output normalisation, bit for bit')
    call pykd_save_model(m, FILE, stat)
    call pykd_load_model(FILE, r, stat, msg)
    call pykd_predict(r, x, back, stat)
    call check(stat == PYKD_OK .and. all(r%norm_kinds == m%norm_kinds) .and. same_arrays(r%norm, m%norm) &
               .and. all(back == ref), 'output normalisation survives save and load')
    call pykd_model_from_params(SIZES, ACTS, params, m, [1.0_real32], [2.0_real32], out_mean=[3.0_real32], &
                                out_std=[4.0_real32], stat=stat)
    call check(stat == PYKD_OK .and. all(m%norm_kinds == [NORM_SCALAR, NORM_SCALAR]) .and. &
               same_arrays(m%norm, [1.0_real32, 2.0_real32, 3.0_real32, 4.0_real32]), &
               'scalar input and output normalisation: norm = [mean, std, out_mean, out_std]')
  end subroutine test_output_norm

  !> The writer's bytes follow docs/format.md field by field.
  subroutine test_layout()
    integer, parameter :: S(3) = [3, 4, 2]
    type(pykd_model) :: m
    integer(int8), allocatable :: b(:)
    real(real32), allocatable :: p(:)
    real(real32) :: mean(3), std(3)
    integer(int64) :: q, n
    integer :: stat
    logical :: ok

    p = uniforms(3 * 4 + 4 + 4 * 2 + 2, 30_int64, 1.0)
    mean = [1, 2, 3]; std = [4, 5, 6]
    call pykd_model_from_params(S, [ACT_GELU, ACT_SILU], p, m, mean, std, '{}', stat=stat)
    call pykd_save_model(m, FILE, stat)
    call read_all(FILE, b)
    n = size(b, kind=int64)
    ok = all(b(1:8) == transfer('PYKDMDL'//achar(0), 0_int8, 8)) .and. get32(b, 8) == 2 &
         .and. get32(b, 12) == 2 .and. get32(b, 16) == 3 .and. get32(b, 20) == 2 .and. get32(b, 24) == 1 &
         .and. all(transfer(b(29:52), 0.0_real32, 6) == [mean, std]) &
         .and. get32(b, 52) == 0 .and. get32(b, 56) == 2 .and. all(b(61:62) == transfer('{}', 0_int8, 2))
    q = 62
    ok = ok .and. get32(b, q) == KIND_DENSE .and. get32(b, q + 4) == ACT_GELU .and. get32(b, q + 8) == 3 &
         .and. get32(b, q + 12) == 4 .and. get32(b, q + 16) == 64 .and. get32(b, q + 20) == 0 &
         .and. all(transfer(b(q + 25:q + 88), 0.0_real32, 16) == p(1:16))
    q = q + 24 + 64
    ok = ok .and. get32(b, q) == KIND_DENSE .and. get32(b, q + 4) == ACT_SILU .and. get32(b, q + 16) == 40 &
         .and. all(transfer(b(q + 25:q + 64), 0.0_real32, 10) == p(17:26))
    q = q + 24 + 40
    ok = ok .and. n == q + 12 .and. get32(b, q) == iand(int(crc32(b(1:q)), int64), int(z'FFFFFFFF', int64)) &
         .and. all(b(q + 5:q + 12) == transfer('PYKDEND'//achar(0), 0_int8, 8))
    call check(stat == PYKD_OK .and. ok, 'the saved bytes follow docs/format.md field by field')
  end subroutine test_layout

  !> save then load gives back the same arrays and logits; a second save
  !! writes the same bytes.
  subroutine test_round_trip()
    type(pykd_model) :: m, r
    type(pykd_workspace) :: ws
    integer(int8), allocatable :: b1(:), b2(:)
    real(real32) :: x(12, 9), a(5, 9), b(5, 9)
    integer :: stat
    character(len=256) :: msg

    x = reshape(uniforms(size(x), 5_int64, 2.0), shape(x))
    call pykd_model_from_params(SIZES, ACTS, params, m, [0.25_real32], [2.0_real32], &
                                metadata='{"name": "caf'//char(195)//char(169)//'", "n": [1, 2.5e3]}', stat=stat)
    call check(all(m%norm_kinds == [NORM_SCALAR, NORM_NONE]), 'scalar normalisation')
    call pykd_save_model(m, FILE, stat, msg)
    call check(stat == PYKD_OK, 'save: '//trim(msg))
    call pykd_load_model(FILE, r, stat, msg)
    call check(stat == PYKD_OK .and. r%ok, 'load what save wrote: '//trim(msg))
    call check(r%n_features == 12 .and. r%n_outputs == 5 .and. same_layers(r, m) &
               .and. same_arrays(r%norm, m%norm) &
               .and. all(r%norm_kinds == m%norm_kinds) .and. r%metadata == m%metadata, &
               'round trip keeps the table, buffers, normalisation and metadata')
    call pykd_predict(m, x, a, stat, work=ws)
    call pykd_predict(r, x, b, stat, work=ws)
    call check(stat == PYKD_OK .and. all(a == b), 'round trip gives the same logits (reused workspace)')
    call pykd_save_model(r, AGAIN, stat)
    call read_all(FILE, b1)
    call read_all(AGAIN, b2)
    call check(size(b1) == size(b2) .and. all(b1 == b2), 'load + save reproduces the file byte for byte')
    call r%load(FILE, stat)
    call check(stat == PYKD_OK .and. r%ok, 'type-bound load')
  end subroutine test_round_trip

  !> A version-1 file (no output normalisation, no payload_bytes, int8
  !! records without the quant field), built byte by byte, still loads.
  subroutine test_version1()
    type(pykd_model) :: m, r
    integer(int8), allocatable :: b(:)
    real(real32) :: w(4, 3), b1(4), scale(2), b2(2), x(3, 6), h(4, 6), ref(2, 6), got(2, 6)
    integer(int8) :: q(2, 4)
    integer(int64) :: pos
    integer :: stat, j
    character(len=256) :: msg

    ! Multiples of 1/4: layer 1 is exact whatever the summation order.
    w = reshape(real([(mod(j * 7, 9) - 4, j = 1, 12)], real32) / 4, [4, 3])
    b1 = [0.25, -0.5, 0.0, 1.0]
    q = reshape(int([(mod(j * 5, 11) - 5, j = 1, 8)], int8), [2, 4])
    scale = [0.5, 0.25]; b2 = [0.125, -1.0]
    allocate (b(1000))
    pos = 0
    b(1:8) = transfer('PYKDMDL'//achar(0), 0_int8, 8); pos = 8
    call put32(b, pos, [1, 2, 3, 2, NORM_SCALAR])
    call putf(b, pos, [0.5_real32, 2.0_real32])
    call put32(b, pos, [2])
    b(pos + 1:pos + 2) = transfer('{}', 0_int8, 2); pos = pos + 2
    call put32(b, pos, [KIND_DENSE, ACT_RELU, 3, 4])
    call putf(b, pos, [reshape(w, [12]), b1])
    call put32(b, pos, [KIND_DENSE_INT8, ACT_IDENTITY, 4, 2])
    b(pos + 1:pos + 8) = reshape(q, [8]); pos = pos + 8
    call putf(b, pos, [scale, b2])
    call put32(b, pos, [0])
    b(pos + 1:pos + 8) = transfer('PYKDEND'//achar(0), 0_int8, 8); pos = pos + 8
    call fix_crc(b(1:pos))
    call write_all(BAD, b(1:pos))
    call pykd_load_model(BAD, m, stat, msg)
    call check(stat == PYKD_OK .and. m%n_layers() == 2 .and. m%layer_kind(2) == 'dense_int8' &
               .and. all(m%norm_kinds == [NORM_SCALAR, NORM_NONE]) .and. m%metadata == '{}', &
               'a version-1 file loads: '//trim(msg))
    call check(all(m%table(COL_P1, :) == QUANT_DYNAMIC), 'version-1 int8 layers quantize dynamically')
    x = reshape(real([(mod(j * 3, 13) - 6, j = 1, 18)], real32), [3, 6])
    do j = 1, 6
      h(:, j) = max(matmul(w, (x(:, j) - 0.5) / 2) + b1, 0.0)
    end do
    call int8_ref(h, q, scale, b2, 0.0_real32, ref)
    call pykd_predict(m, x, got, stat)
    call check(stat == PYKD_OK .and. all(got == ref), 'version-1 model predicts as a hand-computed reference')
    call pykd_save_model(m, FILE, stat)
    call read_all(FILE, b)
    call pykd_load_model(FILE, r, stat)
    call check(get32(b, 8) == 2 .and. stat == PYKD_OK .and. same_layers(r, m), 'a version-1 model is saved as version 2')
    call read_all(BAD, b)
    call v1_bad(b, 42_int64, KIND_SPARSE_CSR, 'layer 1: unknown kind 3 (for a version 1 file)')
    call v1_bad(b, 46_int64, ACT_SIGMOID, 'layer 1: unknown activation 3 (for a version 1 file)')
    call v1_bad(b, 24_int64, 7, 'norm: unknown norm kind 7')
  end subroutine test_version1

  subroutine v1_bad(good, offset, value, phrase)
    integer(int8), intent(in) :: good(:)
    integer(int64), intent(in) :: offset
    integer, intent(in) :: value
    character(len=*), intent(in) :: phrase
    call expect_patched(good, offset, value, phrase)
  end subroutine v1_bad

  !> Independent int8 reference (float64 where it is exact): per-sample
  !! (x_scale = 0) or static input scale, q^T qx exact, one float32 rescale.
  subroutine int8_ref(x, q, scale, b, x_scale, y)
    real(real32), intent(in) :: x(:, :), scale(:), b(:), x_scale
    integer(int8), intent(in) :: q(:, :)   !! (n_out, n_in)
    real(real32), intent(out) :: y(:, :)
    real(real32) :: sx, inv, qx(size(x, 1))
    integer :: j, i
    real(real64) :: acc
    do j = 1, size(x, 2)
      sx = x_scale
      if (sx == 0) sx = maxval(abs(x(:, j))) / 127
      if (sx == 0) sx = 1
      inv = 1 / sx
      qx = min(max(ieee_rint(x(:, j) * inv), -127.0), 127.0)
      do i = 1, size(q, 1)
        acc = sum(real(q(i, :), real64) * qx)
        y(i, j) = real(acc, real32) * (scale(i) * sx) + b(i)
      end do
    end do
  end subroutine int8_ref

  !> Dynamic int8: quantized weights, exact int32 products, per-sample
  !! activation scales; a sample's logits do not depend on its batch.
  subroutine test_int8()
    type(pykd_model) :: m, r
    real(real32) :: x(12, 50), f(5, 50), q(5, 50), q1(5, 1)
    real(real32), allocatable :: w(:, :)
    integer :: stat, l
    logical :: same

    x = reshape(uniforms(size(x), 6_int64, 2.0), shape(x))
    call pykd_model_from_params(SIZES, ACTS, params, m, stat=stat)
    call pykd_predict(m, x, f, stat)
    call pykd_quantize_model(m, stat)
    call check(stat == PYKD_OK .and. all([(m%layer_kind(l) == 'dense_int8', l = 1, 3)]) &
               .and. all(m%table(COL_P1, :) == QUANT_DYNAMIC), 'quantize_model turns every layer into int8')
    call check(all(abs(m%i8) <= 127) .and. size(m%f32) == 2 * (16 + 8 + 5) + 3 .and. size(m%i8) == &
               12 * 16 + 16 * 8 + 8 * 5, 'int8 weights in [-127, 127]; f32 holds scale, b, x_scale only')
    ! Layer 1's q and scale are quantize_weights of its W.
    allocate (w(16, 12))
    w = reshape(params(1:192), [16, 12])
    same = all(m%f32(1:16) == maxval(abs(w), 2) / 127) .and. &
           all(m%f32(17:32) == params(193:208)) .and. m%f32(33) == 0
    call check(same, 'layer 1: scale = max|W| / 127 per output, b kept, x_scale 0 (dynamic)')
    call pykd_predict(m, x, q, stat)
    call check(stat == PYKD_OK .and. maxval(abs(q - f)) < 0.05 * maxval(abs(f)), 'int8 logits close to float32')
    call pykd_predict(m, x(:, 17:17), q1, stat)
    call check(all(q1(:, 1) == q(:, 17)), 'int8 result of a sample does not depend on its batch')
    call pykd_save_model(m, FILE, stat)
    call pykd_load_model(FILE, r, stat)
    call check(stat == PYKD_OK .and. same_layers(r, m), 'int8 round trip keeps the table, q, scale and b')
    call pykd_predict(r, x, f, stat)
    call check(all(f == q), 'int8 round trip gives identical logits')
    x(3, 4) = ieee_value(1.0_real32, ieee_quiet_nan)
    call pykd_predict(r, x, f, stat)
    call check(stat == PYKD_ERR_NONFINITE, 'NaN input to an int8 layer: PYKD_ERR_NONFINITE')
  end subroutine test_int8

  !> Static int8: x_scale = max|layer input| / 127 over the calibration
  !! batch, from the float32 model; logits match an independent reference.
  subroutine test_static_int8()
    integer, parameter :: S(3) = [12, 16, 5]
    type(pykd_model) :: m, f
    real(real32), allocatable :: p(:)
    real(real32) :: cal(12, 40), x(12, 7), xn(12, 40), h(16, 40), xs(2), hx(16, 7), ref(5, 7), got(5, 7)
    integer(int8) :: q2(5, 16)
    integer :: stat, j
    character(len=256) :: msg

    p = uniforms(12 * 16 + 16 + 16 * 5 + 5, 40_int64, 0.5)
    cal = reshape(uniforms(size(cal), 41_int64, 3.0), shape(cal))
    x = reshape(uniforms(size(x), 42_int64, 2.0), shape(x))
    call pykd_model_from_params(S, [ACT_RELU, ACT_IDENTITY], p, f, [0.5_real32], [1.5_real32], stat=stat)
    m = f
    call pykd_quantize_model(m, stat, msg, calibration=cal)
    call check(stat == PYKD_OK .and. all(m%table(COL_P1, :) == QUANT_STATIC), 'static quantization: '//trim(msg))
    xn = (cal - 0.5) / 1.5
    ! Layer 2's input: the float32 model's layer 1 (its kernel, not BLAS's).
    call pykd_model_from_params(S(1:2), [ACT_RELU], p(1:12 * 16 + 16), f, [0.5_real32], [1.5_real32], stat=stat)
    call pykd_predict(f, cal, h, stat)
    xs = [maxval(abs(xn)) / 127, maxval(abs(h)) / 127]
    call check(m%f32(2 * 16 + 1) == xs(1) .and. m%f32(2 * 16 + 1 + 2 * 5 + 1) == xs(2), &
               'x_scale = max|layer input| / 127 over the calibration batch')
    ! Layer 2 from its own q and scale, fed with the int8 layer 1's output.
    call pykd_model_from_params(S(1:2), [ACT_RELU], p(1:12 * 16 + 16), f, [0.5_real32], [1.5_real32], stat=stat)
    call pykd_quantize_model(f, stat, calibration=cal)
    call pykd_predict(f, x, hx, stat)
    q2 = reshape(m%i8(12 * 16 + 1:), [5, 16])
    call int8_ref(hx, q2, m%f32(34:38), m%f32(39:43), xs(2), ref)
    call pykd_predict(m, x, got, stat)
    call check(stat == PYKD_OK .and. all(got == ref), 'static int8 logits equal an independent reference')
    call pykd_save_model(m, FILE, stat)
    call pykd_load_model(FILE, f, stat)
    call check(stat == PYKD_OK .and. same_layers(f, m), &
               'static int8 round trip keeps x_scale')
    cal(1, 1) = ieee_value(1.0_real32, ieee_quiet_nan)
    call pykd_quantize_model(m, stat, msg, calibration=cal)
    call check(stat == PYKD_ERR_NONFINITE, 'calibration with NaN is refused: '//trim(msg))
    call pykd_quantize_model(m, stat, msg, calibration=cal(1:11, :))
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'calibration') > 0, 'calibration of the wrong shape: '//trim(msg))
    j = 0
  end subroutine test_static_int8

  !> pykd_model_from_arrays: a model from its table and buffers, checked.
  subroutine test_from_arrays()
    type(pykd_model) :: m, ref
    integer(int64), allocatable :: t(:, :)
    real(real32) :: x(12, 5), a(5, 5), b(5, 5)
    integer :: stat
    character(len=256) :: msg

    call pykd_model_from_params(SIZES, ACTS, params, ref, stat=stat)
    call pykd_model_from_arrays(ref%table, ref%f32, ref%i8, ref%i32, m, stat=stat, errmsg=msg)
    x = reshape(uniforms(size(x), 50_int64, 1.0), shape(x))
    call pykd_predict(ref, x, a, stat)
    call pykd_predict(m, x, b, stat)
    call check(stat == PYKD_OK .and. m%n_features == 12 .and. m%n_outputs == 5 .and. all(a == b), &
               'from_arrays: the same model as from_params: '//trim(msg))
    t = ref%table
    t(COL_F32_OFF, 3) = size(ref%f32)
    call pykd_model_from_arrays(t, ref%f32, ref%i8, ref%i32, m, stat=stat, errmsg=msg)
    call check(stat == PYKD_ERR_ARG .and. .not. m%ok .and. index(msg, 'layer 3') > 0 .and. &
               index(msg, 'not inside') > 0, 'from_arrays: a slice outside f32: '//trim(msg))
    t = ref%table
    t(COL_N_IN, 2) = 15
    call pykd_model_from_arrays(t, ref%f32, ref%i8, ref%i32, m, stat=stat, errmsg=msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'layer 2') > 0, 'from_arrays: sizes that do not chain: '//trim(msg))
    t = ref%table
    t(COL_KIND, 1) = 77
    call pykd_model_from_arrays(t, ref%f32, ref%i8, ref%i32, m, stat=stat, errmsg=msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'unknown kind 77') > 0, 'from_arrays: unknown kind: '//trim(msg))
    call pykd_model_from_arrays(ref%table, ref%f32, ref%i8, ref%i32, m, norm=[1.0_real32, 0.0_real32], &
                                norm_kinds=[NORM_SCALAR, NORM_NONE], stat=stat, errmsg=msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'std must be > 0') > 0, 'from_arrays: std = 0: '//trim(msg))
  end subroutine test_from_arrays

  !> A model with every kind, built by hand from docs/model.md: it passes
  !! the checks, predicts as a dense float64 reference, and survives save +
  !! load with the same arrays and the same bytes on a second save.
  subroutine test_every_kind()
    type(pykd_model) :: m, r
    integer(int64) :: t(N_FIELDS, 5)
    integer(int8), allocatable :: b1(:), b2(:)
    real(real32), allocatable :: f32(:)
    integer(int8), allocatable :: i8(:)
    integer(int32), allocatable :: i32(:)
    real(real64) :: w1(3, 4), w2(3, 3), w3(2, 3), w4(2, 2), h(4)
    real(real32) :: x(4, 8), got(2, 8), ref(2, 8), u(3, 2), v(2, 3), c3(3), c4(3), h4(2, 8)
    integer(int8) :: q(2, 2)
    integer(int32), allocatable :: packed(:)
    integer :: stat, j, k
    character(len=512) :: msg

    ! Slices back to back in layer order (empty ones at the running offset),
    ! as the loader lays them out.
    t = 0
    ! 1. sparse_csr 4 -> 3 (relu): rows (inputs) 0: {0: 1, 2: -0.5}, 1: {}, 2: {1: 0.25}, 3: {0: 2, 1: -1, 2: 0.5}.
    t(:, 1) = [integer(int64) :: KIND_SPARSE_CSR, ACT_RELU, 4, 3, 0, 9, 0, 0, 0, 11, 6, 0, 0, 0]
    f32 = [1.0, -0.5, 0.25, 2.0, -1.0, 0.5, 0.125, -0.25, 0.5]
    i32 = [0, 2, 2, 3, 6, 0, 2, 1, 0, 1, 2]
    w1 = 0; w1(1, 1) = 1; w1(3, 1) = -0.5; w1(2, 3) = 0.25; w1(:, 4) = [2.0, -1.0, 0.5]
    ! 2. low_rank 3 -> 3, rank 2 (identity): U (3, 2), V (2, 3), b.
    u = reshape([0.5, -1.0, 0.25, 1.0, 0.75, -0.5], [3, 2], order=[2, 1])
    v = reshape([1.0, 0.5, -0.25, -1.0, 0.25, 2.0], [2, 3], order=[2, 1])
    t(:, 2) = [integer(int64) :: KIND_LOW_RANK, ACT_IDENTITY, 3, 3, 9, 15, 0, 0, 11, 0, 2, 0, 0, 0]
    f32 = [f32, reshape(transpose(u), [6]), reshape(transpose(v), [6]), [0.5, 0.0, -0.125]]
    w2 = transpose(matmul(real(u, real64), real(v, real64)))
    ! 3. codebook 3 -> 2, 3 centroids, 2 bits: indices of W (3, 2) row-major 0 1 2 1 0 2.
    c3 = [-0.5, 0.25, 1.5]
    t(:, 3) = [integer(int64) :: KIND_CODEBOOK, ACT_RELU, 3, 2, 24, 5, 0, 2, 11, 0, 3, 2, 0, 0]
    f32 = [f32, c3, [0.25, -0.5]]
    i8 = [int(z'64', int8), int(z'08', int8)]
    w3 = real(reshape([c3(1), c3(2), c3(3), c3(2), c3(1), c3(3)], [2, 3]), real64)
    ! 4. sparse_codebook 2 -> 2: row 0: {1: c(1)}, row 1: {0: c(0), 1: c(2)}; 3 codes, 2 bits.
    c4 = [0.75, -1.25, 0.5]
    t(:, 4) = [integer(int64) :: KIND_SPARSE_CODEBOOK, ACT_IDENTITY, 2, 2, 29, 5, 2, 3, 11, 6, 3, 3, 2, 0]
    f32 = [f32, c4, [0.0, 1.0]]
    i8 = [i8, [1_int8, 0_int8, 2_int8]]
    i32 = [i32, [0, 1, 3, 1, 0, 1]]
    w4 = reshape(real([0.0, c4(2), c4(1), c4(3)], real64), [2, 2])
    ! 5. dense_int8 2 -> 2, static input scale 1/32: scale, b, x_scale; q (n_in, n_out) row-major,
    !    which is Fortran's q(n_out, n_in).
    q = reshape([integer(int8) :: 10, -20, 127, -127], [2, 2])
    !    Its i32 slice is the kernel's packed copy of q (int8_pack, int8_packed_words = 32).
    t(:, 5) = [integer(int64) :: KIND_DENSE_INT8, ACT_IDENTITY, 2, 2, 34, 5, 5, 4, 17, 32, QUANT_STATIC, 0, 0, 0]
    f32 = [f32, [0.5, 0.25, 1.0, -2.0, 0.03125]]
    i8 = [i8, reshape(q, [4])]
    allocate (packed(int8_packed_words(2_int64, 2_int64)))
    call int8_pack(2, 2, q, packed)
    i32 = [i32, packed]

    call pykd_model_from_arrays(t, f32, i8, i32, m, norm=[0.5_real32, 2.0_real32], &
                                norm_kinds=[NORM_SCALAR, NORM_NONE], metadata='{"kinds": 5}', stat=stat, errmsg=msg)
    call check(stat == PYKD_OK .and. m%n_layers() == 5 .and. m%layer_kind(4) == 'sparse_codebook', &
               'a model of every kind from its arrays: '//trim(msg))
    call check_kinds_in_parallel(m)
    i32(size(i32) - 3) = i32(size(i32) - 3) + 1
    call pykd_model_from_arrays(t, f32, i8, i32, r, stat=stat, errmsg=msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'packed copy of q') > 0, &
               'a dense_int8 i32 slice that is not the packed copy of q is rejected: '//trim(msg))
    i32(size(i32) - 3) = i32(size(i32) - 3) - 1
    x = reshape(real([(mod(7 * j, 17) - 8, j = 1, 32)], real32) / 4, [4, 8])
    do j = 1, 8
      h = (x(:, j) - 0.5) / 2
      h(1:3) = max(matmul(w1, h) + [0.125, -0.25, 0.5], 0.0_real64)
      h(1:3) = matmul(w2, h(1:3)) + [0.5, 0.0, -0.125]
      h(1:2) = max(matmul(w3, h(1:3)) + [0.25, -0.5], 0.0_real64)
      h4(:, j) = real(matmul(w4, h(1:2)) + [0.0, 1.0], real32)
    end do
    call int8_ref(h4, q, [0.5, 0.25], [1.0, -2.0], 0.03125, ref)
    call pykd_predict(m, x, got, stat, msg)
    call check(stat == PYKD_OK .and. all(got == ref), 'every kind predicts as a float64 reference: '//trim(msg))
    call pykd_save_model(m, FILE, stat, msg)
    call pykd_load_model(FILE, r, stat, msg)
    call check(stat == PYKD_OK .and. same_layers(r, m) .and. r%metadata == m%metadata, &
               'every kind: save + load gives back the same layers: '//trim(msg))
    call check(lines_aligned(r), 'every kind: the loader puts each slice (a sparse layer''s planes) '// &
               'on a 64-byte boundary')
    call pykd_save_model(r, AGAIN, stat)
    call read_all(FILE, b1)
    call read_all(AGAIN, b2)
    call check(size(b1) == size(b2) .and. all(b1 == b2), 'every kind: a second save writes the same bytes')
    ! Quantized: every layer dense_int8, q and scale those of its dense W.
    call pykd_quantize_model(r, stat, msg)
    call check(stat == PYKD_OK .and. all([(r%layer_kind(k) == 'dense_int8', k = 1, 5)]) .and. &
               size(r%i32) == 5 * 32 .and. all(r%table(COL_I32_LEN, :) == 32), &
               'quantize: every kind becomes dense_int8 (i32: the packed copies of q): '//trim(msg))
    call check(int8_of(r, 1, real(w1, real32)) .and. int8_of(r, 2, real(w2, real32)) .and. &
               int8_of(r, 3, real(w3, real32)) .and. int8_of(r, 4, real(w4, real32)) .and. &
               all(r%i8(r%table(COL_I8_OFF, 5) + 1:) == reshape(q, [4])), &
               'quantize: q and scale of each layer are quantize_weights of its dense W; int8 kept')
    ! The checks of each kind catch bad content.
    do k = 1, 4
      call expect_arg(k, t, f32, i8, i32)
    end do
  end subroutine test_every_kind

  !> The kinds' kernels called single-threaded inside an OpenMP region (each
  !! thread its own workspace, as a network run per thread on a slice of
  !! samples calls them): the bits of the same chunks run one after another,
  !! for chunks of 1, 7 and 64 samples (scatter, panel and dense-decode
  !! sparse kernels; register and panel codebook kernels).
  subroutine check_kinds_in_parallel(m)
    type(pykd_model), intent(in) :: m
    integer, parameter :: N = 448
    integer, parameter :: CHUNKS(3) = [1, 7, 64]
    type(pykd_workspace), allocatable :: ws(:)
    real(real32), allocatable :: x(:, :), ref(:, :), par(:, :)
    integer :: nt, k, c, ch, tid, st, n_bad
    character(len=8) :: cs

    allocate (x(4, N), ref(2, N), par(2, N))
    x = reshape(uniforms(size(x), 31_int64, 2.0), shape(x))
    nt = 1
    !$ nt = max(2, omp_get_max_threads())
    allocate (ws(0:nt - 1))
    do k = 1, size(CHUNKS)
      ch = CHUNKS(k)
      do c = 1, N, ch
        call pykd_predict(m, x(:, c:c + ch - 1), ref(:, c:c + ch - 1), st, work=ws(0))
      end do
      par = 0
      n_bad = 0
      !$omp parallel do num_threads(nt) schedule(dynamic) private(tid, st) reduction(+:n_bad)
      do c = 1, N, ch
        tid = 0
        !$ tid = omp_get_thread_num()
        call pykd_predict(m, x(:, c:c + ch - 1), par(:, c:c + ch - 1), st, work=ws(tid))
        if (st /= PYKD_OK) n_bad = n_bad + 1
      end do
      !$omp end parallel do
      write (cs, '(i0)') ch
      call check(n_bad == 0 .and. all(par == ref), 'every kind in an OpenMP loop, chunks of '// &
                 trim(cs)//': the bits of the same chunks run serially')
    end do
  end subroutine check_kinds_in_parallel

  !> Layer l of m is dense_int8 with q and scale = quantize_weights(w).
  logical function int8_of(m, l, w)
    type(pykd_model), intent(in) :: m
    integer, intent(in) :: l
    real(real32), intent(in) :: w(:, :)
    integer(int8) :: q(size(w, 1), size(w, 2))
    real(real32) :: scale(size(w, 1))
    integer(int64) :: fo, io
    call quantize_weights(w, q, scale)
    fo = m%table(COL_F32_OFF, l); io = m%table(COL_I8_OFF, l)
    int8_of = m%table(COL_KIND, l) == KIND_DENSE_INT8 .and. &
              all(m%i8(io + 1:io + size(q)) == reshape(q, [size(q)])) .and. &
              same_arrays(m%f32(fo + 1:fo + size(scale)), scale)
  end function int8_of

  !> A damaged copy of test_every_kind's arrays is refused by from_arrays.
  subroutine expect_arg(case, t, f32, i8, i32)
    integer, intent(in) :: case
    integer(int64), intent(in) :: t(:, :)
    real(real32), intent(in) :: f32(:)
    integer(int8), intent(in) :: i8(:)
    integer(int32), intent(in) :: i32(:)
    type(pykd_model) :: r
    integer(int64), allocatable :: tt(:, :)
    real(real32), allocatable :: ff(:)
    integer(int8), allocatable :: bb(:)
    integer(int32), allocatable :: ii(:)
    character(len=64) :: what
    character(len=512) :: msg
    integer :: stat
    tt = t; ff = f32; bb = i8; ii = i32
    select case (case)
    case (1)
      ii(3) = 1; what = 'sparse_csr indptr not monotone'
    case (2)
      ii(7) = 7; what = 'sparse_csr index >= n_out'
    case (3)
      bb(2) = int(z'0C', int8); what = 'codebook index >= n_codes'
    case (4)
      ff(30) = ieee_value(1.0_real32, ieee_positive_inf); what = 'sparse_codebook centroid inf'
    end select
    call pykd_model_from_arrays(tt, ff, bb, ii, r, stat=stat, errmsg=msg)
    call check(stat == PYKD_ERR_ARG .and. .not. r%ok .and. index(msg, 'layer ') > 0, &
               'from_arrays refuses '//trim(what)//': '//trim(msg))
  end subroutine expect_arg

  !> Every kind of damage gives PYKD_ERR_FORMAT (or _IO) and a message
  !! naming the file.
  subroutine test_bad_files()
    type(pykd_model) :: m
    integer(int8), allocatable :: good(:), b(:)
    integer(int64) :: n, rec
    integer :: stat
    character(len=512) :: msg

    call pykd_model_from_params(SIZES, ACTS, params, m, stat=stat)
    call pykd_save_model(m, FILE, stat)
    call read_all(FILE, good)
    n = size(good, kind=int64)
    rec = 28 + 4 + 4 + 2     ! layer 1's record: header, out_norm, meta_len, '{}'

    call pykd_load_model('no/such/file.pykd', m, stat, msg)
    call check(stat == PYKD_ERR_IO .and. index(msg, 'cannot open') > 0 .and. .not. m%ok, &
               'missing file: '//trim(msg))
    b = good; b(1) = ichar('X', int8)
    call expect_bad(b, 'bad magic')
    b = good; b(9) = 7
    call expect_bad(b, 'unsupported model format version 7 (this pykd reads versions 1 and 2)')
    b = good; b(9) = 0
    call expect_bad(b, 'unsupported model format version 0')
    call expect_bad(good(1:n / 2), 'truncated')
    call expect_bad(good(1:5), 'truncated')
    call expect_bad([integer(int8) ::], 'bad magic')
    b = good; b(n / 2) = not(b(n / 2))
    call expect_bad(b, 'checksum mismatch')
    b = good; b(n - 11:n - 8) = 0
    call expect_bad(b, 'checksum mismatch')
    call expect_bad([good, good(1:3)], 'trailing garbage')
    b = [good(1:n - 12), good(1:3), good(n - 11:n)]; call fix_crc(b)
    call expect_bad(b, '3 unexpected bytes between the last layer and the checksum')
    call expect_patched(good, rec, 9, 'layer 1: unknown kind 9')
    call expect_patched(good, rec, 0, 'layer 1: unknown kind 0')
    call expect_patched(good, rec + 4, ACT_SILU + 1, 'layer 1: unknown activation 6')
    call expect_patched(good, rec, -1, 'layer 1: unknown kind 4294967295')
    call expect_patched(good, rec + 8, 13, 'layer 1 takes 13 inputs but the model has n_features = 12')
    call expect_patched(good, rec + 12, 0, 'layer 1: has zero size (12 x 0)')
    call expect_patched(good, rec + 12, 17, 'layer 1: payload_bytes is 832, but its fields imply 884')
    call expect_patched(good, rec + 24 + 832 + 8, 17, 'layer sizes do not chain: layer 1 outputs 16 but layer 2 takes 17')
    call expect_patched(good, rec + 16, 4, 'layer 1: payload_bytes is 4, but its fields imply 832')
    call expect_patched(good, rec + 20, -1, 'truncated: layer 1 payload_bytes = 2**63 + ')
    call expect_patched(good, 12_int64, -1, 'n_layers = 4294967295 is larger than the largest count 2^31 - 1')
    call expect_patched(good, 12_int64, huge(0), 'truncated: 2147483647 layer records')
    call expect_patched(good, 12_int64, 0, 'model has no layers')
    call expect_patched(good, 12_int64, 2, 'layer 2 outputs 8 but the model has n_outputs = 5')
    call expect_patched(good, 12_int64, 4, 'truncated')
    call expect_patched(good, 20_int64, 6, 'layer 3 outputs 5 but the model has n_outputs = 6')
    call expect_patched(good, 24_int64, 3, 'in_norm: unknown norm kind 3')
    call expect_patched(good, 28_int64, 7, 'out_norm: unknown norm kind 7')
    call expect_patched(good, 24_int64, NORM_PER_FEATURE, 'in_norm')
    call expect_patched(good, 32_int64, 16 * 1024 * 1024 + 1, 'truncated: metadata needs 16777217 bytes')
    call expect_patched(good, 32_int64, 1000000, 'truncated: metadata needs 1000000 bytes')
    call expect_bad(with_metadata(good, '{"a": "'//repeat('x', 16 * 1024 * 1024 - 8)//'"}'), &
                    'metadata is 16777217 bytes, more than the 16 MiB limit')
    call expect_bad(with_metadata(good, repeat('{"a": ', 65)//'1'//repeat('}', 65)), &
                    'metadata is nested more than 64 levels deep')
    call expect_ok(with_metadata(good, repeat('{"a": ', 63)//'[]'//repeat('}', 63)), 'metadata nested 64 deep loads')
    call expect_ok(with_metadata(good, ' {"s": "\u00e9\n", "t": true, "f": false, "z": null, '// &
                   '"n": [-0.5e-3, 12, 0], "o": {}} '), 'metadata with every JSON value type loads')
    call expect_bad(with_metadata(good, '{"x": NaN}'), 'metadata is not valid UTF-8 JSON')
    call expect_bad(with_metadata(good, '{"x": 01}'), 'metadata is not valid UTF-8 JSON')
    call expect_bad(with_metadata(good, '{"x": "a'//achar(10)//'"}'), 'metadata is not valid UTF-8 JSON')
    call expect_bad(with_metadata(good, '{} {}'), 'metadata is not valid UTF-8 JSON')
    call expect_ok(with_metadata(good, ''), 'empty metadata is read as {}')
    call expect_ok(with_metadata(good, '{"n": '//repeat('7', 4300)//', "f": '//repeat('7', 5000)//'.5}'), &
                   'metadata: an integer of 4300 digits and a long float load')
    call expect_bad(with_metadata(good, '{"n": -'//repeat('7', 4301)//'}'), 'more than 4300 digits')
    call expect_ok(with_metadata(good, '{"s": "\ud83d\ude00"}'), 'metadata: a surrogate pair loads')
    call expect_bad(with_metadata(good, '{"s": "\ud83d"}'), 'metadata holds a lone surrogate')
    call expect_bad(with_metadata(good, '{"s": "\ude00x"}'), 'metadata holds a lone surrogate')
    call expect_bad(with_metadata(good, '{"s": "\ud83d\u0041"}'), 'metadata holds a lone surrogate')
    b = good; b(37:38) = transfer('[]', 0_int8, 2); call fix_crc(b)
    call expect_bad(b, 'metadata is not a JSON object')
    b = good; b(37:38) = transfer('{"', 0_int8, 2); call fix_crc(b)
    call expect_bad(b, 'metadata is not valid UTF-8 JSON (syntax error')
    b = good; b(37) = -1; call fix_crc(b)
    call expect_bad(b, 'metadata is not valid UTF-8 JSON (invalid UTF-8)')
    b = good; b(rec + 25:rec + 28) = transfer(ieee_value(1.0_real32, ieee_quiet_nan), 0_int8, 4); call fix_crc(b)
    call expect_bad(b, 'layer 1 (dense): W contains NaN or infinite values')
    call test_huge_dense()

    ! Without stat: a message on stderr, and the model says what went wrong.
    b = good; b(1) = 0
    call write_all(BAD, b)
    call pykd_load_model(BAD, m)
    call check(.not. m%ok .and. m%stat == PYKD_ERR_FORMAT .and. index(m%errmsg, 'bad magic') > 0, &
               'without stat: model%ok false, model%stat and model%errmsg set')
  end subroutine test_bad_files

  !> Issue 13: n_in = n_out = 2**31 - 1 makes 4 * n_in * n_out overflow
  !! 64 bits; it must be reported as a truncated file, with no allocation.
  subroutine test_huge_dense()
    integer, parameter :: BIG = huge(0)
    integer(int8), allocatable :: b(:)
    integer(int64) :: pos, i
    ! Version 2: payload_bytes (2**32) is checked against the bytes present.
    b = [integer(int8) :: transfer('PYKDMDL'//achar(0), 0_int8, 8), (0_int8, i = 1, 100)]
    pos = 8
    call put32(b, pos, [2, 1, BIG, BIG, 0, 0, 0, KIND_DENSE, 0, BIG, BIG, 0, 1])
    b = [b(1:pos), transfer('PYKDEND'//achar(0), 0_int8, 8)]
    call fix_crc(b)
    call expect_bad(b, 'truncated')
    ! Version 1 has no payload_bytes: the dense kind's own size check.
    b = [integer(int8) :: transfer('PYKDMDL'//achar(0), 0_int8, 8), (0_int8, i = 1, 100)]
    pos = 8
    call put32(b, pos, [1, 1, BIG, BIG, 0, 0, KIND_DENSE, 0, BIG, BIG, 0])
    b = [b(1:pos), transfer('PYKDEND'//achar(0), 0_int8, 8)]
    call fix_crc(b)
    call expect_bad(b, 'truncated')
  end subroutine test_huge_dense

  !> Truncated at every byte, and every single byte flipped (CRC fixed or
  !! not): always PYKD_ERR_FORMAT or a valid model, never anything else.
  subroutine test_truncation_everywhere()
    type(pykd_model) :: m
    integer(int8), allocatable :: good(:), b(:)
    integer :: k, stat, n_bad
    integer(int64) :: n

    call pykd_model_from_params([3, 2], [ACT_RELU], uniforms(8, 60_int64, 1.0), m, [0.0_real32], &
                                [1.0_real32], stat=stat)
    call pykd_save_model(m, FILE, stat)
    call read_all(FILE, good)
    n = size(good, kind=int64)
    n_bad = 0
    do k = 0, int(n) - 1
      call write_all(BAD, good(1:k))
      call pykd_load_model(BAD, m, stat)
      if (stat /= PYKD_ERR_FORMAT .or. m%ok) n_bad = n_bad + 1
    end do
    call check(n_bad == 0, 'every truncation of a file is PYKD_ERR_FORMAT')
    n_bad = 0
    do k = 1, int(n) - 12
      b = good
      b(k) = ieor(b(k), int(z'5A', int8))
      call fix_crc(b)
      call write_all(BAD, b)
      call pykd_load_model(BAD, m, stat)
      if (.not. (stat == PYKD_ERR_FORMAT .or. (stat == PYKD_OK .and. m%ok))) n_bad = n_bad + 1
    end do
    call check(n_bad == 0, 'every flipped byte (CRC recomputed) is PYKD_ERR_FORMAT or a valid model')
  end subroutine test_truncation_everywhere

  !> A directory, a device and a FIFO are refused with PYKD_ERR_IO (a FIFO
  !! would block the open forever).
  subroutine test_not_regular()
    type(pykd_model) :: m
    integer :: stat, ios
    character(len=512) :: msg
    call pykd_load_model('.', m, stat, msg)
    call check(stat == PYKD_ERR_IO .and. index(msg, 'not a regular file') > 0, 'a directory: '//trim(msg))
    call pykd_load_model('/dev/null', m, stat, msg)
    call check(stat == PYKD_ERR_IO .and. index(msg, 'not a regular file') > 0, 'a device: '//trim(msg))
    call execute_command_line('rm -f test_model.fifo && mkfifo test_model.fifo', exitstat=ios)
    if (ios == 0) then
      call pykd_load_model('test_model.fifo', m, stat, msg)
      call check(stat == PYKD_ERR_IO .and. index(msg, 'not a regular file') > 0, 'a FIFO: '//trim(msg))
      call execute_command_line('rm -f test_model.fifo')
    end if
  end subroutine test_not_regular

  subroutine expect_bad(bytes, phrase)
    integer(int8), intent(in) :: bytes(:)
    character(len=*), intent(in) :: phrase
    type(pykd_model) :: m
    integer :: stat
    character(len=512) :: msg
    call write_all(BAD, bytes)
    call pykd_load_model(BAD, m, stat, msg)
    call check(stat == PYKD_ERR_FORMAT .and. index(msg, phrase) > 0 .and. index(msg, BAD) == 1 &
               .and. .not. m%ok .and. .not. allocated(m%table) .and. .not. allocated(m%f32), &
               'bad file ('//phrase//'): '//trim(msg))
  end subroutine expect_bad

  subroutine expect_ok(bytes, what)
    integer(int8), intent(in) :: bytes(:)
    character(len=*), intent(in) :: what
    type(pykd_model) :: m
    integer :: stat
    character(len=512) :: msg
    call write_all(BAD, bytes)
    call pykd_load_model(BAD, m, stat, msg)
    call check(stat == PYKD_OK .and. m%ok, what//': '//trim(msg))
  end subroutine expect_ok

  !> A v2 file without normalisation whose metadata ('{}') is replaced.
  function with_metadata(good, meta) result(b)
    integer(int8), intent(in) :: good(:)
    character(len=*), intent(in) :: meta
    integer(int8), allocatable :: b(:)
    integer(int64) :: pos
    b = [good(1:32), good(1:4), transfer(meta, 0_int8, len(meta)), good(39:)]
    pos = 32
    call put32(b, pos, [len(meta)])
    call fix_crc(b)
  end function with_metadata

  !> The u32 at `offset` set to `value`, the CRC recomputed.
  subroutine expect_patched(good, offset, value, phrase)
    integer(int8), intent(in) :: good(:)
    integer(int64), intent(in) :: offset
    integer, intent(in) :: value
    character(len=*), intent(in) :: phrase
    integer(int8), allocatable :: b(:)
    integer(int64) :: pos
    b = good
    pos = offset
    call put32(b, pos, [value])
    call fix_crc(b)
    call expect_bad(b, phrase)
  end subroutine expect_patched

  subroutine test_errors()
    type(pykd_model) :: m, empty
    real(real32) :: x(12, 4), wrong(11, 4), logits(5, 4)
    integer :: stat
    character(len=256) :: msg

    x = 1
    call pykd_model_from_params(SIZES, ACTS, params, m, stat=stat)
    call pykd_predict(m, wrong, logits, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'x must be (12, n)') > 0, 'wrong x shape: '//trim(msg))
    call pykd_predict(m, wrong, logits)
    call check(all(ieee_is_nan(logits)), 'without stat a failed predict returns NaN logits')
    call pykd_predict(empty, x, logits, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'not loaded') > 0, 'predict on an empty model: '//trim(msg))
    call pykd_save_model(empty, FILE, stat, msg)
    call check(stat == PYKD_ERR_ARG, 'save of an empty model: '//trim(msg))
    call pykd_save_model(m, 'no/such/dir/model.pykd', stat, msg)
    call check(stat == PYKD_ERR_IO .and. index(msg, 'cannot create') > 0, 'save into a missing directory: '//trim(msg))
    call pykd_quantize_model(empty, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'not loaded') > 0, 'quantize an empty model: '//trim(msg))
    call check_int8_too_wide()
    m%f32(300) = ieee_value(1.0_real32, ieee_positive_inf)
    call pykd_save_model(m, FILE, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'layer 2 (dense): W contains NaN or inf') > 0, &
               'save refuses NaN/inf weights: '//trim(msg))
    call pykd_quantize_model(m, stat, msg)
    call check(stat == PYKD_ERR_NONFINITE .and. m%layer_kind(1) == 'dense', &
               'quantize refuses inf weights and leaves the model as it was: '//trim(msg))
  end subroutine test_errors

  !> int8 layers wider than the int32 accumulator allows are refused.
  subroutine check_int8_too_wide()
    integer, parameter :: WIDE = 131072
    type(pykd_model) :: m
    integer :: stat
    character(len=256) :: msg
    call pykd_model_from_params([WIDE, 1], [ACT_IDENTITY], spread(1.0_real32, 1, WIDE + 1), m, stat=stat)
    call pykd_quantize_model(m, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'at most 131071') > 0 .and. m%layer_kind(1) == 'dense', &
               'too wide for an int8 layer: '//trim(msg))
  end subroutine check_int8_too_wide

  !> Many threads predicting with one model, each with its own workspace,
  !! give the same bits as the same chunks run one after another.
  subroutine test_concurrent()
    integer, parameter :: N = 4096, CHUNK = 64
    type(pykd_model) :: m
    type(pykd_workspace), allocatable :: ws(:)
    real(real32), allocatable :: x(:, :), ref(:, :), par(:, :), whole(:, :)
    integer :: stat, c, nt, tid, n_bad, st, pass

    allocate (x(12, N), ref(5, N), par(5, N), whole(5, N))
    x = reshape(uniforms(size(x), 7_int64, 2.0), shape(x))
    call pykd_model_from_params(SIZES, ACTS, params, m, [0.1_real32], [1.3_real32], out_mean=[2.0_real32], &
                                out_std=[3.0_real32], stat=stat)
    nt = 1
    !$ nt = max(4, omp_get_max_threads())
    allocate (ws(0:nt - 1))
    do pass = 1, 2
      if (pass == 2) call pykd_quantize_model(m, stat)
      call pykd_predict(m, x, whole, stat)
      do c = 1, N, CHUNK
        call pykd_predict(m, x(:, c:c + CHUNK - 1), ref(:, c:c + CHUNK - 1), stat, work=ws(0))
      end do
      par = 0
      n_bad = 0
      !$omp parallel do num_threads(nt) schedule(dynamic) private(tid, st) reduction(+:n_bad)
      do c = 1, N, CHUNK
        tid = 0
        !$ tid = omp_get_thread_num()
        call pykd_predict(m, x(:, c:c + CHUNK - 1), par(:, c:c + CHUNK - 1), st, work=ws(tid))
        if (st /= PYKD_OK) n_bad = n_bad + 1
      end do
      !$omp end parallel do
      call check(n_bad == 0 .and. all(par == ref) .and. maxval(abs(whole - ref)) <= 1e-5 * maxval(abs(ref)), &
                 merge('float32', 'int8   ', pass == 1)//' predictions in an OpenMP loop: the bits of the '// &
                 'same chunks run serially')
    end do
    call check(all(whole == ref), 'int8: one batched call gives the bits of the chunks')
  end subroutine test_concurrent

  !> Teacher (CE), soft labels, student (KD), all in Fortran, on a toy
  !! problem: 4 classes from the sign pattern of two of 6 features.
  subroutine test_distill()
    integer, parameter :: N = 512, TS(3) = [6, 32, 4], SS(2) = [6, 4], BATCH = 64
    integer, parameter :: T_ACTS(2) = [ACT_RELU, ACT_IDENTITY], S_ACTS(1) = [ACT_IDENTITY]
    real(real32), allocatable :: x(:, :), soft(:, :), tp(:), sp(:), g(:), m1(:), m2(:), work(:), logits(:, :)
    integer(int64), allocatable :: y(:)
    type(train_config) :: cfg
    type(pykd_model) :: student
    real(real32) :: loss
    integer(int64) :: step
    integer :: j, epoch, c, n_correct, stat, acc_t, acc_s

    allocate (x(6, N), y(N), soft(4, N), logits(4, N))
    x = reshape(uniforms(size(x), 8_int64, 1.0), shape(x))
    y = merge(1, 0, x(1, :) > 0) + merge(2, 0, x(2, :) > 0)

    tp = uniforms(int(mlp_param_count(TS, 0, 0)), 9_int64, 0.3)
    allocate (g(size(tp)), m1(size(tp)), m2(size(tp)), source=0.0_real32)
    allocate (work(mlp_workspace_size(TS, BATCH, 0)))
    cfg%lr = 1e-2
    step = 0
    do epoch = 1, 30
      do c = 1, N, BATCH
        step = step + 1
        call mlp_train_step(TS, T_ACTS, tp, g, m1, m2, x(:, c:c + BATCH - 1), y(c:c + BATCH - 1), cfg, &
                            step, work, loss, n_correct, stat=stat)
      end do
    end do
    call mlp_forward(TS, T_ACTS, tp, x, soft, stat=stat)
    acc_t = count([(maxloc(soft(:, j), 1) - 1 == y(j), j = 1, N)])
    call check(stat == PYKD_OK .and. acc_t > 0.9 * N, 'teacher trained in Fortran learns the toy task')

    ! A linear student: quadrants are linearly separable by an argmax.
    sp = uniforms(int(mlp_param_count(SS, 0, 0)), 10_int64, 0.3)
    deallocate (g, m1, m2, work)
    allocate (g(size(sp)), m1(size(sp)), m2(size(sp)), source=0.0_real32)
    allocate (work(mlp_workspace_size(SS, BATCH, 0)))
    cfg%loss = LOSS_KD; cfg%temperature = 2; cfg%alpha = 0.5
    step = 0
    do epoch = 1, 30
      do c = 1, N, BATCH
        step = step + 1
        call mlp_train_step(SS, S_ACTS, sp, g, m1, m2, x(:, c:c + BATCH - 1), y(c:c + BATCH - 1), cfg, &
                            step, work, loss, n_correct, teacher=soft(:, c:c + BATCH - 1), stat=stat)
      end do
    end do
    call check(stat == PYKD_OK .and. loss == loss, 'KD steps run')
    call pykd_model_from_params(SS, S_ACTS, sp, student, metadata='{"trained": "fortran"}', stat=stat)
    call pykd_save_model(student, FILE, stat)
    call pykd_load_model(FILE, student, stat)
    call pykd_predict(student, x, logits, stat)
    acc_s = count([(maxloc(logits(:, j), 1) - 1 == y(j), j = 1, N)])
    call check(stat == PYKD_OK .and. acc_s > 0.6 * N .and. student%metadata == '{"trained": "fortran"}', &
               'distilled student, saved and reloaded, beats chance')
  end subroutine test_distill

  !> The step in two halves (issue 16): mlp_gradient + mlp_apply_update on
  !! the whole batch gives the bits of mlp_train_step; two shards of the
  !! batch (n_global, first) add up to its gradient and loss, with dropout.
  subroutine test_split_step()
    integer, parameter :: N = 24, CUT = 7
    real(real32), allocatable :: x(:, :), p1(:), p2(:), g1(:), g2(:), gs(:), a1(:), a2(:), b1(:), b2(:), work(:)
    integer(int64), allocatable :: y(:)
    type(train_config) :: cfg
    real(real32) :: l1, l2, la, lb
    integer(int64) :: step
    integer :: c1, c2, ca, cb, st(5)

    allocate (x(SIZES(1), N), y(N))
    x = reshape(uniforms(size(x), 21_int64, 1.0), shape(x))
    y = [(mod(step * 7, int(SIZES(4), int64)), step = 1, N)]
    cfg%dropout = 0.25; cfg%seed = 4
    p1 = params; p2 = params
    allocate (g1(size(p1)), g2(size(p1)), gs(size(p1)), a1(size(p1)), a2(size(p1)), b1(size(p1)), &
              b2(size(p1)), source=0.0_real32)
    allocate (work(mlp_workspace_size(SIZES, N, 0)))
    do step = 1, 3
      call mlp_train_step(SIZES, ACTS, p1, g1, a1, b1, x, y, cfg, step, work, l1, c1, stat=st(1))
      call mlp_gradient(SIZES, ACTS, p2, g2, x, y, cfg, step, work, l2, c2, stat=st(2))
      call mlp_apply_update(p2, g2, a2, b2, cfg, step, stat=st(3))
    end do
    call check(all(st(1:3) == PYKD_OK) .and. l1 == l2 .and. c1 == c2 .and. all(p1 == p2) .and. &
               all(g1 == g2) .and. all(a1 == a2) .and. all(b1 == b2), &
               'mlp_gradient + mlp_apply_update: the bits of mlp_train_step')
    call mlp_gradient(SIZES, ACTS, p2, gs, x(:, 1:CUT), y(1:CUT), cfg, 4_int64, work, la, ca, stat=st(4), &
                      n_global=N, first=0_int64)
    g1 = gs
    call mlp_gradient(SIZES, ACTS, p2, gs, x(:, CUT + 1:), y(CUT + 1:), cfg, 4_int64, work, lb, cb, &
                      stat=st(5), n_global=N, first=int(CUT, int64))
    call mlp_gradient(SIZES, ACTS, p2, g2, x, y, cfg, 4_int64, work, l2, c2, stat=st(1))
    call check(all(st == PYKD_OK) .and. abs(la + lb - l2) <= 1e-6 * abs(l2) .and. ca + cb == c2 .and. &
               maxval(abs(g1 + gs - g2)) <= 1e-6 * maxval(abs(g2)), &
               'two shards of a batch add up to its gradient and loss (dropout by global position)')
    call mlp_gradient(SIZES, ACTS, p2, gs, x(:, CUT + 1:), y(CUT + 1:), cfg, 4_int64, work, lb, cb, &
                      stat=st(5), n_global=N, first=int(CUT + 1, int64))
    call check(st(5) == PYKD_ERR_ARG, 'mlp_gradient: a shard past the end of the global batch is an error')
  end subroutine test_split_step

  !> The same layers: every table row alike but for its offsets (the loader
  !! lays the slices out on 64-byte boundaries of its own buffers), and
  !! every slice's contents bit for bit.
  logical function same_layers(a, b)
    type(pykd_model), intent(in) :: a, b
    integer, parameter :: OFFS(3) = [COL_F32_OFF, COL_I8_OFF, COL_I32_OFF]
    integer(int64) :: ra(N_FIELDS), rb(N_FIELDS), fa, fb, n
    integer :: k
    same_layers = size(a%table, 2) == size(b%table, 2)
    do k = 1, size(a%table, 2)
      if (.not. same_layers) return
      ra = a%table(:, k); rb = b%table(:, k)
      ra(OFFS) = 0; rb(OFFS) = 0
      same_layers = all(ra == rb)
      if (.not. same_layers) return
      fa = a%table(COL_F32_OFF, k); fb = b%table(COL_F32_OFF, k); n = ra(COL_F32_LEN)
      same_layers = same_arrays(a%f32(fa + 1:fa + n), b%f32(fb + 1:fb + n))
      fa = a%table(COL_I8_OFF, k); fb = b%table(COL_I8_OFF, k); n = ra(COL_I8_LEN)
      same_layers = same_layers .and. all(a%i8(fa + 1:fa + n) == b%i8(fb + 1:fb + n))
      fa = a%table(COL_I32_OFF, k); fb = b%table(COL_I32_OFF, k); n = ra(COL_I32_LEN)
      same_layers = same_layers .and. all(a%i32(fa + 1:fa + n) == b%i32(fb + 1:fb + n))
    end do
  end function same_layers

  !> Whether every non-empty slice starts on a 64-byte boundary; for the
  !! sparse kinds, their planes' values (after nnz values, or n_codes
  !! centroids), which the one-sample kernel streams.
  logical function lines_aligned(m)
    type(pykd_model), intent(in), target :: m
    integer(int64) :: lead
    integer :: k
    lines_aligned = .true.
    do k = 1, size(m%table, 2)
      lead = 0
      if (m%table(COL_KIND, k) == KIND_SPARSE_CSR) lead = m%table(COL_P1, k)
      if (m%table(COL_KIND, k) == KIND_SPARSE_CODEBOOK) lead = m%table(COL_P2, k)
      if (m%table(COL_F32_LEN, k) > 0) lines_aligned = lines_aligned .and. &
          modulo(transfer(c_loc(m%f32(m%table(COL_F32_OFF, k) + lead + 1)), 0_c_intptr_t), 64) == 0
      if (m%table(COL_I8_LEN, k) > 0) lines_aligned = lines_aligned .and. &
          modulo(transfer(c_loc(m%i8(m%table(COL_I8_OFF, k) + 1)), 0_c_intptr_t), 64) == 0
      if (m%table(COL_I32_LEN, k) > 0) lines_aligned = lines_aligned .and. &
          modulo(transfer(c_loc(m%i32(m%table(COL_I32_OFF, k) + 1)), 0_c_intptr_t), 64) == 0
    end do
  end function lines_aligned

end program test_model
