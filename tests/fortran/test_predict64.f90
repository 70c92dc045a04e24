!> Fortran-only tests of the real64 entry point of pykd_predict: it equals
!! the real32 entry point bit for bit after conversion (inputs rounded to
!! float32, outputs widened), through the generic name, the specific names
!! and the type-bound form, with and without a reused workspace, for a dense
!! model with normalisation and an int8-quantized one; and its errors.
program test_predict64
  use iso_fortran_env, only: real32, real64, int64
  use ieee_arithmetic, only: ieee_is_nan
  use pykd, only: pykd_model, pykd_workspace, pykd_predict, pykd_model_from_params, &
                  pykd_quantize_model, mlp_param_count, ACT_RELU, ACT_TANH, ACT_IDENTITY, &
                  PYKD_OK, PYKD_ERR_ARG
  use pykd_models, only: pykd_predict_r32, pykd_predict_r64
  use test_harness, only: check, finish
  use test_files, only: uniforms
  implicit none

  integer, parameter :: SIZES(4) = [7, 11, 9, 3], ACTS(3) = [ACT_TANH, ACT_RELU, ACT_IDENTITY]
  type(pykd_model) :: m
  real(real32), allocatable :: params(:)
  integer :: stat

  params = uniforms(int(mlp_param_count(SIZES, 0, 0)), 5_int64, 0.7)
  call pykd_model_from_params(SIZES, ACTS, params, m, mean=uniforms(7, 6_int64, 0.5), &
                              std=1.5 + uniforms(7, 7_int64, 1.0), out_mean=[1.0, -2.0, 3.0], &
                              out_std=[0.5, 2.0, 10.0], stat=stat)
  call check(stat == PYKD_OK, 'build a dense model with input and output normalisation')
  call test_same_bits(m, 'dense')
  call pykd_quantize_model(m, stat)
  call check(stat == PYKD_OK, 'quantize it to int8')
  call test_same_bits(m, 'int8')
  call test_errors(m)
  call finish('Fortran predict real64')

contains

  !> Inputs in double precision, with digits float32 cannot hold.
  function inputs(n, seed) result(x)
    integer, intent(in) :: n
    integer(int64), intent(in) :: seed
    real(real64) :: x(7, n)
    x = reshape(real(uniforms(7 * n, seed, 3.0), real64), [7, n]) + 1d-9 * reshape( &
        real(uniforms(7 * n, seed + 100, 1.0), real64), [7, n])
  end function inputs

  subroutine test_same_bits(model, what)
    type(pykd_model), intent(in) :: model
    character(len=*), intent(in) :: what
    type(pykd_workspace) :: ws
    real(real64) :: x(7, 50), y64(3, 50), y64b(3, 50), y64c(3, 50)
    real(real32) :: y32(3, 50)
    integer :: st1, st2, st3, st4, n

    x = inputs(50, 11_int64)
    call check(any(real(real(x, real32), real64) /= x), what//': the real64 inputs carry extra digits')
    call pykd_predict_r32(model, real(x, real32), y32, st1)
    call pykd_predict(model, x, y64, st2)
    call check(st1 == PYKD_OK .and. st2 == PYKD_OK .and. all(y64 == real(y32, real64)), &
               what//': generic real64 predict = real32 predict, bit for bit')
    call pykd_predict_r64(model, x, y64b, st3, work=ws)
    call model%predict(x, y64c, st4)
    call check(st3 == PYKD_OK .and. st4 == PYKD_OK .and. all(y64b == y64) .and. all(y64c == y64), &
               what//': specific and type-bound real64 entry points agree')
    ! The workspace's float32 copies are reused, then regrown for other shapes.
    do n = 50, 1, -7
      call pykd_predict(model, x(:, 1:n), y64b(:, 1:n), st3, work=ws)
      call pykd_predict_r32(model, real(x(:, 1:n), real32), y32(:, 1:n), st1, work=ws)
      if (st3 /= PYKD_OK .or. st1 /= PYKD_OK .or. any(y64b(:, 1:n) /= real(y32(:, 1:n), real64))) exit
    end do
    call check(n < 1, what//': same bits with one workspace reused over batch sizes 50 .. 1')
    call check(allocated(ws%x32) .and. allocated(ws%work), what//': the workspace keeps its buffers')
  end subroutine test_same_bits

  subroutine test_errors(model)
    type(pykd_model), intent(in) :: model
    type(pykd_model) :: empty
    real(real64) :: x(7, 4), bad_x(6, 4), y(3, 4), bad_y(2, 4)
    character(len=256) :: msg
    integer :: st

    x = inputs(4, 21_int64)
    bad_x = 0
    call pykd_predict(model, bad_x, y, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'x must be (7, n)') > 0 &
               .and. index(msg, 'got x (6, 4)') > 0, 'real64: a wrong x shape is named')
    call pykd_predict(model, x, bad_y, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'logits (2, 4)') > 0, &
               'real64: a wrong output shape is named')
    x(3, 2) = 1d300
    call pykd_predict(model, x, y, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'beyond the float32 range') > 0, &
               'real64: a finite value beyond float32 is an error, not an infinity')
    call pykd_predict(model, x, y)
    call check(all(ieee_is_nan(y)), 'real64: without stat a failure gives NaN outputs')
    call pykd_predict(empty, inputs(4, 22_int64), y, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'not loaded') > 0, 'real64: an unloaded model is an error')
  end subroutine test_errors

end program test_predict64
