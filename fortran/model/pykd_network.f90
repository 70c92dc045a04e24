!> The whole-network forward on the model layout of docs/model.md: a layer
!! table plus flat buffers. Python (through the f2py shim) and Fortran's
!! pykd_model run a model through this one routine, so both get the same
!! bits for the same batch and thread count.
!!
!! The model's arrays are only read; all scratch comes from the caller's
!! `work` (network_workspace_words words), so any number of threads may run
!! one model at once, each with its own `work`.
module pykd_network
  use iso_fortran_env, only: int8, int32, int64, real32
  use iso_c_binding, only: c_int, c_int64_t, c_ptr, c_loc, c_null_ptr
  !$ use omp_lib, only: omp_get_max_threads, omp_get_num_threads, omp_get_thread_num, omp_in_parallel
  use pykd_codes, only: N_FIELDS, COL_KIND, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, &
                        COL_F32_LEN, COL_I8_OFF, COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, &
                        NORM_NONE, NORM_PER_FEATURE, NORM_SCALAR, KIND_DENSE, KIND_LOW_RANK, &
                        KIND_CODEBOOK, ACT_IDENTITY, ACT_RELU, COL_P1, COL_P2
  use pykd_config, only: PAR_MIN_WORK
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_NONFINITE
  use pykd_bytes, only: str
  use pykd_layer, only: pykd_layer_t, MSG_LEN
  use pykd_layer_factory, only: new_layer
  use pykd_activation, only: valid_activation
  implicit none
  private
  public :: network_forward, network_workspace_words, one_split_layers

  !> From this many samples a batch is split across the OpenMP team, each
  !! thread running every layer on its slice (team_size); below, the layers
  !! run one after the other on the whole batch. Measured in
  !! docs/performance.md ("Batch 256: one parallel region").
  integer, parameter :: TEAM_MIN_BATCH = 16
  !> Samples per thread at least, when split.
  integer, parameter :: TEAM_MIN_SLICE = 8
  !> One sample: its leading dense, low-rank and codebook layers (identity or
  !! relu) of at least this many weights each split their outputs across up to
  !! ONE_MAX_THREADS threads (each core streams its part of W from its own
  !! L2), at most ONE_MAX_LAYERS products (a low-rank layer is two) in
  !! pykd_dense_team.c's chain; measured in docs/performance.md ("Batch 1 on
  !! two cores").
  integer(int64), parameter :: ONE_SPLIT_MIN = 16384
  integer, parameter :: ONE_MAX_THREADS = 4, ONE_MAX_LAYERS = 16

  !> One product of the one-sample chain (pykd_dense_team.c's layer_t).
  type, bind(c) :: chain_entry_t
    integer(c_int) :: n_out = 0, n_in = 0, act = 0   !! act: identity or relu
    integer(c_int) :: bits = 0, n_codes = 0           !! a codebook layer (bits 0: dense)
    integer(c_int64_t) :: nbytes = 0                  !! a codebook layer: packed bytes
    type(c_ptr) :: w = c_null_ptr      !! dense: W (n_out, n_in); codebook: centroids
    type(c_ptr) :: b = c_null_ptr      !! null: no bias (a low-rank layer's t = U x)
    type(c_ptr) :: packed = c_null_ptr !! a codebook layer: its packed indices
    type(c_ptr) :: x = c_null_ptr, y = c_null_ptr
  end type chain_entry_t

  interface
    integer(c_int) function blas_team_safe() bind(c, name='pykd_blas_team_safe')
      import :: c_int
    end function blas_team_safe
    !> fortran/kernels/pykd_dense_team.c: nl products of one sample, each
    !! product's outputs in `parts` parts on the caller and helper threads;
    !! 1 if a codebook product saw a NaN.
    integer(c_int) function c_one_chain(nl, chain, parts) bind(c, name='pykd_one_chain')
      import :: c_int, chain_entry_t
      integer(c_int), value :: nl, parts
      type(chain_entry_t), intent(in) :: chain(*)
    end function c_one_chain
  end interface

contains

  !> Words of `work` that network_forward needs for n samples and this
  !! `upto` (0: all layers), on one thread or split across the team that
  !! team_size(n) gives now (enough for any smaller team too). Not pure: it
  !! asks each layer's kind, and the factory's polymorphic intent(out)
  !! argument cannot be pure. A table that network_forward would reject
  !! gives a size that is merely large enough for the checks to run.
  integer(int64) function network_workspace_words(table, n, upto) result(words)
    integer(int64), intent(in) :: table(:, :)   !! (N_FIELDS, n_layers)
    integer, intent(in) :: n, upto
    integer :: nl

    words = 0
    nl = size(table, 2)
    if (size(table, 1) /= N_FIELDS .or. nl < 1 .or. n < 0) return
    if (upto >= 1 .and. upto <= nl) nl = upto
    words = max(slice_words(table, n, nl), team_words(table, n, nl, team_size(n)))
  end function network_workspace_words

  !> Words one thread needs to run layers 1..nl on n samples. Hidden
  !! outputs ping-pong between two regions A and B; the normalised input
  !! sits in B (layer 1 writes A). The last layer writes y.
  integer(int64) function slice_words(table, n, nl) result(words)
    integer(int64), intent(in) :: table(:, :)
    integer, intent(in) :: n, nl
    integer(int64) :: h_a, h_b, s
    integer :: k, st
    class(pykd_layer_t), allocatable :: layer

    h_a = 0
    do k = 1, nl - 1
      h_a = max(h_a, table(COL_N_OUT, k))
    end do
    h_b = max(h_a, table(COL_N_IN, 1))
    s = 0
    do k = 1, nl
      call new_layer(table(COL_KIND, k), layer, st)
      if (st == PYKD_OK) s = max(s, layer%workspace_words(table(:, k), n))
    end do
    words = (max(h_a, 0_int64) + max(h_b, 0_int64)) * n + s
  end function slice_words

  !> Words for nt threads, each on its own slice of at most ceil(n / nt)
  !! samples with a region of team_stride words (0 for nt <= 1).
  integer(int64) function team_words(table, n, nl, nt) result(words)
    integer(int64), intent(in) :: table(:, :)
    integer, intent(in) :: n, nl, nt
    words = 0
    if (nt > 1) words = nt * team_stride(table, n, nl, nt)
  end function team_words

  !> One thread's region in a team's workspace: whole cache lines, so the
  !! threads never write the same line.
  integer(int64) function team_stride(table, n, nl, nt) result(words)
    integer(int64), intent(in) :: table(:, :)
    integer, intent(in) :: n, nl, nt
    words = (slice_words(table, (n + nt - 1) / nt, nl) + 15) / 16 * 16
  end function team_stride

  !> Threads that split a batch of n samples, each running the whole
  !! network on its slice with single-threaded products (1: the layers run
  !! one after the other on the whole batch, each product threaded by the
  !! BLAS). Needs a BLAS that runs calls made in a parallel region on the
  !! calling thread (pykd_blas_team_safe). Depends on n and the thread
  !! count only, so the bits do too (docs/performance.md).
  integer function team_size(n) result(nt)
    integer, intent(in) :: n
    nt = 1
    !$ if (n >= TEAM_MIN_BATCH .and. blas_team_safe() /= 0) &
    !$   nt = max(1, min(omp_get_max_threads(), n / TEAM_MIN_SLICE))
  end function team_size

  !> y = the model's output for x (upto = 0: all layers, then the output
  !! normalisation undone: y * std + mean), or layer upto's output
  !! (upto >= 1, no output normalisation). The input normalisation, if
  !! any, is applied first: (x - mean) / std. From TEAM_MIN_BATCH samples
  !! the batch is cut into team_size slices, run by the OpenMP team (or one
  !! after another when the caller is already in a parallel region).
  !! stat: PYKD_OK; PYKD_ERR_ARG for a bad table, buffer or size (checked
  !! before anything runs); or a layer's status (PYKD_ERR_NONFINITE from an
  !! int8 layer given NaN/inf). bad_layer: the failing layer (from 1), or 0.
  subroutine network_forward(table, f32, i8, i32, norm, norm_kinds, x, upto, y, work, stat, &
                             bad_layer, errmsg)
    integer(int64), intent(in) :: table(:, :)               !! (N_FIELDS, n_layers)
    real(real32), intent(in), contiguous :: f32(:)
    integer(int8), intent(in), contiguous :: i8(:)
    integer(int32), intent(in), contiguous :: i32(:)
    real(real32), intent(in), contiguous :: norm(:)         !! [in_mean, in_std, out_mean, out_std]
    integer, intent(in) :: norm_kinds(2)                    !! NORM_* of input and output
    real(real32), intent(in), contiguous :: x(:, :)         !! (n_features, n)
    integer, intent(in) :: upto
    real(real32), intent(inout), contiguous :: y(:, :)      !! (n_out of layer upto or last, n)
    real(real32), intent(inout), contiguous :: work(:)      !! network_workspace_words
    integer, intent(out) :: stat, bad_layer
    character(len=*), intent(out), optional :: errmsg
    character(len=MSG_LEN) :: msg
    class(pykd_layer_t), allocatable :: layer
    integer(int64) :: stride
    integer :: nl, n, nt, st, t, me, team, j0, j1
    logical :: inner
    integer, allocatable :: sts(:), bads(:)

    n = size(x, 2)
    nl = size(table, 2)
    if (upto >= 1 .and. upto <= nl) nl = upto
    nt = team_size(n)
    call check_network(table, size(f32, kind=int64), size(i8, kind=int64), size(i32, kind=int64), &
                       size(norm, kind=int64), norm_kinds, x, upto, y, size(work, kind=int64), nt, &
                       stat, bad_layer, msg)
    if (present(errmsg)) errmsg = msg
    if (stat /= PYKD_OK) return
    if (n == 0) return
    if (nt == 1) then
      call run_slice(table, f32, i8, i32, norm, norm_kinds, size(x, 1), size(y, 1), n, x, nl, &
                     upto, y, work, stat, bad_layer)
    else
      stride = team_stride(table, n, nl, nt)
      allocate (sts(nt), bads(nt))
      sts = PYKD_OK; bads = 0
      ! The slices are fixed by n and nt. Called inside a parallel region
      ! (an OpenMP loop of predictions), or granted a smaller team, a thread
      ! runs several slices one after another: the same products, the same
      ! bits (the BLAS runs single-threaded inside a parallel region).
      inner = .false.
      !$ inner = omp_in_parallel()
      !$omp parallel num_threads(nt) private(t, me, team, j0, j1) if(.not. inner)
      me = 0; team = 1
      !$ me = omp_get_thread_num(); team = omp_get_num_threads()
      do t = me, nt - 1, team
        j0 = slice_end(n, nt, t); j1 = slice_end(n, nt, t + 1)
        call run_slice(table, f32, i8, i32, norm, norm_kinds, size(x, 1), size(y, 1), j1 - j0, &
                       x(:, j0 + 1:j1), nl, upto, y(:, j0 + 1:j1), &
                       work(t * stride + 1:(t + 1) * stride), sts(t + 1), bads(t + 1))
      end do
      !$omp end parallel
      ! What one thread would report: the first layer that failed.
      do t = 1, nt
        if (sts(t) /= PYKD_OK .and. (stat == PYKD_OK .or. bads(t) < bad_layer)) then
          stat = sts(t); bad_layer = bads(t)
        end if
      end do
    end if
    if (stat /= PYKD_OK .and. present(errmsg)) then
      call new_layer(table(COL_KIND, bad_layer), layer, st)
      errmsg = 'layer '//str(int(bad_layer, int64))//' ('//layer%name()//'): '// &
               trim(merge('input contains NaN or infinite values', &
                          'corrupt layer data (a value or index)', stat == PYKD_ERR_NONFINITE))
    end if
  end subroutine network_forward

  !> Samples 1 .. slice_end(n, nt, t) belong to slices 0 .. t-1 of nt.
  pure integer function slice_end(n, nt, t)
    integer, intent(in) :: n, nt, t
    slice_end = int(int(n, int64) * t / nt)
  end function slice_end

  !> Layers 1..nl on m samples on this thread: the checked arguments of
  !! network_forward (explicit shapes: a team passes contiguous column
  !! sections, which are not copied). stat and bad_layer as there.
  subroutine run_slice(table, f32, i8, i32, norm, norm_kinds, m_in, m_out, m, x, nl, upto, y, &
                       work, stat, bad_layer)
    integer(int64), intent(in) :: table(:, :)
    real(real32), intent(in) :: f32(:), norm(:)
    integer(int8), intent(in) :: i8(:)
    integer(int32), intent(in) :: i32(:)
    integer, intent(in) :: norm_kinds(2), m_in, m_out, m, nl, upto
    real(real32), intent(in), target :: x(m_in, m)
    real(real32), intent(inout), target :: y(m_out, m)
    real(real32), intent(inout), target :: work(*)
    integer, intent(out) :: stat, bad_layer
    class(pykd_layer_t), allocatable :: layer
    real(real32), pointer, contiguous :: cur(:, :), nxt(:, :)
    integer(int64) :: a0, b0, s0, k_in
    integer :: k, st, ks
    logical :: nan

    stat = PYKD_OK
    bad_layer = 0
    if (m == 0) return
    call regions(table, m, nl, a0, b0, s0)
    k_in = norm_len(norm_kinds(1), table(COL_N_IN, 1))
    call network_input(norm_kinds, m_in, m, int(k_in), x, norm, b0, work, cur)
    ks = 0
    if (m == 1) ks = one_split_layers(table, nl)
    if (ks > 0) then
      call run_one_split(table, f32, i8, ks, nl, a0, b0, s0, cur, y, work, nan)
      if (nan) then
        ! A codebook product saw a NaN (a NaN input or a corrupt index): the
        ! layers again on this thread, for their own outputs and status (the
        ! chain may have overwritten a normalised input).
        ks = 0
        call network_input(norm_kinds, m_in, m, int(k_in), x, norm, b0, work, cur)
      else
        call layer_out(table, ks, nl, m, a0, b0, y, work, cur)
      end if
    end if
    do k = ks + 1, nl
      call layer_out(table, k, nl, m, a0, b0, y, work, nxt)
      call new_layer(table(COL_KIND, k), layer, st)
      call layer%forward(table(:, k), f32, i8, i32, m, cur, nxt, work(s0 + 1), stat)
      if (stat /= PYKD_OK) then
        bad_layer = k
        return
      end if
      cur => nxt
    end do
    if (upto == 0 .and. norm_kinds(2) /= NORM_NONE) then
      call denormalise(m_out, m, int(norm_len(norm_kinds(2), int(m_out, int64))), &
                       norm(2 * k_in + 1:), y)
    end if
  end subroutine run_slice

  !> cur => the network's input: x, or x normalised into region B of work.
  subroutine network_input(norm_kinds, m_in, m, k_in, x, norm, b0, work, cur)
    integer, intent(in) :: norm_kinds(2), m_in, m, k_in
    real(real32), intent(in), target :: x(m_in, m)
    real(real32), intent(in) :: norm(:)
    integer(int64), intent(in) :: b0
    real(real32), intent(inout), target :: work(*)
    real(real32), pointer, contiguous, intent(out) :: cur(:, :)

    cur => x
    if (norm_kinds(1) /= NORM_NONE) then
      cur(1:m_in, 1:m) => work(b0 + 1:b0 + int(m_in, int64) * m)
      call normalise(m_in, m, k_in, x, norm(1:k_in), norm(k_in + 1:2 * k_in), cur)
    end if
  end subroutine network_input

  !> nxt => where layer k of nl writes its m outputs: y for the last
  !! layer, else region A (odd k) or B (even k) of `work`.
  subroutine layer_out(table, k, nl, m, a0, b0, y, work, nxt)
    integer(int64), intent(in) :: table(:, :), a0, b0
    integer, intent(in) :: k, nl, m
    real(real32), intent(inout), target, contiguous :: y(:, :)
    real(real32), intent(inout), target :: work(*)
    real(real32), pointer, contiguous, intent(out) :: nxt(:, :)

    if (k == nl) then
      nxt => y
    else if (mod(k, 2) == 1) then
      nxt(1:table(COL_N_OUT, k), 1:m) => work(a0 + 1:a0 + table(COL_N_OUT, k) * m)
    else
      nxt(1:table(COL_N_OUT, k), 1:m) => work(b0 + 1:b0 + table(COL_N_OUT, k) * m)
    end if
  end subroutine layer_out

  !> Leading layers of nl that one sample runs split across threads: dense,
  !! low-rank and codebook identity or relu layers of at least ONE_SPLIT_MIN
  !! weights and 32 outputs, ONE_MAX_LAYERS products at most (0 without
  !! OpenMP, with one OpenMP thread, or inside a parallel region).
  integer function one_split_layers(table, nl) result(ks)
    integer(int64), intent(in) :: table(:, :)
    integer, intent(in) :: nl
    integer :: ne, e

    ks = 0
    ne = 0
    !$ if (omp_get_max_threads() < 2 .or. omp_in_parallel()) return
    !$ do while (ks < nl)
    !$   e = split_products(table(:, ks + 1))
    !$   if (e == 0 .or. ne + e > ONE_MAX_LAYERS) exit
    !$   ne = ne + e
    !$   ks = ks + 1
    !$ end do
  end function one_split_layers

  !> The products a layer adds to the one-sample chain (dense and codebook
  !! 1, low rank 2: t = U x, then V t + b), or 0 if it does not split.
  pure integer function split_products(row) result(e)
    integer(int64), intent(in) :: row(:)
    integer(int64) :: r

    e = 0
    if (row(COL_N_OUT) < 32 .or. (row(COL_ACT) /= ACT_IDENTITY .and. row(COL_ACT) /= ACT_RELU)) return
    if (row(COL_KIND) == KIND_DENSE .or. row(COL_KIND) == KIND_CODEBOOK) then
      if (row(COL_N_IN) * row(COL_N_OUT) >= ONE_SPLIT_MIN) e = 1
    else if (row(COL_KIND) == KIND_LOW_RANK) then
      r = row(COL_P1)
      if (r >= 16 .and. r * (row(COL_N_IN) + row(COL_N_OUT)) >= ONE_SPLIT_MIN) e = 2
    end if
  end function split_products

  !> Layers 1..ks (dense, low rank or codebook, identity or relu) of one
  !! sample x as a chain of products, each product's outputs in parts of
  !! whole 16-output vectors (fixed by the width and the thread count) on
  !! this thread and pykd_dense_team.c's helpers, each of which streams its
  !! rows of W, the same on every call, from its core's cache. Each output is
  !! summed as on one thread (pykd_f32_gemv, pykd_cb_product), so the bits do
  !! not depend on the parts or on who runs them. A low-rank layer's t = U x
  !! goes to the layer scratch at s0 (its r words at m = 1). nan: a codebook
  !! product saw a NaN (its layer then decides what that was).
  subroutine run_one_split(table, f32, i8, ks, nl, a0, b0, s0, x, y, work, nan)
    integer(int64), intent(in) :: table(:, :), a0, b0, s0
    real(real32), intent(in), target :: f32(:)
    integer(int8), intent(in), target :: i8(:)
    integer, intent(in) :: ks, nl
    real(real32), intent(in), target, contiguous :: x(:, :)
    real(real32), intent(inout), target, contiguous :: y(:, :)
    real(real32), intent(inout), target :: work(*)
    logical, intent(out) :: nan
    real(real32), pointer, contiguous :: cur(:, :), nxt(:, :)
    type(chain_entry_t) :: chain(2 * ks)
    integer(int64) :: off, n_in, n_out, r
    integer :: k, nt, ne

    nt = 1
    !$ nt = min(omp_get_max_threads(), ONE_MAX_THREADS)
    cur => x
    ne = 0
    do k = 1, ks
      call layer_out(table, k, nl, 1, a0, b0, y, work, nxt)
      off = table(COL_F32_OFF, k)
      n_in = table(COL_N_IN, k); n_out = table(COL_N_OUT, k)
      ne = ne + 1
      chain(ne)%n_out = int(n_out, c_int); chain(ne)%n_in = int(n_in, c_int)
      chain(ne)%act = int(table(COL_ACT, k), c_int)
      chain(ne)%x = c_loc(cur(1, 1))
      if (table(COL_KIND, k) == KIND_LOW_RANK) then
        r = table(COL_P1, k)
        chain(ne)%n_out = int(r, c_int); chain(ne)%act = int(ACT_IDENTITY, c_int)
        chain(ne)%w = c_loc(f32(off + 1))          ! t = U x: no bias, into the scratch
        chain(ne)%y = c_loc(work(s0 + 1))
        ne = ne + 1
        chain(ne)%n_out = int(n_out, c_int); chain(ne)%n_in = int(r, c_int)
        chain(ne)%act = int(table(COL_ACT, k), c_int)
        chain(ne)%w = c_loc(f32(off + n_in * r + 1))
        chain(ne)%b = c_loc(f32(off + n_in * r + n_out * r + 1))
        chain(ne)%x = c_loc(work(s0 + 1))
      else if (table(COL_KIND, k) == KIND_CODEBOOK) then
        r = table(COL_P1, k)                       ! the number of codes
        chain(ne)%bits = int(table(COL_P2, k), c_int); chain(ne)%n_codes = int(r, c_int)
        chain(ne)%nbytes = table(COL_I8_LEN, k)
        chain(ne)%packed = c_loc(i8(table(COL_I8_OFF, k) + 1))
        chain(ne)%w = c_loc(f32(off + 1))          ! the centroids, then b
        chain(ne)%b = c_loc(f32(off + r + 1))
      else
        chain(ne)%w = c_loc(f32(off + 1))
        chain(ne)%b = c_loc(f32(off + n_in * n_out + 1))
      end if
      chain(ne)%y = c_loc(nxt(1, 1))
      cur => nxt
    end do
    nan = c_one_chain(int(ne, c_int), chain, int(nt, c_int)) /= 0
  end subroutine run_one_split

  !> Offsets of the regions A, B and the layer scratch in `work`, as sized by
  !! network_workspace_words.
  subroutine regions(table, n, nl, a0, b0, s0)
    integer(int64), intent(in) :: table(:, :)
    integer, intent(in) :: n, nl
    integer(int64), intent(out) :: a0, b0, s0
    integer(int64) :: h_a
    integer :: k

    h_a = 0
    do k = 1, nl - 1
      h_a = max(h_a, table(COL_N_OUT, k))
    end do
    a0 = 0
    b0 = h_a * n
    s0 = b0 + max(h_a, table(COL_N_IN, 1)) * n
  end subroutine regions

  !> Values per mean (and per std) of a normalisation code for m features.
  pure integer(int64) function norm_len(kind, m)
    integer, intent(in) :: kind
    integer(int64), intent(in) :: m
    norm_len = 0
    if (kind == NORM_PER_FEATURE) norm_len = m
    if (kind == NORM_SCALAR) norm_len = 1
  end function norm_len

  !> xn = (x - mean) / std; k == 1: one mean and std for every feature.
  !! Small batches stay off OpenMP: even a region whose if() is false costs
  !! a team allocation in libgomp.
  subroutine normalise(m, n, k, x, mean, std, xn)
    integer, intent(in) :: m, n, k
    real(real32), intent(in) :: x(m, n), mean(k), std(k)
    real(real32), intent(out) :: xn(m, n)
    integer :: j

    if (int(m, int64) * n < PAR_MIN_WORK) then
      do j = 1, n
        call normalise_col(m, k, x(:, j), mean, std, xn(:, j))
      end do
      return
    end if
    !$omp parallel do schedule(static)
    do j = 1, n
      call normalise_col(m, k, x(:, j), mean, std, xn(:, j))
    end do
    !$omp end parallel do
  end subroutine normalise

  pure subroutine normalise_col(m, k, x, mean, std, xn)
    integer, intent(in) :: m, k
    real(real32), intent(in) :: x(m), mean(k), std(k)
    real(real32), intent(out) :: xn(m)

    if (k == 1) then
      xn = (x - mean(1)) / std(1)
    else
      xn = (x - mean) / std
    end if
  end subroutine normalise_col

  !> y = y * std + mean (two roundings: the build forbids FMA contraction).
  !! ms = [mean(k), std(k)]; k == 1: one for every output.
  subroutine denormalise(m, n, k, ms, y)
    integer, intent(in) :: m, n, k
    real(real32), intent(in) :: ms(2 * k)
    real(real32), intent(inout) :: y(m, n)
    integer :: j

    if (int(m, int64) * n < PAR_MIN_WORK) then
      do j = 1, n
        call denormalise_col(m, k, ms, y(:, j))
      end do
      return
    end if
    !$omp parallel do schedule(static)
    do j = 1, n
      call denormalise_col(m, k, ms, y(:, j))
    end do
    !$omp end parallel do
  end subroutine denormalise

  pure subroutine denormalise_col(m, k, ms, y)
    integer, intent(in) :: m, k
    real(real32), intent(in) :: ms(2 * k)
    real(real32), intent(inout) :: y(m)

    if (k == 1) then
      y = y * ms(2) + ms(1)
    else
      y = y * ms(k + 1:2 * k) + ms(1:k)
    end if
  end subroutine denormalise_col

  !> Everything network_forward relies on, checked cheaply (no weight is
  !! read): sizes, codes, the chain, slices inside their buffers, norm and
  !! workspace sizes. stat PYKD_ERR_ARG with bad_layer and msg on failure.
  subroutine check_network(table, nf32, ni8, ni32, nnorm, norm_kinds, x, upto, y, nwork, nt, &
                           stat, bad_layer, msg)
    integer(int64), intent(in) :: table(:, :), nf32, ni8, ni32, nnorm, nwork
    integer, intent(in) :: norm_kinds(2), upto, nt   !! nt: the team that will run
    real(real32), intent(in) :: x(:, :), y(:, :)
    integer, intent(out) :: stat, bad_layer
    character(len=*), intent(out) :: msg
    integer(int64) :: need, k_out
    integer :: k, nl

    stat = PYKD_ERR_ARG
    bad_layer = 0
    msg = ''
    nl = size(table, 2)
    if (size(table, 1) /= N_FIELDS .or. nl < 1) then
      msg = 'table must be ('//str(int(N_FIELDS, int64))//', n_layers >= 1); got ('// &
            str(size(table, 1, kind=int64))//', '//str(int(nl, int64))//')'
      return
    end if
    if (upto < 0 .or. upto > nl) then
      msg = 'upto = '//str(int(upto, int64))//' outside 0 .. '//str(int(nl, int64))
      return
    end if
    do k = 1, nl
      bad_layer = k
      if (k > 1) then
        if (table(COL_N_IN, k) /= table(COL_N_OUT, k - 1)) then
          msg = 'layer '//str(int(k, int64))//' takes '//str(table(COL_N_IN, k))// &
                ' inputs but layer '//str(int(k - 1, int64))//' outputs '//str(table(COL_N_OUT, k - 1))
          return
        end if
      end if
      call check_layer(k, table(:, k), nf32, ni8, ni32, stat, msg)
      if (stat /= PYKD_OK) return
      stat = PYKD_ERR_ARG
    end do
    bad_layer = 0
    if (.not. (all(norm_kinds == NORM_NONE .or. norm_kinds == NORM_PER_FEATURE &
                   .or. norm_kinds == NORM_SCALAR))) then
      msg = 'unknown normalisation code in norm_kinds = ['//str(int(norm_kinds(1), int64))//', '// &
            str(int(norm_kinds(2), int64))//']'
      return
    end if
    k_out = norm_len(norm_kinds(2), table(COL_N_OUT, nl))
    need = 2 * (norm_len(norm_kinds(1), table(COL_N_IN, 1)) + k_out)
    if (nnorm < need) then
      msg = 'norm has '//str(nnorm)//' values, but norm_kinds need '//str(need)
      return
    end if
    if (upto >= 1) nl = upto
    if (size(x, 1, kind=int64) /= table(COL_N_IN, 1) .or. size(y, 1, kind=int64) /= table(COL_N_OUT, nl) &
        .or. size(y, 2) /= size(x, 2)) then
      msg = 'x must be ('//str(table(COL_N_IN, 1))//', n) and y ('//str(table(COL_N_OUT, nl))// &
            ', n) (Fortran order); got x ('//str(size(x, 1, kind=int64))//', '//str(size(x, 2, kind=int64))// &
            ') and y ('//str(size(y, 1, kind=int64))//', '//str(size(y, 2, kind=int64))//')'
      return
    end if
    need = slice_words(table, size(x, 2), nl)
    if (nt > 1) need = team_words(table, size(x, 2), nl, nt)
    if (nwork < need) then
      msg = 'work has '//str(nwork)//' words, network_workspace_words gives '//str(need)
      return
    end if
    stat = PYKD_OK
  end subroutine check_network

  !> One row: a known kind and activation, the kind's own row check, and
  !! each slice inside its buffer.
  subroutine check_layer(k, row, nf32, ni8, ni32, stat, msg)
    integer, intent(in) :: k
    integer(int64), intent(in) :: row(N_FIELDS), nf32, ni8, ni32
    integer, intent(out) :: stat
    character(len=*), intent(inout) :: msg
    class(pykd_layer_t), allocatable :: layer
    character(len=MSG_LEN) :: what
    integer(int64) :: sizes(3)
    integer :: b, col(3)
    character(len=3), parameter :: BUF_NAME(3) = ['f32', 'i8 ', 'i32']

    call new_layer(row(COL_KIND), layer, stat)
    if (stat /= PYKD_OK) then
      msg = ': unknown layer kind '//str(row(COL_KIND))
    else if (.not. valid_activation(row(COL_ACT))) then
      stat = PYKD_ERR_ARG
      msg = ' ('//layer%name()//'): unknown activation '//str(row(COL_ACT))
    else
      what = ''
      call layer%check_row(row, stat, what)
      if (stat /= PYKD_OK) msg = what
      sizes = [nf32, ni8, ni32]
      col = [COL_F32_OFF, COL_I8_OFF, COL_I32_OFF]
      do b = 1, 3
        if (stat /= PYKD_OK) exit
        if (row(col(b)) < 0 .or. row(col(b) + 1) < 0 .or. row(col(b)) > sizes(b) - row(col(b) + 1)) then
          stat = PYKD_ERR_ARG
          msg = trim(BUF_NAME(b))//' slice (offset '//str(row(col(b)))//', length '// &
                str(row(col(b) + 1))//') is not inside the '//trim(BUF_NAME(b))//' buffer of '// &
                str(sizes(b))//' elements'
        end if
      end do
      if (stat /= PYKD_OK) msg = ' ('//layer%name()//'): '//trim(msg)
    end if
    if (stat /= PYKD_OK) msg = 'layer '//str(int(k, int64))//trim(msg)
  end subroutine check_layer

end module pykd_network
