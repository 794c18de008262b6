"""Benchmarks that report ratios against baselines measured in the same run (``blackmamba bench``).

``bench.cpu``: the fused CPU kernels, decode and MoE against transformers / mambapy and the machine's
own limits; ``bench.gpu``: the Triton kernels on a CUDA device (``--device cuda``).
"""
