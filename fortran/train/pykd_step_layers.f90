!> The dense layers of the training step (pykd_mlp), split across the
!! OpenMP team with single-threaded products, and the optimizer fused into
!! the weight gradient.
!!
!! A threaded BLAS forks and joins its threads in every product, and at the
!! batch-64 shapes of training it reaches only part of what two threads
!! running a product each can do. Here every thread of one team runs
!! single-threaded products on its own part of the layer:
!!   forward   rows i0:i1 of y = act(W x + b);
!!   backward  rows i0:i1 of dz = dy * act'(y) and db; then, after a barrier,
!!             input units j0:j1: dx(j0:j1, :) = W(:, j0:j1)^T dz and the
!!             columns j0:j1 of dW = dz x^T, in tiles that fit in L2, each
!!             tile followed by the optimizer step on W(:, tile) while dW is
!!             in cache (one pass over memory for p, m and v; dW is written
!!             once, no zeroing pass, no re-read).
!! No sum is split between threads, so the bits do not depend on the thread
!! count; each element is computed by the same product as in one unsplit call
!! (OpenBLAS and BLIS split M and N among threads, never K).
!!
!! The split needs a BLAS that runs a call made inside a parallel region on
!! the calling thread (pykd_blas_team_safe); with any other, one thread makes
!! each product and the BLAS threads it.
module pykd_step_layers
  use iso_c_binding, only: c_int
  use iso_fortran_env, only: real32, int8, int64
  !$ use omp_lib, only: omp_get_max_threads, omp_get_num_threads, omp_get_thread_num
  use pykd_blas, only: sgemm
  use pykd_dense, only: dense_forward, act_grad_rows, bias_act_rows, zero_fill
  use pykd_optim, only: sgd_step, adam_step
  implicit none
  private
  public :: OPT_NONE, OPT_SGD, OPT_ADAM, opt_args, team_threads, layer_forward, layer_backward

  integer, parameter :: OPT_NONE = -1 !! gradient only, no update
  integer, parameter :: OPT_SGD = 0   !! SGD with momentum (state1 = velocity)
  integer, parameter :: OPT_ADAM = 1  !! Adam (state1 = m, state2 = v)

  !> Rows and columns are split in multiples of this (whole cache lines).
  integer, parameter :: ALIGN = 16
  !> Below this many multiply-adds a layer runs on one thread: waking the
  !! team costs more than it saves.
  integer(int64), parameter :: SPLIT_MIN_MAC = 2000000
  !> Bytes of dW per tile, about one core's L2 (1 MiB on AMD Zen 5): the
  !! optimizer reads the tile back from L2 (or L3) right after its product,
  !! never from memory. Wider tiles mean fewer, larger products (each call
  !! packs the whole dz again): on Zen 5, one thread, process CPU time,
  !! 1 MiB took 0.95x the time of 256 KiB for a teacher step at batch 64 and
  !! 1024, 0.99x for the student; 2 MiB and untiled were within 1-2% of 1 MiB.
  integer, parameter :: TILE_BYTES = 1024 * 1024

  !> The optimizer applied to each layer's parameters right after its gradient.
  type :: opt_args
    integer :: kind = OPT_NONE
    real(real32) :: lr = 0, beta1 = 0, beta2 = 0, eps = 0, momentum = 0, weight_decay = 0
    integer(int64) :: step = 1
  end type opt_args

  interface
    integer(c_int) function blas_team_safe() bind(c, name='pykd_blas_team_safe')
      import :: c_int
    end function blas_team_safe
  end interface

contains

  !> Threads the layers may split across: the OpenMP team's size when the
  !! BLAS runs calls inside a parallel region on the calling thread, else 1.
  integer function team_threads() result(nt)
    nt = 1
    !$ if (blas_team_safe() /= 0) nt = omp_get_max_threads()
  end function team_threads

  !> y = act(w x + b) for x(n_in, n), w(n_out, n_in), on `nt` threads.
  subroutine layer_forward(x, w, b, act, y, nt)
    real(real32), intent(in), contiguous, target :: x(:, :), w(:, :)
    real(real32), intent(in), contiguous :: b(:)
    integer, intent(in) :: act, nt
    real(real32), intent(inout), contiguous, target :: y(:, :)
    real(real32), pointer, contiguous :: wf(:), yf(:)
    integer :: no, ni, n, i0, i1

    no = size(w, 1); ni = size(w, 2); n = size(x, 2)
    if (.not. worth_split(nt, no, ni, n)) then
      call dense_forward(x, w, b, act, y)
      return
    end if
    ! Flat views: a block starts at an element (w(i0, 1) is not allowed
    ! for an assumed-shape array).
    wf(1:size(w)) => w
    yf(1:size(y)) => y
    !$omp parallel num_threads(nt) private(i0, i1)
    call my_block(no, i0, i1)
    if (i1 >= i0) then
      call sgemm('N', 'N', i1 - i0 + 1, n, ni, 1.0_real32, wf(i0:), no, x, ni, 0.0_real32, &
                 yf(i0:), no)
      call bias_act_rows(no, n, i0, i1, y, b, act)
    end if
    !$omp end parallel
  end subroutine layer_forward

  !> Gradients of a dense layer whose parameters start after offset `off` of
  !! the flat buffers (W(n_out, n_in), then b), and the optimizer step
  !! `opt` on them (none when opt%kind is OPT_NONE): dz = dy * act'(y) into
  !! `dz`, dW and db into g, dx = W^T dz (with the old W) when present.
  subroutine layer_backward(dy, x, y, act, off, p, g, opt, dz, nt, s1, s2, dx, mask)
    real(real32), intent(in), contiguous :: dy(:, :)          !! (n_out, n)
    real(real32), intent(in), contiguous, target :: x(:, :)   !! (n_in, n)
    real(real32), intent(in), contiguous :: y(:, :)           !! (n_out, n), forward output
    integer, intent(in) :: act, nt
    integer(int64), intent(in) :: off
    real(real32), intent(inout), contiguous, target :: p(:), g(:)
    real(real32), intent(inout), contiguous, optional :: s1(:), s2(:) !! optimizer state
    type(opt_args), intent(in) :: opt
    real(real32), intent(inout), contiguous, target :: dz(:, :) !! (n_out, n)
    real(real32), intent(inout), contiguous, target, optional :: dx(:, :) !! (n_in, n)
    integer(int8), intent(in), contiguous, optional :: mask(:)
    integer :: no, ni, n, team
    integer(int64) :: nw
    logical :: tiled

    no = size(y, 1); ni = size(x, 1); n = size(x, 2)
    nw = int(no, int64) * ni
    team = 1
    if (worth_split(nt, no, ni, n)) team = nt
    ! Tiles need single-threaded products: a threaded BLAS would fork and
    ! join its threads for every tile.
    tiled = team > 1
    !$ tiled = tiled .or. (omp_get_max_threads() == 1 .and. blas_team_safe() /= 0)
    !$omp parallel num_threads(team) if(team > 1)
    call grad_rows(dy, y, act, dz, g(off + nw + 1:off + nw + no))
    !$omp barrier
    call grad_columns(x, dz, off, p, g, opt, tiled, s1, s2, dx, mask)
    !$omp end parallel
    call update(opt, off + nw + 1, off + nw + no, p, g, s1, s2, mask)
  end subroutine layer_backward

  !> This thread's rows of dz = dy * act'(y) and of db.
  subroutine grad_rows(dy, y, act, dz, db)
    real(real32), intent(in), contiguous :: dy(:, :), y(:, :)
    integer, intent(in) :: act
    real(real32), intent(inout), contiguous :: dz(:, :)
    real(real32), intent(inout) :: db(:)
    integer :: i0, i1

    call my_block(size(y, 1), i0, i1)
    if (i1 >= i0) call act_grad_rows(size(y, 1), size(y, 2), i0, i1, dy, y, act, dz, db)
  end subroutine grad_rows

  !> This thread's input units j0:j1: dx(j0:j1, :), then dW(:, j0:j1) tile by
  !! tile, each tile followed by the optimizer step on its weights.
  subroutine grad_columns(x, dz, off, p, g, opt, tiled, s1, s2, dx, mask)
    real(real32), intent(in), contiguous, target :: x(:, :), dz(:, :)
    integer(int64), intent(in) :: off
    real(real32), intent(inout), contiguous, target :: p(:), g(:)
    real(real32), intent(inout), contiguous, optional :: s1(:), s2(:)
    type(opt_args), intent(in) :: opt
    logical, intent(in) :: tiled
    real(real32), intent(inout), contiguous, target, optional :: dx(:, :)
    integer(int8), intent(in), contiguous, optional :: mask(:)
    real(real32), pointer, contiguous :: xf(:), dxf(:)
    integer :: no, ni, n, j0, j1, t0, t1, tile
    integer(int64) :: lo

    no = size(dz, 1); ni = size(x, 1); n = size(x, 2)
    call my_block(ni, j0, j1)
    if (j1 < j0) return
    xf(1:size(x)) => x
    if (present(dx)) then
      ! W(:, j0:j1) starts at p(off + (j0 - 1) * no + 1), leading dimension no.
      dxf(1:size(dx)) => dx
      lo = off + int(j0 - 1, int64) * no + 1
      call sgemm('T', 'N', j1 - j0 + 1, n, no, 1.0_real32, p(lo:), no, dz, no, 0.0_real32, &
                 dxf(j0:), ni)
    end if
    if (.not. tiled) then
      ! One threaded product. Zeroing dW here and accumulating into it gives
      ! the bits of beta = 0 and is faster: OpenBLAS 0.3.21's own zeroing
      ! pass over a whole dW took 7-10% of a training step.
      lo = off + int(j0 - 1, int64) * no + 1
      call zero_fill(int(j1 - j0 + 1, int64) * no, g(lo:))
      call sgemm('N', 'T', no, j1 - j0 + 1, n, 1.0_real32, dz, no, xf(j0:), ni, 1.0_real32, &
                 g(lo:), no)
      call update(opt, lo, off + int(j1, int64) * no, p, g, s1, s2, mask)
      return
    end if
    tile = max(ALIGN, TILE_BYTES / (4 * no) / ALIGN * ALIGN)
    do t0 = j0, j1, tile
      t1 = min(t0 + tile - 1, j1)
      lo = off + int(t0 - 1, int64) * no + 1
      call sgemm('N', 'T', no, t1 - t0 + 1, n, 1.0_real32, dz, no, xf(t0:), ni, 0.0_real32, &
                 g(lo:), no)
      call update(opt, lo, off + int(t1, int64) * no, p, g, s1, s2, mask)
    end do
  end subroutine grad_columns

  !> The optimizer step on p(lo:hi).
  subroutine update(opt, lo, hi, p, g, s1, s2, mask)
    type(opt_args), intent(in) :: opt
    integer(int64), intent(in) :: lo, hi
    real(real32), intent(inout), contiguous :: p(:)
    real(real32), intent(in), contiguous :: g(:)
    real(real32), intent(inout), contiguous, optional :: s1(:), s2(:)
    integer(int8), intent(in), contiguous, optional :: mask(:)

    select case (opt%kind)
    case (OPT_ADAM)
      if (present(mask)) then
        call adam_step(p(lo:hi), g(lo:hi), s1(lo:hi), s2(lo:hi), opt%step, opt%lr, opt%beta1, &
                       opt%beta2, opt%eps, opt%weight_decay, mask(lo:hi))
      else
        call adam_step(p(lo:hi), g(lo:hi), s1(lo:hi), s2(lo:hi), opt%step, opt%lr, opt%beta1, &
                       opt%beta2, opt%eps, opt%weight_decay)
      end if
    case (OPT_SGD)
      if (present(mask)) then
        call sgd_step(p(lo:hi), g(lo:hi), s1(lo:hi), opt%lr, opt%momentum, opt%weight_decay, &
                      mask(lo:hi))
      else
        call sgd_step(p(lo:hi), g(lo:hi), s1(lo:hi), opt%lr, opt%momentum, opt%weight_decay)
      end if
    end select
  end subroutine update

  logical function worth_split(nt, no, ni, n)
    integer, intent(in) :: nt, no, ni, n
    worth_split = nt > 1 .and. n > 1 .and. no >= 2 * ALIGN .and. ni >= 2 * ALIGN &
                  .and. int(no, int64) * ni * n >= SPLIT_MIN_MAC
  end function worth_split

  !> This thread's share i0:i1 of 1:m, in blocks of ALIGN (i1 < i0: none).
  subroutine my_block(m, i0, i1)
    integer, intent(in) :: m
    integer, intent(out) :: i0, i1
    integer :: nth, me, blocks, per, extra

    nth = 1; me = 0
    !$ nth = omp_get_num_threads(); me = omp_get_thread_num()
    blocks = (m + ALIGN - 1) / ALIGN
    per = blocks / nth; extra = mod(blocks, nth)
    i0 = (me * per + min(me, extra)) * ALIGN + 1
    i1 = min(m, i0 - 1 + (per + merge(1, 0, me < extra)) * ALIGN)
  end subroutine my_block

end module pykd_step_layers
