"""Models in and out of pykd: ONNX (:mod:`pykd.exchange.onnx`) and NumPy
``.npz`` weights (:mod:`pykd.exchange.npz`); docs/exchange.md.

The ONNX side needs the optional ``onnx`` package (``tools/setup.sh``
installs it with ``onnxruntime``); importing this package does not.
"""
