!> Writing model files (docs/format.md): version 2, atomically.
submodule (pykd_models) pykd_models_save
  use iso_c_binding, only: c_char, c_int, c_null_char
  use pykd_codes, only: PYKD_ERR_IO, FORMAT_VERSION
  use pykd_bytes, only: to_bytes, put_bytes, put_u32, put_u64, put_f32
  use pykd_crc32, only: crc32
  implicit none

  interface
    ! C's rename(): replaces `new` atomically on POSIX systems.
    integer(c_int) function c_rename(old, new) bind(c, name='rename')
      import :: c_char, c_int
      character(kind=c_char), intent(in) :: old(*), new(*)
    end function c_rename
    integer(c_int) function c_getpid() bind(c, name='getpid')
      import :: c_int
    end function c_getpid
    ! POSIX fsync(): the bytes are on disk before the rename makes them visible.
    integer(c_int) function c_fsync(fd) bind(c, name='fsync')
      import :: c_int
      integer(c_int), value :: fd
    end function c_fsync
    ! fsync of path's directory (pykd_fsync_dir.c): the rename is then durable.
    integer(c_int) function c_fsync_dir(path) bind(c, name='pykd_fsync_dir')
      import :: c_char, c_int
      character(kind=c_char), intent(in) :: path(*)
    end function c_fsync_dir
  end interface

contains

  ! ------------------------------------------------------------------- saving

  !> Write the model as a version-2 file (readable by Python's
  !! pykd.modelfile.read_model), the same bytes as Python's writer for the
  !! same model. The bytes go to a temporary file next to `path`, which is
  !! then renamed over `path`: readers never see a partial file, and on
  !! failure an existing `path` is left untouched.
  module subroutine pykd_save_model(model, path, stat, errmsg)
    class(pykd_model), intent(in) :: model
    character(len=*), intent(in) :: path
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int8), allocatable :: buf(:)
    integer(int64), allocatable :: bytes(:)
    integer(int64) :: total, k_in, k_out
    integer :: code, ierr
    character(len=MSG_LEN) :: msg

    msg = ''
    call check_model(model, code, msg)
    if (code /= PYKD_OK) then
      call set_status(code, 'pykd_save_model: '//msg, stat, errmsg)
      return
    end if
    k_in = norm_count(model%norm_kinds(1), model%n_features)
    k_out = norm_count(model%norm_kinds(2), model%n_outputs)
    call record_sizes(model, bytes)
    total = 8 + 4 * 5 + 8 * k_in + 4 + 8 * k_out + 4 + len(model%metadata, kind=int64) + &
            24 * size(bytes, kind=int64) + sum(bytes) + TRAILER
    allocate (buf(total), stat=ierr)
    if (ierr /= 0) then
      call set_status(PYKD_ERR_ALLOC, 'pykd_save_model: cannot allocate '//str(total)//' bytes', &
                      stat, errmsg)
      return
    end if
    call encode(model, bytes, k_in, k_out, buf, code, msg)
    if (code == PYKD_OK) call write_atomically(path, buf, code, msg)
    call set_status(code, msg, stat, errmsg)
  end subroutine pykd_save_model

  !> The version-2 payload bytes of every layer.
  subroutine record_sizes(model, bytes)
    type(pykd_model), intent(in) :: model
    integer(int64), allocatable, intent(out) :: bytes(:)
    class(pykd_layer_t), allocatable :: obj
    integer :: l, st
    allocate (bytes(model%n_layers()))
    bytes = 0
    do l = 1, model%n_layers()
      call new_layer(model%table(COL_KIND, l), obj, st)
      if (st == PYKD_OK) bytes(l) = obj%record_bytes(model%table(:, l), model%f32, model%i8, model%i32)
    end do
  end subroutine record_sizes

  !> The whole file into buf (sized exactly for it).
  subroutine encode(model, bytes, k_in, k_out, buf, code, msg)
    type(pykd_model), intent(in) :: model
    integer(int64), intent(in) :: bytes(:), k_in, k_out
    integer(int8), intent(inout) :: buf(:)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    class(pykd_layer_t), allocatable :: obj
    integer(int64) :: pos, start
    integer :: l

    pos = 0
    call put_bytes(buf, pos, to_bytes(MAGIC))
    call put_u32(buf, pos, [int(FORMAT_VERSION, int64), int(model%n_layers(), int64), &
                            int(model%n_features, int64), int(model%n_outputs, int64), &
                            int(model%norm_kinds(1), int64)])
    call put_f32(buf, pos, model%norm, 2 * k_in)
    call put_u32(buf, pos, [int(model%norm_kinds(2), int64)])
    call put_f32(buf, pos, model%norm(2 * k_in + 1:), 2 * k_out)
    call put_u32(buf, pos, [len(model%metadata, kind=int64)])
    call put_bytes(buf, pos, to_bytes(model%metadata))
    do l = 1, model%n_layers()
      associate (row => model%table(:, l))
        call put_u32(buf, pos, row(COL_KIND:COL_N_OUT))
        call put_u64(buf, pos, bytes(l))
        call new_layer(row(COL_KIND), obj, code)
        start = pos
        call obj%write_record(row, model%f32, model%i8, model%i32, buf, pos)
        if (pos - start /= bytes(l)) then
          code = PYKD_ERR_ARG
          msg = 'pykd_save_model: layer '//str(int(l, int64))//' ('//obj%name()//') wrote '// &
                str(pos - start)//' payload bytes, not the '//str(bytes(l))//' it declared'
          return
        end if
      end associate
    end do
    call put_u32(buf, pos, [iand(int(crc32(buf(1:pos)), int64), int(z'FFFFFFFF', int64))])
    call put_bytes(buf, pos, to_bytes(END_MAGIC))
    code = PYKD_OK
  end subroutine encode

  !> Write `buf` to a fresh temporary file beside `path` (its name holds the
  !! writer's process id), fsync it, rename it over `path` (C's rename(),
  !! atomic on POSIX file systems), then fsync the directory so the rename
  !! survives a crash (as Python's writer, pykd/io.py).
  subroutine write_atomically(path, buf, code, msg)
    character(len=*), intent(in) :: path
    integer(int8), intent(in) :: buf(:)
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    character(len=:), allocatable :: tmp
    character(len=256) :: iomsg
    integer :: u, ios, ios2, attempt
    integer(int64) :: tick

    ! status='new' refuses an existing name, so two writers never share a
    ! temporary file; retry with another suffix if the name is taken.
    call system_clock(tick)
    iomsg = ''
    do attempt = 1, 100
      tmp = path//'.'//str(int(c_getpid(), int64))//'-'//str(modulo(tick + attempt, 1000000000_int64))//'.tmp'
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
    if (ios == 0) then
      ios = c_fsync(int(fnum(u), c_int))   ! FNUM: GNU Fortran's unit -> file descriptor
      if (ios /= 0) iomsg = 'fsync failed'
    end if
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
    if (c_fsync_dir(path//c_null_char) /= 0) then
      code = PYKD_ERR_IO
      msg = 'pykd_save_model: wrote '//path//' but cannot fsync its directory'
      return
    end if
    code = PYKD_OK
    msg = ''
  end subroutine write_atomically

end submodule pykd_models_save
