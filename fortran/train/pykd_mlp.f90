!> A multilayer perceptron on one flat parameter buffer: inference and a
!! whole training step (forward, loss, backward, optimizer) in one call.
!!
!! Network: `sizes(1:L+1)` units per layer, `acts(1:L)` activation codes.
!! Parameter layout, for each layer l in order: W_l(sizes(l+1), sizes(l))
!! column-major, then b_l(sizes(l+1)); with a hint term, a regressor
!! R(n_t, sizes(k+1)) and c(n_t) follow. NumPy sees each W_l as a C-ordered
!! (n_in, n_out) view of the same memory. Gradients and optimizer state use
!! the same layout, so an update is a pass over contiguous memory.
!!
!! Each layer is updated right after its gradient is computed (its input
!! gradient first, with the old weights), while dW is still in cache; the
!! result is the same as updating all layers after the backward pass.
!!
!! For data-parallel training (issue 16) the step also comes in two halves:
!! `mlp_gradient` (forward, loss, backward into `grads`, no update) on a
!! shard of a global batch, and `mlp_apply_update` (the optimizer on the
!! whole buffer). Between them the caller sums the shards' gradients (MPI).
!! All three run the same code (`step_core`, and the elementwise kernels
!! sgd_step / adam_step per tile or on the whole buffer), so gradient +
!! update on the whole batch gives the bits of `mlp_train_step`.
module pykd_mlp
  use iso_fortran_env, only: real32, real64, int8, int64
  use ieee_arithmetic, only: ieee_is_finite
  use pykd_blas, only: sgemm
  use pykd_config, only: PAR_MIN_WORK, ACT_IDENTITY, ACT_TANH
  use pykd_dense, only: dense_forward
  use pykd_codes, only: ACT_SIGMOID, ACT_MAX
  use pykd_activation, only: apply_activation, activation_backward
  use pykd_codes, only: LOSS_CE, LOSS_KD, LOSS_MSE, LOSS_HUBER, LOSS_MSE_KD, LOSS_HUBER_KD
  use pykd_loss, only: cross_entropy, kd_loss, regression_loss
  use pykd_optim, only: sgd_step, adam_step
  use iso_c_binding, only: c_int
  use pykd_fp_env, only: flush_denormals_begin, flush_denormals_end
  use pykd_random, only: stream_key, dropout_fill
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC, set_status
  ! OPT_SGD (state1 = velocity), OPT_ADAM (state1 = m, state2 = v)
  use pykd_step_layers, only: OPT_SGD, OPT_ADAM, opt_args, team_threads, layer_forward, layer_backward
  implicit none
  private
  public :: train_config, LOSS_CE, LOSS_KD, LOSS_MSE, LOSS_HUBER, LOSS_MSE_KD, LOSS_HUBER_KD
  public :: OPT_SGD, OPT_ADAM
  public :: mlp_param_count, mlp_workspace_size, mlp_forward, mlp_train_step, dropout_multipliers
  public :: mlp_gradient, mlp_apply_update


  !> Everything a training step needs besides the arrays.
  type :: train_config
    integer :: loss = LOSS_CE
    real(real32) :: temperature = 4     !! KD temperature T
    real(real32) :: alpha = 0.1         !! KD weight of the hard-label (or target) term
    real(real32) :: huber_delta = 1     !! Huber threshold (LOSS_HUBER, LOSS_HUBER_KD)
    integer :: optimizer = OPT_ADAM
    real(real32) :: lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8
    real(real32) :: momentum = 0.9, weight_decay = 0
    real(real32) :: dropout = 0         !! drop probability on hidden layers
    integer(int64) :: seed = 0          !! dropout random stream
    integer :: hint_layer = 0           !! 0: no hint; k: output of layer k is hinted
    real(real32) :: hint_weight = 0     !! weight of the hint MSE
  end type train_config

  type :: view2
    real(real32), pointer, contiguous :: p(:, :) => null()
  end type view2

contains

  !> Number of parameters of the network (plus a hint regressor onto
  !! `n_hint` teacher units from the output of layer `hint_layer`).
  pure integer(int64) function mlp_param_count(sizes, hint_layer, n_hint) result(n)
    integer, intent(in) :: sizes(:)
    integer, intent(in) :: hint_layer, n_hint
    integer :: l
    n = 0
    do l = 1, size(sizes) - 1
      n = n + int(sizes(l), int64) * sizes(l + 1) + sizes(l + 1)
    end do
    if (hint_layer > 0) n = n + int(n_hint, int64) * sizes(hint_layer + 1) + n_hint
  end function mlp_param_count

  !> float32 workspace a training step on `n` samples needs: every layer's
  !! output, the dropped-out hidden outputs and their dropout multipliers,
  !! three gradient buffers and the hint residual.
  pure integer(int64) function mlp_workspace_size(sizes, n, n_hint) result(w)
    integer, intent(in) :: sizes(:)
    integer, intent(in) :: n, n_hint
    integer :: nl
    nl = size(sizes) - 1
    w = int(n, int64) * (sum(int(sizes(2:), int64)) + 2 * sum(int(sizes(2:nl), int64)) &
                         + 3 * maxval(sizes(2:)) + n_hint)
  end function mlp_workspace_size

  !> Inference: out = the output of layer `upto` (default: the last) for the
  !! batch x(sizes(1), n). Reads the parameters only, so concurrent calls with
  !! their own workspaces are safe. `work` needs 2 * maxval(sizes(2:)) * n
  !! floats; without it the call allocates its own.
  subroutine mlp_forward(sizes, acts, params, x, out, upto, work, stat, errmsg)
    integer, intent(in) :: sizes(:), acts(:)
    real(real32), intent(in), contiguous, target :: params(:)
    real(real32), intent(in), contiguous, target :: x(:, :)
    real(real32), intent(out), contiguous, target :: out(:, :)
    integer, intent(in), optional :: upto
    real(real32), intent(inout), contiguous, target, optional :: work(:)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), allocatable, target :: own(:)
    real(real32), pointer, contiguous :: buf(:), inp(:, :), res(:, :), w(:, :), b(:)
    integer(int64) :: off, half
    integer :: l, last, n, ierr, nt

    last = size(sizes) - 1
    if (present(upto)) last = upto
    n = size(x, 2)
    if (.not. valid_net(sizes, acts) .or. last < 1 .or. last > size(sizes) - 1) then
      call set_status(PYKD_ERR_ARG, 'mlp_forward: bad layer sizes, activations or upto', stat, errmsg)
      return
    end if
    if (size(params, kind=int64) /= mlp_param_count(sizes, 0, 0) .or. size(x, 1) /= sizes(1) &
        .or. size(out, 1) /= sizes(last + 1) .or. size(out, 2) /= n) then
      call set_status(PYKD_ERR_ARG, 'mlp_forward: params, x or out has the wrong size', stat, errmsg)
      return
    end if
    half = int(maxval(sizes(2:)), int64) * n
    if (present(work)) then
      if (size(work, kind=int64) < 2 * half) then
        call set_status(PYKD_ERR_ARG, 'mlp_forward: workspace too small', stat, errmsg)
        return
      end if
      buf => work
    else
      allocate (own(2 * half), stat=ierr)
      if (ierr /= 0) then
        call set_status(PYKD_ERR_ALLOC, 'mlp_forward: cannot allocate workspace', stat, errmsg)
        return
      end if
      buf => own
    end if

    nt = team_threads()
    inp => x
    off = 0
    do l = 1, last
      w(1:sizes(l + 1), 1:sizes(l)) => params(off + 1:off + int(sizes(l), int64) * sizes(l + 1))
      off = off + int(sizes(l), int64) * sizes(l + 1)
      b => params(off + 1:off + sizes(l + 1))
      off = off + sizes(l + 1)
      if (l == last) then
        res => out
      else
        ! Ping-pong between the two halves of the workspace.
        res(1:sizes(l + 1), 1:n) => buf(mod(l, 2) * half + 1:mod(l, 2) * half + int(sizes(l + 1), int64) * n)
      end if
      call act_forward(inp, w, b, acts(l), res, nt)
      inp => res
    end do
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine mlp_forward

  !> y = act(w x + b). sigmoid, gelu and silu go through pykd_activation
  !! (the inference kernel), so a trained model's outputs have the bits of
  !! its saved model's; pykd_dense fuses identity, relu and tanh only.
  subroutine act_forward(x, w, b, act, y, nt)
    real(real32), intent(in), contiguous :: x(:, :), w(:, :), b(:)
    integer, intent(in) :: act, nt
    real(real32), intent(out), contiguous :: y(:, :)

    if (act <= ACT_TANH) then
      call layer_forward(x, w, b, act, y, nt)
    else
      call layer_forward(x, w, b, ACT_IDENTITY, y, nt)
      call apply_activation(act, size(y, 1), size(y, 2), y)
    end if
  end subroutine act_forward

  pure logical function valid_net(sizes, acts)
    integer, intent(in) :: sizes(:), acts(:)
    valid_net = size(sizes) >= 2 .and. size(sizes) <= 64 .and. size(acts) == size(sizes) - 1
    if (valid_net) valid_net = all(sizes >= 1) .and. all(acts >= ACT_IDENTITY .and. acts <= ACT_MAX)
  end function valid_net

  !> m(i) = 0 with probability p, else 1 / (1 - p); m(i) is a hash of
  !! (seed, step, layer, flat index), see pykd_random. Computed once per
  !! step and kept for the backward pass (hashing costs more than storing).
  !! m(units, n) holds samples first + 1 .. first + n of the batch (first
  !! defaults to 0): the flat index of m(u, j) is (first + j - 1) * units
  !! + u - 1, so a shard of a batch draws what the whole batch draws there.
  subroutine dropout_multipliers(m, p, seed, step, layer, first)
    real(real32), intent(out), contiguous :: m(:, :)
    real(real32), intent(in) :: p
    integer(int64), intent(in) :: seed, step
    integer, intent(in) :: layer
    integer(int64), intent(in), optional :: first
    integer(int64) :: skip

    skip = 0
    ! hash32 reads the low 32 bits of key + index, so skipping the first
    ! entries is an offset of the key.
    if (present(first)) skip = first * size(m, 1)
    call dropout_fill(size(m, kind=int64), m, stream_key(seed, step, layer) + skip, p)
  end subroutine dropout_multipliers

  !> One training step on the batch x(sizes(1), n): forward (with dropout on
  !! hidden layers), loss (CE, or KD against teacher(classes, n); or, for the
  !! regression losses, MSE / Huber against targets(n_out, n), distilled
  !! against teacher outputs teacher(n_out, n) for LOSS_*_KD; plus the hint
  !! MSE against hint_target(n_t, n)), backward, and the optimizer update of
  !! params, in place. Regression losses do not read `labels` (any size) and
  !! give n_correct = 0; classification losses do not read `targets`.
  !! `step` counts from 1. On a non-finite loss nothing is updated and
  !! stat = PYKD_ERR_NONFINITE.
  subroutine mlp_train_step(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, &
                            work, loss, n_correct, teacher, hint_target, mask, stat, errmsg, targets)
    integer, intent(in) :: sizes(:), acts(:)
    real(real32), intent(inout), contiguous, target :: params(:), grads(:), state1(:), state2(:)
    real(real32), intent(in), contiguous, target :: x(:, :)
    integer(int64), intent(in) :: labels(:)
    type(train_config), intent(in) :: cfg
    integer(int64), intent(in) :: step
    real(real32), intent(inout), contiguous, target :: work(:)
    real(real32), intent(out) :: loss
    integer, intent(out) :: n_correct
    real(real32), intent(in), contiguous, optional :: teacher(:, :)
    real(real32), intent(in), contiguous, optional :: hint_target(:, :)
    integer(int8), intent(in), contiguous, optional :: mask(:)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), intent(in), contiguous, optional :: targets(:, :)
    integer(c_int) :: ftz

    call flush_denormals_begin(ftz)     ! subnormal results cost Intel cores ~100x (pykd_fp_env.c)
    call step_core(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
                   .true., size(x, 2), 0_int64, teacher, hint_target, stat, errmsg, targets, &
                   state1, state2, mask, 'mlp_train_step')
    call flush_denormals_end(ftz)
  end subroutine mlp_train_step

  !> The first half of a data-parallel step: forward, loss and backward on
  !! x(sizes(1), n), the samples first + 1 .. first + n of a global batch of
  !! n_global samples (defaults: the whole batch, first = 0), into `grads`;
  !! params is not changed. The loss is this shard's share of the global
  !! batch mean (its sum over the shard / n_global) and `grads` its gradient,
  !! so the shards' losses and gradients add up to the whole batch's (to
  !! rounding: only the sums over samples are split). Dropout draws each
  !! sample's multipliers from its position in the global batch. Arguments
  !! as in mlp_train_step; the sum of the shards' `grads` goes to
  !! mlp_apply_update. On a non-finite loss stat = PYKD_ERR_NONFINITE and
  !! `grads` is incomplete.
  subroutine mlp_gradient(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
                          teacher, hint_target, stat, errmsg, targets, n_global, first)
    integer, intent(in) :: sizes(:), acts(:)
    real(real32), intent(inout), contiguous, target :: params(:)  !! only read
    real(real32), intent(inout), contiguous, target :: grads(:)
    real(real32), intent(in), contiguous, target :: x(:, :)
    integer(int64), intent(in) :: labels(:)
    type(train_config), intent(in) :: cfg
    integer(int64), intent(in) :: step
    real(real32), intent(inout), contiguous, target :: work(:)
    real(real32), intent(out) :: loss
    integer, intent(out) :: n_correct
    real(real32), intent(in), contiguous, optional :: teacher(:, :)
    real(real32), intent(in), contiguous, optional :: hint_target(:, :)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), intent(in), contiguous, optional :: targets(:, :)
    integer, intent(in), optional :: n_global
    integer(int64), intent(in), optional :: first
    integer :: ng
    integer(int64) :: f
    integer(c_int) :: ftz

    ng = size(x, 2)
    if (present(n_global)) ng = n_global
    f = 0
    if (present(first)) f = first
    if (ng < size(x, 2) .or. f < 0 .or. f > ng - size(x, 2)) then
      loss = 0; n_correct = 0
      call set_status(PYKD_ERR_ARG, 'mlp_gradient: the shard (first, n) does not lie in the global '// &
                      'batch of n_global samples', stat, errmsg)
      return
    end if
    call flush_denormals_begin(ftz)
    call step_core(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
                   .false., ng, f, teacher, hint_target, stat, errmsg, targets, name='mlp_gradient')
    call flush_denormals_end(ftz)
  end subroutine mlp_gradient

  !> The second half of a data-parallel step: the optimizer update of the
  !! whole buffer params from grads (cfg%optimizer, its settings and cfg%lr;
  !! `step` counts from 1), with an optional mask, as mlp_train_step does.
  subroutine mlp_apply_update(params, grads, state1, state2, cfg, step, mask, stat, errmsg)
    real(real32), intent(inout), contiguous :: params(:), state1(:), state2(:)
    real(real32), intent(in), contiguous :: grads(:)
    type(train_config), intent(in) :: cfg
    integer(int64), intent(in) :: step
    integer(int8), intent(in), contiguous, optional :: mask(:)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int64) :: np
    integer(c_int) :: ftz

    np = size(params, kind=int64)
    if (size(grads, kind=int64) /= np .or. size(state1, kind=int64) /= np &
        .or. (cfg%optimizer == OPT_ADAM .and. size(state2, kind=int64) /= np)) then
      call set_status(PYKD_ERR_ARG, 'mlp_apply_update: grads or optimizer state has the wrong size', &
                      stat, errmsg)
      return
    end if
    if (present(mask)) then
      if (size(mask, kind=int64) /= np) then
        call set_status(PYKD_ERR_ARG, 'mlp_apply_update: mask has the wrong size', stat, errmsg)
        return
      end if
    end if
    if (cfg%optimizer /= OPT_ADAM .and. cfg%optimizer /= OPT_SGD) then
      call set_status(PYKD_ERR_ARG, 'mlp_apply_update: unknown optimizer', stat, errmsg)
      return
    end if
    if (step < 1) then
      call set_status(PYKD_ERR_ARG, 'mlp_apply_update: step must be >= 1', stat, errmsg)
      return
    end if
    call flush_denormals_begin(ftz)
    call optimizer_update(params, grads, state1, state2, cfg, step, mask)
    call flush_denormals_end(ftz)
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine mlp_apply_update

  !> The optimizer step of cfg on one contiguous range of the buffers (a
  !! layer in mlp_train_step, the whole buffer in mlp_apply_update).
  subroutine optimizer_update(params, grads, state1, state2, cfg, step, mask)
    real(real32), intent(inout), contiguous :: params(:), state1(:), state2(:)
    real(real32), intent(in), contiguous :: grads(:)
    type(train_config), intent(in) :: cfg
    integer(int64), intent(in) :: step
    integer(int8), intent(in), contiguous, optional :: mask(:)
    if (cfg%optimizer == OPT_ADAM) then
      call adam_step(params, grads, state1, state2, step, cfg%lr, cfg%beta1, cfg%beta2, cfg%eps, &
                     cfg%weight_decay, mask)
    else
      call sgd_step(params, grads, state1, cfg%lr, cfg%momentum, cfg%weight_decay, mask)
    end if
  end subroutine optimizer_update

  !> mlp_train_step (do_update) or mlp_gradient (not do_update; state1,
  !! state2 and mask absent) on the shard first + 1 .. first + n of a batch
  !! of n_global samples.
  subroutine step_core(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
                       do_update, n_global, first, teacher, hint_target, stat, errmsg, targets, &
                       state1, state2, mask, name)
    integer, intent(in) :: sizes(:), acts(:)
    real(real32), intent(inout), contiguous, target :: params(:), grads(:)
    real(real32), intent(in), contiguous, target :: x(:, :)
    integer(int64), intent(in) :: labels(:)
    type(train_config), intent(in) :: cfg
    integer(int64), intent(in) :: step
    real(real32), intent(inout), contiguous, target :: work(:)
    real(real32), intent(out) :: loss
    integer, intent(out) :: n_correct
    logical, intent(in) :: do_update
    integer, intent(in) :: n_global
    integer(int64), intent(in) :: first
    real(real32), intent(in), contiguous, optional :: teacher(:, :)
    real(real32), intent(in), contiguous, optional :: hint_target(:, :)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), intent(in), contiguous, optional :: targets(:, :)
    real(real32), intent(inout), contiguous, target, optional :: state1(:), state2(:)
    integer(int8), intent(in), contiguous, optional :: mask(:)
    character(len=*), intent(in) :: name

    type(view2) :: a(size(sizes) - 1), d(size(sizes) - 1), m(size(sizes) - 1)
    real(real32), pointer, contiguous :: inp(:, :), cur(:, :), nxt(:, :), z(:, :)
    real(real32), pointer, contiguous :: g1(:), g2(:), gt(:), gz(:)
    type(opt_args) :: opt
    real(real32), pointer, contiguous :: w(:, :), b(:), r(:, :), rw(:, :), dr(:, :)
    integer(int64) :: off_w(size(sizes)), off_r, pos, maxw, np, n_t
    integer :: l, nl, n, k, j, st, ni, no, nt, act
    real(real64) :: hint_sum
    real(real32) :: scale
    logical :: regress, distil

    nl = size(sizes) - 1
    n = size(x, 2)
    k = cfg%hint_layer
    loss = 0; n_correct = 0
    regress = cfg%loss == LOSS_MSE .or. cfg%loss == LOSS_HUBER .or. cfg%loss == LOSS_MSE_KD &
              .or. cfg%loss == LOSS_HUBER_KD
    distil = cfg%loss == LOSS_KD .or. cfg%loss == LOSS_MSE_KD .or. cfg%loss == LOSS_HUBER_KD
    if (.not. valid_net(sizes, acts)) then
      call set_status(PYKD_ERR_ARG, name//': bad layer sizes or activations', stat, errmsg)
      return
    end if
    n_t = 0
    if (k > 0 .and. present(hint_target)) n_t = size(hint_target, 1)
    np = mlp_param_count(sizes, k, int(n_t))
    if (size(params, kind=int64) /= np .or. size(grads, kind=int64) /= np) then
      call set_status(PYKD_ERR_ARG, name//': params or grads has the wrong size', stat, errmsg)
      return
    end if
    if (do_update .and. (size(state1, kind=int64) /= np &
        .or. (cfg%optimizer == OPT_ADAM .and. size(state2, kind=int64) /= np))) then
      call set_status(PYKD_ERR_ARG, name//': params, grads or optimizer state has the wrong size', &
                      stat, errmsg)
      return
    end if
    if (n < 1 .or. size(x, 1) /= sizes(1) .or. (.not. regress .and. size(labels) /= n) &
        .or. size(work, kind=int64) < mlp_workspace_size(sizes, n, int(n_t))) then
      call set_status(PYKD_ERR_ARG, name//': x, labels or workspace has the wrong size', &
                      stat, errmsg)
      return
    end if
    if (.not. (regress .or. cfg%loss == LOSS_CE .or. cfg%loss == LOSS_KD)) then
      call set_status(PYKD_ERR_ARG, name//': unknown loss', stat, errmsg)
      return
    end if
    if (distil) then
      if (.not. present(teacher)) then
        call set_status(PYKD_ERR_ARG, name//': distillation needs teacher outputs', stat, errmsg)
        return
      end if
      if (size(teacher, 1) /= sizes(nl + 1) .or. size(teacher, 2) /= n) then
        call set_status(PYKD_ERR_ARG, name//': teacher outputs have the wrong shape', stat, errmsg)
        return
      end if
    end if
    if (regress) then
      if (.not. present(targets)) then
        call set_status(PYKD_ERR_ARG, name//': a regression loss needs targets', stat, errmsg)
        return
      end if
      if (size(targets, 1) /= sizes(nl + 1) .or. size(targets, 2) /= n) then
        call set_status(PYKD_ERR_ARG, name//': targets have the wrong shape', stat, errmsg)
        return
      end if
    end if
    if (k < 0 .or. k > nl .or. (k > 0 .and. .not. present(hint_target))) then
      call set_status(PYKD_ERR_ARG, name//': bad hint layer or missing hint target', stat, errmsg)
      return
    end if
    if (k > 0) then
      if (size(hint_target, 2) /= n) then
        call set_status(PYKD_ERR_ARG, name//': hint target has the wrong shape', stat, errmsg)
        return
      end if
    end if
    if (present(mask)) then
      if (size(mask, kind=int64) /= np) then
        call set_status(PYKD_ERR_ARG, name//': mask has the wrong size', stat, errmsg)
        return
      end if
    end if
    if (.not. (cfg%dropout >= 0 .and. cfg%dropout < 1) .or. &
        (cfg%optimizer /= OPT_ADAM .and. cfg%optimizer /= OPT_SGD)) then
      call set_status(PYKD_ERR_ARG, name//': dropout outside [0, 1) or unknown optimizer', &
                      stat, errmsg)
      return
    end if

    ! Carve the workspace: layer outputs, dropped-out outputs, gradient buffers.
    pos = 0
    do l = 1, nl
      a(l)%p(1:sizes(l + 1), 1:n) => work(pos + 1:pos + int(sizes(l + 1), int64) * n)
      pos = pos + int(sizes(l + 1), int64) * n
    end do
    do l = 1, nl - 1
      d(l)%p(1:sizes(l + 1), 1:n) => work(pos + 1:pos + int(sizes(l + 1), int64) * n)
      pos = pos + int(sizes(l + 1), int64) * n
      m(l)%p(1:sizes(l + 1), 1:n) => work(pos + 1:pos + int(sizes(l + 1), int64) * n)
      pos = pos + int(sizes(l + 1), int64) * n
    end do
    maxw = maxval(sizes(2:))
    ! g1 holds d loss / d (layer output), g2 receives d loss / d (layer input);
    ! they swap after each layer.
    g1 => work(pos + 1:pos + maxw * n)
    g2 => work(pos + maxw * n + 1:pos + 2 * maxw * n)
    gz => work(pos + 2 * maxw * n + 1:pos + 3 * maxw * n)
    cur(1:sizes(nl + 1), 1:n) => g1
    pos = pos + 3 * maxw * n
    off_w(1) = 0
    do l = 1, nl
      off_w(l + 1) = off_w(l) + int(sizes(l), int64) * sizes(l + 1) + sizes(l + 1)
    end do
    off_r = off_w(nl + 1)

    ! Forward.
    nt = team_threads()
    inp => x
    do l = 1, nl
      call layer_views(params, l, w, b)
      call act_forward(inp, w, b, acts(l), a(l)%p, nt)
      inp => a(l)%p
      if (l < nl .and. cfg%dropout > 0) then
        call dropout_multipliers(m(l)%p, cfg%dropout, cfg%seed, step, l, first)
        d(l)%p = a(l)%p * m(l)%p
        inp => d(l)%p
      end if
    end do

    ! Loss and its gradient with respect to the outputs.
    select case (cfg%loss)
    case (LOSS_KD)
      call kd_loss(a(nl)%p, teacher, labels, cfg%temperature, cfg%alpha, loss, cur, st, n_mean=n_global)
    case (LOSS_CE)
      call cross_entropy(a(nl)%p, labels, loss, cur, st, n_mean=n_global)
    case (LOSS_MSE, LOSS_HUBER)
      call regression_loss(a(nl)%p, targets, cfg%loss == LOSS_HUBER, cfg%huber_delta, loss, cur, stat=st, &
                           n_mean=n_global)
    case default
      call regression_loss(a(nl)%p, targets, cfg%loss == LOSS_HUBER_KD, cfg%huber_delta, loss, cur, &
                           teacher, cfg%alpha, stat=st, n_mean=n_global)
    end select
    if (st /= PYKD_OK) then
      call set_status(st, name//': loss failed (labels out of range, bad alpha / Huber delta, '// &
                      'or non-finite outputs or targets)', stat, errmsg)
      return
    end if
    if (.not. regress) then
      do j = 1, n
        if (maxloc(a(nl)%p(:, j), 1) - 1 == labels(j)) n_correct = n_correct + 1
      end do
    end if

    ! Hint: residual r = R h_k + c - target; loss += w/(n n_t) |r|^2; dr = 2w/(n n_t) r
    ! (n: n_global, the samples of the whole batch).
    if (k > 0) then
      r(1:n_t, 1:n) => work(pos + 1:pos + n_t * n)
      rw(1:n_t, 1:sizes(k + 1)) => params(off_r + 1:off_r + n_t * sizes(k + 1))
      b => params(off_r + n_t * sizes(k + 1) + 1:off_r + n_t * sizes(k + 1) + n_t)
      call dense_forward(a(k)%p, rw, b, ACT_IDENTITY, r)
      r = r - hint_target
      hint_sum = 0
      do j = 1, n
        hint_sum = hint_sum + sum(real(r(:, j), real64)**2)
      end do
      loss = loss + real(cfg%hint_weight * hint_sum / (real(n_global, real64) * n_t), real32)
      scale = real(2 * cfg%hint_weight / (real(n_global, real64) * n_t), real32)
      r = scale * r
      dr => r
    end if
    if (.not. ieee_is_finite(loss)) then
      call set_status(PYKD_ERR_NONFINITE, name//': loss is not finite; parameters not updated', &
                      stat, errmsg)
      return
    end if

    ! Backward, updating each layer as soon as its gradients are known.
    opt = opt_args()                     ! OPT_NONE: gradient only (mlp_gradient)
    if (do_update) opt = opt_args(cfg%optimizer, cfg%lr, cfg%beta1, cfg%beta2, cfg%eps, cfg%momentum, &
                                  cfg%weight_decay, step)
    do l = nl, 1, -1
      no = sizes(l + 1); ni = sizes(l)
      if (l == k) call hint_backward()
      z(1:no, 1:n) => gz
      inp => x
      if (l > 1) then
        inp => a(l - 1)%p
        if (cfg%dropout > 0) inp => d(l - 1)%p
      end if
      act = acts(l)
      if (act > ACT_TANH) then
        call new_act_grad()
        act = ACT_IDENTITY
      end if
      if (l > 1) then
        nxt(1:ni, 1:n) => g2
        call layer_backward(cur, inp, a(l)%p, act, off_w(l), params, grads, opt, z, nt, &
                            state1, state2, dx=nxt, mask=mask)
      else
        call layer_backward(cur, inp, a(l)%p, act, off_w(l), params, grads, opt, z, nt, &
                            state1, state2, mask=mask)
      end if
      if (l > 1) then
        if (cfg%dropout > 0) nxt = nxt * m(l - 1)%p
        cur => nxt
        gt => g1; g1 => g2; g2 => gt
      end if
    end do
    call set_status(PYKD_OK, '', stat, errmsg)

  contains

    !> W_l and b_l of a buffer with the parameter layout, as 2-D/1-D views.
    subroutine layer_views(buf, layer, wv, bv)
      real(real32), intent(in), contiguous, target :: buf(:)
      integer, intent(in) :: layer
      real(real32), pointer, contiguous, intent(out) :: wv(:, :), bv(:)
      integer(int64) :: o, nw
      o = off_w(layer)
      nw = int(sizes(layer), int64) * sizes(layer + 1)
      wv(1:sizes(layer + 1), 1:sizes(layer)) => buf(o + 1:o + nw)
      bv => buf(o + nw + 1:o + nw + sizes(layer + 1))
    end subroutine layer_views

    !> Gradient of the hint term: dR = dr h_k^T, dc = sum(dr), and
    !! d loss / d h_k += R^T dr (before R is updated).
    subroutine hint_backward()
      real(real32), pointer, contiguous :: drw(:, :), dc(:)
      integer :: ns
      ns = sizes(k + 1)
      drw(1:n_t, 1:ns) => grads(off_r + 1:off_r + n_t * ns)
      dc => grads(off_r + n_t * ns + 1:off_r + n_t * ns + n_t)
      call sgemm('N', 'T', int(n_t), ns, n, 1.0_real32, dr, int(n_t), a(k)%p, ns, 0.0_real32, drw, int(n_t))
      dc = 0
      do j = 1, n
        dc = dc + dr(:, j)
      end do
      call sgemm('T', 'N', ns, n, int(n_t), 1.0_real32, rw, int(n_t), dr, int(n_t), 1.0_real32, cur, ns)
      call update(off_r + 1, off_r + n_t * ns + n_t)
    end subroutine hint_backward

    !> cur = d loss / d z of layer l for sigmoid, gelu and silu (whose
    !! derivative pykd_dense does not fuse). gelu and silu need z = w x + b:
    !! it is recomputed (layer l is not updated yet, so these are the
    !! forward's bits) into the dz buffer, which layer_backward overwrites
    !! afterwards; keeping it from the forward would cost a layer's output
    !! more workspace for every network.
    subroutine new_act_grad()
      real(real32), pointer, contiguous :: wl(:, :), bl(:)
      if (acts(l) /= ACT_SIGMOID) then
        call layer_views(params, l, wl, bl)
        call layer_forward(inp, wl, bl, ACT_IDENTITY, z, nt)
      end if
      call activation_backward(acts(l), no, n, a(l)%p, z, cur)
    end subroutine new_act_grad

    !> Optimizer step on params(lo:hi).
    subroutine update(lo, hi)
      integer(int64), intent(in) :: lo, hi
      if (.not. do_update) return
      if (cfg%optimizer == OPT_ADAM) then
        if (present(mask)) then
          call adam_step(params(lo:hi), grads(lo:hi), state1(lo:hi), state2(lo:hi), step, cfg%lr, &
                         cfg%beta1, cfg%beta2, cfg%eps, cfg%weight_decay, mask(lo:hi))
        else
          call adam_step(params(lo:hi), grads(lo:hi), state1(lo:hi), state2(lo:hi), step, cfg%lr, &
                         cfg%beta1, cfg%beta2, cfg%eps, cfg%weight_decay)
        end if
      else
        if (present(mask)) then
          call sgd_step(params(lo:hi), grads(lo:hi), state1(lo:hi), cfg%lr, cfg%momentum, &
                        cfg%weight_decay, mask(lo:hi))
        else
          call sgd_step(params(lo:hi), grads(lo:hi), state1(lo:hi), cfg%lr, cfg%momentum, &
                        cfg%weight_decay)
        end if
      end if
    end subroutine update

  end subroutine step_core

end module pykd_mlp
