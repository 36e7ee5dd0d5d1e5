"""What made the miniature MMDiT, kept out of the wheel: procedural scenes and the faithfulness metric
(`training.scenes`) and the training script (``python -m training.train_mini``, from the repository root).

The package ships only what runs: the trained weights, the pipeline and the caption grammar
(`ditfa_optimum.mini.grammar`). benchmarks/ and tests/ import this folder with the repository root on ``sys.path``.
"""
