"""The main job: fine-tune, evaluate, prune and evaluate at each ratio.

    python -m sparse_vit_jax.main --config=configs/digits.py --workdir=runs/digits \
        [--config.optimizer.lr=0.003 --config.prune.ratios="(0.1,0.5)" ...]

Re-running the same command resumes from the workdir's latest checkpoint.
`--config.stages=eval,prune --config.init_from=RUN_DIR` evaluates and prunes a
finished run on any number of devices, without its training data.
"""

from __future__ import annotations

from typing import Any

from sparse_vit_jax import cli


def job(config: Any, workdir: str, command: str) -> None:
    from sparse_vit_jax.experiment import run
    run(config, workdir)


def main() -> None:
    cli.main(job, __doc__)


if __name__ == '__main__':
    main()
