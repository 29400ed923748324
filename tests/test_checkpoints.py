"""Checkpoint loading against independent references: PyTorch models and scipy."""

import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from helpers import needs_torch, torch, transformers
from scipy import ndimage

from sparse_vit_jax import convert
from sparse_vit_jax.checkpoints import flatten, load_pretrained, unflatten
from sparse_vit_jax.checkpoints.io import save_npz
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import NUMERICS, VARIANTS, abstract_params, create_model, init_params

# (variant, image sizes): two variants, two image sizes each.
PARITY = [('testing', (16, 32)), pytest.param('ViT-Ti_16', (96, 64), marks=pytest.mark.slow)]


def hf_model(variant, image_size, eps, num_labels=5, seed=0):
    v = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=v['hidden_size'], num_hidden_layers=v['num_layers'],
                    num_attention_heads=v['num_heads'], intermediate_size=v['mlp_dim'],
                    image_size=image_size, patch_size=v['patch_size'], num_labels=num_labels,
                    layer_norm_eps=eps, hidden_act='gelu')
    m = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms trivially; randomise all.
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def torch_logits(m, x):
    with torch.no_grad():
        return m(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()


def ours(path, variant, image_size, numerics, num_classes=5):
    model = create_model(variant, num_classes=num_classes, image_size=image_size,
                         **NUMERICS[numerics])
    params, source = load_pretrained(path, init_params(model, image_size))
    return model, params, source


def images(size, n=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def v4_names(sd):
    """The hub's (transformers 4) names, written out here independently of our converter."""
    out = {}
    for k, v in sd.items():
        k = k.replace('vit.layers.', 'vit.encoder.layer.')
        for a, b in (('attention.q_proj', 'attention.attention.query'),
                     ('attention.k_proj', 'attention.attention.key'),
                     ('attention.v_proj', 'attention.attention.value'),
                     ('attention.o_proj', 'attention.output.dense'),
                     ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense')):
            k = k.replace(a, b)
        out[k] = v
    return out


@needs_torch
@pytest.mark.parametrize('variant,sizes', PARITY)
def test_hf_parity(tmp_path, variant, sizes):
    for size in sizes:
        m = hf_model(variant, size, eps=1e-12)
        sd = m.state_dict()
        torch.save(sd, tmp_path / 'v5.pth')
        torch.save(v4_names(sd), tmp_path / 'v4.bin')
        x = images(size)
        ref = torch_logits(m, x)
        for f in ('v5.pth', 'v4.bin'):
            model, params, source = ours(tmp_path / f, variant, size, 'hf')
            assert source == 'hf'
            np.testing.assert_allclose(model.apply({'params': params}, x), ref, atol=1e-4)


def hf_to_timm(sd, d):
    """timm's vit_* state-dict layout, built from an HF model's weights."""
    g = lambda k: sd[k].clone()
    out = {'cls_token': g('vit.embeddings.cls_token'),
           'pos_embed': g('vit.embeddings.position_embeddings'),
           'patch_embed.proj.weight': g('vit.embeddings.patch_embeddings.projection.weight'),
           'patch_embed.proj.bias': g('vit.embeddings.patch_embeddings.projection.bias'),
           'norm.weight': g('vit.layernorm.weight'), 'norm.bias': g('vit.layernorm.bias'),
           'head.weight': g('classifier.weight'), 'head.bias': g('classifier.bias')}
    for i in range(d):
        s, t = f'vit.layers.{i}.', f'blocks.{i}.'
        out[t + 'attn.qkv.weight'] = torch.cat([g(s + f'attention.{n}_proj.weight') for n in 'qkv'])
        out[t + 'attn.qkv.bias'] = torch.cat([g(s + f'attention.{n}_proj.bias') for n in 'qkv'])
        for a, b in (('attention.o_proj', 'attn.proj'), ('layernorm_before', 'norm1'),
                     ('layernorm_after', 'norm2'), ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')):
            out[t + b + '.weight'], out[t + b + '.bias'] = g(s + a + '.weight'), g(s + a + '.bias')
    return out


def hf_to_asyml(sd, d, heads):
    """The asyml/vision-transformer-pytorch layout (the paper's .pth), from HF weights."""
    g = lambda k: sd[k].clone()
    out = {'embedding.weight': g('vit.embeddings.patch_embeddings.projection.weight'),
           'embedding.bias': g('vit.embeddings.patch_embeddings.projection.bias'),
           'cls_token': g('vit.embeddings.cls_token'),
           'transformer.pos_embedding.pos_embedding': g('vit.embeddings.position_embeddings'),
           'transformer.norm.weight': g('vit.layernorm.weight'),
           'transformer.norm.bias': g('vit.layernorm.bias'),
           'classifier.weight': g('classifier.weight'), 'classifier.bias': g('classifier.bias')}
    for i in range(d):
        s, t = f'vit.layers.{i}.', f'transformer.encoder_layers.{i}.'
        for n, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
            w = g(s + f'attention.{n}_proj.weight')  # (H*Dh, D): tensordot weight is (D, H, Dh)
            out[t + f'attn.{name}.weight'] = w.T.reshape(w.shape[1], heads, -1).contiguous()
            out[t + f'attn.{name}.bias'] = g(s + f'attention.{n}_proj.bias').reshape(heads, -1)
        w = g(s + 'attention.o_proj.weight')  # (D, H*Dh) -> (H, Dh, D)
        out[t + 'attn.out.weight'] = w.T.reshape(heads, -1, w.shape[0]).contiguous()
        out[t + 'attn.out.bias'] = g(s + 'attention.o_proj.bias')
        for a, b in (('layernorm_before', 'norm1'), ('layernorm_after', 'norm2'),
                     ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')):
            out[t + b + '.weight'], out[t + b + '.bias'] = g(s + a + '.weight'), g(s + a + '.bias')
    return out


@needs_torch
@pytest.mark.parametrize('layout,eps', [('timm', 1e-6), ('asyml', 1e-5)])
def test_timm_and_asyml_parity(tmp_path, layout, eps):
    v = VARIANTS['testing']
    m = hf_model('testing', 32, eps=eps)
    sd = m.state_dict()
    if layout == 'timm':
        converted = hf_to_timm(sd, v['num_layers'])
    else:
        converted = {'state_dict': hf_to_asyml(sd, v['num_layers'], v['num_heads'])}
    torch.save(converted, tmp_path / 'w.pth')
    model, params, source = ours(tmp_path / 'w.pth', 'testing', 32, layout)
    assert source == layout
    x = images(32)
    np.testing.assert_allclose(model.apply({'params': params}, x), torch_logits(m, x), atol=1e-4)


@needs_torch
def test_safetensors(tmp_path):
    from safetensors.torch import save_file
    m = hf_model('testing', 16, eps=1e-12)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / 'm.safetensors')
    model, params, _ = ours(tmp_path / 'm.safetensors', 'testing', 16, 'hf')
    x = images(16)
    np.testing.assert_allclose(model.apply({'params': params}, x), torch_logits(m, x), atol=1e-4)


@needs_torch
def test_a_torch_file_of_another_width_is_refused_with_its_shape(tmp_path):
    """Weights with narrower MLPs than the model they are loaded onto are refused on the first
    misshapen parameter, with the shape the weights hold (the main command builds its model
    at the file's widths: tests/test_train.py)."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, image_size=16, patch_size=4, num_labels=5)
    torch.save(transformers.ViTForImageClassification(cfg).state_dict(), tmp_path / 'w.pth')
    with pytest.raises(UserError, match=r'MlpBlock_0/Dense_0/bias has shape \(48,\), the model '
                       r'expects \(64,\).*\(the weights: 2 blocks, hidden size 32, MLP units 48, '
                       r'patch size 4\)$'):
        ours(tmp_path / 'w.pth', 'testing', 16, 'hf')
    model = create_model('testing', num_classes=5, mlp_dim=48)  # the config's fix
    load_pretrained(tmp_path / 'w.pth', init_params(model, 16))


@needs_torch
def test_checkpoint_shapes_are_the_read_arrays_shapes_without_reading_them(tmp_path):
    """The shapes that the main command builds its model from (per-block widths), without
    reading a tensor: those of the arrays that reading the file whole gives, for every torch
    layout, safetensors and our .npz, here with narrower MLPs than the variant's; a file
    that cannot be read so (the legacy torch format, a damaged file) gives {}."""
    from safetensors.torch import save_file

    from sparse_vit_jax.checkpoints import block_widths
    from sparse_vit_jax.checkpoints.io import checkpoint_shapes, read_checkpoint
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, image_size=16, patch_size=4, num_labels=5)
    sd = transformers.ViTForImageClassification(cfg).state_dict()
    files = {'hf.pth': sd, 'timm.pth': hf_to_timm(sd, 2),
             'asyml.pth': {'state_dict': hf_to_asyml(sd, 2, 2)}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: t.contiguous() for k, t in sd.items()}, tmp_path / 'hf.safetensors')
    flat, _ = read_checkpoint(tmp_path / 'hf.pth', 2)
    save_npz(tmp_path / 'ours.npz', flat)
    for name in (*files, 'hf.safetensors', 'ours.npz'):
        want = {k: v.shape for k, v in read_checkpoint(tmp_path / name, 2)[0].items()}
        got = checkpoint_shapes(tmp_path / name, 2)
        assert got == want, name
        assert block_widths(got) == {'num_heads': (2, 2), 'mlp_dim': (48, 48), 'head_dim': 16}
    torch.save(sd, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'hf.pth').read_bytes()[:1000])
    assert checkpoint_shapes(tmp_path / 'legacy.pth', 2) == {}
    assert checkpoint_shapes(tmp_path / 'cut.pth', 2) == {}


@needs_torch
def test_convert_keeps_the_narrower_widths_of_a_torch_file(tmp_path):
    """A torch file with narrower MLPs than the named variant converts at its own widths, said
    in the message, and our model at those widths gives PyTorch's logits."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, image_size=16, patch_size=4, num_labels=5,
                                 layer_norm_eps=1e-12, hidden_act='gelu')
    torch.manual_seed(0)
    m = transformers.ViTForImageClassification(cfg).eval()
    torch.save(m.state_dict(), tmp_path / 'w.pth')
    said = convert.convert(str(tmp_path / 'w.pth'), str(tmp_path / 'w.npz'), 'testing')
    assert 'heads per block [2, 2], MLP units per block [48, 48]' in said
    model = create_model('testing', num_classes=5, mlp_dim=(48, 48), num_heads=(2, 2),
                         head_dim=16, **NUMERICS['hf'])
    params, _ = load_pretrained(tmp_path / 'w.npz', init_params(model, 16))
    x = images(16)
    np.testing.assert_allclose(model.apply({'params': params}, x), torch_logits(m, x),
                               atol=1e-4)


@needs_torch
def test_a_torch_file_that_does_not_split_into_the_variants_heads_is_refused(tmp_path, capsys):
    torch.save(hf_model('testing', 16, eps=1e-12).state_dict(), tmp_path / 'w.pth')
    err = run_convert(capsys, tmp_path / 'w.pth', tmp_path / 'o.npz', '--model', 'ViT-Ti_16')
    assert err == ('error: hf checkpoint of hidden size 32 does not split into 3 attention heads '
                   'of equal size; is it a checkpoint of another variant?')
    assert not (tmp_path / 'o.npz').exists()


@needs_torch
def test_checkpoint_source_names_the_layout_without_reading_tensors(tmp_path):
    """The numerics that 'auto' takes from a weights file, from its names: the same source
    as reading it whole, for every torch layout, both torch serialisations (the zip one is
    memory-mapped, the legacy one read whole) and safetensors; a damaged file gets the
    reader's one-line error."""
    from safetensors.torch import save_file

    from sparse_vit_jax.checkpoints.io import checkpoint_source, read_checkpoint
    v = VARIANTS['testing']
    sd = hf_model('testing', 16, eps=1e-12).state_dict()
    files = {'hf': sd, 'timm': hf_to_timm(sd, v['num_layers']),
             'asyml': {'state_dict': hf_to_asyml(sd, v['num_layers'], v['num_heads'])}}
    for layout, obj in files.items():
        for legacy in (False, True):
            path = tmp_path / f'{layout}_{legacy}.pth'
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            assert checkpoint_source(path) == read_checkpoint(path, 2)[1] == layout
    save_file({k: t.contiguous() for k, t in sd.items()}, tmp_path / 'm.safetensors')
    assert checkpoint_source(tmp_path / 'm.safetensors') == 'hf'
    assert checkpoint_source(tmp_path / 'any.npz') == 'jax'  # the official JAX numerics
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes((tmp_path / 'hf_False.pth').read_bytes()[:1000])
    with pytest.raises(UserError, match='is truncated or not a PyTorch checkpoint'):
        checkpoint_source(damaged)


def pre_linen(flat):
    """Rename our Linen names to the official pre-Linen ones (as in the published .npz)."""
    out = {}
    for k, v in flat.items():
        for a, b in (('/LayerNorm_1/', '/LayerNorm_2/'),
                     ('/MultiHeadDotProductAttention_0/', '/MultiHeadDotProductAttention_1/'),
                     ('/MlpBlock_0/', '/MlpBlock_3/')):
            k = k.replace(a, b)
        out[k] = v
    return out


def test_pre_linen_names_are_renumbered_as_flax_does():
    """checkpoints.io renumbers pre-Linen names itself (flax's module for it imports
    TensorFlow); flax.training.checkpoints.convert_pre_linen is the reference: numbering
    across classes, double digits (natural order), nesting, names without a number, and a
    Linen tree, which comes back unchanged."""
    from flax.training.checkpoints import convert_pre_linen

    from sparse_vit_jax.checkpoints.io import _linen_names

    def block(i):  # each leaf names where it came from
        return {'LayerNorm_0': {'scale': f'{i}/ln0'}, 'MultiHeadDotProductAttention_1': {
            'query': {'kernel': f'{i}/q'}}, 'LayerNorm_2': {'bias': f'{i}/ln2'},
            'MlpBlock_3': {'Dense_0': {'kernel': f'{i}/d0'}, 'Dense_1': {'bias': f'{i}/d1'}}}

    numbered = {f'{"Dense" if i % 3 else "Conv"}_{i}': {'kernel': i} for i in range(13)}
    tree = {'Transformer': {f'encoderblock_{i}': block(i) for i in range(12)}, 'cls': 'cls',
            'embedding': {'kernel': 'embedding'}, 'net': numbered}
    got = _linen_names(tree)
    assert got == convert_pre_linen(tree)
    assert set(got['net']) == {*(f'Dense_{i}' for i in range(8)), *(f'Conv_{i}' for i in range(5))}
    assert _linen_names(got) == got


def random_flat(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape, np.float32) * 0.02
            for k, v in flatten(abstract).items()}


def test_official_npz_vit_b16_imagenet21k(tmp_path):
    """ViT-B/16 ImageNet21K file: pre-Linen names, pre_logits, zeroed 21843 head, 224 px."""
    src_model = create_model('ViT-B_16', num_classes=21843, representation_size=768)
    flat = random_flat(abstract_params(src_model, 224))
    flat['head/kernel'][:] = 0
    flat['head/bias'][:] = 0
    path = tmp_path / 'imagenet21k_ViT-B_16.npz'
    save_npz(path, pre_linen(flat))
    assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in np.load(path).files

    model = create_model('ViT-B_16', num_classes=10, image_size=384)
    target = abstract_params(model, 384)
    params, source = load_pretrained(path, target)
    got = flatten(params)
    assert source == 'jax' and 'pre_logits/kernel' not in got
    assert got['head/kernel'].shape == (768, 10) and not got['head/kernel'].any()
    for k in ('Transformer/encoderblock_5/MlpBlock_0/Dense_1/kernel',
              'Transformer/encoderblock_0/LayerNorm_1/scale', 'embedding/kernel', 'cls'):
        np.testing.assert_array_equal(got[k], flat[k])
    # Position embeddings: independent scipy bilinear zoom of the 14x14 grid to 24x24.
    pos = flat['Transformer/posembed_input/pos_embedding']
    grid = ndimage.zoom(pos[0, 1:].reshape(14, 14, 768), (24 / 14, 24 / 14, 1), order=1)
    ref = np.concatenate([pos[:, :1], grid.reshape(1, 576, 768)], axis=1)
    np.testing.assert_allclose(got['Transformer/posembed_input/pos_embedding'], ref, atol=1e-7)


def test_official_npz_testing_variant_roundtrip(tmp_path):
    model = create_model('testing', num_classes=4)
    params = init_params(model, 16, jax.random.key(1))
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero head
    save_npz(tmp_path / 't.npz', pre_linen({k: np.asarray(v) for k, v in flatten(params).items()}))
    loaded, _ = load_pretrained(tmp_path / 't.npz', init_params(model, 16))
    x = images(16)
    np.testing.assert_array_equal(model.apply({'params': loaded}, x),
                                  model.apply({'params': params}, x))
    again, _ = load_pretrained(tmp_path / 't.npz', init_params(model, 16), reinit_head=True)
    assert not np.asarray(again['head']['kernel']).any()


@needs_torch
def test_convert_cli_is_lossless(tmp_path):
    m = hf_model('testing', 16, eps=1e-12)
    torch.save(m.state_dict(), tmp_path / 'hf.pth')
    out = tmp_path / 'hf.npz'
    r = subprocess.run([sys.executable, '-m', 'sparse_vit_jax.convert', str(tmp_path / 'hf.pth'),
                        str(out), '--model', 'testing'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "source numerics 'hf'" in r.stdout
    _, direct, _ = ours(tmp_path / 'hf.pth', 'testing', 16, 'hf')
    via_npz, _ = load_pretrained(out, init_params(create_model('testing', num_classes=5), 16))
    for k, v in flatten(direct).items():
        np.testing.assert_array_equal(flatten(via_npz)[k], v)
    assert not list(tmp_path.glob('.*.tmp'))


def run_convert(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        convert.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_one_line_errors(tmp_path, capsys):
    model = create_model('testing', num_classes=4)
    params = init_params(model, 16)
    good = tmp_path / 'good.npz'
    save_npz(good, {k: np.asarray(v) for k, v in flatten(params).items()})
    dst = tmp_path / 'out.npz'

    assert 'not found' in run_convert(capsys, tmp_path / 'missing.npz', dst, '--model', 'testing')

    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert 'truncated' in run_convert(capsys, truncated, dst, '--model', 'testing')

    pickled = tmp_path / 'pickled.npz'
    np.savez(pickled, **{'cls': np.array([object()], dtype=object)})
    assert 'pickled' in run_convert(capsys, pickled, dst, '--model', 'testing')

    err = run_convert(capsys, good, dst, '--model', 'ViT-Ti_16')
    assert 'has shape (32,), the model expects (192,)' in err

    assert 'unknown model' in run_convert(capsys, good, dst, '--model', 'ViT-Z_9')

    txt = tmp_path / 'weights.txt'
    txt.write_text('hello')
    assert 'unsupported checkpoint format' in run_convert(capsys, txt, dst, '--model', 'testing')
    assert not dst.exists()
    assert zipfile.is_zipfile(good)

    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'params.npz').write_bytes(good.read_bytes())
    err = run_convert(capsys, run, dst, '--model', 'testing')
    assert err == f'error: {run} is a run directory; give a weights file (it holds params.npz)'

    dst.write_bytes(b'an earlier file')
    err = run_convert(capsys, good, dst, '--model', 'testing')
    assert err == f'error: {dst} already exists; choose a new name (nothing is overwritten)'
    assert dst.read_bytes() == b'an earlier file'


class _Evil:
    def __reduce__(self):
        return (os.system, (f'touch {_Evil.marker}',))


@needs_torch
def test_malicious_pickle_is_refused(tmp_path, capsys):
    _Evil.marker = tmp_path / 'pwned'
    torch.save({'state_dict': {'x': _Evil()}}, tmp_path / 'evil.pth')
    err = run_convert(capsys, tmp_path / 'evil.pth', tmp_path / 'o.npz', '--model', 'testing')
    assert 'weights_only' in err
    assert not _Evil.marker.exists()


def test_missing_block_named(tmp_path):
    model = create_model('testing', num_classes=4)
    flat = {k: np.asarray(v) for k, v in flatten(init_params(model, 16)).items()
            if 'encoderblock_1/' not in k}
    save_npz(tmp_path / 'short.npz', flat)
    with pytest.raises(Exception, match='missing parameter Transformer/encoderblock_1/'):
        load_pretrained(tmp_path / 'short.npz', init_params(model, 16))
    assert unflatten(flat)['Transformer']['encoderblock_0']


def test_npz_shapes_and_block_widths_read_headers_as_numpy_reads_the_arrays(tmp_path):
    """Shapes from the array headers alone (official names) equal numpy's arrays' shapes, also
    for pre-Linen names and bfloat16 (2-byte void) arrays; a damaged file gives {}."""
    import ml_dtypes

    from sparse_vit_jax.checkpoints import block_widths
    from sparse_vit_jax.checkpoints.io import npz_shapes, read_checkpoint
    model = create_model('testing', num_classes=4, num_heads=(2, 1), mlp_dim=(64, 48),
                         head_dim=16)
    flat = {k: np.asarray(v) for k, v in flatten(init_params(model, 16)).items()}
    flat['cls'] = flat['cls'].astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / 'p.npz', **pre_linen(flat))
    shapes = npz_shapes(tmp_path / 'p.npz')
    assert shapes == {k: v.shape for k, v in read_checkpoint(tmp_path / 'p.npz', 1)[0].items()}
    assert block_widths(shapes) == {'num_heads': (2, 1), 'mlp_dim': (64, 48), 'head_dim': 16}
    del flat['Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel']
    assert block_widths(flat) is None
    (tmp_path / 'cut.npz').write_bytes((tmp_path / 'p.npz').read_bytes()[:500])
    assert npz_shapes(tmp_path / 'cut.npz') == {}


@needs_torch
def test_bfloat16_weights_load_convert_and_resize_like_their_float32_values(tmp_path):
    """bf16 safetensors (how many checkpoints ship) and a bf16 .npz load as the exact float32
    values torch gives the same bf16 tensors, also when position embeddings are resized."""
    from safetensors.torch import save_file
    sd = {k: v.to(torch.bfloat16) for k, v in hf_model('testing', 16, eps=1e-12)
          .state_dict().items() if v.is_floating_point()}
    save_file(sd, str(tmp_path / 'bf16.safetensors'))
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / 'f32.pth')  # torch's upcast
    for size in (16, 32):  # 32: the position embeddings are resized
        _, got, _ = ours(tmp_path / 'bf16.safetensors', 'testing', size, 'hf')
        _, ref, _ = ours(tmp_path / 'f32.pth', 'testing', size, 'hf')
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    import ml_dtypes
    flat = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in
            flatten(jax.tree.map(np.asarray, ref)).items()}
    np.savez(tmp_path / 'bf16.npz', **flat)  # numpy writes them as 2-byte void
    _, got, _ = ours(tmp_path / 'bf16.npz', 'testing', 32, 'jax')
    for k, v in flatten(got).items():
        np.testing.assert_array_equal(v, flat[k].astype(np.float32), err_msg=k)
    r = subprocess.run([sys.executable, '-m', 'sparse_vit_jax.convert',
                        str(tmp_path / 'bf16.safetensors'), str(tmp_path / 'out.npz'),
                        '--model', 'testing'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / 'out.npz') as f:
        assert {f[k].dtype for k in f.files} == {np.dtype(np.float32)}


def test_integer_or_nonfinite_weights_are_refused(tmp_path):
    model = create_model('testing', num_classes=5)
    flat = flatten(jax.tree.map(np.asarray, init_params(model, 16)))
    np.savez(tmp_path / 'int8.npz', **{k: v.astype(np.int8) for k, v in flat.items()})
    bad = dict(flat)
    bad['head/kernel'] = np.full_like(flat['head/kernel'], np.nan)
    np.savez(tmp_path / 'nan.npz', **bad)
    with pytest.raises(UserError, match='is int8, not floating point'):
        load_pretrained(tmp_path / 'int8.npz', init_params(model, 16))
    with pytest.raises(UserError, match='head/kernel holds NaN or infinite'):
        load_pretrained(tmp_path / 'nan.npz', init_params(model, 16))
