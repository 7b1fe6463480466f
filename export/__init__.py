"""The release step: export the encoder and ranker to ONNX, quantize behind an accuracy gate, index
the catalogue and write a versioned Triton model repository with its manifest.

One module per concern: ``data`` (input formats), ``instacart`` (its adapter), ``encoder``,
``quantize``, ``index``, ``monotone`` (the ranking model), ``ranker`` (search), ``selfcheck``
(judgment-free checks), ``history`` and ``personalize`` (shoppers), ``evaluate``,
``evaluate_personal``, ``transfer``, ``repository`` (staged writer and manifests), ``build`` (the
sequence), ``cli``.
"""
