"""The paper's comparisons, reproducible (``blackmamba compare``): BlackMamba against dense Mamba, a transformer and a
transformer-MoE at matched active parameters (``archs``), trained alike, then decode and prefill latency measured
interleaved (``latency``), Sinkhorn's convergence and balance (``sinkhorn``), results.json and report.md with plots
(``report``); ``run`` does it all in a folder, resumably."""
