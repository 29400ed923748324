"""Export: the real transformers model gives our logits; timm's layout against an independent
construction; zeros stay zeros; structured removal; model card; bad inputs write nothing."""

import json
import re

import jax
import numpy as np
import pytest
from helpers import needs_torch, torch, transformers

from sparse_vit_jax import export as export_cli
from sparse_vit_jax.checkpoints import flatten, load_pretrained, save_params, unflatten
from sparse_vit_jax.models import NUMERICS, create_model, init_params
from sparse_vit_jax.pruning import apply_masks, magnitude_masks

SIZE, CLASSES = 16, 5


def our_model(numerics='jax', **widths):
    return create_model('testing', num_classes=CLASSES, image_size=SIZE, **NUMERICS[numerics],
                        **widths)


def random_params(model, seed=0, ratio=0.5):
    """Every leaf random (the head is zero-initialised), then half the pool pruned."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                          init_params(model, SIZE))
    return jax.device_get(apply_masks(params, magnitude_masks(params, ratio)))


def images(n=3, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def logits(model, params, x):
    return np.asarray(model.apply({'params': params}, x))


def hf_logits(out, x):
    m = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        return m(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()


def safetensors_of(out):
    from safetensors.numpy import load_file
    return load_file(str(out / 'model.safetensors'))


def zeros(arrays):
    return sum(int(np.count_nonzero(np.asarray(v) == 0)) for v in arrays)


@needs_torch
@pytest.mark.parametrize('numerics', ['jax', 'hf'])
def test_hf_round_trip_gives_our_logits_and_keeps_zeros(tmp_path, numerics):
    model = our_model(numerics)
    params = random_params(model)
    save_params(tmp_path / 'p.npz', params)
    out = tmp_path / 'hf'
    export_cli.export(str(tmp_path / 'p.npz'), 'hf', str(out), numerics=numerics)
    x = images()
    np.testing.assert_allclose(hf_logits(out, x), logits(model, params, x), atol=1e-4)
    flat = flatten(params)
    assert zeros(safetensors_of(out).values()) == zeros(flat.values()) > 0
    m, info = transformers.ViTForImageClassification.from_pretrained(
        str(out), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or resized tensor


def zero_units(params, mlp_units, head=None):
    """Zeroes MLP units [0, mlp_units) of every block and, if given, one head of block 0."""
    flat = {k: np.array(v) for k, v in flatten(params).items()}
    for k in flat:
        if '/MlpBlock_0/Dense_0/kernel' in k:
            flat[k][:, :mlp_units] = 0
        if '/MlpBlock_0/Dense_1/kernel' in k:
            flat[k][:mlp_units] = 0
        if head is not None and k.startswith('Transformer/encoderblock_0/Multi'):
            if k.endswith(('query/kernel', 'key/kernel', 'value/kernel')):
                flat[k][:, head] = 0
            if k.endswith('out/kernel'):
                flat[k][head] = 0
    return unflatten(flat)


@needs_torch
def test_structured_hf_drops_uniformly_emptied_mlp_units_and_says_heads_stay(tmp_path):
    model = our_model()
    params = zero_units(random_params(model, ratio=0.1), mlp_units=40, head=1)
    save_params(tmp_path / 'p.npz', params)
    out = tmp_path / 'hf'
    line = export_cli.export(str(tmp_path / 'p.npz'), 'hf', str(out), structured=True)
    assert f'removed 0 heads and {40 * model.num_layers} MLP units' in line
    assert '1 emptied heads are kept' in line
    config = json.loads((out / 'config.json').read_text())
    assert config['intermediate_size'] == model.mlp_dim - 40
    assert config['num_attention_heads'] == model.num_heads
    x = images()
    np.testing.assert_allclose(hf_logits(out, x), logits(model, params, x), atol=1e-4)
    card = (out / 'README.md').read_text()
    assert '1 emptied heads are kept (as zeros)' in card


def test_structured_npz_has_per_block_widths_and_the_same_logits(tmp_path):
    model = our_model()
    params = zero_units(random_params(model, ratio=0.1), mlp_units=40, head=1)
    flat = {k: np.array(v) for k, v in flatten(params).items()}
    flat['Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'][:, 40:50] = 0  # block 1: 50
    flat['Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel'][40:50] = 0
    params = unflatten(flat)
    save_params(tmp_path / 'p.npz', params)
    out = tmp_path / 'npz'
    export_cli.export(str(tmp_path / 'p.npz'), 'npz', str(out), structured=True)
    shape = json.loads((out / 'model.json').read_text())
    heads = [model.num_heads - 1] + [model.num_heads] * (model.num_layers - 1)
    mlp = [model.mlp_dim - 40, model.mlp_dim - 50] + [model.mlp_dim - 40] * (model.num_layers - 2)
    assert shape['num_heads'] == heads and shape['mlp_dim'] == mlp
    small = our_model(num_heads=tuple(heads), mlp_dim=tuple(mlp), head_dim=shape['head_dim'])
    loaded, _ = load_pretrained(out / 'params.npz', init_params(small, SIZE))
    x = images()
    np.testing.assert_allclose(logits(small, loaded, x), logits(model, params, x), atol=1e-5)
    with pytest.raises(SystemExit):  # hf cannot hold per-block head counts: refused, not bent
        export_cli.main([str(out / 'params.npz'), str(tmp_path / 'hf'), '--format', 'hf'])
    assert not (tmp_path / 'hf').exists()


def test_weakest_units_are_removed_as_numpy_ranks_their_kernel_norms(tmp_path):
    """--heads / --mlp-units keep, per block, the heads and MLP units with the largest L2 norm
    of the kernel weights they own (numpy's ranking here), gathered with their biases; a
    format that cannot hold the widths is refused and nothing is written."""
    model = our_model()  # 2 blocks of 2 heads and 64 MLP units
    params = random_params(model, ratio=0.1)
    save_params(tmp_path / 'p.npz', params)
    out = tmp_path / 'small'
    line = export_cli.export(str(tmp_path / 'p.npz'), 'npz', str(out), heads=0.5,
                             mlp_units=0.25)
    assert 'removed the 2 weakest heads and 32 weakest MLP units (layerwise' in line
    flat = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    with np.load(out / 'params.npz') as f:
        got = {k: f[k] for k in f.files}
    att, mlp = 'MultiHeadDotProductAttention_0/', 'MlpBlock_0/'
    for i in range(model.num_layers):
        b = f'Transformer/encoderblock_{i}/'
        w = {k: flat[f'{b}{att}{k}/kernel'] for k in ('query', 'key', 'value', 'out')}
        norm = np.sqrt(sum((w[k] ** 2).sum(axis=(0, 2)) for k in ('query', 'key', 'value'))
                       + (w['out'] ** 2).sum(axis=(1, 2)))
        h = np.sort(np.argsort(-norm)[:1])
        d0, d1 = flat[f'{b}{mlp}Dense_0/kernel'], flat[f'{b}{mlp}Dense_1/kernel']
        m = np.sort(np.argsort(-np.sqrt((d0 ** 2).sum(0) + (d1 ** 2).sum(1)))[:48])
        for k in ('query', 'key', 'value'):
            np.testing.assert_array_equal(got[f'{b}{att}{k}/kernel'], w[k][:, h])
            np.testing.assert_array_equal(got[f'{b}{att}{k}/bias'], flat[f'{b}{att}{k}/bias'][h])
        np.testing.assert_array_equal(got[f'{b}{att}out/kernel'], w['out'][h])
        np.testing.assert_array_equal(got[f'{b}{mlp}Dense_0/kernel'], d0[:, m])
        np.testing.assert_array_equal(got[f'{b}{mlp}Dense_0/bias'],
                                      flat[f'{b}{mlp}Dense_0/bias'][m])
        np.testing.assert_array_equal(got[f'{b}{mlp}Dense_1/kernel'], d1[m])
    shape = json.loads((out / 'model.json').read_text())
    assert shape['num_heads'] == [1, 1] and shape['mlp_dim'] == [48, 48]
    assert 'not this model\'s accuracy' in (out / 'README.md').read_text()
    with pytest.raises(SystemExit):  # hf ties the head size to width / heads
        export_cli.main([str(tmp_path / 'p.npz'), str(tmp_path / 'hf'), '--format', 'hf',
                         '--heads', '0.5'])
    assert not (tmp_path / 'hf').exists()


@needs_torch
def test_timm_layout_equals_an_independent_construction(tmp_path):
    """HF weights -> our params (the tested loader) -> timm export, compared tensor by tensor
    with timm's layout built directly from the HF tensors (timm itself does not import here:
    its torchvision dependency fails beside the CPU torch)."""
    from test_checkpoints import hf_model, hf_to_timm
    m = hf_model('testing', SIZE, eps=1e-6, num_labels=CLASSES)
    torch.save(m.state_dict(), tmp_path / 'hf.pth')
    model = our_model('timm')
    params, _ = load_pretrained(tmp_path / 'hf.pth', init_params(model, SIZE))
    save_params(tmp_path / 'p.npz', params)
    export_cli.export(str(tmp_path / 'p.npz'), 'timm', str(tmp_path / 'timm'), numerics='timm')
    got = safetensors_of(tmp_path / 'timm')
    want = {k: v.numpy() for k, v in hf_to_timm(m.state_dict(), model.num_layers).items()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    config = json.loads((tmp_path / 'timm' / 'config.json').read_text())
    assert config['num_classes'] == CLASSES and config['architecture'] == 'vit_base_patch4_16'
    assert config['model_args']['embed_dim'] == model.hidden_size
    assert config['model_args']['act_layer'] == 'gelu'


def test_timm_itself_loads_the_export(tmp_path):
    """Where timm imports (not beside the CPU torch here: its torchvision fails): the model
    from config.json loads the state dict strictly and gives our logits."""
    timm = pytest.importorskip('timm', exc_type=ImportError)
    model = our_model('timm')
    params = random_params(model)
    save_params(tmp_path / 'p.npz', params)
    out = tmp_path / 'timm'
    export_cli.export(str(tmp_path / 'p.npz'), 'timm', str(out), numerics='timm')
    config = json.loads((out / 'config.json').read_text())
    m = timm.create_model(config['architecture'], num_classes=config['num_classes'],
                          **config['model_args']).eval()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in safetensors_of(out).items()})
    x = images()
    with torch.no_grad():
        got = m(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(got, logits(model, params, x), atol=1e-4)


def fake_run(d, params):
    d.mkdir()
    save_params(d / 'params.npz', params)
    (d / 'results.json').write_text(json.dumps({
        'numerics': 'jax', 'config': {'data': {'name': 'digits'},
                                      'prune': {'include': [], 'scope': 'global'}},
        'eval': {'accuracy': 0.9875, 'examples': 360},
        'prune': [{'ratio': 0.3, 'accuracy': 0.9611}]}))


def test_run_directory_prune_and_model_card(tmp_path, capsys):
    model = our_model()
    params = random_params(model, ratio=0.0)
    fake_run(tmp_path / 'run', params)
    out = tmp_path / 'out'
    export_cli.main([str(tmp_path / 'run'), str(out), '--format', 'npz', '--prune', '0.3'])
    assert capsys.readouterr().out.startswith(f'wrote {out} (npz)')
    with np.load(out / 'params.npz') as f:
        got = {k: f[k] for k in f.files}
    want = flatten(jax.device_get(apply_masks(params, magnitude_masks(params, 0.3))))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    card = (out / 'README.md').read_text()
    for text in (f'source: `{tmp_path / "run"}` (dataset: digits)',
                 'unpruned: test accuracy 0.9875 on 360 examples',
                 'pruned at 0.3: test accuracy 0.9611',
                 '| Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel |',
                 f'python -m sparse_vit_jax.export {tmp_path / "run"} {out} --format npz'):
        assert text in card, text


@needs_torch
def test_nm_export_is_n_of_m_along_every_torch_linear_input_and_names_its_accuracy(tmp_path,
                                                                                   capsys):
    params = random_params(our_model(), ratio=0.0)
    fake_run(tmp_path / 'run', params)
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    results['prune_nm'] = [{'pattern': '2:4', 'ratio': 0.5, 'accuracy': 0.9222}]
    (tmp_path / 'run' / 'results.json').write_text(json.dumps(results))
    out = tmp_path / 'out'
    export_cli.main([str(tmp_path / 'run'), str(out), '--format', 'hf', '--nm', '2:4'])
    assert capsys.readouterr().out.startswith(f'wrote {out} (hf)')
    linear = {k: v for k, v in safetensors_of(out).items()
              if k.endswith('.weight') and v.ndim == 2 and 'embeddings' not in k}
    assert len(linear) == 2 * 6 + 1  # q, k, v, attention out, 2 MLP per block; classifier
    for k, w in linear.items():  # torch's (out, in): groups of 4 consecutive in_features
        groups = np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=2)
        assert (groups == 2).all(), k  # random normals: no zero before
    card = (out / 'README.md').read_text()
    assert '- pruning: N:M 2:4' in card and 'pruned to 2:4: test accuracy 0.9222' in card
    with pytest.raises(SystemExit):
        export_cli.main([str(tmp_path / 'run'), str(tmp_path / 'o2'), '--format', 'hf',
                         '--nm', '2:4', '--prune', '0.5'])
    assert 'choose one' in capsys.readouterr().err
    assert not (tmp_path / 'o2').exists()
    with pytest.raises(SystemExit):  # a kernel whose input size 3 does not divide
        export_cli.main([str(tmp_path / 'run'), str(tmp_path / 'o3'), '--format', 'hf',
                         '--nm', '1:3'])
    assert re.search(r'^error: --nm 1:3: \S+/kernel: input size \d+ is not divisible by m=3 '
                     r"for N:M pruning; use an m that divides every kernel's inputs$",
                     capsys.readouterr().err, re.M)
    assert not (tmp_path / 'o3').exists()


def test_bad_inputs_one_line_and_nothing_written(tmp_path, capsys):
    model = our_model()
    fake_run(tmp_path / 'run', random_params(model))
    (tmp_path / 'unfinished').mkdir()
    (tmp_path / 'unfinished' / 'results.json').write_text('{}')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('mine')
    fake_run(tmp_path / 'torn', random_params(model))
    (tmp_path / 'torn' / 'results.json').write_text('{"eval": ')
    run = str(tmp_path / 'run')
    for args, says in (
            ([str(tmp_path / 'unfinished'), 'OUT', '--format', 'hf'], 'holds no params.npz'),
            ([run, 'OUT', '--format', 'onnx'], "unknown format 'onnx'"),
            ([run, str(tmp_path / 'full'), '--format', 'hf'], 'already exists and is not an '
                                                               'empty directory'),
            ([run, 'OUT', '--format', 'hf', '--prune', '1.5'], '--prune must be in [0, 1)'),
            ([run, str(tmp_path / 'no' / 'x'), '--format', 'npz'], 'parent directory'),
            ([str(tmp_path / 'nothing.npz'), 'OUT', '--format', 'npz'], 'not found'),
            ([str(tmp_path / 'no_run'), 'OUT', '--format', 'npz'], 'no_run not found: export '
                                                                    'takes a run directory'),
            ([str(tmp_path / 'torn'), 'OUT', '--format', 'npz'], 'is not valid JSON')):
        before = sorted(p.name for p in tmp_path.rglob('*'))
        args = [a.replace('OUT', str(tmp_path / 'out')) for a in args]
        with pytest.raises(SystemExit) as e:
            export_cli.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: ') and says in err[0], (args, err)
        assert sorted(p.name for p in tmp_path.rglob('*')) == before, args
    assert (tmp_path / 'full' / 'keep.txt').read_text() == 'mine'
