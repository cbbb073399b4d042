"""`mmfuse demo`: compose SmolLM2-135M-Instruct with EfficientNet-Lite0, train it on easy-VQA and report.

`run.py` contains the command and the pipeline (compose, train in stages under a time budget,
evaluate, answer example questions); `report.py` writes `results/`.
"""
