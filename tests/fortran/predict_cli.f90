!> Test driver for tests/test_fortran_parity.py: run a model file on raw
!! float32 inputs, all from Fortran.
!!
!!     predict_cli MODEL INPUT OUTPUT [CHUNK [RESAVE [QUANT]]]
!!
!! INPUT holds n samples of n_features float32 (NumPy's C-ordered (n, F),
!! i.e. Fortran's x(F, n)); OUTPUT receives the logits, NumPy (n, classes).
!! CHUNK > 0 predicts in chunks of CHUNK samples from an OpenMP loop (one
!! workspace per thread) instead of one batched call. QUANT (dynamic or
!! static) first quantizes the model with pykd_quantize_model, static
!! calibrating on INPUT. RESAVE (- for none) writes the model back with
!! pykd_save_model. Standard output gets one line per
!! layer, `<kind> <activation> <n_in> <n_out>` (the accessors layer_kind,
!! layer_activation and layer_sizes). On failure: the library's message on
!! stderr and exit status 2.
program predict_cli
  use iso_fortran_env, only: real32, int64, error_unit
  !$ use omp_lib, only: omp_get_thread_num, omp_get_max_threads
  use pykd, only: pykd_model, pykd_workspace, pykd_load_model, pykd_predict, pykd_save_model, &
                  pykd_quantize_model, PYKD_OK
  implicit none
  type(pykd_model) :: model
  type(pykd_workspace), allocatable :: ws(:)
  real(real32), allocatable :: x(:, :), logits(:, :)
  character(len=:), allocatable :: model_path, in_path, out_path, arg
  character(len=512) :: msg
  integer(int64) :: n_bytes, n
  integer, allocatable :: sizes(:)
  integer :: stat, u, chunk, c, tid, n_bad, st, nt, l

  if (command_argument_count() < 3) call die('usage: predict_cli MODEL INPUT OUTPUT [CHUNK [RESAVE [QUANT]]]')
  model_path = argument(1); in_path = argument(2); out_path = argument(3)
  chunk = 0
  if (command_argument_count() >= 4) then
    arg = argument(4)
    read (arg, *, iostat=stat) chunk
    if (stat /= 0) call die('CHUNK must be an integer')
  end if

  call pykd_load_model(model_path, model, stat, msg)
  if (stat /= PYKD_OK) call die(msg)
  sizes = model%layer_sizes()
  do l = 1, model%n_layers()
    write (*, '(a,1x,a,1x,i0,1x,i0)') model%layer_kind(l), model%layer_activation(l), sizes(l), sizes(l + 1)
  end do

  open (newunit=u, file=in_path, access='stream', form='unformatted', status='old', action='read', iostat=stat)
  if (stat /= 0) call die('cannot open '//in_path)
  inquire (unit=u, size=n_bytes)
  if (mod(n_bytes, 4_int64 * model%n_features) /= 0) call die('input size is not a multiple of 4 * n_features')
  n = n_bytes / (4_int64 * model%n_features)
  allocate (x(model%n_features, n), logits(model%n_outputs, n))
  read (u) x
  close (u)

  if (command_argument_count() >= 6) then
    select case (argument(6))
    case ('dynamic')
      call pykd_quantize_model(model, stat, msg)
    case ('static')
      call pykd_quantize_model(model, stat, msg, calibration=x)
    case default
      call die('QUANT must be dynamic or static')
    end select
    if (stat /= PYKD_OK) call die(msg)
  end if

  if (chunk <= 0) then
    call pykd_predict(model, x, logits, stat, msg)
    if (stat /= PYKD_OK) call die(msg)
  else
    nt = 1
    !$ nt = omp_get_max_threads()
    allocate (ws(0:nt - 1))
    n_bad = 0
    !$omp parallel do schedule(dynamic) private(tid, st) reduction(+:n_bad)
    do c = 1, int(n), chunk
      tid = 0
      !$ tid = omp_get_thread_num()
      call pykd_predict(model, x(:, c:min(c + chunk - 1, int(n))), logits(:, c:min(c + chunk - 1, int(n))), &
                        st, work=ws(tid))
      if (st /= PYKD_OK) n_bad = n_bad + 1
    end do
    !$omp end parallel do
    if (n_bad > 0) call die('a chunked prediction failed')
  end if

  open (newunit=u, file=out_path, access='stream', form='unformatted', status='replace', action='write')
  write (u) logits
  close (u)

  if (command_argument_count() >= 5 .and. argument(5) /= '-') then
    call pykd_save_model(model, argument(5), stat, msg)
    if (stat /= PYKD_OK) call die(msg)
  end if

contains

  function argument(i) result(s)
    integer, intent(in) :: i
    character(len=:), allocatable :: s
    integer :: length
    call get_command_argument(i, length=length)
    allocate (character(len=length) :: s)
    call get_command_argument(i, s)
  end function argument

  subroutine die(text)
    character(len=*), intent(in) :: text
    write (error_unit, '(a)') 'predict_cli: '//trim(text)
    error stop 2
  end subroutine die

end program predict_cli
