!> Knowledge distillation end to end in Fortran, no Python: train a teacher
!! on Fashion-MNIST, compute its soft labels, distill a small student (and
!! train the same student from scratch for comparison), quantize the student
!! to int8, and save both students as pykd model files that Python's
!! `pykd.modelfile.read_model` (and the classify example) can read.
!!
!!     distill [DATA_DIR [OUT_PREFIX [TEACHER_EPOCHS [STUDENT_EPOCHS]]]]
!!
!! DATA_DIR (default: .) holds the four *unpacked* IDX files (`gunzip -k`).
!! Writes OUT_PREFIX.pykd (float32) and OUT_PREFIX_int8.pykd (default
!! OUT_PREFIX: student). Defaults: 2 teacher epochs, 3 student epochs,
!! which take well under a minute on two cores.
program distill
  use iso_fortran_env, only: real32, real64, int64, error_unit
  use pykd, only: train_config, LOSS_CE, LOSS_KD, ACT_RELU, ACT_IDENTITY, PYKD_OK, mlp_param_count, &
                  mlp_workspace_size, mlp_forward, mlp_train_step, pykd_model, pykd_model_from_params, &
                  pykd_predict, pykd_quantize_model, pykd_save_model
  use fmnist_idx, only: read_images, read_labels, argument
  implicit none
  integer, parameter :: BATCH = 64
  integer, parameter :: TEACHER(4) = [784, 512, 512, 10], T_ACTS(3) = [ACT_RELU, ACT_RELU, ACT_IDENTITY]
  integer, parameter :: STUDENT(3) = [784, 64, 10], S_ACTS(2) = [ACT_RELU, ACT_IDENTITY]
  real(real32), allocatable :: x_train(:, :), x_test(:, :), x_test_raw(:, :), soft(:, :), teacher_params(:), kd_params(:), &
                               scratch_params(:), logits(:, :)
  integer(int64), allocatable :: y_train(:), y_test(:)
  type(train_config) :: cfg
  type(pykd_model) :: model
  character(len=:), allocatable :: data_dir, out_prefix
  character(len=512) :: msg
  character(len=200) :: meta
  real(real32) :: mean, std
  integer :: stat, teacher_epochs, student_epochs
  integer(int64) :: t0, t1, rate

  data_dir = '.'; out_prefix = 'student'; teacher_epochs = 2; student_epochs = 3
  if (command_argument_count() >= 1) data_dir = argument(1)
  if (command_argument_count() >= 2) out_prefix = argument(2)
  if (command_argument_count() >= 3) teacher_epochs = int_argument(3)
  if (command_argument_count() >= 4) student_epochs = int_argument(4)

  call read_images(data_dir//'/train-images-idx3-ubyte', x_train, stat, msg)
  if (stat == 0) call read_labels(data_dir//'/train-labels-idx1-ubyte', y_train, stat, msg)
  if (stat == 0) call read_images(data_dir//'/t10k-images-idx3-ubyte', x_test, stat, msg)
  if (stat == 0) call read_labels(data_dir//'/t10k-labels-idx1-ubyte', y_test, stat, msg)
  if (stat /= 0) call fail(msg)
  write (*, '(a,i0,a,i0,a)') 'Fashion-MNIST: ', size(x_train, 2), ' training and ', size(x_test, 2), &
    ' test images'

  ! Scalar normalisation from the training set (as Python's pykd.train does).
  ! Training sees normalised copies; the saved model stores mean and std,
  ! so pykd_predict takes raw [0, 1] pixels.
  call mean_std(x_train, mean, std)
  x_test_raw = x_test
  x_train = (x_train - mean) / std
  x_test = (x_test - mean) / std

  call system_clock(t0, rate)
  ! 1. Teacher: cross-entropy on the labels, Adam.
  cfg%loss = LOSS_CE
  cfg%lr = 1e-3
  call train(TEACHER, T_ACTS, teacher_params, teacher_epochs, 'teacher', 1)
  write (*, '(a,f6.2,a)') '  teacher test accuracy: ', 100 * test_accuracy(TEACHER, T_ACTS, teacher_params), ' %'

  ! 2. Soft labels: the teacher's logits on the training set, computed once.
  allocate (soft(TEACHER(size(TEACHER)), size(x_train, 2)))
  call mlp_forward(TEACHER, T_ACTS, teacher_params, x_train, soft, stat=stat, errmsg=msg)
  if (stat /= PYKD_OK) call fail(msg)

  ! 3. Student distilled from the soft labels (Hinton loss, T = 4, alpha = 0.1
  !    on the hard labels), and the same student trained on labels alone.
  cfg%loss = LOSS_KD
  cfg%temperature = 4
  cfg%alpha = 0.1
  call train(STUDENT, S_ACTS, kd_params, student_epochs, 'KD student', 2)
  write (*, '(a,f6.2,a)') '  KD student test accuracy: ', 100 * test_accuracy(STUDENT, S_ACTS, kd_params), ' %'
  cfg%loss = LOSS_CE
  call train(STUDENT, S_ACTS, scratch_params, student_epochs, 'scratch student', 2)
  write (*, '(a,f6.2,a)') '  scratch student test accuracy: ', &
    100 * test_accuracy(STUDENT, S_ACTS, scratch_params), ' %'
  call system_clock(t1)
  write (*, '(a,f6.1,a)') 'training time: ', real(t1 - t0) / real(rate), ' s'

  ! 4. The KD student as a model: normalisation inside, raw pixels in.
  write (meta, '(a,i0,a,i0,a)') '{"trained_by": "examples/fortran/distill.f90", "teacher_epochs": ', &
    teacher_epochs, ', "student_epochs": ', student_epochs, '}'
  call pykd_model_from_params(STUDENT, S_ACTS, kd_params, model, [mean], [std], trim(meta), stat=stat, errmsg=msg)
  if (stat /= PYKD_OK) call fail(msg)
  allocate (logits(STUDENT(size(STUDENT)), size(x_test, 2)))
  call pykd_predict(model, x_test_raw, logits, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  write (*, '(a,f6.2,a)') 'KD student as a pykd_model (raw pixels in): ', 100 * accuracy(logits), ' %'
  call pykd_save_model(model, out_prefix//'.pykd', stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  call pykd_quantize_model(model, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  call pykd_predict(model, x_test_raw, logits, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  write (*, '(a,f6.2,a)') 'KD student, int8 weights and activations:    ', 100 * accuracy(logits), ' %'
  call pykd_save_model(model, out_prefix//'_int8.pykd', stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  ! 5. Static int8: one stored input scale per layer, max|input| / 127 over
  !    1000 (raw) training images, instead of a scale per sample at run time.
  call pykd_model_from_params(STUDENT, S_ACTS, kd_params, model, [mean], [std], trim(meta), stat=stat, errmsg=msg)
  if (stat /= PYKD_OK) call fail(msg)
  call pykd_quantize_model(model, stat, msg, calibration=x_train(:, 1:1000) * std + mean)
  if (stat /= PYKD_OK) call fail(msg)
  call pykd_predict(model, x_test_raw, logits, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  write (*, '(a,f6.2,a)') 'KD student, int8, static input scales:       ', 100 * accuracy(logits), ' %'
  call pykd_save_model(model, out_prefix//'_int8_static.pykd', stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  write (*, '(a)') 'saved '//out_prefix//'.pykd, '//out_prefix//'_int8.pykd and '//out_prefix//'_int8_static.pykd'

contains

  !> Train a fresh MLP (He-uniform init, seeded) for `epochs` epochs of
  !! shuffled mini-batches with the current cfg; KD uses the soft labels.
  subroutine train(sizes, acts, params, epochs, name, seed)
    integer, intent(in) :: sizes(:), acts(:), epochs, seed
    real(real32), allocatable, intent(out) :: params(:)
    character(len=*), intent(in) :: name
    real(real32), allocatable :: grads(:), m(:), v(:), work(:), xb(:, :), tb(:, :), u(:)
    integer(int64), allocatable :: yb(:)
    integer, allocatable :: order(:)
    integer(int64) :: step, off, nw
    integer :: epoch, b, j, l, n, nb, n_correct, total_correct
    real(real32) :: loss
    real(real64) :: loss_sum

    n = size(x_train, 2)
    call seed_rng(seed)
    allocate (params(mlp_param_count(sizes, 0, 0)))
    off = 0
    do l = 1, size(sizes) - 1
      nw = int(sizes(l), int64) * sizes(l + 1)
      call random_number(params(off + 1:off + nw))
      params(off + 1:off + nw) = (2 * params(off + 1:off + nw) - 1) * sqrt(6.0 / sizes(l))
      params(off + nw + 1:off + nw + sizes(l + 1)) = 0
      off = off + nw + sizes(l + 1)
    end do
    allocate (grads(size(params)), m(size(params)), v(size(params)), source=0.0_real32)
    allocate (work(mlp_workspace_size(sizes, BATCH, 0)))
    allocate (xb(sizes(1), BATCH), yb(BATCH), tb(sizes(size(sizes)), BATCH), order(n), u(n))
    order = [(j, j = 1, n)]
    step = 0
    do epoch = 1, epochs
      ! Fisher-Yates shuffle of the sample order.
      call random_number(u)
      do j = n, 2, -1
        b = 1 + int(u(j) * j)
        order([j, b]) = order([b, j])
      end do
      loss_sum = 0; total_correct = 0
      do b = 1, n / BATCH      ! the last partial batch is dropped
        nb = BATCH
        xb = x_train(:, order((b - 1) * nb + 1:b * nb))
        yb = y_train(order((b - 1) * nb + 1:b * nb))
        step = step + 1
        if (cfg%loss == LOSS_KD) then
          tb = soft(:, order((b - 1) * nb + 1:b * nb))
          call mlp_train_step(sizes, acts, params, grads, m, v, xb, yb, cfg, step, work, loss, n_correct, &
                              teacher=tb, stat=stat, errmsg=msg)
        else
          call mlp_train_step(sizes, acts, params, grads, m, v, xb, yb, cfg, step, work, loss, n_correct, &
                              stat=stat, errmsg=msg)
        end if
        if (stat /= PYKD_OK) call fail(msg)
        loss_sum = loss_sum + loss
        total_correct = total_correct + n_correct
      end do
      write (*, '(a,i0,a,f7.4,a,f6.2,a)') name//' epoch ', epoch, ': loss ', loss_sum / (n / BATCH), &
        ', train accuracy ', 100.0 * total_correct / (BATCH * (n / BATCH)), ' %'
    end do
  end subroutine train

  real function test_accuracy(sizes, acts, params)
    integer, intent(in) :: sizes(:), acts(:)
    real(real32), intent(in) :: params(:)
    real(real32), allocatable :: z(:, :)
    allocate (z(sizes(size(sizes)), size(x_test, 2)))
    call mlp_forward(sizes, acts, params, x_test, z, stat=stat, errmsg=msg)
    if (stat /= PYKD_OK) call fail(msg)
    test_accuracy = accuracy(z)
  end function test_accuracy

  real function accuracy(z)
    real(real32), intent(in) :: z(:, :)
    accuracy = real(count(maxloc(z, 1) - 1 == y_test)) / size(y_test)
  end function accuracy

  !> Mean and standard deviation of all entries, accumulated in float64.
  subroutine mean_std(x, mean, std)
    real(real32), intent(in) :: x(:, :)
    real(real32), intent(out) :: mean, std
    real(real64) :: s, ss
    integer :: j
    s = 0
    do j = 1, size(x, 2)
      s = s + sum(real(x(:, j), real64))
    end do
    mean = real(s / size(x, kind=int64), real32)
    ss = 0
    do j = 1, size(x, 2)
      ss = ss + sum((real(x(:, j), real64) - mean)**2)
    end do
    std = real(sqrt(ss / size(x, kind=int64)), real32)
  end subroutine mean_std

  subroutine seed_rng(seed)
    integer, intent(in) :: seed
    integer :: n, i
    integer, allocatable :: s(:)
    call random_seed(size=n)
    s = [(104729 * seed + 7919 * i, i = 1, n)]
    call random_seed(put=s)
  end subroutine seed_rng

  integer function int_argument(i)
    integer, intent(in) :: i
    character(len=:), allocatable :: text
    integer :: ios
    text = argument(i)
    read (text, *, iostat=ios) int_argument
    if (ios /= 0) call fail('argument '//text//' is not an integer')
  end function int_argument

  subroutine fail(text)
    character(len=*), intent(in) :: text
    write (error_unit, '(a)') 'distill: '//trim(text)
    stop 1
  end subroutine fail

end program distill
