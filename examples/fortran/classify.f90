!> Classify the Fashion-MNIST test set with a model file written by Python
!! (`pykd distill`, `pykd.modelfile.write_model`) or by Fortran
!! (`pykd_save_model`, e.g. the distill example): no Python at run time.
!!
!!     classify MODEL [DATA_DIR]
!!
!! DATA_DIR (default: .) holds the *unpacked* IDX files
!! t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (`gunzip -k`).
!!
!! The test set is classified twice: in one batched call, then the way a
!! simulation code would, from inside an OpenMP loop with one workspace per
!! thread. Both must agree.
program classify
  use iso_fortran_env, only: real32, int64, error_unit
  !$ use omp_lib, only: omp_get_thread_num, omp_get_max_threads
  use pykd, only: pykd_model, pykd_workspace, pykd_load_model, pykd_predict, pykd_free, PYKD_OK
  use fmnist_idx, only: read_images, read_labels, argument
  implicit none
  integer, parameter :: CHUNK = 256   ! samples per call inside the OpenMP loop
  type(pykd_model) :: model
  type(pykd_workspace), allocatable :: work(:)
  real(real32), allocatable :: x(:, :), logits(:, :), logits_omp(:, :)
  integer(int64), allocatable :: y(:)
  character(len=:), allocatable :: model_path, data_dir
  character(len=512) :: msg
  integer, allocatable :: sizes(:)
  integer :: stat, l, n, c, tid, n_failed, st, n_threads
  integer(int64) :: t0, t1, t2, rate

  if (command_argument_count() < 1) then
    write (error_unit, '(a)') 'usage: classify MODEL [DATA_DIR]'
    stop 2
  end if
  model_path = argument(1)
  data_dir = '.'
  if (command_argument_count() >= 2) data_dir = argument(2)

  ! Every pykd routine reports failure through stat/errmsg; it never stops.
  call pykd_load_model(model_path, model, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  write (*, '(a,i0,a,i0,a,i0,a,i0,a)') 'model '//model_path//': ', model%n_features, ' -> ', &
    model%n_outputs, ' classes, ', model%n_layers(), ' layers, ', model%n_params(), ' stored numbers'
  sizes = model%layer_sizes()
  do l = 1, model%n_layers()
    write (*, '(a,i0,a,i0,a,i0,a,a,a,a,a,i0,a)') '  layer ', l, ': ', sizes(l), ' -> ', sizes(l + 1), ' ', &
      model%layer_kind(l), ', ', model%layer_activation(l), ' (', model%n_params(l), ' numbers)'
  end do

  call read_images(data_dir//'/t10k-images-idx3-ubyte', x, stat, msg)
  if (stat /= 0) call fail(msg)
  call read_labels(data_dir//'/t10k-labels-idx1-ubyte', y, stat, msg)
  if (stat /= 0) call fail(msg)
  if (size(x, 1) /= model%n_features) call fail('the model does not take 784 pixels')
  n = size(x, 2)
  allocate (logits(model%n_outputs, n), logits_omp(model%n_outputs, n))

  ! 1. One batched call: the normalisation stored in the model is applied
  !    by the library; every layer is one BLAS (or int8) product. (A first
  !    small call warms up the BLAS thread pool, so the timing is fair.)
  call pykd_predict(model, x(:, 1:CHUNK), logits(:, 1:CHUNK), stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  call system_clock(t0, rate)
  call pykd_predict(model, x, logits, stat, msg)
  if (stat /= PYKD_OK) call fail(msg)
  call system_clock(t1)

  ! 2. From inside a parallel loop: the model is read-only and shared, each
  !    thread owns a workspace, so no allocation happens per call.
  n_threads = 1
  !$ n_threads = omp_get_max_threads()
  allocate (work(0:n_threads - 1))
  n_failed = 0
  !$omp parallel do schedule(dynamic) private(tid, st) reduction(+:n_failed)
  do c = 1, n, CHUNK
    tid = 0
    !$ tid = omp_get_thread_num()
    call pykd_predict(model, x(:, c:min(c + CHUNK - 1, n)), logits_omp(:, c:min(c + CHUNK - 1, n)), &
                      st, work=work(tid))
    if (st /= PYKD_OK) n_failed = n_failed + 1
  end do
  !$omp end parallel do
  call system_clock(t2)
  if (n_failed > 0) call fail('a prediction inside the OpenMP loop failed')

  write (*, '(a,i0,a,f6.2,a)') 'test accuracy on ', n, ' images: ', 100 * accuracy(logits), ' %'
  write (*, '(a,f8.2,a,f8.2,a,i0,a,i0,a)') 'time: batched ', 1e3 * real(t1 - t0) / real(rate), ' ms; OpenMP loop ', &
    1e3 * real(t2 - t1) / real(rate), ' ms (', n_threads, ' threads, chunks of ', CHUNK, ')'
  write (*, '(a,l1,a,es9.2)') 'OpenMP loop gives the same predictions: ', &
    all(maxloc(logits, 1) == maxloc(logits_omp, 1)), '; max |logit difference| ', &
    maxval(abs(logits - logits_omp))
  call pykd_free(model)

contains

  real function accuracy(z)
    real(real32), intent(in) :: z(:, :)
    accuracy = real(count(maxloc(z, 1) - 1 == y)) / size(y)
  end function accuracy

  subroutine fail(text)
    character(len=*), intent(in) :: text
    write (error_unit, '(a)') 'classify: '//trim(text)
    stop 1
  end subroutine fail

end program classify
