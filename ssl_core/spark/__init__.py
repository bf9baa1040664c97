"""SparK's building blocks: sparse (masked) layers, their batch norm, the sparse encoder and the decoder.

:mod:`ssl_core.methods.spark` composes them into the pre-training method.
"""
