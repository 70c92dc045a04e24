!> The abstract layer kind: what every kind module provides.
!!
!! A model is a layer table `table(N_FIELDS, n_layers)` (int64, the columns
!! COL_* of pykd_codes) plus three flat buffers: `f32(:)`, `i8(:)` and
!! `i32(:)` (docs/model.md). A layer owns the slices
!! `f32(off + 1 : off + len)` etc. named by its table row. Python holds the
!! same table and buffers as NumPy arrays, so one routine runs a model for
!! both.
!!
!! A kind is a type that extends `pykd_layer_t` with no components: its
!! procedures take the table row and the buffers, never state of their own,
!! so one object serves any number of layers and threads. The factory in
!! pykd_layer_factory is the only place that maps a kind code to a type.
!!
!! Offsets and byte positions are 0-based, as in docs/format.md.
module pykd_layer
  use iso_fortran_env, only: int8, int32, int64, real32
  use pykd_codes, only: N_FIELDS, COL_N_IN, COL_N_OUT
  implicit none
  private
  public :: pykd_layer_t, MSG_LEN

  integer, parameter :: MSG_LEN = 512

  type, abstract :: pykd_layer_t
  contains
    procedure(name_i), deferred, nopass :: name
    procedure(forward_i), deferred, nopass :: forward
    procedure(workspace_i), deferred, nopass :: workspace_words
    procedure(scan_i), deferred, nopass :: scan_record
    procedure(load_i), deferred, nopass :: load_record
    procedure(bytes_i), deferred, nopass :: record_bytes
    procedure(write_i), deferred, nopass :: write_record
    procedure(check_i), deferred, nopass :: check
    procedure(check_row_i), deferred, nopass :: check_row
    procedure, nopass :: f32_lead => no_lead
  end type pykd_layer_t

  abstract interface

    !> The kind's name as in the file format ('dense', 'dense_int8', ...).
    pure function name_i() result(s)
      character(len=:), allocatable :: s
    end function name_i

    !> y = act(layer(x)) for n samples (columns). Must not modify the
    !! buffers (thread-safe), must leave `y` fully defined, and must give
    !! the same bits for the same inputs, batch size and thread count.
    !! stat: PYKD_OK, or PYKD_ERR_NONFINITE (int8 layers given NaN/inf).
    subroutine forward_i(row, f32, i8, i32, n, x, y, work, stat)
      import :: int8, int32, int64, real32, N_FIELDS, COL_N_IN, COL_N_OUT
      integer(int64), intent(in) :: row(N_FIELDS)
      real(real32), intent(in) :: f32(*)
      integer(int8), intent(in) :: i8(*)
      integer(int32), intent(in) :: i32(*)
      integer, intent(in) :: n
      real(real32), intent(in) :: x(row(COL_N_IN), n)    !! (n_in, n)
      real(real32), intent(out) :: y(row(COL_N_OUT), n)  !! (n_out, n)
      !> workspace_words(row, n) words; `target` so that a kind can carve
      !! its int8 / int32 scratch from them (c_f_pointer).
      real(real32), intent(inout), target :: work(*)
      integer, intent(out) :: stat
    end subroutine forward_i

    !> float32 words of scratch that forward needs for n samples (int8 and
    !! int32 scratch are carved from the same words).
    pure integer(int64) function workspace_i(row, n)
      import :: int64, N_FIELDS
      integer(int64), intent(in) :: row(N_FIELDS)
      integer, intent(in) :: n
    end function workspace_i

    !> First pass over a record, allocating nothing. On entry row(COL_KIND),
    !! row(COL_ACT), row(COL_N_IN) and row(COL_N_OUT) are set and `pos` is the
    !! payload's first byte (after the record header). Read the kind's own
    !! u32 fields, check that the payload fits before `limit`, set the
    !! *_LEN and P* entries of `row`, and advance `pos` past the payload.
    !! stat: PYKD_OK or PYKD_ERR_FORMAT (with msg).
    subroutine scan_i(version, buf, pos, limit, row, stat, msg)
      import :: int8, int64, N_FIELDS
      integer, intent(in) :: version
      integer(int8), intent(in) :: buf(:)
      integer(int64), intent(inout) :: pos
      integer(int64), intent(in) :: limit
      integer(int64), intent(inout) :: row(N_FIELDS)
      integer, intent(out) :: stat
      character(len=*), intent(inout) :: msg
    end subroutine scan_i

    !> Second pass: decode the payload at `pos` into the buffers at the
    !! row's offsets (set by the caller from the scanned lengths) and
    !! validate its content (finite values, indices in range, ...).
    !! `pos` advances past the payload.
    subroutine load_i(version, buf, pos, row, f32, i8, i32, stat, msg)
      import :: int8, int32, int64, real32, N_FIELDS
      integer, intent(in) :: version
      integer(int8), intent(in) :: buf(:)
      integer(int64), intent(inout) :: pos
      integer(int64), intent(in) :: row(N_FIELDS)
      real(real32), intent(inout) :: f32(*)
      integer(int8), intent(inout) :: i8(*)
      integer(int32), intent(inout) :: i32(*)
      integer, intent(out) :: stat
      character(len=*), intent(inout) :: msg
    end subroutine load_i

    !> Bytes of the version-2 payload that write_record will write.
    integer(int64) function bytes_i(row, f32, i8, i32)
      import :: int8, int32, int64, real32, N_FIELDS
      integer(int64), intent(in) :: row(N_FIELDS)
      real(real32), intent(in) :: f32(*)
      integer(int8), intent(in) :: i8(*)
      integer(int32), intent(in) :: i32(*)
    end function bytes_i

    !> Write the version-2 payload (after the record header) at `pos`.
    subroutine write_i(row, f32, i8, i32, buf, pos)
      import :: int8, int32, int64, real32, N_FIELDS
      integer(int64), intent(in) :: row(N_FIELDS)
      real(real32), intent(in) :: f32(*)
      integer(int8), intent(in) :: i8(*)
      integer(int32), intent(in) :: i32(*)
      integer(int8), intent(inout) :: buf(:)
      integer(int64), intent(inout) :: pos
    end subroutine write_i

    !> Everything the format requires of a layer's row and data (used
    !! before saving a model built in memory). stat: PYKD_OK or PYKD_ERR_ARG.
    subroutine check_i(row, f32, i8, i32, stat, msg)
      import :: int8, int32, int64, real32, N_FIELDS
      integer(int64), intent(in) :: row(N_FIELDS)
      real(real32), intent(in) :: f32(*)
      integer(int8), intent(in) :: i8(*)
      integer(int32), intent(in) :: i32(*)
      integer, intent(out) :: stat
      character(len=*), intent(inout) :: msg
    end subroutine check_i

    !> The row alone is consistent (sizes in range, slice lengths and kind
    !! parameters as the kind's layout requires), reading no buffer: the
    !! cheap check network_forward makes before every run, so that a bad
    !! table gives a status instead of an out-of-bounds access.
    !! stat: PYKD_OK or PYKD_ERR_ARG (with msg).
    pure subroutine check_row_i(row, stat, msg)
      import :: int64, N_FIELDS
      integer(int64), intent(in) :: row(N_FIELDS)
      integer, intent(out) :: stat
      character(len=*), intent(inout) :: msg
    end subroutine check_row_i

  end interface

contains

  !> The elements of a layer's f32 slice before the array the loader puts
  !! at a 64-byte boundary (what its one-sample kernel streams): by default
  !! the slice's start (pykd_models_load; pykd/_buffers.py).
  pure integer(int64) function no_lead(row)
    integer(int64), intent(in) :: row(N_FIELDS)
    no_lead = 0
  end function no_lead

end module pykd_layer
