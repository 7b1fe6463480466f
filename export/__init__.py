"""The release step: export the encoder and ranker to ONNX, quantize behind an accuracy gate, index
the catalogue and write a versioned Triton model repository with its manifest.

One module per concern: ``data`` (input format), ``encoder``, ``quantize``, ``index``, ``ranker``,
``evaluate``, ``repository`` (writer and manifest), ``build`` (the sequence), ``cli``.
"""
