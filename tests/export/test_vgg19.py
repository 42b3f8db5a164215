"""VGG-19 style-transfer export: costs and gradients, ONNX vs autodiff, the Keras HDF5 loader."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from facedoor_export import nst_export, nst_graph, vgg19  # noqa: E402
from facedoor_export.errors import ExportError  # noqa: E402

RNG = np.random.default_rng(7)
A_G = RNG.normal(size=(1, 3, 4, 5))  # NHWC activations, 5 channels
A_C = RNG.normal(size=(1, 3, 4, 5))


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar function F at X (float64)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def np_content(a: np.ndarray) -> float:
    return float(np.sum((A_C - a) ** 2) / (4 * a.size))


def np_style(flat: np.ndarray, gram_s: np.ndarray) -> float:
    c, m = flat.shape
    return float(np.sum((gram_s - flat @ flat.T) ** 2) / (4 * c**2 * m**2))


def test_content_cost_and_gradient_match_numpy_and_finite_differences():
    j, grad = nst_graph.content_cost_and_grad(tf.constant(A_G), tf.constant(A_C))
    assert float(j) == pytest.approx(np_content(A_G), rel=1e-12)
    assert float(nst_graph.content_cost(tf.constant(A_C), tf.constant(A_G))) == \
        pytest.approx(np_content(A_G), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), numeric_grad(np_content, A_G), rtol=1e-6, atol=1e-9)


def test_style_cost_and_gradient_match_numpy_and_finite_differences():
    flat = A_G.reshape(-1, 5).T.copy()  # (nC, nH*nW)
    style = RNG.normal(size=(5, 12))
    gram_s = style @ style.T
    j, grad = nst_graph.style_cost_and_grad(tf.constant(flat), tf.constant(gram_s))
    assert float(j) == pytest.approx(np_style(flat, gram_s), rel=1e-12)
    assert float(nst_graph.layer_style_cost(tf.constant(A_G), tf.constant(gram_s))) == \
        pytest.approx(np_style(flat, gram_s), rel=1e-12)
    numeric = numeric_grad(lambda f: np_style(f, gram_s), flat)
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-6, atol=1e-9)
    _, scaled = nst_graph.style_cost_and_grad(tf.constant(flat), tf.constant(gram_s), 3.0)
    np.testing.assert_allclose(scaled.numpy(), 3.0 * grad.numpy(), rtol=1e-12)


def test_total_variation_and_gradient_match_numpy_and_finite_differences():
    image = RNG.uniform(0, 255, size=(1, 4, 5, 3))

    def np_tv(x: np.ndarray) -> float:
        return float((np.sum(np.diff(x, axis=1) ** 2) + np.sum(np.diff(x, axis=2) ** 2))
                     / (4 * 5 * 3))

    j, grad = nst_graph.total_variation(tf.constant(image))
    assert float(j) == pytest.approx(np_tv(image), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), numeric_grad(np_tv, image, 1e-4), rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 6, 8, 3), (1, 7, 9, 3)])
def test_avg_pool_backward_is_exact_including_odd_sizes(shape):
    graph = nst_graph.NSTGraph(vgg19.untrained(), ("conv1_1",), ("conv1_1",), layout="NHWC")
    x = tf.constant(RNG.normal(size=shape))
    weights = tf.constant(RNG.normal(size=(1, shape[1] // 2, shape[2] // 2, 3)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.nn.avg_pool2d(x, 2, 2, "VALID") * weights)
    np.testing.assert_allclose(graph.avg_pool_backward(weights, x).numpy(),
                               tape.gradient(loss, x).numpy(), rtol=1e-12)


def test_graph_layers_match_keras_vgg19_with_its_preprocessing():
    """RGB in, means subtracted, conv1_1 flipped: equals Keras VGG19 on preprocess_input (BGR)."""
    import keras

    model = keras.applications.VGG19(include_top=False, weights=None, input_shape=(32, 40, 3))
    weights = vgg19.VGGWeights(
        {name: tuple(np.asarray(v) for v in model.get_layer(vgg19.keras_name(name)).get_weights())
         for name in vgg19.CONV_LAYERS}, "keras", "", False)
    graph = nst_graph.NSTGraph(weights, ("conv1_2",), ("conv1_1",), layout="NHWC")
    image = RNG.uniform(0, 255, size=(1, 32, 40, 3)).astype(np.float32)
    ours = graph.features(tf.constant(image))
    probe = keras.Model(model.input, [model.get_layer("block1_conv2").output,
                                      model.get_layer("block1_conv1").output])
    theirs = probe(keras.applications.vgg19.preprocess_input(image.copy()))
    for got, want in zip(ours, theirs):
        np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def small_graphs():
    """Both graphs converted with a shallow layer set (fast), and their NHWC reference."""
    weights = vgg19.untrained(seed=3)
    layers = (("conv2_2",), ("conv1_1", "conv2_1", "conv3_1"))
    graph = nst_graph.NSTGraph(weights, *layers, layout="NCHW")
    reference = nst_graph.NSTGraph(weights, *layers, layout="NHWC")
    features = nst_export._convert(graph.features, graph.feature_signature(),
                                   graph.feature_names(), 17)
    step = nst_export._convert(graph.step, graph.step_signature(), list(graph.step_outputs), 17)
    return features, step, graph, reference


def test_onnx_loss_and_gradient_match_tensorflow_autodiff(small_graphs):
    features, step, graph, reference = small_graphs
    errors = nst_export.parity(features.SerializeToString(), step.SerializeToString(), graph,
                               reference, sizes=((24, 32), (19, 27)))
    assert set(errors) == {"features", "J", "J_content", "J_style", "J_tv", "grad"}
    assert max(errors.values()) <= nst_export.PARITY_TOLERANCE, errors


def test_onnx_graph_is_nchw_without_layout_transposes(small_graphs):
    features, step, _, _ = small_graphs
    for proto in (features, step):
        ops = [n for n in proto.graph.node if n.op_type == "Transpose"]
        perms = [list(a.ints) for n in ops for a in n.attribute if a.name == "perm"]
        # only RGB-sized tensors change layout (image in, TV gradient, gradient out); the
        # 2-D ones are MatMul sides that ONNX Runtime fuses. No Transpose around any Conv.
        assert sum(1 for p in perms if len(p) == 4) <= 3, perms
        assert nst_export._graph_stats(proto)["layout_transposes"] <= 3


def write_keras_notop_h5(path: Path) -> dict[str, list[np.ndarray]]:
    """A Keras VGG19(include_top=False) weights file written by Keras's own legacy HDF5 saver."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.VGG19(include_top=False, weights=None)
    with h5py.File(path, "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, model)
    return {name: model.get_layer(vgg19.keras_name(name)).get_weights()
            for name in vgg19.CONV_LAYERS}


def test_keras_notop_hdf5_loads_after_hash_check(tmp_path):
    path = tmp_path / vgg19.WEIGHTS_FILE
    expected = write_keras_notop_h5(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    for pin in (sha, md5):
        loaded = vgg19.from_hdf5(path, pin)
        assert loaded.sha256 == sha and not loaded.untrained
        for name, (kernel, bias) in expected.items():
            np.testing.assert_array_equal(loaded.layers[name][0], kernel)
            np.testing.assert_array_equal(loaded.layers[name][1], bias)


def test_keras_notop_hdf5_with_another_hash_is_refused(tmp_path):
    path = tmp_path / vgg19.WEIGHTS_FILE
    write_keras_notop_h5(path)
    with pytest.raises(ExportError, match="does not match.*253f8cb5"):
        vgg19.from_hdf5(path)  # Keras's pinned MD5: this generated file is not the real one
    with pytest.raises(ExportError, match="SHA-256"):
        vgg19.from_hdf5(path, "0" * 64)
    with pytest.raises(ExportError, match="does not exist"):
        vgg19.from_hdf5(tmp_path / "missing.h5")


def test_hdf5_with_wrong_layer_shape_is_refused(tmp_path):
    import h5py

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as fh:
        group = fh.create_group("block1_conv1")
        group.create_dataset("block1_conv1_W_1:0", data=np.zeros((3, 3, 3, 32), np.float32))
        group.create_dataset("block1_conv1_b_1:0", data=np.zeros(32, np.float32))
        group.attrs["weight_names"] = [b"block1_conv1_W_1:0", b"block1_conv1_b_1:0"]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ExportError, match=r"block1_conv1.*expected kernel \(3, 3, 3, 64\)"):
        vgg19.from_hdf5(path, sha)


def test_unknown_layer_flag_is_an_export_error():
    with pytest.raises(ExportError, match="conv9_9"):
        nst_export._layers("conv1_1,conv9_9", nst_graph.DEFAULT_STYLE_LAYERS)
