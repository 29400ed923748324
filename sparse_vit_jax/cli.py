"""What `main` and `sweep` share: flags, --help, smoke, validation, CPU settings, multi-process.

    run(argv, job, doc) -> exit code

parses `--config=FILE [--config.KEY=VALUE ...] --workdir=DIR` into a fresh flag
set (so it can run many times in one process, as the tests do), applies
`config.smoke`, validates the config before JAX starts, keeps freed host memory
for large CPU steps, starts multi-process JAX, then calls `job(config, workdir,
command)` with SIGTERM and SIGINT turned into a stop at the next safe point
(`train.signals`). Problems the user can fix end as one line `error: ...` and exit
2; a stop by signal ends as one line and exit 3 (see `errors`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sparse_vit_jax.errors import UserError, run_cli  # noqa: E402

if TYPE_CHECKING:
    from sparse_vit_jax.train.distributed import FailureWatch

Job = Callable[[Any, str, str], Any]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    while len(text) > 1 and text[0] == text[-1] and text[0] in '"\'':  # a KeyError's repr
        text = text[1:-1]
    return text.splitlines()[0] if text else type(e).__name__


def parse(argv: list[str]) -> tuple[Any, str]:
    """(config, workdir) from the command line; UserError for anything malformed."""
    path = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
    if path is None:
        raise UserError('--config is required, e.g. --config=configs/digits.py')
    if not os.path.isfile(path):
        raise UserError(f'config file {path} not found; pass a configs/*.py path (relative to '
                        f'{os.getcwd()}) e.g. --config=configs/digits.py')
    check_config_file(path)
    fv = flags.FlagValues()
    try:
        config = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                                 flag_values=fv, lock_config=True,
                                                 sys_argv=argv)
        workdir = flags.DEFINE_string('workdir', None, 'Where checkpoints and results go.',
                                      flag_values=fv)
        rest = fv(argv)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - absl / ml_collections / the config file
        msg = _first_line(e)
        if ' ' not in msg:  # a bare key name: an override of an unknown key
            msg = f'unknown config key {msg} in an override'
        raise UserError(f'{msg}; see the keys in sparse_vit_jax/configs.py') from None
    if len(rest) > 1:
        raise UserError(f'unexpected arguments {rest[1:]}; use --config.KEY=VALUE overrides')
    if not workdir.value:
        raise UserError('--workdir is required, e.g. --workdir=runs/digits')
    return config.value, workdir.value


def check_config_file(path: str) -> None:
    """One line for a config file that does not load or does not build our schema (absl's
    would be a bare exception message, a traceback, or a wrong hint). Config files are
    small and side-effect free, so running one twice costs nothing."""
    import importlib.machinery
    import importlib.util

    from sparse_vit_jax.configs import check_schema
    try:
        loader = importlib.machinery.SourceFileLoader('sparse_vit_jax_config_check', path)
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name,
                                                                                 loader))
        loader.exec_module(module)
        if not callable(getattr(module, 'get_config', None)):
            raise UserError(f'config file {path} defines no get_config(); write one as '
                            'configs/digits.py does')
        made = module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a Python file can raise
        raise UserError(f'config file {path} does not load ({type(e).__name__}: '
                        f'{_first_line(e)})') from None
    check_schema(made, f'config file {path}')


def prepare(config: Any) -> Any:
    """Smoke, word lists, validation; then the process settings that precede JAX."""
    from sparse_vit_jax.configs import apply_smoke, normalize, validate
    config = apply_smoke(config) if config.smoke else config
    validate(normalize(config))
    retain_for_config(config)  # before JAX starts its threads
    skip_tpu_without_chips()  # before JAX starts its backends
    import_quietly('tensorflow')  # the input pipeline's
    from sparse_vit_jax.train.distributed import maybe_initialize
    logging.set_verbosity(logging.WARNING)  # keep TFDS/orbax chatter off the progress lines
    maybe_initialize()
    return config


# What TensorFlow's C++ logging prints while it is imported, before absl's logging is set up
# (so TF_CPP_MIN_LOG_LEVEL does not reach it): two info lines, each printed twice.
IMPORT_NOISE = ('All log messages before absl::InitializeLog() is called',
                'oneDNN custom operations are on')


def import_quietly(module: str, noise: tuple[str, ...] = IMPORT_NOISE) -> None:
    """Imports `module` with the lines of its import's output (file descriptor 2, where C++
    libraries write) that contain a `noise` string left out, unless TF_CPP_MIN_LOG_LEVEL
    asks for info lines (0); every other line is passed on to stderr, also when the import
    fails."""
    import importlib
    if module in sys.modules or os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0') == '0':
        importlib.import_module(module)
        return
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            importlib.import_module(module)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines = f.read().decode(errors='replace').splitlines(keepends=True)
            sys.stderr.write(''.join(x for x in lines if not any(n in x for n in noise)))
            sys.stderr.flush()


def _no_tpu_chip() -> None:
    raise RuntimeError('no TPU chip on this host; libtpu was not started')


def skip_tpu_without_chips() -> bool:
    """Keeps JAX from starting libtpu on a host without a TPU chip (libtpu is installed
    with the `test` extra, for compiling for TPUs): libtpu would print five lines of errors
    about TPU hosts before JAX fell back to the CPU or GPU. The chips are counted on the PCI
    bus, as JAX counts them; JAX_PLATFORMS or JAX_FORCE_TPU_INIT leave JAX's choice alone.
    The TPU backend stays registered, its factory failing quietly at once, so that TPU stays
    a platform JAX knows (modules imported later register TPU lowering rules).
    Returns whether the TPU backend was left out."""
    if os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ:
        return False
    import dataclasses

    from jax._src import hardware_utils, xla_bridge
    factories = getattr(xla_bridge, '_backend_factories', {})
    count = getattr(hardware_utils, 'num_available_tpu_chips_and_device_id', None)
    try:
        chips = 1 if count is None else count()[0]
        tpu = dataclasses.replace(factories['tpu'], factory=_no_tpu_chip, fail_quietly=True)
    except Exception:  # noqa: BLE001 - no TPU backend, or JAX of another shape: leave it alone
        return False
    if chips:
        return False
    factories['tpu'] = tpu
    return True


def step_activation_bytes(c: Any) -> int:
    """Rough float32 bytes a train step of config `c` keeps for its backward pass."""
    from sparse_vit_jax.configs import model_shape
    s = model_shape(c)
    tokens = (c.model.image_size // s['patch_size']) ** 2 + 1
    return 4 * c.batch_size * s['num_layers'] * tokens * (
        12 * s['hidden_size'] + 4 * s['mlp_dim'] + 3 * s['num_heads'] * tokens)


def retain_for_config(c: Any) -> bool:
    """Keeps freed host memory for large CPU steps (train.host_memory); says so when it does."""
    from sparse_vit_jax.train.host_memory import ENV, retain_freed_memory
    kept = retain_freed_memory(step_activation_bytes(c))
    if kept:
        print(f'note: freed host memory is kept in the process (large CPU steps); '
              f'{ENV}=system turns that off', flush=True)
    return kept


def run(argv: list[str], job: Job, doc: str = '') -> int:
    """Runs `job` for the command line `argv`; returns the exit code (0, or 2 for a UserError)."""
    if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
        print(doc.strip() + '\n\nEvery config key, its default and meaning: '
              'sparse_vit_jax/configs.py')
        return 0

    def body() -> int:
        config, workdir = parse(argv)
        config = prepare(config)
        import jax

        from sparse_vit_jax.train.workdir import check_workdir
        check_workdir(workdir)

        from sparse_vit_jax.train import signals
        from sparse_vit_jax.train.distributed import FailureWatch
        several = jax.process_count() > 1
        watch = FailureWatch() if several else None
        restore = signals.install(sigterm=not several)
        try:
            _run_job(job, config, workdir,
                     'python -m ' + ' '.join([_module(argv[0]), *argv[1:]]))
        except BaseException as e:
            if watch is not None:
                _exit_now(e, watch)
            raise
        finally:
            restore()
            if watch is not None:
                watch.stop()
        return 0

    try:
        return run_cli(body)
    except SystemExit as e:
        return int(e.code or 0)


def _run_job(job: Job, config: Any, workdir: str, command: str) -> None:
    """`job`, with running out of device memory (which the step's own check did not foresee)
    turned into one line that says what to change."""
    from sparse_vit_jax.experiment import MEMORY_ADVICE
    from sparse_vit_jax.train.memory import out_of_memory
    try:
        job(config, workdir, command)
    except Exception as e:
        if out_of_memory(e):
            raise UserError(f'out of device memory ({_first_line(e)[:300]}): '
                            f'{MEMORY_ADVICE} (in an evaluation: lower config.eval_batch_size)'
                            ) from None
        raise


def _exit_now(e: BaseException, watch: FailureWatch) -> None:
    """One of several processes failed: say why, tell the others (`FailureWatch`) and exit
    now. Waiting at JAX's shutdown barrier would hang this process, and the others with it,
    for minutes."""
    import traceback

    from sparse_vit_jax.errors import Stopped
    from sparse_vit_jax.train.distributed import exit_with_others
    if isinstance(e, UserError):
        print(f'error: {e}', file=sys.stderr)
        code, line = e.exit_code, _first_line(e)
    else:
        traceback.print_exc()
        code, line = 1, f'{type(e).__name__}: {_first_line(e)}'
    sys.stdout.flush()
    sys.stderr.flush()
    if isinstance(e, Stopped):  # an agreed stop: every process is here; leave together
        import jax
        watch.stop()
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        os._exit(code)
    exit_with_others(code, line)


def _module(prog: str) -> str:
    name = os.path.basename(prog)
    return f'sparse_vit_jax.{name[:-3]}' if name.endswith('.py') else name


def main(job: Job, doc: str) -> None:
    sys.exit(run(sys.argv, job, doc))
