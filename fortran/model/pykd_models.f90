!> Models in the pykd model file format: load, predict, save.
!!
!! A `pykd_model` is what Python's `pykd.modelfile.write_model` stores (see
!! docs/format.md): optional input normalisation, then a chain of dense
!! layers, float32 (kind 1) or int8 (kind 2). Inputs are column-major with
!! one sample per column, `x(n_features, n)`; logits are `(n_outputs, n)`.
!!
!! Thread safety: `pykd_predict` never modifies the model, so any number of
!! threads may call it on one model at the same time, each with its own
!! `pykd_workspace` (or none: then every call allocates its own).
!! Loading, saving, quantizing and freeing are not meant to race with
!! predictions on the same model.
!!
!! Errors never stop the program: every routine takes optional `stat` and
!! `errmsg`. Without `stat`, the message goes to standard error and the
!! failure stays testable: `model%ok` is false (load, build) or the logits
!! are NaN (predict).
!!
!! The format is little-endian; a big-endian host swaps bytes on the fly.
module pykd_models
  use iso_fortran_env, only: int8, int32, int64, real32
  use iso_c_binding, only: c_char, c_int, c_null_char
  use ieee_arithmetic, only: ieee_is_finite, ieee_value, ieee_quiet_nan
  use pykd_config, only: PAR_MIN_WORK, ACT_IDENTITY, ACT_RELU, ACT_TANH
  use pykd_status, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_ALLOC, PYKD_ERR_IO, PYKD_ERR_FORMAT, &
                         set_status
  use pykd_dense, only: dense_forward
  use pykd_quant, only: int8_matmul, quantize_weights, MAX_IN
  use pykd_crc32, only: crc32_init, crc32_update, crc32_final
  implicit none
  private
  public :: pykd_model, pykd_layer, pykd_workspace
  public :: pykd_load_model, pykd_predict, pykd_save_model, pykd_free, pykd_model_from_params, &
            pykd_quantize_model
  public :: LAYER_DENSE, LAYER_DENSE_INT8, NORM_NONE, NORM_PER_FEATURE, NORM_SCALAR, &
            PYKD_FORMAT_VERSION

  integer, parameter :: PYKD_FORMAT_VERSION = 1 !! the model file version this code reads and writes
  integer, parameter :: LAYER_DENSE = 1         !! float32 weights
  integer, parameter :: LAYER_DENSE_INT8 = 2    !! int8 weights, one float32 scale per output
  integer, parameter :: NORM_NONE = 0           !! inputs used as given
  integer, parameter :: NORM_PER_FEATURE = 1    !! (x - mean(i)) / std(i) for feature i
  integer, parameter :: NORM_SCALAR = 2         !! (x - mean(1)) / std(1) for every feature

  integer, parameter :: MSG_LEN = 512
  integer(int64), parameter :: MAX_COUNT = huge(0_int32)
  integer(int64), parameter :: TRAILER = 12  ! crc32 + end magic
  character(len=8), parameter :: MAGIC = 'PYKDMDL'//achar(0), END_MAGIC = 'PYKDEND'//achar(0)
  character(len=10), parameter :: KIND_NAMES(3:5) = [character(len=10) :: 'sparse_csr', 'low_rank', &
                                                     'codebook']
  logical, parameter :: BIG_ENDIAN = transfer(1_int32, 0_int8) == 0_int8

  !> One layer: y = act(W x + b). Weights are `(n_out, n_in)`, the same bytes
  !! as NumPy's C-ordered `(n_in, n_out)`.
  type :: pykd_layer
    integer :: kind = LAYER_DENSE            !! LAYER_DENSE or LAYER_DENSE_INT8
    integer :: act = ACT_IDENTITY            !! ACT_IDENTITY, ACT_RELU or ACT_TANH
    integer :: n_in = 0, n_out = 0
    real(real32), allocatable :: w(:, :)     !! (n_out, n_in), LAYER_DENSE
    integer(int8), allocatable :: q(:, :)    !! (n_out, n_in), LAYER_DENSE_INT8
    real(real32), allocatable :: scale(:)    !! (n_out), LAYER_DENSE_INT8: W = q * scale
    real(real32), allocatable :: b(:)        !! (n_out)
  end type pykd_layer

  !> A feed-forward model. Read the components freely; change them only
  !! through the routines of this module.
  type :: pykd_model
    logical :: ok = .false.                  !! true once loaded or built successfully
    integer :: stat = PYKD_ERR_ARG           !! status of the last load or build
    character(len=MSG_LEN) :: errmsg = 'model not loaded' !! its message ('' on success)
    integer :: n_features = 0, n_outputs = 0
    integer :: norm_kind = NORM_NONE         !! NORM_NONE, NORM_PER_FEATURE or NORM_SCALAR
    real(real32), allocatable :: mean(:), std(:) !! (n_features) or (1)
    character(len=:), allocatable :: metadata    !! the JSON text stored in the file
    type(pykd_layer), allocatable :: layers(:)
  contains
    procedure :: load => model_load
    procedure :: predict => pykd_predict
    procedure :: save => pykd_save_model
    procedure :: quantize => pykd_quantize_model
    procedure :: free => pykd_free
  end type pykd_model

  !> Scratch memory for pykd_predict. It grows to the largest batch seen and
  !! is reused; give each thread its own.
  type :: pykd_workspace
    real(real32), allocatable :: f(:)        ! normalised input, then two layer outputs
    integer(int8), allocatable :: qx(:)      ! quantized activations (int8 layers)
    integer(int32), allocatable :: acc(:)    ! exact int32 products (int8 layers)
    real(real32), allocatable :: sx(:)       ! per-sample activation scales
  end type pykd_workspace

  interface
    ! C's rename(): replaces `new` atomically on POSIX systems.
    integer(c_int) function c_rename(old, new) bind(c, name='rename')
      import :: c_char, c_int
      character(kind=c_char), intent(in) :: old(*), new(*)
    end function c_rename
  end interface

contains

  ! ------------------------------------------------------------------ loading

  !> Read a model file written by Python (`pykd.modelfile.write_model`) or by
  !! pykd_save_model. The whole file is checked (magic, version, CRC-32,
  !! sizes, finite values) before the model is marked ok.
  subroutine pykd_load_model(path, model, stat, errmsg)
    character(len=*), intent(in) :: path
    type(pykd_model), intent(out) :: model
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int8), allocatable :: buf(:)
    integer :: code
    character(len=MSG_LEN) :: msg

    call read_bytes(path, buf, code, msg)
    if (code == PYKD_OK) call parse_file(buf, model, code, msg)
    if (code /= PYKD_OK) then
      call pykd_free(model)
      msg = path//': '//msg
    end if
    call finish_build(model, code, msg, stat, errmsg)
  end subroutine pykd_load_model

  !> Type-bound form: `call model%load(path, stat, errmsg)`.
  subroutine model_load(self, path, stat, errmsg)
    class(pykd_model), intent(out) :: self
    character(len=*), intent(in) :: path
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    call pykd_load_model(path, self, stat, errmsg)
  end subroutine model_load

  !> Record the outcome of a load or build in the model and report it.
  subroutine finish_build(model, code, msg, stat, errmsg)
    class(pykd_model), intent(inout) :: model
    integer, intent(in) :: code
    character(len=*), intent(in) :: msg
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    model%ok = code == PYKD_OK
    model%stat = code
    model%errmsg = msg
    call set_status(code, msg, stat, errmsg)
  end subroutine finish_build

  subroutine read_bytes(path, buf, code, msg)
    character(len=*), intent(in) :: path
    integer(int8), allocatable, intent(out) :: buf(:)
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    integer :: u, ios
    integer(int64) :: n
    character(len=256) :: iomsg

    iomsg = ''
    open (newunit=u, file=path, access='stream', form='unformatted', status='old', &
          action='read', iostat=ios, iomsg=iomsg)
    if (ios /= 0) then
      code = PYKD_ERR_IO
      msg = 'cannot open: '//trim(iomsg)
      return
    end if
    inquire (unit=u, size=n)
    if (n < 0) then
      code = PYKD_ERR_IO
      msg = 'cannot determine the file size'
      close (u)
      return
    end if
    allocate (buf(n), stat=ios)
    if (ios /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate '//str(n)//' bytes to read the file'
      close (u)
      return
    end if
    ios = 0
    if (n > 0) read (u, iostat=ios, iomsg=iomsg) buf
    close (u)
    code = merge(PYKD_OK, PYKD_ERR_IO, ios == 0)
    msg = ''
    if (ios /= 0) msg = 'read error: '//trim(iomsg)
  end subroutine read_bytes

  !> Check the framing (magic, version, trailer, CRC) and parse the body.
  !! Mirrors pykd/modelfile.py so both report the same problem.
  subroutine parse_file(buf, model, code, msg)
    integer(int8), intent(in) :: buf(:)
    type(pykd_model), intent(inout) :: model
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    integer(int64) :: n, body_end, last
    integer(int32) :: crc
    integer :: k

    n = size(buf, kind=int64)
    code = PYKD_ERR_FORMAT
    if (n < 8) then
      k = int(n)
      if (n > 0 .and. all(buf(1:k) == to_bytes(MAGIC(1:k)))) then
        msg = 'truncated: file is only '//str(n)//' bytes'
      else
        msg = 'not a pykd model file (bad magic)'
      end if
      return
    end if
    if (any(buf(1:8) /= to_bytes(MAGIC))) then
      msg = 'not a pykd model file (bad magic)'
      return
    end if
    if (n < 12) then
      msg = 'truncated: file is only '//str(n)//' bytes'
      return
    end if
    if (u32(buf, 8_int64) /= PYKD_FORMAT_VERSION) then
      msg = 'unsupported model format version '//str(u32(buf, 8_int64))//' (this pykd reads version '// &
            str(int(PYKD_FORMAT_VERSION, int64))//')'
      return
    end if

    if (n >= 12 + TRAILER .and. all(buf(n - 7:n) == to_bytes(END_MAGIC))) then
      ! Normal case: verify the checksum before trusting any size field.
      body_end = n - TRAILER
      crc = crc32_init()
      call crc32_update(crc, buf(1:body_end))
      if (crc32_final(crc) /= transfer(swapped(buf(body_end + 1:body_end + 4)), 0_int32)) then
        msg = 'checksum mismatch (file corrupted)'
        return
      end if
      call parse_body(buf, body_end, model, last, code, msg)
      if (code /= PYKD_OK) return
      if (last /= body_end) then
        code = PYKD_ERR_FORMAT
        msg = str(body_end - last)//' unexpected bytes between the last layer and the checksum'
      end if
      return
    end if
    ! No end marker: use the unverified sizes only to say what is wrong.
    call parse_body(buf, n, model, last, code, msg)
    if (code /= PYKD_OK) return
    code = PYKD_ERR_FORMAT
    if (n < last + TRAILER) then
      msg = 'truncated: file is '//str(n)//' bytes, but the checksum and end marker need '// &
            str(last + TRAILER)
    else if (all(buf(last + 5:last + 12) == to_bytes(END_MAGIC))) then
      msg = 'trailing garbage: '//str(n - last - TRAILER)//' unexpected bytes after the end marker at offset '// &
            str(last + 4)
    else
      msg = 'end marker "PYKDEND\0" not found at offset '//str(last + 4)//' (file corrupted)'
    end if
  end subroutine parse_file

  !> Parse the header fields after the version and the layers, reading no
  !! byte at or beyond `limit`; `last` is the offset just after the last layer.
  !! Sizes are checked against the bytes present before anything is allocated.
  subroutine parse_body(buf, limit, model, last, code, msg)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: limit
    type(pykd_model), intent(inout) :: model
    integer(int64), intent(out) :: last
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    integer(int64) :: pos, n_layers, n_features, n_outputs, norm_kind, meta_len, nf
    integer(int64) :: lkind, act, n_in, n_out, prev_out, hdr(4)
    integer :: k, ierr
    character(len=32) :: lk

    code = PYKD_ERR_FORMAT
    last = 0
    pos = 12
    if (.not. counts('', [character(len=10) :: 'n_layers', 'n_features', 'n_outputs', 'norm_kind'], hdr)) return
    n_layers = hdr(1); n_features = hdr(2); n_outputs = hdr(3); norm_kind = hdr(4)
    if (n_layers == 0) then
      msg = 'model has no layers'
      return
    end if
    model%n_features = int(n_features)
    model%n_outputs = int(n_outputs)

    select case (norm_kind)
    case (NORM_NONE)
    case (NORM_PER_FEATURE, NORM_SCALAR)
      nf = merge(n_features, 1_int64, norm_kind == NORM_PER_FEATURE)
      if (.not. room(8 * nf, 'norm mean and std')) return
      allocate (model%mean(nf), model%std(nf), stat=ierr)
      if (.not. allocated_ok()) return
      call get_f32(buf, pos, model%mean, nf)
      call get_f32(buf, pos + 4 * nf, model%std, nf)
      pos = pos + 8 * nf
      if (.not. (all(ieee_is_finite(model%mean)) .and. all(ieee_is_finite(model%std)))) then
        msg = 'norm mean or std contains NaN or infinite values'
        return
      end if
      if (.not. all(model%std > 0)) then
        msg = 'norm std must be > 0'
        return
      end if
    case default
      msg = 'unknown norm kind '//str(norm_kind)
      return
    end select
    model%norm_kind = int(norm_kind)

    if (.not. count_field('meta_len', meta_len)) return
    if (.not. room(meta_len, 'metadata')) return
    allocate (character(len=meta_len) :: model%metadata, stat=ierr)
    if (.not. allocated_ok()) return
    if (meta_len > 0) model%metadata = transfer(buf(pos + 1:pos + meta_len), model%metadata)
    pos = pos + meta_len

    ! Every layer has a 16-byte header: bound n_layers before allocating.
    if (.not. room(16 * n_layers, str(n_layers)//' layer headers')) return
    allocate (model%layers(n_layers), stat=ierr)
    if (.not. allocated_ok()) return
    prev_out = n_features
    do k = 1, int(n_layers)
      lk = 'layer '//str(int(k, int64))
      if (.not. counts(trim(lk)//' ', [character(len=10) :: 'kind', 'activation', 'n_in', 'n_out'], hdr)) return
      lkind = hdr(1); act = hdr(2); n_in = hdr(3); n_out = hdr(4)
      if (lkind >= lbound(KIND_NAMES, 1) .and. lkind <= ubound(KIND_NAMES, 1)) then
        msg = trim(lk)//': kind '//str(lkind)//' ('//trim(KIND_NAMES(lkind))// &
              ') is reserved but not supported by this version of pykd'
        return
      else if (lkind /= LAYER_DENSE .and. lkind /= LAYER_DENSE_INT8) then
        msg = trim(lk)//': unknown kind '//str(lkind)
        return
      end if
      if (act < ACT_IDENTITY .or. act > ACT_TANH) then
        msg = trim(lk)//': unknown activation '//str(act)
        return
      end if
      if (n_in == 0 .or. n_out == 0) then
        msg = trim(lk)//': has zero size ('//str(n_in)//' x '//str(n_out)//')'
        return
      end if
      if (k == 1 .and. n_in /= n_features) then
        msg = 'layer 1 takes '//str(n_in)//' inputs but the model has n_features = '//str(n_features)
        return
      end if
      if (n_in /= prev_out) then
        msg = 'layer sizes do not chain: layer '//str(int(k - 1, int64))//' outputs '//str(prev_out)// &
              ' but '//trim(lk)//' takes '//str(n_in)
        return
      end if
      if (.not. read_layer(model%layers(k))) return
      prev_out = n_out
    end do
    if (prev_out /= n_outputs) then
      msg = 'layer '//str(n_layers)//' outputs '//str(prev_out)//' but the model has n_outputs = '// &
            str(n_outputs)
      return
    end if
    last = pos
    code = PYKD_OK
    msg = ''

  contains

    !> Read consecutive u32 counts, one per name, in file order. (Not a chain
    !! of .and.: Fortran may evaluate its operands in any order, or not at all.)
    logical function counts(prefix, names, v)
      character(len=*), intent(in) :: prefix, names(:)
      integer(int64), intent(out) :: v(:)
      integer :: i
      v = 0
      do i = 1, size(names)
        counts = count_field(prefix//trim(names(i)), v(i))
        if (.not. counts) return
      end do
    end function counts

    !> Read a u32 count (<= 2**31 - 1) at pos into v.
    logical function count_field(what, v)
      character(len=*), intent(in) :: what
      integer(int64), intent(out) :: v
      count_field = room(4_int64, what)
      if (.not. count_field) return
      v = u32(buf, pos)
      pos = pos + 4
      if (v > MAX_COUNT) then
        msg = what//' = '//str(v)//' exceeds 2**31 - 1'
        count_field = .false.
      end if
    end function count_field

    logical function room(nbytes, what)
      integer(int64), intent(in) :: nbytes
      character(len=*), intent(in) :: what
      room = pos + nbytes <= limit
      if (.not. room) msg = 'truncated: '//what//' needs '//str(nbytes)//' bytes at offset '// &
                            str(pos)//', but only '//str(max(limit - pos, 0_int64))//' remain'
    end function room

    logical function allocated_ok()
      allocated_ok = ierr == 0
      if (.not. allocated_ok) then
        code = PYKD_ERR_ALLOC
        msg = 'cannot allocate memory for the model'
      end if
    end function allocated_ok

    !> The payload of layer k (header fields in lkind, act, n_in, n_out).
    logical function read_layer(layer)
      type(pykd_layer), intent(inout) :: layer
      integer(int64) :: nw, nbytes

      read_layer = .false.
      nw = n_in * n_out
      nbytes = merge(4 * nw + 4 * n_out, nw + 8 * n_out, lkind == LAYER_DENSE)
      if (.not. room(nbytes, trim(lk)//' payload')) return
      layer%kind = int(lkind); layer%act = int(act)
      layer%n_in = int(n_in); layer%n_out = int(n_out)
      if (lkind == LAYER_DENSE) then
        allocate (layer%w(n_out, n_in), layer%b(n_out), stat=ierr)
        if (.not. allocated_ok()) return
        call get_f32(buf, pos, layer%w, nw)
        pos = pos + 4 * nw
        if (.not. all(ieee_is_finite(layer%w))) then
          msg = trim(lk)//': W contains NaN or infinite values'
          return
        end if
      else
        allocate (layer%q(n_out, n_in), layer%scale(n_out), layer%b(n_out), stat=ierr)
        if (.not. allocated_ok()) return
        layer%q = reshape(buf(pos + 1:pos + nw), [n_out, n_in])
        pos = pos + nw
        call get_f32(buf, pos, layer%scale, n_out)
        pos = pos + 4 * n_out
        if (.not. all(ieee_is_finite(layer%scale))) then
          msg = trim(lk)//': scale contains NaN or infinite values'
          return
        end if
        if (any(layer%scale < 0)) then
          msg = trim(lk)//': scale contains negative values'
          return
        end if
      end if
      call get_f32(buf, pos, layer%b, n_out)
      pos = pos + 4 * n_out
      if (.not. all(ieee_is_finite(layer%b))) then
        msg = trim(lk)//': b contains NaN or infinite values'
        return
      end if
      read_layer = .true.
    end function read_layer

  end subroutine parse_body

  ! ---------------------------------------------------------------- inference

  !> logits = model(x) for a batch: normalisation, then every layer through
  !! BLAS (float32 layers, pykd_dense) or the exact int8 product (int8
  !! layers, pykd_quant: activations quantized per sample). The model is not
  !! modified, so concurrent calls are safe; pass a `work` per thread to
  !! avoid an allocation per call. On failure without `stat`, logits = NaN.
  subroutine pykd_predict(model, x, logits, stat, errmsg, work)
    class(pykd_model), intent(in) :: model
    real(real32), intent(in), contiguous, target :: x(:, :)         !! (n_features, n)
    real(real32), intent(out), contiguous, target :: logits(:, :)   !! (n_outputs, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    type(pykd_workspace), intent(inout), optional, target :: work   !! reusable scratch memory
    type(pykd_workspace), target :: own
    type(pykd_workspace), pointer :: ws
    real(real32), pointer, contiguous :: inp(:, :), res(:, :)
    integer(int8), pointer, contiguous :: qx(:, :)
    integer(int32), pointer, contiguous :: acc(:, :)
    integer(int64) :: n, nf, half, off, nq, nacc
    integer :: l, nl, j, st
    character(len=MSG_LEN) :: kmsg

    if (.not. model%ok) then
      call fail(PYKD_ERR_ARG, 'pykd_predict: the model is not loaded ('//trim(model%errmsg)//')')
      return
    end if
    nl = size(model%layers)
    n = size(x, 2, kind=int64)
    if (size(x, 1) /= model%n_features .or. size(logits, 1) /= model%n_outputs &
        .or. size(logits, 2, kind=int64) /= n) then
      call fail(PYKD_ERR_ARG, 'pykd_predict: x must be ('//str(int(model%n_features, int64))// &
                ', n) and logits ('//str(int(model%n_outputs, int64))//', n); got x ('// &
                str(size(x, 1, kind=int64))//', '//str(n)//') and logits ('// &
                str(size(logits, 1, kind=int64))//', '//str(size(logits, 2, kind=int64))//')')
      return
    end if
    if (n == 0) then
      call set_status(PYKD_OK, '', stat, errmsg)
      return
    end if

    ! Workspace: [normalised input | two halves for hidden outputs], plus
    ! int8 buffers sized for the largest int8 layer.
    nf = 0
    if (model%norm_kind /= NORM_NONE) nf = model%n_features * n
    half = 0; nq = 0; nacc = 0
    do l = 1, nl
      if (l < nl) half = max(half, model%layers(l)%n_out * n)
      if (model%layers(l)%kind == LAYER_DENSE_INT8) then
        if (model%layers(l)%n_in > MAX_IN) then
          call fail(PYKD_ERR_ARG, 'pykd_predict: layer '//str(int(l, int64))//': an int8 layer takes at most '// &
                    str(int(MAX_IN, int64))//' inputs (its int32 sums could overflow)')
          return
        end if
        nq = max(nq, model%layers(l)%n_in * n)
        nacc = max(nacc, model%layers(l)%n_out * n)
      end if
    end do
    ws => own
    if (present(work)) ws => work
    if (.not. reserve(ws, nf + 2 * half, nq, nacc, merge(n, 0_int64, nq > 0))) then
      call fail(PYKD_ERR_ALLOC, 'pykd_predict: cannot allocate the workspace')
      return
    end if

    inp => x
    if (nf > 0) then
      inp(1:model%n_features, 1:n) => ws%f(1:nf)
      do j = 1, int(n)
        if (model%norm_kind == NORM_SCALAR) then
          inp(:, j) = (x(:, j) - model%mean(1)) / model%std(1)
        else
          inp(:, j) = (x(:, j) - model%mean) / model%std
        end if
      end do
    end if
    do l = 1, nl
      associate (layer => model%layers(l))
        if (l == nl) then
          res => logits
        else
          off = nf + mod(l, 2) * half   ! ping-pong between the two halves
          res(1:layer%n_out, 1:n) => ws%f(off + 1:off + layer%n_out * n)
        end if
        if (layer%kind == LAYER_DENSE) then
          call dense_forward(inp, layer%w, layer%b, layer%act, res, st, kmsg)
        else
          qx(1:layer%n_in, 1:n) => ws%qx(1:layer%n_in * n)
          acc(1:layer%n_out, 1:n) => ws%acc(1:layer%n_out * n)
          call int8_matmul(inp, layer%q, layer%scale, layer%b, res, qx, ws%sx(1:n), acc, st, kmsg)
          call activate(res, layer%act)
        end if
      end associate
      if (st /= PYKD_OK) then
        call fail(st, 'pykd_predict: layer '//str(int(l, int64))//': '//trim(kmsg))
        return
      end if
      inp => res
    end do
    call set_status(PYKD_OK, '', stat, errmsg)

  contains

    subroutine fail(code, msg)
      integer, intent(in) :: code
      character(len=*), intent(in) :: msg
      if (.not. present(stat)) logits = ieee_value(0.0_real32, ieee_quiet_nan)
      call set_status(code, msg, stat, errmsg)
    end subroutine fail

  end subroutine pykd_predict

  !> Grow the workspace to at least the given sizes; false if out of memory.
  logical function reserve(ws, nf, nq, nacc, ns)
    type(pykd_workspace), intent(inout) :: ws
    integer(int64), intent(in) :: nf, nq, nacc, ns
    integer :: ierr
    ierr = 0
    if (allocated(ws%f)) then
      if (size(ws%f, kind=int64) < nf) deallocate (ws%f)
    end if
    if (.not. allocated(ws%f)) allocate (ws%f(nf), stat=ierr)
    if (ierr == 0 .and. allocated(ws%qx)) then
      if (size(ws%qx, kind=int64) < nq) deallocate (ws%qx)
    end if
    if (ierr == 0 .and. .not. allocated(ws%qx)) allocate (ws%qx(nq), stat=ierr)
    if (ierr == 0 .and. allocated(ws%acc)) then
      if (size(ws%acc, kind=int64) < nacc) deallocate (ws%acc)
    end if
    if (ierr == 0 .and. .not. allocated(ws%acc)) allocate (ws%acc(nacc), stat=ierr)
    if (ierr == 0 .and. allocated(ws%sx)) then
      if (size(ws%sx, kind=int64) < ns) deallocate (ws%sx)
    end if
    if (ierr == 0 .and. .not. allocated(ws%sx)) allocate (ws%sx(ns), stat=ierr)
    reserve = ierr == 0
  end function reserve

  !> y = act(y) in place (the int8 product already added the bias).
  subroutine activate(y, act)
    real(real32), intent(inout), contiguous :: y(:, :)
    integer, intent(in) :: act
    if (act == ACT_IDENTITY) return
    call activate_cols(size(y, 1), size(y, 2), y, act)
  end subroutine activate

  ! Explicit shape: inside an OpenMP region gfortran 12 forgets that an
  ! assumed-shape dummy is contiguous (docs/performance.md).
  subroutine activate_cols(m, n, y, act)
    integer, intent(in) :: m, n, act
    real(real32), intent(inout) :: y(m, n)
    integer :: j
    !$omp parallel do schedule(static) if(int(m, int64) * n >= PAR_MIN_WORK)
    do j = 1, n
      if (act == ACT_RELU) then
        y(:, j) = max(y(:, j), 0.0_real32)
      else
        y(:, j) = tanh(y(:, j))
      end if
    end do
    !$omp end parallel do
  end subroutine activate_cols

  ! ------------------------------------------------------------------ building

  !> Wrap an MLP trained with pykd_mlp (flat `params`, layout of
  !! mlp_param_count(sizes, 0, 0): W_l(sizes(l+1), sizes(l)) then b_l per
  !! layer) as a model with float32 layers. `mean`/`std` (size 1: scalar, or
  !! size sizes(1)) give the normalisation that predict applies to raw
  !! inputs; `metadata` is a JSON object text (default '{}').
  subroutine pykd_model_from_params(sizes, acts, params, model, mean, std, metadata, stat, errmsg)
    integer, intent(in) :: sizes(:)              !! units per layer, input first
    integer, intent(in) :: acts(:)               !! activation of each layer
    real(real32), intent(in) :: params(:)        !! flat parameters (no hint regressor)
    type(pykd_model), intent(out) :: model
    real(real32), intent(in), optional :: mean(:), std(:)
    character(len=*), intent(in), optional :: metadata
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int64) :: off, nw, total
    integer :: l, nl, ierr

    nl = size(sizes) - 1
    if (nl < 1 .or. size(acts) /= nl) then
      call fail(PYKD_ERR_ARG, 'pykd_model_from_params: need size(sizes) >= 2 and size(acts) = size(sizes) - 1')
      return
    end if
    if (any(sizes < 1) .or. any(acts < ACT_IDENTITY .or. acts > ACT_TANH)) then
      call fail(PYKD_ERR_ARG, 'pykd_model_from_params: sizes must be >= 1 and acts valid activation codes')
      return
    end if
    total = 0
    do l = 1, nl
      total = total + int(sizes(l), int64) * sizes(l + 1) + sizes(l + 1)
    end do
    if (size(params, kind=int64) /= total) then
      call fail(PYKD_ERR_ARG, 'pykd_model_from_params: params has '//str(size(params, kind=int64))// &
                ' entries, the network needs '//str(total))
      return
    end if
    if (present(mean) .neqv. present(std)) then
      call fail(PYKD_ERR_ARG, 'pykd_model_from_params: give both mean and std, or neither')
      return
    end if
    if (present(mean)) then
      if (size(mean) /= size(std) .or. (size(mean) /= 1 .and. size(mean) /= sizes(1))) then
        call fail(PYKD_ERR_ARG, 'pykd_model_from_params: mean and std must both have size 1 or sizes(1)')
        return
      end if
      if (.not. (all(ieee_is_finite(mean)) .and. all(ieee_is_finite(std)) .and. all(std > 0))) then
        call fail(PYKD_ERR_ARG, 'pykd_model_from_params: mean and std must be finite and std > 0')
        return
      end if
      model%norm_kind = merge(NORM_SCALAR, NORM_PER_FEATURE, size(mean) == 1 .and. sizes(1) /= 1)
      model%mean = mean
      model%std = std
    end if
    model%metadata = '{}'
    if (present(metadata)) model%metadata = metadata
    model%n_features = sizes(1)
    model%n_outputs = sizes(nl + 1)
    allocate (model%layers(nl), stat=ierr)
    off = 0
    do l = 1, nl
      if (ierr /= 0) exit
      associate (layer => model%layers(l))
        layer%kind = LAYER_DENSE; layer%act = acts(l)
        layer%n_in = sizes(l); layer%n_out = sizes(l + 1)
        nw = int(sizes(l), int64) * sizes(l + 1)
        allocate (layer%w(sizes(l + 1), sizes(l)), layer%b(sizes(l + 1)), stat=ierr)
        if (ierr /= 0) exit
        layer%w = reshape(params(off + 1:off + nw), [sizes(l + 1), sizes(l)])
        layer%b = params(off + nw + 1:off + nw + sizes(l + 1))
        off = off + nw + sizes(l + 1)
      end associate
    end do
    if (ierr /= 0) then
      call fail(PYKD_ERR_ALLOC, 'pykd_model_from_params: cannot allocate the model')
      return
    end if
    call finish_build(model, PYKD_OK, '', stat, errmsg)

  contains

    subroutine fail(code, msg)
      integer, intent(in) :: code
      character(len=*), intent(in) :: msg
      call pykd_free(model)
      call finish_build(model, code, msg, stat, errmsg)
    end subroutine fail

  end subroutine pykd_model_from_params

  !> Replace every float32 layer by an int8 layer (per-output-channel
  !! symmetric quantization, as pykd.quantize_int8(W, per_channel=True)).
  !! On failure the model is unchanged.
  subroutine pykd_quantize_model(model, stat, errmsg)
    class(pykd_model), intent(inout) :: model
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    type(pykd_layer), allocatable :: new(:)
    integer :: l, st, ierr

    if (.not. model%ok) then
      call set_status(PYKD_ERR_ARG, 'pykd_quantize_model: the model is not loaded', stat, errmsg)
      return
    end if
    allocate (new, source=model%layers, stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, 'pykd_quantize_model: cannot allocate', stat, errmsg)
      return
    end if
    do l = 1, size(new)
      associate (layer => new(l))
        if (layer%kind /= LAYER_DENSE) cycle
        allocate (layer%q(layer%n_out, layer%n_in), layer%scale(layer%n_out), stat=ierr)
        if (ierr /= 0) then
          call set_status(PYKD_ERR_ALLOC, 'pykd_quantize_model: cannot allocate', stat, errmsg)
          return
        end if
        call quantize_weights(layer%w, layer%q, layer%scale, st)
        if (st /= PYKD_OK) then
          call set_status(st, 'pykd_quantize_model: layer '//str(int(l, int64))// &
                          ' has NaN or infinite weights', stat, errmsg)
          return
        end if
        deallocate (layer%w)
        layer%kind = LAYER_DENSE_INT8
      end associate
    end do
    call move_alloc(new, model%layers)
    call set_status(PYKD_OK, '', stat, errmsg)
  end subroutine pykd_quantize_model

  !> Release everything the model holds; it is then "not loaded".
  subroutine pykd_free(model)
    class(pykd_model), intent(out) :: model
    ! intent(out) deallocates every component and restores the defaults.
  end subroutine pykd_free

  ! ------------------------------------------------------------------- saving

  !> Write the model in the pykd format (readable by Python's
  !! pykd.modelfile.read_model). The bytes go to a temporary file next to
  !! `path`, which is then renamed over `path`: readers never see a partial
  !! file, and on failure an existing `path` is left untouched.
  subroutine pykd_save_model(model, path, stat, errmsg)
    class(pykd_model), intent(in) :: model
    character(len=*), intent(in) :: path
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int8), allocatable :: buf(:)
    integer(int64) :: total, pos, nw, nn
    integer(int32) :: crc
    integer :: l, ierr, code
    character(len=MSG_LEN) :: msg

    call check_model(model, code, msg)
    if (code /= PYKD_OK) then
      call set_status(code, 'pykd_save_model: '//msg, stat, errmsg)
      return
    end if
    nn = 0
    if (model%norm_kind /= NORM_NONE) nn = size(model%mean, kind=int64)
    total = 8 + 20 + 8 * nn + 4 + len(model%metadata, kind=int64) + TRAILER
    do l = 1, size(model%layers)
      associate (layer => model%layers(l))
        nw = int(layer%n_in, int64) * layer%n_out
        total = total + 16 + merge(4 * nw + 4 * layer%n_out, nw + 8 * layer%n_out, &
                                   layer%kind == LAYER_DENSE)
      end associate
    end do
    allocate (buf(total), stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, 'pykd_save_model: cannot allocate '//str(total)//' bytes', &
                      stat, errmsg)
      return
    end if

    pos = 0
    call put_bytes(to_bytes(MAGIC))
    call put_u32(int([PYKD_FORMAT_VERSION, size(model%layers), model%n_features, model%n_outputs, &
                      model%norm_kind], int32))
    if (nn > 0) then
      call put_f32(model%mean, nn)
      call put_f32(model%std, nn)
    end if
    call put_u32([int(len(model%metadata), int32)])
    if (len(model%metadata) > 0) call put_bytes(to_bytes(model%metadata))
    do l = 1, size(model%layers)
      associate (layer => model%layers(l))
        call put_u32(int([layer%kind, layer%act, layer%n_in, layer%n_out], int32))
        nw = int(layer%n_in, int64) * layer%n_out
        if (layer%kind == LAYER_DENSE) then
          call put_f32(layer%w, nw)
        else
          call put_bytes(reshape(layer%q, [nw]))
          call put_f32(layer%scale, int(layer%n_out, int64))
        end if
        call put_f32(layer%b, int(layer%n_out, int64))
      end associate
    end do
    crc = crc32_init()
    call crc32_update(crc, buf(1:pos))
    call put_u32([crc32_final(crc)])
    call put_bytes(to_bytes(END_MAGIC))

    call write_atomically(path, buf, code, msg)
    call set_status(code, msg, stat, errmsg)

  contains

    subroutine put_bytes(bytes)
      integer(int8), intent(in) :: bytes(:)
      buf(pos + 1:pos + size(bytes, kind=int64)) = bytes
      pos = pos + size(bytes, kind=int64)
    end subroutine put_bytes

    subroutine put_u32(values)
      integer(int32), intent(in) :: values(:)
      call put_bytes(swapped(transfer(values, 0_int8, 4 * size(values))))
    end subroutine put_u32

    subroutine put_f32(values, m)
      real(real32), intent(in) :: values(*)
      integer(int64), intent(in) :: m
      call put_bytes(swapped(transfer(values(1:m), 0_int8, 4 * m)))
    end subroutine put_f32

  end subroutine pykd_save_model

  !> Everything the file format requires of a model about to be saved.
  subroutine check_model(model, code, msg)
    class(pykd_model), intent(in) :: model
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    integer :: l, prev

    code = PYKD_ERR_ARG
    msg = ''
    if (.not. model%ok .or. .not. allocated(model%layers) .or. .not. allocated(model%metadata)) then
      msg = 'the model is not loaded'
    else if (size(model%layers) < 1) then
      msg = 'the model has no layers'
    else if (len(model%metadata) > MAX_COUNT) then
      msg = 'metadata is too long'
    else if (model%norm_kind /= NORM_NONE) then
      if (model%norm_kind /= NORM_SCALAR .and. model%norm_kind /= NORM_PER_FEATURE) then
        msg = 'unknown norm kind'
      else if (.not. (allocated(model%mean) .and. allocated(model%std))) then
        msg = 'normalisation without mean and std'
      else if (size(model%mean) /= merge(1, model%n_features, model%norm_kind == NORM_SCALAR) &
               .or. size(model%std) /= size(model%mean)) then
        msg = 'mean and std have the wrong size'
      else if (.not. (all(ieee_is_finite(model%mean)) .and. all(ieee_is_finite(model%std)) &
                      .and. all(model%std > 0))) then
        msg = 'mean and std must be finite and std > 0'
      end if
    end if
    if (msg /= '') return
    prev = model%n_features
    do l = 1, size(model%layers)
      associate (layer => model%layers(l))
        if (layer%n_in /= prev .or. layer%n_out < 1 .or. layer%act < ACT_IDENTITY &
            .or. layer%act > ACT_TANH .or. .not. allocated(layer%b)) then
          msg = 'layer '//str(int(l, int64))//': sizes do not chain, or bad activation'
        else if (size(layer%b) /= layer%n_out .or. .not. all(ieee_is_finite(layer%b))) then
          msg = 'layer '//str(int(l, int64))//': b has the wrong size or NaN/inf values'
        else if (layer%kind == LAYER_DENSE) then
          if (.not. allocated(layer%w)) then
            msg = 'layer '//str(int(l, int64))//': W missing'
          else if (any(shape(layer%w) /= [layer%n_out, layer%n_in])) then
            msg = 'layer '//str(int(l, int64))//': W has the wrong shape'
          else if (.not. all(ieee_is_finite(layer%w))) then
            msg = 'layer '//str(int(l, int64))//': W contains NaN or inf (diverged training?)'
          end if
        else if (layer%kind == LAYER_DENSE_INT8) then
          if (.not. (allocated(layer%q) .and. allocated(layer%scale))) then
            msg = 'layer '//str(int(l, int64))//': q or scale missing'
          else if (any(shape(layer%q) /= [layer%n_out, layer%n_in]) .or. size(layer%scale) /= layer%n_out) then
            msg = 'layer '//str(int(l, int64))//': q or scale has the wrong shape'
          else if (.not. (all(ieee_is_finite(layer%scale)) .and. all(layer%scale >= 0))) then
            msg = 'layer '//str(int(l, int64))//': scale must be finite and >= 0'
          end if
        else
          msg = 'layer '//str(int(l, int64))//': unknown kind'
        end if
        prev = layer%n_out
      end associate
      if (msg /= '') return
    end do
    if (prev /= model%n_outputs) then
      msg = 'the last layer does not output n_outputs values'
      return
    end if
    code = PYKD_OK
  end subroutine check_model

  !> Write `buf` to a fresh temporary file beside `path`, then rename it over
  !! `path` (C's rename(), atomic on POSIX file systems).
  subroutine write_atomically(path, buf, code, msg)
    character(len=*), intent(in) :: path
    integer(int8), intent(in) :: buf(:)
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    character(len=:), allocatable :: tmp
    character(len=256) :: iomsg
    integer :: u, ios, ios2, attempt
    integer(int64) :: tick

    ! status='new' refuses an existing name, so two writers never share a
    ! temporary file; retry with another suffix if the name is taken.
    call system_clock(tick)
    do attempt = 1, 100
      tmp = path//'.'//str(modulo(tick + attempt, 1000000000_int64))//'.tmp'
      open (newunit=u, file=tmp, access='stream', form='unformatted', status='new', &
            action='write', iostat=ios, iomsg=iomsg)
      if (ios == 0) exit
    end do
    if (ios /= 0) then
      code = PYKD_ERR_IO
      msg = 'pykd_save_model: cannot create '//tmp//': '//trim(iomsg)
      return
    end if
    write (u, iostat=ios, iomsg=iomsg) buf
    if (ios == 0) flush (u, iostat=ios, iomsg=iomsg)
    if (ios /= 0) then
      close (u, status='delete')
      code = PYKD_ERR_IO
      msg = 'pykd_save_model: cannot write '//tmp//': '//trim(iomsg)
      return
    end if
    close (u, iostat=ios)
    if (ios == 0) ios = c_rename(tmp//c_null_char, path//c_null_char)
    if (ios /= 0) then
      open (newunit=u, file=tmp, status='old', iostat=ios2)
      if (ios2 == 0) close (u, status='delete')
      code = PYKD_ERR_IO
      msg = 'pykd_save_model: cannot rename '//tmp//' to '//path
      return
    end if
    code = PYKD_OK
    msg = ''
  end subroutine write_atomically

  ! ------------------------------------------------------------------ helpers

  !> The bytes of a string.
  pure function to_bytes(s) result(b)
    character(len=*), intent(in) :: s
    integer(int8) :: b(len(s))
    b = transfer(s, 0_int8, len(s))
  end function to_bytes

  !> Groups of four bytes in file order (little-endian) from/to host order.
  pure function swapped(bytes) result(b)
    integer(int8), intent(in) :: bytes(:)
    integer(int8) :: b(size(bytes))
    integer(int64) :: i
    b = bytes
    if (.not. BIG_ENDIAN) return
    do i = 1, size(b, kind=int64) - 3, 4
      b(i:i + 3) = bytes(i + 3:i:-1)
    end do
  end function swapped

  !> The u32 at byte offset `pos` (0-based), as a non-negative int64.
  pure integer(int64) function u32(buf, pos)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos
    u32 = iand(int(transfer(swapped(buf(pos + 1:pos + 4)), 0_int32), int64), int(z'FFFFFFFF', int64))
  end function u32

  !> out(1:m) = the m float32 values at byte offset `pos` (0-based). Fields
  !! are not aligned in the file, hence the copy through transfer.
  pure subroutine get_f32(buf, pos, out, m)
    integer(int8), intent(in) :: buf(:)
    integer(int64), intent(in) :: pos, m
    real(real32), intent(out) :: out(*)
    if (BIG_ENDIAN) then
      out(1:m) = transfer(swapped(buf(pos + 1:pos + 4 * m)), 0.0_real32, m)
    else
      out(1:m) = transfer(buf(pos + 1:pos + 4 * m), 0.0_real32, m)
    end if
  end subroutine get_f32

  pure function str(i) result(s)
    integer(int64), intent(in) :: i
    character(len=:), allocatable :: s
    character(len=24) :: tmp
    write (tmp, '(i0)') i
    s = trim(tmp)
  end function str

end module pykd_models
