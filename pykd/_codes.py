"""Every code that crosses the Python/Fortran boundary or the model file, once.

``fortran/core/pykd_codes.f90`` holds the Fortran copy; ``tests/test_codes.py``
parses it and checks that both agree, so neither side writes a bare number.
"""

#: Status returned by every Fortran routine (``stat``).
STATUS = {
    "OK": 0,          # success
    "ARG": 1,         # bad argument (size, range, option)
    "LABEL": 2,       # a class label outside [0, classes)
    "NONFINITE": 3,   # NaN or infinity where a finite value is needed
    "ALLOC": 4,       # allocation failed
    "IO": 5,          # file could not be opened or read
    "FORMAT": 6,      # file is not a valid pykd model
    "MPI": 7,         # an MPI call failed, or the ranks disagree (a rank failed, diverged)
}
OK = STATUS["OK"]
ERR_ARG = STATUS["ARG"]
ERR_LABEL = STATUS["LABEL"]
ERR_NONFINITE = STATUS["NONFINITE"]
ERR_ALLOC = STATUS["ALLOC"]
ERR_IO = STATUS["IO"]
ERR_FORMAT = STATUS["FORMAT"]
ERR_MPI = STATUS["MPI"]

#: Activation codes (file field ``activation``; Fortran ``ACT_*``).
ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "gelu": 4, "silu": 5}
#: Activations the fused training step can differentiate (all of them: gelu and
#: silu from the pre-activation, the others from the layer output).
TRAINABLE_ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu", "silu")

#: Loss codes of the fused training step (Fortran ``LOSS_*``): classification
#: on int64 labels (ce, kd against teacher logits), or regression on float32
#: targets (mse, huber), ``*_kd`` adding the same loss against teacher outputs.
LOSSES = {"ce": 0, "kd": 1, "mse": 2, "huber": 3, "mse_kd": 4, "huber_kd": 5}
#: The losses that take float targets instead of labels.
REGRESSION_LOSSES = ("mse", "huber", "mse_kd", "huber_kd")

#: Layer kind codes (file field ``kind``; Fortran ``KIND_*``).
KINDS = {"dense": 1, "dense_int8": 2, "sparse_csr": 3, "low_rank": 4, "codebook": 5,
         "sparse_codebook": 6}

#: Normalisation codes (input and output normalisation; Fortran ``NORM_*``).
NORMS = {"none": 0, "per_feature": 1, "scalar": 2}

#: How an int8 layer quantizes its input (Fortran ``QUANT_*``).
QUANT_MODES = {"dynamic": 0, "static": 1}

#: Columns of the layer table (docs/model.md): NumPy column index = Fortran
#: row index - 1. One int64 row per layer.
TABLE_FIELDS = ("kind", "act", "n_in", "n_out", "f32_off", "f32_len", "i8_off", "i8_len",
                "i32_off", "i32_len", "p1", "p2", "p3", "p4")
COL = {name: i for i, name in enumerate(TABLE_FIELDS)}
N_FIELDS = len(TABLE_FIELDS)

#: Model file format versions this pykd reads; it writes the last.
FORMAT_VERSIONS = (1, 2)
FORMAT_VERSION = FORMAT_VERSIONS[-1]
