"""The layers import only downwards, and no module imports itself back through others.

    library     models, sparsity, pruning, selection, checkpoints, data, errors, multihost
    engine      train                 (library: errors, checkpoints, multihost only)
    experiment  configs, objective, optimizer, experiment   (library + engine)
    commands    cli, main, sweep, convert, export            (anything)

Every import counts, also those inside functions.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'sparse_vit_jax'
LIBRARY = {'models', 'sparsity', 'pruning', 'selection', 'checkpoints', 'data', 'errors',
           'multihost'}
ENGINE = {'train'}
EXPERIMENT = {'configs', 'objective', 'optimizer', 'experiment'}
COMMANDS = {'cli', 'main', 'sweep', 'convert', 'export'}
MAY_IMPORT = {
    **{m: LIBRARY for m in LIBRARY},
    'train': ENGINE | {'errors', 'checkpoints', 'multihost'},
    **{m: LIBRARY | ENGINE | EXPERIMENT for m in EXPERIMENT},
    **{m: LIBRARY | ENGINE | EXPERIMENT | COMMANDS for m in COMMANDS},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports(path: Path) -> set[str]:
    """Every sparse_vit_jax module this file imports (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith('sparse_vit_jax')}
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('sparse_vit_jax'):
            found.add(node.module)
            found |= {f'{node.module}.{a.name}' for a in node.names}
    modules = {module_name(p) for p in PKG.rglob('*.py')}
    return {m for m in found if m in modules}


def top(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob('*.py')}


def test_every_module_has_a_layer():
    tops = {top(m) for m in graph()} - {''}
    assert tops <= set(MAY_IMPORT), tops - set(MAY_IMPORT)


def test_lower_layers_never_import_higher_ones():
    bad = [(m, i) for m, deps in graph().items() if top(m)
           for i in deps if top(i) and top(i) not in MAY_IMPORT[top(m)]]
    assert not bad, bad


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    def parent(m: str) -> set[str]:  # importing a.b.c runs a/b/__init__ first
        parts = m.split('.')
        return {'.'.join(parts[:i]) for i in range(2, len(parts))} & set(g)

    edges = {m: {d for i in deps for d in {i} | parent(i) if d != m and not m.startswith(d + '.')}
             for m, deps in g.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d] if d in path else [m, d]
            if d not in state and (c := visit(d, [*path, d])):
                return c
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, find_cycle(graph())


def test_the_checks_catch_violations():
    """A higher import in a library module, and a circle, are both reported."""
    g = graph()
    g['sparse_vit_jax.models.vit'] = g['sparse_vit_jax.models.vit'] | {
        'sparse_vit_jax.experiment'}
    assert [(m, i) for m, deps in g.items() if top(m) for i in deps
            if top(i) and top(i) not in MAY_IMPORT[top(m)]]
    g['sparse_vit_jax.configs'] = g['sparse_vit_jax.configs'] | {'sparse_vit_jax.sweep'}
    g['sparse_vit_jax.sweep'] = g['sparse_vit_jax.sweep'] | {'sparse_vit_jax.configs'}
    assert find_cycle(g) is not None
