"""Train the miniature MMDiT that ships as the default model (about 7 minutes on one H100).

    python examples/train_mini_mmdit.py --out my-mini-mmdit --minutes 6.2
    python benchmarks/mini_model.py --model my-mini-mmdit --out my-eval     # faithfulness + sample grid

Same as ``python -m ditfa_optimum.mini.train``; see docs/mini-model.md.
"""

from ditfa_optimum.mini.train import main

if __name__ == "__main__":
    raise SystemExit(main())
