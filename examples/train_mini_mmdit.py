"""Train the miniature MMDiT that ships as the default model (about 7 minutes on one H100).

    python examples/train_mini_mmdit.py --out my-mini-mmdit --minutes 6.2
    python benchmarks/mini_model.py --model my-mini-mmdit --out my-eval     # faithfulness + sample grid

Same as ``python -m training.train_mini`` from the repository root: the training script and the scenes it draws live
in the repository's ``training/`` folder, not in the installed package; see docs/mini-model.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds training/

from training.train_mini import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
