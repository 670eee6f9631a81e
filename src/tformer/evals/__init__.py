"""Evaluations of trained models that need no data beyond what tformer bundles.

longctx: passkey retrieval, needle-in-a-haystack and RULER-style tasks at chosen context lengths
and depths (`tformer eval longctx`, docs/longctx.md).
"""
