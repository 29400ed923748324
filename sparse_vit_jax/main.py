"""The main job: fine-tune, evaluate, prune and evaluate at each ratio.

    python -m sparse_vit_jax.main --config=configs/digits.py --workdir=runs/digits \
        [--config.optimizer.lr=0.003 ...]

Re-running the same command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sparse_vit_jax.errors import UserError, run_cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and results go.')


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE overrides')
    if _CONFIG.value is None:
        raise UserError('--config is required, e.g. --config=configs/digits.py')
    if not _WORKDIR.value:
        raise UserError('--workdir is required, e.g. --workdir=runs/digits')
    from sparse_vit_jax.configs import apply_smoke, validate
    from sparse_vit_jax.train.host_memory import retain_for_config

    config = apply_smoke(_CONFIG.value) if _CONFIG.value.smoke else _CONFIG.value
    validate(config)
    retain_for_config(config)  # before JAX starts its threads
    from sparse_vit_jax.train.distributed import maybe_initialize
    from sparse_vit_jax.train.trainer import run

    logging.set_verbosity(logging.WARNING)  # keep TFDS/orbax chatter off the progress lines
    maybe_initialize()
    run(config, _WORKDIR.value)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or --config.KEY override reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if ' ' not in msg.strip('"\''):  # a bare key name: an override of an unknown key
            msg = f'unknown config key {msg.strip(chr(34) + chr(39))} in an override'

        print(f'error: {msg}; see the keys in sparse_vit_jax/configs.py', file=sys.stderr)
        sys.exit(2)


def main() -> None:
    app.run(lambda argv: run_cli(_main, argv), flags_parser=_parse_flags)


if __name__ == '__main__':
    main()
