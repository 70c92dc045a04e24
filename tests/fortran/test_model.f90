!> Fortran-only tests of the model API (pykd_models): CRC-32, building from
!! MLP parameters, save/load round trips, int8 layers, bad files, errors
!! without `stat`, concurrent predictions, and a small distillation run.
!! Files are written to the working directory and removed afterwards.
program test_model
  use iso_fortran_env, only: real32, int8, int32, int64
  use ieee_arithmetic, only: ieee_is_nan, ieee_value, ieee_positive_inf
  !$ use omp_lib, only: omp_get_thread_num, omp_get_max_threads
  use pykd
  use pykd_crc32, only: crc32
  use pykd_random, only: uniform01
  use test_harness, only: check, finish
  implicit none

  integer, parameter :: SIZES(4) = [12, 16, 8, 5], ACTS(3) = [ACT_RELU, ACT_TANH, ACT_IDENTITY]
  character(len=*), parameter :: FILE = 'test_model_tmp.pykd', BAD = 'test_model_bad.pykd'
  real(real32), allocatable :: params(:)

  params = uniforms(int(mlp_param_count(SIZES, 0, 0)), 1_int64, 0.6)

  call test_crc32()
  call test_from_params()
  call test_round_trip()
  call test_int8()
  call test_bad_files()
  call test_errors()
  call test_concurrent()
  call test_distill()
  call delete(FILE)
  call delete(BAD)

  call finish('Fortran model')

contains

  !> Deterministic numbers in [-amp, amp) (a hash of the index, see pykd_random).
  function uniforms(n, seed, amp) result(u)
    integer, intent(in) :: n
    integer(int64), intent(in) :: seed
    real(real32), intent(in) :: amp
    real(real32) :: u(n)
    integer(int64) :: i
    u = [(amp * (2 * uniform01(seed, i) - 1), i = 0, n - 1)]
  end function uniforms

  subroutine delete(path)
    character(len=*), intent(in) :: path
    integer :: u, ios
    open (newunit=u, file=path, status='old', iostat=ios)
    if (ios == 0) close (u, status='delete')
  end subroutine delete

  subroutine read_all(path, b)
    character(len=*), intent(in) :: path
    integer(int8), allocatable, intent(out) :: b(:)
    integer :: u
    integer(int64) :: n
    open (newunit=u, file=path, access='stream', form='unformatted', status='old', action='read')
    inquire (unit=u, size=n)
    allocate (b(n))
    read (u) b
    close (u)
  end subroutine read_all

  subroutine write_all(path, b)
    character(len=*), intent(in) :: path
    integer(int8), intent(in) :: b(:)
    integer :: u
    open (newunit=u, file=path, access='stream', form='unformatted', status='replace', action='write')
    write (u) b
    close (u)
  end subroutine write_all

  subroutine test_crc32()
    character(len=9), parameter :: DIGITS = '123456789'
    integer(int32), parameter :: EXPECT = int(int(z'CBF43926', int64) - 2_int64**32, int32)
    call check(crc32(transfer(DIGITS, 0_int8, 9)) == EXPECT, 'crc32("123456789") = 0xCBF43926')
    call check(crc32([integer(int8) ::]) == 0, 'crc32 of no bytes = 0')
  end subroutine test_crc32

  !> A model built from MLP parameters predicts exactly what mlp_forward does
  !! on the normalised input.
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
    call pykd_model_from_params(SIZES, ACTS, params, m, mean, std, '{"origin": "test"}', stat)
    call check(stat == PYKD_OK .and. m%ok .and. m%norm_kind == NORM_PER_FEATURE, 'from_params builds a model')
    call pykd_predict(m, x, logits, stat)
    call check(stat == PYKD_OK .and. all(logits == ref), 'predict = mlp_forward on normalised input, bit for bit')
    call m%predict(x, logits, stat)
    call check(stat == PYKD_OK .and. all(logits == ref), 'type-bound predict')
    call m%free()
    call check(.not. m%ok .and. .not. allocated(m%layers), 'free releases the model')
    call pykd_model_from_params(SIZES, ACTS, params(2:), m, stat=stat)
    call check(stat == PYKD_ERR_ARG .and. .not. m%ok, 'from_params rejects a wrong parameter count')
  end subroutine test_from_params

  !> save then load gives back the same model and the same logits.
  subroutine test_round_trip()
    type(pykd_model) :: m, r
    type(pykd_workspace) :: ws
    real(real32) :: x(12, 9), a(5, 9), b(5, 9)
    integer :: stat, l
    character(len=256) :: msg
    logical :: same

    x = reshape(uniforms(size(x), 5_int64, 2.0), shape(x))
    call pykd_model_from_params(SIZES, ACTS, params, m, [0.25_real32], [2.0_real32], stat=stat)
    call check(m%norm_kind == NORM_SCALAR, 'scalar normalisation')
    call pykd_save_model(m, FILE, stat, msg)
    call check(stat == PYKD_OK, 'save: '//trim(msg))
    call pykd_load_model(FILE, r, stat, msg)
    call check(stat == PYKD_OK .and. r%ok, 'load what save wrote: '//trim(msg))
    same = r%n_features == 12 .and. r%n_outputs == 5 .and. size(r%layers) == 3 .and. r%metadata == '{}' &
           .and. r%norm_kind == NORM_SCALAR .and. all(r%mean == 0.25) .and. all(r%std == 2)
    do l = 1, 3
      same = same .and. all(r%layers(l)%w == m%layers(l)%w) .and. all(r%layers(l)%b == m%layers(l)%b) &
             .and. r%layers(l)%act == ACTS(l) .and. r%layers(l)%kind == LAYER_DENSE
    end do
    call check(same, 'round trip keeps sizes, norm, metadata, activations and weights')
    call pykd_predict(m, x, a, stat, work=ws)
    call pykd_predict(r, x, b, stat, work=ws)
    call check(stat == PYKD_OK .and. all(a == b), 'round trip gives the same logits (reused workspace)')
    call r%load(FILE, stat)
    call check(stat == PYKD_OK .and. r%ok, 'type-bound load')
  end subroutine test_round_trip

  !> int8 layers: quantized weights, exact int32 products, dynamic per-sample
  !! activation scales; a sample's logits do not depend on its batch.
  subroutine test_int8()
    type(pykd_model) :: m, r
    real(real32) :: x(12, 50), f(5, 50), q(5, 50), q1(5, 1)
    integer :: stat, l
    logical :: same

    x = reshape(uniforms(size(x), 6_int64, 2.0), shape(x))
    call pykd_model_from_params(SIZES, ACTS, params, m, stat=stat)
    call pykd_predict(m, x, f, stat)
    call pykd_quantize_model(m, stat)
    call check(stat == PYKD_OK .and. all([(m%layers(l)%kind == LAYER_DENSE_INT8, l = 1, 3)]), &
               'quantize_model turns every layer into int8')
    call check(all(abs(m%layers(1)%q) <= 127) .and. .not. allocated(m%layers(1)%w), 'int8 weights in [-127, 127]')
    call pykd_predict(m, x, q, stat)
    call check(stat == PYKD_OK .and. maxval(abs(q - f)) < 0.05 * maxval(abs(f)), 'int8 logits close to float32')
    call pykd_predict(m, x(:, 17:17), q1, stat)
    call check(all(q1(:, 1) == q(:, 17)), 'int8 result of a sample does not depend on its batch')
    call pykd_save_model(m, FILE, stat)
    call pykd_load_model(FILE, r, stat)
    same = stat == PYKD_OK
    do l = 1, 3
      same = same .and. all(r%layers(l)%q == m%layers(l)%q) .and. all(r%layers(l)%scale == m%layers(l)%scale)
    end do
    call check(same, 'int8 round trip keeps q and scale')
    call pykd_predict(r, x, f, stat)
    call check(all(f == q), 'int8 round trip gives identical logits')
  end subroutine test_int8

  !> Every kind of damage gives PYKD_ERR_FORMAT (or _IO) and a message.
  subroutine test_bad_files()
    type(pykd_model) :: m
    integer(int8), allocatable :: good(:), b(:)
    integer(int64) :: n, kind_at
    integer :: stat
    character(len=512) :: msg

    call pykd_model_from_params(SIZES, ACTS, params, m, stat=stat)
    call pykd_save_model(m, FILE, stat)
    call read_all(FILE, good)
    n = size(good, kind=int64)

    call pykd_load_model('no/such/file.pykd', m, stat, msg)
    call check(stat == PYKD_ERR_IO .and. index(msg, 'cannot open') > 0 .and. .not. m%ok, &
               'missing file: '//trim(msg))
    b = good; b(1) = ichar('X', int8)
    call expect_bad(b, 'bad magic')
    b = good; b(9) = 7
    call expect_bad(b, 'unsupported model format version 7')
    call expect_bad(good(1:n / 2), 'truncated')
    call expect_bad(good(1:5), 'truncated')
    call expect_bad([integer(int8) ::], 'bad magic')
    b = good; b(n / 2) = not(b(n / 2))
    call expect_bad(b, 'checksum mismatch')
    b = good; b(n - 12:n - 9) = 0
    call expect_bad(b, 'checksum mismatch')
    call expect_bad([good, good(1:3)], 'trailing garbage')
    ! Layer 1's kind field follows the 28-byte header, meta_len and '{}'.
    kind_at = 28 + 4 + 2
    b = good; b(kind_at + 1) = 3
    call fix_crc(b)
    call expect_bad(b, 'kind 3 (sparse_csr) is reserved')
    b = good; b(kind_at + 1) = 9
    call fix_crc(b)
    call expect_bad(b, 'unknown kind 9')
    b = good; b(kind_at + 9) = 13   ! layer 1 n_in = 13 /= n_features
    call fix_crc(b)
    call expect_bad(b, 'layer 1 takes 13 inputs')
    b = good; b(13:16) = -1         ! n_layers = 2**32 - 1
    call fix_crc(b)
    call expect_bad(b, 'exceeds 2**31 - 1')
    b = good; b(13) = 100           ! 100 layers: headers would run past the end
    call fix_crc(b)
    call expect_bad(b, 'truncated')

    ! Without stat: a message on stderr, and the model says what went wrong.
    b = good; b(1) = 0
    call write_all(BAD, b)
    call pykd_load_model(BAD, m)
    call check(.not. m%ok .and. m%stat == PYKD_ERR_FORMAT .and. index(m%errmsg, 'bad magic') > 0, &
               'without stat: model%ok false, model%stat and model%errmsg set')
  end subroutine test_bad_files

  subroutine expect_bad(bytes, phrase)
    integer(int8), intent(in) :: bytes(:)
    character(len=*), intent(in) :: phrase
    type(pykd_model) :: m
    integer :: stat
    character(len=512) :: msg
    call write_all(BAD, bytes)
    call pykd_load_model(BAD, m, stat, msg)
    call check(stat == PYKD_ERR_FORMAT .and. index(msg, phrase) > 0 .and. index(msg, BAD) == 1 &
               .and. .not. m%ok, 'bad file ('//phrase//'): '//trim(msg))
  end subroutine expect_bad

  !> Recompute the CRC of a patched file so the damage is past the checksum.
  subroutine fix_crc(b)
    integer(int8), intent(inout) :: b(:)
    integer(int64) :: t
    t = size(b, kind=int64) - 12
    b(t + 1:t + 4) = transfer(crc32(b(1:t)), 0_int8, 4)
  end subroutine fix_crc

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
    call check_int8_too_wide()
    m%layers(2)%w(1, 1) = ieee_value(1.0_real32, ieee_positive_inf)
    call pykd_save_model(m, FILE, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'NaN or inf') > 0, 'save refuses NaN/inf weights')
  end subroutine test_errors

  !> int8 layers wider than the int32 accumulator allows are refused.
  subroutine check_int8_too_wide()
    integer, parameter :: WIDE = 131072
    type(pykd_model) :: m
    real(real32), allocatable :: x(:, :)
    real(real32) :: logits(1, 1)
    integer :: stat
    character(len=256) :: msg
    call pykd_model_from_params([WIDE, 1], [ACT_IDENTITY], spread(1.0_real32, 1, WIDE + 1), m, stat=stat)
    call pykd_quantize_model(m, stat)
    allocate (x(WIDE, 1), source=1.0_real32)
    call pykd_predict(m, x, logits, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'at most 131071 inputs') > 0, 'too wide int8 layer: '//trim(msg))
  end subroutine check_int8_too_wide

  !> Many threads predicting with one model, each with its own workspace,
  !! give the same logits as one batched call.
  subroutine test_concurrent()
    integer, parameter :: N = 4096, CHUNK = 64
    type(pykd_model) :: m
    type(pykd_workspace), allocatable :: ws(:)
    real(real32), allocatable :: x(:, :), ref(:, :), par(:, :)
    integer :: stat, c, nt, tid, n_bad, st

    allocate (x(12, N), ref(5, N), par(5, N))
    x = reshape(uniforms(size(x), 7_int64, 2.0), shape(x))
    call pykd_model_from_params(SIZES, ACTS, params, m, [0.1_real32], [1.3_real32], stat=stat)
    call pykd_predict(m, x, ref, stat)
    nt = 1
    !$ nt = max(4, omp_get_max_threads())
    allocate (ws(0:nt - 1))
    n_bad = 0
    !$omp parallel do num_threads(nt) schedule(dynamic) private(tid, st) reduction(+:n_bad)
    do c = 1, N, CHUNK
      tid = 0
      !$ tid = omp_get_thread_num()
      call pykd_predict(m, x(:, c:c + CHUNK - 1), par(:, c:c + CHUNK - 1), st, work=ws(tid))
      if (st /= PYKD_OK) n_bad = n_bad + 1
    end do
    !$omp end parallel do
    call check(n_bad == 0 .and. maxval(abs(par - ref)) <= 1e-5 * maxval(abs(ref)), &
               'concurrent predictions in an OpenMP loop match one batched call (float32)')
    call pykd_quantize_model(m, stat)
    call pykd_predict(m, x, ref, stat)
    !$omp parallel do num_threads(nt) schedule(dynamic) private(tid, st) reduction(+:n_bad)
    do c = 1, N, CHUNK
      tid = 0
      !$ tid = omp_get_thread_num()
      call pykd_predict(m, x(:, c:c + CHUNK - 1), par(:, c:c + CHUNK - 1), st, work=ws(tid))
      if (st /= PYKD_OK) n_bad = n_bad + 1
    end do
    !$omp end parallel do
    call check(n_bad == 0 .and. all(par == ref), 'concurrent int8 predictions are bit-identical')
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

end program test_model
