!> Reading model files (docs/format.md): versions 1 and 2.
!!
!! Reading mirrors pykd/modelfile.py so both report the same problem: the
!! framing (magic, version, trailer, CRC-32) first, then the header, then
!! the layer records in two passes. Pass 1 reads every record header and
!! lets the kind scan its own fields (allocating nothing) to get the buffer
!! lengths; their total is checked against the file's size before anything
!! is allocated. Pass 2 allocates the buffers and lets each kind decode and
!! validate its payload. Every size is computed in int64 without overflow.
submodule (pykd_models) pykd_models_load
  use iso_c_binding, only: c_char, c_int, c_null_char, c_loc, c_ptr, c_intptr_t
  use pykd_codes, only: PYKD_ERR_IO, PYKD_ERR_FORMAT, FORMAT_VERSION_MIN, FORMAT_VERSION, &
                        KIND_MAX, ACT_TANH
  use pykd_bytes, only: to_bytes, get_u32, get_u64, get_f32
  use pykd_crc32, only: crc32
  use pykd_json, only: json_object_ok
  implicit none

  !> A model's arrays may take at most EXPANSION * file size + SLACK bytes (docs/format.md).
  integer(int64), parameter :: EXPANSION = 64, SLACK = 65536
  !> Bytes: the boundary the loader puts every slice's first element on.
  integer, parameter :: LINE = 64

  !> Where the reader is: the next byte (0-based), the first byte it must not
  !! read, and the file's version.
  type :: cursor_t
    integer(int64) :: pos = 12
    integer(int64) :: limit = 0
    integer :: version = FORMAT_VERSION
  end type cursor_t


contains

  ! ------------------------------------------------------------------ loading

  !> Read a model file written by Python (`pykd.modelfile.write_model`) or by
  !! pykd_save_model. The whole file is checked (magic, version, CRC-32,
  !! sizes, every kind's content) before the model is marked ok; on failure
  !! the model holds nothing and the message starts with the file name.
  module subroutine pykd_load_model(path, model, stat, errmsg)
    character(len=*), intent(in) :: path
    type(pykd_model), intent(out) :: model
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int8), allocatable :: buf(:)
    integer :: code
    character(len=MSG_LEN) :: msg

    msg = ''
    call read_bytes(path, buf, code, msg)
    if (code == PYKD_OK) call parse_file(buf, model, code, msg)
    if (code /= PYKD_OK) then
      call pykd_free(model)
      msg = path//': '//msg
    end if
    call finish_build(model, code, msg, stat, errmsg)
  end subroutine pykd_load_model

  !> The whole file. Only regular files are opened: a FIFO would block and a
  !! device may never end (PYKD_ERR_IO).
  subroutine read_bytes(path, buf, code, msg)
    character(len=*), intent(in) :: path
    integer(int8), allocatable, intent(out) :: buf(:)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    integer :: u, ios
    integer(int64) :: n
    character(len=256) :: iomsg

    code = PYKD_ERR_IO
    if (.not. regular_file(path)) then
      msg = 'cannot open: not a regular file (a directory, FIFO or device)'
      return
    end if
    iomsg = ''
    open (newunit=u, file=path, access='stream', form='unformatted', status='old', &
          action='read', iostat=ios, iomsg=iomsg)
    if (ios /= 0) then
      msg = 'cannot open: '//trim(iomsg)
      return
    end if
    inquire (unit=u, size=n)
    if (n < 0) then
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
    if (ios /= 0) then
      msg = 'read error: '//trim(iomsg)
      return
    end if
    code = PYKD_OK
  end subroutine read_bytes

  !> False only if `path` exists and is not a regular file (after symbolic
  !! links). A missing file is left to `open`, whose message says why.
  !! (STAT is a GNU Fortran extension; the mode bits are POSIX's.)
  logical function regular_file(path)
    character(len=*), intent(in) :: path
    intrinsic :: stat
    integer :: values(13), ios
    integer, parameter :: S_IFMT = int(o'170000'), S_IFREG = int(o'100000')
    values = 0
    call stat(path, values, ios)
    regular_file = ios /= 0 .or. iand(values(3), S_IFMT) == S_IFREG
  end function regular_file

  !> Check the framing (magic, version, trailer, CRC) and parse the body.
  subroutine parse_file(buf, model, code, msg)
    integer(int8), intent(in) :: buf(:)
    type(pykd_model), intent(inout) :: model
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    integer(int64) :: n, body_end, last, version
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
    version = get_u32(buf, 8_int64)
    if (version < FORMAT_VERSION_MIN .or. version > FORMAT_VERSION) then
      msg = 'unsupported model format version '//str(version)//' (this pykd reads versions '// &
            str(int(FORMAT_VERSION_MIN, int64))//' and '//str(int(FORMAT_VERSION, int64))//')'
      return
    end if

    if (n >= 12 + TRAILER .and. all(buf(n - 7:n) == to_bytes(END_MAGIC))) then
      ! Normal case: verify the checksum before trusting any size field.
      body_end = n - TRAILER
      if (iand(int(crc32(buf(1:body_end)), int64), int(z'FFFFFFFF', int64)) /= get_u32(buf, body_end)) then
        msg = 'checksum mismatch (file corrupted)'
        return
      end if
      call parse_body(buf, int(version), body_end, model, last, code, msg)
      if (code /= PYKD_OK) return
      if (last /= body_end) then
        code = PYKD_ERR_FORMAT
        msg = str(body_end - last)//' unexpected bytes between the last layer and the checksum'
      end if
      return
    end if
    ! No end marker: use the unverified sizes only to say what is wrong.
    call parse_body(buf, int(version), n, model, last, code, msg)
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

  !> Everything after the version, reading no byte at or beyond `limit`;
  !! `last` is the offset just after the last layer record.
  subroutine parse_body(buf, version, limit, model, last, code, msg)
    integer(int8), intent(in) :: buf(:)
    integer, intent(in) :: version
    integer(int64), intent(in) :: limit
    type(pykd_model), intent(inout) :: model
    integer(int64), intent(out) :: last
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    type(cursor_t) :: cur
    integer(int64), allocatable :: starts(:)
    real(real32), allocatable :: in_vals(:), out_vals(:)
    integer(int64) :: n_layers, n_outputs

    last = 0
    cur = cursor_t(12, limit, version)
    code = PYKD_ERR_FORMAT
    if (.not. parse_header(buf, cur, model, n_layers, n_outputs, in_vals, out_vals, msg)) return
    call scan_layers(buf, cur, model, n_layers, n_outputs, size(in_vals) + size(out_vals), starts, code, msg)
    if (code /= PYKD_OK) return
    last = cur%pos
    call load_layers(buf, cur, model, starts, code, msg)
    if (code /= PYKD_OK) return
    allocate (model%norm(max(1, size(in_vals) + size(out_vals))), stat=code)
    if (code /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate memory for the model'
      return
    end if
    model%norm = 0
    model%norm(1:size(in_vals) + size(out_vals)) = [in_vals, out_vals]
    code = PYKD_OK
  end subroutine parse_body

  !> n_layers, n_features, n_outputs, the input and (v2) output
  !! normalisations (their [mean, std] in in_vals/out_vals) and the metadata.
  logical function parse_header(buf, cur, model, n_layers, n_outputs, in_vals, out_vals, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(inout) :: cur
    type(pykd_model), intent(inout) :: model
    integer(int64), intent(out) :: n_layers, n_outputs
    real(real32), allocatable, intent(out) :: in_vals(:), out_vals(:)
    character(len=*), intent(inout) :: msg
    integer(int64) :: n_features, meta_len
    integer :: ierr

    ok = .false.
    n_outputs = 0
    if (.not. read_count(buf, cur, 'n_layers', n_layers, msg)) return
    if (.not. read_count(buf, cur, 'n_features', n_features, msg)) return
    if (.not. read_count(buf, cur, 'n_outputs', n_outputs, msg)) return
    if (n_layers == 0) then
      msg = 'model has no layers'
      return
    end if
    model%n_features = int(n_features)
    model%n_outputs = int(n_outputs)
    if (.not. read_norm(buf, cur, merge('in_norm', 'norm   ', cur%version >= 2), n_features, &
                        model%norm_kinds(1), in_vals, msg)) return
    if (cur%version >= 2) then
      if (.not. read_norm(buf, cur, 'out_norm', n_outputs, model%norm_kinds(2), out_vals, msg)) return
    else
      allocate (out_vals(0))
    end if

    if (.not. room(cur, 4_int64, 'meta_len', msg)) return
    meta_len = get_u32(buf, cur%pos)
    cur%pos = cur%pos + 4
    if (.not. room(cur, meta_len, 'metadata', msg)) return
    if (meta_len > MAX_META_BYTES) then
      msg = 'metadata is '//str(meta_len)//' bytes, more than the 16 MiB limit'
      return
    end if
    if (meta_len == 0) then
      model%metadata = '{}'
    else
      allocate (character(len=meta_len) :: model%metadata, stat=ierr)
      if (ierr /= 0) then
        msg = 'cannot allocate memory for the metadata'
        return
      end if
      model%metadata = transfer(buf(cur%pos + 1:cur%pos + meta_len), model%metadata)
    end if
    cur%pos = cur%pos + meta_len
    ok = json_object_ok(model%metadata, msg)
  end function parse_header

  !> One normalisation (`name` as in the Python reader: in_norm, out_norm,
  !! or norm in version 1): its code (u32) and [mean, std] (k values each,
  !! k = 0, 1 or `units`), finite with std > 0.
  logical function read_norm(buf, cur, name, units, kind, vals, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(inout) :: cur
    character(len=*), intent(in) :: name
    integer(int64), intent(in) :: units
    integer(int32), intent(out) :: kind
    real(real32), allocatable, intent(out) :: vals(:)
    character(len=*), intent(inout) :: msg
    integer(int64) :: code, k
    integer :: ierr
    character(len=:), allocatable :: lk

    ok = .false.
    kind = NORM_NONE
    lk = trim(name)
    if (.not. room(cur, 4_int64, lk, msg)) return
    code = get_u32(buf, cur%pos)
    cur%pos = cur%pos + 4
    select case (code)
    case (NORM_NONE)
      k = 0
    case (NORM_PER_FEATURE)
      k = units
    case (NORM_SCALAR)
      k = 1
    case default
      msg = lk//': unknown norm kind '//str(code)
      return
    end select
    if (.not. room(cur, 4 * k, lk//' mean', msg)) return
    if (.not. room(cur, 8 * k, lk//' std', msg)) return
    allocate (vals(2 * k), stat=ierr)
    if (ierr /= 0) then
      msg = 'cannot allocate memory for '//lk
      return
    end if
    call get_f32(buf, cur%pos, vals, 2 * k)
    cur%pos = cur%pos + 8 * k
    if (.not. all(ieee_is_finite(vals(1:k)))) then
      msg = lk//' mean contains NaN or infinite values'
    else if (.not. all(ieee_is_finite(vals(k + 1:)))) then
      msg = lk//' std contains NaN or infinite values'
    else if (.not. all(vals(k + 1:) > 0)) then
      msg = lk//' std must be > 0'
    else
      kind = int(code, int32)
      ok = .true.
    end if
  end function read_norm

  !> Pass 1: every record header, and each kind's scan of its payload (no
  !! allocation beyond the table), giving the table's sizes and slice
  !! lengths; their total must fit the memory rule before pass 2.
  subroutine scan_layers(buf, cur, model, n_layers, n_outputs, n_norm, starts, code, msg)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(inout) :: cur
    type(pykd_model), intent(inout) :: model
    integer(int64), intent(in) :: n_layers, n_outputs
    integer, intent(in) :: n_norm
    integer(int64), allocatable, intent(out) :: starts(:)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    integer(int64) :: prev_out, total, cap, header_len
    integer :: k, ierr

    code = PYKD_ERR_FORMAT
    header_len = merge(16, 24, cur%version == 1)
    ! Every record has its header: bound n_layers before allocating the table.
    if (n_layers > (cur%limit - cur%pos) / header_len) then
      msg = 'truncated: '//str(n_layers)//' layer records need at least '//str(header_len)// &
            ' bytes each at offset '//str(cur%pos)//', but only '//str(max(cur%limit - cur%pos, 0_int64))// &
            ' remain'
      return
    end if
    allocate (model%table(N_FIELDS, n_layers), starts(n_layers), stat=ierr)
    if (ierr /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate the layer table'
      return
    end if
    model%table = 0
    cap = EXPANSION * size(buf, kind=int64) + SLACK
    ! As the Python reader: the arrays (the table, at most 7 x the file, aside).
    total = 4 * n_norm
    prev_out = model%n_features
    do k = 1, int(n_layers)
      if (.not. scan_record(buf, cur, k, prev_out, model%table(:, k), starts(k), msg)) return
      if (.not. add_lengths(model%table(:, k), total, cap, size(buf, kind=int64), msg)) then
        msg = 'layer '//str(int(k, int64))//': '//msg
        return
      end if
      prev_out = model%table(COL_N_OUT, k)
    end do
    if (prev_out /= n_outputs) then
      msg = 'layer '//str(n_layers)//' outputs '//str(prev_out)//' but the model has n_outputs = '// &
            str(n_outputs)
      return
    end if
    code = PYKD_OK
  end subroutine scan_layers

  !> Record k's header (kind, activation, n_in, n_out, v2: payload_bytes)
  !! and its kind's scan; `start` is the payload's first byte.
  logical function scan_record(buf, cur, k, prev_out, row, start, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(inout) :: cur
    integer, intent(in) :: k
    integer(int64), intent(in) :: prev_out
    integer(int64), intent(inout) :: row(N_FIELDS)
    integer(int64), intent(out) :: start
    character(len=*), intent(inout) :: msg
    class(pykd_layer_t), allocatable :: obj
    character(len=:), allocatable :: lk
    integer(int64) :: payload
    integer :: st

    ok = .false.
    lk = 'layer '//str(int(k, int64))
    start = 0
    payload = -1
    if (.not. read_u32(buf, cur, lk//' kind', row(COL_KIND), msg)) return
    if (.not. read_u32(buf, cur, lk//' activation', row(COL_ACT), msg)) return
    if (.not. read_count(buf, cur, lk//' n_in', row(COL_N_IN), msg)) return
    if (.not. read_count(buf, cur, lk//' n_out', row(COL_N_OUT), msg)) return
    if (.not. header_ok(row, cur%version, lk, msg)) return
    if (cur%version >= 2) then
      if (.not. room(cur, 8_int64, lk//' payload_bytes', msg)) return
      payload = get_u64(buf, cur%pos)
      cur%pos = cur%pos + 8
      if (payload < 0 .or. payload > cur%limit - cur%pos) then
        msg = 'truncated: '//lk//' payload_bytes = '//unsigned(payload)//' at offset '//str(cur%pos)// &
              ', but only '//str(max(cur%limit - cur%pos, 0_int64))//' bytes remain'
        return
      end if
    end if
    if (.not. chain_ok(row, k, prev_out, msg)) return
    call new_layer(row(COL_KIND), obj, st)
    if (st /= PYKD_OK) then
      msg = lk//': unknown kind '//str(row(COL_KIND))
      return
    end if
    start = cur%pos
    call obj%scan_record(cur%version, buf, cur%pos, cur%limit, row, st, msg)
    if (st /= PYKD_OK) then
      if (msg == '') msg = 'invalid record'
      msg = lk//' ('//obj%name()//'): '//msg
      return
    end if
    if (cur%version >= 2 .and. cur%pos - start /= payload) then
      msg = lk//': payload_bytes is '//str(payload)//', but its fields imply '//str(cur%pos - start)
      return
    end if
    ok = .true.
  end function scan_record

  !> The kind, activation and sizes of a record header are valid.
  logical function header_ok(row, version, lk, msg) result(ok)
    integer(int64), intent(in) :: row(N_FIELDS)
    integer, intent(in) :: version
    character(len=*), intent(in) :: lk
    character(len=*), intent(inout) :: msg
    character(len=:), allocatable :: v1

    ok = .false.
    v1 = ''
    if (version == 1) v1 = ' (for a version 1 file)'
    if (row(COL_KIND) < KIND_DENSE .or. row(COL_KIND) > merge(KIND_DENSE_INT8, KIND_MAX, version == 1)) then
      msg = lk//': unknown kind '//str(row(COL_KIND))//v1
    else if (row(COL_ACT) > merge(ACT_TANH, ACT_MAX, version == 1)) then
      msg = lk//': unknown activation '//str(row(COL_ACT))//v1
    else if (row(COL_N_IN) == 0 .or. row(COL_N_OUT) == 0) then
      msg = lk//': has zero size ('//str(row(COL_N_IN))//' x '//str(row(COL_N_OUT))//')'
    else
      ok = .true.
    end if
  end function header_ok

  !> Layer 1 takes n_features inputs, layer k the outputs of layer k - 1.
  logical function chain_ok(row, k, prev_out, msg) result(ok)
    integer(int64), intent(in) :: row(N_FIELDS), prev_out
    integer, intent(in) :: k
    character(len=*), intent(inout) :: msg
    ok = row(COL_N_IN) == prev_out
    if (ok) return
    if (k == 1) then
      msg = 'layer 1 takes '//str(row(COL_N_IN))//' inputs but the model has n_features = '//str(prev_out)
    else
      msg = 'layer sizes do not chain: layer '//str(int(k - 1, int64))//' outputs '//str(prev_out)// &
            ' but layer '//str(int(k, int64))//' takes '//str(row(COL_N_IN))
    end if
  end function chain_ok

  !> A u64 read into int64 (2**63 and above come out negative), as text.
  function unsigned(v) result(s)
    integer(int64), intent(in) :: v
    character(len=:), allocatable :: s
    if (v >= 0) then
      s = str(v)
    else
      s = '2**63 + '//str(v - huge(v) - 1)
    end if
  end function unsigned

  !> total += the bytes of the row's slices, each checked against `cap`
  !! first so that the sum cannot overflow.
  logical function add_lengths(row, total, cap, file_size, msg) result(ok)
    integer(int64), intent(in) :: row(N_FIELDS), cap, file_size
    integer(int64), intent(inout) :: total
    character(len=*), intent(inout) :: msg
    integer(int64) :: lens(3), nbytes
    lens = [row(COL_F32_LEN), row(COL_I8_LEN), row(COL_I32_LEN)]
    ok = all(lens >= 0) .and. all(lens <= cap)
    nbytes = cap + 1
    if (ok) then
      nbytes = 4 * lens(1) + lens(2) + 4 * lens(3)
      total = total + nbytes
      ok = total <= cap
    end if
    if (.not. ok) msg = 'its arrays would take '//str(nbytes)//' bytes, more than the file''s size '// &
                        'allows (at most 64 x '//str(file_size)//' bytes + 64 KiB for all arrays)'
  end function add_lengths

  !> Pass 2: lay the slices out one after another, allocate the buffers and
  !! let each kind decode and validate its payload.
  subroutine load_layers(buf, cur, model, starts, code, msg)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(in) :: cur
    type(pykd_model), intent(inout), target :: model      !! target: its buffers' addresses (line_shift)
    integer(int64), intent(in) :: starts(:)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    class(pykd_layer_t), allocatable :: obj
    integer(int64) :: nf, ni, n32, pos
    integer :: k, ierr

    ! Each slice after the one before, placed so that its first element (a
    ! sparse layer's planes: f32_lead) falls on a 64-byte boundary once the
    ! buffers' start is moved to one (below): the kernels' vector loads then
    ! never straddle two cache lines (pykd/_buffers.py lays Python's out alike).
    nf = 0; ni = 0; n32 = 0
    do k = 1, size(starts)
      call new_layer(model%table(COL_KIND, k), obj, code)
      if (code /= PYKD_OK) return  ! cannot happen: pass 1 made the same call
      call place(nf, obj%f32_lead(model%table(:, k)), COL_F32_OFF, LINE / 4)
      call place(ni, 0_int64, COL_I8_OFF, LINE)
      call place(n32, 0_int64, COL_I32_OFF, LINE / 4)
    end do
    allocate (model%f32(nf + LINE / 4), model%i8(ni + LINE), model%i32(n32 + LINE / 4), stat=ierr)
    if (ierr /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate '//str(4 * nf + ni + 4 * n32)//' bytes for the layers'
      return
    end if
    model%table(COL_F32_OFF, :) = model%table(COL_F32_OFF, :) + line_shift(c_loc(model%f32), 4)
    model%table(COL_I8_OFF, :) = model%table(COL_I8_OFF, :) + line_shift(c_loc(model%i8), 1)
    model%table(COL_I32_OFF, :) = model%table(COL_I32_OFF, :) + line_shift(c_loc(model%i32), 4)
    model%f32 = 0; model%i8 = 0; model%i32 = 0
    do k = 1, size(starts)
      call new_layer(model%table(COL_KIND, k), obj, code)
      if (code /= PYKD_OK) exit   ! cannot happen: pass 1 made the same call
      pos = starts(k)
      call obj%load_record(cur%version, buf, pos, model%table(:, k), model%f32, model%i8, model%i32, &
                           code, msg)
      if (code /= PYKD_OK) then
        code = PYKD_ERR_FORMAT
        if (msg == '') msg = 'invalid payload'
        msg = 'layer '//str(int(k, int64))//' ('//obj%name()//'): '//msg
        return
      end if
    end do
    code = PYKD_OK

  contains

    !> Layer k's slice in one buffer (offset column col, `unit` elements a
    !! line): after `end`, its element `lead` on a line; `end` moves past it.
    subroutine place(end, lead, col, unit)
      integer(int64), intent(inout) :: end
      integer(int64), intent(in) :: lead
      integer, intent(in) :: col, unit
      integer(int64) :: off
      off = end
      if (model%table(col + 1, k) > 0) off = (end + lead + unit - 1) / unit * unit - lead
      model%table(col, k) = off
      end = off + model%table(col + 1, k)
    end subroutine place
  end subroutine load_layers

  !> Elements of `size` bytes from addr to the next 64-byte boundary.
  integer(int64) function line_shift(p, size)
    type(c_ptr), intent(in) :: p
    integer, intent(in) :: size
    line_shift = modulo(-transfer(p, 0_c_intptr_t), int(LINE, c_intptr_t)) / size
  end function line_shift

  !> The u32 at the cursor; the cursor advances.
  logical function read_u32(buf, cur, what, v, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(inout) :: cur
    character(len=*), intent(in) :: what
    integer(int64), intent(out) :: v
    character(len=*), intent(inout) :: msg
    v = 0
    ok = room(cur, 4_int64, what, msg)
    if (.not. ok) return
    v = get_u32(buf, cur%pos)
    cur%pos = cur%pos + 4
  end function read_u32

  !> The u32 count at the cursor (<= 2**31 - 1); the cursor advances.
  logical function read_count(buf, cur, what, v, msg) result(ok)
    integer(int8), intent(in) :: buf(:)
    type(cursor_t), intent(inout) :: cur
    character(len=*), intent(in) :: what
    integer(int64), intent(out) :: v
    character(len=*), intent(inout) :: msg
    ok = read_u32(buf, cur, what, v, msg)
    if (.not. ok) return
    ok = v <= MAX_COUNT
    if (.not. ok) msg = what//' = '//str(v)//' is larger than the largest count 2^31 - 1'
  end function read_count

  !> nbytes more bytes are present at the cursor; else a 'truncated' message.
  logical function room(cur, nbytes, what, msg)
    type(cursor_t), intent(in) :: cur
    integer(int64), intent(in) :: nbytes
    character(len=*), intent(in) :: what
    character(len=*), intent(inout) :: msg
    room = nbytes <= cur%limit - cur%pos
    if (.not. room) msg = 'truncated: '//what//' needs '//str(nbytes)//' bytes at offset '// &
                          str(cur%pos)//', but only '//str(max(cur%limit - cur%pos, 0_int64))//' remain'
  end function room

end submodule pykd_models_load
