"""Triton kernels of proxytune, installed as ``proxytune.kernels`` (jit functions and launchers only).

Nothing here is imported by ``import proxytune``; backends import it lazily when triton is available.
"""
