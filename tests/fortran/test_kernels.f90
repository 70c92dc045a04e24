!> Fortran-only tests of the kernels: no Python involved. Each check compares
!! against a naive loop or a hand-derived value; the program exits non-zero
!! if any fails.
program test_kernels
  use iso_fortran_env, only: real32, real64, int8, int64
  use pykd
  use test_harness, only: check, finish
  implicit none

  call test_dense()
  call test_softmax()
  call test_kd_loss()
  call test_optim()
  call test_prune()
  call test_quant()
  call test_bad_status()

  call finish('Fortran kernel')

contains

  subroutine test_dense()
    integer, parameter :: n_in = 7, n_out = 5, n = 3
    real(real32) :: x(n_in, n), w(n_out, n_in), b(n_out), y(n_out, n), ref(n_out, n)
    real(real32) :: dy(n_out, n), dw(n_out, n_in), db(n_out), dx(n_in, n), dz(n_out, n)
    integer :: i, j, stat

    call random_number(x); call random_number(w); call random_number(b)
    x = x - 0.5; w = w - 0.5
    do j = 1, n
      do i = 1, n_out
        ref(i, j) = max(sum(w(i, :) * x(:, j)) + b(i), 0.0)
      end do
    end do
    call dense_forward(x, w, b, ACT_RELU, y, stat)
    call check(stat == PYKD_OK .and. maxval(abs(y - ref)) < 1e-5, 'dense_forward relu vs loops')

    call random_number(dy)
    call dense_backward(dy, x, w, y, ACT_RELU, dw, db, dx, stat=stat)
    dz = merge(dy, 0.0, y > 0)
    call check(stat == PYKD_OK .and. maxval(abs(db - sum(dz, 2))) < 1e-5, 'dense_backward db')
    call check(maxval(abs(dw - matmul(dz, transpose(x)))) < 1e-5, 'dense_backward dW')
    call check(maxval(abs(dx - matmul(transpose(w), dz))) < 1e-5, 'dense_backward dx')
  end subroutine test_dense

  subroutine test_softmax()
    real(real32) :: z(3, 2), p(3, 2), logp(3, 2)
    integer :: stat
    z = reshape([1e4, -1e4, 0.0, 1.0, 2.0, 3.0], [3, 2])
    call softmax(z, 0.05, p, stat)
    call check(stat == PYKD_OK .and. abs(p(1, 1) - 1) < 1e-6 .and. all(abs(sum(p, 1) - 1) < 1e-6), &
               'softmax at |z| = 1e4, T = 0.05')
    call log_softmax(z, 1.0, logp, stat)
    call check(abs(logp(3, 2) - (3 - log(exp(1.0) + exp(2.0) + exp(3.0)))) < 1e-5, &
               'log_softmax hand value')
  end subroutine test_softmax

  subroutine test_kd_loss()
    ! Two samples, three classes: loss and gradient from the formula in float64.
    real(real32) :: s(3, 2), t(3, 2), ds(3, 2), loss, lp, lm, sp(3, 2), g_fd
    integer(int64) :: y(2)
    real(real64) :: expect, ps(3), pt(3), qs(3)
    real(real32), parameter :: temp = 2.0, alpha = 0.3
    integer :: j, stat
    s = reshape([1.0, 2.0, 0.5, -1.0, 0.0, 3.0], [3, 2])
    t = reshape([0.0, 3.0, 1.0, 2.0, 1.0, 0.0], [3, 2])
    y = [1_int64, 2_int64]
    expect = 0
    do j = 1, 2
      ps = exp(real(s(:, j), real64)); ps = ps / sum(ps)
      qs = exp(real(s(:, j), real64) / temp); qs = qs / sum(qs)
      pt = exp(real(t(:, j), real64) / temp); pt = pt / sum(pt)
      expect = expect + alpha * (-log(ps(y(j) + 1))) + (1 - alpha) * temp**2 * sum(pt * log(pt / qs))
    end do
    expect = expect / 2
    call kd_loss(s, t, y, temp, alpha, loss, ds, stat)
    call check(stat == PYKD_OK .and. abs(loss - expect) < 1e-5, 'kd_loss vs float64 formula')
    sp = s; sp(2, 1) = sp(2, 1) + 1e-2
    call kd_loss(sp, t, y, temp, alpha, lp)
    sp(2, 1) = sp(2, 1) - 2e-2
    call kd_loss(sp, t, y, temp, alpha, lm)
    g_fd = (lp - lm) / 2e-2
    call check(abs(g_fd - ds(2, 1)) < 1e-3, 'kd_loss gradient vs central difference')
  end subroutine test_kd_loss

  subroutine test_optim()
    real(real32) :: p(6), g(6), v(6), m(6), p0(6)
    integer(int8) :: mask(6)
    integer :: stat
    p = [1.0, -2.0, 3.0, 0.5, -0.5, 2.0]; p0 = p
    g = 0.5; v = 0
    mask = int([1, 0, 1, 1, 0, 1], int8)
    call sgd_step(p, g, v, 0.1, 0.9, 0.0, mask, stat)
    call check(stat == PYKD_OK .and. p(2) == 0 .and. v(5) == 0 .and. abs(p(1) - 0.95) < 1e-6, &
               'sgd_step with mask')
    p = p0; m = 0; v = 0
    call adam_step(p, g, m, v, 1_int64, 0.1, 0.9, 0.999, 1e-8, 0.0, stat=stat)
    ! First Adam step moves every weight by lr * sign(g).
    call check(stat == PYKD_OK .and. all(abs(p - (p0 - 0.1)) < 1e-5), 'adam_step first step = lr')
  end subroutine test_optim

  subroutine test_prune()
    real(real32) :: w(8)
    integer(int8) :: mask(8)
    integer :: stat
    w = [0.3, -0.1, 0.2, 0.1, 0.5, -0.2, 0.1, 0.9]
    ! Prune 4: 0.1, 0.1, 0.1 (all ties at |w| = 0.1) and the first 0.2.
    call magnitude_mask(w, 4_int64, mask, stat)
    call check(stat == PYKD_OK .and. all(mask == int([1, 0, 0, 0, 1, 1, 0, 1], int8)), &
               'magnitude_mask count and tie order')
  end subroutine test_prune

  subroutine test_quant()
    real(real32) :: w(3, 4), wd(3, 4), scale(3)
    integer(int8) :: q(3, 4)
    integer :: stat
    call random_number(w); w = 2 * w - 1
    w(2, :) = 0
    call quantize_weights(w, q, scale, stat)
    call dequantize_weights(q, scale, wd, stat)
    call check(all(abs(q) <= 127) .and. scale(2) == 1 .and. all(q(2, :) == 0), &
               'quantize per channel: range, zero row')
    call check(all(abs(w - wd) <= spread(scale, 2, 4) / 2 * (1 + 1e-6)), 'quantize round trip <= scale/2')
  end subroutine test_quant

  subroutine test_bad_status()
    real(real32) :: x(3, 2), w(4, 5), b(4), y(4, 2), loss
    real(real32) :: s(3, 2)
    integer(int64) :: labels(2)
    integer :: stat
    character(len=128) :: msg
    x = 0; w = 0; b = 0; s = 0
    call dense_forward(x, w, b, ACT_RELU, y, stat, msg)
    call check(stat == PYKD_ERR_ARG .and. index(msg, 'dense_forward') > 0, 'mismatched sizes give a status')
    labels = [0_int64, 3_int64]
    call cross_entropy(s, labels, loss, stat=stat)
    call check(stat == PYKD_ERR_LABEL, 'label out of range gives a status')
    call kd_loss(s, s, [0_int64, 1_int64], -1.0, 0.5, loss, stat=stat)
    call check(stat == PYKD_ERR_ARG, 'T <= 0 gives a status')
  end subroutine test_bad_status

end program test_kernels
