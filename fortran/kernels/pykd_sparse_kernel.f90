!> Sparse x dense products of the CSR layer kinds (sparse_csr and
!! sparse_codebook): y = act(W^T x + b), W (n_in, n_out) in CSR rows
!! (row i = input i, docs/model.md), x (n_in, n) with samples as columns.
!!
!! Three kernels; sparse_kernel_for picks one from the measured crossover
!! (the constants below; the table is in docs/performance.md, "Sparse
!! layers"):
!! - SCATTER, one sample at a time: y += x(i) W(i, :) over the rows with
!!   x(i) /= 0 (after a ReLU about half of them are 0).
!! - PANEL, SPMM_BLOCK samples at a time: the block is transposed into a
!!   (SPMM_BLOCK, n_in) panel in the workspace and its outputs summed
!!   transposed, yt(SPMM_BLOCK, n_out), so that each non-zero updates
!!   SPMM_BLOCK contiguous floats (two AVX2 registers); rows that are 0 in
!!   every sample of the block are skipped.
!! - DENSE: DENSE_PANEL_WORDS of W's rows at a time decoded into a dense
!!   (n_out, kb) panel in the workspace (never the whole matrix of a big
!!   layer) and multiplied by BLAS, accumulating over the panels.
!! SCATTER and PANEL sum every output in the same order (inputs ascending,
!! one multiply and one add per term, no FMA), and skipping a 0 term is
!! exact (y starts at +0 and a sum of +0 and a product never turns -0),
!! so they give the same bits as each other, for any batch size and thread
!! count. DENSE sums in BLAS's order: forward(x[i:i+1]) may then differ
!! from forward(x)[i] in the last bits. A sample with a NaN or inf input
!! gets all-NaN outputs on every kernel (docs/model.md).
!!
!! PYKD_SPARSE_KERNEL=scatter|panel|dense forces a kernel for batches of 2
!! or more (tests, benchmarks); one sample always takes SCATTER, or the
!! planes below when the layer has them.
!!
!! sparse_csr's planes (docs/model.md, "sparse_csr's planes"): a derived
!! layout of W kept beside the CSR (built at load and by the Python layer,
!! never saved) for one sample. The outputs in blocks of PLANE_LANES = 16,
!! the inputs in chunks of PLANE_CHUNK = 32; the cell (chunk c, block b)
!! holds count(c, b) planes, the most entries any of its 16 outputs has in
!! the chunk, and plane t gives each output of the block its t-th entry in
!! the chunk (input offset and value; 0 and 0 when it has fewer). Cells run
!! over groups of PLANE_GROUP = 13 blocks (the avx512 kernel's zmm
!! accumulators), then chunks, then the group's blocks. Each output is then
!! summed over its inputs ascending with one multiply and one add per
!! term, as SCATTER (the empty lanes add +-0, no change): the same bits.
module pykd_sparse_kernel
  use iso_fortran_env, only: int8, int32, int64, real32
  use iso_c_binding, only: c_int, c_int8_t, c_int32_t, c_int64_t, c_float, c_char
  use ieee_arithmetic, only: ieee_value, ieee_quiet_nan
  use pykd_activation, only: bias_activation, apply_activation
  use pykd_codes, only: ACT_RELU
  use pykd_layer_util, only: nonfinite_count, gemm_nn
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_ALLOC
  use pykd_bytes, only: str
  !$ use omp_lib, only: omp_get_max_threads, omp_get_thread_num, omp_in_parallel
  implicit none
  private
  public :: SPARSE_SCATTER, SPARSE_PANEL, SPARSE_DENSE, sparse_kernel_for, sparse_kernel_name, &
            sparse_workspace_words, sparse_pattern_ok, sparse_forward, sparse_path_name, &
            PLANE_LANES, PLANE_CHUNK, PLANE_GROUP, PLANE_MIN_NNZ, plane_cells, plane_count, planes_kept, &
            planes_build, planes_check, planes_forward, planes_for, PLANE_MAX_BATCH

  integer, parameter :: SPARSE_SCATTER = 1, SPARSE_PANEL = 2, SPARSE_DENSE = 3

  !> Samples per panel: two AVX2 registers of float32 per non-zero.
  integer, parameter :: SPMM_BLOCK = 16
  !> Panels run on at most this many threads (one workspace slot each,
  !! so the scratch stays below MAX_SLOTS * SPMM_BLOCK * (n_in + n_out) words).
  integer, parameter :: MAX_SLOTS = 16
  !> Panels are split over threads from this many multiply-adds (nnz n).
  integer(int64), parameter :: PAR_MIN_MACS = 200000
  !> Words of the dense panel of W the DENSE kernel decodes at a time
  !! (1 MiB: large enough for BLAS to run near its peak on 200-wide layers,
  !! a quarter of a 1200 x 1200 layer).
  integer(int64), parameter :: DENSE_PANEL_WORDS = 262144

  !> The crossover, measured with benchmarks/bench_sparse.py (table in
  !! docs/performance.md, "Sparse layers on Zen 5"; AMD EPYC Zen 5, 1
  !! thread, OpenBLAS with its own AVX-512 kernels, random patterns, half
  !! the inputs 0): from BAND_BATCH(k) samples, DENSE when the density
  !! nnz / (n_in n_out) is at least BAND_DENSITY(k), and always when n_out <
  !! NARROW_OUT from BAND_BATCH(2) samples (200 x 10 was as fast or faster
  !! on the dense decode up to 90% sparsity); else PANEL (SCATTER for one
  !! sample). At batch 8 PANEL won from ~55% sparsity, at 64 from ~75%, at
  !! 256 from ~80%.
  !! One sample takes SCATTER (decoding W to use sgemv costs more than
  !! sgemv), or for sparse_csr the planes, which also take 2 to
  !! PLANE_MAX_BATCH samples (planes_for). Batch 1 on the planes against
  !! the dense layer (Zen 5, 1 thread, same run, times less the call
  !! overhead): 784 x 200 0.8x at 50% sparsity, 1.4x at 70%, 1.9x at 80%,
  !! 2.2-3x at 90%, 4.4x at 95%; 200 x 200 0.8x / 1.1x / 1.4x / 1.8-2x /
  !! 2.9x; 1200 x 1200 1.2x / 2.1x / 2.5x / 4.7x / 7x.
  integer, parameter :: BAND_BATCH(3) = [8, 64, 256]
  real, parameter :: BAND_DENSITY(3) = [0.45, 0.25, 0.2]
  integer, parameter :: NARROW_OUT = 32

  !> The planes' layout (see the top; pykd/_reference.py sparse_planes builds the same).
  integer, parameter :: PLANE_LANES = 16, PLANE_CHUNK = 32, PLANE_GROUP = 13
  !> The fewest entries of a layer that keeps planes (planes_kept).
  integer, parameter :: PLANE_MIN_NNZ = 128

  !> sparse_csr with planes runs them, one sample at a time, up to this
  !! many samples (unless PYKD_SPARSE_KERNEL forces a kernel; one sample
  !! always takes them): measured in docs/performance.md, "Sparse layers
  !! at batch 1: planes".
  integer, parameter :: PLANE_MAX_BATCH = 8

  !> The forced kernel (PYKD_SPARSE_KERNEL): -1 not read yet, 0 none.
  integer, save :: forced = -1

  interface
    !> 1 if the CSR pattern is valid (pykd_sparse_simd.c; avx512: 16
    !! indices per test).
    pure integer(c_int) function c_pattern_ok(n_in, n_out, nnz, indptr, indices) &
        bind(c, name='pykd_sp_pattern_ok')
      import :: c_int, c_int32_t, c_int64_t
      integer(c_int), value :: n_in, n_out
      integer(c_int64_t), value :: nnz
      integer(c_int32_t), intent(in) :: indptr(*), indices(*)
    end function c_pattern_ok
    !> y += x(i) W(i, :) over the rows with x(i) /= 0, y zeroed by the
    !! caller; W from values or centroids(codes + 1) (use_codes /= 0).
    subroutine c_scatter(n_in, indptr, indices, values, codes, centroids, use_codes, x, y) &
        bind(c, name='pykd_sp_scatter')
      import :: c_int, c_int8_t, c_int32_t, c_float
      integer(c_int), value :: n_in, use_codes
      integer(c_int32_t), intent(in) :: indptr(*), indices(*)
      real(c_float), intent(in) :: values(*), centroids(*), x(*)
      integer(c_int8_t), intent(in) :: codes(*)
      real(c_float), intent(inout) :: y(*)
    end subroutine c_scatter
    !> y = W^T x + b (then max(y, 0) when relu /= 0) for one sample on
    !! the planes (pykd_sparse_simd.c); 0, or 1 when x has a NaN or inf
    !! (y all NaN), or 2 when the counts do not add up to n_planes (y untouched).
    integer(c_int) function c_planes_run(n_in, n_out, n_cells, n_planes, counts, idx, val, x, b, relu, y) &
        bind(c, name='pykd_sp_planes_run')
      import :: c_int, c_int8_t, c_int64_t, c_float
      integer(c_int), value :: n_in, n_out, relu
      integer(c_int64_t), value :: n_cells, n_planes
      integer(c_int8_t), intent(in) :: counts(*), idx(*)
      real(c_float), intent(in) :: val(*), x(*), b(*)
      real(c_float), intent(inout) :: y(*)
    end function c_planes_run
    !> The name of the path the C helpers run on.
    subroutine c_path_name(name, len) bind(c, name='pykd_sp_path_name')
      import :: c_char, c_int
      character(kind=c_char), intent(out) :: name(*)
      integer(c_int), value :: len
    end subroutine c_path_name
    !> b(j, i) = a(i, j), i <= rows, j <= cols (pykd_sparse_simd.c: 8 x 8
    !! AVX2 tiles when the CPU has AVX2; only data moves, so the same bits).
    subroutine c_transpose(a, lda, b, ldb, rows, cols) bind(c, name='pykd_sp_transpose')
      import :: c_int, c_float
      real(c_float), intent(in) :: a(*)
      integer(c_int), intent(in) :: lda, ldb, rows, cols
      real(c_float), intent(inout) :: b(*)
    end subroutine c_transpose
  end interface

contains

  !> The kernel for n samples of an (n_in, n_out) layer with nnz non-zeros.
  integer function sparse_kernel_for(n_in, n_out, nnz, n) result(kernel)
    integer, intent(in) :: n_in, n_out, n
    integer(int64), intent(in) :: nnz
    real :: density
    integer :: k

    kernel = SPARSE_SCATTER
    if (n <= 1) return
    if (forced < 0) then
      !$omp critical (pykd_sparse_env)
      if (forced < 0) forced = env_kernel()
      !$omp end critical (pykd_sparse_env)
    end if
    if (forced > 0) then
      kernel = forced
      return
    end if
    density = real(nnz) / (real(n_in) * real(n_out))
    kernel = SPARSE_PANEL
    do k = size(BAND_BATCH), 1, -1
      if (n >= BAND_BATCH(k)) then
        if (density >= BAND_DENSITY(k) .or. (k >= 2 .and. n_out < NARROW_OUT)) kernel = SPARSE_DENSE
        exit
      end if
    end do
  end function sparse_kernel_for

  !> Whether n samples of a layer with planes run on them (planes_forward).
  logical function planes_for(n)
    integer, intent(in) :: n
    planes_for = n == 1
    if (n < 2 .or. n > PLANE_MAX_BATCH) return
    if (forced < 0) then
      !$omp critical (pykd_sparse_env)
      if (forced < 0) forced = env_kernel()
      !$omp end critical (pykd_sparse_env)
    end if
    planes_for = forced == 0
  end function planes_for

  !> The kernel PYKD_SPARSE_KERNEL names, or 0.
  integer function env_kernel()
    character(len=16) :: v
    integer :: st

    call get_environment_variable('PYKD_SPARSE_KERNEL', v, status=st)
    env_kernel = 0
    if (st /= 0) return
    select case (trim(v))
    case ('scatter')
      env_kernel = SPARSE_SCATTER
    case ('panel')
      env_kernel = SPARSE_PANEL
    case ('dense')
      env_kernel = SPARSE_DENSE
    end select
  end function env_kernel

  !> 'scatter', 'panel' or 'dense'.
  pure function sparse_kernel_name(kernel) result(s)
    integer, intent(in) :: kernel
    character(len=:), allocatable :: s
    select case (kernel)
    case (SPARSE_SCATTER)
      s = 'scatter'
    case (SPARSE_PANEL)
      s = 'panel'
    case default
      s = 'dense'
    end select
  end function sparse_kernel_name

  !> Input rows of W per dense panel.
  pure integer function dense_rows(n_in, n_out)
    integer, intent(in) :: n_in, n_out
    dense_rows = int(min(int(n_in, int64), max(1_int64, DENSE_PANEL_WORDS / n_out)))
  end function dense_rows

  !> Workspace slots (threads) of the panel kernel for n samples.
  pure integer function panel_slots(n)
    integer, intent(in) :: n
    panel_slots = min((n + SPMM_BLOCK - 1) / SPMM_BLOCK, MAX_SLOTS)
  end function panel_slots

  !> Words of one panel slot: xt(SPMM_BLOCK, n_in), nzr(n_in), yt(SPMM_BLOCK, n_out).
  pure integer(int64) function slot_words(n_in, n_out)
    integer, intent(in) :: n_in, n_out
    slot_words = (SPMM_BLOCK + 1) * int(n_in, int64) + SPMM_BLOCK * int(n_out, int64)
  end function slot_words

  !> float32 words of scratch for n samples: none for one sample, else
  !! enough for any kernel (so the size grows with n, whichever is chosen).
  pure integer(int64) function sparse_workspace_words(n_in, n_out, n) result(words)
    integer, intent(in) :: n_in, n_out, n
    words = 0
    if (n <= 1) return
    words = max(panel_slots(n) * slot_words(n_in, n_out), int(n_out, int64) * dense_rows(n_in, n_out))
  end function sparse_workspace_words

  !> A CSR pattern (0-based indptr(n_in + 1), indices(nnz)) is valid:
  !! indptr(1) = 0, non-decreasing, indptr(n_in + 1) = nnz, indices in
  !! [0, n_out) and strictly increasing within a row. The same test as
  !! pykd_layer_util's csr_ok, in pykd_sparse_simd.c: it runs before every
  !! product, so that a table built in memory with a bad index gives a
  !! status instead of a stray write.
  pure logical function sparse_pattern_ok(n_in, n_out, nnz, indptr, indices) result(ok)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    ok = c_pattern_ok(n_in, n_out, nnz, indptr, indices) /= 0
  end function sparse_pattern_ok

  !> The name of the path pykd_sparse_simd.c runs on in this process.
  function sparse_path_name() result(name)
    character(len=16) :: name
    character(kind=c_char) :: buf(16)
    call c_path_name(buf, 16_c_int)   ! blank-padded by the C side
    name = transfer(buf, name)
  end function sparse_path_name

  !> y = act(W^T x + b) on the chosen kernel, for a valid pattern
  !! (sparse_pattern_ok). The entry values are `values` (use_codes false)
  !! or centroids(codes + 1), codes unsigned bytes checked against the
  !! number of centroids by the caller (use_codes true; `values` is then
  !! not read). work: sparse_workspace_words(n_in, n_out, n).
  subroutine sparse_forward(n_in, n_out, n, nnz, indptr, indices, values, codes, centroids, &
                            use_codes, act, b, x, y, work)
    integer, intent(in) :: n_in, n_out, n, act
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(*), centroids(*), b(n_out), x(n_in, n)
    integer(int8), intent(in) :: codes(*)
    logical, intent(in) :: use_codes
    real(real32), intent(out) :: y(n_out, n)
    real(real32), intent(inout), target :: work(*)
    integer :: j

    select case (sparse_kernel_for(n_in, n_out, nnz, n))
    case (SPARSE_SCATTER)
      do j = 1, n
        call scatter_sample(n_in, n_out, nnz, indptr, indices, values, codes, centroids, &
                            use_codes, x(:, j), y(:, j))
      end do
      call bias_activation(act, n_out, n, b, y)
    case (SPARSE_PANEL)
      call panel_product(n_in, n_out, n, nnz, indptr, indices, values, codes, centroids, &
                         use_codes, act, b, x, y, work)
    case default
      call dense_product(n_in, n_out, n, nnz, indptr, indices, values, codes, centroids, &
                         use_codes, x, y, work)
      call bias_activation(act, n_out, n, b, y)
    end select
  end subroutine sparse_forward

  !> One sample: y = sum over the rows i with x(i) /= 0 of x(i) W(i, :);
  !! all NaN when x has a NaN or inf.
  subroutine scatter_sample(n_in, n_out, nnz, indptr, indices, values, codes, centroids, &
                            use_codes, x, y)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(*), centroids(*), x(n_in)
    integer(int8), intent(in) :: codes(*)
    logical, intent(in) :: use_codes
    real(real32), intent(out) :: y(n_out)

    y = 0
    if (nonfinite_count(int(n_in, int64), x) > 0) then
      y = ieee_value(0.0_real32, ieee_quiet_nan)
      return
    end if
    call c_scatter(n_in, indptr, indices, values, codes, centroids, merge(1_c_int, 0_c_int, use_codes), &
                   x, y)
  end subroutine scatter_sample

  !> PANEL: blocks of SPMM_BLOCK samples over threads (static, each sample
  !! summed alike whatever the thread count), one workspace slot per thread.
  subroutine panel_product(n_in, n_out, n, nnz, indptr, indices, values, codes, centroids, &
                           use_codes, act, b, x, y, work)
    integer, intent(in) :: n_in, n_out, n, act
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(*), centroids(*), b(n_out), x(n_in, n)
    integer(int8), intent(in) :: codes(*)
    logical, intent(in) :: use_codes
    real(real32), intent(inout) :: y(n_out, n)
    real(real32), intent(inout), target :: work(*)
    integer :: p, n_panels, slot, nt, s0
    integer(int64) :: w0, sw
    logical :: serial

    n_panels = (n + SPMM_BLOCK - 1) / SPMM_BLOCK
    sw = slot_words(n_in, n_out)
    ! No OpenMP region for a small product (libgomp builds a team even when
    ! if() is false) or inside another region (a nested one is inactive).
    serial = nnz * n < PAR_MIN_MACS
    !$ serial = serial .or. omp_in_parallel() .or. omp_get_max_threads() == 1
    if (serial) then
      do p = 1, n_panels
        s0 = (p - 1) * SPMM_BLOCK
        call panel_block(n_in, n_out, min(SPMM_BLOCK, n - s0), nnz, indptr, indices, values, codes, &
                         centroids, use_codes, act, b, x(1, s0 + 1), y(1, s0 + 1), work(1), &
                         work(SPMM_BLOCK * int(n_in, int64) + 1), &
                         work((SPMM_BLOCK + 1) * int(n_in, int64) + 1))
      end do
      return
    end if
    nt = 1
    !$ nt = min(omp_get_max_threads(), panel_slots(n))
    !$omp parallel do schedule(static) num_threads(nt) private(slot, s0, w0) &
    !$omp&   if(parallel: nnz * n >= PAR_MIN_MACS)
    do p = 1, n_panels
      slot = 0
      !$ slot = omp_get_thread_num()
      w0 = slot * sw
      s0 = (p - 1) * SPMM_BLOCK
      call panel_block(n_in, n_out, min(SPMM_BLOCK, n - s0), nnz, indptr, indices, values, codes, &
                       centroids, use_codes, act, b, x(1, s0 + 1), y(1, s0 + 1), work(w0 + 1), &
                       work(w0 + SPMM_BLOCK * int(n_in, int64) + 1), &
                       work(w0 + (SPMM_BLOCK + 1) * int(n_in, int64) + 1))
    end do
    !$omp end parallel do
  end subroutine panel_product

  !> m <= SPMM_BLOCK samples: transpose x into xt (samples contiguous,
  !! lanes past m 0) counting the non-zeros of every row into nzr, scatter
  !! the non-zeros of W into yt, transpose yt into y with bias and activation.
  subroutine panel_block(n_in, n_out, m, nnz, indptr, indices, values, codes, centroids, &
                         use_codes, act, b, x, y, xt, nzr, yt)
    integer, intent(in) :: n_in, n_out, m, act
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(*), centroids(*), b(n_out), x(n_in, m)
    integer(int8), intent(in) :: codes(*)
    logical, intent(in) :: use_codes
    real(real32), intent(inout) :: y(n_out, m)
    real(real32), intent(out) :: xt(SPMM_BLOCK, n_in), nzr(n_in), yt(SPMM_BLOCK, n_out)
    integer :: s

    ! Contiguous reads of x; the count is a vectorized compare (a branch
    ! on each value would mispredict on ReLU outputs). /= 0 holds for NaN:
    ! such a sample's outputs are replaced below anyway.
    nzr = 0
    do s = 1, m
      nzr = nzr + merge(1.0_real32, 0.0_real32, x(:, s) /= 0)
    end do
    call c_transpose(x, n_in, xt, SPMM_BLOCK, n_in, m)
    if (m < SPMM_BLOCK) xt(m + 1:, :) = 0
    yt = 0
    if (use_codes) then
      call rows_codes(n_in, n_out, nnz, indptr, indices, codes, centroids, xt, nzr, yt)
    else
      call rows_values(n_in, n_out, nnz, indptr, indices, values, xt, nzr, yt)
    end if
    call c_transpose(yt, SPMM_BLOCK, y, n_out, m, n_out)
    do s = 1, m
      if (nonfinite_count(int(n_in, int64), x(:, s)) > 0) then
        y(:, s) = ieee_value(0.0_real32, ieee_quiet_nan)
      end if
    end do
    call bias_activation(act, n_out, m, b, y)
  end subroutine panel_block

  !> yt(:, j) += xt(:, i) W(i, j) over the rows with nzr(i) > 0, W from values.
  pure subroutine rows_values(n_in, n_out, nnz, indptr, indices, values, xt, nzr, yt)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(nnz), xt(SPMM_BLOCK, n_in), nzr(n_in)
    real(real32), intent(inout) :: yt(SPMM_BLOCK, n_out)
    real(real32) :: xv(SPMM_BLOCK), v
    integer :: i, k, c, s

    do i = 1, n_in
      if (nzr(i) == 0) cycle
      xv = xt(:, i)
      do k = indptr(i) + 1, indptr(i + 1)
        c = indices(k) + 1
        v = values(k)
        !$omp simd
        do s = 1, SPMM_BLOCK
          yt(s, c) = yt(s, c) + xv(s) * v
        end do
      end do
    end do
  end subroutine rows_values

  !> As rows_values, W from centroids(codes + 1).
  pure subroutine rows_codes(n_in, n_out, nnz, indptr, indices, codes, centroids, xt, nzr, yt)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    integer(int8), intent(in) :: codes(nnz)
    real(real32), intent(in) :: centroids(*), xt(SPMM_BLOCK, n_in), nzr(n_in)
    real(real32), intent(inout) :: yt(SPMM_BLOCK, n_out)
    real(real32) :: xv(SPMM_BLOCK), v
    integer :: i, k, c, s

    do i = 1, n_in
      if (nzr(i) == 0) cycle
      xv = xt(:, i)
      do k = indptr(i) + 1, indptr(i + 1)
        c = indices(k) + 1
        v = centroids(iand(int(codes(k)), 255) + 1)
        !$omp simd
        do s = 1, SPMM_BLOCK
          yt(s, c) = yt(s, c) + xv(s) * v
        end do
      end do
    end do
  end subroutine rows_codes

  !> DENSE: y = W^T x through BLAS, W decoded kb input rows at a time into
  !! the dense panel wp(n_out, kb) in work; NaN for non-finite samples.
  subroutine dense_product(n_in, n_out, n, nnz, indptr, indices, values, codes, centroids, &
                           use_codes, x, y, work)
    integer, intent(in) :: n_in, n_out, n
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(*), centroids(*), x(n_in, n)
    integer(int8), intent(in) :: codes(*)
    logical, intent(in) :: use_codes
    real(real32), intent(inout) :: y(n_out, n)
    real(real32), intent(inout) :: work(*)
    integer :: i0, kb, j
    real(real32) :: beta

    kb = dense_rows(n_in, n_out)
    beta = 0
    do i0 = 1, n_in, kb
      call decode_rows(n_in, n_out, nnz, i0, min(kb, n_in - i0 + 1), indptr, indices, values, &
                       codes, centroids, use_codes, work)
      call gemm_nn(n_out, n, min(kb, n_in - i0 + 1), work, x(i0, 1), n_in, beta, y)
      beta = 1
    end do
    do j = 1, n
      if (nonfinite_count(int(n_in, int64), x(:, j)) > 0) y(:, j) = ieee_value(beta, ieee_quiet_nan)
    end do
  end subroutine dense_product

  !> wp(:, r) = W(i0 + r - 1, :) for r = 1..kb (zeros and the row's entries).
  pure subroutine decode_rows(n_in, n_out, nnz, i0, kb, indptr, indices, values, codes, centroids, &
                              use_codes, wp)
    integer, intent(in) :: n_in, n_out, i0, kb
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(nnz)
    real(real32), intent(in) :: values(*), centroids(*)
    integer(int8), intent(in) :: codes(*)
    logical, intent(in) :: use_codes
    real(real32), intent(out) :: wp(n_out, kb)
    integer :: r, k

    wp = 0
    do r = 1, kb
      if (use_codes) then
        do k = indptr(i0 + r - 1) + 1, indptr(i0 + r)
          wp(indices(k) + 1, r) = centroids(iand(int(codes(k)), 255) + 1)
        end do
      else
        do k = indptr(i0 + r - 1) + 1, indptr(i0 + r)
          wp(indices(k) + 1, r) = values(k)
        end do
      end if
    end do
  end subroutine decode_rows


  ! ---- sparse_csr's planes ---------------------------------------------------

  !> Cells of the planes: ceil(n_in / 32) chunks times ceil(n_out / 16) blocks.
  pure integer(int64) function plane_cells(n_in, n_out)
    integer(int64), intent(in) :: n_in, n_out
    plane_cells = ((n_in + PLANE_CHUNK - 1) / PLANE_CHUNK) * ((n_out + PLANE_LANES - 1) / PLANE_LANES)
  end function plane_cells

  !> 0-based position of cell (chunk c, block b), both 0-based.
  pure integer(int64) function cell_of(nc, nb, c, b)
    integer(int64), intent(in) :: nc, nb, c, b
    integer(int64) :: g0
    g0 = (b / PLANE_GROUP) * PLANE_GROUP
    cell_of = g0 * nc + c * min(int(PLANE_GROUP, int64), nb - g0) + (b - g0)
  end function cell_of

  !> count(c, b) of every cell into counts(n_cells), and their sum. Any
  !! pattern: entries outside indptr's rows in [0, nnz] or with an index
  !! outside [0, n_out) are skipped (a file's pattern is counted before it
  !! is checked); on a valid pattern, the planes' counts. The result is
  !! -1 when the scratch cannot be allocated.
  function plane_count(n_in, n_out, nnz, indptr, indices, counts) result(total)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz
    integer(int32), intent(in) :: indptr(n_in + 1), indices(max(nnz, 1_int64))
    integer(int8), intent(out), optional :: counts(:)
    integer(int64) :: total
    integer(int32), allocatable :: seen(:), cmax(:)
    integer(int64) :: nc, nb, c, k, k0, k1, j, b
    integer :: i, ierr

    nc = (n_in + PLANE_CHUNK - 1) / PLANE_CHUNK; nb = (n_out + PLANE_LANES - 1) / PLANE_LANES
    total = -1
    allocate (seen(n_out), cmax(nb), stat=ierr)
    if (ierr /= 0) return
    seen = 0; cmax = 0; total = 0
    if (present(counts)) counts = 0
    do c = 0, nc - 1
      do i = int(c) * PLANE_CHUNK + 1, min(n_in, int(c + 1) * PLANE_CHUNK)
        call row_range(i, k0, k1)
        do k = k0, k1
          j = indices(k)
          if (j < 0 .or. j >= n_out) cycle
          seen(j + 1) = seen(j + 1) + 1
          cmax(j / PLANE_LANES + 1) = max(cmax(j / PLANE_LANES + 1), seen(j + 1))
        end do
      end do
      ! Sum, then reset only what the chunk touched.
      do i = int(c) * PLANE_CHUNK + 1, min(n_in, int(c + 1) * PLANE_CHUNK)
        call row_range(i, k0, k1)
        do k = k0, k1
          j = indices(k)
          if (j < 0 .or. j >= n_out) cycle
          b = j / PLANE_LANES
          if (cmax(b + 1) > 0) then
            total = total + cmax(b + 1)
            if (present(counts)) counts(cell_of(nc, nb, c, b) + 1) = int(cmax(b + 1), int8)
          end if
          seen(j + 1) = 0; cmax(b + 1) = 0
        end do
      end do
    end do
  contains
    pure subroutine row_range(i, k0, k1)
      integer, intent(in) :: i
      integer(int64), intent(out) :: k0, k1
      k0 = max(0_int64, int(indptr(i), int64)) + 1
      k1 = min(nnz, int(indptr(i + 1), int64))
    end subroutine row_range
  end function plane_count

  !> Whether a layer keeps its planes: at least PLANE_MIN_NNZ entries (a
  !! smaller product takes well under a microsecond either way), at least
  !! 2 entries per plane on average (else the planes would stream more
  !! bytes than they save), and the counts at most 4 bytes per entry.
  pure logical function planes_kept(n_in, n_out, nnz, n_planes)
    integer(int64), intent(in) :: n_in, n_out, nnz, n_planes
    planes_kept = nnz >= PLANE_MIN_NNZ .and. n_planes > 0 .and. 2 * n_planes <= nnz .and. &
                  plane_cells(n_in, n_out) <= 4 * nnz
  end function planes_kept

  !> The planes of a valid pattern with n_planes = plane_count: counts
  !! (n_cells), idx (16, n_planes) input offsets in the chunk, val (16,
  !! n_planes). The entry values: values(k) (sparse_csr), or
  !! centroids(codes(k) + 1) when codes and centroids are given
  !! (sparse_codebook, codes checked < the number of centroids: the values
  !! its scatter and panel kernels read). stat /= 0 when the counts are
  !! not n_planes or the scratch cannot be allocated.
  subroutine planes_build(n_in, n_out, nnz, indptr, indices, n_planes, counts, idx, val, stat, &
                          values, codes, centroids)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz, n_planes
    integer(int32), intent(in) :: indptr(n_in + 1), indices(max(nnz, 1_int64))
    integer(int8), intent(out) :: counts(:), idx(PLANE_LANES, n_planes)
    real(real32), intent(out) :: val(PLANE_LANES, n_planes)
    integer, intent(out) :: stat
    real(real32), intent(in), optional :: values(max(nnz, 1_int64)), centroids(*)
    integer(int8), intent(in), optional :: codes(max(nnz, 1_int64))
    integer(int64), allocatable :: first(:)
    integer(int32), allocatable :: rank(:)
    integer(int64) :: nc, nb, c, k, j, b, t, cells
    integer :: i
    logical :: book

    nc = (n_in + PLANE_CHUNK - 1) / PLANE_CHUNK; nb = (n_out + PLANE_LANES - 1) / PLANE_LANES
    cells = nc * nb
    stat = 1
    book = present(codes) .and. present(centroids)
    if (.not. (book .or. present(values))) return
    if (plane_count(n_in, n_out, nnz, indptr, indices, counts) /= n_planes) return
    allocate (first(cells), rank(n_out), stat=stat)
    if (stat /= 0) return
    ! first(cell): the cell's first plane (1-based), cells in their order.
    t = 1
    do k = 1, cells
      first(k) = t
      t = t + iand(int(counts(k), int64), 255_int64)
    end do
    idx = 0; val = 0; rank = 0
    do c = 0, nc - 1
      do i = int(c) * PLANE_CHUNK + 1, min(n_in, int(c + 1) * PLANE_CHUNK)
        do k = indptr(i) + 1, indptr(i + 1)
          j = indices(k); b = j / PLANE_LANES
          t = first(cell_of(nc, nb, c, b) + 1) + rank(j + 1)
          rank(j + 1) = rank(j + 1) + 1
          idx(mod(j, int(PLANE_LANES, int64)) + 1, t) = int(i - 1 - c * PLANE_CHUNK, int8)
          if (book) then
            val(mod(j, int(PLANE_LANES, int64)) + 1, t) = centroids(iand(int(codes(k)), 255) + 1)
          else
            val(mod(j, int(PLANE_LANES, int64)) + 1, t) = values(k)
          end if
        end do
      end do
      do i = int(c) * PLANE_CHUNK + 1, min(n_in, int(c + 1) * PLANE_CHUNK)
        do k = indptr(i) + 1, indptr(i + 1)
          rank(indices(k) + 1) = 0
        end do
      end do
    end do
  end subroutine planes_build

  !> Whether a layer's planes (counts(n_cells), idx(16 n_planes), val(16
  !! n_planes); n_planes > 0) are exactly those of its checked pattern and
  !! entry values (planes_build's values, or codes and centroids): n_planes
  !! is the count the pattern keeps and a rebuild gives the same bytes (a
  !! stale copy would give wrong results silently). stat: PYKD_OK,
  !! PYKD_ERR_ARG or PYKD_ERR_ALLOC, with msg.
  subroutine planes_check(n_in, n_out, nnz, indptr, indices, n_planes, counts, idx, val, stat, msg, &
                          values, codes, centroids)
    integer, intent(in) :: n_in, n_out
    integer(int64), intent(in) :: nnz, n_planes
    integer(int32), intent(in) :: indptr(n_in + 1), indices(max(nnz, 1_int64))
    integer(int8), intent(in) :: counts(:), idx(PLANE_LANES * n_planes)
    real(real32), intent(in) :: val(PLANE_LANES * n_planes)
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    real(real32), intent(in), optional :: values(max(nnz, 1_int64)), centroids(*)
    integer(int8), intent(in), optional :: codes(max(nnz, 1_int64))
    integer(int8), allocatable :: w8(:)
    real(real32), allocatable :: wf(:)
    integer(int64) :: cells, want
    integer :: ierr

    cells = plane_cells(int(n_in, int64), int(n_out, int64))
    stat = PYKD_ERR_ALLOC
    allocate (w8(cells + PLANE_LANES * n_planes), wf(PLANE_LANES * n_planes), stat=ierr)
    if (ierr /= 0) then
      msg = 'cannot allocate '//str(cells + 80 * n_planes)//' bytes to check the planes'
      return
    end if
    want = plane_count(n_in, n_out, nnz, indptr, indices)
    if (want < 0) then
      msg = 'cannot allocate the scratch to count the planes'
      return
    end if
    stat = PYKD_ERR_ARG
    if (want /= n_planes .or. .not. planes_kept(int(n_in, int64), int(n_out, int64), nnz, want)) then
      msg = 'planes = '//str(n_planes)//': the pattern has '//str(want)// &
            merge(' (kept)    ', ' (not kept)', planes_kept(int(n_in, int64), int(n_out, int64), nnz, want))
      return
    end if
    call planes_build(n_in, n_out, nnz, indptr, indices, n_planes, w8(1:cells), w8(cells + 1), wf, ierr, &
                      values, codes, centroids)
    if (ierr /= 0) then
      stat = PYKD_ERR_ALLOC
      msg = 'cannot allocate the scratch to build the planes'
    else if (any(counts(1:cells) /= w8(1:cells)) .or. any(idx /= w8(cells + 1:)) .or. any(val /= wf)) then
      msg = 'the planes are not those of the CSR arrays (repack after changing them)'
    else
      stat = PYKD_OK
    end if
  end subroutine planes_check

  !> n samples on the planes, one at a time: y = act(W^T x + b); all NaN
  !! for a sample with a NaN or inf. ok is false (y untouched) when the
  !! counts do not add up to n_planes: the kernel would read past the
  !! planes. The C kernel adds b and applies relu as it stores, and tests
  !! x and the counts as it goes (no pass of its own over either): the
  !! other activations are applied here, to the same sums + b.
  subroutine planes_forward(n_in, n_out, n, n_planes, counts, idx, val, act, b, x, y, ok)
    integer, intent(in) :: n_in, n_out, n, act
    integer(int64), intent(in) :: n_planes
    integer(int8), intent(in) :: counts(*), idx(*)
    real(real32), intent(in) :: val(*), b(n_out), x(n_in, n)
    real(real32), intent(inout) :: y(n_out, n)
    logical, intent(out) :: ok
    integer(int64) :: cells
    integer :: j, st

    cells = plane_cells(int(n_in, int64), int(n_out, int64))
    ok = .true.
    do j = 1, n
      st = c_planes_run(n_in, n_out, cells, n_planes, counts, idx, val, x(1, j), b, &
                        merge(1_c_int, 0_c_int, act == ACT_RELU), y(1, j))
      if (st == 2) then
        ok = .false.
        return
      else if (st == 1) then
        y(:, j) = ieee_value(0.0_real32, ieee_quiet_nan)
        call bias_activation(act, n_out, 1, b, y(:, j))      ! NaN, as every kernel's
      else if (act /= ACT_RELU) then
        call apply_activation(act, n_out, 1, y(:, j))
      end if
    end do
  end subroutine planes_forward

end module pykd_sparse_kernel
