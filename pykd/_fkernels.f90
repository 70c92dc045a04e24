! The only file f2py reads: plain subroutines over the pykd modules.
!
! Rules that keep f2py from corrupting data (see ENGINEERING.md):
! - kinds are iso_c_binding names or literal integer(1); the build fails if
!   f2py has to guess a kind;
! - arrays are declared with the Fortran (transposed) shapes of NumPy's
!   C-ordered arrays, and Python passes `a.T`, so nothing is copied;
! - outputs are intent(inout) arrays allocated by Python: f2py refuses,
!   rather than copies, an array of the wrong dtype or order;
! - dimensions are intent(hide): f2py derives and checks them;
! - every routine releases the GIL (threadsafe) and returns a status.

subroutine dense_forward(x, w, b, act, y, n_in, n_out, n, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_dense, only: impl => dense_forward
  implicit none
  integer(c_int), intent(in) :: n_in, n_out, n, act
  real(c_float), intent(in) :: x(n_in, n), w(n_out, n_in), b(n_out)
  real(c_float), intent(inout) :: y(n_out, n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n_in, n_out, n
  call impl(x, w, b, act, y, stat)
end subroutine dense_forward

subroutine dense_backward(dy, x, w, y, act, dw, db, dx, n_in, n_out, n, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_dense, only: impl => dense_backward
  implicit none
  integer(c_int), intent(in) :: n_in, n_out, n, act
  real(c_float), intent(in) :: dy(n_out, n), x(n_in, n), w(n_out, n_in), y(n_out, n)
  real(c_float), intent(inout) :: dw(n_out, n_in), db(n_out), dx(n_in, n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n_in, n_out, n
  call impl(dy, x, w, y, act, dw, db, dx=dx, stat=stat)
end subroutine dense_backward

subroutine dense_backward_nodx(dy, x, w, y, act, dw, db, n_in, n_out, n, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_dense, only: impl => dense_backward
  implicit none
  integer(c_int), intent(in) :: n_in, n_out, n, act
  real(c_float), intent(in) :: dy(n_out, n), x(n_in, n), w(n_out, n_in), y(n_out, n)
  real(c_float), intent(inout) :: dw(n_out, n_in), db(n_out)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n_in, n_out, n
  call impl(dy, x, w, y, act, dw, db, stat=stat)
end subroutine dense_backward_nodx

subroutine softmax(z, t, take_log, p, c, n, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_softmax, only: softmax_impl => softmax, log_softmax_impl => log_softmax
  implicit none
  integer(c_int), intent(in) :: c, n, take_log
  real(c_float), intent(in) :: z(c, n), t
  real(c_float), intent(inout) :: p(c, n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: c, n
  if (take_log /= 0) then
    call log_softmax_impl(z, t, p, stat)
  else
    call softmax_impl(z, t, p, stat)
  end if
end subroutine softmax

subroutine cross_entropy(z, labels, dz, c, n, loss, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_loss, only: impl => cross_entropy
  implicit none
  integer(c_int), intent(in) :: c, n
  real(c_float), intent(in) :: z(c, n)
  integer(c_int64_t), intent(in) :: labels(n)
  real(c_float), intent(inout) :: dz(c, n)
  real(c_float), intent(out) :: loss
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: c, n
  call impl(z, labels, loss, dz, stat)
end subroutine cross_entropy

subroutine kd_loss(s, t, labels, temperature, alpha, ds, c, n, loss, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_loss, only: impl => kd_loss
  implicit none
  integer(c_int), intent(in) :: c, n
  real(c_float), intent(in) :: s(c, n), t(c, n), temperature, alpha
  integer(c_int64_t), intent(in) :: labels(n)
  real(c_float), intent(inout) :: ds(c, n)
  real(c_float), intent(out) :: loss
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: c, n
  call impl(s, t, labels, temperature, alpha, loss, ds, stat)
end subroutine kd_loss

subroutine sgd_step(p, g, vel, lr, momentum, weight_decay, n, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_optim, only: impl => sgd_step
  implicit none
  integer(c_int64_t), intent(in) :: n
  real(c_float), intent(inout) :: p(n), vel(n)
  real(c_float), intent(in) :: g(n), lr, momentum, weight_decay
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  call impl(p, g, vel, lr, momentum, weight_decay, stat=stat)
end subroutine sgd_step

subroutine sgd_step_masked(p, g, vel, lr, momentum, weight_decay, mask, n, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_optim, only: impl => sgd_step
  implicit none
  integer(c_int64_t), intent(in) :: n
  real(c_float), intent(inout) :: p(n), vel(n)
  real(c_float), intent(in) :: g(n), lr, momentum, weight_decay
  integer(1), intent(in) :: mask(n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  call impl(p, g, vel, lr, momentum, weight_decay, mask, stat)
end subroutine sgd_step_masked

subroutine adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, n, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_optim, only: impl => adam_step
  implicit none
  integer(c_int64_t), intent(in) :: n, step
  real(c_float), intent(inout) :: p(n), m(n), v(n)
  real(c_float), intent(in) :: g(n), lr, beta1, beta2, eps, weight_decay
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  call impl(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, stat=stat)
end subroutine adam_step

subroutine adam_step_masked(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, mask, n, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_optim, only: impl => adam_step
  implicit none
  integer(c_int64_t), intent(in) :: n, step
  real(c_float), intent(inout) :: p(n), m(n), v(n)
  real(c_float), intent(in) :: g(n), lr, beta1, beta2, eps, weight_decay
  integer(1), intent(in) :: mask(n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  call impl(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, mask, stat)
end subroutine adam_step_masked

subroutine magnitude_mask(w, k, mask, n, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_prune, only: impl => magnitude_mask
  implicit none
  integer(c_int64_t), intent(in) :: n, k
  real(c_float), intent(in) :: w(n)
  integer(1), intent(inout) :: mask(n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  call impl(w, k, mask, stat)
end subroutine magnitude_mask

subroutine prune_magnitudes(w, mags, n, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_prune, only: magnitudes
  implicit none
  integer(c_int64_t), intent(in) :: n
  real(c_float), intent(in) :: w(n)
  real(c_float), intent(inout) :: mags(n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  call magnitudes(w, mags, stat)
end subroutine prune_magnitudes

subroutine prune_select(a, k, n, kth, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG
  use pykd_prune, only: select_kth
  implicit none
  integer(c_int64_t), intent(in) :: n, k
  real(c_float), intent(inout) :: a(n)
  real(c_float), intent(out) :: kth
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n
  kth = 0
  stat = PYKD_ERR_ARG
  if (k < 1 .or. k > n) return
  stat = PYKD_OK
  call select_kth(a, k, kth)
end subroutine prune_select

subroutine prune_count_below(w, tau, n, below)
  use iso_c_binding, only: c_float, c_int64_t
  use pykd_prune, only: count_below
  implicit none
  integer(c_int64_t), intent(in) :: n
  real(c_float), intent(in) :: w(n), tau
  integer(c_int64_t), intent(out) :: below
  !f2py threadsafe
  !f2py intent(hide) :: n
  below = count_below(w, tau)
end subroutine prune_count_below

subroutine prune_apply(w, tau, ties, mask, n)
  use iso_c_binding, only: c_float, c_int64_t
  use pykd_prune, only: mask_from_threshold
  implicit none
  integer(c_int64_t), intent(in) :: n
  real(c_float), intent(in) :: w(n), tau
  integer(c_int64_t), intent(inout) :: ties
  integer(1), intent(inout) :: mask(n)
  !f2py threadsafe
  !f2py intent(hide) :: n
  !f2py intent(in, out) :: ties
  call mask_from_threshold(w, tau, ties, mask)
end subroutine prune_apply

subroutine quantize_weights(w, q, scale, n_out, n_in, n_scale, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_quant, only: impl => quantize_weights
  implicit none
  integer(c_int), intent(in) :: n_out, n_in, n_scale
  real(c_float), intent(in) :: w(n_out, n_in)
  integer(1), intent(inout) :: q(n_out, n_in)
  real(c_float), intent(inout) :: scale(n_scale)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n_out, n_in, n_scale
  call impl(w, q, scale, stat)
end subroutine quantize_weights

subroutine dequantize_weights(q, scale, w, n_out, n_in, n_scale, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_quant, only: impl => dequantize_weights
  implicit none
  integer(c_int), intent(in) :: n_out, n_in, n_scale
  integer(1), intent(in) :: q(n_out, n_in)
  real(c_float), intent(in) :: scale(n_scale)
  real(c_float), intent(inout) :: w(n_out, n_in)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n_out, n_in, n_scale
  call impl(q, scale, w, stat)
end subroutine dequantize_weights

subroutine quantize_activations(x, qx, sx, n_in, n, stat)
  use iso_c_binding, only: c_float, c_int
  use pykd_quant, only: quantize_columns
  implicit none
  integer(c_int), intent(in) :: n_in, n
  real(c_float), intent(in) :: x(n_in, n)
  integer(1), intent(inout) :: qx(n_in, n)
  real(c_float), intent(inout) :: sx(n)
  integer(c_int), intent(out) :: stat
  !f2py threadsafe
  !f2py intent(hide) :: n_in, n
  call quantize_columns(x, qx, sx, stat)
end subroutine quantize_activations

subroutine mlp_workspace_size(sizes, batch, n_hint, nl1, words)
  use iso_c_binding, only: c_int, c_int64_t
  use pykd_mlp, only: impl => mlp_workspace_size
  implicit none
  integer(c_int), intent(in) :: nl1, batch, n_hint
  integer(c_int), intent(in) :: sizes(nl1)
  integer(c_int64_t), intent(out) :: words
  !f2py intent(hide) :: nl1
  words = impl(sizes, batch, n_hint)
end subroutine mlp_workspace_size

! One training step. Arrays that a configuration does not use (teacher
! logits without KD, hint target without a hint, mask) are passed as 1x1 /
! size-1 placeholders and flagged off by use_teacher / use_hint / use_mask.
! Float targets (n_out, n) are the regression losses' labels (docs/regression.md).
subroutine mlp_train_step(sizes, acts, params, grads, state1, state2, x, labels, &
                          teacher, use_teacher, hint_target, use_hint, mask, use_mask, targets, &
                          loss_kind, temperature, alpha, huber_delta, optimizer, lr, beta1, beta2, eps, &
                          momentum, weight_decay, dropout, seed, hint_layer, hint_weight, step, work, &
                          nl1, nl, np, n_in, n, nlab, tc, tn, hc, hn, yc, yn, nm, nw, loss, n_correct, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_mlp, only: impl => mlp_train_step, train_config
  implicit none
  integer(c_int), intent(in) :: nl1, nl, n_in, n, nlab, tc, tn, hc, hn, yc, yn
  integer(c_int64_t), intent(in) :: np, nm, nw
  integer(c_int), intent(in) :: sizes(nl1), acts(nl)
  real(c_float), intent(inout) :: params(np), grads(np), state1(np), state2(np), work(nw)
  real(c_float), intent(in) :: x(n_in, n), teacher(tc, tn), hint_target(hc, hn), targets(yc, yn)
  integer(c_int64_t), intent(in) :: labels(nlab)
  integer(1), intent(in) :: mask(nm)
  integer(c_int), intent(in) :: use_teacher, use_hint, use_mask, loss_kind, optimizer, hint_layer
  real(c_float), intent(in) :: temperature, alpha, huber_delta, lr, beta1, beta2, eps, momentum
  real(c_float), intent(in) :: weight_decay, dropout, hint_weight
  integer(c_int64_t), intent(in) :: seed, step
  real(c_float), intent(out) :: loss
  integer(c_int), intent(out) :: n_correct, stat
  type(train_config) :: cfg
  ! Either labels (regression) or targets (classification) is a placeholder:
  ! the step reads only the one its loss needs.
  !f2py threadsafe
  !f2py intent(hide) :: nl1, nl, np, n_in, n, nlab, tc, tn, hc, hn, yc, yn, nm, nw
  cfg = train_config(loss=loss_kind, temperature=temperature, alpha=alpha, huber_delta=huber_delta, &
                     optimizer=optimizer, &
                     lr=lr, beta1=beta1, beta2=beta2, eps=eps, momentum=momentum, &
                     weight_decay=weight_decay, dropout=dropout, seed=seed, &
                     hint_layer=hint_layer, hint_weight=hint_weight)
  if (use_teacher /= 0 .and. use_hint /= 0 .and. use_mask /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              teacher=teacher, hint_target=hint_target, mask=mask, stat=stat, targets=targets)
  else if (use_teacher /= 0 .and. use_hint /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              teacher=teacher, hint_target=hint_target, stat=stat, targets=targets)
  else if (use_teacher /= 0 .and. use_mask /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              teacher=teacher, mask=mask, stat=stat, targets=targets)
  else if (use_hint /= 0 .and. use_mask /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              hint_target=hint_target, mask=mask, stat=stat, targets=targets)
  else if (use_teacher /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              teacher=teacher, stat=stat, targets=targets)
  else if (use_hint /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              hint_target=hint_target, stat=stat, targets=targets)
  else if (use_mask /= 0) then
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              mask=mask, stat=stat, targets=targets)
  else
    call impl(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, work, loss, n_correct, &
              stat=stat, targets=targets)
  end if
end subroutine mlp_train_step

! The two halves of a data-parallel step (pykd_mlp): the gradient of a shard
! (rows first .. first + n - 1 of a global batch of n_global rows; the loss is
! the shard's share of the global mean), and the optimizer update of the
! whole buffer. Placeholders and flags as in mlp_train_step.
subroutine mlp_gradient(sizes, acts, params, grads, x, labels, &
                        teacher, use_teacher, hint_target, use_hint, targets, &
                        loss_kind, temperature, alpha, huber_delta, dropout, seed, hint_layer, hint_weight, &
                        step, n_global, first, work, &
                        nl1, nl, np, n_in, n, nlab, tc, tn, hc, hn, yc, yn, nw, loss, n_correct, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_mlp, only: impl => mlp_gradient, train_config
  implicit none
  integer(c_int), intent(in) :: nl1, nl, n_in, n, nlab, tc, tn, hc, hn, yc, yn
  integer(c_int64_t), intent(in) :: np, nw
  integer(c_int), intent(in) :: sizes(nl1), acts(nl)
  real(c_float), intent(inout) :: params(np), grads(np), work(nw)
  real(c_float), intent(in) :: x(n_in, n), teacher(tc, tn), hint_target(hc, hn), targets(yc, yn)
  integer(c_int64_t), intent(in) :: labels(nlab)
  integer(c_int), intent(in) :: use_teacher, use_hint, loss_kind, hint_layer, n_global
  real(c_float), intent(in) :: temperature, alpha, huber_delta, dropout, hint_weight
  integer(c_int64_t), intent(in) :: seed, step, first
  real(c_float), intent(out) :: loss
  integer(c_int), intent(out) :: n_correct, stat
  type(train_config) :: cfg
  !f2py threadsafe
  !f2py intent(hide) :: nl1, nl, np, n_in, n, nlab, tc, tn, hc, hn, yc, yn, nw
  cfg = train_config(loss=loss_kind, temperature=temperature, alpha=alpha, huber_delta=huber_delta, &
                     dropout=dropout, seed=seed, hint_layer=hint_layer, hint_weight=hint_weight)
  if (use_teacher /= 0 .and. use_hint /= 0) then
    call impl(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
              teacher=teacher, hint_target=hint_target, stat=stat, targets=targets, &
              n_global=n_global, first=first)
  else if (use_teacher /= 0) then
    call impl(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
              teacher=teacher, stat=stat, targets=targets, n_global=n_global, first=first)
  else if (use_hint /= 0) then
    call impl(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
              hint_target=hint_target, stat=stat, targets=targets, n_global=n_global, first=first)
  else
    call impl(sizes, acts, params, grads, x, labels, cfg, step, work, loss, n_correct, &
              stat=stat, targets=targets, n_global=n_global, first=first)
  end if
end subroutine mlp_gradient

subroutine mlp_apply_update(params, grads, state1, state2, mask, use_mask, optimizer, lr, beta1, beta2, &
                            eps, momentum, weight_decay, step, np, n2, nm, stat)
  use iso_c_binding, only: c_float, c_int, c_int64_t
  use pykd_mlp, only: impl => mlp_apply_update, train_config
  implicit none
  integer(c_int64_t), intent(in) :: np, n2, nm, step
  real(c_float), intent(inout) :: params(np), state1(np), state2(n2)
  real(c_float), intent(in) :: grads(np)
  integer(1), intent(in) :: mask(nm)
  integer(c_int), intent(in) :: use_mask, optimizer
  real(c_float), intent(in) :: lr, beta1, beta2, eps, momentum, weight_decay
  integer(c_int), intent(out) :: stat
  type(train_config) :: cfg
  !f2py threadsafe
  !f2py intent(hide) :: np, n2, nm
  cfg = train_config(optimizer=optimizer, lr=lr, beta1=beta1, beta2=beta2, eps=eps, momentum=momentum, &
                     weight_decay=weight_decay)
  if (use_mask /= 0) then
    call impl(params, grads, state1, state2, cfg, step, mask=mask, stat=stat)
  else
    call impl(params, grads, state1, state2, cfg, step, stat=stat)
  end if
end subroutine mlp_apply_update

! A whole model (docs/model.md): the layer table and flat buffers, as
! C-ordered NumPy arrays passed transposed (table.T, x.T, y.T), so nothing is
! copied. The arrays are only read; `work` (network_workspace_size words) is
! the caller's scratch, one per thread. Returns (stat, bad_layer, errmsg).
subroutine network_forward(table, f32, i8, i32, norm, norm_kinds, x, upto, y, work, &
                           nl, nf32, ni8, ni32, nnorm, n_in, n, n_out, nw, stat, bad_layer, errmsg)
  use iso_c_binding, only: c_float, c_int, c_int32_t, c_int64_t
  use pykd_network, only: impl => network_forward
  implicit none
  integer(c_int), intent(in) :: nl, n_in, n, n_out, upto
  integer(c_int64_t), intent(in) :: nf32, ni8, ni32, nnorm, nw
  integer(c_int64_t), intent(in) :: table(14, nl)
  real(c_float), intent(in) :: f32(nf32), norm(nnorm), x(n_in, n)
  integer(1), intent(in) :: i8(ni8)
  integer(c_int32_t), intent(in) :: i32(ni32)
  integer(c_int), intent(in) :: norm_kinds(2)
  real(c_float), intent(inout) :: y(n_out, n), work(nw)
  integer(c_int), intent(out) :: stat, bad_layer
  character(len=512), intent(out) :: errmsg   ! blank on success
  !f2py threadsafe
  !f2py intent(hide) :: nl, nf32, ni8, ni32, nnorm, n_in, n, n_out, nw
  call impl(table, f32, i8, i32, norm, norm_kinds, x, upto, y, work, stat, bad_layer, errmsg)
end subroutine network_forward

subroutine network_workspace_size(table, n, upto, nl, words)
  use iso_c_binding, only: c_int, c_int64_t
  use pykd_network, only: impl => network_workspace_words
  implicit none
  integer(c_int), intent(in) :: nl, n, upto
  integer(c_int64_t), intent(in) :: table(14, nl)
  integer(c_int64_t), intent(out) :: words
  !f2py threadsafe
  !f2py intent(hide) :: nl
  words = impl(table, n, upto)
end subroutine network_workspace_size

! The address of pykd_network_forward_c (fortran/model/pykd_network_c.f90),
! for pykd/_lean.c's binding of Model.forward (pykd.models binds it once).
subroutine network_forward_c_address(addr)
  use iso_c_binding, only: c_int64_t, c_funloc
  use pykd_network_c, only: network_forward_c
  implicit none
  integer(c_int64_t), intent(out) :: addr
  addr = transfer(c_funloc(network_forward_c), addr)
end subroutine network_forward_c_address

! Leading layers that one sample runs split across the OpenMP team now (0:
! none; docs/performance.md, "Batch 1 on two cores"). For the tests.
subroutine network_split_layers(table, nl, ks)
  use iso_c_binding, only: c_int, c_int64_t
  use pykd_network, only: impl => one_split_layers
  implicit none
  integer(c_int), intent(in) :: nl
  integer(c_int64_t), intent(in) :: table(14, nl)
  integer(c_int), intent(out) :: ks
  !f2py intent(hide) :: nl
  ks = impl(table, nl)
end subroutine network_split_layers

! The batch-1 helper threads' counts so far (split calls, calls run alone,
! split calls with a late helper); then a hold that makes the helpers claim
! nothing (hold: 1 set, 0 release, -1 leave) and reset (1: zero the counts
! and end an alone period). For the tests (docs/performance.md, "Batch 1 on
! two cores").
subroutine network_team_probe(hold, reset, counts)
  use iso_c_binding, only: c_int, c_long
  implicit none
  integer(c_int), intent(in) :: hold, reset
  integer(c_long), intent(out) :: counts(3)
  interface
    subroutine probe(hold, reset, counts) bind(c, name='pykd_f32_team_probe')
      import :: c_int, c_long
      integer(c_int), value :: hold, reset
      integer(c_long), intent(out) :: counts(3)
    end subroutine probe
  end interface
  call probe(hold, reset, counts)
end subroutine network_team_probe

! The CPU path of the int8 layer's product in this process (portable, avx2,
! avxvnni or avx512vnni; PYKD_INT8_PATH forces one the CPU has).
subroutine int8_path(name)
  use pykd_int8_kernel, only: int8_path_name
  implicit none
  character(len=16), intent(out) :: name
  !f2py threadsafe
  name = int8_path_name()
end subroutine int8_path

! The CPU path of the dense layer's one-sample product in this process
! (portable, avx2 or avx512; PYKD_DENSE_PATH forces one the CPU has).
subroutine dense_path(name)
  use pykd_layer_dense, only: dense_path_name
  implicit none
  character(len=16), intent(out) :: name
  !f2py threadsafe
  name = dense_path_name()
end subroutine dense_path

! The tile of the dense layer's avx512 batch product in this process (4x6
! or 8x3; PYKD_DENSE_TILE forces one).
subroutine dense_tile(name)
  use pykd_layer_dense, only: dense_tile_name
  implicit none
  character(len=16), intent(out) :: name
  !f2py threadsafe
  name = dense_tile_name()
end subroutine dense_tile

! The CPU path of the codebook layer's product in this process (portable, avx2
! or avx512; PYKD_CODEBOOK_PATH forces one the CPU has).
subroutine codebook_path(name)
  use pykd_codebook_kernel, only: codebook_path_name
  implicit none
  character(len=16), intent(out) :: name
  !f2py threadsafe
  name = codebook_path_name()
end subroutine codebook_path

! The CPU path of the sparse layers' C helpers in this process (portable,
! avx2 or avx512; PYKD_SPARSE_PATH forces one the CPU has).
subroutine sparse_path(name)
  use pykd_sparse_kernel, only: sparse_path_name
  implicit none
  character(len=16), intent(out) :: name
  !f2py threadsafe
  name = sparse_path_name()
end subroutine sparse_path

! The CPU path of Adam's update in this process (portable, avx2 or avx512;
! PYKD_OPTIM_PATH forces one the CPU has).
subroutine optim_path(name)
  use pykd_optim, only: optim_path_name
  implicit none
  character(len=16), intent(out) :: name
  !f2py threadsafe
  name = optim_path_name()
end subroutine optim_path

! pykd.int8_gemm and pykd.int8_matmul on the int8 layer's kernel
! (pykd_int8_kernel: run-time CPU path, threads): qw packed per call as a
! model packs it once (int8_pack), qx as u = qx + 128 bytes (int8_gemm) or
! x quantized per sample by the kernel (int8_matmul), as the layer does.
! n_in > MAX_IN could overflow the int32 sums: PYKD_ERR_ARG.
subroutine int8_gemm_fast(qw, qx, acc, n_out, n_in, n, stat)
  use iso_c_binding, only: c_int, c_int8_t, c_int32_t
  use iso_fortran_env, only: int64
  use pykd_status, only: PYKD_OK, PYKD_ERR_ALLOC, PYKD_ERR_ARG
  use pykd_quant, only: MAX_IN
  use pykd_int8_kernel, only: int8_gemm_product, int8_pack, int8_packed_words, int8_ldu
  implicit none
  integer(c_int), intent(in) :: n_out, n_in, n
  integer(1), intent(in) :: qw(n_out, n_in), qx(n_in, n)
  integer(c_int32_t), intent(inout) :: acc(n_out, n)
  integer(c_int), intent(out) :: stat
  integer(c_int8_t), allocatable :: u(:, :)
  integer(c_int32_t), allocatable :: packed(:)
  integer :: ldu, ierr
  !f2py threadsafe
  !f2py intent(hide) :: n_out, n_in, n
  stat = PYKD_ERR_ARG
  if (n_in > MAX_IN) return
  ldu = int(int8_ldu(int(n_in, int64)))
  allocate (u(ldu, n), packed(int8_packed_words(int(n_in, int64), int(n_out, int64))), stat=ierr)
  stat = merge(PYKD_OK, PYKD_ERR_ALLOC, ierr == 0)
  if (ierr /= 0) return
  call int8_pack(n_in, n_out, qw, packed)
  u(1:n_in, :) = ieor(qx, -127_c_int8_t - 1_c_int8_t)     ! the bits of qx + 128 as unsigned bytes
  u(n_in + 1:ldu, :) = -127_c_int8_t - 1_c_int8_t   ! 128: qx = 0
  call int8_gemm_product(n_in, n_out, n, packed, u, acc)
end subroutine int8_gemm_fast

! scale_w: one scale (n_scale = 1) or one per output; another size is PYKD_ERR_ARG.
subroutine int8_matmul_fast(x, qw, scale_w, b, y, n_in, n_out, n, n_scale, stat)
  use iso_c_binding, only: c_float, c_int, c_int8_t, c_int32_t
  use iso_fortran_env, only: int64
  use pykd_status, only: PYKD_OK, PYKD_ERR_ALLOC, PYKD_ERR_ARG, PYKD_ERR_NONFINITE
  use pykd_quant, only: MAX_IN
  use pykd_int8_kernel, only: int8_dense_forward, int8_pack, int8_packed_words, int8_ldu
  implicit none
  integer(c_int), intent(in) :: n_in, n_out, n, n_scale
  real(c_float), intent(in) :: x(n_in, n), scale_w(n_scale), b(n_out)
  integer(1), intent(in) :: qw(n_out, n_in)
  real(c_float), intent(inout) :: y(n_out, n)
  integer(c_int), intent(out) :: stat
  integer(c_int8_t), allocatable :: u(:)
  integer(c_int32_t), allocatable :: packed(:)
  real(c_float), allocatable :: sx(:), scale(:)
  integer :: ierr, n_bad
  !f2py threadsafe
  !f2py intent(hide) :: n_in, n_out, n, n_scale
  stat = PYKD_ERR_ARG
  if ((n_scale /= 1 .and. n_scale /= n_out) .or. n_in > MAX_IN) return
  allocate (u(int8_ldu(int(n_in, int64)) * n), sx(n), scale(n_out), &
            packed(int8_packed_words(int(n_in, int64), int(n_out, int64))), stat=ierr)
  stat = merge(PYKD_OK, PYKD_ERR_ALLOC, ierr == 0)
  if (ierr /= 0) return
  scale = scale_w(1)                       ! one scale per tensor ...
  if (n_scale == n_out) scale = scale_w    ! ... or per output
  call int8_pack(n_in, n_out, qw, packed)
  call int8_dense_forward(n_in, n_out, n, packed, x, 0.0_c_float, scale, b, 0, u, sx, y, n_bad)
  if (n_bad > 0) stat = PYKD_ERR_NONFINITE
end subroutine int8_matmul_fast
