!> Models of every layer kind: load, predict, save, build, quantize.
!!
!! A `pykd_model` holds exactly the arrays of docs/model.md: the layer table
!! `table(N_FIELDS, n_layers)` and the flat buffers `f32`, `i8`, `i32`,
!! `norm` and `norm_kinds`, plus the JSON metadata. Python's `Model` holds
!! the same arrays as NumPy arrays, and both run them through one routine,
!! `pykd_network:network_forward`, so Fortran and Python give the same bits.
!! Inputs are column-major with one sample per column, `x(n_features, n)`;
!! logits are `(n_outputs, n)`.
!!
!! Thread safety: `pykd_predict` never modifies the model, so any number of
!! threads may call it on one model at the same time, each with its own
!! `pykd_workspace` (or none: then every call allocates its own). Loading,
!! saving, quantizing and freeing are not meant to race with predictions on
!! the same model.
!!
!! Errors never stop the program: every routine takes optional `stat` and
!! `errmsg`. Without `stat`, the message goes to standard error and the
!! failure stays testable: `model%ok` is false (load, build) or the logits
!! are NaN (predict).
!!
!! File reading and writing (docs/format.md) live in the submodule
!! pykd_models_io.
module pykd_models
  use iso_fortran_env, only: int8, int32, int64, real32, real64
  use ieee_arithmetic, only: ieee_is_finite, ieee_value, ieee_quiet_nan
  use pykd_codes, only: PYKD_OK, PYKD_ERR_ARG, PYKD_ERR_ALLOC, PYKD_ERR_NONFINITE, N_FIELDS, &
                        COL_KIND, COL_ACT, COL_N_IN, COL_N_OUT, COL_F32_OFF, COL_F32_LEN, &
                        COL_I8_OFF, COL_I8_LEN, COL_I32_OFF, COL_I32_LEN, COL_P1, &
                        KIND_DENSE, KIND_DENSE_INT8, ACT_IDENTITY, ACT_MAX, &
                        NORM_NONE, NORM_PER_FEATURE, NORM_SCALAR, QUANT_DYNAMIC, QUANT_STATIC
  use pykd_status, only: set_status
  use pykd_bytes, only: str
  use pykd_layer, only: pykd_layer_t, MSG_LEN
  use pykd_layer_factory, only: new_layer
  use pykd_network, only: network_forward, network_workspace_words
  use pykd_quant, only: quantize_weights, MAX_IN
  use pykd_json, only: json_object_ok
  implicit none
  private
  public :: pykd_model, pykd_workspace
  public :: pykd_load_model, pykd_predict, pykd_predict_r32, pykd_predict_r64, pykd_save_model, &
            pykd_free, pykd_model_from_params, pykd_model_from_arrays, pykd_quantize_model, activation_name, MAX_META_BYTES
  ! For the submodules only (not re-exported by module pykd): gfortran 12
  ! drops private procedures that only submodules call, and the link fails.
  public :: finish_build, check_model, norm_count

  !> Largest metadata (JSON text) a model file may hold: 16 MiB.
  integer(int64), parameter :: MAX_META_BYTES = 16_int64 * 1024 * 1024
  integer(int64), parameter :: MAX_COUNT = huge(0_int32)
  integer(int64), parameter :: TRAILER = 12  ! crc32 + end magic
  character(len=8), parameter :: MAGIC = 'PYKDMDL'//achar(0), END_MAGIC = 'PYKDEND'//achar(0)
  character(len=8), parameter :: ACT_NAMES(0:ACT_MAX) = [character(len=8) :: 'identity', 'relu', &
                                                        'tanh', 'sigmoid', 'gelu', 'silu']

  !> A model: a chain of typed layers, normalisation and metadata, in the
  !! arrays of docs/model.md. Read the components freely; change them only
  !! through the routines of this module (a model built by hand must pass
  !! the checks of pykd_save_model before it is used).
  type :: pykd_model
    logical :: ok = .false.                  !! true once loaded or built successfully
    integer :: stat = PYKD_ERR_ARG           !! status of the last load or build
    character(len=MSG_LEN) :: errmsg = 'model not loaded' !! its message ('' on success)
    integer :: n_features = 0, n_outputs = 0
    integer(int64), allocatable :: table(:, :)   !! (N_FIELDS, n_layers): one column per layer
    real(real32), allocatable :: f32(:)          !! every float array of every layer
    integer(int8), allocatable :: i8(:)          !! int8 weights, packed indices, codes
    integer(int32), allocatable :: i32(:)        !! sparse row pointers and column indices
    real(real32), allocatable :: norm(:)         !! [in_mean, in_std, out_mean, out_std]
    integer(int32) :: norm_kinds(2) = NORM_NONE  !! input and output normalisation (NORM_*)
    character(len=:), allocatable :: metadata    !! the JSON text stored in the file
  contains
    procedure :: load => model_load
    procedure, private :: predict_r32 => pykd_predict_r32
    procedure, private :: predict_r64 => pykd_predict_r64
    generic :: predict => predict_r32, predict_r64
    procedure :: save => pykd_save_model
    procedure :: quantize => pykd_quantize_model
    procedure :: free => pykd_free
    procedure :: n_layers => model_n_layers
    procedure :: layer_kind => model_layer_kind
    procedure :: layer_activation => model_layer_activation
    procedure :: layer_sizes => model_layer_sizes
    procedure :: n_params => model_n_params
  end type pykd_model

  !> Scratch memory for pykd_predict: one float32 buffer that grows to the
  !! largest need seen and is reused. Give each thread its own.
  type :: pykd_workspace
    real(real32), allocatable :: work(:)
    real(real32), allocatable :: x32(:, :), y32(:, :)  !! float32 copies for the real64 entry point
  end type pykd_workspace

  !> `call pykd_predict(model, x, outputs, stat, errmsg, work)` with real32
  !! or real64 `x` and `outputs` (both of one kind). The network computes in
  !! float32 either way: real64 inputs are rounded to float32 and the float32
  !! outputs widened, so the real64 entry gives exactly the real32 result.
  interface pykd_predict
    module procedure pykd_predict_r32, pykd_predict_r64
  end interface pykd_predict

  interface
    !> Read a model file (docs/format.md, version 1 or 2); see pykd_models_io.
    module subroutine pykd_load_model(path, model, stat, errmsg)
      character(len=*), intent(in) :: path
      type(pykd_model), intent(out) :: model
      integer, intent(out), optional :: stat
      character(len=*), intent(out), optional :: errmsg
    end subroutine pykd_load_model

    !> Write the model as a version-2 file, atomically; see pykd_models_io.
    module subroutine pykd_save_model(model, path, stat, errmsg)
      class(pykd_model), intent(in) :: model
      character(len=*), intent(in) :: path
      integer, intent(out), optional :: stat
      character(len=*), intent(out), optional :: errmsg
    end subroutine pykd_save_model

    !> Dense float32 layers -> dense_int8; see pykd_models_quant.
    module subroutine pykd_quantize_model(model, stat, errmsg, calibration)
      class(pykd_model), intent(inout) :: model
      integer, intent(out), optional :: stat
      character(len=*), intent(out), optional :: errmsg
      real(real32), intent(in), optional, contiguous :: calibration(:, :)  !! (n_features, n)
    end subroutine pykd_quantize_model
  end interface

contains

  !> Type-bound form: `call model%load(path, stat, errmsg)`.
  subroutine model_load(self, path, stat, errmsg)
    class(pykd_model), intent(out) :: self
    character(len=*), intent(in) :: path
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    call pykd_load_model(path, self, stat, errmsg)
  end subroutine model_load

  !> Release everything the model holds; it is then "not loaded".
  subroutine pykd_free(model)
    class(pykd_model), intent(out) :: model
    ! intent(out) deallocates every component and restores the defaults.
  end subroutine pykd_free

  ! ---------------------------------------------------------------- accessors

  !> Number of layers (0 if the model is not loaded).
  pure integer function model_n_layers(self) result(n)
    class(pykd_model), intent(in) :: self
    n = 0
    if (allocated(self%table)) n = size(self%table, 2)
  end function model_n_layers

  !> The kind of layer l as in the file format ('dense', 'dense_int8', ...);
  !! '' if there is no layer l.
  function model_layer_kind(self, l) result(name)
    class(pykd_model), intent(in) :: self
    integer, intent(in) :: l
    character(len=:), allocatable :: name
    class(pykd_layer_t), allocatable :: kind
    integer :: st
    name = ''
    if (l < 1 .or. l > self%n_layers()) return
    call new_layer(self%table(COL_KIND, l), kind, st)
    if (st == PYKD_OK) name = kind%name()
  end function model_layer_kind

  !> The activation of layer l ('identity', 'relu', ...); '' if there is no layer l.
  function model_layer_activation(self, l) result(name)
    class(pykd_model), intent(in) :: self
    integer, intent(in) :: l
    character(len=:), allocatable :: name
    name = ''
    if (l >= 1 .and. l <= self%n_layers()) name = activation_name(self%table(COL_ACT, l))
  end function model_layer_activation

  !> The name of an activation code ('' if unknown).
  pure function activation_name(code) result(name)
    integer(int64), intent(in) :: code
    character(len=:), allocatable :: name
    name = ''
    if (code >= ACT_IDENTITY .and. code <= ACT_MAX) name = trim(ACT_NAMES(code))
  end function activation_name

  !> Units per layer, input first: [n_features, n_out(1), ..., n_out(L)]
  !! (empty if the model is not loaded).
  pure function model_layer_sizes(self) result(sizes)
    class(pykd_model), intent(in) :: self
    integer, allocatable :: sizes(:)
    integer :: l
    allocate (sizes(0))
    if (self%n_layers() == 0) return
    sizes = [self%n_features, (int(self%table(COL_N_OUT, l)), l = 1, self%n_layers())]
  end function model_layer_sizes

  !> Stored numbers of layer l (all layers if l is absent): the lengths of
  !! its f32, i8 and i32 slices (a packed codebook byte counts once).
  pure integer(int64) function model_n_params(self, l) result(n)
    class(pykd_model), intent(in) :: self
    integer, intent(in), optional :: l
    integer :: k, k0, k1
    n = 0
    k0 = 1; k1 = self%n_layers()
    if (present(l)) then
      k0 = l; k1 = l
      if (l < 1 .or. l > self%n_layers()) return
    end if
    do k = k0, k1
      n = n + self%table(COL_F32_LEN, k) + self%table(COL_I8_LEN, k) + self%table(COL_I32_LEN, k)
    end do
  end function model_n_params

  ! ---------------------------------------------------------------- inference

  !> logits = model(x) for a batch: input normalisation, every layer through
  !! its kind's forward, output normalisation undone (one call of
  !! network_forward, as Python's Model.forward). The model is not modified,
  !! so concurrent calls are safe; pass a `work` per thread to avoid an
  !! allocation per call. On failure without `stat`, logits = NaN.
  subroutine pykd_predict_r32(model, x, logits, stat, errmsg, work)
    class(pykd_model), intent(in) :: model
    real(real32), intent(in), contiguous :: x(:, :)         !! (n_features, n)
    real(real32), intent(out), contiguous :: logits(:, :)   !! (n_outputs, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    type(pykd_workspace), intent(inout), optional, target :: work   !! reusable scratch memory
    type(pykd_workspace), target :: own
    type(pykd_workspace), pointer :: ws
    integer(int64) :: n, words
    integer :: st, bad_layer
    character(len=MSG_LEN) :: msg

    if (.not. model%ok) then
      call fail(PYKD_ERR_ARG, 'pykd_predict: the model is not loaded ('//trim(model%errmsg)//')')
      return
    end if
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
    ws => own
    if (present(work)) ws => work
    words = network_workspace_words(model%table, int(n), 0)
    if (.not. reserve(ws, words)) then
      call fail(PYKD_ERR_ALLOC, 'pykd_predict: cannot allocate a workspace of '//str(words)//' words')
      return
    end if
    msg = ''
    call network_forward(model%table, model%f32, model%i8, model%i32, model%norm, model%norm_kinds, &
                         x, 0, logits, ws%work, st, bad_layer, msg)
    if (st /= PYKD_OK) then
      call fail(st, 'pykd_predict: '//trim(msg))
      return
    end if
    call set_status(PYKD_OK, '', stat, errmsg)

  contains

    subroutine fail(code, text)
      integer, intent(in) :: code
      character(len=*), intent(in) :: text
      if (.not. present(stat)) logits = ieee_value(0.0_real32, ieee_quiet_nan)
      call set_status(code, text, stat, errmsg)
    end subroutine fail

  end subroutine pykd_predict_r32

  !> pykd_predict for real64 x(n_features, n) and outputs(n_outputs, n): x is
  !! rounded to float32 (a finite value beyond float32's range is an error,
  !! not an infinity), the float32 network runs, and its outputs are widened
  !! to real64 exactly. The float32 copies live in `work` when given (reused
  !! across calls), else in memory of this call. On failure without `stat`,
  !! outputs = NaN.
  subroutine pykd_predict_r64(model, x, outputs, stat, errmsg, work)
    class(pykd_model), intent(in) :: model
    real(real64), intent(in), contiguous :: x(:, :)          !! (n_features, n)
    real(real64), intent(out), contiguous :: outputs(:, :)   !! (n_outputs, n)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    type(pykd_workspace), intent(inout), optional, target :: work   !! reusable scratch memory
    type(pykd_workspace), target :: own
    type(pykd_workspace), pointer :: ws
    real(real32), allocatable :: x32(:, :), y32(:, :)
    integer :: ierr

    ws => own
    if (present(work)) ws => work
    ! Borrow the buffers (move_alloc: no copy), so `ws` can go on to the
    ! real32 entry without aliasing its own components.
    call move_alloc(ws%x32, x32)
    call move_alloc(ws%y32, y32)
    ierr = 0
    if (.not. same_shape(x32, x)) then
      if (allocated(x32)) deallocate (x32)
      allocate (x32(size(x, 1), size(x, 2)), stat=ierr)
    end if
    if (ierr == 0 .and. .not. same_shape(y32, outputs)) then
      if (allocated(y32)) deallocate (y32)
      allocate (y32(size(outputs, 1), size(outputs, 2)), stat=ierr)
    end if
    if (ierr /= 0) then
      call fail(PYKD_ERR_ALLOC, 'pykd_predict: cannot allocate the float32 copies of x and outputs')
    else if (any(abs(x) > huge(1.0_real32) .and. ieee_is_finite(x))) then
      call fail(PYKD_ERR_ARG, 'pykd_predict: x holds a finite value beyond the float32 range '// &
                '(the network computes in float32)')
    else
      x32 = real(x, real32)
      call pykd_predict_r32(model, x32, y32, stat, errmsg, ws)
      outputs = real(y32, real64)
    end if
    if (allocated(x32)) call move_alloc(x32, ws%x32)
    if (allocated(y32)) call move_alloc(y32, ws%y32)

  contains

    pure logical function same_shape(a, b)
      real(real32), allocatable, intent(in) :: a(:, :)
      real(real64), intent(in) :: b(:, :)
      same_shape = .false.
      if (allocated(a)) same_shape = all(shape(a) == shape(b))
    end function same_shape

    subroutine fail(code, text)
      integer, intent(in) :: code
      character(len=*), intent(in) :: text
      if (.not. present(stat)) outputs = ieee_value(0.0_real64, ieee_quiet_nan)
      call set_status(code, text, stat, errmsg)
    end subroutine fail

  end subroutine pykd_predict_r64

  !> Grow the workspace to at least `words` float32 words (at least 1); false
  !! if out of memory.
  logical function reserve(ws, words)
    type(pykd_workspace), intent(inout) :: ws
    integer(int64), intent(in) :: words
    integer :: ierr
    ierr = 0
    if (allocated(ws%work)) then
      if (size(ws%work, kind=int64) < words) deallocate (ws%work)
    end if
    if (.not. allocated(ws%work)) allocate (ws%work(max(words, 1_int64)), stat=ierr)
    reserve = ierr == 0
  end function reserve

  ! ------------------------------------------------------------------ building

  !> A float32 dense model from an MLP trained with pykd_mlp (flat `params`,
  !! the layout of mlp_param_count(sizes, 0, 0): W_l(sizes(l+1), sizes(l))
  !! then b_l per layer, which is the dense kind's slice, so the table points
  !! into a copy of `params` as it is). `mean`/`std` (size 1: scalar, or size
  !! sizes(1)) give the input normalisation that predict applies to raw
  !! inputs; `out_mean`/`out_std` (size 1 or the number of outputs) the
  !! output normalisation it undoes; `metadata` is a JSON object text
  !! (default '{}').
  subroutine pykd_model_from_params(sizes, acts, params, model, mean, std, metadata, out_mean, out_std, &
                                    stat, errmsg)
    integer, intent(in) :: sizes(:)              !! units per layer, input first
    integer, intent(in) :: acts(:)               !! activation of each layer (ACT_*)
    real(real32), intent(in) :: params(:)        !! flat parameters (no hint regressor)
    type(pykd_model), intent(out) :: model
    real(real32), intent(in), optional :: mean(:), std(:)
    character(len=*), intent(in), optional :: metadata
    real(real32), intent(in), optional :: out_mean(:), out_std(:)
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer(int64) :: off, total
    integer :: l, nl, ierr, code
    character(len=MSG_LEN) :: msg

    nl = size(sizes) - 1
    if (nl < 1 .or. size(acts) /= nl) then
      call fail(PYKD_ERR_ARG, 'need size(sizes) >= 2 and size(acts) = size(sizes) - 1')
      return
    end if
    if (any(sizes < 1) .or. any(acts < ACT_IDENTITY .or. acts > ACT_MAX)) then
      call fail(PYKD_ERR_ARG, 'sizes must be >= 1 and acts activation codes 0..'// &
                str(int(ACT_MAX, int64)))
      return
    end if
    total = 0
    do l = 1, nl
      total = total + int(sizes(l), int64) * sizes(l + 1) + sizes(l + 1)
    end do
    if (size(params, kind=int64) /= total) then
      call fail(PYKD_ERR_ARG, 'params has '//str(size(params, kind=int64))// &
                ' entries, the network needs '//str(total))
      return
    end if
    model%n_features = sizes(1)
    model%n_outputs = sizes(nl + 1)
    call build_norm(model, mean, std, out_mean, out_std, code, msg)
    if (code /= PYKD_OK) then
      call fail(code, msg)
      return
    end if
    allocate (model%table(N_FIELDS, nl), model%f32(max(total, 1_int64)), model%i8(1), model%i32(1), &
              stat=ierr)
    if (ierr /= 0) then
      call fail(PYKD_ERR_ALLOC, 'cannot allocate the model ('//str(4 * total)//' bytes)')
      return
    end if
    model%f32(1:total) = params
    model%i8 = 0
    model%i32 = 0
    model%table = 0
    off = 0
    do l = 1, nl
      model%table(COL_KIND, l) = KIND_DENSE
      model%table(COL_ACT, l) = acts(l)
      model%table(COL_N_IN, l) = sizes(l)
      model%table(COL_N_OUT, l) = sizes(l + 1)
      model%table(COL_F32_OFF, l) = off
      model%table(COL_F32_LEN, l) = int(sizes(l), int64) * sizes(l + 1) + sizes(l + 1)
      off = off + model%table(COL_F32_LEN, l)
    end do
    model%metadata = '{}'
    if (present(metadata)) model%metadata = metadata
    if (.not. json_object_ok(model%metadata, msg)) then
      call fail(PYKD_ERR_ARG, msg)
      return
    end if
    call finish_build(model, PYKD_OK, '', stat, errmsg)

  contains

    subroutine fail(code, text)
      integer, intent(in) :: code
      character(len=*), intent(in) :: text
      call pykd_free(model)
      call finish_build(model, code, 'pykd_model_from_params: '//text, stat, errmsg)
    end subroutine fail

  end subroutine pykd_model_from_params

  !> A model from the arrays of docs/model.md, e.g. a compressed model built
  !! in memory: they are copied in and checked as pykd_save_model checks a
  !! model (every kind's content, the chain, the slices, the normalisation).
  !! n_features and n_outputs follow from the table. `norm` and `norm_kinds`
  !! default to no normalisation, `metadata` to '{}'.
  subroutine pykd_model_from_arrays(table, f32, i8, i32, model, norm, norm_kinds, metadata, stat, errmsg)
    integer(int64), intent(in) :: table(:, :)      !! (N_FIELDS, n_layers)
    real(real32), intent(in) :: f32(:)
    integer(int8), intent(in) :: i8(:)
    integer(int32), intent(in) :: i32(:)
    type(pykd_model), intent(out) :: model
    real(real32), intent(in), optional :: norm(:)
    integer(int32), intent(in), optional :: norm_kinds(2)
    character(len=*), intent(in), optional :: metadata
    integer, intent(out), optional :: stat
    character(len=*), intent(out), optional :: errmsg
    integer :: code, ierr
    character(len=MSG_LEN) :: msg

    msg = ''
    if (size(table, 1) /= N_FIELDS .or. size(table, 2) < 1) then
      call fail(PYKD_ERR_ARG, 'table must be ('//str(int(N_FIELDS, int64))//', n_layers >= 1)')
      return
    end if
    allocate (model%table, source=table, stat=ierr)
    if (ierr == 0) allocate (model%f32(max(size(f32), 1)), model%i8(max(size(i8), 1)), &
                             model%i32(max(size(i32), 1)), stat=ierr)
    if (ierr /= 0) then
      call fail(PYKD_ERR_ALLOC, 'cannot allocate the model')
      return
    end if
    model%f32 = 0; model%i8 = 0; model%i32 = 0
    model%f32(1:size(f32)) = f32
    model%i8(1:size(i8)) = i8
    model%i32(1:size(i32)) = i32
    if (present(norm_kinds)) model%norm_kinds = norm_kinds
    if (present(norm)) then
      model%norm = norm
      if (size(norm) == 0) model%norm = [0.0_real32]
    else
      model%norm = [0.0_real32]
    end if
    model%metadata = '{}'
    if (present(metadata)) model%metadata = metadata
    model%n_features = int(min(max(table(COL_N_IN, 1), 0_int64), MAX_COUNT))
    model%n_outputs = int(min(max(table(COL_N_OUT, size(table, 2)), 0_int64), MAX_COUNT))
    model%ok = .true.
    call check_model(model, code, msg)
    if (code /= PYKD_OK) then
      call fail(code, msg)
      return
    end if
    call finish_build(model, PYKD_OK, '', stat, errmsg)

  contains

    subroutine fail(code, text)
      integer, intent(in) :: code
      character(len=*), intent(in) :: text
      call pykd_free(model)
      call finish_build(model, code, 'pykd_model_from_arrays: '//text, stat, errmsg)
    end subroutine fail

  end subroutine pykd_model_from_arrays

  !> model%norm and model%norm_kinds from optional (mean, std) pairs: size 1
  !! is a scalar normalisation (unless the side has one unit: then it is
  !! per-feature, which is the same thing), otherwise one per unit.
  subroutine build_norm(model, mean, std, out_mean, out_std, code, msg)
    type(pykd_model), intent(inout) :: model
    real(real32), intent(in), optional :: mean(:), std(:), out_mean(:), out_std(:)
    integer, intent(out) :: code
    character(len=*), intent(out) :: msg
    integer :: k_in, k_out, ierr

    code = PYKD_ERR_ARG
    msg = ''
    if (present(mean) .neqv. present(std)) msg = 'give both mean and std, or neither'
    if (present(out_mean) .neqv. present(out_std)) msg = 'give both out_mean and out_std, or neither'
    if (msg /= '') return
    k_in = 0; k_out = 0
    if (present(mean)) then
      call side(mean, std, model%n_features, 'mean and std', 'n_features', 1, k_in)
      if (msg /= '') return
    end if
    if (present(out_mean)) then
      call side(out_mean, out_std, model%n_outputs, 'out_mean and out_std', 'the number of outputs', &
                2, k_out)
      if (msg /= '') return
    end if
    allocate (model%norm(max(1, 2 * (k_in + k_out))), stat=ierr)
    if (ierr /= 0) then
      code = PYKD_ERR_ALLOC
      msg = 'cannot allocate the normalisation'
      return
    end if
    model%norm = 0
    if (k_in > 0) model%norm(1:2 * k_in) = [mean, std]
    if (k_out > 0) model%norm(2 * k_in + 1:2 * (k_in + k_out)) = [out_mean, out_std]
    code = PYKD_OK

  contains

    subroutine side(m, s, units, what, units_name, which, k)
      real(real32), intent(in) :: m(:), s(:)
      integer, intent(in) :: units, which
      character(len=*), intent(in) :: what, units_name
      integer, intent(out) :: k
      k = size(m)
      if (size(s) /= k .or. (k /= 1 .and. k /= units)) then
        msg = what//' must both have size 1 or '//units_name//' ('//str(int(units, int64))//')'
      else if (.not. (all(ieee_is_finite(m)) .and. all(ieee_is_finite(s)))) then
        msg = what//' must be finite'
      else if (.not. all(s > 0)) then
        msg = what(index(what, ' and ') + 5:)//' must be > 0'
      end if
      model%norm_kinds(which) = merge(NORM_SCALAR, NORM_PER_FEATURE, k == 1 .and. units /= 1)
    end subroutine side

  end subroutine build_norm

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

  !> Values per mean (or std) of a normalisation code for `units` features.
  pure integer(int64) function norm_count(kind, units)
    integer(int32), intent(in) :: kind
    integer, intent(in) :: units
    norm_count = 0
    if (kind == NORM_SCALAR) norm_count = 1
    if (kind == NORM_PER_FEATURE) norm_count = units
  end function norm_count

  ! ---------------------------------------------------------------- checking

  !> Everything the file format requires of a model about to be saved.
  subroutine check_model(model, code, msg)
    type(pykd_model), intent(in) :: model
    integer, intent(out) :: code
    character(len=*), intent(inout) :: msg
    class(pykd_layer_t), allocatable :: obj
    integer(int64) :: prev
    integer :: l

    code = PYKD_ERR_ARG
    if (.not. model%ok .or. .not. allocated(model%table) .or. .not. allocated(model%metadata) &
        .or. .not. allocated(model%f32) .or. .not. allocated(model%i8) .or. .not. allocated(model%i32) &
        .or. .not. allocated(model%norm)) then
      msg = 'the model is not loaded'
    else if (size(model%table, 1) /= N_FIELDS .or. model%n_layers() < 1) then
      msg = 'the layer table must be (N_FIELDS, n_layers >= 1)'
    else if (len(model%metadata, kind=int64) > MAX_META_BYTES) then
      msg = 'metadata is too large: '//str(len(model%metadata, kind=int64))//' bytes (at most 16 MiB)'
    else if (.not. json_object_ok(model%metadata, msg)) then
      continue
    else if (.not. norms_ok(model, msg)) then
      continue
    end if
    if (msg /= '') return
    prev = model%n_features
    do l = 1, model%n_layers()
      associate (row => model%table(:, l))
        if (row(COL_N_IN) /= prev) then
          msg = 'layer '//str(int(l, int64))//' takes '//str(row(COL_N_IN))//' inputs, but gets '//str(prev)
        else if (row(COL_ACT) < ACT_IDENTITY .or. row(COL_ACT) > ACT_MAX) then
          msg = 'layer '//str(int(l, int64))//': unknown activation '//str(row(COL_ACT))
        else if (.not. slices_ok(model, row, msg)) then
          msg = 'layer '//str(int(l, int64))//': '//msg
        else
          call new_layer(row(COL_KIND), obj, code)
          if (code /= PYKD_OK) then
            msg = 'layer '//str(int(l, int64))//': unknown kind '//str(row(COL_KIND))
          else
            call obj%check(row, model%f32, model%i8, model%i32, code, msg)
            if (code /= PYKD_OK) msg = 'layer '//str(int(l, int64))//' ('//obj%name()//'): '//msg
          end if
        end if
        prev = row(COL_N_OUT)
      end associate
      if (msg /= '') then
        code = PYKD_ERR_ARG
        return
      end if
    end do
    if (prev /= model%n_outputs) then
      msg = 'the last layer outputs '//str(prev)//' values, but n_outputs = '// &
            str(int(model%n_outputs, int64))
      return
    end if
    code = PYKD_OK
  end subroutine check_model

  !> The normalisation codes are known, norm holds their values, finite, std > 0.
  logical function norms_ok(model, msg) result(ok)
    type(pykd_model), intent(in) :: model
    character(len=*), intent(inout) :: msg
    integer(int64) :: k_in, k_out
    ok = .false.
    if (any(model%norm_kinds < NORM_NONE .or. model%norm_kinds > NORM_SCALAR)) then
      msg = 'unknown normalisation kind in norm_kinds'
      return
    end if
    k_in = norm_count(model%norm_kinds(1), model%n_features)
    k_out = norm_count(model%norm_kinds(2), model%n_outputs)
    if (size(model%norm, kind=int64) < 2 * (k_in + k_out)) then
      msg = 'norm has '//str(size(model%norm, kind=int64))//' values, the normalisations need '// &
            str(2 * (k_in + k_out))
    else if (.not. all(ieee_is_finite(model%norm(1:2 * (k_in + k_out))))) then
      msg = 'normalisation mean or std contains NaN or infinite values'
    else if (.not. (all(model%norm(k_in + 1:2 * k_in) > 0) .and. &
                    all(model%norm(2 * k_in + k_out + 1:2 * (k_in + k_out)) > 0))) then
      msg = 'normalisation std must be > 0'
    else
      ok = .true.
    end if
  end function norms_ok

  !> The row's sizes are counts and its slices lie inside the buffers.
  logical function slices_ok(model, row, msg) result(ok)
    type(pykd_model), intent(in) :: model
    integer(int64), intent(in) :: row(N_FIELDS)
    character(len=*), intent(inout) :: msg
    ! One at a time: each sets msg when it fails.
    ok = inside(row(COL_F32_OFF), row(COL_F32_LEN), size(model%f32, kind=int64), 'f32')
    if (ok) ok = inside(row(COL_I8_OFF), row(COL_I8_LEN), size(model%i8, kind=int64), 'i8')
    if (ok) ok = inside(row(COL_I32_OFF), row(COL_I32_LEN), size(model%i32, kind=int64), 'i32')
    if (ok .and. (row(COL_N_IN) < 1 .or. row(COL_N_IN) > MAX_COUNT .or. row(COL_N_OUT) < 1 &
                  .or. row(COL_N_OUT) > MAX_COUNT)) then
      ok = .false.
      msg = 'sizes '//str(row(COL_N_IN))//' x '//str(row(COL_N_OUT))//' outside 1 .. 2**31 - 1'
    end if
  contains
    logical function inside(off, length, n, what)
      integer(int64), intent(in) :: off, length, n
      character(len=*), intent(in) :: what
      inside = off >= 0 .and. length >= 0 .and. off <= n .and. length <= n - off
      if (.not. inside) msg = 'its '//what//' slice ('//str(off)//', '//str(length)// &
                              ') is not inside the '//str(n)//' values of '//what
    end function inside
  end function slices_ok

end module pykd_models
