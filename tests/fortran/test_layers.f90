!> Fortran-only tests of the layer kinds and the whole-network forward:
!! every kind against a naive float64 reference built from its densified W,
!! every activation (NaN through relu), int8 against an integer reference,
!! record write -> scan -> load round trips, and corrupt payloads rejected.
program test_layers
  use iso_fortran_env, only: real32, real64, int8, int32, int64
  use ieee_arithmetic, only: ieee_is_nan, ieee_value, ieee_quiet_nan, ieee_rint
  use pykd_codes
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_FORMAT, PYKD_ERR_NONFINITE
  use pykd_layer, only: pykd_layer_t
  use pykd_layer_factory, only: new_layer
  use pykd_activation, only: apply_activation
  use pykd_network, only: network_forward, network_workspace_words
  use pykd_bytes, only: put_u32, get_u32, str
  use pykd_int8_kernel, only: int8_path_name, int8_pack, int8_packed_words
  use pykd_sparse_kernel, only: plane_cells, sparse_path_name
  use test_harness, only: check, finish
  use test_files, only: uniforms
  implicit none

  !> One layer: its row and buffers (offsets 0), and the densified W and b.
  type :: case_t
    character(len=40) :: what = ''
    integer(int64) :: row(N_FIELDS) = 0
    real(real32), allocatable :: f32(:)
    integer(int8), allocatable :: i8(:)
    integer(int32), allocatable :: i32(:)
    real(real64), allocatable :: w(:, :)   !! (n_out, n_in)
    real(real64), allocatable :: b(:)
  end type case_t

  integer(int64), save :: seed = 7

  call test_activations()
  call test_kinds_forward()
  call test_int8_exact()
  call test_round_trips()
  call test_corrupt_dense()
  call test_corrupt_csr()
  call test_csr_planes()
  call test_sparse_codebook_planes()
  call test_corrupt_codebook()
  call test_corrupt_sparse_codebook()
  call test_network_checks()
  call finish('Fortran layer')

contains

  function rnd(n, amp) result(u)
    integer(int64), intent(in) :: n
    real(real32), intent(in) :: amp
    real(real32) :: u(n)
    seed = seed + 1
    u = uniforms(int(n), seed, amp)
  end function rnd

  !> Integers in [0, m).
  function irnd(n, m) result(k)
    integer(int64), intent(in) :: n, m
    integer(int64) :: k(n)
    k = min(int((rnd(n, 1.0) + 1) / 2 * m, int64), m - 1)
  end function irnd

  elemental real(real64) function act64(act, z)
    integer, intent(in) :: act
    real(real64), intent(in) :: z
    select case (act)
    case (ACT_RELU)
      act64 = max(z, 0.0_real64)
    case (ACT_TANH)
      act64 = tanh(z)
    case (ACT_SIGMOID)
      act64 = 1 / (1 + exp(-z))
    case (ACT_GELU)
      act64 = 0.5_real64 * z * (1 + erf(z / sqrt(2.0_real64)))
    case (ACT_SILU)
      act64 = z / (1 + exp(-z))
    case default
      act64 = z
    end select
  end function act64

  ! ------------------------------------------------------------ activations

  subroutine test_activations()
    integer, parameter :: m = 9
    real(real32) :: z(m, 2), y(m, 2)
    real(real64) :: ref(m, 2)
    integer :: act
    character(len=8), parameter :: NAMES(0:5) = [character(len=8) :: 'identity', 'relu', 'tanh', &
                                                 'sigmoid', 'gelu', 'silu']

    z(:, 1) = [-100.0, -20.0, -3.0, -0.5, 0.0, 0.25, 2.0, 20.0, 100.0]
    z(:, 2) = [-1e-3, 1e-3, -7.0, 7.0, 1.5, -1.5, 0.1, -0.1, 40.0]
    do act = ACT_IDENTITY, ACT_MAX
      y = z
      call apply_activation(act, m, 2, y)
      ref = act64(act, real(z, real64))
      call check(all(abs(y - ref) <= 1e-6_real64 * max(1.0_real64, abs(ref))) .and. &
                 all(abs(y) <= huge(y)), 'activation '//trim(NAMES(act))//' vs float64 formula')
      y = ieee_value(1.0_real32, ieee_quiet_nan)
      call apply_activation(act, m, 2, y)
      call check(all(ieee_is_nan(y)), 'activation '//trim(NAMES(act))//' keeps NaN')
    end do
  end subroutine test_activations

  ! ----------------------------------------------------------- kind builders

  subroutine header(c, kind, act, n_in, n_out, what)
    type(case_t), intent(inout) :: c
    integer, intent(in) :: kind, act, n_in, n_out
    character(len=*), intent(in) :: what
    c%what = what
    c%row = 0
    c%row(COL_KIND) = kind; c%row(COL_ACT) = act
    c%row(COL_N_IN) = n_in; c%row(COL_N_OUT) = n_out
    allocate (c%w(n_out, n_in), c%b(n_out))
    c%w = 0
  end subroutine header

  subroutine finish_case(c, nf, ni8, ni32)
    type(case_t), intent(inout) :: c
    integer(int64), intent(in) :: nf, ni8, ni32
    c%row(COL_F32_LEN) = nf; c%row(COL_I8_LEN) = ni8; c%row(COL_I32_LEN) = ni32
    if (.not. allocated(c%i8)) allocate (c%i8(max(ni8, 1_int64)), source=0_int8)
    if (.not. allocated(c%i32)) allocate (c%i32(max(ni32, 1_int64)), source=0_int32)
  end subroutine finish_case

  !> The lengths of a dense_int8 case, and its i32 slice: the kernel's
  !! packed copy of q (derived from c%i8, as the loader builds it).
  subroutine finish_int8(c, n_in, n_out)
    type(case_t), intent(inout) :: c
    integer, intent(in) :: n_in, n_out
    integer(int64) :: nw
    nw = int8_packed_words(int(n_in, int64), int(n_out, int64))
    if (allocated(c%i32)) deallocate (c%i32)
    allocate (c%i32(nw))
    call finish_case(c, int(2 * n_out + 1, int64), int(n_in * n_out, int64), nw)
    call int8_pack(n_in, n_out, c%i8, c%i32)
  end subroutine finish_int8

  function make_dense(n_in, n_out, act) result(c)
    integer, intent(in) :: n_in, n_out, act
    type(case_t) :: c
    integer(int64) :: nw
    call header(c, KIND_DENSE, act, n_in, n_out, 'dense')
    nw = int(n_in, int64) * n_out
    c%f32 = [rnd(nw, 0.5), rnd(int(n_out, int64), 0.3)]
    c%w = reshape(real(c%f32(:nw), real64), [n_out, n_in])
    c%b = c%f32(nw + 1:)
    call finish_case(c, nw + n_out, 0_int64, 0_int64)
  end function make_dense

  function make_low_rank(n_in, n_out, r, act) result(c)
    integer, intent(in) :: n_in, n_out, r, act
    type(case_t) :: c
    integer(int64) :: nu, nv
    call header(c, KIND_LOW_RANK, act, n_in, n_out, 'low_rank')
    nu = int(n_in, int64) * r; nv = int(r, int64) * n_out
    c%f32 = [rnd(nu, 0.5), rnd(nv, 0.5), rnd(int(n_out, int64), 0.3)]
    ! U (n_in, r) C order = u(r, n_in); V (r, n_out) = v(n_out, r); W = U V.
    c%w = matmul(reshape(real(c%f32(nu + 1:nu + nv), real64), [n_out, r]), &
                 reshape(real(c%f32(:nu), real64), [r, n_in]))
    c%b = c%f32(nu + nv + 1:)
    c%row(COL_P1) = r
    call finish_case(c, nu + nv + n_out, 0_int64, 0_int64)
  end function make_low_rank

  !> A random CSR pattern with about `density` of the entries.
  subroutine pattern(n_in, n_out, density, indptr, indices)
    integer, intent(in) :: n_in, n_out
    real, intent(in) :: density
    integer(int32), allocatable, intent(out) :: indptr(:), indices(:)
    real(real32) :: u(n_out)
    integer :: i, j
    allocate (indptr(n_in + 1), indices(0))
    indptr(1) = 0
    do i = 1, n_in
      u = (rnd(int(n_out, int64), 1.0) + 1) / 2
      do j = 1, n_out
        if (u(j) < density) indices = [indices, int(j - 1, int32)]
      end do
      indptr(i + 1) = size(indices)
    end do
  end subroutine pattern

  function make_csr(n_in, n_out, density, act) result(c)
    integer, intent(in) :: n_in, n_out, act
    real, intent(in) :: density
    type(case_t) :: c
    integer(int32), allocatable :: indptr(:), indices(:)
    integer :: i, k, nnz
    call header(c, KIND_SPARSE_CSR, act, n_in, n_out, 'sparse_csr')
    call pattern(n_in, n_out, density, indptr, indices)
    nnz = size(indices)
    c%f32 = [rnd(int(nnz, int64), 0.8), rnd(int(n_out, int64), 0.3)]
    do i = 1, n_in
      do k = indptr(i) + 1, indptr(i + 1)
        c%w(indices(k) + 1, i) = c%f32(k)
      end do
    end do
    c%b = c%f32(nnz + 1:)
    c%i32 = [indptr, indices]
    c%row(COL_P1) = nnz
    call finish_case(c, int(nnz + n_out, int64), 0_int64, int(n_in + 1 + nnz, int64))
  end function make_csr

  !> Pack indices LSB first, `bits` each (the test's own, bit by bit).
  function pack_bits(idx, bits) result(p)
    integer(int64), intent(in) :: idx(:)
    integer, intent(in) :: bits
    integer(int8), allocatable :: p(:)
    integer(int64) :: e, t
    integer :: m, byte(0:size(idx) * bits / 8 + 1)
    byte = 0
    do e = 1, size(idx)
      do m = 0, bits - 1
        t = (e - 1) * bits + m
        if (btest(idx(e), m)) byte(t / 8) = ibset(byte(t / 8), int(mod(t, 8_int64)))
      end do
    end do
    p = int(merge(byte - 256, byte, byte > 127), int8)
    p = p(:(size(idx) * bits + 7) / 8)
  end function pack_bits

  function make_codebook(n_in, n_out, n_codes, bits, act) result(c)
    integer, intent(in) :: n_in, n_out, n_codes, bits, act
    type(case_t) :: c
    integer(int64) :: idx(int(n_in, int64) * n_out), e
    call header(c, KIND_CODEBOOK, act, n_in, n_out, 'codebook')
    idx = irnd(size(idx, kind=int64), int(n_codes, int64))
    c%f32 = [rnd(int(n_codes, int64), 0.6), rnd(int(n_out, int64), 0.3)]
    do e = 0, size(idx) - 1      ! W[i, j] = centroids[idx(i n_out + j)]
      c%w(mod(e, int(n_out, int64)) + 1, e / n_out + 1) = c%f32(idx(e + 1) + 1)
    end do
    c%b = c%f32(n_codes + 1:)
    c%i8 = pack_bits(idx, bits)
    c%row(COL_P1) = n_codes; c%row(COL_P2) = bits
    call finish_case(c, int(n_codes + n_out, int64), size(c%i8, kind=int64), 0_int64)
  end function make_codebook

  function make_sparse_codebook(n_in, n_out, density, n_codes, bits, act) result(c)
    integer, intent(in) :: n_in, n_out, n_codes, bits, act
    real, intent(in) :: density
    type(case_t) :: c
    integer(int32), allocatable :: indptr(:), indices(:)
    integer(int64), allocatable :: codes(:)
    integer :: i, k, nnz
    call header(c, KIND_SPARSE_CODEBOOK, act, n_in, n_out, 'sparse_codebook')
    call pattern(n_in, n_out, density, indptr, indices)
    nnz = size(indices)
    codes = irnd(int(nnz, int64), int(n_codes, int64))
    c%f32 = [rnd(int(n_codes, int64), 0.6), rnd(int(n_out, int64), 0.3)]
    do i = 1, n_in
      do k = indptr(i) + 1, indptr(i + 1)
        c%w(indices(k) + 1, i) = c%f32(codes(k) + 1)
      end do
    end do
    c%b = c%f32(n_codes + 1:)
    c%i8 = int(merge(codes - 256, codes, codes > 127), int8)
    c%i32 = [indptr, indices]
    c%row(COL_P1) = nnz; c%row(COL_P2) = n_codes; c%row(COL_P3) = bits
    call finish_case(c, int(n_codes + n_out, int64), int(nnz, int64), int(n_in + 1 + nnz, int64))
  end function make_sparse_codebook

  ! ---------------------------------------------------------------- forward

  !> y = network_forward of the one-layer model c.
  subroutine run(c, x, y, stat)
    type(case_t), intent(in) :: c
    real(real32), intent(in) :: x(:, :)
    real(real32), intent(out) :: y(:, :)
    integer, intent(out) :: stat
    real(real32), allocatable :: work(:)
    real(real32) :: norm(1)
    integer :: bad
    integer(int64) :: table(N_FIELDS, 1)
    table(:, 1) = c%row
    norm = 0
    allocate (work(max(network_workspace_words(table, size(x, 2), 0), 1_int64)))
    call network_forward(table, c%f32, c%i8, c%i32, norm, [NORM_NONE, NORM_NONE], x, 0, y, work, &
                         stat, bad)
  end subroutine run

  !> The case's forward against act(W x + b) in float64, for several batch sizes.
  subroutine check_forward(c)
    type(case_t), intent(in) :: c
    integer, parameter :: ns(3) = [1, 3, 40]
    real(real32), allocatable :: x(:, :), y(:, :)
    real(real64), allocatable :: ref(:, :)
    integer :: k, st, n, n_in, n_out, j
    logical :: ok
    n_in = int(c%row(COL_N_IN)); n_out = int(c%row(COL_N_OUT))
    ok = .true.
    do k = 1, size(ns)
      n = ns(k)
      x = reshape(rnd(int(n_in, int64) * n, 2.0), [n_in, n])
      allocate (y(n_out, n))
      call run(c, x, y, st)
      ref = matmul(c%w, real(x, real64))
      do j = 1, n
        ref(:, j) = act64(int(c%row(COL_ACT)), ref(:, j) + c%b)
      end do
      ok = ok .and. st == PYKD_OK .and. maxval(abs(y - ref)) <= 1e-5_real64 * max(1.0_real64, maxval(abs(ref)))
      deallocate (y)
    end do
    call check(ok, trim(c%what)//' forward (act '//achar(48 + c%row(COL_ACT))//') vs float64 W x + b')
  end subroutine check_forward

  subroutine test_kinds_forward()
    integer :: act
    type(case_t) :: c
    real(real32) :: x(20, 2), y(30, 2)
    integer :: st

    do act = ACT_IDENTITY, ACT_MAX
      call check_forward(make_dense(20, 30, act))
      call check_forward(make_low_rank(20, 30, 4, act))
      call check_forward(make_csr(20, 30, 0.2, act))
      call check_forward(make_codebook(20, 30, 16, 4, act))
      call check_forward(make_sparse_codebook(20, 30, 0.15, 5, 3, act))
    end do
    ! Sizes that exercise u16 indices, several codebook panels and 1-, 2-, 8-bit codes.
    call check_forward(make_csr(7, 300, 0.1, ACT_RELU))
    call check_forward(make_codebook(700, 40, 2, 1, ACT_TANH))
    call check_forward(make_codebook(33, 7, 3, 2, ACT_IDENTITY))
    call check_forward(make_codebook(30, 9, 200, 8, ACT_SILU))
    call check_forward(make_sparse_codebook(9, 300, 0.05, 256, 8, ACT_GELU))
    call check_forward(make_sparse_codebook(6, 5, 0.0, 1, 1, ACT_IDENTITY))

    ! NaN goes through relu (float kinds), and a sparse kind NaNs the whole sample.
    c = make_dense(20, 30, ACT_RELU)
    x = 1; x(3, 2) = ieee_value(1.0_real32, ieee_quiet_nan)
    call run(c, x, y, st)
    call check(st == PYKD_OK .and. all(ieee_is_nan(y(:, 2))) .and. .not. any(ieee_is_nan(y(:, 1))), &
               'dense relu: a NaN input gives NaN outputs, not 0')
    c = make_csr(20, 30, 0.1, ACT_RELU)
    call run(c, x, y, st)
    call check(st == PYKD_OK .and. all(ieee_is_nan(y(:, 2))) .and. .not. any(ieee_is_nan(y(:, 1))), &
               'sparse_csr relu: a NaN input gives all-NaN outputs')
  end subroutine test_kinds_forward

  !> dense_int8 on this CPU's path (pykd_int8_kernel), every tile edge:
  !! n_in odd and off 2/4/16/32/64, n_out off 16/64, batches off 4.
  subroutine test_int8_exact()
    character(len=16) :: path
    path = int8_path_name()
    call check(any(path == ['portable  ', 'avx2      ', 'avxvnni   ', 'avx512vnni']), &
               'int8 path name "'//trim(path)//'" is one of the four')
    call int8_exact_case(45, 13, 6, path)
    call int8_exact_case(1, 1, 1, path)
    call int8_exact_case(63, 17, 9, path)
    call int8_exact_case(784, 200, 3, path)
    call int8_exact_case(200, 10, 37, path)
    call int8_exact_case(131, 65, 1, path)
  end subroutine test_int8_exact

  !> dense_int8, dynamic and static, bit for bit against an integer reference.
  subroutine int8_exact_case(n_in, n_out, n, path)
    integer, intent(in) :: n_in, n_out, n
    character(len=*), intent(in) :: path
    type(case_t) :: c
    integer(int64) :: q(n_out, n_in), acc
    real(real32) :: x(n_in, n), y(n_out, n), want(n_out, n), sx, inv, qx(n_in)
    integer :: mode, j, i, st
    logical :: ok

    do mode = QUANT_DYNAMIC, QUANT_STATIC
      call header(c, KIND_DENSE_INT8, ACT_RELU, n_in, n_out, 'dense_int8')
      q = reshape(irnd(int(n_in * n_out, int64), 255_int64) - 127, [n_out, n_in])
      c%i8 = int(reshape(q, [n_in * n_out]), int8)   ! q(n_out, n_in) = NumPy q (n_in, n_out)
      c%f32 = [rnd(int(n_out, int64), 0.01) + 0.011, rnd(int(n_out, int64), 0.5), &
               merge(0.03, 0.0, mode == QUANT_STATIC)]
      c%row(COL_P1) = mode
      call finish_int8(c, n_in, n_out)
      x = reshape(rnd(int(n_in * n, int64), 3.0), [n_in, n])
      x(:, min(2, n)) = 0
      do j = 1, n
        sx = c%f32(2 * n_out + 1)
        if (mode == QUANT_DYNAMIC) sx = merge(max(maxval(abs(x(:, j))) / 127, tiny(sx)), 1.0, &
                                              maxval(abs(x(:, j))) > 0)
        inv = 1 / sx
        qx = min(max(ieee_rint(x(:, j) * inv), -127.0), 127.0)
        do i = 1, n_out
          acc = sum(q(i, :) * int(qx, int64))
          want(i, j) = max(real(acc, real32) * (c%f32(i) * sx) + c%f32(n_out + i), 0.0)
        end do
      end do
      call run(c, x, y, st)
      ok = st == PYKD_OK .and. all(y == want)
      call check(ok, 'dense_int8 '//merge('static ', 'dynamic', mode == QUANT_STATIC)// &
                 ' '//str(int(n_in, int64))//'x'//str(int(n_out, int64))//' batch '// &
                 str(int(n, int64))//' ('//trim(path)//') equals the integer reference bit for bit')
      x(min(5, n_in), min(4, n)) = ieee_value(1.0_real32, ieee_quiet_nan)
      call run(c, x, y, st)
      call check(st == PYKD_ERR_NONFINITE, 'dense_int8 '//merge('static ', 'dynamic', mode == QUANT_STATIC)// &
                 ': a NaN input is PYKD_ERR_NONFINITE')
      deallocate (c%w, c%b)
    end do
  end subroutine int8_exact_case

  ! ------------------------------------------------------------ round trips

  !> Write c's payload; scan it back (limit = its end) into a fresh row.
  subroutine write_payload(c, buf)
    type(case_t), intent(in) :: c
    integer(int8), allocatable, intent(out) :: buf(:)
    class(pykd_layer_t), allocatable :: layer
    integer(int64) :: pos
    integer :: st
    call new_layer(c%row(COL_KIND), layer, st)
    allocate (buf(layer%record_bytes(c%row, c%f32, c%i8, c%i32)))
    buf = 0
    pos = 0
    call layer%write_record(c%row, c%f32, c%i8, c%i32, buf, pos)
    call check(pos == size(buf), trim(c%what)//': record_bytes agrees with write_record')
  end subroutine write_payload

  !> Scan and load buf as a payload of c's header; stat of the first failure.
  subroutine read_payload(c, buf, version, d, stat, msg)
    type(case_t), intent(in) :: c
    integer(int8), intent(in) :: buf(:)
    integer, intent(in) :: version
    type(case_t), intent(out) :: d
    integer, intent(out) :: stat
    character(len=*), intent(out) :: msg
    class(pykd_layer_t), allocatable :: layer
    integer(int64) :: pos
    call new_layer(c%row(COL_KIND), layer, stat)
    d%row = 0
    d%row(COL_KIND:COL_N_OUT) = c%row(COL_KIND:COL_N_OUT)
    msg = ''
    pos = 0
    call layer%scan_record(version, buf, pos, size(buf, kind=int64), d%row, stat, msg)
    if (stat /= PYKD_OK) return
    if (pos /= size(buf)) stat = -1
    allocate (d%f32(max(d%row(COL_F32_LEN), 1_int64)), d%i8(max(d%row(COL_I8_LEN), 1_int64)), &
              d%i32(max(d%row(COL_I32_LEN), 1_int64)))
    d%f32 = 0; d%i8 = 0; d%i32 = 0
    pos = 0
    call layer%load_record(version, buf, pos, d%row, d%f32, d%i8, d%i32, stat, msg)
    if (stat == PYKD_OK .and. pos /= size(buf)) stat = -1
  end subroutine read_payload

  subroutine check_round_trip(c)
    type(case_t), intent(in) :: c
    type(case_t) :: d
    integer(int8), allocatable :: buf(:), buf2(:)
    integer :: st
    character(len=512) :: msg
    class(pykd_layer_t), allocatable :: layer
    integer(int64) :: nf, n8, n32

    call new_layer(c%row(COL_KIND), layer, st)
    call layer%check(c%row, c%f32, c%i8, c%i32, st, msg)
    call check(st == PYKD_OK, trim(c%what)//': check accepts a valid layer')
    call write_payload(c, buf)
    call read_payload(c, buf, 2, d, st, msg)
    nf = c%row(COL_F32_LEN); n8 = c%row(COL_I8_LEN); n32 = c%row(COL_I32_LEN)
    call check(st == PYKD_OK .and. all(d%row == c%row) .and. &
               all(transfer(d%f32(:nf), 0_int32, nf) == transfer(c%f32(:nf), 0_int32, nf)) .and. &
               all(d%i8(:n8) == c%i8(:n8)) .and. all(d%i32(:n32) == c%i32(:n32)), &
               trim(c%what)//': write -> scan -> load gives identical row and buffers '//trim(msg))
    call write_payload(d, buf2)
    call check(size(buf2) == size(buf) .and. all(buf2 == buf), trim(c%what)//': rewrite is byte-identical')
  end subroutine check_round_trip

  subroutine test_round_trips()
    type(case_t) :: c, d
    integer(int8), allocatable :: buf(:)
    integer :: st
    character(len=512) :: msg

    call check_round_trip(make_dense(5, 4, ACT_TANH))
    call check_round_trip(make_low_rank(6, 5, 2, ACT_GELU))
    call check_round_trip(make_csr(6, 5, 0.3, ACT_RELU))
    call check_round_trip(make_csr(4, 300, 0.05, ACT_RELU))
    call check_round_trip(make_csr(3, 70000, 0.0005, ACT_IDENTITY))
    call check_round_trip(make_codebook(7, 5, 3, 2, ACT_SILU))
    call check_round_trip(make_codebook(5, 3, 2, 1, ACT_SIGMOID))
    call check_round_trip(make_sparse_codebook(9, 11, 0.2, 5, 3, ACT_RELU))
    call check_round_trip(make_sparse_codebook(10, 40, 0.25, 256, 8, ACT_TANH))   ! < 128 entries: no planes
    call check_round_trip(make_sparse_codebook(30, 40, 0.005, 2, 1, ACT_TANH))
    call check_round_trip(make_sparse_codebook(3, 4, 0.0, 1, 1, ACT_TANH))
    c = int8_case(QUANT_STATIC)
    call check_round_trip(c)
    call check_round_trip(int8_case(QUANT_DYNAMIC))

    ! Version 1: dense_int8 has no quant field.
    c = int8_case(QUANT_DYNAMIC)
    call write_payload(c, buf)
    call read_payload(c, buf(5:), 1, d, st, msg)
    call check(st == PYKD_OK .and. all(d%row == c%row) .and. all(d%i8 == c%i8) .and. &
               all(d%f32 == c%f32), 'dense_int8: the version-1 payload (no quant field) loads')
  end subroutine test_round_trips

  function int8_case(mode) result(c)
    integer, intent(in) :: mode
    type(case_t) :: c
    integer, parameter :: n_in = 6, n_out = 4
    call header(c, KIND_DENSE_INT8, ACT_IDENTITY, n_in, n_out, 'dense_int8')
    c%i8 = int(irnd(int(n_in * n_out, int64), 255_int64) - 127, int8)
    c%f32 = [abs(rnd(int(n_out, int64), 0.1)), rnd(int(n_out, int64), 0.5), merge(0.25, 0.0, mode == QUANT_STATIC)]
    c%row(COL_P1) = mode
    call finish_int8(c, n_in, n_out)
  end function int8_case

  ! ---------------------------------------------------------------- corrupt

  !> buf patched by `patch` must be rejected with PYKD_ERR_FORMAT.
  subroutine expect_format(c, buf, what)
    type(case_t), intent(in) :: c
    integer(int8), intent(in) :: buf(:)
    character(len=*), intent(in) :: what
    type(case_t) :: d
    integer :: st
    character(len=512) :: msg
    call read_payload(c, buf, 2, d, st, msg)
    call check(st == PYKD_ERR_FORMAT .and. len_trim(msg) > 0, trim(c%what)//': '//what// &
               ' is PYKD_ERR_FORMAT ('//trim(msg)//')')
  end subroutine expect_format

  subroutine set_u32(buf, off, v)
    integer(int8), intent(inout) :: buf(:)
    integer(int64), intent(in) :: off, v
    integer(int64) :: pos
    pos = off
    call put_u32(buf, pos, [v])
  end subroutine set_u32

  subroutine test_corrupt_dense()
    type(case_t) :: c
    integer(int8), allocatable :: buf(:), b2(:)

    c = make_dense(4, 3, ACT_RELU)
    call write_payload(c, buf)
    call expect_format(c, buf(:size(buf) - 1), 'a truncated payload')
    b2 = buf; b2(5:8) = transfer(ieee_value(1.0_real32, ieee_quiet_nan), 0_int8, 4)
    call expect_format(c, b2, 'NaN in W')

    c = int8_case(QUANT_STATIC)
    call write_payload(c, buf)
    b2 = buf; call set_u32(b2, 0_int64, 5_int64)
    call expect_format(c, b2, 'quant = 5')
    b2 = buf; b2(5) = -huge(0_int8) - 1_int8
    call expect_format(c, b2, 'q = -128')
    b2 = buf; b2(size(b2) - 4 * 4 - 3:size(b2) - 4 * 4) = 0   ! x_scale = 0
    call expect_format(c, b2, 'static x_scale = 0')
    b2 = buf; b2(size(b2) - 4 * 4 - 3:size(b2) - 4 * 4) = transfer(1_int32, 0_int8, 4)
    call expect_format(c, b2, 'static x_scale subnormal (infinite reciprocal)')
    c%row(COL_N_IN) = 131072
    call expect_format(c, buf, 'n_in = 131072 > MAX_IN')

  end subroutine test_corrupt_dense

  !> sparse_csr's planes: the loader builds them (the file holds none, so
  !! the rewrite is byte-identical), check accepts them, one sample on them
  !! gives the bits of the same layer without planes (scatter), at odd
  !! shapes (n_out off 16, two groups of blocks, n_in off 32, a chunk where
  !! one output has all 32 inputs, empty rows); a stale plane is refused
  !! by check and a damaged count by forward.
  subroutine test_csr_planes()
    integer, parameter :: shapes(2, 4) = reshape([45, 37, 784, 200, 70, 210, 64, 300], [2, 4])
    real, parameter :: dens(4) = [0.3, 0.1, 0.2, 0.15]
    type(case_t) :: c, d
    integer(int8), allocatable :: buf(:), buf2(:)
    real(real32), allocatable :: x(:, :), y1(:, :), y2(:, :)
    class(pykd_layer_t), allocatable :: layer
    character(len=512) :: msg
    integer :: k, st, st2, n_in, n_out
    integer(int64) :: o8

    do k = 1, size(dens)
      n_in = shapes(1, k); n_out = shapes(2, k)
      c = make_csr(n_in, n_out, dens(k), ACT_IDENTITY)
      if (k == 3) c = csr_full_column(c)
      call write_payload(c, buf)
      call read_payload(c, buf, 2, d, st, msg)
      call check(st == PYKD_OK .and. d%row(COL_P2) > 0 .and. &
                 d%row(COL_I8_LEN) == plane_cells(int(n_in, int64), int(n_out, int64)) + 16 * d%row(COL_P2), &
                 'sparse_csr '//str(int(n_in, int64))//'x'//str(int(n_out, int64))//': the loader builds '// &
                 str(d%row(COL_P2))//' planes '//trim(msg))
      if (k == 3) call check(maxval(d%i8(:plane_cells(int(n_in, int64), int(n_out, int64)))) == 32, &
                             'sparse_csr: a chunk with one full column has 32 planes')
      call write_payload(d, buf2)
      call check(size(buf2) == size(buf) .and. all(buf2 == buf), 'sparse_csr: the planes are not saved')
      call new_layer(d%row(COL_KIND), layer, st)
      call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
      call check(st == PYKD_OK, 'sparse_csr: check accepts the loaded planes '//trim(msg))
      x = reshape(max(rnd(int(n_in, int64), 1.0), 0.0), [n_in, 1])
      x(1:min(n_in, 40), 1) = 0                 ! a chunk of zeros (skipped on avx512)
      x(min(n_in, 41), 1) = -0.0
      allocate (y1(n_out, 1), y2(n_out, 1))
      call run(c, x, y1, st)
      call run(d, x, y2, st2)
      call check(st == PYKD_OK .and. st2 == PYKD_OK .and. &
                 all(transfer(y1, 0_int32, n_out) == transfer(y2, 0_int32, n_out)), &
                 'sparse_csr: one sample on the planes ('//trim(sparse_path_name())// &
                 ') gives the bits of the scatter')
      deallocate (y1, y2)
    end do
    ! A stale plane value: check refuses it; a count off by one: forward does.
    o8 = d%row(COL_P1) + 1             ! the first plane value
    d%f32(o8) = d%f32(o8) + 1
    call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'planes') > 0, 'sparse_csr: a stale plane is refused: '//trim(msg))
    d%f32(o8) = d%f32(o8) - 1
    d%i8(1) = d%i8(1) + 1_int8
    allocate (y2(d%row(COL_N_OUT), 1))
    x = reshape(rnd(d%row(COL_N_IN), 1.0), [int(d%row(COL_N_IN)), 1])
    call run(d, x, y2, st)
    call check(st == PYKD_ERR_ARG .and. all(ieee_is_nan(y2)), 'sparse_csr: a damaged plane count is an error')
  end subroutine test_csr_planes

  !> sparse_codebook's planes (sparse_csr's, values centroids(codes + 1)):
  !! the loader builds them (the file holds none, so the rewrite is
  !! byte-identical), check accepts them, one sample and 3 samples on them
  !! give the bits of the same layer without planes (scatter, panel) at
  !! odd shapes; a stale plane value, a stale centroid (changed after the
  !! planes were built) and a wrong p4 are refused by check, a damaged
  !! count by forward.
  subroutine test_sparse_codebook_planes()
    integer, parameter :: shapes(2, 4) = reshape([45, 37, 784, 200, 70, 210, 200, 200], [2, 4])
    real, parameter :: dens(4) = [0.3, 0.1, 0.2, 0.1]
    integer, parameter :: ns(2) = [1, 3]
    type(case_t) :: c, d
    integer(int8), allocatable :: buf(:), buf2(:)
    real(real32), allocatable :: x(:, :), y1(:, :), y2(:, :)
    class(pykd_layer_t), allocatable :: layer
    character(len=512) :: msg
    integer :: k, st, st2, n_in, n_out, n, m
    integer(int64) :: o, cells
    real(real32) :: v

    do k = 1, size(dens)
      n_in = shapes(1, k); n_out = shapes(2, k)
      cells = plane_cells(int(n_in, int64), int(n_out, int64))
      c = make_sparse_codebook(n_in, n_out, dens(k), 32, 5, ACT_RELU)
      call write_payload(c, buf)
      call read_payload(c, buf, 2, d, st, msg)
      call check(st == PYKD_OK .and. c%row(COL_P4) == 0 .and. d%row(COL_P4) > 0 .and. &
                 d%row(COL_I8_LEN) == d%row(COL_P1) + cells + 16 * d%row(COL_P4) .and. &
                 d%row(COL_F32_LEN) == d%row(COL_P2) + 16 * d%row(COL_P4) + n_out, &
                 'sparse_codebook '//str(int(n_in, int64))//'x'//str(int(n_out, int64))//': the loader builds '// &
                 str(d%row(COL_P4))//' planes '//trim(msg))
      call write_payload(d, buf2)
      call check(size(buf2) == size(buf) .and. all(buf2 == buf), 'sparse_codebook: the planes are not saved')
      call new_layer(d%row(COL_KIND), layer, st)
      call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
      call check(st == PYKD_OK, 'sparse_codebook: check accepts the loaded planes '//trim(msg))
      do m = 1, size(ns)
        n = ns(m)
        x = reshape(max(rnd(int(n_in, int64) * n, 1.0), 0.0), [n_in, n])
        x(1:min(n_in, 40), 1) = 0                 ! a chunk of zeros (skipped on avx512)
        x(min(n_in, 41), 1) = -0.0
        allocate (y1(n_out, n), y2(n_out, n))
        call run(c, x, y1, st)
        call run(d, x, y2, st2)
        call check(st == PYKD_OK .and. st2 == PYKD_OK .and. &
                   all(transfer(y1, 0_int32, n_out * n) == transfer(y2, 0_int32, n_out * n)), &
                   'sparse_codebook: '//str(int(n, int64))//' sample(s) on the planes ('//trim(sparse_path_name())// &
                   ') give the bits of the codes'' kernel')
        deallocate (y1, y2)
      end do
    end do
    ! A stale plane value, a stale centroid: check refuses them; a count off by one: forward does.
    o = d%row(COL_P2) + 1              ! the first plane value
    v = d%f32(o)
    d%f32(o) = v + 1
    call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'planes') > 0, 'sparse_codebook: a stale plane is refused: '//trim(msg))
    d%f32(o) = v
    d%f32(1) = d%f32(1) * 2
    call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
    call check(st == PYKD_ERR_ARG .and. index(msg, 'planes') > 0, &
               'sparse_codebook: planes of the old centroids are refused: '//trim(msg))
    d%f32(1) = d%f32(1) / 2
    call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
    call check(st == PYKD_OK, 'sparse_codebook: restored planes are accepted '//trim(msg))
    o = d%row(COL_I8_OFF) + d%row(COL_P1) + 1    ! the first plane count
    d%i8(o) = d%i8(o) + 1_int8
    call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
    call check(st == PYKD_ERR_ARG, 'sparse_codebook: a damaged plane count is refused by check: '//trim(msg))
    allocate (y2(d%row(COL_N_OUT), 1))
    x = reshape(rnd(d%row(COL_N_IN), 1.0), [int(d%row(COL_N_IN)), 1])
    call run(d, x, y2, st)
    call check(st == PYKD_ERR_ARG .and. all(ieee_is_nan(y2)), 'sparse_codebook: a damaged plane count is an error')
    d%i8(o) = d%i8(o) - 1_int8
    ! p4 = 0 with the same slices: the lengths no longer match.
    d%row(COL_P4) = 0
    call layer%check(d%row, d%f32, d%i8, d%i32, st, msg)
    call check(st == PYKD_ERR_ARG, 'sparse_codebook: p4 = 0 with planes in the slices is refused: '//trim(msg))
  end subroutine test_sparse_codebook_planes

  !> c with inputs 1..32 all non-zero in output 5 (0-based 4), rows 33 and 40 empty.
  function csr_full_column(c) result(e)
    type(case_t), intent(in) :: c
    type(case_t) :: e
    integer(int32), allocatable :: indptr(:), indices(:)
    integer :: n_in, n_out, i, j, nnz
    n_in = int(c%row(COL_N_IN)); n_out = int(c%row(COL_N_OUT))
    e = c
    e%w(5, 1:32) = 0.5
    e%w(:, 33) = 0; e%w(:, 40) = 0
    allocate (indptr(n_in + 1), indices(0))
    indptr(1) = 0
    e%f32 = [real(real32) ::]
    do i = 1, n_in
      do j = 1, n_out
        if (e%w(j, i) /= 0) then
          indices = [indices, int(j - 1, int32)]
          e%f32 = [e%f32, real(e%w(j, i), real32)]
        end if
      end do
      indptr(i + 1) = size(indices)
    end do
    nnz = size(indices)
    e%f32 = [e%f32, real(e%b, real32)]
    e%i32 = [indptr, indices]
    e%row(COL_P1) = nnz
    deallocate (e%i8)
    call finish_case(e, int(nnz + n_out, int64), 0_int64, int(n_in + 1 + nnz, int64))
  end function csr_full_column

  subroutine test_corrupt_csr()
    type(case_t) :: c
    integer(int8), allocatable :: buf(:), b2(:)
    integer(int64) :: n_in, nnz

    c = make_csr(5, 300, 0.1, ACT_RELU)   ! u16 indices
    n_in = 5; nnz = c%row(COL_P1)
    call write_payload(c, buf)
    call check(get_u32(buf, 4_int64) == 16, 'sparse_csr: 300 outputs get 16-bit indices')
    b2 = buf; call set_u32(b2, 4_int64, 12_int64)
    call expect_format(c, b2, 'index_bits = 12')
    b2 = buf; call set_u32(b2, 4_int64, 8_int64)
    call expect_format(c, b2, 'index_bits = 8 for 300 outputs')
    b2 = buf; call set_u32(b2, 8 + 4 * 2_int64, get_u32(buf, 8 + 4 * 3_int64) + 1)   ! indptr[2] > indptr[3]
    call expect_format(c, b2, 'a decreasing indptr')
    b2 = buf; call set_u32(b2, 8_int64, 1_int64)
    call expect_format(c, b2, 'indptr[0] = 1')
    b2 = buf; b2(8 + 4 * (n_in + 1) + 1:8 + 4 * (n_in + 1) + 2) = transfer(int(300, int32), 0_int8, 2)
    call expect_format(c, b2, 'an index = n_out (u16 read unsigned)')
    b2 = buf; b2(8 + 4 * (n_in + 1) + 1:8 + 4 * (n_in + 1) + 2) = -1_int8   ! 65535, not -1
    call expect_format(c, b2, 'index 65535')
    b2 = buf; call set_u32(b2, 0_int64, 5 * 300 + 1_int64)
    call expect_format(c, b2, 'nnz > n_in n_out')

  end subroutine test_corrupt_csr

  subroutine test_corrupt_codebook()
    type(case_t) :: c
    integer(int8), allocatable :: buf(:), b2(:)
    integer :: k

    c = make_codebook(5, 3, 3, 2, ACT_RELU)   ! 15 weights x 2 bits: 4 bytes, 2 padding bits
    call write_payload(c, buf)
    b2 = buf; call set_u32(b2, 4_int64, 4_int64)
    call expect_format(c, b2, 'bits = 4 for 3 codes')
    b2 = buf; call set_u32(b2, 0_int64, 0_int64)
    call expect_format(c, b2, 'n_codes = 0')
    b2 = buf; k = 8 + 4 * 3 + 4; b2(k) = ior(b2(k), int(z'40', int8))
    call expect_format(c, b2, 'nonzero padding bits')
    b2 = buf; k = 8 + 4 * 3 + 1; b2(k) = ior(b2(k), 3_int8)   ! index 3 of 3 codes
    call expect_format(c, b2, 'an index >= n_codes')
    b2 = buf; b2(9:12) = transfer(int(z'7F800000', int32), 0_int8, 4)   ! +inf
    call expect_format(c, b2, 'an infinite centroid')

  end subroutine test_corrupt_codebook

  subroutine test_corrupt_sparse_codebook()
    type(case_t) :: c
    integer(int8), allocatable :: buf(:), b2(:)
    integer(int64) :: nnz, ncb, pb, cend

    c = make_sparse_codebook(9, 11, 0.3, 5, 3, ACT_RELU)
    call write_payload(c, buf)
    nnz = get_u32(buf, 0_int64); pb = get_u32(buf, 16_int64); ncb = 5
    cend = 20 + 4 * ncb + pb                 ! offset of the codes stream
    b2 = buf; b2(20 + 4 * ncb + 1:cend) = -1_int8   ! all ones: no gap ever ends
    call expect_format(c, b2, 'a Rice stream of all ones')
    b2 = buf; b2(20 + 4 * ncb + 1:cend) = 0_int8    ! all zero gaps: stream too long
    call expect_format(c, b2, 'a Rice stream longer than its codes')
    b2 = [buf(:cend - 1), buf(cend + 1:)]
    call set_u32(b2, 16_int64, pb - 1)
    call expect_format(c, b2, 'a truncated Rice stream (pos_bytes - 1)')
    b2 = buf; call set_u32(b2, 12_int64, 32_int64)
    call expect_format(c, b2, 'rice_k = 32')
    b2 = buf; call set_u32(b2, 8_int64, 4_int64)
    call expect_format(c, b2, 'bits = 4 for 5 codes')
    b2 = buf; b2(cend + 1) = ior(b2(cend + 1), 7_int8)   ! code 7 of 5
    call expect_format(c, b2, 'a code >= n_codes')
    b2 = buf; call set_u32(b2, 0_int64, 90_int64)
    call expect_format(c, b2, 'nnz beyond what pos_bytes can hold')
    ! Every weight stored: 99 codes x 3 bits = 297 bits, so 7 padding bits.
    c = make_sparse_codebook(9, 11, 1.1, 5, 3, ACT_RELU)
    call write_payload(c, buf)
    pb = get_u32(buf, 16_int64)
    cend = 20 + 4 * ncb + pb
    b2 = buf; b2(cend + 38) = ior(b2(cend + 38), int(ishft(1, 2), int8))
    call expect_format(c, b2, 'nonzero padding after the codes')
  end subroutine test_corrupt_sparse_codebook

  ! ------------------------------------------------------------ the network

  subroutine test_network_checks()
    type(case_t) :: a, b
    integer(int64) :: table(N_FIELDS, 2)
    real(real32), allocatable :: f32(:), work(:)
    real(real32) :: x(6, 3), y(4, 3), y1(5, 3), norm(2 * 6 + 2), h(5, 3)
    integer :: st, bad, j
    real(real64) :: ref(4, 3)

    a = make_dense(6, 5, ACT_TANH)
    b = make_low_rank(5, 4, 2, ACT_IDENTITY)
    table(:, 1) = a%row
    table(:, 2) = b%row
    table(COL_F32_OFF, 2) = size(a%f32)
    f32 = [a%f32, b%f32]
    x = reshape(rnd(18_int64, 1.0), [6, 3])
    norm = [rnd(6_int64, 0.5), abs(rnd(6_int64, 1.0)) + 0.5, 0.25, 3.0]
    allocate (work(network_workspace_words(table, 3, 0)))
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_PER_FEATURE, NORM_SCALAR], x, 0, y, &
                         work, st, bad)
    ref = matmul(b%w, tanh(matmul(a%w, (real(x, real64) - spread(real(norm(1:6), real64), 2, 3)) / &
                                 spread(real(norm(7:12), real64), 2, 3)) + spread(a%b, 2, 3))) + spread(b%b, 2, 3)
    ref = ref * 3 + 0.25_real64
    call check(st == PYKD_OK .and. maxval(abs(y - ref)) < 1e-5 * maxval(abs(ref)), &
               'network: input norm, dense, low_rank, output norm vs float64')
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_PER_FEATURE, NORM_SCALAR], x, 1, y1, &
                         work, st, bad)
    h = real(tanh(matmul(a%w, (real(x, real64) - spread(real(norm(1:6), real64), 2, 3)) / &
                         spread(real(norm(7:12), real64), 2, 3)) + spread(a%b, 2, 3)), real32)
    call check(st == PYKD_OK .and. maxval(abs(y1 - h)) < 1e-5, 'network: upto = 1 gives layer 1''s output')

    table(COL_N_IN, 2) = 4
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_NONE, NORM_NONE], x, 0, y, work, st, bad)
    call check(st == PYKD_ERR_ARG .and. bad == 2, 'network: a broken chain is PYKD_ERR_ARG at layer 2')
    table(COL_N_IN, 2) = 5
    table(COL_F32_OFF, 2) = size(f32)
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_NONE, NORM_NONE], x, 0, y, work, st, bad)
    call check(st == PYKD_ERR_ARG .and. bad == 2, 'network: a slice outside f32 is PYKD_ERR_ARG')
    table(COL_F32_OFF, 2) = size(a%f32)
    table(COL_KIND, 1) = 9
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_NONE, NORM_NONE], x, 0, y, work, st, bad)
    call check(st == PYKD_ERR_ARG .and. bad == 1, 'network: an unknown kind is PYKD_ERR_ARG')
    table(COL_KIND, 1) = KIND_DENSE
    call network_forward(table, f32, a%i8, a%i32, norm(:3), [NORM_PER_FEATURE, NORM_NONE], x, 0, y, &
                         work, st, bad)
    call check(st == PYKD_ERR_ARG .and. bad == 0, 'network: a norm too short is PYKD_ERR_ARG')
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_NONE, NORM_NONE], x, 0, y, work(:2), st, bad)
    call check(st == PYKD_ERR_ARG, 'network: a work too small is PYKD_ERR_ARG')
    call network_forward(table, f32, a%i8, a%i32, norm, [NORM_NONE, NORM_NONE], x, 3, y, work, st, bad)
    call check(st == PYKD_ERR_ARG, 'network: upto > n_layers is PYKD_ERR_ARG')
    do j = 1, 1
      table(COL_F32_LEN, 2) = table(COL_F32_LEN, 2) - 1
      call network_forward(table, f32, a%i8, a%i32, norm, [NORM_NONE, NORM_NONE], x, 0, y, work, st, bad)
      call check(st == PYKD_ERR_ARG .and. bad == 2, 'network: a slice length off by one is PYKD_ERR_ARG')
    end do
  end subroutine test_network_checks

end program test_layers
