!> Dense (fully connected) layer: forward and backward.
!!
!! Layout is column-major with one sample per column: `x(n_in, n)`,
!! `w(n_out, n_in)`, `y(n_out, n)`. This is the same memory as NumPy's
!! C-ordered `x (n, n_in)`, `W (n_in, n_out)`, `y (n, n_out)`, so Python passes
!! transposed views and nothing is copied. The products go through sgemm; the
!! bias, activation and its derivative are fused into one pass over `y`.
module pykd_dense
  use iso_fortran_env, only: real32, int32, int64
  use pykd_blas, only: sgemm, sgemv
  use pykd_config, only: PAR_MIN_WORK, ACT_IDENTITY, ACT_RELU, ACT_TANH
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_ALLOC, set_status
  implicit none
  private
  public :: dense_forward, dense_backward, bias_activation, activation_grad
  public :: act_grad_rows, bias_act_rows, zero_fill

  !> Rows per OpenMP work item in the backward pass: each thread owns whole
  !! rows, so `db` is summed in the same order whatever the thread count.
  integer, parameter :: ROW_BLOCK = 64
  !> The bits of 1.0 (float32).
  integer(int32), parameter :: ONE_BITS = transfer(1.0_real32, 0_int32)

contains

  !> y = act(w x + b)
  subroutine dense_forward(x, w, b, act, y, stat, errmsg)
    real(real32), intent(in), contiguous :: x(:, :)  !! (n_in, n)
    real(real32), intent(in), contiguous :: w(:, :)  !! (n_out, n_in)
    real(real32), intent(in) :: b(:)                 !! (n_out)
    integer, intent(in) :: act                       !! ACT_IDENTITY, ACT_RELU or ACT_TANH
    real(real32), intent(out), contiguous :: y(:, :) !! (n_out, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer :: n_in, n_out, n

    n_in = size(w, 2); n_out = size(w, 1); n = size(x, 2)
    if (size(x, 1) /= n_in .or. size(b) /= n_out .or. size(y, 1) /= n_out &
        .or. size(y, 2) /= n .or. act < ACT_IDENTITY .or. act > ACT_TANH) then
      call set_status(PYKD_ERR_ARG, 'dense_forward: inconsistent sizes or unknown activation', &
                      stat, errmsg)
      return
    end if
    call set_status(PYKD_OK, '', stat, errmsg)
    if (n == 0 .or. n_out == 0) return
    if (n_in == 0) then
      y = 0
    else if (n == 1) then
      ! One sample: sgemv streams W once; sgemm with n = 1 is several times slower.
      call sgemv('N', n_out, n_in, 1.0_real32, w, n_out, x, 1, 0.0_real32, y, 1)
    else
      call sgemm('N', 'N', n_out, n, n_in, 1.0_real32, w, n_out, x, n_in, 0.0_real32, y, n_out)
    end if
    call bias_activation(y, b, act)
  end subroutine dense_forward

  !> y = act(y + b), in place, one pass.
  subroutine bias_activation(y, b, act)
    real(real32), intent(inout), contiguous :: y(:, :) !! (n_out, n)
    real(real32), intent(in) :: b(:)                   !! (n_out)
    integer, intent(in) :: act

    call bias_act(size(y, 1), size(y, 2), y, b, act)
  end subroutine bias_activation

  !> dz = dy * act'(y) and db = sum of dz over samples, in one pass.
  !!
  !! The derivative is taken from the forward output `y`: relu' = [y > 0],
  !! tanh' = 1 - y**2. With ACT_IDENTITY, dz = dy. NaN in dy propagates to dz
  !! (relu: dy * 0 is NaN), as in the NumPy twin.
  subroutine activation_grad(dy, y, act, dz, db)
    real(real32), intent(in), contiguous :: dy(:, :), y(:, :) !! (n_out, n)
    integer, intent(in) :: act
    real(real32), intent(out), contiguous :: dz(:, :)        !! (n_out, n)
    real(real32), intent(out) :: db(:)                       !! (n_out)

    call act_grad(size(dy, 1), size(dy, 2), dy, y, act, dz, db)
  end subroutine activation_grad

  ! The loops take explicit-shape arrays: inside an OpenMP region gfortran 12
  ! forgets that an assumed-shape column is contiguous and vectorizes it with
  ! element-by-element gathers (see pykd_optim).

  subroutine bias_act(m, n, y, b, act)
    integer, intent(in) :: m, n, act
    real(real32), intent(inout) :: y(m, n)
    real(real32), intent(in) :: b(m)
    integer :: i, j
    real(real32) :: z

    !$omp parallel do schedule(static) private(i, z) if(int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      select case (act)
      case (ACT_RELU)
        ! Not max(z, 0): gfortran's max returns 0 for a NaN z. z < 0 is false
        ! for NaN, so NaN is kept; -0.0 stays -0.0 (as np.maximum).
        do i = 1, m
          z = y(i, j) + b(i)
          y(i, j) = merge(0.0_real32, z, z < 0)
        end do
      case (ACT_TANH)
        ! One element at a time: vectorized, gfortran calls glibc's SIMD
        ! tanhf, whose bits differ between the baseline and avx2 builds.
        !GCC$ novector
        do i = 1, m
          y(i, j) = tanh(y(i, j) + b(i))
        end do
      case default
        y(:, j) = y(:, j) + b
      end select
    end do
    !$omp end parallel do
  end subroutine bias_act

  !> a(1:n) = 0, on the team when n is large.
  subroutine zero_fill(n, a)
    integer(int64), intent(in) :: n
    real(real32), intent(out) :: a(n)
    integer(int64) :: i

    !$omp parallel do simd schedule(static) if(parallel: n >= PAR_MIN_WORK)
    do i = 1, n
      a(i) = 0
    end do
    !$omp end parallel do simd
  end subroutine zero_fill

  subroutine act_grad(m, n, dy, y, act, dz, db)
    integer, intent(in) :: m, n, act
    real(real32), intent(in) :: dy(m, n), y(m, n)
    real(real32), intent(out) :: dz(m, n), db(m)
    integer :: i0

    !$omp parallel do schedule(static) if(int(m, int64) * n >= PAR_MIN_WORK)
    do i0 = 1, m, ROW_BLOCK
      call act_grad_rows(m, n, i0, min(i0 + ROW_BLOCK - 1, m), dy, y, act, dz, db)
    end do
    !$omp end parallel do
  end subroutine act_grad

  !> Rows i0:i1 of dz = dy * act'(y) and of db (the other rows untouched).
  subroutine act_grad_rows(m, n, i0, i1, dy, y, act, dz, db)
    integer, intent(in) :: m, n, i0, i1, act
    real(real32), intent(in) :: dy(m, n), y(m, n)
    real(real32), intent(inout) :: dz(m, n), db(m)
    integer :: i, j

    db(i0:i1) = 0
    do j = 1, n
      select case (act)
      case (ACT_RELU)
        ! dy * [y > 0], a product as in the NumPy twin: a NaN or inf in dy
        ! gives NaN where the unit is off, instead of a hidden 0. [y > 0]
        ! is made from bits: a merge of two floats here stays a branch
        ! (3-5x slower), a merge of two integer constants vectorizes.
        do i = i0, i1
          dz(i, j) = dy(i, j) * transfer(iand(ONE_BITS, merge(-1_int32, 0_int32, y(i, j) > 0)), &
                                         1.0_real32)
        end do
      case (ACT_TANH)
        dz(i0:i1, j) = dy(i0:i1, j) * (1 - y(i0:i1, j)**2)
      case default
        dz(i0:i1, j) = dy(i0:i1, j)
      end select
      db(i0:i1) = db(i0:i1) + dz(i0:i1, j)
    end do
  end subroutine act_grad_rows

  !> Rows i0:i1 of y = act(y + b), in place (bias_act on a block of rows).
  subroutine bias_act_rows(m, n, i0, i1, y, b, act)
    integer, intent(in) :: m, n, i0, i1, act
    real(real32), intent(inout) :: y(m, n)
    real(real32), intent(in) :: b(m)
    integer :: i, j
    real(real32) :: z

    do j = 1, n
      select case (act)
      case (ACT_RELU)
        do i = i0, i1  ! as in bias_act: NaN kept, -0.0 stays -0.0
          z = y(i, j) + b(i)
          y(i, j) = merge(0.0_real32, z, z < 0)
        end do
      case (ACT_TANH)
        !GCC$ novector
        do i = i0, i1  ! as in bias_act: the same bits in every simd build
          y(i, j) = tanh(y(i, j) + b(i))
        end do
      case default
        y(i0:i1, j) = y(i0:i1, j) + b(i0:i1)
      end select
    end do
  end subroutine bias_act_rows

  !> Gradients of a dense layer from the upstream gradient `dy`.
  !!
  !! dz = dy * act'(y); dw = dz x^T; db = sum_j dz(:, j); dx = w^T dz.
  !! `dx` is optional because the first layer does not need it. `work`
  !! (n_out, n) holds dz; pass it to avoid an allocation per call.
  subroutine dense_backward(dy, x, w, y, act, dw, db, dx, work, stat, errmsg)
    real(real32), intent(in), contiguous :: dy(:, :) !! (n_out, n)
    real(real32), intent(in), contiguous :: x(:, :)  !! (n_in, n)
    real(real32), intent(in), contiguous :: w(:, :)  !! (n_out, n_in)
    real(real32), intent(in), contiguous :: y(:, :)  !! (n_out, n), forward output
    integer, intent(in) :: act
    real(real32), intent(out), contiguous :: dw(:, :) !! (n_out, n_in)
    real(real32), intent(out) :: db(:)                !! (n_out)
    real(real32), intent(out), contiguous, optional :: dx(:, :)             !! (n_in, n)
    real(real32), intent(inout), contiguous, optional, target :: work(:, :) !! (n_out, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), allocatable, target :: own_work(:, :)
    real(real32), pointer, contiguous :: dz(:, :)
    integer :: n_in, n_out, n, ierr
    logical :: bad

    n_in = size(w, 2); n_out = size(w, 1); n = size(x, 2)
    bad = size(x, 1) /= n_in .or. any(shape(dy) /= [n_out, n]) .or. any(shape(y) /= [n_out, n]) &
          .or. any(shape(dw) /= [n_out, n_in]) .or. size(db) /= n_out &
          .or. act < ACT_IDENTITY .or. act > ACT_TANH
    if (present(dx)) bad = bad .or. any(shape(dx) /= [n_in, n])
    if (present(work)) bad = bad .or. size(work) < n_out * n
    if (bad) then
      call set_status(PYKD_ERR_ARG, 'dense_backward: inconsistent sizes or unknown activation', &
                      stat, errmsg)
      return
    end if
    call set_status(PYKD_OK, '', stat, errmsg)
    if (n_out == 0) return
    if (n == 0) then
      dw = 0; db = 0
      return
    end if

    if (present(work)) then
      dz(1:n_out, 1:n) => work
    else
      allocate (own_work(n_out, n), stat=ierr)
      if (ierr /= 0) then
        call set_status(PYKD_ERR_ALLOC, 'dense_backward: cannot allocate workspace', stat, errmsg)
        return
      end if
      dz => own_work
    end if

    call activation_grad(dy, y, act, dz, db)
    if (n_in == 0) return
    ! Zeroing dw here and accumulating into it (beta = 1) gives the same bits as
    ! beta = 0 and is faster: OpenBLAS 0.3.21's own zeroing pass took 7-10% of
    ! a training step.
    call zero_fill(int(n_out, int64) * n_in, dw)
    call sgemm('N', 'T', n_out, n_in, n, 1.0_real32, dz, n_out, x, n_in, 1.0_real32, dw, n_out)
    if (present(dx)) then
      call sgemm('T', 'N', n_in, n, n_out, 1.0_real32, w, n_out, dz, n_out, 0.0_real32, dx, n_in)
    end if
  end subroutine dense_backward

end module pykd_dense
