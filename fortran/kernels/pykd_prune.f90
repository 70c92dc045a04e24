!> Magnitude pruning masks, by selection in O(n) expected time.
!!
!! To prune k of n weights (k = round-half-even(sparsity * n), computed by
!! the caller), find tau, the k-th smallest |w|, with quickselect; prune every
!! |w| < tau; of the weights with |w| == tau, prune the ones that come first
!! in memory order until k are pruned. Ties are thus broken by position:
!! within a tensor by flat (C-order) index, across tensors by list order.
!! Masks are int8: 1 = keep, 0 = pruned.
!!
!! Global pruning over several tensors is the same three steps with one tau:
!! `magnitudes` of each into one scratch buffer, `select_kth` on it, then
!! `count_below` and `mask_from_threshold` tensor by tensor.
module pykd_prune
  use iso_fortran_env, only: real32, int8, int64
  use ieee_arithmetic, only: ieee_is_nan, ieee_value, ieee_quiet_nan
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_NONFINITE, PYKD_ERR_ALLOC, set_status
  implicit none
  private
  public :: magnitude_mask, magnitudes, select_kth, count_below, mask_from_threshold

contains

  !> Mask that prunes the `k` smallest-magnitude entries of `w`.
  subroutine magnitude_mask(w, k, mask, stat, errmsg)
    real(real32), intent(in), contiguous :: w(:)
    integer(int64), intent(in) :: k          !! how many to prune, 0 <= k <= size(w)
    integer(int8), intent(out), contiguous :: mask(:)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    real(real32), allocatable :: mags(:)
    real(real32) :: tau
    integer(int64) :: ties
    integer :: ierr, st

    if (size(mask) /= size(w) .or. k < 0 .or. k > size(w, kind=int64)) then
      call set_status(PYKD_ERR_ARG, 'magnitude_mask: bad sizes or prune count', stat, errmsg)
      return
    end if
    allocate (mags(size(w)), stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, 'magnitude_mask: cannot allocate workspace', stat, errmsg)
      return
    end if
    call magnitudes(w, mags, st)
    if (st /= PYKD_OK) then
      call set_status(st, 'magnitude_mask: weights contain NaN or inf', stat, errmsg)
      return
    end if
    if (k == 0) then
      mask = 1
    else
      call select_kth(mags, k, tau)
      ties = k - count_below(w, tau)
      call mask_from_threshold(w, tau, ties, mask)
    end if
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine magnitude_mask

  !> mags = |w|; stat = PYKD_ERR_NONFINITE if any entry is NaN or inf.
  subroutine magnitudes(w, mags, stat)
    real(real32), intent(in), contiguous :: w(:)
    real(real32), intent(out), contiguous :: mags(:)
    integer, intent(out) :: stat
    integer(int64) :: i, n_bad

    if (size(mags) /= size(w)) then
      stat = PYKD_ERR_ARG
      return
    end if
    n_bad = 0
    do i = 1, size(w, kind=int64)
      mags(i) = abs(w(i))
      if (.not. (mags(i) <= huge(mags(i)))) n_bad = n_bad + 1
    end do
    stat = merge(PYKD_OK, PYKD_ERR_NONFINITE, n_bad == 0)
  end subroutine magnitudes

  !> kth = the k-th smallest value of `a` (1 <= k <= size(a)); `a` is reordered.
  !!
  !! Hoare-partition quickselect with a median-of-three pivot, which also
  !! splits runs of equal values (pruned zeros) evenly. After many unlucky
  !! rounds it switches to pseudo-random pivots, so adversarial orderings
  !! cannot make it quadratic. The answer does not depend on pivot choice.
  !! A NaN in `a` gives kth = NaN (the partition needs ordered values: with a
  !! NaN pivot its scans would run off the array).
  pure subroutine select_kth(a, k, kth)
    real(real32), intent(inout) :: a(:)
    integer(int64), intent(in) :: k
    real(real32), intent(out) :: kth
    integer(int64) :: lo, hi, i, j, mid, rounds, seed
    real(real32) :: pivot

    if (any(ieee_is_nan(a))) then
      kth = ieee_value(kth, ieee_quiet_nan)
      return
    end if
    lo = 1; hi = size(a, kind=int64)
    rounds = 0; seed = 88172645463325252_int64
    do while (hi > lo)
      rounds = rounds + 1
      if (rounds <= 64) then
        mid = lo + (hi - lo) / 2
      else
        seed = ieor(seed, ishft(seed, 13)); seed = ieor(seed, ishft(seed, -7))
        seed = ieor(seed, ishft(seed, 17))
        mid = lo + modulo(seed, hi - lo + 1)
      end if
      ! Order a(lo) <= a(mid) <= a(hi), then move the median to a(lo): Hoare's
      ! scheme with the pivot at a(lo) always returns lo <= j < hi.
      if (a(mid) < a(lo)) call swap(a(mid), a(lo))
      if (a(hi) < a(lo)) call swap(a(hi), a(lo))
      if (a(hi) < a(mid)) call swap(a(hi), a(mid))
      call swap(a(lo), a(mid))
      pivot = a(lo)
      i = lo - 1; j = hi + 1
      do
        do
          i = i + 1
          if (a(i) >= pivot) exit
        end do
        do
          j = j - 1
          if (a(j) <= pivot) exit
        end do
        if (i >= j) exit
        call swap(a(i), a(j))
      end do
      if (k <= j) then
        hi = j
      else
        lo = j + 1
      end if
    end do
    kth = a(k)
  end subroutine select_kth

  pure elemental subroutine swap(x, y)
    real(real32), intent(inout) :: x, y
    real(real32) :: tmp
    tmp = x; x = y; y = tmp
  end subroutine swap

  !> How many entries have |w| < tau.
  pure function count_below(w, tau) result(n)
    real(real32), intent(in) :: w(:)
    real(real32), intent(in) :: tau
    integer(int64) :: n
    integer(int64) :: i
    n = 0
    do i = 1, size(w, kind=int64)
      if (abs(w(i)) < tau) n = n + 1
    end do
  end function count_below

  !> mask = 1 where |w| > tau; 0 where |w| < tau; where |w| == tau, 0 for the
  !! first `ties` such entries (decremented as they are used), 1 after that.
  !! A NaN |w| or tau compares neither way: that entry is kept, never pruned
  !! as if it were a tie (callers reject NaN weights through `magnitudes`).
  pure subroutine mask_from_threshold(w, tau, ties, mask)
    real(real32), intent(in) :: w(:)
    real(real32), intent(in) :: tau
    integer(int64), intent(inout) :: ties
    integer(int8), intent(out) :: mask(:)
    integer(int64) :: i
    do i = 1, size(w, kind=int64)
      if (.not. (abs(w(i)) <= tau)) then
        mask(i) = 1
      else if (abs(w(i)) < tau) then
        mask(i) = 0
      else if (ties > 0) then
        mask(i) = 0
        ties = ties - 1
      else
        mask(i) = 1
      end if
    end do
  end subroutine mask_from_threshold

end module pykd_prune
